"""The pipeline's Markdown report: metric tables with their protocol, alignment vs no alignment, curves, timings."""

from __future__ import annotations

import datetime
import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from lsvcr import storage  # noqa: E402
from lsvcr.config import FinetuneConfig  # noqa: E402
from lsvcr.metrics import METRIC_NAMES  # noqa: E402


def _metric_table(rows: dict[str, dict], split: str) -> list[str]:
    lines = ["| model | " + " | ".join(METRIC_NAMES) + " | samples |",
             "|---|" + "---:|" * (len(METRIC_NAMES) + 1)]
    for label, metrics in rows.items():
        values = metrics.get(split)
        if not values:
            continue
        cells = " | ".join(f"{values[name]:.4f}" for name in METRIC_NAMES)
        lines.append(f"| {label} | {cells} | {values.get('samples', '')} |")
    return lines


def plot_results(results: dict, path: Path, metrics: tuple[str, ...] = ("ndcg@5", "recall@5")) -> Path:
    """Grouped bars of test metrics per task: aligned vs no alignment vs popularity."""
    tasks = list(results)
    figure, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4), squeeze=False)
    for axis, task in zip(axes[0], tasks):
        rows = results[task]
        labels = list(rows)
        width = 0.8 / len(labels)
        for i, label in enumerate(labels):
            values = [rows[label].get("test", {}).get(metric, 0.0) for metric in metrics]
            bars = axis.bar([m + i * width for m in range(len(metrics))], values, width, label=label)
            axis.bar_label(bars, fmt="%.3f", fontsize=7)
        axis.set_xticks([m + width * (len(labels) - 1) / 2 for m in range(len(metrics))], metrics)
        axis.set_title(f"{task} task (test split)")
        axis.legend(fontsize=8)
        axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def budget_lines(rows: dict[str, dict], max_epochs: int, patience: int) -> list[str]:
    """Each fine-tuned row's best epoch against the stage-2 budget, and which runs the epoch cap (not early
    stopping) ended while they were still improving: their figures are the budget's, not the method's."""
    trained = {label: row for label, row in rows.items() if row.get("epochs_run")}
    if not trained:
        return []
    best = ", ".join(f"{label} {row.get('best_epoch')} of {row['epochs_run']}" for label, row in trained.items())
    paper = FinetuneConfig()  # lsvcr's defaults are the paper's stage-2 budget (METHOD 6.2)
    lines = [f"Stage 2 ran at most {max_epochs} epochs, stopping after {patience} without improvement "
             f"(the paper, and lsvcr's defaults: {paper.max_epochs} and {paper.patience}). "
             f"Best epoch of the epochs run: {best}."]
    capped = [label for label, row in trained.items()
              if row["epochs_run"] >= max_epochs and (row.get("best_epoch") or 0) > max_epochs - patience]
    if capped:
        lines[0] += (f" **Ended by the epoch cap while still improving:** {', '.join(capped)}. These figures are "
                     f"this budget's; with the paper's (`--set finetune.max_epochs={paper.max_epochs} "
                     f"--set finetune.patience={paper.patience}`) they may differ (docs/results.md).")
    return lines + [""]


def write_pipeline_report(out_dir: Path, layout, results: dict, timings: dict[str, float], synthetic: bool,
                          budget: tuple[int, int]) -> Path:
    """`budget`: the stage-2 (max_epochs, patience) the models were trained with."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = [
        "# LSVCR pipeline report",
        "",
        f"Generated {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')}. Storage: `{layout.root}`.",
        "",
    ]
    if synthetic:
        lines += ["**Data: SYNTHETIC** (`lsvcr synth`, the embedded default data set), not KuaiComt: the figures "
                  "show the pipeline works and what alignment changes on simulated users, not paper results.", ""]
    plot_results(results, out_dir / "results.png")
    lines += ["![test metrics](results.png)", ""]
    for task, rows in results.items():
        protocol = next(iter(rows.values()))["protocol"]
        lines += [f"## {task.capitalize()} recommendation", "",
                  f"Protocol: candidates = {protocol['candidates']}; split = {protocol['split']}; "
                  f"ties = {protocol['ties']}; multi-positive: {protocol['multi_positive']}; "
                  f"history length {protocol['history_length']}.", "",
                  "Test split:", "", *_metric_table(rows, "test"), "", *budget_lines(rows, *budget),
                  "Validation split:", "", *_metric_table(rows, "valid"), ""]
        if any(label.endswith("another user's history") for label in rows):
            lines += ["Rows ending in \"another user's history\" are the personalization check: the same test samples "
                      "and candidates, each scored with another sample's history. Equal to the model's own row = the "
                      "model does not use the user's history.", ""]
        for label, uri in (("aligned", layout.model(task)), ("no alignment", layout.model(task, aligned=False))):
            curves = storage.local_dir(uri) / "curves.png"
            if curves.is_file():
                name = f"curves_{task}_{'aligned' if label == 'aligned' else 'noalign'}.png"
                shutil.copyfile(curves, out_dir / name)
                lines += [f"Training curves ({label}):", "", f"![{task} {label}]({name})", ""]
    aligned_curves = storage.local_dir(layout.aligned) / "curves.png"
    if aligned_curves.is_file():
        shutil.copyfile(aligned_curves, out_dir / "curves_alignment.png")
        lines += ["## Stage-1 alignment", "", "![alignment curves](curves_alignment.png)", ""]
    lines += ["## Wall time per stage", "", "| stage | seconds |", "|---|---:|"]
    lines += [f"| {name} | {seconds:.1f} |" for name, seconds in timings.items()]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path

"""Training logs (JSON lines) and their curves (matplotlib with the non-interactive Agg backend)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_jsonl(rows: list[dict], path: str | Path) -> None:
    Path(path).write_text("".join(json.dumps(row) + "\n" for row in rows))


def plot_curves(history: list[dict], path: str | Path, title: str = "",
                loss_keys: tuple[str, ...] = ("train_loss", "train_ce", "train_id_text"),
                metric_keys: tuple[str, ...] = ("valid_ndcg@5", "valid_recall@10", "valid_mrr@10"),
                x_key: str = "epoch") -> Path:
    """Two panels: training losses and validation metrics against `x_key`. Missing keys are skipped."""
    figure, (loss_axis, metric_axis) = plt.subplots(1, 2, figsize=(10, 4))
    x = [row[x_key] for row in history]
    for axis, keys, label in ((loss_axis, loss_keys, "loss"), (metric_axis, metric_keys, "metric")):
        for key in keys:
            values = [row.get(key) for row in history]
            if any(v is not None for v in values):
                axis.plot(x, values, marker="o", markersize=3, label=key)
        axis.set_xlabel(x_key)
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend(fontsize=8)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return Path(path)

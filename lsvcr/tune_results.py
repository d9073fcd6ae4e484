"""The results of a `lsvcr tune` sweep: one row per trial (trials.csv / trials.parquet), the best trial,
a text table and the sweep plot (tune.png)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from lsvcr.config import LSVCRConfig, config_to_dict
from lsvcr.tune_space import SearchParam, apply_params

EXPERIMENT_NAME = "experiment"
TRIALS_DIR = "trials"  # DIR/trials/<trial_id>/model (MODEL/ of each finished trial), aligned/ with align.* keys
OBJECTIVE = "valid_ndcg@5"  # run_finetune reports valid_<metric> every epoch; ndcg@5 selects models (METHOD 7.1)


@dataclass
class TuneSummary:
    rows: list[dict]  # one per trial: trial_id, status, param columns, objective, epochs, seconds, error
    history: list[dict]  # one per reported epoch: trial_id, epoch, objective, timestamp
    param_keys: list[str]
    best_trial_id: str | None
    best_objective: float | None
    best_config: LSVCRConfig | None

    def write(self, out: Path) -> None:
        import pandas as pd

        frame = pd.DataFrame(self.rows)
        partial = out / ".trials.csv.partial"
        frame.to_csv(partial, index=False)
        partial.replace(out / "trials.csv")
        partial = out / ".trials.parquet.partial"
        frame.to_parquet(partial, index=False)
        partial.replace(out / "trials.parquet")
        plot_sweep(self, out / "tune.png")
        if self.best_config is not None:
            header = (f"# Best trial {self.best_trial_id} of the sweep in {out}: {OBJECTIVE} = {self.best_objective:.4f}\n"
                      f"# Train it with: lsvcr finetune --config {out / 'best_config.yaml'} --data ... --vectors ... --out ...\n")
            write_atomic(out / "best_config.yaml",
                          header + yaml.safe_dump(config_to_dict(self.best_config), sort_keys=False))
        print(format_trials(self))


def _error_text(trial) -> str:
    """The line of a trial's error.txt that names the cause: the innermost exception (Ray wraps the
    worker's in RayTaskError/WorkerGroupError), else a lost-worker reason such as an OOM kill."""
    path = Path(trial.path) / "error.txt"
    if not path.is_file():
        return ""
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    wrappers = ("RayTaskError", "WorkerGroupError", "ControllerError", "TrainingFailedError", "TuneError", "RayActorError")
    exceptions = [line for line in lines
                  if _EXCEPTION_LINE.match(line) and not line.split(":")[0].split("(")[0].endswith(wrappers)]
    killed = [line for line in lines if "killed due to" in line or "health check failed" in line]
    chosen = exceptions or killed or lines
    return chosen[-1][:500] if chosen else ""


_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt)(\(\w+\))?: \S")


def _epoch_rows(out: Path, trial_id: str, frame) -> list[dict]:
    """(epoch, objective) of every epoch the trial ran: its Train run's train_log.jsonl (complete across
    resumes) merged with Tune's reported rows (which restart when Tune resumes a trial)."""
    from lsvcr.training_log import read_jsonl

    rows = {}
    if frame is not None and OBJECTIVE in getattr(frame, "columns", ()):
        for epoch, value in zip(frame["epoch"], frame[OBJECTIVE]):
            rows[int(epoch)] = float(value)
    for name in ("model", ".model.partial"):
        for row in read_jsonl(out / TRIALS_DIR / trial_id / name / "train_log.jsonl"):
            rows[int(row["epoch"])] = float(row[OBJECTIVE])
    return [{"epoch": epoch, "objective": value} for epoch, value in sorted(rows.items())]


def summarize(out: Path, config: LSVCRConfig, space: dict[str, SearchParam]) -> TuneSummary:
    """Read the sweep in `out` back from storage (works for a finished, interrupted or restored sweep)."""
    from ray.tune import ExperimentAnalysis

    out = Path(out).resolve()  # ExperimentAnalysis reads relative paths as URIs
    analysis = ExperimentAnalysis(str(out / EXPERIMENT_NAME), default_metric=OBJECTIVE, default_mode="max")
    frames = analysis.trial_dataframes
    param_keys = list(space)
    rows, history = [], []
    for trial in sorted(analysis.trials, key=lambda t: t.trial_id):
        frame = frames.get(trial.trial_id)
        epochs = _epoch_rows(out, trial.trial_id, frame)
        best = max(epochs, key=lambda row: row["objective"]) if epochs else None
        finished = (out / TRIALS_DIR / trial.trial_id / "model" / "_SUCCESS").exists()
        status = {"TERMINATED": "completed" if finished else "stopped_early", "ERROR": "error"}.get(trial.status,
                                                                                                  trial.status.lower())
        row = {"trial_id": trial.trial_id, "status": status}
        for key in param_keys:
            value = trial.config.get("params", {}).get(key)
            row[key] = value.item() if hasattr(value, "item") else value
        row.update({
            "objective": best["objective"] if best else math.nan,
            "best_epoch": best["epoch"] if best else 0,
            "epochs_run": epochs[-1]["epoch"] if epochs else 0,
            # Wall time of the trial's driver since its last (re)start, as Tune measures it.
            "seconds": float((trial.last_result or {}).get("time_total_s", 0.0) or 0.0),
            "error": _error_text(trial) if trial.status == "ERROR" else "",
        })
        rows.append(row)
        if frame is not None and len(frame) and OBJECTIVE in frame.columns:
            # Tune's timestamps are whole seconds; the trial's start plus its float running time is finer.
            started = float((frame["timestamp"] - frame["time_total_s"]).min())
            for _, epoch in frame.iterrows():
                history.append({"trial_id": trial.trial_id, "epoch": int(epoch["epoch"]),
                                "objective": float(epoch[OBJECTIVE]), "started": started,
                                "timestamp": started + float(epoch["time_total_s"])})
    scored = [row for row in rows if not math.isnan(row["objective"])]
    best = max(scored, key=lambda row: row["objective"]) if scored else None
    best_config = apply_params(config, {k: best[k] for k in param_keys}) if best else None
    return TuneSummary(rows, history, param_keys, best["trial_id"] if best else None,
                       best["objective"] if best else None, best_config)


def format_trials(summary: TuneSummary) -> str:
    import pandas as pd

    if not summary.rows:
        return "no trials"
    frame = pd.DataFrame(summary.rows).sort_values("objective", ascending=False, na_position="last")
    frame["error"] = frame["error"].str.slice(0, 60)
    with pd.option_context("display.width", 200, "display.max_columns", 50, "display.float_format", "{:.4g}".format):
        text = frame.to_string(index=False)
    best = f"best: trial {summary.best_trial_id}, {OBJECTIVE} = {summary.best_objective:.4f}" if summary.best_trial_id else "no trial reported a result"
    return f"{text}\n{best}"


def plot_sweep(summary: TuneSummary, path: Path) -> Path:
    """Left: each trial's objective (colour = status). Right: every epoch's value and the best so far
    against wall-clock time since the first report."""
    from lsvcr.training_log import plt

    figure, (trial_axis, time_axis) = plt.subplots(1, 2, figsize=(11, 4))
    colours = {"completed": "tab:blue", "stopped_early": "tab:orange", "error": "tab:red"}
    for index, row in enumerate(summary.rows):
        value = 0.0 if math.isnan(row["objective"]) else row["objective"]
        trial_axis.bar(index, value, color=colours.get(row["status"], "tab:gray"))
        if row["status"] == "error":
            trial_axis.text(index, 0, "error", rotation=90, ha="center", va="bottom", fontsize=8)
    trial_axis.set_xticks(range(len(summary.rows)), [row["trial_id"][-5:] for row in summary.rows], rotation=45, fontsize=8)
    trial_axis.set_ylabel(f"best {OBJECTIVE}")
    trial_axis.set_title("objective per trial (blue: completed, orange: stopped by ASHA, red: error)", fontsize=9)
    if summary.history:
        points = sorted(summary.history, key=lambda point: point["timestamp"])
        start = min(point["started"] for point in points)
        seconds = [point["timestamp"] - start for point in points]
        values = [point["objective"] for point in points]
        best_so_far = [max(values[: i + 1]) for i in range(len(values))]
        time_axis.scatter(seconds, values, s=12, alpha=0.6, label="epoch results")
        time_axis.step(seconds, best_so_far, where="post", color="black", label="best so far")
        time_axis.legend(fontsize=8)
    time_axis.set_xlabel("seconds since the first trial started")
    time_axis.set_ylabel(OBJECTIVE)
    for axis in (trial_axis, time_axis):
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def write_atomic(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    partial.replace(path)

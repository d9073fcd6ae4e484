"""Ray Tune sweeps over stage-2 fine-tuning (and, per trial, frozen stage-1 alignment).

    lsvcr tune --data PREPARED --vectors VECTORS --space SPACE.yaml --out DIR [--task video|comment]
               [--samples N] [--scheduler asha|none] [--max-concurrent K] [--init ALIGNED]

Every trial is the same Ray Train run as `lsvcr finetune` (`run_finetune`), driven by a Tune *function
trainable* (Ray Train V2's Tune integration): the trial's driver function builds the `TorchTrainer`
and `TuneReportCallback` forwards each epoch's validation metrics to Tune. When the space has
`align.*` keys, the trial first runs frozen alignment (`run_align`) into its own directory and
fine-tunes from it. The objective is the validation NDCG@5 of the chosen task (mode max); ASHA
(`time_attr=training_iteration`, i.e. epochs) stops weak trials after `tune.grace_period` epochs.

Resources: the driver function only waits, so it reserves `tune.cpus_per_trial` CPUs (default 0) and
a token amount of memory (a Ray placement group bundle cannot be empty); each Train worker reserves
`finetune.threads_per_worker` CPUs and `tune.gpus_per_trial / finetune.num_workers` GPUs. On this
2-core machine two trials of one 1-CPU worker each run side by side (`tune.max_concurrent` 2).

Output in DIR: `experiment/` (Tune's state; re-running the same command restores it and does not
rerun finished trials), `best_config.yaml` (a full config for `lsvcr finetune --config`),
`trials.csv` / `trials.parquet` (one row per trial), `tune.png`, `space.yaml` and `base_config.yaml`
(what the sweep was started with; a restore with a different space or config is refused).
The space format is documented in configs/tune_space.yaml and docs/tune.md.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import re
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lsvcr.config import LSVCRConfig, config_from_dict, config_to_dict, update_config, validate_config
from lsvcr.errors import ConfigError, LSVCRError

log = logging.getLogger("lsvcr.tune")

EXPERIMENT_NAME = "experiment"
TRIALS_DIR = "trials"  # DIR/trials/<trial_id>/model (MODEL/ of each finished trial), aligned/ with align.* keys
OBJECTIVE = "valid_ndcg@5"  # run_finetune reports valid_<metric> every epoch; ndcg@5 selects models (METHOD 7.1)
SEARCHABLE_SECTIONS = ("model", "finetune", "align")
DISTRIBUTIONS = ("loguniform", "uniform", "randint", "choice", "grid")
# The driver function needs no CPU, but a placement-group bundle cannot be empty: reserve a token of memory.
DRIVER_MEMORY_BYTES = 64 * 2**20


# ----------------------------------------------------------------------------- the search space


@dataclass(frozen=True)
class SearchParam:
    """One searched config value: `kind` is a distribution name or "constant"."""

    key: str  # dotted config path, e.g. finetune.lr
    kind: str
    values: tuple  # [low, high] for ranges, the options for choice/grid, (value,) for a constant


def _field_type(key: str) -> Any:
    """The annotation of the config field at dotted path `key`; ConfigError naming the key if none."""
    parts = key.split(".")
    if len(parts) != 2 or parts[0] not in SEARCHABLE_SECTIONS:
        raise ConfigError(
            f"search space key '{key}': expected section.field with section one of "
            f"{', '.join(SEARCHABLE_SECTIONS)} (data/encode are fixed by the PREPARED/VECTORS inputs, "
            "tune.* configures the sweep itself)")
    section = getattr(LSVCRConfig(), parts[0])
    hints = typing.get_type_hints(type(section))
    if parts[1] not in hints:
        known = ", ".join(f.name for f in dataclasses.fields(section))
        raise ConfigError(f"search space key '{key}': unknown config key (known in {parts[0]}: {known})")
    return hints[parts[1]]


def _check_value(key: str, value: Any) -> Any:
    """Type-check one candidate value against the config field (the same coercion as config files)."""
    section, field = key.split(".")
    probe = LSVCRConfig()
    try:
        update_config(probe, {section: {field: value}})
    except ConfigError as error:
        raise ConfigError(f"search space key '{key}': {str(error).removeprefix(key + ': ')}") from None
    return getattr(getattr(probe, section), field)


def _number(key: str, kind: str, value: Any) -> int | float:
    """A range bound. YAML reads `1e-4` (no dot) as a string, so numeric strings are accepted."""
    if isinstance(value, str):
        try:
            value = int(value) if value.strip().lstrip("+-").isdigit() else float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"search space key '{key}': {kind} bounds must be numbers, got {value!r}")
    return value


def _parse_param(key: str, spec: Any) -> SearchParam:
    annotation = _field_type(key)
    if not isinstance(spec, dict):
        return SearchParam(key, "constant", (_check_value(key, spec),))
    if len(spec) != 1:
        raise ConfigError(f"search space key '{key}': a distribution is a mapping with one key "
                          f"({', '.join(DISTRIBUTIONS)}); got {sorted(spec)}")
    (kind, args), = spec.items()
    if kind not in DISTRIBUTIONS:
        raise ConfigError(f"search space key '{key}': unknown distribution '{kind}' (known: {', '.join(DISTRIBUTIONS)})")
    if not isinstance(args, list) or not args:
        raise ConfigError(f"search space key '{key}': {kind} needs a non-empty list, got {args!r}")
    if kind in ("choice", "grid"):
        return SearchParam(key, kind, tuple(_check_value(key, value) for value in args))
    if len(args) != 2:
        raise ConfigError(f"search space key '{key}': {kind} needs [low, high], got {args!r}")
    low, high = (_number(key, kind, value) for value in args)
    if not low < high:
        raise ConfigError(f"search space key '{key}': {kind} needs low < high, got [{low}, {high}]")
    if kind == "randint":
        if annotation is not int or not all(isinstance(v, int) for v in args):
            raise ConfigError(f"search space key '{key}': randint needs an integer field and integer bounds")
        return SearchParam(key, kind, (low, high))
    if annotation is not float:
        raise ConfigError(f"search space key '{key}': {kind} needs a float field; use randint/choice for "
                          f"integers and choice for other types")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"search space key '{key}': loguniform needs 0 < low, got {low}")
    return SearchParam(key, kind, (float(low), float(high)))


def parse_space(values: Any, where: str = "search space") -> dict[str, SearchParam]:
    """A mapping of dotted config paths to distributions or constants → validated SearchParams."""
    if not isinstance(values, dict) or not values:
        raise ConfigError(f"{where}: expected a non-empty mapping of config keys to distributions, got {values!r}")
    space = {}
    for key, spec in values.items():
        if not isinstance(key, str):
            raise ConfigError(f"{where}: keys must be dotted config paths like finetune.lr, got {key!r}")
        fixed = {"finetune.task": "choose it with --task", "finetune.max_epochs": "set tune.max_epochs instead"}
        if key in fixed:
            raise ConfigError(f"search space key '{key}' cannot be searched: {fixed[key]}")
        space[key] = _parse_param(key, spec)
    return space


def load_space(path: str | Path) -> dict[str, SearchParam]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"search space file not found: {path}")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"search space file {path} is not valid YAML: {error}") from None
    return parse_space(values, where=f"search space {path}")


def space_to_dict(space: dict[str, SearchParam]) -> dict[str, Any]:
    """The YAML form of a parsed space (written beside the sweep, compared on restore)."""
    return {p.key: p.values[0] if p.kind == "constant" else {p.kind: list(p.values)} for p in space.values()}


def tune_param_space(space: dict[str, SearchParam]) -> dict[str, Any]:
    """Tune's `param_space`: {"params": {dotted key: Tune domain}} (dotted keys keep the table readable)."""
    from ray import tune

    makers = {
        "loguniform": lambda v: tune.loguniform(*v),
        "uniform": lambda v: tune.uniform(*v),
        "randint": lambda v: tune.randint(*v),
        "choice": lambda v: tune.choice(list(v)),
        "grid": lambda v: tune.grid_search(list(v)),
        "constant": lambda v: v[0],
    }
    return {"params": {p.key: makers[p.kind](p.values) for p in space.values()}}


def apply_params(config: LSVCRConfig, params: dict[str, Any]) -> LSVCRConfig:
    """A copy of `config` with the trial's sampled values (dotted keys) applied and validated."""
    nested: dict[str, dict[str, Any]] = {}
    for key, value in params.items():
        section, field = key.split(".")
        nested.setdefault(section, {})[field] = value.item() if hasattr(value, "item") else value
    trial_config = copy.deepcopy(config)
    update_config(trial_config, nested)
    validate_config(trial_config)
    return trial_config


# ----------------------------------------------------------------------------- one trial


def _has_align_keys(keys) -> bool:
    return any(key.startswith("align.") for key in keys)


def _trial_driver(trial: dict, *, base_config: dict, data_dir: str, vectors_dir: str | None, init: str | None,
                  trials_root: str, ledger_prefix: str) -> None:
    """Tune function trainable: (optional frozen alignment, then) one `run_finetune` Ray Train run whose
    epochs are reported to Tune. Runs in the trial's actor; the Train workers hold the CPUs."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from lsvcr.finetune import run_finetune

    context = ray.tune.get_context()
    trial_dir = Path(trials_root) / context.get_trial_id()  # beside Tune's state, not in the session's temp dir
    config = apply_params(config_from_dict(base_config), trial["params"])
    if _has_align_keys(trial["params"]):
        from lsvcr.llm.align import run_align  # frozen alignment with this trial's align.* values (METHOD 5)

        aligned = trial_dir / "aligned"
        run_align(config, data_dir, vectors_dir, aligned, mode="frozen")  # resumes / skips if already finished
        init, vectors_dir = str(aligned / "checkpoint.pt"), str(aligned / "vectors")
    tune = config.tune
    resources = None
    if tune.gpus_per_trial > 0:
        resources = {"CPU": float(config.finetune.threads_per_worker),
                     "GPU": tune.gpus_per_trial / config.finetune.num_workers}
    # When Tune resumes the trial, Train resumes from its latest checkpoint in trial_dir/.model.partial.
    run_finetune(config, data_dir, vectors_dir, trial_dir / "model", init,
                 callbacks=[TuneReportCallback(), _TrainPlacementRecorder(f"{ledger_prefix}{context.get_trial_id()}")],
                 resources_per_worker=resources)


# ----------------------------------------------------------------------------- the sweep


def _experiment_inputs(out: Path, config: LSVCRConfig, space: dict[str, SearchParam], data_dir: str,
                       vectors_dir: str | None, init: str | None) -> None:
    """Record what the sweep runs on; a restore with other inputs would silently mix two sweeps."""
    recorded = {
        "space.yaml": yaml.safe_dump(space_to_dict(space), sort_keys=False),
        "base_config.yaml": yaml.safe_dump(config_to_dict(config), sort_keys=False),
        "inputs.json": json.dumps({"data": data_dir, "vectors": vectors_dir, "init": init}, indent=2) + "\n",
    }
    for name, text in recorded.items():
        path = out / name
        if path.is_file() and path.read_text() != text:
            raise ConfigError(f"{out} holds a sweep started with a different {name}; use another --out or delete {out}")
    for name, text in recorded.items():
        _write_atomic(out / name, text)


def _write_atomic(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    partial.replace(path)


def run_tune(config: LSVCRConfig, space: dict[str, SearchParam], data_dir: str | Path, vectors_dir: str | Path | None,
             out_dir: str | Path, init: str | Path | None = None) -> "TuneSummary":
    """Run (or resume) the sweep, then write the trial table, plot and best config into `out_dir`."""
    import ray.tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import BasicVariantGenerator

    from lsvcr.finetune import check_inputs
    from lsvcr.runtime import ensure_ray

    out = Path(out_dir).resolve()
    data_dir = str(Path(data_dir).resolve())
    vectors_dir = str(Path(vectors_dir).resolve()) if vectors_dir else None
    init = str(Path(init).resolve()) if init else None
    check_inputs(config, Path(data_dir), Path(vectors_dir) if vectors_dir else None)
    if _has_align_keys(space) and init:
        raise ConfigError("the space has align.* keys, so every trial aligns itself from --vectors (the output of "
                          "`lsvcr encode`); drop --init, or drop the align.* keys to fine-tune from --init")
    settings = config.tune
    if settings.max_epochs < 1 or settings.grace_period < 1 or settings.max_concurrent < 1:
        raise ConfigError("tune.max_epochs, tune.grace_period and tune.max_concurrent must be ≥ 1")
    # Every trial trains for the sweep's epoch budget (ASHA's max_t); the best config keeps the user's own.
    base = copy.deepcopy(config)
    base.finetune.max_epochs = settings.max_epochs
    out.mkdir(parents=True, exist_ok=True)
    _experiment_inputs(out, base, space, data_dir, vectors_dir, init)

    ensure_ray()
    experiment_path = out / EXPERIMENT_NAME
    ledger_prefix = f"lsvcr-tune:{experiment_path}:"
    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(_trial_driver, base_config=config_to_dict(base), data_dir=data_dir,
                                 vectors_dir=vectors_dir, init=init, trials_root=str(out / TRIALS_DIR),
                                 ledger_prefix=ledger_prefix),
        {"cpu": settings.cpus_per_trial, "memory": DRIVER_MEMORY_BYTES},
    )
    started = time.time()
    if ray.tune.Tuner.can_restore(experiment_path):
        log.info("restoring the sweep in %s (finished trials are kept, unfinished and errored ones resumed)",
                 experiment_path)
        tuner = ray.tune.Tuner.restore(str(experiment_path), trainable=trainable, resume_errored=True)
    else:
        if settings.scheduler == "asha":
            # max_t one past the budget: ASHA stops a trial *at* max_t, which would kill it before it writes its model.
            # time_attr is the reported epoch, not training_iteration: a resumed trial restarts Tune's iteration
            # count at 1 while its Train run continues from its checkpointed epoch.
            scheduler = ASHAScheduler(time_attr="epoch", max_t=settings.max_epochs + 1,
                                      grace_period=min(settings.grace_period, settings.max_epochs), reduction_factor=2)
        else:
            scheduler = FIFOScheduler()
        tuner = ray.tune.Tuner(
            trainable,
            param_space=tune_param_space(space),
            tune_config=ray.tune.TuneConfig(
                metric=OBJECTIVE, mode="max", num_samples=settings.num_samples, scheduler=scheduler,
                # An explicit BasicVariantGenerator ignores TuneConfig.max_concurrent_trials: limit it here.
                search_alg=BasicVariantGenerator(max_concurrent=settings.max_concurrent, random_state=settings.seed),
                trial_dirname_creator=lambda trial: f"trial_{trial.trial_id}",
            ),
            run_config=ray.tune.RunConfig(
                name=EXPERIMENT_NAME, storage_path=str(out),
                # A failing trial is reported in the table; the others go on (Train retries lost workers itself).
                failure_config=ray.tune.FailureConfig(max_failures=0, fail_fast=False),
                callbacks=[_ReapStoppedTrainRuns(ledger_prefix)],
                verbose=1,
            ),
        )
    try:
        tuner.fit()
    except Exception as error:  # noqa: BLE001 - e.g. Tune's own actors lost to an OOM kill of the node
        raise LSVCRError(f"the sweep stopped ({type(error).__name__}: {str(error).splitlines()[0][:300]}); "
                         "its state is saved: re-run the same command to resume it") from error
    _reap_stopped_train_runs(ledger_prefix, wait_s=10.0)
    summary = summarize(out, config, space)
    summary.write(out)
    log.info("sweep finished in %.0f s: %d trials, best %s = %s", time.time() - started, len(summary.rows),
             OBJECTIVE, summary.best_objective)
    return summary


# ----------------------------------------------------------------------------- results


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
            _write_atomic(out / "best_config.yaml",
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
    from lsvcr.report import read_jsonl

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
    from lsvcr.report import plt

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


# ----------------------------------------------------------------------------- stopped-trial cleanup
#
# When Tune stops a trial (ASHA, or max_t), it kills the trial's actor mid-`fit()`: the Train controller
# dies with it, and the worker group's placement group is left to Train V2's PlacementGroupCleaner, which
# asks the State API (the dashboard) whether the controller is alive. On a cluster started without the
# dashboard (`ray.init(include_dashboard=False)`, as here and in the tests) that query always fails, the
# placement group is never removed, its CPUs stay reserved and later trials wait forever. So each trial
# records its worker group's placement group (a Train callback in the controller), and the sweep removes
# those whose controller is dead. With a dashboard this is a no-op (Train has already removed them).


def _ledger_kv():
    from ray.experimental import internal_kv

    return internal_kv


try:  # Train V2's internal worker-group callback (RunConfig accepts it beside UserCallbacks).
    from ray.train.v2._internal.execution.callback import WorkerGroupCallback as _WorkerGroupCallback
except ImportError:  # pragma: no cover - a Ray without Train V2
    _WorkerGroupCallback = object


class _TrainPlacementRecorder(_WorkerGroupCallback):
    def __init__(self, key: str):
        self.key = key

    def after_worker_group_start(self, worker_group) -> None:
        import ray

        group = worker_group.get_worker_group_state().placement_group_handle.placement_group
        record = {"placement_group": group.id.hex(), "controller": ray.get_runtime_context().get_actor_id()}
        _ledger_kv()._internal_kv_put(self.key, json.dumps(record), overwrite=True)


def _reap_stopped_train_runs(prefix: str, wait_s: float = 0.0) -> int:
    """Remove recorded placement groups of dead Train controllers; returns how many were removed."""
    import ray
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    kv = _ledger_kv()
    removed = 0
    deadline = time.monotonic() + wait_s
    while True:
        pending = 0
        for key in kv._internal_kv_list(prefix):
            raw = kv._internal_kv_get(key)
            if raw is None:
                continue
            record = json.loads(raw)
            controller = ray._private.state.actors(actor_id=record["controller"]) or {}
            if controller.get("State", "DEAD") != "DEAD":
                pending += 1
                continue
            group = PlacementGroup(ray.PlacementGroupID(bytes.fromhex(record["placement_group"])))
            if placement_group_table(group).get("state") not in (None, "REMOVED"):
                remove_placement_group(group)
                removed += 1
                log.info("removed the placement group of a stopped trial's Train run (%s)", key.decode()[len(prefix):])
            kv._internal_kv_del(key)
        if pending == 0 or time.monotonic() > deadline:
            return removed
        time.sleep(0.5)


try:
    from ray.tune import Callback as _TuneCallback
except ImportError:  # pragma: no cover
    _TuneCallback = object


class _ReapStoppedTrainRuns(_TuneCallback):
    def __init__(self, prefix: str, every_s: float = 2.0):
        self.prefix, self.every_s, self._last = prefix, every_s, 0.0

    def on_step_begin(self, iteration, trials, **info) -> None:
        if time.monotonic() - self._last >= self.every_s:
            self._last = time.monotonic()
            try:
                _reap_stopped_train_runs(self.prefix)
            except Exception as error:  # noqa: BLE001 - cleanup must never fail the sweep
                log.warning("could not clean up stopped trials' placement groups: %s", error)

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

This module runs the sweep; the space lives in `lsvcr.tune_space`, the results table and plot in
`lsvcr.tune_results`, the cleanup around Ray private APIs in `lsvcr.tune_cleanup`.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path

import yaml

from lsvcr.config import LSVCRConfig, config_from_dict, config_to_dict
from lsvcr.errors import ConfigError, LSVCRError
from lsvcr.tune_cleanup import ReapStoppedTrainRuns, TrainPlacementRecorder, reap_stopped_train_runs
from lsvcr.tune_results import EXPERIMENT_NAME, OBJECTIVE, TRIALS_DIR, summarize, write_atomic
from lsvcr.tune_space import SearchParam, apply_params, space_to_dict, tune_param_space

log = logging.getLogger("lsvcr.tune")

# The driver function needs no CPU, but a placement-group bundle cannot be empty: reserve a token of memory.
DRIVER_MEMORY_BYTES = 64 * 2**20


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
                 callbacks=[TuneReportCallback(), TrainPlacementRecorder(f"{ledger_prefix}{context.get_trial_id()}")],
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
        write_atomic(out / name, text)


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
                callbacks=[ReapStoppedTrainRuns(ledger_prefix)],
                verbose=1,
            ),
        )
    try:
        tuner.fit()
    except Exception as error:  # noqa: BLE001 - e.g. Tune's own actors lost to an OOM kill of the node
        raise LSVCRError(f"the sweep stopped ({type(error).__name__}: {str(error).splitlines()[0][:300]}); "
                         "its state is saved: re-run the same command to resume it") from error
    reap_stopped_train_runs(ledger_prefix, wait_s=10.0)
    summary = summarize(out, config, space)
    summary.write(out)
    log.info("sweep finished in %.0f s: %d trials, best %s = %s", time.time() - started, len(summary.rows),
             OBJECTIVE, summary.best_objective)
    return summary


# ----------------------------------------------------------------------------- results



"""Stage 2: recommendation-oriented fine-tuning on Ray Train (METHOD §6).

    lsvcr finetune --data PREPARED --vectors VECTORS --task video|comment [--init ALIGNED] --out MODEL

One model per task. Loss = CE (full softmax over all videos, pad masked | 20-way softmax over 1
positive + 19 same-video comments) + id_text_loss_weight · L_IT. AdamW, constant lr. Validation
every epoch on the frozen candidate lists (`finetune.selection_ranking: full`: full ranking over all
videos); early stop after `patience` epochs without a better valid `finetune.selection_metric`
(NDCG@5 by default); the best epoch's weights are tested and saved.

Ray Train (`TorchTrainer`, DDP, gloo on CPU / nccl on GPU): every worker reads PREPARED itself,
trains on its shard of each epoch's permutation, validates its shard; metric sums are all-reduced,
so all ranks take the same early-stopping decision. Rank 0 checkpoints every epoch through
`ray.train.report`; re-running with the same `--out` resumes from the latest checkpoint (Ray Train
restores a run whose name and storage path already hold one), and a lost worker restarts the group
from it (`FailureConfig`). The same loop runs as a Ray Tune trainable with `report_to="tune"`.

This module is the driver (`run_finetune`); the objective and the worker loop are in `finetune_worker.py`,
the stage-1 weights and the like-prior warm start in `finetune_init.py`.

Output (docs/formats.md MODEL/): model.pt, inputs.json, config.yaml, metrics.json, train_log.jsonl,
curves.png, built in the sibling `.NAME.partial/` and renamed into place at the end.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from lsvcr import model_files, storage, train_driver
from lsvcr.config import LSVCRConfig, config_to_dict
from lsvcr.data.prepared import load_manifest, num_videos, require_prepared
from lsvcr.errors import ConfigError, DataError
from lsvcr.evaluate import evaluate_model_dir, load_text_tables, metrics_line
from lsvcr.finetune_worker import ray_train_worker
from lsvcr.metrics import METRIC_NAMES
from lsvcr.model import LIKE_PRIOR_RATE
from lsvcr.runtime import allocator_environment
from lsvcr.sample_stream import build_sample_stream
from lsvcr.training_log import plot_curves, read_jsonl, write_jsonl

log = logging.getLogger("lsvcr.finetune")



def make_loop_config(config: LSVCRConfig, data_dir: str | Path, vectors_dir: str | Path | None,
                     init: str | Path | None = None, log_path: str | Path | None = None,
                     report_to: str = "train") -> dict:
    """The `train_loop_config` of `train_loop_per_worker` (also usable by Ray Tune)."""
    return {
        "config": config_to_dict(config),
        "data_dir": str(Path(data_dir).resolve()),
        "vectors_dir": str(Path(vectors_dir).resolve()) if vectors_dir else None,
        "init": str(Path(init).resolve()) if init else None,
        "log_path": str(log_path) if log_path else None,
        "report_to": report_to,
    }


def check_inputs(config: LSVCRConfig, data_dir: Path, vectors_dir: Path | None) -> dict:
    """Fail early, with one clear line, on combinations that cannot train."""
    require_prepared(data_dir)
    manifest = load_manifest(data_dir)
    task, model = config.finetune.task, config.model
    if config.finetune.selection_metric not in METRIC_NAMES:
        raise ConfigError(f"finetune.selection_metric must be one of {', '.join(METRIC_NAMES)}; "
                          f"got {config.finetune.selection_metric!r}")
    if config.finetune.train_targets == "all_positions" and manifest.get("has_comments", True):
        raise ConfigError("finetune.train_targets=all_positions needs a video-only data set (the comment "
                          "cross-attention is not causal in the video history)")
    if task == "comment" and not manifest.get("has_comments", True):
        raise DataError(f"{data_dir} has no comments (video-only data set): the comment task is disabled")
    if task == "comment" and (model.architecture == "sasrec" or model.mode == "id"):
        raise ConfigError("the comment task needs text (model.mode id+text or text); "
                          f"got architecture={model.architecture} mode={model.mode}")
    needs_text = model.architecture == "lsvcr" and model.mode != "id"
    if needs_text and vectors_dir is None:
        raise ConfigError(f"model.mode={model.mode} needs --vectors VECTORS (or --set model.mode=id)")
    return manifest


def prepare_worker_inputs(config: LSVCRConfig, data_dir: Path, vectors_dir: Path | None) -> None:
    """Convert, once and in the driver, what the workers map: the streamed train/valid samples and the
    dense text tables (so the workers neither race to convert nor pay the conversion's peak)."""
    for split in ("train", "valid"):
        build_sample_stream(data_dir, config.finetune.task, split, config.finetune.history_length,
                            config.data.max_comments_per_record)
    if vectors_dir is not None and config.model.architecture != "sasrec" and config.model.mode != "id":
        load_text_tables(config, data_dir, vectors_dir)


@dataclass
class FinetuneResult:
    out_dir: Path
    metrics: dict
    history: list[dict]
    best_epoch: int


def _training_settings(config: LSVCRConfig) -> dict:
    """What a resumed run must share with the interrupted one (resources may change between runs)."""
    values = config_to_dict(config)
    for key in ("num_workers", "threads_per_worker", "use_gpu", "max_failures"):
        values["finetune"].pop(key)
    return {section: values[section] for section in ("data", "model", "finetune")}


def run_finetune(config: LSVCRConfig, data_dir: str | Path, vectors_dir: str | Path | None, out_dir: str | Path,
                 init: str | Path | None = None, *, callbacks: list | None = None,
                 resources_per_worker: dict[str, float] | None = None) -> FinetuneResult:
    """Train with Ray Train, then write MODEL/ (best weights, metrics on valid/test, logs, curves).

    `callbacks` are extra Ray Train `RunConfig` callbacks (e.g. Tune's `TuneReportCallback` when a Tune
    trial drives this run); `resources_per_worker` replaces the default `{"CPU": threads_per_worker}`
    (e.g. a fraction of a GPU per worker so that several sweep trials share one GPU)."""
    out_uri = str(out_dir)
    out = storage.local_dir(out_uri).resolve()
    if storage.is_finished(out_uri):
        log.info("%s is already finished; delete it to train again", out_uri)
        local = storage.pull(out_uri)
        metrics = model_files.read_metrics(local)
        return FinetuneResult(local, metrics, read_jsonl(local / model_files.TRAIN_LOG), metrics.get("best_epoch", 0))
    data_dir = storage.pull(str(data_dir)).resolve()
    vectors_dir = storage.pull(str(vectors_dir)).resolve() if vectors_dir else None
    check_inputs(config, data_dir, vectors_dir)

    staging = train_driver.open_staging(out, config, _training_settings)
    model_files.write_inputs(staging, str(data_dir), str(vectors_dir) if vectors_dir else None,
                             str(Path(init).resolve()) if init else None)
    prepare_worker_inputs(config, data_dir, vectors_dir)

    settings = config.finetune
    trainer_settings = train_driver.TrainerSettings(
        num_workers=settings.num_workers, use_gpu=settings.use_gpu, threads_per_worker=settings.threads_per_worker,
        max_failures=settings.max_failures, checkpoints_to_keep=settings.checkpoints_to_keep,
        no_checkpoint_message="fine-tuning produced no checkpoint (max_epochs = 0?)",
        resources_per_worker=resources_per_worker, env_vars=allocator_environment(settings.allocator),
        callbacks=callbacks)
    loop_config = make_loop_config(config, data_dir, vectors_dir, init, staging / model_files.TRAIN_LOG)
    state = train_driver.fit(ray_train_worker, loop_config, trainer_settings, staging)

    text_dim = 0
    if config.model.architecture == "lsvcr" and config.model.mode != "id":
        text_dim = int(state["model"].get("text_mlp.0.weight", state["model"]["llm_adapter.weight"]).shape[1])
    model_files.write_checkpoint(staging, {
        "model_config": asdict(config.model), "task": config.finetune.task,
        "num_videos": num_videos(data_dir), "text_dim": text_dim,
        "state_dict": state["best_state"], "best_epoch": state["best_epoch"],
        "best_valid": {f"{config.finetune.selection_ranking}_{config.finetune.selection_metric}": state["best"]}, "init_report": state.get("init_report"),
    })
    write_jsonl(state["history"], staging / model_files.TRAIN_LOG)  # the checkpoint's log is the truth after resumes
    plot_curves(state["history"], staging / model_files.CURVES,
                title=f"{config.finetune.task} task, {config.model.architecture}/{config.model.mode}")
    metrics = evaluate_model_dir(staging, device="cpu")
    metrics["best_epoch"] = state["best_epoch"]
    metrics["epochs_run"] = state["epoch"]
    metrics["resumed_after_epochs"] = state["resumed_after"]
    metrics["resumed_inside_epochs"] = state.get("resumed_inside_epoch", [])  # [epoch, steps done] per resume
    if state.get("like_prior_init") is not None:
        metrics["like_prior"] = {"init_weight": state["like_prior_init"],
                                 "best_weight": float(state["best_state"]["comment_like_weight"]) * LIKE_PRIOR_RATE}
    if state.get("text_only_videos") is not None:
        metrics["text_only_videos"] = state["text_only_videos"]  # model.text_only_untrained_videos: how many
    model_files.write_metrics(staging, metrics)
    log.info("%s", metrics_line(metrics))
    train_driver.finalise(staging, out, out_uri)
    return FinetuneResult(out, metrics, state["history"], state["best_epoch"])

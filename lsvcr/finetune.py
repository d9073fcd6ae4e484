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

Output (docs/formats.md MODEL/): model.pt, inputs.json, config.yaml, metrics.json, train_log.jsonl,
curves.png, built in the sibling `.NAME.partial/` and renamed into place at the end.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from lsvcr import model_files, storage, train_driver
from lsvcr.baselines import build_model
from lsvcr.batching import Batch, epoch_rows, history_lengths, make_batch, pool_negatives, position_windows
from lsvcr.sample_arrays import load_item_tables
from lsvcr.sample_stream import build_sample_stream, open_sample_stream
from lsvcr.config import LSVCRConfig, config_from_dict, config_to_dict
from lsvcr.data.prepared import load_manifest, num_videos, require_prepared
from lsvcr.errors import ConfigError, DataError, ModelNotFoundError
from lsvcr.evaluate import evaluate_arrays, evaluate_model_dir, load_text_tables, metrics_line
from lsvcr.metrics import METRIC_NAMES
from lsvcr.model import LIKE_PRIOR_RATE, HistoryStates
from lsvcr.training_log import plot_curves, read_jsonl, write_jsonl
from lsvcr.runtime import choose_device, set_threads

log = logging.getLogger("lsvcr.finetune")

STATE_FILE = train_driver.STATE_FILE


# ----------------------------------------------------------------------------- the objective


class FinetuneObjective(nn.Module):
    """The training loss as one `forward`, so DDP sees every parameter use (METHOD 2.8, 6.3)."""

    def __init__(self, model: nn.Module, task: str, id_text_weight: float, contrast_negatives: int,
                 contrast_negatives_shared_by: int, contrast_negatives_per_direction: bool = True):
        super().__init__()
        self.contrast_negatives_per_direction = contrast_negatives_per_direction
        self.model = model
        self.task = task
        self.id_text_weight = id_text_weight
        self.contrast_negatives = contrast_negatives
        self.contrast_negatives_shared_by = contrast_negatives_shared_by

    def forward(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        if batch.first_target_position is not None:
            return self._every_position(batch)
        states = self.model.encode_histories(batch.history, outputs=(self.task,))
        if self.task == "video":
            logits = self.model.score_videos(batch.history, None, states=states)  # all videos, pad = -inf
            ce = F.cross_entropy(logits, batch.target_video)
        else:
            logits = self.model.score_comments(batch.history, batch.target_video, batch.candidates, states=states)
            ce = F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))
        return self._with_id_text(ce, batch, states)

    def _with_id_text(self, ce: Tensor, batch: Batch, states: HistoryStates | None) -> tuple[Tensor, Tensor, Tensor]:
        """(CE + λ_it·L_IT, CE, L_IT) — METHOD 2.8; L_IT is 0 when its weight is."""
        id_text = torch.zeros((), device=ce.device)
        if self.id_text_weight > 0:
            id_text = self.model.id_text_contrastive_loss(batch.history, states, self.contrast_negatives,
                                                          self.contrast_negatives_shared_by,
                                                          self.contrast_negatives_per_direction)
        return ce + self.id_text_weight * id_text, ce.detach(), id_text.detach()

    def _every_position(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        """finetune.train_targets=all_positions: CE over all videos at every counted position of each window."""
        targets = batch.position_targets()
        counted = targets != 0
        users = self.model.every_position_user_vectors(batch.history)
        ce = F.cross_entropy(self.model.score_user_vectors(users[counted]), targets[counted])
        return self._with_id_text(ce, batch, None)


def build_objective(config: LSVCRConfig, model: nn.Module) -> FinetuneObjective:
    return FinetuneObjective(model, config.finetune.task, config.finetune.id_text_loss_weight,
                             config.finetune.contrast_negatives, config.finetune.contrast_negatives_shared_by,
                             config.finetune.contrast_negatives_per_direction)


# ----------------------------------------------------------------------------- the comment like prior


def fit_like_prior_weight(prior: np.ndarray, pools: np.ndarray, positives: np.ndarray) -> float:
    """Maximum-likelihood weight w of the popularity-only comment model softmax(w · prior[c]) over each
    training sample's pool (every positive against the pool's non-positives). A convex 1-D fit; stage 2
    starts the like prior here, so fine-tuning begins at the popularity ranker and learns what the
    user's history adds (from w = 0 the prior's weight lags behind the text part, which overfits first)."""
    negative = pool_negatives(pools, positives)
    positive = positives != 0
    keep = positive.any(axis=1) & negative.any(axis=1)
    if not keep.any():
        return 0.0
    pool_prior = torch.from_numpy(prior[pools[keep]]).double()
    positive_prior = torch.from_numpy(prior[positives[keep]]).double()
    negative_mask, positive_mask = torch.from_numpy(negative[keep]), torch.from_numpy(positive[keep])
    weight = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight], max_iter=50, line_search_fn="strong_wolfe")

    def negative_log_likelihood() -> Tensor:
        optimizer.zero_grad()
        negatives = torch.logsumexp((weight * pool_prior).masked_fill(~negative_mask, float("-inf")), dim=1)
        own = weight * positive_prior
        per_positive = torch.logaddexp(own, negatives[:, None]) - own
        loss = per_positive[positive_mask].mean()
        loss.backward()
        return loss

    optimizer.step(negative_log_likelihood)
    return float(weight.detach())


def warm_start_like_prior(model: nn.Module, train, tables) -> float | None:
    """Set the comment model's like-prior weight to `fit_like_prior_weight` (None: the model has no prior)."""
    if train.task != "comment" or not getattr(model, "use_like_prior", False):
        return None
    weight = fit_like_prior_weight(model.comment_prior.numpy(), tables.comment_pool[train.target_video],
                                   train.pos_comments)
    with torch.no_grad():
        model.comment_like_weight.fill_(weight / LIKE_PRIOR_RATE)
    log.info("comment like prior: weight %.3f per std of log(1 + likes) (popularity-only MLE on train)", weight)
    return weight


# ----------------------------------------------------------------------------- stage-1 weights (METHOD 6.1)


def load_stage1_checkpoint(model: nn.Module, path: str | Path) -> dict[str, list[str]]:
    """Load aligned SR weights into a stage-2 model: strip leading key components until a key matches
    (e.g. `base_model.model.reccom.`), cast to fp32, pad position tables of another length with their
    mean row, and load non-strictly. Returns (and logs) which keys were loaded / missing / skipped."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise ModelNotFoundError(f"--init checkpoint not found: {path}")
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    source = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(source, dict):
        raise ModelNotFoundError(f"{path}: expected a dict with 'state_dict' (ALIGNED/checkpoint.pt)")
    target = model.state_dict()
    renamed: dict[str, Tensor] = {}
    skipped: list[str] = []
    for key, value in source.items():
        parts = key.split(".")
        match = next((".".join(parts[i:]) for i in range(len(parts)) if ".".join(parts[i:]) in target), None)
        if match is None or not torch.is_tensor(value):
            skipped.append(key)
            continue
        value = value.float() if value.is_floating_point() else value
        wanted = target[match].shape
        if value.shape != wanted and match.endswith("_position.weight") and value.shape[1:] == wanted[1:]:
            if value.shape[0] < wanted[0]:
                padding = value.mean(dim=0, keepdim=True).expand(wanted[0] - value.shape[0], -1)
                value = torch.cat([value, padding], dim=0)
            else:
                value = value[: wanted[0]]
        if value.shape != wanted:
            skipped.append(f"{key} (shape {tuple(value.shape)} != {tuple(wanted)})")
            continue
        renamed[match] = value
    result = model.load_state_dict(renamed, strict=False)
    report = {"loaded": sorted(renamed), "missing": sorted(result.missing_keys), "skipped": skipped}
    log.info("--init %s: loaded %d tensors; missing (trained from scratch): %s; skipped: %s",
             path, len(renamed), report["missing"] or "none", skipped or "none")
    if not renamed:
        raise ModelNotFoundError(f"--init {path}: no key matches the SR model (is it an ALIGNED checkpoint?)")
    return report


# ----------------------------------------------------------------------------- the worker loop


@dataclass
class WorkerContext:
    rank: int
    world_size: int
    device: torch.device
    report: Callable[..., None]  # report(metrics, checkpoint=None)
    get_checkpoint: Callable[[], Any]
    keeps_checkpoints: bool = True
    checkpoint_class: Any = None  # ray.train.Checkpoint or ray.tune.Checkpoint (distinct classes in Ray 2.60)


def _worker_context(report_to: str, use_gpu: str) -> WorkerContext:
    if report_to == "train":
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        return WorkerContext(context.get_world_rank(), context.get_world_size(), ray.train.torch.get_device(),
                             ray.train.report, ray.train.get_checkpoint, checkpoint_class=ray.train.Checkpoint)
    if report_to == "tune":
        import ray.tune

        return WorkerContext(0, 1, choose_device(use_gpu), ray.tune.report, ray.tune.get_checkpoint,
                             checkpoint_class=ray.tune.Checkpoint)
    # "local": no Ray at all (debugging, benchmarks): keep checkpoints in memory only.
    return WorkerContext(0, 1, choose_device(use_gpu), lambda metrics, checkpoint=None: None, lambda: None,
                         keeps_checkpoints=False)


def _all_reduce_sum(values: Tensor, context: WorkerContext) -> Tensor:
    if context.world_size > 1:
        values = values.to(context.device)
        dist.all_reduce(values)
    return values.cpu()


def train_loop_per_worker(loop_config: dict) -> dict:
    """One Ray Train worker (or a Tune trial with `report_to="tune"`). Keys of `loop_config`: config
    (dict of LSVCRConfig), data_dir, vectors_dir, init, log_path (rank 0 appends train_log.jsonl
    there if set), report_to ("train" | "tune" | "local"). Returns the final training state
    (history, best_state, best_epoch, ...); Ray ignores it, in-process callers ("local") use it."""
    # 1. config, threads, where this worker reports
    config = config_from_dict(loop_config["config"])
    settings = config.finetune
    selection_metric = settings.selection_metric
    set_threads(settings.threads_per_worker)
    context = _worker_context(loop_config.get("report_to", "train"), settings.use_gpu)
    torch.manual_seed(settings.seed)
    data_dir = Path(loop_config["data_dir"])
    vectors_dir = Path(loop_config["vectors_dir"]) if loop_config.get("vectors_dir") else None

    # 2. data and the model
    tables = load_item_tables(data_dir, config.data.hot_comments)
    # Memory-mapped, padded per batch: a worker reads only the rows of its own batches (issue #16).
    train = open_sample_stream(data_dir, settings.task, "train", settings.history_length,
                               config.data.max_comments_per_record)
    valid = open_sample_stream(data_dir, settings.task, "valid", settings.history_length,
                               config.data.max_comments_per_record)
    train_lengths = history_lengths(train)
    window_rows = first_targets = None  # finetune.train_targets=all_positions: the windows that are trained
    if settings.train_targets == "all_positions":
        window_rows, first_targets = position_windows(np.asarray(train.user_all), train_lengths,
                                                      settings.history_length, settings.target_stride)
        train_lengths = train_lengths[window_rows]
    video_text, comment_text = load_text_tables(config, data_dir, vectors_dir)
    model = build_model(config.model, tables.num_videos, video_text, comment_text,
                        torch.from_numpy(tables.comment_likes))

    # 3. resume from the latest checkpoint, or start (from --init's stage-1 weights, the fitted like prior)
    checkpoint = context.get_checkpoint()
    state: dict[str, Any] = {"epoch": 0, "best": -1.0, "best_epoch": 0, "best_state": None, "bad_epochs": 0,
                             "history": [], "init_report": None, "resumed_after": []}
    if checkpoint is not None:
        state = train_driver.load_checkpoint_state(checkpoint)
        model.load_state_dict(state.pop("model"))
        state["resumed_after"].append(state["epoch"])
        log.info("resuming after epoch %d (best %s %.4f at epoch %d)", state["epoch"], selection_metric,
                 state["best"], state["best_epoch"])
    else:
        if loop_config.get("init"):
            state["init_report"] = load_stage1_checkpoint(model, loop_config["init"])
        state["like_prior_init"] = warm_start_like_prior(model, train, tables)

    # 4. the objective (DDP-wrapped across workers) and its optimizer
    objective = build_objective(config, model)
    if context.world_size > 1:
        objective = train_driver.wrap_ddp(objective)
    else:
        objective = objective.to(context.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    if "optimizer" in state:
        optimizer.load_state_dict(state.pop("optimizer"))

    # 5. the epochs: train on this rank's shard, validate (sums all-reduced), log, checkpoint, early stop
    log_path = Path(loop_config["log_path"]) if loop_config.get("log_path") and context.rank == 0 else None
    for epoch in range(state["epoch"] + 1, settings.max_epochs + 1):
        if state["bad_epochs"] >= settings.patience:
            break
        started, cpu_started = time.perf_counter(), time.process_time()
        objective.train()
        shuffle_rng = np.random.default_rng([settings.seed, epoch])  # same permutation on every rank
        batch_rng = np.random.default_rng([settings.seed, epoch, context.rank, 1])
        # finetune.batch_size is the global batch: DDP averages the ranks' gradients of their shares.
        per_rank_batch = -(-settings.batch_size // context.world_size)
        batches = epoch_rows(len(train) if window_rows is None else len(window_rows), per_rank_batch, shuffle_rng,
                             context.rank, context.world_size, lengths=train_lengths if settings.length_bucketing else None)
        sums = torch.zeros(4, dtype=torch.float64)  # loss, ce, id_text, samples
        progress = tqdm(batches, desc=f"epoch {epoch}", disable=context.rank != 0, leave=False, mininterval=2.0)
        for rows in progress:
            if window_rows is None:
                batch = make_batch(train, tables, rows, rng=batch_rng, comment_negatives=settings.comment_negatives)
                targets = len(rows)
            else:
                batch = make_batch(train, tables, window_rows[rows], rng=batch_rng)
                batch.first_target_position = torch.from_numpy(first_targets[rows])
                targets = int((batch.position_targets() != 0).sum())
            loss, ce, id_text = objective(batch.to(context.device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sums += torch.tensor([loss.item() * targets, ce.item() * targets, id_text.item() * targets, targets],
                                 dtype=torch.float64)
            progress.set_postfix(loss=f"{loss.item():.4f}", refresh=False)  # the bar redraws at mininterval
        train_seconds = time.perf_counter() - started
        train_cpu_seconds = time.process_time() - cpu_started  # ≪ train_seconds when the machine is shared
        sums = _all_reduce_sum(sums, context)
        accumulator = evaluate_arrays(model, valid, tables, device=context.device, batch_size=settings.eval_batch_size,
                                      full_ranking=settings.selection_ranking == "full",
                                      exclude_seen=settings.exclude_seen,
                                      rank=context.rank, world_size=context.world_size)
        accumulator.load_tensor(_all_reduce_sum(accumulator.as_tensor(), context))
        valid_metrics = accumulator.result()
        samples = max(sums[3].item(), 1.0)
        row = {
            "epoch": epoch,
            "train_loss": sums[0].item() / samples, "train_ce": sums[1].item() / samples,
            "train_id_text": sums[2].item() / samples,
            **{f"valid_{name}": valid_metrics[name] for name in METRIC_NAMES},
            "train_seconds": train_seconds, "train_cpu_seconds": train_cpu_seconds,
            "seconds": time.perf_counter() - started,
            "samples_per_second": samples / train_seconds,
        }
        if getattr(model, "use_like_prior", False) and settings.task == "comment":
            row["like_prior_weight"] = model.comment_like_weight.item() * LIKE_PRIOR_RATE
        if valid_metrics[selection_metric] > state["best"]:
            state.update(best=valid_metrics[selection_metric], best_epoch=epoch, bad_epochs=0,
                         best_state={k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
        else:
            state["bad_epochs"] += 1
        row[f"best_valid_{selection_metric}"] = state["best"]
        state["epoch"] = epoch
        state["history"].append(row)
        if log_path is not None:
            with log_path.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
        if context.rank == 0:
            log.info("epoch %d: loss %.4f  valid %s %.4f (best %.4f @ %d)  %.1f samples/s  %.1f s", epoch,
                     row["train_loss"], selection_metric, valid_metrics[selection_metric], state["best"],
                     state["best_epoch"], row["samples_per_second"], row["seconds"])
        _report_epoch(context, row, state, model, optimizer)
    return state


def _ray_train_worker(loop_config: dict) -> None:
    """`train_loop_per_worker` for Ray Train, which rejects tensors in a worker's return value (the
    state travels in the checkpoints instead)."""
    train_loop_per_worker(loop_config)


def _report_epoch(context: WorkerContext, row: dict, state: dict, model: nn.Module, optimizer) -> None:
    """Every rank reports the metrics; rank 0 attaches a checkpoint holding everything needed to resume."""
    def payload() -> dict:
        return dict(state, model=model.state_dict(), optimizer=optimizer.state_dict())

    attaches = context.rank == 0 and context.keeps_checkpoints
    train_driver.report(context.report, row, payload if attaches else None, context.checkpoint_class)


# ----------------------------------------------------------------------------- the driver


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
        resources_per_worker=resources_per_worker, callbacks=callbacks)
    loop_config = make_loop_config(config, data_dir, vectors_dir, init, staging / model_files.TRAIN_LOG)
    state = train_driver.fit(_ray_train_worker, loop_config, trainer_settings, staging)

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
    if state.get("like_prior_init") is not None:
        metrics["like_prior"] = {"init_weight": state["like_prior_init"],
                                 "best_weight": float(state["best_state"]["comment_like_weight"]) * LIKE_PRIOR_RATE}
    model_files.write_metrics(staging, metrics)
    log.info("%s", metrics_line(metrics))
    train_driver.finalise(staging, out, out_uri)
    return FinetuneResult(out, metrics, state["history"], state["best_epoch"])

"""The stage-2 worker (METHOD 6): the fine-tuning objective and the loop one Ray Train worker (or a Ray Tune trial,
or an in-process caller) runs: data, model, resume or start, the epochs with validation, early stopping and
checkpoints. `lsvcr.finetune` drives it.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from lsvcr import train_driver
from lsvcr.baselines import build_model, training_target_counts
from lsvcr.batching import Batch, epoch_rows, history_lengths, make_batch, position_windows
from lsvcr.config import LSVCRConfig, config_from_dict
from lsvcr.evaluate import evaluate_arrays, load_text_tables
from lsvcr.finetune_init import load_stage1_checkpoint, warm_start_like_prior
from lsvcr.metrics import METRIC_NAMES
from lsvcr.model import LIKE_PRIOR_RATE, HistoryStates
from lsvcr.runtime import choose_device, release_arrow_memory, set_threads
from lsvcr.sample_arrays import load_comment_pools
from lsvcr.sample_stream import open_sample_stream
from lsvcr.vectors import release_item_vector_pages

log = logging.getLogger("lsvcr.finetune")


# ----------------------------------------------------------------------------- the objective


class FinetuneObjective(nn.Module):
    """The training loss as one `forward`, so DDP sees every parameter use (METHOD 2.8, 6.3)."""

    def __init__(self, model: nn.Module, task: str, id_text_weight: float, contrast_negatives: int,
                 contrast_negatives_shared_by: int, contrast_negatives_per_direction: bool = True,
                 max_logits_mb: float = 0.0):
        super().__init__()
        self.contrast_negatives_per_direction = contrast_negatives_per_direction
        self.max_logits_mb = max_logits_mb
        self.model = model
        self.task = task
        self.id_text_weight = id_text_weight
        self.contrast_negatives = contrast_negatives
        self.contrast_negatives_shared_by = contrast_negatives_shared_by
        self.needs_histories = model.use_repeat_logit  # model.repeat_logit: the CE needs the rows' histories

    def forward(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        if batch.first_target_position is not None:
            return self._every_position(batch)
        states = self.model.encode_histories(batch.history, outputs=(self.task,))
        if self.task == "video":  # CE over all videos (the pad excluded)
            ce = self.model.video_cross_entropy(self.model.video_user_vector(states), batch.target_video,
                                                self.max_logits_mb, **self._histories(batch.history.video_history))
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
        prefixes = self.model.prefix_histories(batch.history.video_history)[counted] if self.needs_histories else None
        ce = self.model.video_cross_entropy(users[counted], targets[counted], self.max_logits_mb,
                                            **self._histories(prefixes))
        return self._with_id_text(ce, batch, None)

    def _histories(self, video_history: Tensor | None) -> dict:
        return {"video_history": video_history} if self.needs_histories else {}


def build_objective(config: LSVCRConfig, model: nn.Module) -> FinetuneObjective:
    return FinetuneObjective(model, config.finetune.task, config.finetune.id_text_loss_weight,
                             config.finetune.contrast_negatives, config.finetune.contrast_negatives_shared_by,
                             config.finetune.contrast_negatives_per_direction, config.finetune.max_logits_mb)


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
    # finetune.checkpoint_every_steps applies (Ray Train only: a Tune report is a scheduler's training iteration)
    checkpoints_inside_epochs: bool = False


def _worker_context(report_to: str, use_gpu: str) -> WorkerContext:
    if report_to == "train":
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        return WorkerContext(context.get_world_rank(), context.get_world_size(), ray.train.torch.get_device(),
                             ray.train.report, ray.train.get_checkpoint, checkpoint_class=ray.train.Checkpoint,
                             checkpoints_inside_epochs=True)
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
    tables = load_comment_pools(data_dir, config.data.hot_comments)
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
    release_arrow_memory()  # the table reads above are done

    # 3. resume from the latest checkpoint, or start (from --init's stage-1 weights, the fitted like prior)
    checkpoint = context.get_checkpoint()
    state: dict[str, Any] = {"epoch": 0, "best": -1.0, "best_epoch": 0, "best_state": None, "bad_epochs": 0,
                             "history": [], "init_report": None, "resumed_after": []}
    mid_epoch = None  # a checkpoint taken inside an epoch: where in it to go on (finetune.checkpoint_every_steps)
    if checkpoint is not None:
        state = train_driver.load_checkpoint_state(checkpoint)
        model.load_state_dict(state.pop("model"))
        mid_epoch = state.pop("mid_epoch", None)
        if mid_epoch is not None and len(mid_epoch["rank_states"]) != context.world_size:
            log.warning("the checkpoint inside epoch %d was taken by %d workers, not %d: that epoch restarts",
                        mid_epoch["epoch"], len(mid_epoch["rank_states"]), context.world_size)
            mid_epoch = None
        state["resumed_after"].append(state["epoch"])
        if mid_epoch is not None:
            state.setdefault("resumed_inside_epoch", []).append([mid_epoch["epoch"], mid_epoch["steps_done"]])
        log.info("resuming after epoch %d%s (best %s %.4f at epoch %d)", state["epoch"],
                 f" and {mid_epoch['steps_done']} steps of epoch {mid_epoch['epoch']}" if mid_epoch else "",
                 selection_metric, state["best"], state["best_epoch"])
    else:
        if loop_config.get("init"):
            state["init_report"] = load_stage1_checkpoint(model, loop_config["init"])
        state["like_prior_init"] = warm_start_like_prior(model, train, tables)
        # After --init (an aligned model holds its own all-true mask). A comment model keeps every ID: the rule is about
        # ranking videos, and a video's comment history says nothing of whether it was ever a video target.
        if config.model.text_only_untrained_videos and settings.task == "video":
            trained = torch.from_numpy(training_target_counts(data_dir) > 0)
            model.keep_ids_of(trained)
            state["text_only_videos"] = int((~trained[1:]).sum())
            log.info("model.text_only_untrained_videos: %d of %d videos are never a training target; they are scored by "
                     "their text alone at inference", state["text_only_videos"], tables.num_videos)

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
        if settings.max_steps_per_epoch:
            batches = batches[:settings.max_steps_per_epoch]
        sums = torch.zeros(4, dtype=torch.float64)  # loss, ce, id_text, samples
        steps_done = 0
        if mid_epoch is not None and mid_epoch["epoch"] == epoch:  # go on where the checkpoint was taken
            steps_done = mid_epoch["steps_done"]
            if context.rank == 0:  # all ranks' sums so far; the epoch end all-reduces them with the others' rest
                sums = mid_epoch["sums"].clone()
            started -= mid_epoch["train_seconds"]
            cpu_started -= mid_epoch["train_cpu_seconds"]
            restore_rank_state(mid_epoch["rank_states"][context.rank], batch_rng)
            mid_epoch = None
        progress = tqdm(batches[steps_done:], desc=f"epoch {epoch}", disable=context.rank != 0, leave=False,
                        mininterval=2.0, initial=steps_done, total=len(batches))
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
            release_item_vector_pages()  # the text rows this step gathered: page cache, not this worker's RSS
            sums += torch.tensor([loss.item() * targets, ce.item() * targets, id_text.item() * targets, targets],
                                 dtype=torch.float64)
            progress.set_postfix(loss=f"{loss.item():.4f}", refresh=False)  # the bar redraws at mininterval
            steps_done += 1
            if wants_mid_epoch_checkpoint(settings.checkpoint_every_steps, steps_done, len(batches), context):
                _report_mid_epoch(context, state, model, optimizer, {
                    "epoch": epoch, "steps_done": steps_done, "steps": len(batches), "sums": sums,
                    "train_seconds": time.perf_counter() - started,
                    "train_cpu_seconds": time.process_time() - cpu_started}, batch_rng)
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
            "train_steps": len(batches),
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


def ray_train_worker(loop_config: dict) -> None:
    """`train_loop_per_worker` for Ray Train, which rejects tensors in a worker's return value (the
    state travels in the checkpoints instead)."""
    train_loop_per_worker(loop_config)


def wants_mid_epoch_checkpoint(every_steps: int, steps_done: int, epoch_steps: int, context: WorkerContext) -> bool:
    """A checkpoint inside the epoch after `steps_done` steps? Only where the context allows it (Ray Train),
    and never at the epoch's last step (the epoch end reports then)."""
    return (context.checkpoints_inside_epochs and every_steps > 0 and steps_done % every_steps == 0
            and steps_done < epoch_steps)


def rank_state(batch_rng: np.random.Generator) -> dict:
    """What makes this rank's rest of the epoch the same after a resume: its sampling and dropout RNGs."""
    return {"batch_rng": batch_rng.bit_generator.state, "torch_rng": torch.get_rng_state()}


def restore_rank_state(saved: dict, batch_rng: np.random.Generator) -> None:
    batch_rng.bit_generator.state = saved["batch_rng"]
    torch.set_rng_state(saved["torch_rng"])


def _gather(value: Any, context: WorkerContext) -> list[Any]:
    """`value` of every rank, in rank order (a collective: every rank calls it at the same step)."""
    if context.world_size == 1:
        return [value]
    gathered: list[Any] = [None] * context.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def _report_mid_epoch(context: WorkerContext, state: dict, model: nn.Module, optimizer, progress: dict,
                      batch_rng: np.random.Generator) -> None:
    """Every rank reports the steps done; rank 0 attaches a checkpoint of the model, the optimizer, the epoch's
    partial sums (all ranks') and every rank's RNG states, so the resumed epoch goes on as if never stopped."""
    progress = dict(progress, sums=_all_reduce_sum(progress["sums"].clone(), context))  # resumes on rank 0
    rank_states = _gather(rank_state(batch_rng), context)
    metrics = {"epoch": progress["epoch"] - 1, "step_in_epoch": progress["steps_done"], "steps_in_epoch": progress["steps"]}

    def payload() -> dict:
        return dict(state, model=model.state_dict(), optimizer=optimizer.state_dict(),
                    mid_epoch=dict(progress, rank_states=rank_states))

    attaches = context.rank == 0
    train_driver.report(context.report, metrics, payload if attaches else None, context.checkpoint_class)


def _report_epoch(context: WorkerContext, row: dict, state: dict, model: nn.Module, optimizer) -> None:
    """Every rank reports the metrics; rank 0 attaches a checkpoint holding everything needed to resume."""
    def payload() -> dict:
        return dict(state, model=model.state_dict(), optimizer=optimizer.state_dict())

    attaches = context.rank == 0 and context.keeps_checkpoints
    train_driver.report(context.report, row, payload if attaches else None, context.checkpoint_class)

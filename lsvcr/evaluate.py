"""Ranking evaluation of a fine-tuned model, with the protocol written beside the numbers (METHOD 7).

Protocols:
- `sampled` (default, the official code's): video task = the frozen 100 candidates of each sample
  (target + 99 seeded uniform negatives); comment task = the current video's comment pool (≤100, all
  positives kept). Both come from PREPARED, so every run ranks the same lists.
- `full` (video task, `--full-ranking`): the target against every video; `exclude_seen` drops the
  videos already in the (truncated) history from the ranking.
Ties count against the positive (see lsvcr/metrics.py).

Personalization check (`swapped_history` in metrics.json): the test split scored again with every
sample's history swapped for another sample's (targets and candidates unchanged). A model that uses
the user's history loses quality; one that ranks by item features alone scores the same.

`lsvcr evaluate --model DIR` writes DIR/metrics.json and prints a table.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lsvcr import model_files
from lsvcr.baselines import fit_popularity, training_target_counts
from lsvcr.batching import epoch_rows, history_lengths, make_batch
from lsvcr.sample_arrays import CommentPools, SampleArrays, load_comment_likes, load_comment_pools
from lsvcr.sample_stream import SampleStream, open_sample_stream
from lsvcr.config import LSVCRConfig
from lsvcr.data.prepared import VIDEOS_FILE
from lsvcr.errors import ConfigError, DataError
from lsvcr.metrics import (
    METRIC_NAMES, GroupedMetrics, MetricAccumulator, metric_values, single_positive_metric_values, sums_of,
)
from lsvcr.runtime import release_arrow_memory
from lsvcr.vectors import release_item_vector_pages

log = logging.getLogger("lsvcr.evaluate")


# ----------------------------------------------------------------------------- loading a MODEL/ dir


@dataclass
class TrainedModel:
    model: nn.Module
    task: str
    config: LSVCRConfig
    data_dir: Path
    vectors_dir: Path | None


def load_text_tables(config: LSVCRConfig, data_dir: Path, vectors_dir: Path | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The frozen text tables the model needs (None, None for ID-only models)."""
    if config.model.architecture == "sasrec" or config.model.mode == "id":
        return None, None
    if vectors_dir is None:
        raise DataError(f"model.mode={config.model.mode} needs item text vectors: pass --vectors VECTORS")
    from lsvcr.vectors import open_item_tensors

    # Read-only memory maps shared by the node's processes; the model keeps them as they are (no copy).
    return open_item_tensors(vectors_dir, data_dir)


def load_trained_model(model_dir: str | Path, *, data_dir: str | Path | None = None,
                       vectors_dir: str | Path | None = None, device: str | torch.device = "cpu") -> TrainedModel:
    """Rebuild the best model of a MODEL/ directory (model.pt + config.yaml + inputs.json), in eval mode.
    The text tables come from the VECTORS used in training unless `vectors_dir` overrides them."""
    from lsvcr.baselines import build_model

    checkpoint = model_files.read_checkpoint(model_dir)
    config = model_files.read_config(model_dir)
    inputs = model_files.read_inputs(model_dir)
    data_dir = Path(data_dir or inputs.get("data") or "")
    if not (data_dir / VIDEOS_FILE).is_file():
        raise DataError(f"PREPARED directory not found for {model_dir}: pass --data (tried {data_dir})")
    vectors = vectors_dir or inputs.get("vectors")
    vectors_dir = Path(vectors) if vectors else None
    config.model.comment_like_prior = False  # models saved before the option existed were trained without it
    config.model.text_mlp_dim = 1 << 30  # ... and without an llm_emb_mlp on raw vectors
    for key, value in checkpoint["model_config"].items():
        setattr(config.model, key, value)
    video_text, comment_text = load_text_tables(config, data_dir, vectors_dir)
    comment_likes = torch.from_numpy(load_comment_likes(data_dir)) if config.model.comment_like_prior else None
    model = build_model(config.model, checkpoint["num_videos"], video_text, comment_text, comment_likes)
    model.load_state_dict(checkpoint["state_dict"])
    return TrainedModel(model.to(device).eval(), checkpoint["task"], config, data_dir, vectors_dir)


# ----------------------------------------------------------------------------- ranking


def protocol_description(task: str, full_ranking: bool, exclude_seen: bool, history_length: int) -> dict:
    if full_ranking:
        candidates = "all videos" + (" minus those in the user's history" if exclude_seen
                                      else ", those in the user's history included (kept as candidates)")
    elif task == "video":
        candidates = "100 frozen candidates per sample: target + 99 seeded uniform negatives"
    else:
        candidates = "the current video's comment pool (<=100, all positives kept), frozen"
    return {
        "name": "full" if full_ranking else "sampled",
        "task": task,
        "candidates": candidates,
        "ties": "pessimistic (a positive tied with a negative ranks below it)",
        "multi_positive": "recall=hits/#pos, IDCG over min(#pos,K), MRR of the first hit",
        "split": "leave-last-out per user: valid = second-to-last target, test = last",
        "history_length": history_length,
    }


# Breakdown buckets (video task): lower edges. History length = the videos the model sees (after truncation to
# finetune.history_length); popularity = how often the target video is a target in the training split (as the
# popularity baseline counts it; 0 = a video never seen as a training target: cold for the ID embeddings).
HISTORY_LENGTH_EDGES = (0, 1, 5, 10, 20, 50)
TARGET_POPULARITY_EDGES = (0, 1, 10, 50, 200)


def bucket_labels(edges: tuple[int, ...]) -> tuple[str, ...]:
    """(0, 1, 10) -> ("0", "1-9", "10+")."""
    labels = []
    for low, high in zip(edges, (*edges[1:], None)):
        labels.append(f"{low}+" if high is None else str(low) if high == low + 1 else f"{low}-{high - 1}")
    return tuple(labels)


def bucket_of(values: torch.Tensor, edges: tuple[int, ...]) -> torch.Tensor:
    """Index of each value's bucket (values below the first edge fall into the first)."""
    return torch.bucketize(values, torch.tensor(edges[1:], dtype=values.dtype), right=True).long()


class Breakdown:
    """Video-task metrics by history length and by the target's training popularity (`lsvcr evaluate
    --breakdown`): where short histories and cold videos lose, and whether text helps there."""

    def __init__(self, target_counts: np.ndarray):
        self.target_counts = torch.as_tensor(target_counts, dtype=torch.long)
        self.by_history_length = GroupedMetrics(bucket_labels(HISTORY_LENGTH_EDGES))
        self.by_target_popularity = GroupedMetrics(bucket_labels(TARGET_POPULARITY_EDGES))

    def add(self, video_history: torch.Tensor, target_video: torch.Tensor, values: dict[str, torch.Tensor]) -> None:
        values = {name: row_values.cpu() for name, row_values in values.items()}
        lengths = (video_history > 0).sum(dim=1).cpu()
        self.by_history_length.add(values, bucket_of(lengths, HISTORY_LENGTH_EDGES))
        popularity = self.target_counts[target_video.cpu()]
        self.by_target_popularity.add(values, bucket_of(popularity, TARGET_POPULARITY_EDGES))

    def result(self) -> dict:
        return {"by_history_length": self.by_history_length.result(),
                "by_target_popularity": self.by_target_popularity.result()}


BREAKDOWN_PROTOCOL = ("video task only; history_length = videos in the (truncated) history the model sees; "
                      "target_popularity = times the target video is a target in the training split")


@torch.no_grad()
def evaluate_arrays(
    model: nn.Module, arrays: SampleArrays, tables: CommentPools, *, device: torch.device | str = "cpu",
    batch_size: int = 1024, full_ranking: bool = False, exclude_seen: bool = True, rank: int = 0, world_size: int = 1,
    progress: bool = False, breakdown: Breakdown | None = None,
) -> MetricAccumulator:
    """Metric sums over this rank's share of `arrays` (all-reduce `as_tensor()` across ranks); a video
    task's `breakdown` gets every sample's metrics too."""
    accumulator = MetricAccumulator(METRIC_NAMES)
    was_training = model.training
    model.eval()
    batches = epoch_rows(len(arrays), batch_size, None, rank, world_size, drop_uneven=False,
                         lengths=history_lengths(arrays))
    if progress:
        from lsvcr.console import iterate

        batches = iterate(batches, len(batches), f"eval {arrays.split}", unit="batch", leave=False)
    for rows in batches:
        batch = make_batch(arrays, tables, rows, rng=None).to(device)
        kept = None  # all rows count, unless a row has no positive (sampled protocols)
        if arrays.task == "comment":
            scores = model.score_comments(batch.history, batch.target_video, batch.candidates)
            values, kept = metric_values(scores, batch.labels)
        elif full_ranking:
            scores = model.score_videos(batch.history, None)
            if exclude_seen:  # in place: a [batch, V+1] copy is 338 MB at KuaiComt size
                scores.scatter_(1, batch.history.video_history, float("-inf"))
            values = single_positive_metric_values(scores, batch.target_video)
        else:
            scores = model.score_videos(batch.history, batch.candidates)
            values, kept = metric_values(scores, batch.labels)
        accumulator.add(sums_of(values, len(batch.target_video) if kept is None else int(kept.sum())))
        if breakdown is not None and arrays.task == "video":
            rows_kept = slice(None) if kept is None else kept
            breakdown.add(batch.history.video_history[rows_kept], batch.target_video[rows_kept], values)
        release_item_vector_pages()  # the text rows this batch gathered (the candidate pools)
    model.train(was_training)
    return accumulator


SWAP_SEED = 0


def swap_histories(arrays: SampleArrays | SampleStream, seed: int = SWAP_SEED) -> SampleArrays | SampleStream:
    """The same samples, each with another sample's histories (video and comment): a seeded random
    cycle, so no sample keeps its own. Targets, candidates and labels are unchanged. A stream stays a
    stream (a view that reads the donors' rows per batch)."""
    if len(arrays) < 2:
        raise DataError(f"the history swap needs at least 2 {arrays.split} samples; got {len(arrays)}")
    cycle = np.random.default_rng(seed).permutation(len(arrays))
    donor = np.empty_like(cycle)
    donor[cycle] = np.roll(cycle, -1)
    if isinstance(arrays, SampleStream):
        return arrays.with_histories_of(donor)
    return dataclasses.replace(
        arrays,
        video_history=arrays.video_history[donor],
        comment_history_videos=arrays.comment_history_videos[donor],
        comment_history_comments=arrays.comment_history_comments[donor],
    )


def evaluate_model(
    model: nn.Module, task: str, data_dir: str | Path, config: LSVCRConfig, *, device: str | torch.device = "cpu",
    full_ranking: bool = False, exclude_seen: bool = True, splits: tuple[str, ...] = ("valid", "test"),
    progress: bool = True, swapped_histories: bool = False, tables: CommentPools | None = None,
    breakdown: bool = False,
) -> dict:
    """{"protocol": ..., split: metrics} for one model on one PREPARED directory (`swapped_histories`:
    every sample scored with another sample's history, see `swap_histories`; `tables`: the directory's
    item tables, if the caller already has them; `breakdown`: a video task's metrics also by history
    length and target popularity, under split["breakdown"])."""
    tables = load_comment_pools(data_dir) if tables is None else tables
    out = {"protocol": protocol_description(task, full_ranking, exclude_seen, config.finetune.history_length)}
    target_counts = training_target_counts(data_dir) if breakdown and task == "video" else None
    if target_counts is not None:
        out["protocol"]["breakdown"] = BREAKDOWN_PROTOCOL
    if swapped_histories:
        out["protocol"]["histories"] = f"swapped: each sample gets another sample's (seeded cycle, seed {SWAP_SEED})"
    for split in splits:
        arrays = open_sample_stream(data_dir, task, split, config.finetune.history_length,
                                    config.data.max_comments_per_record)
        if swapped_histories:
            arrays = swap_histories(arrays)
        split_breakdown = Breakdown(target_counts) if target_counts is not None else None
        accumulator = evaluate_arrays(model, arrays, tables, device=device, batch_size=config.finetune.eval_batch_size,
                                      full_ranking=full_ranking, exclude_seen=exclude_seen, progress=progress,
                                      breakdown=split_breakdown)
        out[split] = accumulator.result()
        if split_breakdown is not None:
            out[split]["breakdown"] = split_breakdown.result()
    return out


def model_summary(model: nn.Module, config: LSVCRConfig) -> dict:
    from lsvcr.model import count_parameters

    return {
        "architecture": config.model.architecture,
        "mode": config.model.mode if config.model.architecture == "lsvcr" else "id",
        "stacking": config.model.stacking if config.model.architecture == "lsvcr" else "standard",
        "parameters_without_id_table": count_parameters(model),
    }


def evaluate_model_dir(model_dir: str | Path, *, data_dir: str | Path | None = None, vectors_dir: str | Path | None = None,
                       full_ranking: bool | None = None, exclude_seen: bool | None = None, write: bool = True,
                       device: str = "cpu", breakdown: bool = False) -> dict:
    """Evaluate a MODEL/ directory and (by default) write MODEL/metrics.json (`breakdown`: a video model's
    metrics also by history length and target popularity)."""
    trained = load_trained_model(model_dir, data_dir=data_dir, vectors_dir=vectors_dir, device=device)
    if breakdown and trained.task != "video":
        raise ConfigError(f"--breakdown splits a video model's metrics by history length and target popularity; "
                          f"{model_dir} holds a {trained.task} model")
    config = trained.config
    tables = load_comment_pools(trained.data_dir)
    release_arrow_memory()  # the table reads are done
    sampled = evaluate_model(trained.model, trained.task, trained.data_dir, config, device=device, tables=tables,
                             breakdown=breakdown)
    metrics = {"task": trained.task, "model": model_summary(trained.model, config), **sampled}
    metrics["swapped_history"] = evaluate_model(trained.model, trained.task, trained.data_dir, config, device=device,
                                                 splits=("test",), progress=False, swapped_histories=True,
                                                 tables=tables)
    full = config.finetune.full_ranking if full_ranking is None else full_ranking
    exclude_seen = config.finetune.exclude_seen if exclude_seen is None else exclude_seen
    if full and trained.task == "video":
        metrics["full_ranking"] = evaluate_model(trained.model, "video", trained.data_dir, config, device=device,
                                                 full_ranking=True, exclude_seen=exclude_seen, tables=tables,
                                                 breakdown=breakdown)
    if write:
        model_files.write_metrics(model_dir, metrics)
    return metrics


def metrics_line(metrics: dict, metric: str = "ndcg@5") -> str:
    """One line for a console: the sampled protocol's valid/test `metric`, the personalization check, epochs."""
    parts = [f"{split} {metric} {metrics[split][metric]:.4f}" for split in ("valid", "test") if split in metrics]
    swapped = metrics.get("swapped_history", {}).get("test")
    if swapped:
        parts.append(f"test with another user's history {swapped[metric]:.4f}")
    if "best_epoch" in metrics:
        parts.append(f"best epoch {metrics['best_epoch']} of {metrics.get('epochs_run', '?')}")
    return f"{metrics['protocol']['task']} model: " + ", ".join(parts)


def format_table(metrics: dict) -> str:
    """A plain-text table: one row per protocol × split, the protocol spelled out above it."""
    lines = []
    sections = [("sampled", metrics)] + ([("full", metrics["full_ranking"])] if "full_ranking" in metrics else [])
    header = f"{'protocol':<9}{'split':<7}" + "".join(f"{name:>11}" for name in METRIC_NAMES) + f"{'samples':>9}"
    for label, section in sections:
        protocol = section["protocol"]
        lines.append(f"[{label}] task={protocol['task']}  candidates: {protocol['candidates']}; ties: {protocol['ties']}")
    lines.append(header)

    def row(label: str, split: str, values: dict) -> str:
        return f"{label:<9}{split:<7}" + "".join(f"{values[name]:>11.4f}" for name in METRIC_NAMES) + f"{values['samples']:>9}"

    for label, section in sections:
        lines += [row(label, split, section[split]) for split in ("valid", "test") if split in section]
    swapped = metrics.get("swapped_history", {}).get("test")
    if swapped:
        lines.append(row("sampled", "test*", swapped))
        lines.append("test* = personalization check: the test split with every sample given another sample's history "
                     "(equal to test = the model ignores the user's history)")
    for label, section in sections:
        if "breakdown" in section.get("test", {}):
            lines += format_breakdown(label, section["test"]["breakdown"])
    return "\n".join(lines)


def format_breakdown(protocol: str, breakdown: dict, metrics: tuple[str, ...] = ("ndcg@10", "recall@10")) -> list[str]:
    """Test metrics per history-length and target-popularity bucket (BREAKDOWN_PROTOCOL)."""
    lines = [f"[{protocol}] test by bucket ({BREAKDOWN_PROTOCOL})"]
    for name, groups in breakdown.items():
        lines.append(f"{name:<22}{'samples':>9}" + "".join(f"{metric:>11}" for metric in metrics))
        for bucket, values in groups.items():
            lines.append(f"  {bucket:<20}{values['samples']:>9}" + "".join(f"{values[metric]:>11.4f}" for metric in metrics))
    return lines


def popularity_metrics(data_dir: str | Path, task: str, config: LSVCRConfig, full_ranking: bool = False,
                       comment_signal: str = "likes") -> dict:
    """The popularity baseline under the same protocol (videos: training-target counts; comments: likes
    or training-target counts, see `baselines.fit_popularity`)."""
    model = fit_popularity(data_dir, comment_signal)
    metrics = evaluate_model(model, task, data_dir, config, full_ranking=full_ranking, progress=False)
    details = {"architecture": "popularity"} | ({"comment_signal": comment_signal} if task == "comment" else {})
    return {"task": task, "model": details, **metrics}

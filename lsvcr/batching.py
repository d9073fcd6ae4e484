"""Padded sample arrays → model batches (METHOD 1.5, 2.2), vectorised.

An epoch is a shuffled index permutation whose slices index the precomputed arrays
(`lsvcr.sample_arrays`, or their memory-mapped form `lsvcr.sample_stream`). The per-batch work that
must be random every time (the hot comment shown with each history video, `lsvcr.history_views`; the
comment-task negatives) is a handful of NumPy gathers over the batch.

Conventions: index 0 is padding; histories are right-padded and keep the most recent
`history_length` items in chronological order (position 0 = oldest kept item).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import Tensor

from lsvcr.errors import DataError
from lsvcr.history_views import hot_comments_for, record_comments_for
from lsvcr.sample_arrays import CommentPools, SampleArrays
from lsvcr.sample_stream import SampleStream, batch_arrays


@dataclass
class HistoryBatch:
    """Padded index tensors of both histories (0 = padding; right-padded, oldest item first)."""

    video_history: Tensor  # [B, Lv] video_idx
    video_history_hot_comment: Tensor  # [B, Lv] comment_idx of the hot comment shown with each video
    comment_history_videos: Tensor  # [B, Lc] video_idx of each comment-interaction record
    comment_history_comments: Tensor  # [B, Lc, K] the user's comment_idx in each record

    def to(self, device: torch.device | str) -> "HistoryBatch":
        return HistoryBatch(**{f.name: getattr(self, f.name).to(device, non_blocking=True) for f in fields(self)})

    @property
    def batch_size(self) -> int:
        return self.video_history.shape[0]


# ----------------------------------------------------------------------------- batches


@dataclass
class Batch:
    history: HistoryBatch
    target_video: torch.Tensor  # [B]: video task target / comment task current video
    candidates: torch.Tensor | None  # [B, M] (comment train: positive first + negatives; eval: frozen lists)
    labels: torch.Tensor | None  # [B, M] 1 = positive
    # finetune.train_targets=all_positions: the first history position whose next item is a target [B]
    first_target_position: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> "Batch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(self.history.to(device), move(self.target_video), move(self.candidates), move(self.labels),
                     move(self.first_target_position))

    def position_targets(self) -> torch.Tensor:
        """[B, L] the item each history position predicts (the next history item, the sample's target after
        the last one); 0 (ignored) on padding and before `first_target_position`."""
        history = self.history.video_history
        lengths = (history != 0).sum(dim=1)
        targets = torch.zeros_like(history)
        targets[:, :-1] = history[:, 1:]
        rows = torch.arange(len(history), device=history.device)
        targets[rows, (lengths - 1).clamp(min=0)] = self.target_video
        position = torch.arange(history.shape[1], device=history.device)[None, :]
        first = 0 if self.first_target_position is None else self.first_target_position[:, None]
        return targets.masked_fill((position >= lengths[:, None]) | (position < first), 0)


def sample_comment_candidates(
    current_video: np.ndarray, pos_comments: np.ndarray, tables: CommentPools, num_negatives: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Training candidates of the comment task (METHOD 1.5): column 0 = one random positive, then
    `num_negatives` comments of the same video that are not positives (shuffled, cycling when the
    video has fewer), falling back to random global comments when it has none."""
    batch = len(current_video)
    positive_count = (pos_comments != 0).sum(axis=1)
    pick = (rng.random(batch) * positive_count).astype(np.int64)
    positive = pos_comments[np.arange(batch), pick]
    pool = tables.comment_pool[current_video]  # [B, P]
    allowed = pool_negatives(pool, pos_comments)
    keys = np.where(allowed, rng.random(pool.shape), 2.0)
    shuffled = np.take_along_axis(pool, np.argsort(keys, axis=1), axis=1)
    allowed_count = allowed.sum(axis=1)
    column = np.arange(num_negatives)[None, :] % np.maximum(allowed_count, 1)[:, None]
    negatives = np.take_along_axis(shuffled, column, axis=1)
    no_pool = allowed_count == 0
    if no_pool.any():
        negatives[no_pool] = rng.integers(1, max(tables.num_comments, 1) + 1, (int(no_pool.sum()), num_negatives))
    candidates = np.concatenate([positive[:, None], negatives], axis=1)
    labels = np.zeros_like(candidates)
    labels[:, 0] = 1
    return candidates, labels


def pool_negatives(pool: np.ndarray, positives: np.ndarray) -> np.ndarray:
    """[B, P] mask: the pool's comments (non-pad) that are not among the row's positives [B, Q]."""
    return (pool != 0) & ~(pool[:, :, None] == positives[:, None, :]).any(axis=2)


def _trim(array: np.ndarray, axis: int) -> np.ndarray:
    """Drop trailing all-padding columns along `axis` (keeping at least one): right-padded histories
    with left-aligned positions give exactly the same model output, for a fraction of the compute."""
    occupied = (array != 0).any(axis=tuple(a for a in range(array.ndim) if a != axis))
    width = max(1, int(occupied.nonzero()[0].max(initial=-1)) + 1)
    return array.take(np.arange(width), axis=axis)


def make_batch(
    arrays: SampleArrays, tables: CommentPools, rows: np.ndarray, *, rng: np.random.Generator | None,
    comment_negatives: int = 19, comments_per_record: int | None = None, deterministic_views: bool = False,
) -> Batch:
    """Rows of `arrays` → a `Batch`. `rng` given = training (random hot comments, sampled comment
    negatives); `rng=None` = evaluation (top-1 hot comment, the frozen candidate lists). `arrays` may
    be a `SampleStream`: only `rows` are read and padded. `comments_per_record`: at most this many of a
    record's comments (stage 1: 3, as its prompts show); `deterministic_views`: the histories use the
    evaluation rule even in training (frozen alignment: the same view as the precomputed prompt vectors)."""
    arrays, rows = batch_arrays(arrays, rows)
    video_history = _trim(arrays.video_history[rows], axis=1)
    comment_videos = _trim(arrays.comment_history_videos[rows], axis=1)
    view_rng = None if deterministic_views else rng
    comments = record_comments_for(arrays.comment_history_comments[rows][:, : comment_videos.shape[1]], view_rng,
                                   comments_per_record)
    history = HistoryBatch(
        video_history=torch.from_numpy(video_history),
        video_history_hot_comment=torch.from_numpy(hot_comments_for(video_history, tables, view_rng)),
        comment_history_videos=torch.from_numpy(comment_videos),
        comment_history_comments=torch.from_numpy(np.ascontiguousarray(_trim(comments, axis=2))),
    )
    target_video = arrays.target_video[rows]
    candidates = labels = None
    if arrays.candidates is not None:
        candidates, labels = arrays.candidates[rows], arrays.labels[rows]
    elif arrays.task == "comment" and rng is not None:
        candidates, labels = sample_comment_candidates(
            target_video, arrays.pos_comments[rows], tables, comment_negatives, rng
        )
    as_tensor = lambda a: None if a is None else torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))  # noqa: E731
    return Batch(history, torch.from_numpy(target_video), as_tensor(candidates), as_tensor(labels))


def position_windows(user: np.ndarray, kept_lengths: np.ndarray, history_length: int,
                     stride: int) -> tuple[np.ndarray, np.ndarray]:
    """`finetune.train_targets: all_positions`: (rows, first target position) of the samples whose history
    windows cover every training target once, trained at every position (SASRec's original objective).

    Needs RecBole-style prefixes (`data.history_before: position`): a user's k-th sample (in order) has
    min(k, history_length) history items. A user with n samples gets the windows of samples n, n - stride,
    n - 2·stride, ... down to the first one whose history is not cut: windows that are cut predict only their
    last `stride` positions (the k-th target sees between min(k, history_length - stride + 1) and
    min(k, history_length) items instead of min(k, history_length)), the first one predicts all of its
    positions. n ≤ history_length: one window."""
    if len(user) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    starts = np.flatnonzero(np.r_[True, user[1:] != user[:-1]])
    counts = np.diff(np.r_[starts, len(user)])
    if len(np.unique(user[starts])) != len(starts):
        raise DataError("train_targets=all_positions: the training samples are not grouped by user")
    expected = np.minimum(np.arange(len(user)) - np.repeat(starts, counts) + 1, history_length)
    if not np.array_equal(np.asarray(kept_lengths), expected):
        raise DataError("finetune.train_targets=all_positions needs every earlier item as history, in order "
                        "(data.history_before: position, data.max_history >= finetune.history_length): a "
                        f"user's k-th sample must have min(k, {history_length}) history items")
    rows, first = [], []
    for start, count in zip(starts.tolist(), counts.tolist()):
        last = count  # the window of the user's k-th sample, k = count, count - stride, ...
        while last > history_length:
            rows.append(start + last - 1)
            first.append(history_length - stride)
            last -= stride
        rows.append(start + last - 1)
        first.append(0)
    return np.asarray(rows, dtype=np.int64), np.asarray(first, dtype=np.int64)


def history_lengths(arrays: SampleArrays) -> np.ndarray:
    """Non-pad items per sample over both histories (the cost of a sample in the model)."""
    if isinstance(arrays, SampleStream):
        return arrays.lengths
    return (arrays.video_history != 0).sum(axis=1) + (arrays.comment_history_videos != 0).sum(axis=1)


def epoch_rows(num_samples: int, batch_size: int, rng: np.random.Generator | None, rank: int = 0,
               world_size: int = 1, drop_uneven: bool = True, lengths: np.ndarray | None = None,
               bucket_batches: int = 32) -> list[np.ndarray]:
    """This rank's batches of row indices for one epoch: a shuffled permutation (or the identity when
    `rng` is None) split into equal per-rank shards, so every DDP rank runs the same number of steps.

    With `lengths`, rows are bucketed: each run of `bucket_batches` batches of the permutation is
    sorted by history length before being cut into batches, and the batches are then shuffled. Batches
    of similar lengths waste little compute on padding (`make_batch` trims it); the samples of an epoch
    and their randomness are unchanged. Without `rng`, rows are sorted by length (evaluation)."""
    order = rng.permutation(num_samples) if rng is not None else np.arange(num_samples)
    per_rank = num_samples // world_size if drop_uneven else -(-num_samples // world_size)
    shard = order[rank * per_rank: (rank + 1) * per_rank]
    if lengths is None:
        return [shard[start:start + batch_size] for start in range(0, len(shard), batch_size)]
    chunk = batch_size * bucket_batches if rng is not None else max(len(shard), 1)
    batches = []
    for start in range(0, len(shard), chunk):
        part = shard[start:start + chunk]
        part = part[np.argsort(lengths[part], kind="stable")]
        batches += [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
    if rng is not None:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


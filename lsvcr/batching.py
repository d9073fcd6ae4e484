"""PREPARED sample tables → padded NumPy arrays → model batches (METHOD 1.5, 2.2), vectorised.

Everything per sample is computed once from Arrow list offsets (no per-sample Python loop); an epoch
is a shuffled index permutation whose slices index the precomputed arrays. The per-batch work that
must be random every time (the hot comment shown with each history video, the comment-task
negatives) is a handful of NumPy gathers over the batch.

Conventions: index 0 is padding; histories are right-padded and keep the most recent
`history_length` items in chronological order (position 0 = oldest kept item).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch import Tensor

from lsvcr.errors import DataError
from lsvcr.data.prepared import COMMENTS_FILE, has_comments, read_table, read_videos, samples_path


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


HOT_COMMENTS = 3  # "hot comment" = random pick among the top 3 by likes in training (METHOD 2.2)
# Stage 1: at most 3 of a record's comments, the same ones in the LLM prompt and the SR input (METHOD 2.2, 4.2;
# data.py:131-132). Stage 2 (no prompt) averages all of them (up to data.max_comments_per_record).
STAGE_ONE_COMMENTS_PER_RECORD = 3


# ----------------------------------------------------------------------------- Arrow list → padded


def _flat(list_array: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(offsets [N+1], values) of a list column, with chunks combined and slices honoured."""
    if isinstance(list_array, pa.ChunkedArray):
        list_array = list_array.combine_chunks() if list_array.num_chunks != 1 else list_array.chunk(0)
    if list_array.null_count:
        list_array = pc.fill_null(list_array, pa.scalar([], list_array.type))
    offsets = list_array.offsets.to_numpy()
    values = list_array.values
    start, end = offsets[0], offsets[-1]
    return offsets - start, values.slice(start, end - start)


def _gather_padded(values: np.ndarray, starts: np.ndarray, lengths: np.ndarray, width: int) -> np.ndarray:
    """Row r gets values[starts[r] : starts[r]+lengths[r]] left-aligned in `width` columns, 0 after."""
    columns = np.arange(width)
    valid = columns[None, :] < lengths[:, None]
    index = np.where(valid, starts[:, None] + columns[None, :], 0)
    if len(values) == 0:
        return np.zeros((len(starts), width), dtype=np.int64)
    return np.where(valid, values[index], 0).astype(np.int64)


def last_items_padded(list_array, max_length: int) -> np.ndarray:
    """The most recent `max_length` items of each list, oldest first, right-padded with 0.
    Width = min(max_length, longest list) (at least 1): padding width never changes the model's output."""
    offsets, values = _flat(list_array)
    lengths = np.diff(offsets)
    width = max(1, min(max_length, int(lengths.max(initial=0))))
    kept = np.minimum(lengths, width)
    return _gather_padded(values.to_numpy(zero_copy_only=False), offsets[1:] - kept, kept, width)


def first_items_padded(list_array, max_width: int | None = None) -> np.ndarray:
    """Each list left-aligned and right-padded with 0 to the longest (or `max_width`)."""
    offsets, values = _flat(list_array)
    lengths = np.diff(offsets)
    width = max(1, int(lengths.max(initial=0)))
    if max_width is not None:
        width = min(width, max_width)
    return _gather_padded(values.to_numpy(zero_copy_only=False), offsets[:-1], np.minimum(lengths, width), width)


def last_records_padded(nested: pa.ChunkedArray, max_records: int, max_comments: int) -> np.ndarray:
    """list<list<int>> → [N, Lc, K]: the last `max_records` records, each record's first
    `max_comments` comments, zero-padded on both axes."""
    outer_offsets, records = _flat(nested)
    record_lengths = np.diff(outer_offsets)
    width = max(1, min(max_records, int(record_lengths.max(initial=0))))
    kept = np.minimum(record_lengths, width)
    # Global record index of every (sample, slot), -1 for padding slots.
    slots = np.arange(width)
    valid = slots[None, :] < kept[:, None]
    record_index = np.where(valid, (outer_offsets[1:] - kept)[:, None] + slots[None, :], -1)
    inner_offsets, comments = _flat(records)
    inner_lengths = np.diff(inner_offsets)
    k = max(1, min(max_comments, int(inner_lengths.max(initial=0))))
    per_record = _gather_padded(
        comments.to_numpy(zero_copy_only=False), inner_offsets[:-1], np.minimum(inner_lengths, k), k
    )  # [R, K]
    if len(per_record) == 0:
        return np.zeros((len(kept), width, k), dtype=np.int64)
    out = per_record[np.maximum(record_index, 0)]
    out[~valid] = 0
    return out


# ----------------------------------------------------------------------------- tables


@dataclass
class ItemTables:
    """Per-video lookup tables used while batching (row 0 = padding video)."""

    num_videos: int
    num_comments: int
    comment_pool: np.ndarray  # [V+1, P] the video's comment pool (by likes desc), 0-padded
    comment_pool_size: np.ndarray  # [V+1]
    comment_likes: np.ndarray  # [C+1] like counts (popularity baseline)
    hot_comments: int = HOT_COMMENTS  # how many top comments a training "hot comment" is drawn from

    @property
    def hot_count(self) -> np.ndarray:
        return np.minimum(self.comment_pool_size, self.hot_comments)


def load_comment_likes(prepared_dir: str | Path) -> np.ndarray:
    """Like counts by comment_idx [C+1] (row 0, the pad, = 0); [0] for a video-only data set."""
    if not has_comments(prepared_dir):
        return np.zeros(1, dtype=np.int64)
    comments = read_table(prepared_dir, COMMENTS_FILE, ["comment_idx", "like_count"])
    likes = np.zeros(len(comments) + 1, dtype=np.int64)
    likes[comments["comment_idx"].to_numpy()] = comments["like_count"].to_numpy()
    return likes


def load_item_tables(prepared_dir: str | Path, hot_comments: int = HOT_COMMENTS) -> ItemTables:
    videos = read_videos(prepared_dir, ["video_idx", "hot_comments"])
    video_idx = videos["video_idx"].to_numpy()
    if not np.array_equal(video_idx, np.arange(1, len(video_idx) + 1)):
        raise DataError("videos.parquet: video_idx must be 1..V in row order")
    pool = first_items_padded(videos["hot_comments"])
    comment_pool = np.zeros((len(video_idx) + 1, pool.shape[1]), dtype=np.int64)
    comment_pool[1:] = pool
    likes = load_comment_likes(prepared_dir)
    return ItemTables(
        num_videos=len(video_idx),
        num_comments=len(likes) - 1,
        comment_pool=comment_pool,
        comment_pool_size=(comment_pool != 0).sum(axis=1),
        comment_likes=likes,
        hot_comments=hot_comments,
    )


@dataclass
class SampleArrays:
    """One split of one task as padded arrays (one row per sample)."""

    task: str
    split: str
    user: np.ndarray  # [N]
    target_video: np.ndarray  # [N]
    video_history: np.ndarray  # [N, Lv]
    comment_history_videos: np.ndarray  # [N, Lc]
    comment_history_comments: np.ndarray  # [N, Lc, K]
    pos_comments: np.ndarray | None  # [N, P] comment task
    candidates: np.ndarray | None  # [N, M] valid/test
    labels: np.ndarray | None  # [N, M]

    def __len__(self) -> int:
        return len(self.target_video)


def load_sample_arrays(
    prepared_dir: str | Path, task: str, split: str, history_length: int, max_comments_per_record: int = 64
) -> SampleArrays:
    table = pq.read_table(samples_path(prepared_dir, task, split))
    required = ["user_idx", "target_video", "video_history", "comment_history_videos", "comment_history_comments"]
    if task == "comment":
        required.append("pos_comments")
    if split != "train":
        required += ["candidates", "labels"]
    missing = [c for c in required if c not in table.column_names]
    if missing:
        raise DataError(f"{path.name}: missing column(s) {', '.join(missing)}")
    if len(table) == 0:
        raise DataError(f"{path.name} has no rows")
    candidates = labels = pos_comments = None
    if split != "train":
        candidates = first_items_padded(table["candidates"])
        labels = first_items_padded(table["labels"])
    if task == "comment":
        pos_comments = first_items_padded(table["pos_comments"])
        if (pos_comments[:, 0] == 0).any():
            row = int(np.argmax(pos_comments[:, 0] == 0))
            raise DataError(f"{path.name}: row {row} has an empty pos_comments list")
    return SampleArrays(
        task=task,
        split=split,
        user=table["user_idx"].to_numpy().astype(np.int64),
        target_video=table["target_video"].to_numpy().astype(np.int64),
        video_history=last_items_padded(table["video_history"], history_length),
        comment_history_videos=last_items_padded(table["comment_history_videos"], history_length),
        comment_history_comments=last_records_padded(
            table["comment_history_comments"], history_length, max_comments_per_record
        ),
        pos_comments=pos_comments,
        candidates=candidates,
        labels=labels,
    )


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


# The one rule for what a history shows, used by the SR batches (`make_batch`) and the LLM prompts
# (`lsvcr.llm.prompts.histories_from_samples`, `lsvcr.llm.align`): the two see the same comments.


def hot_comment_picks(video_history: np.ndarray, comment_pool: np.ndarray, hot_count: np.ndarray,
                      rng: np.random.Generator | None) -> np.ndarray:
    """The hot comment shown with each history video: a random pick among its top `hot_count` (training,
    `rng` given) or its top 1 (evaluation, encoding); 0 for a video without comments and for padding."""
    if rng is None:
        return comment_pool[video_history, 0]
    pick = (rng.random(video_history.shape) * np.maximum(hot_count[video_history], 1)).astype(np.int64)
    return comment_pool[video_history, pick]


def hot_comments_for(video_history: np.ndarray, tables: ItemTables, rng: np.random.Generator | None) -> np.ndarray:
    """`hot_comment_picks` over the item tables' comment pools."""
    return hot_comment_picks(video_history, tables.comment_pool, tables.hot_count, rng)


@dataclass
class ViewAugmentation:
    """METHOD 5.1 (data.py:103-189): probabilities of the two histories' aug mode and of each item in it."""

    video_p: float = 0.5
    comment_p: float = 0.5
    item_p: float = 0.3
    popular: int = 10

    @property
    def enabled(self) -> bool:
        return self.item_p > 0 and (self.video_p > 0 or self.comment_p > 0)


def augment_views(video_history: np.ndarray, hot_comment: np.ndarray, record_videos: np.ndarray,
                  records: np.ndarray, tables: ItemTables, rng: np.random.Generator, settings: ViewAugmentation,
                  prompt_fixed: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(prompt hot comments, SR hot comments, prompt records, SR records) under METHOD 5.1's augmentation.

    A sample's video history is in aug mode with `video_p`; there each item with `item_p` gives the SR model a
    hot comment other than the prompt's (another of the video's top `tables.hot_comments`; the same when it has
    one). A sample's comment history is in aug mode with `comment_p`; there each record with `item_p` mixes the
    shown comments (n ≤ 3) with n popular comments of the video (top `popular` by likes) the user did not
    interact with (random comments when there are none), shuffles, and gives even positions to the prompt and
    odd ones to the SR model. `prompt_fixed` (frozen alignment: the prompt vectors were encoded once): only the
    SR side changes; its records get the odd half of the mix."""
    sr_hot, prompt_records, sr_records = hot_comment.copy(), records.copy(), records.copy()
    batch = len(video_history)
    video_items = ((rng.random(batch) < settings.video_p)[:, None] & (rng.random(video_history.shape) < settings.item_p)
                   & (video_history != 0))
    if video_items.any():
        videos = video_history[video_items]
        count = tables.hot_count[videos]
        pool = tables.comment_pool[videos, :max(1, tables.hot_comments)]
        rank = np.argmax(pool == hot_comment[video_items][:, None], axis=1)
        other = (rank + 1 + (rng.random(len(videos)) * np.maximum(count - 1, 1)).astype(np.int64)) % np.maximum(count, 1)
        sr_hot[video_items] = np.where(count >= 2, tables.comment_pool[videos, other], hot_comment[video_items])
    record_items = ((rng.random(batch) < settings.comment_p)[:, None] & (rng.random(record_videos.shape) < settings.item_p)
                    & (record_videos != 0) & (records != 0).any(axis=-1))
    width = records.shape[-1]
    for row, slot in zip(*np.nonzero(record_items)):
        own = records[row, slot][records[row, slot] != 0]
        popular = tables.comment_pool[record_videos[row, slot], :settings.popular]
        others = popular[(popular != 0) & ~np.isin(popular, own)]
        if len(others):
            extra = np.concatenate([rng.permutation(others) for _ in range(-(-len(own) // len(others)))])[:len(own)]
        else:
            extra = rng.integers(1, max(tables.num_comments, 1) + 1, len(own))
        mixed = rng.permutation(np.concatenate([own, extra]))
        sr_records[row, slot] = 0
        sr_records[row, slot, :len(mixed[1::2])] = mixed[1::2]
        if not prompt_fixed:
            prompt_records[row, slot] = 0
            prompt_records[row, slot, :min(width, len(mixed[0::2]))] = mixed[0::2][:width]
    return hot_comment, sr_hot, prompt_records, sr_records


def record_comments_for(records: np.ndarray, rng: np.random.Generator | None, limit: int | None) -> np.ndarray:
    """The comments of each record [N, Lc, K] that are shown: all (limit None), else at most `limit`: the
    earliest ones (`rng` None) or a random subset (training), non-pad first."""
    if limit is None:
        return records
    if rng is not None:
        keys = np.where(records != 0, rng.random(records.shape), 2.0)
        records = np.take_along_axis(records, np.argsort(keys, axis=-1, kind="stable"), axis=-1)
    return records[..., :limit]


def sample_comment_candidates(
    current_video: np.ndarray, pos_comments: np.ndarray, tables: ItemTables, num_negatives: int,
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
    arrays: SampleArrays, tables: ItemTables, rows: np.ndarray, *, rng: np.random.Generator | None,
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


# ----------------------------------------------------------------------------- streamed samples
#
# The padded `SampleArrays` of a large split do not fit in every training worker (KuaiComt size:
# 7.3 GB per worker, issue #16). `open_sample_stream` converts the split once, row group by row
# group, into flat memory-mapped arrays (the lists already cut to what the model sees: the last
# `history_length` items, the first `max_comments_per_record` comments of a record), and pads per
# batch. A worker then reads only the rows of its own batches; the pages are the node's page cache,
# shared by every worker and trial on the node. The batches equal `make_batch` on `load_sample_arrays`
# exactly (same rows, same padding after trimming, same random draws).

STREAM_DIR = ".stream"  # beside the Parquet tables of PREPARED
STREAM_FORMAT = 1
_LAST_COLUMNS = ("video_history", "comment_history_videos")
_FIRST_COLUMNS = ("pos_comments", "candidates", "labels")
_CONVERT_ROWS = 65_536


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of arange(starts[i], starts[i] + lengths[i]) over i."""
    total = int(lengths.sum())
    out_starts = np.cumsum(lengths) - lengths
    return np.arange(total, dtype=np.int64) - np.repeat(out_starts, lengths) + np.repeat(starts, lengths)


def _as_int32(values: np.ndarray, what: str) -> np.ndarray:
    if len(values) and (values.max() > np.iinfo(np.int32).max or values.min() < 0):
        raise DataError(f"{what}: index out of the int32 range")
    return values.astype(np.int32)


class _ColumnWriter:
    """Appends one column's flat values to `name.values` and keeps its per-row counts."""

    def __init__(self, directory: Path, name: str, nested: bool = False):
        self.name, self.directory = name, directory
        self.handle = (directory / f"{name}.values").open("wb")
        self.counts: list[np.ndarray] = []
        self.inner_counts: list[np.ndarray] = [] if nested else None
        self.width = 0

    def add(self, values: np.ndarray, counts: np.ndarray, inner_counts: np.ndarray | None = None) -> None:
        _as_int32(values, self.name).tofile(self.handle)
        self.counts.append(counts.astype(np.int64))
        self.width = max(self.width, int(counts.max(initial=0)))
        if inner_counts is not None:
            self.inner_counts.append(inner_counts.astype(np.int64))

    def close(self) -> dict:
        self.handle.close()
        offsets = np.concatenate([[0], np.cumsum(np.concatenate(self.counts or [np.zeros(0, np.int64)]))])
        offsets.astype(np.int64).tofile(self.directory / f"{self.name}.offsets")
        meta = {"rows": len(offsets) - 1, "values": int(offsets[-1]), "width": self.width}
        if self.inner_counts is not None:
            inner = np.concatenate([[0], np.cumsum(np.concatenate(self.inner_counts or [np.zeros(0, np.int64)]))])
            inner.astype(np.int64).tofile(self.directory / f"{self.name}.inner_offsets")
            meta["inner_values"] = int(inner[-1])
            meta["inner_width"] = int(max((c.max(initial=0) for c in self.inner_counts), default=0))
        return meta


def _last_kept(list_array: pa.Array, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """(values, counts) of each list's last `max_length` items."""
    offsets, values = _flat(list_array)
    lengths = np.diff(offsets)
    kept = np.minimum(lengths, max_length)
    return values.to_numpy(zero_copy_only=False)[_ranges(offsets[1:] - kept, kept)], kept


def _records_kept(nested: pa.Array, max_records: int, max_comments: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(comment values, records per row, comments per kept record) of the last `max_records`
    records, each cut to its first `max_comments` comments."""
    outer_offsets, records = _flat(nested)
    kept = np.minimum(np.diff(outer_offsets), max_records)
    record_index = _ranges(outer_offsets[1:] - kept, kept)
    inner_offsets, comments = _flat(records)
    inner_kept = np.minimum(np.diff(inner_offsets)[record_index], max_comments)
    values = comments.to_numpy(zero_copy_only=False)[_ranges(inner_offsets[:-1][record_index], inner_kept)]
    return values, kept, inner_kept


def _convert_split(path: Path, out: Path, task: str, split: str, history_length: int,
                   max_comments_per_record: int) -> dict:
    """Write the memory-mapped form of one sample table into `out` (bounded memory: one Parquet
    batch of `_CONVERT_ROWS` rows at a time). Returns its meta."""
    parquet = pq.ParquetFile(path)
    required = ["user_idx", "target_video", *_LAST_COLUMNS, "comment_history_comments"]
    if task == "comment":
        required.append("pos_comments")
    if split != "train":
        required += ["candidates", "labels"]
    missing = [c for c in required if c not in parquet.schema_arrow.names]
    if missing:
        raise DataError(f"{path.name}: missing column(s) {', '.join(missing)}")
    if parquet.metadata.num_rows == 0:
        raise DataError(f"{path.name} has no rows")
    firsts = [c for c in _FIRST_COLUMNS if c in required]
    writers = {name: _ColumnWriter(out, name) for name in (*_LAST_COLUMNS, *firsts)}
    writers["comment_history_comments"] = _ColumnWriter(out, "comment_history_comments", nested=True)
    scalars: dict[str, list[np.ndarray]] = {"user_idx": [], "target_video": []}
    row = 0
    for batch in parquet.iter_batches(batch_size=_CONVERT_ROWS, columns=required):
        for name in scalars:
            scalars[name].append(batch.column(name).to_numpy().astype(np.int64))
        for name in _LAST_COLUMNS:
            writers[name].add(*_last_kept(batch.column(name), history_length))
        writers["comment_history_comments"].add(*_records_kept(
            batch.column("comment_history_comments"), history_length, max_comments_per_record))
        for name in firsts:
            offsets, values = _flat(batch.column(name))
            counts = np.diff(offsets)
            if name == "pos_comments" and (counts == 0).any():
                raise DataError(f"{path.name}: row {row + int(np.argmax(counts == 0))} has an empty pos_comments list")
            writers[name].add(values.to_numpy(zero_copy_only=False), counts)
        row += batch.num_rows
    for name, parts in scalars.items():
        np.concatenate(parts).tofile(out / f"{name}.values")
    stat = path.stat()
    return {"format": STREAM_FORMAT, "task": task, "split": split, "rows": row,
            "history_length": history_length, "max_comments_per_record": max_comments_per_record,
            "source": {"name": path.name, "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns},
            "columns": {name: writer.close() for name, writer in writers.items()}}


def _stream_is_current(directory: Path, path: Path) -> bool:
    meta_path = directory / "meta.json"
    if not meta_path.is_file():
        return False
    source = json.loads(meta_path.read_text()).get("source", {})
    stat = path.stat()
    return source.get("bytes") == stat.st_size and source.get("mtime_ns") == stat.st_mtime_ns


def build_sample_stream(prepared_dir: str | Path, task: str, split: str, history_length: int,
                        max_comments_per_record: int = 64) -> Path:
    """The memory-mapped directory of one split (converted on first use; a temporary directory then
    a rename, so concurrent workers never see half a conversion)."""
    prepared_dir = Path(prepared_dir)
    path = samples_path(prepared_dir, task, split)
    directory = prepared_dir / STREAM_DIR / f"{task}.{split}.L{history_length}.K{max_comments_per_record}"
    if _stream_is_current(directory, path):
        return directory
    directory.parent.mkdir(exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        meta = _convert_split(path, partial, task, split, history_length, max_comments_per_record)
        (partial / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        if directory.exists():
            shutil.rmtree(directory, ignore_errors=True)
        os.replace(partial, directory)
    except OSError:
        if not _stream_is_current(directory, path):  # lost a race only if the winner's copy is complete
            raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return directory


def _map(directory: Path, name: str, dtype, count: int) -> np.ndarray:
    if count == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(directory / name, dtype=dtype, mode="r", shape=(count,))


@dataclass
class _MappedList:
    offsets: np.ndarray  # [N+1] int64
    values: np.ndarray  # int32
    width: int  # the longest list of the split
    inner_offsets: np.ndarray | None = None  # nested: [R+1] into values


class SampleStream:
    """One split of one task, memory-mapped; `take(rows)` pads just those rows (a `SampleArrays`).
    `select(rows)` is a view on a subset of the samples (row i of the view = sample rows[i])."""

    def __init__(self, directory: Path, rows: np.ndarray | None = None):
        self.directory = Path(directory)
        self.meta = json.loads((self.directory / "meta.json").read_text())
        self.task, self.split = self.meta["task"], self.meta["split"]
        total = self.meta["rows"]
        self.rows = rows
        self.user_all = _map(self.directory, "user_idx.values", np.int64, total)
        self.target_all = _map(self.directory, "target_video.values", np.int64, total)
        self.lists: dict[str, _MappedList] = {}
        for name, column in self.meta["columns"].items():
            nested = "inner_offsets" if "inner_values" in column else None
            self.lists[name] = _MappedList(
                offsets=_map(self.directory, f"{name}.offsets", np.int64, column["rows"] + 1),
                values=_map(self.directory, f"{name}.values", np.int32,
                            column["inner_values"] if nested else column["values"]),
                width=column["width"],
                inner_offsets=_map(self.directory, f"{name}.inner_offsets", np.int64, column["values"] + 1)
                if nested else None,
            )

    def __len__(self) -> int:
        return self.meta["rows"] if self.rows is None else len(self.rows)

    def _source_rows(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        return rows if self.rows is None else self.rows[rows]

    def select(self, rows: np.ndarray) -> "SampleStream":
        return SampleStream(self.directory, self._source_rows(np.asarray(rows, dtype=np.int64)))

    @property
    def target_video(self) -> np.ndarray:
        return np.asarray(self.target_all if self.rows is None else self.target_all[self.rows], dtype=np.int64)

    @property
    def lengths(self) -> np.ndarray:
        """Kept history items per sample over both histories (= `history_lengths` of the arrays)."""
        out = np.zeros(len(self), dtype=np.int64)
        for name in _LAST_COLUMNS:
            counts = np.diff(np.asarray(self.lists[name].offsets))
            out += counts if self.rows is None else counts[self.rows]
        return out

    def _last(self, name: str, rows: np.ndarray) -> np.ndarray:
        column = self.lists[name]
        starts, lengths = column.offsets[rows], column.offsets[rows + 1] - column.offsets[rows]
        return _gather_padded(column.values, starts, lengths, max(1, int(lengths.max(initial=0))))

    def _first(self, name: str, rows: np.ndarray) -> np.ndarray | None:
        if name not in self.lists:
            return None
        column = self.lists[name]
        starts, lengths = column.offsets[rows], column.offsets[rows + 1] - column.offsets[rows]
        return _gather_padded(column.values, starts, lengths, max(1, column.width))

    def _records(self, rows: np.ndarray) -> np.ndarray:
        column = self.lists["comment_history_comments"]
        starts, kept = column.offsets[rows], column.offsets[rows + 1] - column.offsets[rows]
        width = max(1, int(kept.max(initial=0)))
        if len(column.inner_offsets) < 2:  # no comment records in the split (a video-only data set)
            return np.zeros((len(rows), width, 1), dtype=np.int64)
        slots = np.arange(width)
        valid = slots[None, :] < kept[:, None]
        record = np.where(valid, starts[:, None] + slots[None, :], 0)
        comment_starts = column.inner_offsets[record]
        comment_counts = np.where(valid, column.inner_offsets[record + 1] - comment_starts, 0)
        k = max(1, int(comment_counts.max(initial=0)))
        flat = _gather_padded(column.values, comment_starts.reshape(-1), comment_counts.reshape(-1), k)
        return flat.reshape(len(rows), width, k)

    def take(self, rows: np.ndarray) -> SampleArrays:
        """The rows (of this view) as padded arrays: histories padded to the batch's longest."""
        source = self._source_rows(rows)
        return SampleArrays(
            task=self.task, split=self.split,
            user=np.asarray(self.user_all[source], dtype=np.int64),
            target_video=np.asarray(self.target_all[source], dtype=np.int64),
            video_history=self._last("video_history", source),
            comment_history_videos=self._last("comment_history_videos", source),
            comment_history_comments=self._records(source),
            pos_comments=self._first("pos_comments", source),
            candidates=self._first("candidates", source),
            labels=self._first("labels", source),
        )

    @property
    def pos_comments(self) -> np.ndarray | None:
        """All positives padded [N, P] (small: the like-prior fit reads it once)."""
        return self._first("pos_comments", self._source_rows(np.arange(len(self))))


def open_sample_stream(prepared_dir: str | Path, task: str, split: str, history_length: int,
                       max_comments_per_record: int = 64) -> SampleStream:
    """`load_sample_arrays`, streamed: converted once per node, then memory-mapped."""
    return SampleStream(build_sample_stream(prepared_dir, task, split, history_length, max_comments_per_record))


def batch_arrays(samples: "SampleArrays | SampleStream", rows: np.ndarray) -> tuple[SampleArrays, np.ndarray]:
    """(arrays, their rows) for `make_batch`: a stream pads just the batch's rows."""
    if isinstance(samples, SampleStream):
        return samples.take(rows), np.arange(len(rows))
    return samples, rows

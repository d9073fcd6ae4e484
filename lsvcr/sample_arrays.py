"""PREPARED tables → padded NumPy arrays (METHOD 1.5, 2.2), vectorised: the per-video `CommentPools` and one
split's `SampleArrays`.

Everything per sample is computed once from Arrow list offsets (no per-sample Python loop).
Conventions: index 0 is padding; histories are right-padded and keep the most recent
`history_length` items in chronological order (position 0 = oldest kept item). `lsvcr.batching` cuts
these arrays into model batches; `lsvcr.sample_stream` is the same arrays, memory-mapped, for large splits.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lsvcr.errors import DataError
from lsvcr.data.prepared import COMMENTS_FILE, has_comments, read_table, read_videos, samples_path

HOT_COMMENTS = 3  # "hot comment" = random pick among the top 3 by likes in training (METHOD 2.2)


# ----------------------------------------------------------------------------- Arrow list → padded


def flat_list(list_array: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(offsets [N+1], values) of a list column, with chunks combined and slices honoured."""
    if isinstance(list_array, pa.ChunkedArray):
        list_array = list_array.combine_chunks() if list_array.num_chunks != 1 else list_array.chunk(0)
    if list_array.null_count:
        list_array = pc.fill_null(list_array, pa.scalar([], list_array.type))
    offsets = list_array.offsets.to_numpy()
    values = list_array.values
    start, end = offsets[0], offsets[-1]
    return offsets - start, values.slice(start, end - start)


def gather_padded(values: np.ndarray, starts: np.ndarray, lengths: np.ndarray, width: int) -> np.ndarray:
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
    offsets, values = flat_list(list_array)
    lengths = np.diff(offsets)
    width = max(1, min(max_length, int(lengths.max(initial=0))))
    kept = np.minimum(lengths, width)
    return gather_padded(values.to_numpy(zero_copy_only=False), offsets[1:] - kept, kept, width)


def first_items_padded(list_array, max_width: int | None = None) -> np.ndarray:
    """Each list left-aligned and right-padded with 0 to the longest (or `max_width`)."""
    offsets, values = flat_list(list_array)
    lengths = np.diff(offsets)
    width = max(1, int(lengths.max(initial=0)))
    if max_width is not None:
        width = min(width, max_width)
    return gather_padded(values.to_numpy(zero_copy_only=False), offsets[:-1], np.minimum(lengths, width), width)


def last_records_padded(nested: pa.ChunkedArray, max_records: int, max_comments: int) -> np.ndarray:
    """list<list<int>> → [N, Lc, K]: the last `max_records` records, each record's first
    `max_comments` comments, zero-padded on both axes."""
    outer_offsets, records = flat_list(nested)
    record_lengths = np.diff(outer_offsets)
    width = max(1, min(max_records, int(record_lengths.max(initial=0))))
    kept = np.minimum(record_lengths, width)
    # Global record index of every (sample, slot), -1 for padding slots.
    slots = np.arange(width)
    valid = slots[None, :] < kept[:, None]
    record_index = np.where(valid, (outer_offsets[1:] - kept)[:, None] + slots[None, :], -1)
    inner_offsets, comments = flat_list(records)
    inner_lengths = np.diff(inner_offsets)
    k = max(1, min(max_comments, int(inner_lengths.max(initial=0))))
    per_record = gather_padded(
        comments.to_numpy(zero_copy_only=False), inner_offsets[:-1], np.minimum(inner_lengths, k), k
    )  # [R, K]
    if len(per_record) == 0:
        return np.zeros((len(kept), width, k), dtype=np.int64)
    out = per_record[np.maximum(record_index, 0)]
    out[~valid] = 0
    return out


# ----------------------------------------------------------------------------- tables


@dataclass
class CommentPools:
    """Each video's comment pool and every comment's like count, used while batching (row 0 = padding video).
    (Not `lsvcr.model.ItemTables`, the model's precomputed item-side terms for serving.)"""

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


def load_comment_pools(prepared_dir: str | Path, hot_comments: int = HOT_COMMENTS) -> CommentPools:
    videos = read_videos(prepared_dir, ["video_idx", "hot_comments"])
    video_idx = videos["video_idx"].to_numpy()
    if not np.array_equal(video_idx, np.arange(1, len(video_idx) + 1)):
        raise DataError("videos.parquet: video_idx must be 1..V in row order")
    pool = first_items_padded(videos["hot_comments"])
    comment_pool = np.zeros((len(video_idx) + 1, pool.shape[1]), dtype=np.int64)
    comment_pool[1:] = pool
    likes = load_comment_likes(prepared_dir)
    return CommentPools(
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
    path = samples_path(prepared_dir, task, split)
    try:
        table = pq.read_table(path)
    except pa.ArrowInvalid as error:
        raise DataError(f"{path}: not a readable Parquet table ({error})") from None
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

"""`lsvcr prepare`: raw tables → the PREPARED/ format of docs/formats.md (METHOD 1, 7.2, 8, 9.5-9.6).

What becomes what:
- Video positives: user_video_inter rows whose `data.video_signal` flag is set (like by default,
  METHOD 1.1). If the median user has fewer than `data.min_median_positives` positives, the next denser
  signal is used (like → long_view → click) with a warning. A (user, video) pair counts once, at its
  first positive time. Video-only imports (RecBole, CSV) treat every interaction as a positive.
- Comment records: user_comment_inter grouped by (user, video); a record's time is its first
  interaction; a (user, comment) pair counts once, at its first interaction.
- Video samples: one per positive (target = the liked video). Comment samples: one per record
  (target = the record's video, pos_comments = all of the user's comments on it).
- Histories strictly precede the target time: liked videos with time < target, records whose first
  interaction < target, and inside each record only the comments interacted with before the target
  (the earliest `max_comments_per_record`). The last `max_history` items are kept.
- Samples whose two histories are both empty are dropped and counted (METHOD 9.5); a sample with one
  empty history is kept (the model handles an empty branch).
- Split, per user and task: leave-last-out by time (last → test, second-to-last → valid, the rest →
  train) for users with at least `min_targets_per_user` samples; other users' samples go to train.
  Ties in time are broken by the raw video id (`data.tie_break: file_order`: by raw row order, as
  RecBole's stable sort). `data.history_before: position` gives each video sample of the video task
  every earlier positive of the user in that order as its video history (RecBole's prefixes, equal
  timestamps included) instead of those strictly before its time.
- Each task's train samples end before the user's first valid/test time of the other task (stage 1 and
  2 train both tasks jointly: no train sample may hold another task's evaluation target).
- Candidates for valid/test are frozen with `data.seed` (METHOD 9.6): video task = target + 99 uniform
  negatives ≠ target; comment task = every positive + non-positive comments of the target video's
  pool (`hot_comments`, top `comment_pool_size` by likes), at most `comment_pool_size` in total but at
  least `comment_min_negatives` negatives, random (seeded) among the non-positives. Both shuffled.
  Positives and negatives come from the same population, the pool: interacted comments outside it stay
  in histories but are not positives (counted).
- Like counts leave out the data's own users' likes (`data.like_counts`), so no label is in them.
- Comments kept in comments.parquet: each video's pool plus every comment some user interacted with.

Everything is vectorised: sort + offsets + searchsorted, lists built with `ListArray.from_arrays`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from lsvcr.config import PrepareConfig
from lsvcr.data import schema
from lsvcr.data.importers import SYNTHETIC_MARKER, RawTables, load_raw
from lsvcr.data.io import atomic_output_dir, write_json, write_parquet
from lsvcr.data.prepared import (
    COMMENTS_FILE, MANIFEST_FILE, USER_HISTORIES_FILE, USERS_FILE, VIDEOS_FILE, id_map_file, samples_file,
)
from lsvcr.errors import ConfigError, DataError

log = logging.getLogger("lsvcr.data")

SIGNAL_COLUMNS = {"like": "is_like", "long_view": "long_view", "click": "is_click"}
SIGNAL_ORDER = ("like", "long_view", "click")  # sparse → dense
SAMPLES_PER_CHUNK = 200_000
SPLIT_TEXT = (
    "leave-last-out by time per user and task: last target -> test, second-to-last -> valid, earlier -> "
    "train (users with fewer than {min_targets} targets: all train); ties broken by {tie_break}; "
    "{history}"
)
TIE_BREAK_TEXT = {"raw_id": "raw video id", "file_order": "raw row order (file order)"}
HISTORY_TEXT = {
    "time": "histories strictly precede the target time",
    "position": "video histories of video samples: every earlier positive in that order (equal timestamps "
                "included, RecBole's prefixes); other histories strictly precede the target time",
}
TRAIN_CAP_TEXT = (
    "train samples of each task end before the user's earliest valid/test target time of the other task "
    "(train target time < that time; the task's own split already puts its train targets first). Stage 1 "
    "and 2 train on both tasks jointly, so no train sample holds a valid/test target of either task in its "
    "histories or as its target"
)


# ---------------------------------------------------------------------------------------------
# Small vectorised helpers


def expand_ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenation of arange(start, start + count) for every pair, without a Python loop."""
    counts = counts.astype(np.int64)
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = np.cumsum(counts) - counts
    return np.arange(total, dtype=np.int64) - np.repeat(offsets - starts.astype(np.int64), counts)


def offsets_from_counts(counts: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])


def list_array(counts: np.ndarray, values: pa.Array | np.ndarray, value_type: pa.DataType = pa.int32()) -> pa.Array:
    if isinstance(values, np.ndarray):
        values = pa.array(values.astype(value_type.to_pandas_dtype()), value_type)
    return pa.ListArray.from_arrays(pa.array(offsets_from_counts(counts).astype(np.int32)), values)


def group_starts(sorted_keys: np.ndarray) -> np.ndarray:
    """Start index of every run of equal values in a sorted array."""
    if len(sorted_keys) == 0:
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(np.concatenate([[True], sorted_keys[1:] != sorted_keys[:-1]]))


@dataclass
class TimeKey:
    """Composite (group, time) keys, so one searchsorted finds "items of this group before time t"."""

    time_min: int
    stride: int

    @classmethod
    def covering(cls, *times: np.ndarray, num_groups: int) -> TimeKey:
        finite = [t for t in times if len(t)]
        time_min = int(min(t.min() for t in finite)) if finite else 0
        time_max = int(max(t.max() for t in finite)) if finite else 0
        stride = time_max - time_min + 2
        if (num_groups + 1) * stride >= 2**62:
            raise DataError("timestamps span too long a range to index (more than ~10^5 years x users)")
        return cls(time_min, stride)

    def __call__(self, group: np.ndarray, time_ms: np.ndarray) -> np.ndarray:
        return group.astype(np.int64) * self.stride + (time_ms.astype(np.int64) - self.time_min)


# ---------------------------------------------------------------------------------------------
# Entities and events


@dataclass
class Positives:
    """Video positives sorted by (user, time, raw video id); one per (user, video)."""

    user: np.ndarray  # user_idx
    video: np.ndarray  # video_idx
    time_ms: np.ndarray
    video_raw: np.ndarray


@dataclass
class Records:
    """Comment-interaction records sorted by (user, first time, raw video id); their comments flat."""

    user: np.ndarray
    video: np.ndarray
    first_time_ms: np.ndarray
    video_raw: np.ndarray
    comment_offsets: np.ndarray  # record r owns comments [offsets[r], offsets[r+1])
    comment: np.ndarray  # comment_idx, sorted by time inside each record
    comment_time_ms: np.ndarray


def choose_signal(raw: RawTables, user_index: np.ndarray, num_users: int, config: PrepareConfig) -> tuple[str, list[str]]:
    """The requested signal, or the next denser one while the median user has too few positives."""
    if raw.fixed_signal:
        return raw.fixed_signal, []
    notes = []
    candidates = SIGNAL_ORDER[SIGNAL_ORDER.index(config.video_signal):]
    # The median over users with video interactions (comment-only users would drag it to zero).
    has_videos = np.bincount(user_index, minlength=num_users + 1)[1:] > 0
    for signal in candidates:
        flags = raw.interactions.column(SIGNAL_COLUMNS[signal]).to_numpy() > 0
        median = float(np.median(np.bincount(user_index[flags], minlength=num_users + 1)[1:][has_videos]))
        if median >= config.min_median_positives:
            return signal, notes
        last = signal == candidates[-1]
        message = (f"video signal {signal}: the median user has {median:g} positives (< data.min_median_positives="
                   f"{config.min_median_positives}); " + ("no denser signal left, using it" if last
                                                          else "falling back to the next denser signal"))
        log.warning(message)
        notes.append(message)
        if last:
            return signal, notes
    raise AssertionError("unreachable")


def build_positives(raw: RawTables, signal: str, user_index: np.ndarray, video_index: np.ndarray,
                    tie_break: str = "raw_id") -> tuple[Positives, int]:
    """Positives sorted by (user, time, tie-break): the raw video id, or the raw row order (`file_order`)."""
    interactions = raw.interactions
    flags = np.ones(interactions.num_rows, bool) if raw.fixed_signal else (
        interactions.column(SIGNAL_COLUMNS[signal]).to_numpy() > 0)
    user = user_index[flags]
    video = video_index[flags]
    time_ms = interactions.column("time_ms").to_numpy()[flags]
    video_raw = interactions.column("video_id").to_numpy()[flags]
    tie_key = np.flatnonzero(flags) if tie_break == "file_order" else video_raw
    order = np.lexsort((tie_key, time_ms, user))
    user, video, time_ms, video_raw = user[order], video[order], time_ms[order], video_raw[order]
    # Keep the first positive of each (user, video): a stable sort by (user, video) keeps time order.
    by_pair = np.lexsort((np.arange(len(user)), video, user))
    pair_key = user[by_pair].astype(np.int64) * (int(video.max(initial=0)) + 1) + video[by_pair]
    first = np.zeros(len(user), bool)
    first[by_pair[group_starts(pair_key)]] = True
    duplicates = int(len(user) - first.sum())
    return Positives(user[first], video[first], time_ms[first], video_raw[first]), duplicates


def build_records(
    raw: RawTables, user_index: np.ndarray, video_index: np.ndarray, comment_index: np.ndarray
) -> tuple[Records, int]:
    interactions = raw.comment_interactions
    user = user_index
    video = video_index
    comment = comment_index
    time_ms = interactions.column("time_ms").to_numpy()
    comment_raw = interactions.column("comment_id").to_numpy()
    video_raw = interactions.column("video_id").to_numpy()
    # One interaction per (user, comment): the first one.
    order = np.lexsort((comment_raw, time_ms, comment, user))
    pair_key = user[order].astype(np.int64) * (int(comment.max(initial=0)) + 1) + comment[order]
    keep = order[group_starts(pair_key)]
    duplicates = int(len(user) - len(keep))
    user, video, comment, time_ms, comment_raw, video_raw = (
        a[keep] for a in (user, video, comment, time_ms, comment_raw, video_raw))
    # Group by (user, video); inside a group, by time.
    order = np.lexsort((comment_raw, time_ms, video, user))
    user, video, comment, time_ms, video_raw = (a[order] for a in (user, video, comment, time_ms, video_raw))
    group_key = user.astype(np.int64) * (int(video.max(initial=0)) + 1) + video
    starts = group_starts(group_key)
    sizes = np.diff(np.append(starts, len(user)))
    first_time = time_ms[starts]
    # Records in (user, first time, raw video id) order; move their comment runs along.
    record_order = np.lexsort((video_raw[starts], first_time, user[starts]))
    gather = expand_ranges(starts[record_order], sizes[record_order])
    return Records(
        user=user[starts][record_order],
        video=video[starts][record_order],
        first_time_ms=first_time[record_order],
        video_raw=video_raw[starts][record_order],
        comment_offsets=offsets_from_counts(sizes[record_order]),
        comment=comment[gather],
        comment_time_ms=time_ms[gather],
    ), duplicates


# ---------------------------------------------------------------------------------------------
# Histories


def history_slices(
    item_user: np.ndarray, item_time: np.ndarray, query_user: np.ndarray, query_time: np.ndarray,
    max_length: int, time_key: TimeKey,
) -> tuple[np.ndarray, np.ndarray]:
    """For each query: the (start, count) of the user's items strictly before the query time, the last
    `max_length` of them. Items must be sorted by (user, time)."""
    item_keys = time_key(item_user, item_time)
    end = np.searchsorted(item_keys, time_key(query_user, query_time), side="left")
    user_start = np.searchsorted(item_user, query_user, side="left")
    start = np.maximum(user_start, end - max_length)
    return start, end - start


@dataclass
class HistoryBuilder:
    positives: Positives
    records: Records | None
    config: PrepareConfig
    time_key: TimeKey

    def __post_init__(self) -> None:
        if self.records is not None:
            comment_record = np.repeat(np.arange(len(self.records.user)), np.diff(self.records.comment_offsets))
            self.comment_keys = self.time_key(comment_record, self.records.comment_time_ms)

    def video_slices(self, user: np.ndarray, time_ms: np.ndarray, positions: np.ndarray | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
        """(start, count) of each query's video history. `positions`: the queries are the positives at these
        indices, and with `data.history_before: position` their history is every earlier positive of the
        user in sorted order (equal timestamps included), as RecBole's sequence prefixes."""
        if positions is not None and self.config.history_before == "position":
            user_start = np.searchsorted(self.positives.user, user, side="left")
            start = np.maximum(user_start, positions - self.config.max_history)
            return start, positions - start
        return history_slices(self.positives.user, self.positives.time_ms, user, time_ms,
                              self.config.max_history, self.time_key)

    def record_slices(self, user: np.ndarray, time_ms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.records is None:
            return np.zeros(len(user), np.int64), np.zeros(len(user), np.int64)
        return history_slices(self.records.user, self.records.first_time_ms, user, time_ms,
                              self.config.max_history, self.time_key)

    def target_records(self, user: np.ndarray, time_ms: np.ndarray, target_video: np.ndarray) -> np.ndarray:
        """Per query: whether its comment history holds a record on `target_video` (the query's target)."""
        if self.records is None:
            return np.zeros(len(user), bool)
        record_start, record_count = self.record_slices(user, time_ms)
        row = np.repeat(np.arange(len(user)), record_count)
        on_target = self.records.video[expand_ranges(record_start, record_count)] == target_video[row]
        return np.bincount(row[on_target], minlength=len(user)) > 0

    def columns(self, user: np.ndarray, time_ms: np.ndarray, positions: np.ndarray | None = None,
                exclude_video: np.ndarray | None = None) -> dict[str, pa.Array]:
        """video_history, comment_history_videos, comment_history_comments for the queries; records on
        `exclude_video[i]` are left out of query i's comment history when given."""
        start, count = self.video_slices(user, time_ms, positions)
        video_history = list_array(count, self.positives.video[expand_ranges(start, count)])
        record_start, record_count = self.record_slices(user, time_ms)
        record = expand_ranges(record_start, record_count)
        if exclude_video is not None and self.records is not None:
            row = np.repeat(np.arange(len(user)), record_count)
            kept_record = self.records.video[record] != exclude_video[row]
            record, record_count = record[kept_record], np.bincount(row[kept_record], minlength=len(user))
        if self.records is None:
            record_videos = list_array(record_count, np.zeros(0, np.int32))
            record_comments = pa.ListArray.from_arrays(
                pa.array(np.zeros(len(user) + 1, np.int32)), list_array(np.zeros(0, np.int64), np.zeros(0, np.int32)))
        else:
            records = self.records
            record_videos = list_array(record_count, records.video[record])
            # Inside record r, the comments before the query time: a prefix of the record's run.
            pair_time = np.repeat(time_ms, record_count)
            end = np.searchsorted(self.comment_keys, self.time_key(record, pair_time), side="left")
            before = end - records.comment_offsets[record]
            kept = np.minimum(before, self.config.max_comments_per_record)
            comments = list_array(kept, records.comment[expand_ranges(records.comment_offsets[record], kept)])
            record_comments = pa.ListArray.from_arrays(pa.array(offsets_from_counts(record_count).astype(np.int32)), comments)
        return {
            "video_history": video_history,
            "comment_history_videos": record_videos,
            "comment_history_comments": record_comments,
        }


# ---------------------------------------------------------------------------------------------
# Splits and candidates


def assign_splits(user: np.ndarray, min_targets: int) -> np.ndarray:
    """0 train, 1 valid, 2 test per task. Samples must be sorted by (user, time, tie-break)."""
    starts = group_starts(user)
    sizes = np.diff(np.append(starts, len(user)))
    group = np.repeat(np.arange(len(starts)), sizes)
    rank_from_end = np.repeat(starts + sizes - 1, sizes) - np.arange(len(user))
    eligible = sizes[group] >= min_targets
    split = np.zeros(len(user), np.int8)
    split[eligible & (rank_from_end == 1)] = 1
    split[eligible & (rank_from_end == 0)] = 2
    return split


def cap_train_at_first_eval(
    task_users: dict[str, np.ndarray], task_times: dict[str, np.ndarray], task_splits: dict[str, np.ndarray],
    num_users: int, max_train: int,
) -> dict[str, int]:
    """Stage 1 and 2 train on both tasks, so a train sample of one task dated at or after the user's earliest
    valid/test target of the *other* task would carry that target (in its history, or as its own target).
    Marks such train samples -1 in place (the task's own split already puts train before valid/test), then
    keeps each user's `max_train` most recent remaining train samples per task (max_train > 0). Returns how
    many train samples the time cap dropped per task."""
    first_eval = {}
    for task, split in task_splits.items():
        first_eval[task] = np.full(num_users + 1, np.iinfo(np.int64).max, np.int64)
        evaluated = split > 0
        np.minimum.at(first_eval[task], task_users[task][evaluated], task_times[task][evaluated].astype(np.int64))
    dropped = {}
    for task, split in task_splits.items():
        others = [first_eval[other] for other in task_splits if other != task]
        cutoff = np.minimum.reduce(others) if others else np.full(num_users + 1, np.iinfo(np.int64).max, np.int64)
        late = (split == 0) & (task_times[task].astype(np.int64) >= cutoff[task_users[task]])
        split[late] = -1
        dropped[task] = int(late.sum())
        if max_train > 0:
            train = np.flatnonzero(split == 0)  # sorted by (user, time)
            starts = group_starts(task_users[task][train])
            sizes = np.diff(np.append(starts, len(train)))
            rank_from_end = np.repeat(starts + sizes - 1, sizes) - np.arange(len(train))
            split[train[rank_from_end >= max_train]] = -1
    return dropped


def candidate_rng(seed: int, task: str, split: str) -> np.random.Generator:
    return np.random.default_rng([seed, schema.TASKS.index(task), schema.SPLITS.index(split)])


def video_candidates(target: np.ndarray, num_videos: int, num_negatives: int, rng: np.random.Generator
                     ) -> tuple[pa.Array, pa.Array]:
    """Target + distinct uniform negatives ≠ target, shuffled per row; labels 1 on the target."""
    rows = len(target)
    num_negatives = min(num_negatives, num_videos - 1)
    if num_videos - 1 <= 4 * num_negatives:
        # Few videos: an exact random subset from a per-row permutation of the other videos.
        others = np.argsort(rng.random((rows, num_videos - 1)), axis=1)[:, :num_negatives] + 1
    else:
        others = rng.integers(1, num_videos, size=(rows, num_negatives))  # 1..V-1, shifted past target
        while True:
            others.sort(axis=1)
            duplicate = np.zeros_like(others, dtype=bool)
            duplicate[:, 1:] = others[:, 1:] == others[:, :-1]
            if not duplicate.any():
                break
            others[duplicate] = rng.integers(1, num_videos, size=int(duplicate.sum()))
    negatives = others + (others >= target[:, None])
    candidates = np.concatenate([target[:, None], negatives], axis=1)
    shuffle = np.argsort(rng.random(candidates.shape), axis=1)
    candidates = np.take_along_axis(candidates, shuffle, axis=1)
    counts = np.full(rows, candidates.shape[1])
    return (list_array(counts, candidates.ravel()),
            list_array(counts, (candidates == target[:, None]).ravel(), pa.int8()))


def comment_candidates(
    positive_counts: np.ndarray, positives: np.ndarray, pool_counts: np.ndarray, pool: np.ndarray,
    cap: int, min_negatives: int, num_comments: int, rng: np.random.Generator,
) -> tuple[pa.Array, pa.Array]:
    """Per row: all positives + seeded random non-positives of the pool up to `cap` in total, but at least
    `min_negatives` of them (as many as the pool has), shuffled."""
    rows = len(positive_counts)
    positive_row = np.repeat(np.arange(rows), positive_counts)
    pool_row = np.repeat(np.arange(rows), pool_counts)
    stride = num_comments + 1
    is_positive = np.isin(pool_row.astype(np.int64) * stride + pool, positive_row.astype(np.int64) * stride + positives)
    negative_row, negative = pool_row[~is_positive], pool[~is_positive]
    order = np.lexsort((rng.random(len(negative)), negative_row))
    negative_row, negative = negative_row[order], negative[order]
    negative_rank = np.arange(len(negative)) - np.repeat(
        offsets_from_counts(np.bincount(negative_row, minlength=rows))[:-1], np.bincount(negative_row, minlength=rows))
    keep = negative_rank < np.maximum(min_negatives, cap - positive_counts)[negative_row]
    row = np.concatenate([positive_row, negative_row[keep]])
    comment = np.concatenate([positives, negative[keep]])
    label = np.concatenate([np.ones(len(positives), np.int8), np.zeros(int(keep.sum()), np.int8)])
    order = np.lexsort((rng.random(len(row)), row))
    counts = np.bincount(row, minlength=rows)
    return list_array(counts, comment[order]), list_array(counts, label[order], pa.int8())


# ---------------------------------------------------------------------------------------------
# The whole preparation


def like_counts(raw: RawTables, comment_raw: np.ndarray, rule: str, filters: list[str]) -> tuple[np.ndarray, str]:
    """Like count per comment row. comment_like_cnt is a snapshot that counts the data's own users' likes,
    the test user's included (a label leak into the like prior and popularity by likes). outside_users:
    subtract one per (user, comment) with is_like in user_comment_inter, clipped at 0."""
    snapshot = raw.comments.column("like_count").to_numpy().astype(np.int64)
    is_like = raw.comment_interactions.column("is_like")
    if rule == "snapshot" or is_like.null_count == len(is_like):
        reason = "data.like_counts=snapshot" if rule == "snapshot" else "user_comment_inter has no is_like"
        filters.append(f"comment like counts: comment_like_cnt as it is ({reason}); it may include the "
                       "evaluated users' own likes")
        return snapshot, "snapshot"
    interactions = raw.comment_interactions
    liked = pc.fill_null(is_like, 0).to_numpy() > 0
    pairs = np.unique(np.stack([interactions.column("user_id").to_numpy()[liked],
                                interactions.column("comment_id").to_numpy()[liked]]), axis=1)
    by_raw = np.argsort(comment_raw, kind="stable")
    row = by_raw[np.searchsorted(comment_raw[by_raw], pairs[1])]
    own_likes = np.bincount(row, minlength=len(comment_raw))
    adjusted = np.maximum(snapshot - own_likes, 0)
    filters.append(f"comment like counts: comment_like_cnt minus the {int(own_likes.sum())} (user, comment) "
                   f"likes of user_comment_inter, so no like of a user in the data is counted "
                   f"(data.like_counts=outside_users; {int((snapshot < own_likes).sum())} counts clipped at 0)")
    return adjusted, "outside_users"


def index_comments(
    raw: RawTables, video_ids: np.ndarray, pool_size: int, filters: list[str], rule: str = "outside_users",
) -> tuple[pa.Table, np.ndarray, np.ndarray, np.ndarray, str]:
    """comments.parquet rows, ordered by (video, likes desc, raw id): each video's pool (top `pool_size`
    by likes) plus every interacted comment. Returns (table, pool size per video, pool comment_idx flat in
    video order, comment_idx of every comment interaction, the like-count rule applied)."""
    comments = raw.comments
    comment_video = _index_of(video_ids, comments.column("video_id").to_numpy())
    comment_raw = comments.column("comment_id").to_numpy()
    like_count, applied_rule = like_counts(raw, comment_raw, rule, filters)
    order = np.lexsort((comment_raw, -like_count, comment_video))
    starts = group_starts(comment_video[order])
    rank_in_video = np.arange(len(order)) - np.repeat(starts, np.diff(np.append(starts, len(order))))
    interaction_raw = raw.comment_interactions.column("comment_id").to_numpy()
    in_pool = rank_in_video < pool_size
    kept_mask = in_pool | np.isin(comment_raw[order], interaction_raw)
    keep = order[kept_mask]
    filters.append(f"comments: kept each video's top {pool_size} by likes plus every interacted comment "
                   f"({len(keep)} of {len(order)})")
    table = pa.table({
        "comment_idx": np.arange(1, len(keep) + 1, dtype=np.int32),
        "comment_id": comment_raw[keep],
        "video_idx": comment_video[keep],
        "content": comments.column("content").take(pa.array(keep)),
        "like_count": like_count[keep],
    })
    pool_index = np.flatnonzero(in_pool[kept_mask])  # positions among kept comments
    pool_counts = np.bincount(comment_video[keep][pool_index] - 1, minlength=len(video_ids))
    by_raw = np.argsort(comment_raw[keep], kind="stable")
    interaction_comment = by_raw[np.searchsorted(comment_raw[keep][by_raw], interaction_raw)] + 1
    return (table, pool_counts, (pool_index + 1).astype(np.int32), interaction_comment.astype(np.int32),
            applied_rule)


def comment_population_filter(records: Records, pool_member: np.ndarray, hot_counts: np.ndarray,
                              counts: dict) -> np.ndarray:
    """Which comment records can be samples. Negatives (train and frozen eval) come from the target video's
    pool (top `comment_pool_size` by likes), so positives must too: an interacted comment outside the pool
    is kept in histories but is not a positive (a low-like candidate would otherwise almost surely be one).
    Records with no positive in the pool, or whose pool holds no negative, are not samples. Counted."""
    record_of_comment = np.repeat(np.arange(len(records.user)), np.diff(records.comment_offsets))
    in_pool = pool_member[records.comment]
    pool_positives = np.bincount(record_of_comment[in_pool], minlength=len(records.user))
    negatives_left = hot_counts[records.video - 1] - pool_positives
    counts["comment_positives"] = int(len(records.comment))
    counts["comment_positives_outside_pool"] = int((~in_pool).sum())
    counts["comment_records_without_pool_positive"] = int((pool_positives == 0).sum())
    counts["comment_records_without_negative"] = int(((pool_positives > 0) & (negatives_left <= 0)).sum())
    return (pool_positives > 0) & (negatives_left > 0)


def _index_of(sorted_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """1-based index of each id in `sorted_ids` (ids are known to be present)."""
    return (np.searchsorted(sorted_ids, ids) + 1).astype(np.int32)


def input_fingerprint(raw_dir: Path, config: PrepareConfig) -> str:
    """Hash of the data config and of the raw files' names, sizes and modification times."""
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns)
                   for p in Path(raw_dir).iterdir() if p.is_file() and not p.name.startswith("."))
    text = json.dumps({"format_version": schema.FORMAT_VERSION, "config": dataclasses.asdict(config), "files": files})
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _finished_manifest(out_dir: Path, fingerprint: str) -> dict | None:
    manifest_path = out_dir / MANIFEST_FILE
    if not (out_dir / "_SUCCESS").exists() or not manifest_path.exists():
        return None
    manifest = json.loads(manifest_path.read_text())
    return manifest if manifest.get("input_fingerprint") == fingerprint else None


def prepare(
    raw_dir: str | Path, out_dir: str | Path, config: PrepareConfig | None = None, force: bool = False
) -> dict:
    """Read, validate and convert `raw_dir`; write PREPARED/ atomically to `out_dir`. Returns the manifest.

    A finished `out_dir` made from the same raw files and config is kept as it is (unless `force`)."""
    config = config or PrepareConfig()
    started = time.perf_counter()
    raw_path, out_path = Path(raw_dir).resolve(), Path(out_dir).resolve()
    if out_path == raw_path or out_path in raw_path.parents:
        raise ConfigError(f"--out {out_dir} would replace the raw data in {raw_dir}: choose another directory")
    fingerprint = input_fingerprint(raw_path, config) if raw_path.is_dir() else ""
    finished = None if force or not fingerprint else _finished_manifest(out_path, fingerprint)
    if finished is not None:
        log.info("%s is up to date (same raw files and data config): kept; --force recomputes it", out_dir)
        return finished
    raw = load_raw(raw_dir)
    filters: list[str] = []

    # Entities: dense 1-based indices in raw-id order; 0 is padding.
    videos = raw.videos.take(pc.sort_indices(raw.videos, [("video_id", "ascending")]))
    video_ids = videos.column("video_id").to_numpy()
    num_videos = len(video_ids)
    if num_videos < 2:
        raise DataError("table video_features: at least 2 videos are needed")
    user_sources = [raw.interactions.column("user_id").to_numpy()]
    if raw.has_comments:
        user_sources.append(raw.comment_interactions.column("user_id").to_numpy())
    user_ids = np.unique(np.concatenate(user_sources))
    num_users = len(user_ids)
    interaction_user = _index_of(user_ids, raw.interactions.column("user_id").to_numpy())
    interaction_video = _index_of(video_ids, raw.interactions.column("video_id").to_numpy())

    signal, notes = choose_signal(raw, interaction_user, num_users, config)
    filters.extend(notes)
    positives, duplicate_positives = build_positives(raw, signal, interaction_user, interaction_video,
                                                     config.tie_break)
    filters.append(f"video positives: rows with {signal}; {duplicate_positives} repeated (user, video) positives "
                   "dropped (first kept)")

    comments_table = records = None
    hot_counts = np.zeros(num_videos, np.int64)
    hot_values = np.zeros(0, np.int32)
    like_rule = None
    if raw.has_comments:
        comments_table, hot_counts, hot_values, interaction_comment, like_rule = index_comments(
            raw, video_ids, config.comment_pool_size, filters, config.like_counts)
        records, duplicate_comment_interactions = build_records(
            raw,
            _index_of(user_ids, raw.comment_interactions.column("user_id").to_numpy()),
            _index_of(video_ids, raw.comment_interactions.column("video_id").to_numpy()),
            interaction_comment,
        )
        filters.append(f"comment interactions: {duplicate_comment_interactions} repeated (user, comment) "
                       "interactions dropped (first kept)")

    all_times = [positives.time_ms] + ([records.first_time_ms, records.comment_time_ms] if records else [])
    time_key = TimeKey.covering(*all_times, num_groups=max(num_users, len(records.user) if records else 0) + 1)
    builder = HistoryBuilder(positives, records, config, time_key)
    end_of_data = time_key.time_min + time_key.stride - 1

    tasks = {"video": (positives.user, positives.video, positives.time_ms)}
    if records is not None:
        tasks["comment"] = (records.user, records.video, records.first_time_ms)

    counts: dict = {
        "users": num_users, "videos": num_videos,
        "comments": comments_table.num_rows if comments_table is not None else 0,
        "interactions": raw.interactions.num_rows,
        "video_positives": len(positives.user),
        "comment_interactions": raw.comment_interactions.num_rows if raw.has_comments else 0,
        "comment_records": len(records.user) if records is not None else 0,
        "dropped_both_histories_empty": {},
    }
    pool_member = np.zeros(counts["comments"] + 1, bool)
    pool_member[hot_values] = True
    sample_indices, splits = {}, {}
    for task, (user, video, target_time) in tasks.items():
        # Samples are already sorted by (user, time, raw video id): positives and records are.
        positions = np.arange(len(user)) if task == "video" else None  # video samples are the positives
        _, video_count = builder.video_slices(user, target_time, positions)
        _, record_count = builder.record_slices(user, target_time)
        keep = (video_count > 0) | (record_count > 0)
        counts["dropped_both_histories_empty"][task] = int((~keep).sum())
        if task == "comment":
            population = comment_population_filter(records, pool_member, hot_counts, counts)
            counts["dropped_outside_comment_population"] = int((keep & ~population).sum())
            keep = keep & population
        sample_indices[task] = np.flatnonzero(keep)
        splits[task] = assign_splits(user[sample_indices[task]], config.min_targets_per_user)
    counts["dropped_train_after_first_eval"] = cap_train_at_first_eval(
        {task: tasks[task][0][rows] for task, rows in sample_indices.items()},
        {task: tasks[task][2][rows] for task, rows in sample_indices.items()},
        splits, num_users, config.max_train_targets_per_user)
    if config.max_train_targets_per_user > 0:
        counts["dropped_old_train_targets"] = {
            task: int((split == -1).sum()) - counts["dropped_train_after_first_eval"][task]
            for task, split in splits.items()}
    video_user, video_target, video_time = tasks["video"]
    video_rows = sample_indices["video"]
    counts["video_samples_with_target_in_comment_history"] = int(builder.target_records(
        video_user[video_rows], video_time[video_rows], video_target[video_rows]).sum())
    if config.exclude_target_video_comment_records:
        filters.append(f"video task: {counts['video_samples_with_target_in_comment_history']} samples had a "
                       "comment-history record on their own target video; those records are excluded "
                       "(data.exclude_target_video_comment_records)")
    with atomic_output_dir(out_dir) as temporary:
        for task, (user, video, target_time) in tasks.items():
            sample_index, split = sample_indices[task], splits[task]
            counts[f"{task}_samples"] = {}
            for split_id, split_name in enumerate(schema.SPLITS):
                rows = sample_index[split == split_id]
                counts[f"{task}_samples"][split_name] = len(rows)
                _write_samples(temporary / samples_file(task, split_name), task, split_name, rows,
                               user, video, target_time, records, builder, config, num_videos,
                               hot_counts, hot_values, pool_member)

        hot_comments = list_array(hot_counts, hot_values)
        write_parquet(pa.table({
            "video_idx": np.arange(1, num_videos + 1, dtype=np.int32),
            "video_id": video_ids,
            "caption": videos.column("caption"),
            "category": videos.column("category"),
            "hot_comments": hot_comments,
        }), temporary / VIDEOS_FILE, schema.VIDEOS)
        if comments_table is not None:
            write_parquet(comments_table, temporary / COMMENTS_FILE, schema.COMMENTS)
        user_idx = np.arange(1, num_users + 1, dtype=np.int32)
        write_parquet(pa.table({"user_idx": user_idx, "user_id": user_ids}), temporary / USERS_FILE, schema.USERS)
        histories = builder.columns(user_idx, np.full(num_users, end_of_data, np.int64))
        write_parquet(pa.table({"user_idx": user_idx, "user_id": user_ids, **histories}),
                      temporary / USER_HISTORIES_FILE, schema.USER_HISTORIES)
        for name, mapping in raw.id_maps.items():
            write_parquet(mapping, temporary / id_map_file(name), schema.ID_MAP)

        if config.max_train_targets_per_user > 0:
            filters.append(f"train: only each user's {config.max_train_targets_per_user} most recent train targets "
                           "per task (data.max_train_targets_per_user)")
        manifest = {
            "format_version": schema.FORMAT_VERSION,
            "source": raw.source,
            "raw_dir": str(Path(raw_dir).resolve()),
            "synthetic": raw.synthetic,
            "has_comments": raw.has_comments,
            "video_signal": signal,
            "counts": counts,
            "filters": filters + [
                "samples whose video history and comment history are both empty are dropped (METHOD 9.5)"],
            "split": SPLIT_TEXT.format(min_targets=config.min_targets_per_user,
                                       tie_break=TIE_BREAK_TEXT[config.tie_break],
                                       history=HISTORY_TEXT[config.history_before]),
            "train_cap": TRAIN_CAP_TEXT,
            "like_counts": like_rule,
            "protocol": {
                "video": f"1 positive + {min(config.video_negatives, num_videos - 1)} uniform random negatives "
                         "(distinct, != target, history items not excluded), frozen by data.seed, shuffled",
                "comment": f"all positives in the target video's pool (top {config.comment_pool_size} by likes; "
                           "positives outside it are not positives) + random non-positive comments of that pool, "
                           f"at most {config.comment_pool_size} candidates but at least "
                           f"{config.comment_min_negatives} negatives when the pool has them, frozen by "
                           "data.seed, shuffled",
                "seed": config.seed,
            },
            "id_maps": {name: id_map_file(name) for name in raw.id_maps},
            "config": dataclasses.asdict(config),
            "input_fingerprint": fingerprint,
            "seconds": round(time.perf_counter() - started, 3),
        }
        if not raw.has_comments:
            manifest["filters"].append("no comment tables: comment task disabled")
            del manifest["protocol"]["comment"]
        write_json(manifest, temporary / MANIFEST_FILE)
        if raw.synthetic:
            (temporary / SYNTHETIC_MARKER).write_text(
                f"SYNTHETIC DATA: prepared from the simulated data set in {manifest['raw_dir']} (lsvcr synth); "
                "results on it say nothing about real users.\n")
    log.info("prepared %s → %s in %.1f s: %s", raw_dir, out_dir, time.perf_counter() - started,
             json.dumps({k: v for k, v in counts.items() if k.endswith("samples")}))
    return manifest


def _write_samples(
    path: Path, task: str, split: str, rows: np.ndarray, user: np.ndarray, video: np.ndarray,
    target_time: np.ndarray, records: Records | None, builder: HistoryBuilder, config: PrepareConfig,
    num_videos: int, hot_counts: np.ndarray, hot_values: np.ndarray, pool_member: np.ndarray,
) -> None:
    """Build and write one samples file in chunks (bounded memory, 32-bit list offsets)."""
    target_schema = schema.sample_schema(task, split)
    rng = candidate_rng(config.seed, task, split)
    hot_offsets = offsets_from_counts(hot_counts)
    chunks = [rows[i:i + SAMPLES_PER_CHUNK] for i in range(0, len(rows), SAMPLES_PER_CHUNK)] or [rows]
    with pq.ParquetWriter(path, target_schema, compression="zstd") as writer:
        for chunk in tqdm(chunks, desc=f"{task}/{split}", disable=len(chunks) < 3, unit="chunk"):
            columns = {
                "user_idx": pa.array(user[chunk].astype(np.int32)),
                "target_video": pa.array(video[chunk].astype(np.int32)),
                "target_time_ms": pa.array(target_time[chunk].astype(np.int64)),
                **builder.columns(user[chunk], target_time[chunk], chunk if task == "video" else None,
                                  video[chunk] if task == "video" and config.exclude_target_video_comment_records
                                  else None),
            }
            if task == "comment":
                # Positives and negatives come from one population: the target video's pool.
                record_counts = np.diff(records.comment_offsets)[chunk]
                interacted = records.comment[expand_ranges(records.comment_offsets[chunk], record_counts)]
                in_pool = pool_member[interacted]
                positives = interacted[in_pool]
                positive_counts = np.bincount(np.repeat(np.arange(len(chunk)), record_counts)[in_pool],
                                              minlength=len(chunk))
                columns["pos_comments"] = list_array(positive_counts, positives)
            if split != "train":
                if task == "video":
                    candidates, labels = video_candidates(video[chunk], num_videos, config.video_negatives, rng)
                else:
                    target = video[chunk] - 1
                    pool_counts = hot_counts[target]
                    pool = hot_values[expand_ranges(hot_offsets[target], pool_counts)]
                    candidates, labels = comment_candidates(
                        positive_counts, positives, pool_counts, pool, config.comment_pool_size,
                        config.comment_min_negatives, len(pool_member) - 1, rng)
                columns["candidates"], columns["labels"] = candidates, labels
            writer.write_table(pa.table(columns, schema=target_schema))

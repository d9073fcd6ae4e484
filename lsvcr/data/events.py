"""Raw interactions -> the events PREPARED/ is built from: video positives, comment records, and the
histories before a time (vectorised: sort + offsets + searchsorted). Used by `lsvcr.data.prepare`."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from lsvcr.config import PrepareConfig
from lsvcr.data.importers import RawTables
from lsvcr.errors import DataError

log = logging.getLogger("lsvcr.data")

SIGNAL_COLUMNS = {"like": "is_like", "long_view": "long_view", "click": "is_click"}
SIGNAL_ORDER = ("like", "long_view", "click")  # sparse → dense


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


def index_of(sorted_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """1-based index of each id in `sorted_ids` (ids are known to be present)."""
    return (np.searchsorted(sorted_ids, ids) + 1).astype(np.int32)

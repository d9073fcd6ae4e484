"""Leave-last-out splits per user and task, the cross-task train cap, and the frozen valid/test
candidates (METHOD 9.6). Used by `lsvcr.data.prepare`."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from lsvcr.data import schema
from lsvcr.data.events import group_starts, list_array, offsets_from_counts


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

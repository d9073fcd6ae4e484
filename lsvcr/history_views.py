"""What a history shows: the one rule for the hot comment of each history video and the comments of each
comment record, used by the SR batches (`lsvcr.batching.make_batch`) and the LLM prompts
(`lsvcr.llm.prompts.histories_from_samples`, `lsvcr.llm.align_data`), so the two see the same comments; and METHOD
5.1's view augmentation, which deliberately gives them different views in stage 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lsvcr.sample_arrays import CommentPools

# Stage 1: at most 3 of a record's comments, the same ones in the LLM prompt and the SR input (METHOD 2.2, 4.2;
# data.py:131-132). Stage 2 (no prompt) averages all of them (up to data.max_comments_per_record).
STAGE_ONE_COMMENTS_PER_RECORD = 3


def hot_comment_picks(video_history: np.ndarray, comment_pool: np.ndarray, hot_count: np.ndarray,
                      rng: np.random.Generator | None) -> np.ndarray:
    """The hot comment shown with each history video: a random pick among its top `hot_count` (training,
    `rng` given) or its top 1 (evaluation, encoding); 0 for a video without comments and for padding."""
    if rng is None:
        return comment_pool[video_history, 0]
    pick = (rng.random(video_history.shape) * np.maximum(hot_count[video_history], 1)).astype(np.int64)
    return comment_pool[video_history, pick]


def hot_comments_for(video_history: np.ndarray, tables: CommentPools, rng: np.random.Generator | None) -> np.ndarray:
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
                  records: np.ndarray, tables: CommentPools, rng: np.random.Generator, settings: ViewAugmentation,
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

"""Comments of PREPARED/: leak-free like counts, the comment index and each video's pool
(`hot_comments`), and the population filter that keeps positives inside the pool. Used by `lsvcr.data.prepare`."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lsvcr.data.events import Records, group_starts, index_of
from lsvcr.data.importers import RawTables


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
    hot_comments: int = 3,
) -> tuple[pa.Table, np.ndarray, np.ndarray, np.ndarray, str]:
    """comments.parquet rows: each video's pool (top `pool_size` by likes) plus every interacted comment.
    The comments a history can show come first (every interacted comment and each video's top `hot_comments`),
    then the rest of the pools; each part ordered by (video, likes desc, raw id). A video-task reader gathers
    only from that first block, so its memory-mapped text vectors stay a small contiguous prefix (KuaiComt:
    about 1.2M of 8.5M rows) instead of pages all over the table. Returns (table, pool size per video, pool
    comment_idx flat in video order, comment_idx of every comment interaction, the like-count rule applied)."""
    comments = raw.comments
    comment_video = index_of(video_ids, comments.column("video_id").to_numpy())
    comment_raw = comments.column("comment_id").to_numpy()
    like_count, applied_rule = like_counts(raw, comment_raw, rule, filters)
    order = np.lexsort((comment_raw, -like_count, comment_video))
    starts = group_starts(comment_video[order])
    rank_in_video = np.arange(len(order)) - np.repeat(starts, np.diff(np.append(starts, len(order))))
    interaction_raw = raw.comment_interactions.column("comment_id").to_numpy()
    in_pool = rank_in_video < pool_size
    interacted = np.isin(comment_raw[order], interaction_raw)
    kept_mask = in_pool | interacted
    shown = (interacted | (rank_in_video < hot_comments))[kept_mask]
    shown_first = np.argsort(~shown, kind="stable")  # kept positions in their new (comment_idx) order
    keep = order[kept_mask][shown_first]
    filters.append(f"comments: kept each video's top {pool_size} by likes plus every interacted comment "
                   f"({len(keep)} of {len(order)}); numbered with the {int(shown.sum())} a history can show "
                   f"(interacted, or a video's top {hot_comments}) first")
    table = pa.table({
        "comment_idx": np.arange(1, len(keep) + 1, dtype=np.int32),
        "comment_id": comment_raw[keep],
        "video_idx": comment_video[keep],
        "content": comments.column("content").take(pa.array(keep)),
        "like_count": like_count[keep],
    })
    comment_idx_of_kept = np.empty(len(keep), dtype=np.int64)  # kept position in (video, likes) order → idx - 1
    comment_idx_of_kept[shown_first] = np.arange(len(keep))
    pool_index = comment_idx_of_kept[np.flatnonzero(in_pool[kept_mask])]  # still in (video, likes desc) order
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

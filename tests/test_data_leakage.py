"""Leakage rules of `lsvcr prepare` (issue 14), each on a small hand-made table where the old rule leaks."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from lsvcr.config import PrepareConfig
from lsvcr.data import prepared
from lsvcr.data.prepare import prepare

BASE_S = 1_700_000_000


def _write_raw(directory, likes, comments, interactions):
    """likes: (user, video, second); comments: (comment, video, like count); interactions: (user, comment,
    second, video, is_like). Every video id used anywhere gets a caption row."""
    directory.mkdir()
    videos = sorted({v for _, v, _ in likes} | {v for _, v, _ in comments})
    pq.write_table(pa.table({
        "user_id": [u for u, _, _ in likes], "video_id": [v for _, v, _ in likes],
        "time_ms": [float((BASE_S + t) * 1000) for *_, t in likes],
        "is_click": [1] * len(likes), "is_like": [1] * len(likes), "long_view": [1] * len(likes),
    }), directory / "user_video_inter.parquet")
    pq.write_table(pa.table({"video_id": videos, "caption": [f"video {v}" for v in videos]}),
                   directory / "video_features.parquet")
    pq.write_table(pa.table({
        "comment_id": [c for c, _, _ in comments], "comment_content": [f"comment {c}" for c, _, _ in comments],
        "video_id": [v for _, v, _ in comments], "comment_like_cnt": [n for *_, n in comments],
    }), directory / "comment_features.parquet")
    pq.write_table(pa.table({
        "user_id": [i[0] for i in interactions], "comment_id": [i[1] for i in interactions],
        "time_stamp": [BASE_S + i[2] for i in interactions], "photo_id": [i[3] for i in interactions],
        "is_like": [i[4] for i in interactions], "is_reply": [1 - i[4] for i in interactions],
    }), directory / "user_comment_inter.parquet")
    return directory


def _samples(out, task, split):
    return prepared.read_samples(out, task, split).to_pandas()


def _cross_task_raw(directory):
    """User 100 likes v11..v15 at 10..50 s (video valid v14@40, test v15@50) and comments on v11, v12, v13
    (12, 22, 32 s), v15 (55 s), v16 (60 s), v17 (70 s): comment valid v16@60, test v17@70. Under a per-task
    split the comment train sample at 55 s holds the video task's valid and test targets in its history."""
    likes = [(100, 11, 10), (100, 12, 20), (100, 13, 30), (100, 14, 40), (100, 15, 50)]
    comment_videos = [(11, 12), (12, 22), (13, 32), (15, 55), (16, 60), (17, 70)]
    comments = [(1000 + v, v, 5) for v, _ in comment_videos] + [(2000 + v, v, 1) for v, _ in comment_videos]
    interactions = [(100, 1000 + v, t, v, 1) for v, t in comment_videos]
    return _write_raw(directory, likes, comments, interactions)


def test_training_samples_never_reach_the_first_evaluation_time_of_either_task(tmp_path):
    out = tmp_path / "out"
    manifest = prepare(_cross_task_raw(tmp_path / "raw"), out, PrepareConfig(min_median_positives=1))
    first_eval = {}
    for task in ("video", "comment"):
        for split in ("valid", "test"):
            for row in _samples(out, task, split).itertuples():
                first_eval[row.user_idx] = min(first_eval.get(row.user_idx, 2**62), row.target_time_ms)
    eval_videos = {int(v) for task in ("video", "comment") for split in ("valid", "test")
                   for v in _samples(out, task, split).target_video}
    for task in ("video", "comment"):
        train = _samples(out, task, "train")
        assert len(train) > 0
        for row in train.itertuples():
            assert row.target_time_ms < first_eval[row.user_idx], (task, row.target_time_ms)
            assert not eval_videos & {int(v) for v in row.video_history}
            assert not eval_videos & {int(v) for v in row.comment_history_videos}
    assert "earliest valid/test target time of the other task" in manifest["train_cap"]
    assert manifest["counts"]["dropped_train_after_first_eval"] == {"video": 0, "comment": 1}
    assert manifest["counts"]["comment_samples"] == {"train": 3, "valid": 1, "test": 1}


def test_video_comment_history_record_on_the_target_video_is_counted_and_can_be_excluded(tmp_path):
    # User 100 opens v13's comments at 25 s, then likes v13 at 30 s (the video test target).
    likes = [(100, 11, 10), (100, 12, 20), (100, 14, 22), (100, 13, 30)]
    comments = [(111, 11, 1), (131, 13, 1)]
    interactions = [(100, 111, 12, 11, 1), (100, 131, 25, 13, 1)]
    raw = _write_raw(tmp_path / "raw", likes, comments, interactions)
    kept = prepare(raw, tmp_path / "kept", PrepareConfig(min_median_positives=1))
    assert kept["counts"]["video_samples_with_target_in_comment_history"] == 1
    test = _samples(tmp_path / "kept", "video", "test")
    assert [list(h) for h in test.comment_history_videos] == [[1, 3]]  # v11, v13 (video_idx)
    excluded = prepare(raw, tmp_path / "excluded",
                       PrepareConfig(min_median_positives=1, exclude_target_video_comment_records=True))
    test = _samples(tmp_path / "excluded", "video", "test")
    assert [list(h) for h in test.comment_history_videos] == [[1]]
    assert [[list(c) for c in h] for h in test.comment_history_comments] == [[[1]]]
    assert excluded["counts"]["video_samples_with_target_in_comment_history"] == 1
    assert "excluded" in " ".join(excluded["filters"])


def _pool_raw(directory):
    """Videos v20..v24 with six comments each, likes 100, 90, 80 (the pool of 3) and 3, 2, 1 (outside it).
    User 100 picks one pool comment and one low-like comment on v20..v23, and four comments (all three of
    the pool) on v24. Under the old rule low-like candidates were always positives, and v24 had no negative."""
    likes = [(100, 11, 10), (100, 12, 20), (100, 13, 30), (100, 14, 50), (100, 15, 60)]
    comments = [(video * 10 + rank, video, n) for video in range(20, 25)
                for rank, n in enumerate([100, 90, 80, 3, 2, 1], start=1)]
    picks = {20: (15, [1, 4]), 21: (25, [2, 5]), 22: (35, [1, 4]), 23: (45, [3, 6]), 24: (55, [1, 2, 3, 4])}
    interactions = [(100, video * 10 + rank, second, video, 1)
                    for video, (second, ranks) in picks.items() for rank in ranks]
    return _write_raw(directory, likes, comments, interactions)


def test_comment_positives_and_negatives_come_from_one_population(tmp_path):
    out = tmp_path / "out"
    manifest = prepare(_pool_raw(tmp_path / "raw"), out,
                       PrepareConfig(min_median_positives=1, comment_pool_size=3, like_counts="snapshot"))
    pool = {int(row.video_idx): set(row.hot_comments) for row in prepared.read_videos(out).to_pandas().itertuples()}
    for split in ("train", "valid", "test"):
        for row in _samples(out, "comment", split).itertuples():
            assert set(row.pos_comments) <= pool[row.target_video], split
            if split != "train":
                assert set(row.candidates) <= pool[row.target_video]
                assert 0 < sum(row.labels) < len(row.labels)  # positives and at least one negative
    counts = manifest["counts"]
    assert counts["comment_positives_outside_pool"] == 5
    assert counts["comment_records_without_negative"] == 1  # v24: its whole pool is positive
    assert counts["comment_samples"] == {"train": 2, "valid": 1, "test": 1}


def test_like_counts_leave_out_the_data_users_own_likes(tmp_path):
    raw = _cross_task_raw(tmp_path / "raw")  # comments 1011..1017: 5 likes, one of them user 100's
    manifest = prepare(raw, tmp_path / "out", PrepareConfig(min_median_positives=1))
    assert manifest["like_counts"] == "outside_users"
    likes = dict(zip(*prepared.read_comments(tmp_path / "out").to_pandas()[["comment_id", "like_count"]].T.values))
    assert likes[1011] == 4 and likes[2011] == 1
    snapshot = prepare(raw, tmp_path / "snapshot", PrepareConfig(min_median_positives=1, like_counts="snapshot"))
    assert snapshot["like_counts"] == "snapshot"
    likes = dict(zip(*prepared.read_comments(tmp_path / "snapshot").to_pandas()[["comment_id", "like_count"]].T.values))
    assert likes[1011] == 5 and likes[2011] == 1

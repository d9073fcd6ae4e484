"""`lsvcr prepare` on the tiny synthetic KuaiComt set: format, leakage-free splits, frozen candidates."""

from __future__ import annotations

import json
import time

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from lsvcr.config import PrepareConfig
from lsvcr.data import prepared, schema
from lsvcr.data.prepare import prepare
from lsvcr.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def raw(tiny_raw_dir):
    """The raw tables plus raw-id → index maps of the prepared output."""
    return {name: pq.read_table(tiny_raw_dir / f"{name}.parquet").to_pandas()
            for name in ("user_video_inter", "user_comment_inter", "video_features", "comment_features")}


@pytest.fixture(scope="module")
def lookups(tiny_prepared_dir):
    videos = prepared.read_videos(tiny_prepared_dir).to_pandas()
    comments = prepared.read_comments(tiny_prepared_dir).to_pandas()
    users = prepared.read_users(tiny_prepared_dir).to_pandas()
    return {
        "video_id": dict(zip(videos.video_idx, videos.video_id)),
        "comment_id": dict(zip(comments.comment_idx, comments.comment_id)),
        "comment_video": dict(zip(comments.comment_idx, comments.video_idx)),
        "user_id": dict(zip(users.user_idx, users.user_id)),
        "videos": videos,
        "comments": comments,
    }


def _samples(prepared_dir, task, split):
    return prepared.read_samples(prepared_dir, task, split).to_pandas()


def test_files_follow_the_schemas(tiny_prepared_dir):
    assert pq.read_schema(tiny_prepared_dir / "videos.parquet").equals(schema.VIDEOS)
    assert pq.read_schema(tiny_prepared_dir / "comments.parquet").equals(schema.COMMENTS)
    assert pq.read_schema(tiny_prepared_dir / "users.parquet").equals(schema.USERS)
    assert pq.read_schema(tiny_prepared_dir / "user_histories.parquet").equals(schema.USER_HISTORIES)
    for task in schema.TASKS:
        for split in schema.SPLITS:
            file_schema = pq.read_schema(tiny_prepared_dir / f"{task}_samples.{split}.parquet")
            assert file_schema.equals(schema.sample_schema(task, split)), (task, split)
    assert (tiny_prepared_dir / "_SUCCESS").exists()


def test_manifest_contents(tiny_prepared_dir, raw):
    manifest = prepared.load_manifest(tiny_prepared_dir)
    assert manifest["format_version"] == 1
    assert manifest["synthetic"] is True and manifest["has_comments"] is True
    assert manifest["source"] == "kuaicomt" and manifest["video_signal"] == "like"
    counts = manifest["counts"]
    assert counts["videos"] == len(raw["video_features"])
    assert counts["users"] == raw["user_video_inter"].user_id.nunique()
    assert counts["video_positives"] == len(raw["user_video_inter"].query("is_like == 1")
                                            .drop_duplicates(["user_id", "video_id"]))
    for task in schema.TASKS:
        for split in schema.SPLITS:
            rows = pq.read_metadata(tiny_prepared_dir / f"{task}_samples.{split}.parquet").num_rows
            assert counts[f"{task}_samples"][split] == rows
        total = (sum(counts[f"{task}_samples"].values()) + counts["dropped_both_histories_empty"][task]
                 + counts["dropped_train_after_first_eval"][task]
                 + (counts["dropped_outside_comment_population"] if task == "comment" else 0))
        assert total == (counts["video_positives"] if task == "video" else counts["comment_records"])
    assert counts["dropped_both_histories_empty"]["video"] > 0
    assert "leave-last-out" in manifest["split"]
    assert "99 uniform" in manifest["protocol"]["video"] and manifest["protocol"]["seed"] == 2024
    assert manifest["config"] == json.loads(json.dumps(PrepareConfig().__dict__))
    assert any("METHOD 9.5" in text for text in manifest["filters"])
    assert "SYNTHETIC" in (tiny_prepared_dir / "SYNTHETIC.txt").read_text()


def test_indices_and_hot_comments(lookups, raw):
    videos, comments = lookups["videos"], lookups["comments"]
    assert list(videos.video_idx) == list(range(1, len(videos) + 1))
    assert list(comments.comment_idx) == list(range(1, len(comments) + 1))
    assert videos.video_id.is_monotonic_increasing
    raw_comment_video = dict(zip(raw["comment_features"].comment_id, raw["comment_features"].video_id))
    assert all(raw_comment_video[c] == lookups["video_id"][v] for c, v in zip(comments.comment_id, comments.video_idx))
    likes = dict(zip(comments.comment_idx, comments.like_count))
    for video_idx, hot in zip(videos.video_idx, videos.hot_comments):
        hot = list(hot)
        assert hot, "every synthetic video has comments"
        assert all(lookups["comment_video"][c] == video_idx for c in hot)
        assert [likes[c] for c in hot] == sorted((likes[c] for c in hot), reverse=True)
        assert len(hot) == (comments.video_idx == video_idx).sum()  # pool size 100 > comments per video


def test_comments_a_history_can_show_are_numbered_first(tiny_prepared_dir, lookups, raw):
    """comment_idx: every interacted comment and each video's top hot_comments form the prefix 1..S (a video-task
    reader's text vectors are a contiguous block); within each block, (video, likes desc) order."""
    videos, comments = lookups["videos"], lookups["comments"]
    interacted = set(raw["user_comment_inter"].comment_id)
    top = {c for hot in videos.hot_comments for c in list(hot)[:PrepareConfig().hot_comments]}
    shown = np.array([(c in interacted) or (i in top) for c, i in zip(comments.comment_id, comments.comment_idx)])
    assert 0 < shown.sum() < len(shown), "the tiny data must have both kinds"
    assert shown[:shown.sum()].all(), "a comment a history can show comes after one it cannot"
    for block in (comments[shown], comments[~shown]):
        assert list(zip(block.video_idx, -block.like_count)) == sorted(zip(block.video_idx, -block.like_count))
    histories = prepared.read_table(tiny_prepared_dir, "user_histories.parquet").to_pandas()
    in_histories = {c for records in histories.comment_history_comments for record in records for c in record}
    assert in_histories and max(in_histories) <= shown.sum()


def test_histories_strictly_precede_targets_in_the_raw_tables(tiny_prepared_dir, raw, lookups):
    """Every history item's raw time is earlier than the target time (checked against raw tables)."""
    likes = raw["user_video_inter"].query("is_like == 1")
    first_like = likes.groupby(["user_id", "video_id"]).time_ms.min().to_dict()
    comment_ms = (raw["user_comment_inter"].groupby(["user_id", "comment_id"]).time_stamp.min() * 1000).to_dict()
    for task in schema.TASKS:
        for split in schema.SPLITS:
            samples = _samples(tiny_prepared_dir, task, split)
            assert len(samples) > 0
            for row in samples.itertuples():
                user_id = lookups["user_id"][row.user_idx]
                history_times = [first_like[(user_id, lookups["video_id"][v])] for v in row.video_history]
                assert all(t < row.target_time_ms for t in history_times)
                assert history_times == sorted(history_times)  # chronological, oldest first
                assert len(row.video_history) <= 50
                for video, record in zip(row.comment_history_videos, row.comment_history_comments):
                    assert len(record) >= 1
                    for comment in record:
                        assert lookups["comment_video"][comment] == video
                        assert comment_ms[(user_id, lookups["comment_id"][comment])] < row.target_time_ms
                assert len(row.video_history) + len(row.comment_history_videos) > 0  # both empty: dropped
                if task == "video":
                    assert first_like[(user_id, lookups["video_id"][row.target_video])] == row.target_time_ms
                else:
                    pos = [comment_ms[(user_id, lookups["comment_id"][c])] for c in row.pos_comments]
                    assert min(pos) == row.target_time_ms
                    assert all(lookups["comment_video"][c] == row.target_video for c in row.pos_comments)


def test_one_empty_history_is_kept(tiny_prepared_dir):
    train = _samples(tiny_prepared_dir, "video", "train")
    assert (train.comment_history_videos.map(len) == 0).any()
    comment_train = _samples(tiny_prepared_dir, "comment", "train")
    assert (comment_train.comment_history_videos.map(len) == 0).any()


@pytest.mark.parametrize("task", schema.TASKS)
def test_leave_last_out_split(tiny_prepared_dir, task):
    parts = {split: _samples(tiny_prepared_dir, task, split) for split in schema.SPLITS}
    for split in ("valid", "test"):
        assert not parts[split].user_idx.duplicated().any()
    assert set(parts["test"].user_idx) == set(parts["valid"].user_idx)
    last_train = parts["train"].groupby("user_idx").target_time_ms.max()
    valid = parts["valid"].set_index("user_idx").target_time_ms
    test = parts["test"].set_index("user_idx").target_time_ms
    common = valid.index.intersection(last_train.index)
    assert (valid[common] >= last_train[common]).all()
    assert (test[valid.index] >= valid).all()
    # Users with fewer than min_targets_per_user samples are train-only (written train samples may be fewer:
    # they end before the user's first valid/test time of either task).
    per_user = pd.concat(parts.values()).groupby("user_idx").size()
    assert set(per_user[per_user >= 3].index) <= set(parts["test"].user_idx)
    assert (per_user[list(set(parts["test"].user_idx))] >= 2).all()


def test_video_candidates(tiny_prepared_dir, lookups):
    num_videos = len(lookups["videos"])
    for split in ("valid", "test"):
        samples = _samples(tiny_prepared_dir, "video", split)
        for row in samples.itertuples():
            candidates, labels = list(row.candidates), list(row.labels)
            assert len(candidates) == 100 and len(set(candidates)) == 100
            assert all(1 <= c <= num_videos for c in candidates)
            assert sum(labels) == 1 and candidates[labels.index(1)] == row.target_video
        first_position = samples.apply(lambda r: list(r.candidates).index(r.target_video), axis=1)
        assert first_position.nunique() > 10  # shuffled


def test_comment_candidates(tiny_prepared_dir, lookups):
    for split in ("valid", "test"):
        for row in _samples(tiny_prepared_dir, "comment", split).itertuples():
            candidates, labels = list(row.candidates), list(row.labels)
            positives = {c for c, label in zip(candidates, labels) if label == 1}
            assert positives == set(row.pos_comments)
            assert len(set(candidates)) == len(candidates) <= 100
            assert all(lookups["comment_video"][c] == row.target_video for c in candidates)


def test_candidates_frozen_by_seed(tiny_raw_dir, tiny_prepared_dir, tmp_path):
    again = tmp_path / "again"
    prepare(tiny_raw_dir, again)
    other_seed = tmp_path / "other_seed"
    prepare(tiny_raw_dir, other_seed, PrepareConfig(seed=7))
    for task in schema.TASKS:
        reference = prepared.read_samples(tiny_prepared_dir, task, "test")
        assert prepared.read_samples(again, task, "test").equals(reference)
        different = prepared.read_samples(other_seed, task, "test")
        assert different.column("target_video").equals(reference.column("target_video"))
        assert not different.column("candidates").equals(reference.column("candidates"))


def test_history_limits_and_signal_fallback(tiny_raw_dir, tmp_path):
    config = PrepareConfig(max_history=4, max_comments_per_record=1, min_median_positives=10_000, comment_pool_size=5)
    manifest = prepare(tiny_raw_dir, tmp_path / "out", config)
    assert manifest["video_signal"] == "click"
    assert sum("falling back" in text for text in manifest["filters"]) == 2
    samples = _samples(tmp_path / "out", "comment", "train")
    assert samples.video_history.map(len).max() == 4
    assert samples.comment_history_videos.map(len).max() == 4
    assert samples.comment_history_comments.map(lambda records: max((len(r) for r in records), default=0)).max() == 1
    videos = prepared.read_videos(tmp_path / "out").to_pandas()
    assert videos.hot_comments.map(len).max() == 5
    test = _samples(tmp_path / "out", "comment", "test")
    assert (test.candidates.map(len) <= np.maximum(5, test.pos_comments.map(len))).all()


def test_latest_history(tiny_prepared_dir, raw, lookups):
    user_id = int(raw["user_video_inter"].user_id.iloc[0])
    history = prepared.latest_history(tiny_prepared_dir, user_id)
    likes = (raw["user_video_inter"].query("is_like == 1 and user_id == @user_id")
             .sort_values(["time_ms", "video_id"]).drop_duplicates("video_id"))
    assert [lookups["video_id"][v] for v in history["video_history"]] == list(likes.video_id)[-50:]
    records = raw["user_comment_inter"].query("user_id == @user_id")
    assert len(history["comment_history_videos"]) == min(50, records.photo_id.nunique())
    with pytest.raises(DataError, match="unknown user_id"):
        prepared.latest_history(tiny_prepared_dir, -1)


def test_reader_errors(tiny_video_only_prepared_dir, tmp_path):
    with pytest.raises(DataError, match="no comment task"):
        prepared.read_samples(tiny_video_only_prepared_dir, "comment", "train")
    with pytest.raises(DataError, match="unknown split"):
        prepared.read_samples(tiny_video_only_prepared_dir, "video", "dev")
    with pytest.raises(DataError, match="lsvcr prepare"):
        prepared.load_manifest(tmp_path)


def test_prepare_is_fast_and_replaces_output_atomically(tiny_raw_dir, tmp_path):
    out = tmp_path / "prepared"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    with pytest.raises(ConfigError, match="not a finished lsvcr output"):
        prepare(tiny_raw_dir, out)  # never replace a directory that is not ours
    (out / "_SUCCESS").write_text("")  # a finished earlier output: replaced
    (tmp_path / ".prepared.tmp-999999999-deadbeef").mkdir()  # left by a killed run
    started = time.perf_counter()
    prepare(tiny_raw_dir, out)
    assert time.perf_counter() - started < 2.0
    assert not (out / "stale.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["prepared"]  # no temporary directories left
    with pytest.raises(ConfigError, match="would replace the raw data"):
        prepare(tiny_raw_dir, tiny_raw_dir.parent)


def _write_hand_made(directory):
    """Two users, six videos; user 100 has a tie in time (v12, v13 at +20 s) and comments on v12 and v15."""
    import pyarrow as pa

    directory.mkdir()
    base_s = 1_700_000_000
    likes = [(100, 11, 10, 1), (100, 13, 20, 1), (100, 12, 20, 1), (100, 14, 30, 1), (100, 15, 40, 1),
             (100, 16, 50, 0), (200, 11, 15, 1), (200, 12, 16, 1)]
    pq.write_table(pa.table({
        "user_id": [u for u, *_ in likes], "video_id": [v for _, v, *_ in likes],
        "time_ms": [float((base_s + t) * 1000) for *_, t, _ in likes],
        "is_click": [1] * len(likes), "is_like": [like for *_, like in likes], "long_view": [1] * len(likes),
    }), directory / "user_video_inter.parquet")
    pq.write_table(pa.table({"video_id": list(range(11, 17)), "caption": [f"video {v}" for v in range(11, 17)]}),
                   directory / "video_features.parquet")
    comments = [(121, 12, 5), (122, 12, 50), (123, 12, 0), (151, 15, 1), (152, 15, 2), (153, 15, 3)]
    pq.write_table(pa.table({
        "comment_id": [c for c, *_ in comments], "comment_content": [f"comment {c}" for c, *_ in comments],
        "video_id": [v for _, v, _ in comments], "comment_like_cnt": [n for *_, n in comments],
    }), directory / "comment_features.parquet")
    interactions = [(100, 121, 25, 12), (100, 122, 35, 12), (100, 153, 45, 15)]
    pq.write_table(pa.table({
        "user_id": [u for u, *_ in interactions], "comment_id": [c for _, c, *_ in interactions],
        "time_stamp": [base_s + t for *_, t, _ in interactions], "photo_id": [v for *_, v in interactions],
    }), directory / "user_comment_inter.parquet")
    return directory


def test_hand_made_ties_prefixes_and_splits(tmp_path):
    out = tmp_path / "out"
    manifest = prepare(_write_hand_made(tmp_path / "raw"), out, PrepareConfig(min_median_positives=1))
    assert manifest["synthetic"] is False and manifest["video_signal"] == "like"
    assert not (out / "SYNTHETIC.txt").exists()
    assert manifest["counts"]["dropped_both_histories_empty"] == {"video": 2, "comment": 0}
    videos = prepared.read_videos(out).to_pandas()
    assert [list(h) for h in videos.hot_comments] == [[], [1, 2, 3], [], [], [4, 5, 6], []]  # by likes desc
    assert prepared.read_comments(out).column("comment_id").to_pylist() == [122, 121, 123, 153, 152, 151]
    v = {raw_id: raw_id - 10 for raw_id in range(11, 17)}  # video_idx
    train = _samples(out, "video", "train")
    rows = {(r.user_idx, r.target_video): r for r in train.itertuples()}
    assert list(rows[(1, v[12])].video_history) == [v[11]]
    assert list(rows[(1, v[13])].video_history) == [v[11]]  # v12 has the same time: not strictly before
    assert list(rows[(2, v[12])].video_history) == [v[11]]  # user 200: 1 sample < 3, train only
    valid, test = _samples(out, "video", "valid"), _samples(out, "video", "test")
    assert list(valid.target_video) == [v[14]] and list(test.target_video) == [v[15]]
    assert list(valid.video_history[0]) == [v[11], v[12], v[13]]
    assert list(valid.comment_history_videos[0]) == [v[12]]
    assert [list(c) for c in valid.comment_history_comments[0]] == [[2]]  # c122 comes after the target
    assert [list(c) for c in test.comment_history_comments[0]] == [[2, 1]]  # in interaction-time order
    assert sorted(valid.candidates[0]) == [1, 2, 3, 4, 5, 6]  # only 5 other videos exist
    comment_train = _samples(out, "comment", "train")
    # The v15 record (45 s) comes after the video task's valid target (v14, 30 s): not a train sample.
    assert list(comment_train.target_video) == [v[12]]
    assert manifest["counts"]["dropped_train_after_first_eval"] == {"video": 0, "comment": 1}
    assert [list(p) for p in comment_train.pos_comments] == [[2, 1]]
    assert list(comment_train.video_history[0]) == [v[11], v[12], v[13]]
    assert len(comment_train.comment_history_videos[0]) == 0  # kept: one empty history only
    history = prepared.latest_history(out, 100)
    assert list(history["video_history"]) == [v[11], v[12], v[13], v[14], v[15]]
    assert list(history["comment_history_videos"]) == [v[12], v[15]]

    capped = prepare(tmp_path / "raw", tmp_path / "capped", PrepareConfig(min_median_positives=1, max_train_targets_per_user=1))
    assert capped["counts"]["video_samples"] == {"train": 2, "valid": 1, "test": 1}
    assert capped["counts"]["dropped_old_train_targets"]["video"] == 1
    assert set(_samples(tmp_path / "capped", "video", "train").target_video) == {v[13], v[12]}


def test_rerun_keeps_an_up_to_date_output(tiny_raw_dir, tmp_path):
    out = tmp_path / "out"
    first = prepare(tiny_raw_dir, out)
    written = (out / "manifest.json").stat().st_mtime_ns
    assert prepare(tiny_raw_dir, out) == first
    assert (out / "manifest.json").stat().st_mtime_ns == written  # kept, not rewritten
    prepare(tiny_raw_dir, out, force=True)
    assert (out / "manifest.json").stat().st_mtime_ns != written
    changed = prepare(tiny_raw_dir, out, PrepareConfig(max_history=3))
    assert changed["config"]["max_history"] == 3 and changed["input_fingerprint"] != first["input_fingerprint"]

"""`lsvcr synth`: KuaiComt layout, determinism, and structure that text can learn."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest

from lsvcr.cli import main as cli_main
from lsvcr.data.schema import RAW_TABLES
from lsvcr.data.synth import PRESETS, STYLES, TOPICS, SynthParams
from lsvcr.data.synth_files import write_synthetic

SMALL = SynthParams(users=60, videos=80, comments_per_video=5, impressions_per_user=40, seed=11)


def _files(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.mark.parametrize("file_format", ["parquet", "csv"])
def test_same_seed_gives_byte_identical_tables(tmp_path, file_format):
    write_synthetic(tmp_path / "a", SMALL, file_format)
    write_synthetic(tmp_path / "b", SMALL, file_format)
    write_synthetic(tmp_path / "c", SynthParams(**{**SMALL.__dict__, "seed": 12}), file_format)
    first, second, other = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert first == second
    assert first[f"user_video_inter.{file_format}"] != other[f"user_video_inter.{file_format}"]
    assert first[f"comment_features.{file_format}"] != other[f"comment_features.{file_format}"]


def test_every_kuaicomt_column_with_its_type_and_the_synthetic_label(tiny_raw_dir):
    for name, spec in RAW_TABLES.items():
        assert pq.read_schema(tiny_raw_dir / f"{name}.parquet").equals(spec.schema), name
    assert "SYNTHETIC" in (tiny_raw_dir / "SYNTHETIC.txt").read_text()
    info = json.loads((tiny_raw_dir / "synth.json").read_text())
    assert info["synthetic"] is True and info["params"] == PRESETS["tiny"].__dict__


def test_csv_has_the_same_columns(tmp_path):
    write_synthetic(tmp_path / "csv", SMALL, "csv")
    for name, spec in RAW_TABLES.items():
        table = pa_csv.read_csv(tmp_path / "csv" / f"{name}.csv")
        assert table.column_names == spec.schema.names


@pytest.fixture(scope="module")
def frames(tiny_raw_dir):
    return {name: pq.read_table(tiny_raw_dir / f"{name}.parquet").to_pandas() for name in RAW_TABLES}


def test_likes_follow_stable_user_interests(frames):
    """A user's early likes predict which categories they like later: text/category carries signal."""
    views = frames["user_video_inter"].merge(frames["video_features"][["video_id", "category"]], on="video_id")
    views = views.sort_values(["user_id", "time_ms"])
    views["late"] = views.groupby("user_id").cumcount() >= views.groupby("user_id").video_id.transform("size") / 2
    early_likes = views[~views.late & (views.is_like == 1)]
    top = early_likes.groupby("user_id").category.agg(lambda c: set(c.value_counts().index[:3]))
    late = views[views.late].copy()
    late["favourite"] = [category in top.get(user, set()) for user, category in zip(late.user_id, late.category)]
    rate = late.groupby("favourite").is_like.mean()
    assert rate[True] > 1.5 * rate[False], rate
    late_likes = late[late.is_like == 1]
    category_share = views.drop_duplicates("video_id").category.value_counts(normalize=True)
    chance = np.mean([sum(category_share.get(c, 0) for c in top.get(u, set())) for u in late_likes.user_id])
    assert late_likes.favourite.mean() > 2 * chance


def test_texts_carry_topic_and_style_words(frames):
    videos, comments = frames["video_features"], frames["comment_features"]
    assert set(videos.category) <= set(TOPICS)
    in_caption = [any(w in caption.split() or f"#{w}" in caption.split() for w in TOPICS[category])
                  for caption, category in zip(videos.caption, videos.category)]
    assert np.mean(in_caption) == 1.0
    assert videos.caption.str.contains("#").mean() > 0.9
    category_of = dict(zip(videos.video_id, videos.category))
    words = [set(text.split()) for text in comments.comment_content]
    topical = [bool(w & set(TOPICS[category_of[v]])) for w, v in zip(words, comments.video_id)]
    styled = [any(w & set(style) for style in STYLES.values()) for w in words]
    assert np.mean(topical) > 0.85 and np.mean(styled) == 1.0


def test_heavy_tails_and_popularity_bias(frames):
    likes = frames["comment_features"].comment_like_cnt
    assert likes.max() > 20 * max(1, likes.median())
    interacted = frames["comment_features"].comment_id.isin(frames["user_comment_inter"].comment_id)
    assert np.log1p(likes[interacted]).mean() > np.log1p(likes[~interacted]).mean()
    per_video = frames["user_video_inter"].groupby("video_id").size().sort_values()
    tenth = len(per_video) // 10
    assert per_video.iloc[-tenth:].mean() > 3 * per_video.iloc[: len(per_video) // 2].mean()
    flags = frames["user_video_inter"][["is_like", "long_view", "is_click"]].mean()
    assert flags.is_like < flags.long_view < flags.is_click  # the fallback order is sparse → dense


def test_cli_flags_override_the_preset(tmp_path, capsys):
    code = cli_main(["synth", "--out", str(tmp_path / "raw"), "--preset", "tiny", "--users", "30",
                     "--videos", "20", "--comments-per-video", "3", "--seed", "5", "--format", "csv"])
    assert code == 0
    counts = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["counts"]
    assert counts["user_features"] == 30 and counts["video_features"] == 20
    assert counts["comment_features"] < 20 * 6
    assert (tmp_path / "raw" / "user_video_inter.csv").exists()


def test_kuaicomt_preset_has_the_published_sizes_and_ratios():
    """`lsvcr synth --preset kuaicomt`: KuaiComt's published sizes (KUAICOMT_SCHEMA.md: 34,701 users, 82,452
    videos, 16,352,904 comments, 1,002,672 comment interactions). Generated here at 1/100 of the users and
    1/10 of the videos with the preset's rates, which must give the published per-user and per-video ratios
    (impressions per user need the larger video catalogue: at 1/100 of it a user runs out of distinct videos)."""
    from dataclasses import replace

    from lsvcr.data.synth import generate

    preset = PRESETS["kuaicomt"]
    assert (preset.users, preset.videos) == (34_701, 82_452)
    tables = generate(replace(preset, users=347, videos=8_245))
    comments_per_video = tables["comment_features"].num_rows / 8_245
    interactions_per_user = tables["user_comment_inter"].num_rows / 347
    assert comments_per_video == pytest.approx(16_352_904 / 82_452, rel=0.05)  # 198.3
    assert interactions_per_user == pytest.approx(1_002_672 / 34_701, rel=0.15)  # 28.9


def test_comment_choice_in_chunks_equals_one_pass():
    """The Gumbel-top-k over (record, candidate) pairs runs in bounded chunks (KuaiComt: ~120M pairs);
    the chunk size must not change a single choice, and each record keeps its best `record_size` comments."""
    from lsvcr.data.synth import _choose_comments

    rng = np.random.default_rng(0)
    num_records, num_users, num_styles = 57, 9, 4
    pool_size = rng.integers(1, 12, num_records)
    first_comment = rng.integers(0, 200, num_records)
    record_size = np.minimum(1 + rng.poisson(0.7, num_records), pool_size)
    inputs = (rng.integers(0, num_users, num_records), first_comment, pool_size, record_size,
              rng.dirichlet(np.ones(num_styles), num_users), rng.integers(0, num_styles, 220), rng.integers(0, 50, 220))
    whole = _choose_comments(np.random.default_rng(5), *inputs, max_pairs=10**9)
    for max_pairs in (1, 7, 40):
        chunked = _choose_comments(np.random.default_rng(5), *inputs, max_pairs=max_pairs)
        assert all(np.array_equal(a, b) for a, b in zip(whole, chunked)), max_pairs
    records, comments = whole
    assert np.array_equal(np.bincount(records, minlength=num_records), record_size)
    assert np.all((comments >= first_comment[records]) & (comments < first_comment[records] + pool_size[records]))

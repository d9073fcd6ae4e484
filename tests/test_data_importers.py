"""Video-only data sets: RecBole atomic files and plain CSV; KuaiComt without comment tables."""

from __future__ import annotations

import hashlib
import logging
import shutil

import pyarrow.parquet as pq
import pytest

from lsvcr.data import prepared
from lsvcr.data.importers import map_raw_ids
from lsvcr.data.prepare import prepare
from lsvcr.errors import DataError

INTER = """user_id:token\titem_id:token\trating:float\ttimestamp:float
alice\tm1\t5\t978300760
alice\tm2\t3\t978302109
alice\tm3\t4\t978301968
alice\tm4\t5\t978300275
bob\tm2\t5\t978824291
bob\tm4\t4\t978824330
bob\tm1\t2\t978824400
bob\tm5\t5\t978824500
carol\tm5\t4\t978300000
carol\tm3\t3\t978300100
"""
ITEM = """item_id:token\tmovie_title:token_seq\trelease_year:token\tgenre:token_seq
m1\tToy Story\t1995\tAnimation Comedy
m2\tJumanji\t1995\tAdventure
m3\tHeat\t1995\tAction Crime
m4\tCasino\t1995\tDrama
m5\tBabe\t1995\tComedy
"""


def _token_id(token: str) -> int:
    return int.from_bytes(hashlib.blake2b(token.encode(), digest_size=8).digest(), "little") & (2**63 - 1)


def test_video_only_fixture_from_recbole_export(tiny_video_only_prepared_dir, tiny_raw_dir):
    manifest = prepared.load_manifest(tiny_video_only_prepared_dir)
    assert manifest["has_comments"] is False and manifest["source"] == "recbole:synthetic"
    assert manifest["video_signal"] == "interaction" and "comment" not in manifest["protocol"]
    assert manifest["synthetic"] is True
    assert not (tiny_video_only_prepared_dir / "comments.parquet").exists()
    assert not (tiny_video_only_prepared_dir / "comment_samples.train.parquet").exists()
    videos = prepared.read_videos(tiny_video_only_prepared_dir).to_pandas()
    assert videos.hot_comments.map(len).max() == 0
    # Captions survive the round trip, joined through the kept token → id mapping.
    video_map = pq.read_table(tiny_video_only_prepared_dir / "id_map.videos.parquet").to_pandas()
    raw_videos = pq.read_table(tiny_raw_dir / "video_features.parquet").to_pandas()
    caption_of_raw = dict(zip("v" + raw_videos.video_id.astype(str), raw_videos.caption))
    token_of_id = dict(zip(video_map.id, video_map.raw_id))
    assert all(caption_of_raw[token_of_id[v]] == c for v, c in zip(videos.video_id, videos.caption))
    test = prepared.read_samples(tiny_video_only_prepared_dir, "video", "test").to_pandas()
    assert len(test) > 50 and (test.comment_history_videos.map(len) == 0).all()
    assert (test.video_history.map(len) > 0).all()


def test_recbole_string_tokens_are_mapped_deterministically(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "ml.inter").write_text(INTER)
    (raw / "ml.item").write_text(ITEM)
    manifest = prepare(raw, tmp_path / "out")
    assert manifest["source"] == "recbole:ml" and manifest["counts"]["users"] == 3
    videos = prepared.read_videos(tmp_path / "out").to_pandas()
    assert dict(zip(videos.video_id, videos.caption))[_token_id("m3")] == "Heat"
    assert dict(zip(videos.video_id, videos.category))[_token_id("m1")] == "Animation Comedy"
    users = pq.read_table(tmp_path / "out" / "id_map.users.parquet").to_pandas()
    assert dict(zip(users.raw_id, users.id)) == {name: _token_id(name) for name in ("alice", "bob", "carol")}
    # alice, in time order (seconds → ms): m4, m1, m3, m2; test target m2, valid m3.
    alice = dict(zip(users.raw_id, users.id))["alice"]
    alice_idx = int(prepared.read_users(tmp_path / "out").to_pandas().set_index("user_id").user_idx[alice])
    video_idx = dict(zip(videos.video_id, videos.video_idx))
    test = prepared.read_samples(tmp_path / "out", "video", "test").to_pandas().set_index("user_idx")
    assert test.target_video[alice_idx] == video_idx[_token_id("m2")]
    assert list(test.video_history[alice_idx]) == [video_idx[_token_id(m)] for m in ("m4", "m1", "m3")]
    assert test.target_time_ms[alice_idx] == 978302109000
    # Row order does not change the ids.
    lines = INTER.strip().split("\n")
    (raw / "ml.inter").write_text("\n".join([lines[0]] + lines[:0:-1]) + "\n")
    prepare(raw, tmp_path / "again")
    assert prepared.read_videos(tmp_path / "again").equals(prepared.read_videos(tmp_path / "out"))


def test_integer_tokens_are_kept_as_ids(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "data.inter").write_text(INTER.replace("alice", "11").replace("bob", "12").replace("carol", "13")
                                    .replace("\tm", "\t10"))
    prepare(raw, tmp_path / "out")
    assert sorted(prepared.read_users(tmp_path / "out").column("user_id").to_pylist()) == [11, 12, 13]
    assert prepared.read_videos(tmp_path / "out").column("video_id").to_pylist() == [101, 102, 103, 104, 105]
    assert not list((tmp_path / "out").glob("id_map.*"))
    assert set(prepared.read_videos(tmp_path / "out").column("caption").to_pylist()) == {""}  # no .item


def test_map_raw_ids_mixed_tokens():
    import pyarrow as pa

    (ids,), mapping = map_raw_ids([pa.chunked_array([["7", "x7", "7"]])])
    assert ids.to_pylist() == [_token_id("7"), _token_id("x7"), _token_id("7")]
    assert sorted(mapping.column("raw_id").to_pylist()) == ["7", "x7"]


def test_plain_csv_with_items(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    rows = [line.split("\t") for line in INTER.strip().split("\n")[1:]]
    (raw / "interactions.csv").write_text(
        "user_id,item_id,timestamp\n" + "".join(f"{u},{i},{float(t) * 1000:.0f}\n" for u, i, _, t in rows))
    (raw / "items.csv").write_text("item_id,text,category\nm1,Toy Story,kids\nm2,Jumanji,adventure\n"
                                   "m3,Heat,crime\nm4,Casino,drama\nm5,Babe,kids\n")
    manifest = prepare(raw, tmp_path / "out")
    assert manifest["source"] == "csv" and manifest["has_comments"] is False
    assert manifest["counts"]["video_positives"] == 10
    videos = prepared.read_videos(tmp_path / "out").to_pandas()
    assert dict(zip(videos.video_id, videos.caption))[_token_id("m5")] == "Babe"
    test = prepared.read_samples(tmp_path / "out", "video", "test").to_pandas()
    assert set(test.target_time_ms) == {978302109000, 978824500000}  # ms stay ms


def test_video_only_errors(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "ml.inter").write_text(INTER.replace("\ttimestamp:float", "\tstamp:float"))
    with pytest.raises(DataError, match="table ml.inter: missing column timestamp"):
        prepare(raw, tmp_path / "out")
    (raw / "ml.inter").write_text(INTER)
    (raw / "ml.item").write_text(ITEM.replace("m5\tBabe", "m9\tBabe"))
    with pytest.raises(DataError, match=r"table ml.inter, column item_id: id not found in ml.item.item_id .*row 8"):
        prepare(raw, tmp_path / "out")
    (raw / "ml.item").write_text(ITEM + "m1\tToy Story again\t1995\tAnimation\n")
    with pytest.raises(DataError, match="table ml.item, column item_id: duplicate id"):
        prepare(raw, tmp_path / "out")
    (raw / "ml.item").unlink()
    (raw / "ml.inter").write_text(INTER.replace("978300760", "nan"))
    with pytest.raises(DataError, match="table ml.inter, column timestamp: missing or NaN timestamp .*row 1"):
        prepare(raw, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_kuaicomt_without_comment_tables_disables_comment_task(tiny_raw_dir, tmp_path, caplog):
    raw = tmp_path / "raw"
    raw.mkdir()
    for name in ("user_video_inter", "video_features", "user_features"):
        shutil.copy(tiny_raw_dir / f"{name}.parquet", raw)
    with caplog.at_level(logging.INFO, logger="lsvcr.data"):
        manifest = prepare(raw, tmp_path / "out")
    assert manifest["has_comments"] is False and manifest["video_signal"] == "like"
    assert any("comment task disabled" in record.getMessage() for record in caplog.records)
    assert manifest["counts"]["video_samples"]["test"] > 0
    with pytest.raises(DataError, match="no comments"):
        prepared.read_comments(tmp_path / "out")

"""`lsvcr encode` on the real default LLM (SmolLM2-135M, vLLM on Ray Data actors): vector shapes and
counts, no NaN, identical texts → identical vectors, and a resumed run redoes only missing shards.

One encode run is shared by the module (engine starts are the slow part): items + users of a tiny
PREPARED whose train tables are cut to a few samples.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.slow

TRAIN_SAMPLES = 12
SETTINGS = ["encode.shard_size=200", "encode.max_prompt_tokens=160", "encode.history_length=5",
            "encode.batch_size=128"]


def read_table(directory, name):
    table = pa.concat_tables([pq.read_table(p) for p in sorted((directory / name).glob("part-*.parquet"))])
    column = table["vector"].combine_chunks()
    return table.column(0).to_numpy(), column.values.to_numpy().reshape(len(table), column.type.list_size)


@pytest.fixture(scope="module")
def small_prepared(tiny_prepared_dir, tmp_path_factory):
    """The tiny PREPARED with few train samples and two comments sharing one text."""
    out = tmp_path_factory.mktemp("encode") / "prepared"
    shutil.copytree(tiny_prepared_dir, out)
    for task in ("video", "comment"):
        path = out / f"{task}_samples.train.parquet"
        pq.write_table(pq.read_table(path).slice(0, TRAIN_SAMPLES), path)
    comments = pq.read_table(out / "comments.parquet")
    content = comments["content"].to_pylist()
    content[1] = content[0]
    pq.write_table(comments.set_column(comments.schema.get_field_index("content"), "content",
                                       pa.array(content, pa.string())), out / "comments.parquet")
    return out


@pytest.fixture(scope="module")
def encoded(ray_cluster, small_prepared, tmp_path_factory):
    from lsvcr.config import load_config
    from lsvcr.llm.encode import run_encode

    out = tmp_path_factory.mktemp("encode") / "vectors"
    manifest = run_encode(load_config(None, SETTINGS), small_prepared, out, "all")
    return out, manifest


def test_vectors_have_the_right_shape_count_and_no_nan(encoded, small_prepared):
    out, manifest = encoded
    videos = pq.read_table(small_prepared / "videos.parquet")
    comments = pq.read_table(small_prepared / "comments.parquet")
    assert manifest["dim"] == 576 and manifest["pooling"] == "mean" and manifest["user_pooling"] == "last"
    for name, expected_ids in (("videos", videos["video_id"].to_numpy()), ("comments", comments["comment_id"].to_numpy()),
                               ("users_video", np.arange(TRAIN_SAMPLES)), ("users_comment", np.arange(TRAIN_SAMPLES))):
        ids, vectors = read_table(out, name)
        assert vectors.shape == (len(expected_ids), 576), name
        np.testing.assert_array_equal(np.sort(ids), np.sort(expected_ids))
        assert np.isfinite(vectors).all(), name
        assert np.abs(vectors).sum(axis=1).min() > 0, name
    assert manifest["throughput"]["users"]["prompts"] == 2 * TRAIN_SAMPLES
    assert manifest["throughput"]["items"]["tokens_per_s"] > 0
    assert (out / "_SUCCESS").exists()

    from lsvcr.vectors import load_item_vectors

    video_text, comment_text = load_item_vectors(out, small_prepared)  # the stage-2 reader accepts it
    assert video_text.shape == (len(videos) + 1, 576) and comment_text.shape == (len(comments) + 1, 576)


def test_identical_texts_get_identical_vectors_and_users_differ(encoded, small_prepared):
    out, _ = encoded
    ids, vectors = read_table(out, "comments")
    order = pq.read_table(small_prepared / "comments.parquet")["comment_id"].to_numpy()
    by_id = dict(zip(ids.tolist(), vectors))
    np.testing.assert_array_equal(by_id[order[0]], by_id[order[1]])  # same text → bit-identical
    assert not np.array_equal(by_id[order[0]], by_id[order[2]])
    _, users = read_table(out, "users_video")
    assert len(np.unique(users.round(4), axis=0)) > 1


def test_resume_encodes_only_missing_shards(encoded, small_prepared, tmp_path):
    from lsvcr.config import load_config
    from lsvcr.llm.encode import run_encode

    source, _ = encoded
    out = tmp_path / "vectors"
    shutil.copytree(source, out)
    shards = sorted((out / "_distinct_texts").glob("part-*.parquet"))
    assert len(shards) >= 3
    before = {p.name: p.stat().st_mtime_ns for p in shards}
    old_vectors = read_table(source, "_distinct_texts")[1]
    shards[1].unlink()
    (out / "videos" / "part-00000.parquet").unlink()

    manifest = run_encode(load_config(None, SETTINGS), small_prepared, out, "items")
    after = {p.name: p.stat().st_mtime_ns for p in sorted((out / "_distinct_texts").glob("part-*.parquet"))}
    assert after.keys() == before.keys()
    assert all(after[name] == before[name] for name in before if name != shards[1].name)
    assert after[shards[1].name] != before[shards[1].name]
    assert manifest["throughput"]["items"]["prompts"] == 200  # one shard of distinct texts, nothing else
    np.testing.assert_allclose(read_table(out, "_distinct_texts")[1], old_vectors, rtol=1e-4, atol=1e-4)
    assert (out / "videos" / "part-00000.parquet").is_file()
    assert json.loads((out / "manifest.json").read_text())["counts"]["users_video"] == TRAIN_SAMPLES

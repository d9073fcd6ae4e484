"""Scale-run item vectors (issue #16): the hashed bag-of-words encoder, float16 storage, memory maps."""

import json
import mmap

import numpy as np
import pytest
import torch

from lsvcr.baselines import build_model
from lsvcr.sample_arrays import load_comment_pools
from lsvcr.config import load_config
from lsvcr.errors import ConfigError
from lsvcr.llm.encode import run_encode
from lsvcr.vectors import HashedBagOfWords, load_item_vectors, open_item_tensors, open_item_vectors


def test_hashed_bag_of_words_is_deterministic_and_a_real_bag_of_words():
    texts = ["The cat sat", "the CAT  sat", "sat cat the", "a dog ran far", "", None]
    first = HashedBagOfWords(dim=32, seed=3).encode(texts)
    again = HashedBagOfWords(dim=32, seed=3).encode(texts)
    assert first.dtype == np.float32 and first.shape == (6, 32)
    assert np.array_equal(first, again)  # a fresh encoder: same vectors
    assert np.allclose(first[0], first[1], atol=1e-6) and np.allclose(first[0], first[2], atol=1e-6)  # case, order
    assert np.allclose(np.linalg.norm(first[:4], axis=1), 1.0, atol=1e-5)
    assert abs(float(first[0] @ first[3])) < 0.8  # unrelated words: far apart
    assert not first[4:].any()  # no tokens: zeros
    assert not np.allclose(HashedBagOfWords(dim=32, seed=4).encode(texts)[0], first[0])


def _maps_a_file(array: np.ndarray) -> bool:
    """Whether the array's memory is a memory map (not a copy)."""
    while isinstance(array, np.ndarray):
        array = array.base
    return isinstance(array, memoryview) and isinstance(array.obj, mmap.mmap)


def _mapped_bytes(path) -> int:
    """Bytes of `path` resident in this process's page tables (/proc/self/smaps)."""
    total, mapping = 0, ""
    for line in open("/proc/self/smaps"):
        fields = line.split()
        if fields and not fields[0].endswith(":"):
            mapping = fields[-1] if len(fields) > 5 else ""
        elif fields and fields[0] == "Rss:" and mapping == str(path):
            total += int(fields[1]) * 1024
    return total


def test_released_vector_pages_leave_this_process_and_read_again(tmp_path):
    """release_item_vector_pages: rows read from a dense map stop counting in this process's RSS, and the
    same values come back on the next read (from the page cache)."""
    from lsvcr.vectors import _map_npy, release_item_vector_pages

    path = tmp_path / "comments.npy"
    stored = np.random.default_rng(0).random((200_000, 16)).astype(np.float16)  # 6.4 MB
    np.save(path, stored)
    table = _map_npy(path)
    rows = np.random.default_rng(1).integers(0, len(stored), 5_000)
    first = np.array(table[rows])
    assert _mapped_bytes(path) > 0.5 * stored.nbytes  # 5k scattered rows map most of the file
    release_item_vector_pages()
    assert _mapped_bytes(path) < 0.01 * stored.nbytes
    assert np.array_equal(first, stored[rows]) and np.array_equal(table[rows], stored[rows])


def test_hashed_encode_stage_float16_and_memory_maps(tiny_prepared_dir, tmp_path):
    config = load_config(None, ["encode.encoder=hashed", "encode.hashed_dim=16"])
    manifest = run_encode(config, tiny_prepared_dir, tmp_path / "v32", what="items")
    assert manifest["model"] == "hashed-bow" and manifest["dim"] == 16
    assert "not an LLM" in json.loads((tmp_path / "v32" / "manifest.json").read_text())["hashed"]["note"]
    video32, comment32 = load_item_vectors(tmp_path / "v32", tiny_prepared_dir)
    assert not video32[0].any() and np.allclose(np.linalg.norm(comment32[1:], axis=1), 1.0, atol=1e-5)

    half = load_config(None, ["encode.encoder=hashed", "encode.hashed_dim=16", "encode.storage_dtype=float16"])
    run_encode(half, tiny_prepared_dir, tmp_path / "v16", what="items")
    assert (tmp_path / "v16" / "comments.parquet").stat().st_size < (tmp_path / "v32" / "comments.parquet").stat().st_size
    video16, comment16 = open_item_vectors(tmp_path / "v16", tiny_prepared_dir)
    assert _maps_a_file(comment16) and comment16.dtype == np.float16 and not comment16.flags.writeable
    assert np.allclose(comment16, comment32, atol=2e-3) and np.allclose(video16, video32, atol=2e-3)
    mapped32, _ = open_item_vectors(tmp_path / "v32", tiny_prepared_dir)
    assert mapped32.dtype == np.float32 and np.array_equal(mapped32, video32)
    with pytest.raises(ConfigError, match="items only"):
        run_encode(config, tiny_prepared_dir, tmp_path / "v_all", what="all")


def test_the_model_reads_memory_mapped_float16_tables_in_place(tiny_prepared_dir, tmp_path):
    """The text tables are not copied into the model (a node's workers share the pages), and float16
    storage scores like float32 to half precision."""
    config = load_config(None, ["encode.encoder=hashed", "encode.hashed_dim=16", "encode.storage_dtype=float16",
                                "model.mode=id+text"])
    run_encode(config, tiny_prepared_dir, tmp_path / "v16", what="items")
    video, comment = open_item_tensors(tmp_path / "v16", tiny_prepared_dir)
    tables = load_comment_pools(tiny_prepared_dir)
    likes = torch.from_numpy(tables.comment_likes)
    torch.manual_seed(0)
    mapped = build_model(config.model, tables.num_videos, video, comment, likes).to("cpu")
    assert mapped.comment_text.dtype == torch.float16
    assert mapped.video_text.data_ptr() == video.data_ptr() and mapped.comment_text.data_ptr() == comment.data_ptr()

    copied = build_model(config.model, tables.num_videos, video.float(), comment.float(), likes)
    copied.load_state_dict(mapped.state_dict())
    rows = torch.arange(1, comment.shape[0]).view(1, -1)
    assert torch.allclose(mapped.comment_candidate_vectors(rows), copied.comment_candidate_vectors(rows), atol=1e-6)
    history = torch.arange(1, min(6, video.shape[0])).view(1, -1)
    assert torch.allclose(mapped.adapt_text_mean(mapped.comment_text, history),
                          copied.adapt_text_mean(copied.comment_text, history), atol=1e-6)


def test_the_dense_join_reads_block_by_block_first_row_wins(tiny_prepared_dir, tmp_path, monkeypatch):
    """The dense tables are built a block of rows at a time (KuaiComt: 8.5M comment vectors, never whole in
    memory); shards, shuffled rows, unwanted ids, repeated ids (the first row wins) and NaN are handled
    the same in memory and in the memory-mapped build."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lsvcr import vectors as vectors_module
    from lsvcr.data.prepared import read_table, read_videos

    monkeypatch.setattr(vectors_module, "DENSE_BLOCK_ROWS", 3)
    video_ids = read_videos(tiny_prepared_dir, ["video_id"])["video_id"].to_numpy()
    comment_ids = read_table(tiny_prepared_dir, "comments.parquet", ["comment_id"])["comment_id"].to_numpy()
    rng = np.random.default_rng(0)
    out = tmp_path / "v"
    expected = {}
    for name, ids in (("videos", video_ids), ("comments", comment_ids)):
        vectors = rng.normal(size=(len(ids), 4)).astype(np.float32)
        vectors[0, 1] = np.nan
        expected[name] = np.vstack([np.zeros((1, 4), np.float32), np.nan_to_num(vectors, nan=0.0)])
        rows = rng.permutation(len(ids))
        table_ids = np.concatenate([ids[rows], [ids.max() + 1000], ids[:2]])  # an unwanted id, two repeats
        table_vectors = np.vstack([vectors[rows], np.ones((3, 4), np.float32) * 99])
        flat = pa.array(table_vectors.reshape(-1), type=pa.float32())
        table = pa.table({f"{name[:-1]}_id": table_ids, "vector": pa.FixedSizeListArray.from_arrays(flat, 4)})
        (out / name).mkdir(parents=True)
        half = len(table) // 2
        pq.write_table(table.slice(0, half), out / name / "part-00000.parquet", row_group_size=5)
        pq.write_table(table.slice(half), out / name / "part-00001.parquet", row_group_size=5)
    (out / "manifest.json").write_text("{}")

    in_memory = load_item_vectors(out, tiny_prepared_dir)
    mapped = open_item_vectors(out, tiny_prepared_dir)
    for index, name in enumerate(("videos", "comments")):
        assert np.array_equal(in_memory[index], expected[name]), name
        assert np.array_equal(np.asarray(mapped[index]), expected[name]), name

    first_shard = pq.read_table(out / "comments" / "part-00000.parquet")
    pq.write_table(first_shard, out / "comments" / "part-00001.parquet")  # half the comments lose their vector
    with pytest.raises(Exception, match="no vector for comment_id"):
        load_item_vectors(out, tiny_prepared_dir)


def test_the_memory_mapped_dense_join_holds_one_block_in_memory(tmp_path, monkeypatch):
    """NumPy's peak allocation while the join fills a memory map stays a small fraction of the table."""
    import tracemalloc

    import pyarrow as pa
    import pyarrow.parquet as pq

    from lsvcr import vectors as vectors_module

    monkeypatch.setattr(vectors_module, "DENSE_BLOCK_ROWS", 4096)
    count, dim = 100_000, 64  # 25.6 MB of float32 vectors (the scale runs use dim 64)
    ids = np.random.default_rng(1).permutation(count).astype(np.int64) + 10
    flat = pa.array(np.arange(count * dim, dtype=np.float32), type=pa.float32())
    pq.write_table(pa.table({"comment_id": ids, "vector": pa.FixedSizeListArray.from_arrays(flat, dim)}),
                   tmp_path / "comments.parquet", row_group_size=4096)
    wanted = np.arange(count, dtype=np.int64) + 10
    dense = np.lib.format.open_memmap(tmp_path / "dense.npy", mode="w+", dtype=np.float32, shape=(count + 1, dim))
    tracemalloc.start()
    vectors_module._fill_dense_rows([tmp_path / "comments.parquet"], "comment_id", wanted, dense, "comments")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 0.25 * count * dim * 4, f"peak {peak / 1e6:.1f} MB"  # ids bookkeeping + one block
    row_of = {int(comment): row for row, comment in enumerate(ids)}
    assert np.array_equal(dense[1 + 123], np.arange(dim, dtype=np.float32) + row_of[123 + 10] * dim)


def test_hashed_vectors_are_written_a_block_at_a_time_with_the_same_rows(tiny_prepared_dir, tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    from lsvcr import vectors as vectors_module
    from lsvcr.data.prepared import read_table
    from lsvcr.vectors import write_hashed_vectors

    monkeypatch.setattr(vectors_module, "HASHED_COMMENT_BLOCK", 7)
    write_hashed_vectors(tiny_prepared_dir, tmp_path / "v", dim=8, seed=5, dtype="float16")
    written = pq.read_table(tmp_path / "v" / "comments.parquet")
    comments = read_table(tiny_prepared_dir, "comments.parquet", ["comment_id", "content"])
    assert written.num_rows == comments.num_rows and pq.ParquetFile(tmp_path / "v" / "comments.parquet").num_row_groups > 1
    assert np.array_equal(written["comment_id"].to_numpy(), comments["comment_id"].to_numpy())
    whole = HashedBagOfWords(dim=8, seed=5).encode(comments["content"].combine_chunks()).astype(np.float16)
    assert np.array_equal(np.stack(written["vector"].to_numpy(zero_copy_only=False)), whole)
    manifest = json.loads((tmp_path / "v" / "manifest.json").read_text())
    assert manifest["counts"] == {"videos": read_table(tiny_prepared_dir, "videos.parquet").num_rows,
                                  "comments": comments.num_rows} and manifest["storage_dtype"] == "float16"

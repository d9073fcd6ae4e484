"""The streamed (memory-mapped, padded per batch) sample loader of issue #16 against the in-memory one."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from lsvcr.batching import epoch_rows, history_lengths, make_batch
from lsvcr.sample_arrays import load_comment_pools, load_sample_arrays
from lsvcr.sample_stream import STREAM_DIR, open_sample_stream

HISTORY_FIELDS = ("video_history", "video_history_hot_comment", "comment_history_videos", "comment_history_comments")


def _assert_same_batch(expected, got) -> None:
    for name in HISTORY_FIELDS:
        a, b = getattr(expected.history, name), getattr(got.history, name)
        assert a.shape == b.shape and bool((a == b).all()), name
    assert bool((expected.target_video == got.target_video).all())
    assert (expected.candidates is None) == (got.candidates is None)
    if expected.candidates is not None:
        assert expected.candidates.shape == got.candidates.shape
        assert bool((expected.candidates == got.candidates).all()) and bool((expected.labels == got.labels).all())


@pytest.mark.parametrize("task", ["video", "comment"])
@pytest.mark.parametrize("split", ["train", "valid", "test"])
def test_streamed_batches_equal_the_in_memory_loader(tiny_prepared_dir, task, split):
    tables = load_comment_pools(tiny_prepared_dir)
    arrays = load_sample_arrays(tiny_prepared_dir, task, split, history_length=5, max_comments_per_record=2)
    stream = open_sample_stream(tiny_prepared_dir, task, split, history_length=5, max_comments_per_record=2)
    assert len(stream) == len(arrays)
    assert np.array_equal(history_lengths(stream), history_lengths(arrays))
    training = split == "train"
    for rank in range(2):  # each DDP rank's shard of a seeded epoch, bucketed by length
        batches = epoch_rows(len(arrays), 16, np.random.default_rng([7, 1]), rank, 2, lengths=history_lengths(stream))
        expected_rng, got_rng = np.random.default_rng([7, 1, rank]), np.random.default_rng([7, 1, rank])
        for rows in batches:
            expected = make_batch(arrays, tables, rows, rng=expected_rng if training else None, comment_negatives=4)
            got = make_batch(stream, tables, rows, rng=got_rng if training else None, comment_negatives=4)
            _assert_same_batch(expected, got)
    if task == "comment":
        assert np.array_equal(stream.pos_comments, arrays.pos_comments)


@pytest.mark.parametrize("task", ["video", "comment"])
def test_swapped_histories_of_a_stream_equal_those_of_the_arrays(tiny_prepared_dir, task):
    """evaluate's personalization check reads the split as a stream too (bounded memory at any size)."""
    from lsvcr.evaluate import swap_histories

    tables = load_comment_pools(tiny_prepared_dir)
    arrays = swap_histories(load_sample_arrays(tiny_prepared_dir, task, "test", history_length=5, max_comments_per_record=2))
    stream = swap_histories(open_sample_stream(tiny_prepared_dir, task, "test", history_length=5, max_comments_per_record=2))
    assert np.array_equal(history_lengths(stream), history_lengths(arrays))
    for rows in epoch_rows(len(arrays), 8, None, 0, 1, drop_uneven=False, lengths=history_lengths(stream)):
        _assert_same_batch(make_batch(arrays, tables, rows, rng=None), make_batch(stream, tables, rows, rng=None))
    odd = stream.select(np.arange(1, len(stream), 2))  # a view of the swapped view keeps the donors
    assert np.array_equal(odd.take(np.arange(len(odd))).video_history,
                          stream.take(np.arange(1, len(stream), 2)).video_history)


def test_stream_select_is_a_view_and_a_changed_table_is_converted_again(tiny_prepared_dir, tmp_path):
    import shutil

    prepared = tmp_path / "prepared"
    shutil.copytree(tiny_prepared_dir, prepared, ignore=shutil.ignore_patterns(STREAM_DIR))
    stream = open_sample_stream(prepared, "video", "train", history_length=50)
    rows = np.array([5, 2, 9])
    view = stream.select(rows)
    assert len(view) == 3 and np.array_equal(view.target_video, stream.target_video[rows])
    assert np.array_equal(view.take(np.array([1])).video_history, stream.take(np.array([2])).video_history)
    # A rewritten PREPARED table (another size) must not be served from the old conversion.
    import pyarrow.parquet as pq

    path = prepared / "video_samples.train.parquet"
    pq.write_table(pq.read_table(path).slice(0, 10), path)
    assert len(open_sample_stream(prepared, "video", "train", history_length=50)) == 10
    assert [p.name for p in (prepared / STREAM_DIR).iterdir()] == ["video.train.L50.K64"]  # no temporary left


MEASURE = r"""
import json, sys
import numpy as np
from lsvcr.batching import epoch_rows, history_lengths, make_batch
from lsvcr.sample_arrays import load_comment_pools, load_sample_arrays
from lsvcr.sample_stream import open_sample_stream
def peak_rss_bytes():  # VmHWM: this process's own peak (ru_maxrss keeps the forking parent's across exec)
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024
prepared, loader = sys.argv[1], sys.argv[2]
tables = load_comment_pools(prepared)
before = peak_rss_bytes()
samples = (open_sample_stream if loader == "stream" else load_sample_arrays)(prepared, "video", "train", 50, 64)
rng = np.random.default_rng(0)
for rows in epoch_rows(len(samples), 256, rng, lengths=history_lengths(samples)):
    make_batch(samples, tables, rows, rng=rng)
stream_pages, mapping = 0, ""  # the split's file pages still mapped into this process
for line in open("/proc/self/smaps"):
    fields = line.split()
    if fields and not fields[0].endswith(":"):
        mapping = fields[-1] if len(fields) > 5 else ""
    elif fields and fields[0] == "Rss:" and "/.stream/" in mapping:
        stream_pages += int(fields[1]) * 1024
print(json.dumps({"growth_bytes": peak_rss_bytes() - before, "stream_pages": stream_pages}))
"""


def test_streamed_epoch_memory_is_bounded_against_the_whole_split(tmp_path):
    """Peak RSS growth over one training epoch of 5x the demo users (~100k video samples): the
    in-memory loader holds the whole padded split, the stream a few batches."""
    import dataclasses

    from lsvcr.data.prepare import prepare
    from lsvcr.data.synth import PRESETS
    from lsvcr.data.synth_files import write_synthetic

    write_synthetic(tmp_path / "raw", dataclasses.replace(PRESETS["demo"], users=4000), "parquet")
    prepare(tmp_path / "raw", tmp_path / "prepared")
    open_sample_stream(tmp_path / "prepared", "video", "train", 50, 64)  # convert outside the measurement
    padded = load_sample_arrays(tmp_path / "prepared", "video", "train", 50, 64)
    split_bytes = sum(a.nbytes for a in (padded.video_history, padded.comment_history_videos,
                                         padded.comment_history_comments))
    assert split_bytes > 150e6, "the data set is too small to measure"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    measured = {loader: json.loads(subprocess.run(
        [sys.executable, "-c", MEASURE, str(tmp_path / "prepared"), loader], env=env, check=True,
        capture_output=True, text=True).stdout.splitlines()[-1]) for loader in ("arrays", "stream")}
    growth = {loader: values["growth_bytes"] for loader, values in measured.items()}
    stream_files = sum(path.stat().st_size for path in (tmp_path / "prepared" / STREAM_DIR).rglob("*.*"))
    print(f"whole split {split_bytes / 1e6:.0f} MB; RSS growth: in-memory {growth['arrays'] / 1e6:.0f} MB, "
          f"stream {growth['stream'] / 1e6:.0f} MB; stream files {stream_files / 1e6:.0f} MB, "
          f"{measured['stream']['stream_pages'] / 1e6:.1f} MB of them mapped after the epoch")
    assert growth["arrays"] > 0.9 * split_bytes  # the measurement sees a whole split
    assert growth["stream"] < 0.1 * split_bytes
    # Every batch's file pages are released (SampleStream.release_pages): they do not pile up over the epoch.
    assert measured["stream"]["stream_pages"] < 0.02 * stream_files


def test_a_samples_table_without_a_column_or_rows_is_a_clear_error(tiny_prepared_dir, tmp_path):
    import shutil

    import pyarrow.parquet as pq

    from lsvcr.errors import DataError

    prepared = tmp_path / "prepared"
    shutil.copytree(tiny_prepared_dir, prepared)
    samples = prepared / "video_samples.train.parquet"
    table = pq.read_table(samples)
    pq.write_table(table.drop_columns(["video_history"]), samples)
    with pytest.raises(DataError, match="video_samples.train.parquet: missing column.s. video_history"):
        load_sample_arrays(prepared, "video", "train", history_length=10)
    pq.write_table(table.slice(0, 0), samples)
    with pytest.raises(DataError, match="video_samples.train.parquet has no rows"):
        load_sample_arrays(prepared, "video", "train", history_length=10)
    samples.write_bytes(b"not parquet")
    with pytest.raises(DataError, match="not a readable Parquet table"):
        load_sample_arrays(prepared, "video", "train", history_length=10)

"""Streamed samples: the padded `SampleArrays` of a large split do not fit in every training worker
(KuaiComt size: 7.3 GB per worker, issue #16). `open_sample_stream` converts the split once, row group by row
group, into flat memory-mapped arrays (the lists already cut to what the model sees: the last
`history_length` items, the first `max_comments_per_record` comments of a record), and pads per
batch. A worker then reads only the rows of its own batches; the pages are the node's page cache,
shared by every worker and trial on the node. The batches equal `make_batch` on `load_sample_arrays`
exactly (same rows, same padding after trimming, same random draws).
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lsvcr.errors import DataError
from lsvcr.runtime import map_readonly, release_mapped_pages
from lsvcr.data.prepared import samples_path
from lsvcr.sample_arrays import SampleArrays, flat_list, gather_padded

STREAM_DIR = ".stream"  # beside the Parquet tables of PREPARED
STREAM_FORMAT = 1
_LAST_COLUMNS = ("video_history", "comment_history_videos")
_FIRST_COLUMNS = ("pos_comments", "candidates", "labels")
_CONVERT_ROWS = 65_536


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of arange(starts[i], starts[i] + lengths[i]) over i."""
    total = int(lengths.sum())
    out_starts = np.cumsum(lengths) - lengths
    return np.arange(total, dtype=np.int64) - np.repeat(out_starts, lengths) + np.repeat(starts, lengths)


def _as_int32(values: np.ndarray, what: str) -> np.ndarray:
    if len(values) and (values.max() > np.iinfo(np.int32).max or values.min() < 0):
        raise DataError(f"{what}: index out of the int32 range")
    return values.astype(np.int32)


class _ColumnWriter:
    """Appends one column's flat values to `name.values` and keeps its per-row counts."""

    def __init__(self, directory: Path, name: str, nested: bool = False):
        self.name, self.directory = name, directory
        self.handle = (directory / f"{name}.values").open("wb")
        self.counts: list[np.ndarray] = []
        self.inner_counts: list[np.ndarray] = [] if nested else None
        self.width = 0

    def add(self, values: np.ndarray, counts: np.ndarray, inner_counts: np.ndarray | None = None) -> None:
        _as_int32(values, self.name).tofile(self.handle)
        self.counts.append(counts.astype(np.int64))
        self.width = max(self.width, int(counts.max(initial=0)))
        if inner_counts is not None:
            self.inner_counts.append(inner_counts.astype(np.int64))

    def close(self) -> dict:
        self.handle.close()
        offsets = np.concatenate([[0], np.cumsum(np.concatenate(self.counts or [np.zeros(0, np.int64)]))])
        offsets.astype(np.int64).tofile(self.directory / f"{self.name}.offsets")
        meta = {"rows": len(offsets) - 1, "values": int(offsets[-1]), "width": self.width}
        if self.inner_counts is not None:
            inner = np.concatenate([[0], np.cumsum(np.concatenate(self.inner_counts or [np.zeros(0, np.int64)]))])
            inner.astype(np.int64).tofile(self.directory / f"{self.name}.inner_offsets")
            meta["inner_values"] = int(inner[-1])
            meta["inner_width"] = int(max((c.max(initial=0) for c in self.inner_counts), default=0))
        return meta


def _last_kept(list_array: pa.Array, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """(values, counts) of each list's last `max_length` items."""
    offsets, values = flat_list(list_array)
    lengths = np.diff(offsets)
    kept = np.minimum(lengths, max_length)
    return values.to_numpy(zero_copy_only=False)[_ranges(offsets[1:] - kept, kept)], kept


def _records_kept(nested: pa.Array, max_records: int, max_comments: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(comment values, records per row, comments per kept record) of the last `max_records`
    records, each cut to its first `max_comments` comments."""
    outer_offsets, records = flat_list(nested)
    kept = np.minimum(np.diff(outer_offsets), max_records)
    record_index = _ranges(outer_offsets[1:] - kept, kept)
    inner_offsets, comments = flat_list(records)
    inner_kept = np.minimum(np.diff(inner_offsets)[record_index], max_comments)
    values = comments.to_numpy(zero_copy_only=False)[_ranges(inner_offsets[:-1][record_index], inner_kept)]
    return values, kept, inner_kept


def _convert_split(path: Path, out: Path, task: str, split: str, history_length: int,
                   max_comments_per_record: int) -> dict:
    """Write the memory-mapped form of one sample table into `out` (bounded memory: one Parquet
    batch of `_CONVERT_ROWS` rows at a time). Returns its meta."""
    parquet = pq.ParquetFile(path)
    required = ["user_idx", "target_video", *_LAST_COLUMNS, "comment_history_comments"]
    if task == "comment":
        required.append("pos_comments")
    if split != "train":
        required += ["candidates", "labels"]
    missing = [c for c in required if c not in parquet.schema_arrow.names]
    if missing:
        raise DataError(f"{path.name}: missing column(s) {', '.join(missing)}")
    if parquet.metadata.num_rows == 0:
        raise DataError(f"{path.name} has no rows")
    firsts = [c for c in _FIRST_COLUMNS if c in required]
    writers = {name: _ColumnWriter(out, name) for name in (*_LAST_COLUMNS, *firsts)}
    writers["comment_history_comments"] = _ColumnWriter(out, "comment_history_comments", nested=True)
    scalars: dict[str, list[np.ndarray]] = {"user_idx": [], "target_video": []}
    row = 0
    for batch in parquet.iter_batches(batch_size=_CONVERT_ROWS, columns=required):
        for name in scalars:
            scalars[name].append(batch.column(name).to_numpy().astype(np.int64))
        for name in _LAST_COLUMNS:
            writers[name].add(*_last_kept(batch.column(name), history_length))
        writers["comment_history_comments"].add(*_records_kept(
            batch.column("comment_history_comments"), history_length, max_comments_per_record))
        for name in firsts:
            offsets, values = flat_list(batch.column(name))
            counts = np.diff(offsets)
            if name == "pos_comments" and (counts == 0).any():
                raise DataError(f"{path.name}: row {row + int(np.argmax(counts == 0))} has an empty pos_comments list")
            writers[name].add(values.to_numpy(zero_copy_only=False), counts)
        row += batch.num_rows
    for name, parts in scalars.items():
        np.concatenate(parts).tofile(out / f"{name}.values")
    stat = path.stat()
    return {"format": STREAM_FORMAT, "task": task, "split": split, "rows": row,
            "history_length": history_length, "max_comments_per_record": max_comments_per_record,
            "source": {"name": path.name, "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns},
            "columns": {name: writer.close() for name, writer in writers.items()}}


def _stream_is_current(directory: Path, path: Path) -> bool:
    meta_path = directory / "meta.json"
    if not meta_path.is_file():
        return False
    source = json.loads(meta_path.read_text()).get("source", {})
    stat = path.stat()
    return source.get("bytes") == stat.st_size and source.get("mtime_ns") == stat.st_mtime_ns


def build_sample_stream(prepared_dir: str | Path, task: str, split: str, history_length: int,
                        max_comments_per_record: int = 64) -> Path:
    """The memory-mapped directory of one split (converted on first use; a temporary directory then
    a rename, so concurrent workers never see half a conversion)."""
    prepared_dir = Path(prepared_dir)
    path = samples_path(prepared_dir, task, split)
    directory = prepared_dir / STREAM_DIR / f"{task}.{split}.L{history_length}.K{max_comments_per_record}"
    if _stream_is_current(directory, path):
        return directory
    directory.parent.mkdir(exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        meta = _convert_split(path, partial, task, split, history_length, max_comments_per_record)
        (partial / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        if directory.exists():
            shutil.rmtree(directory, ignore_errors=True)
        os.replace(partial, directory)
    except OSError:
        if not _stream_is_current(directory, path):  # lost a race only if the winner's copy is complete
            raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return directory


def _map(directory: Path, name: str, dtype, count: int, maps: list[mmap.mmap]) -> np.ndarray:
    """A read-only array over the file (its mapping appended to `maps`, for `SampleStream.release_pages`)."""
    if count == 0:
        return np.zeros(0, dtype=dtype)
    array, mapping = map_readonly(directory / name, dtype, count)
    maps.append(mapping)
    return array


@dataclass
class _MappedList:
    offsets: np.ndarray  # [N+1] int64
    values: np.ndarray  # int32
    width: int  # the longest list of the split
    inner_offsets: np.ndarray | None = None  # nested: [R+1] into values


class SampleStream:
    """One split of one task, memory-mapped; `take(rows)` pads just those rows (a `SampleArrays`).
    `select(rows)` is a view on a subset of the samples (row i of the view = sample rows[i]);
    `with_histories_of(donors)` a view whose row i shows the histories of row donors[i]."""

    def __init__(self, directory: Path, rows: np.ndarray | None = None, history_rows: np.ndarray | None = None):
        self.directory = Path(directory)
        self.meta = json.loads((self.directory / "meta.json").read_text())
        self.task, self.split = self.meta["task"], self.meta["split"]
        total = self.meta["rows"]
        self.rows = rows
        self.history_rows = history_rows  # the samples whose histories this view's rows show (None: their own)
        self._maps: list[mmap.mmap] = []
        self.user_all = _map(self.directory, "user_idx.values", np.int64, total, self._maps)
        self.target_all = _map(self.directory, "target_video.values", np.int64, total, self._maps)
        self.lists: dict[str, _MappedList] = {}
        for name, column in self.meta["columns"].items():
            nested = "inner_offsets" if "inner_values" in column else None
            self.lists[name] = _MappedList(
                offsets=_map(self.directory, f"{name}.offsets", np.int64, column["rows"] + 1, self._maps),
                values=_map(self.directory, f"{name}.values", np.int32,
                            column["inner_values"] if nested else column["values"], self._maps),
                width=column["width"],
                inner_offsets=_map(self.directory, f"{name}.inner_offsets", np.int64, column["values"] + 1,
                                   self._maps) if nested else None,
            )

    def release_pages(self) -> None:
        """Give back the file pages read so far (`release_mapped_pages`): without this a worker's RSS would grow
        to the whole split (KuaiComt video train: 0.6 GB per worker) for rows it reads once an epoch."""
        release_mapped_pages(self._maps)

    def __len__(self) -> int:
        return self.meta["rows"] if self.rows is None else len(self.rows)

    def _source_rows(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        return rows if self.rows is None else self.rows[rows]

    def _history_source_rows(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        return self._source_rows(rows) if self.history_rows is None else self.history_rows[rows]

    def select(self, rows: np.ndarray) -> "SampleStream":
        rows = np.asarray(rows, dtype=np.int64)
        return SampleStream(self.directory, self._source_rows(rows),
                            None if self.history_rows is None else self.history_rows[rows])

    def with_histories_of(self, donors: np.ndarray) -> "SampleStream":
        """The same samples (targets, candidates, labels), row i with the histories of row donors[i]."""
        every_row = np.arange(len(self))
        return SampleStream(self.directory, self._source_rows(every_row), self._history_source_rows(donors))

    @property
    def target_video(self) -> np.ndarray:
        return np.asarray(self.target_all if self.rows is None else self.target_all[self.rows], dtype=np.int64)

    @property
    def lengths(self) -> np.ndarray:
        """Kept history items per sample over both histories (= `history_lengths` of the arrays)."""
        out = np.zeros(len(self), dtype=np.int64)
        history_rows = self.history_rows if self.history_rows is not None else self.rows
        for name in _LAST_COLUMNS:
            counts = np.diff(np.asarray(self.lists[name].offsets))
            out += counts if history_rows is None else counts[history_rows]
        return out

    def _last(self, name: str, rows: np.ndarray) -> np.ndarray:
        column = self.lists[name]
        starts, lengths = column.offsets[rows], column.offsets[rows + 1] - column.offsets[rows]
        return gather_padded(column.values, starts, lengths, max(1, int(lengths.max(initial=0))))

    def _first(self, name: str, rows: np.ndarray) -> np.ndarray | None:
        if name not in self.lists:
            return None
        column = self.lists[name]
        starts, lengths = column.offsets[rows], column.offsets[rows + 1] - column.offsets[rows]
        return gather_padded(column.values, starts, lengths, max(1, column.width))

    def _records(self, rows: np.ndarray) -> np.ndarray:
        column = self.lists["comment_history_comments"]
        starts, kept = column.offsets[rows], column.offsets[rows + 1] - column.offsets[rows]
        width = max(1, int(kept.max(initial=0)))
        if len(column.inner_offsets) < 2:  # no comment records in the split (a video-only data set)
            return np.zeros((len(rows), width, 1), dtype=np.int64)
        slots = np.arange(width)
        valid = slots[None, :] < kept[:, None]
        record = np.where(valid, starts[:, None] + slots[None, :], 0)
        comment_starts = column.inner_offsets[record]
        comment_counts = np.where(valid, column.inner_offsets[record + 1] - comment_starts, 0)
        k = max(1, int(comment_counts.max(initial=0)))
        flat = gather_padded(column.values, comment_starts.reshape(-1), comment_counts.reshape(-1), k)
        return flat.reshape(len(rows), width, k)

    def take(self, rows: np.ndarray) -> SampleArrays:
        """The rows (of this view) as padded arrays: histories padded to the batch's longest. Copies: the
        file pages they came from are released (`release_pages`)."""
        source, history_source = self._source_rows(rows), self._history_source_rows(rows)
        arrays = SampleArrays(
            task=self.task, split=self.split,
            user=np.asarray(self.user_all[source], dtype=np.int64),
            target_video=np.asarray(self.target_all[source], dtype=np.int64),
            video_history=self._last("video_history", history_source),
            comment_history_videos=self._last("comment_history_videos", history_source),
            comment_history_comments=self._records(history_source),
            pos_comments=self._first("pos_comments", source),
            candidates=self._first("candidates", source),
            labels=self._first("labels", source),
        )
        self.release_pages()
        return arrays

    @property
    def pos_comments(self) -> np.ndarray | None:
        """All positives padded [N, P] (small: the like-prior fit reads it once)."""
        return self._first("pos_comments", self._source_rows(np.arange(len(self))))


def open_sample_stream(prepared_dir: str | Path, task: str, split: str, history_length: int,
                       max_comments_per_record: int = 64) -> SampleStream:
    """`load_sample_arrays`, streamed: converted once per node, then memory-mapped."""
    return SampleStream(build_sample_stream(prepared_dir, task, split, history_length, max_comments_per_record))


def batch_arrays(samples: "SampleArrays | SampleStream", rows: np.ndarray) -> tuple[SampleArrays, np.ndarray]:
    """(arrays, their rows) for `make_batch`: a stream pads just the batch's rows."""
    if isinstance(samples, SampleStream):
        return samples.take(rows), np.arange(len(rows))
    return samples, rows

"""Reading raw tables (CSV or Parquet) and writing stage outputs atomically."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from lsvcr.data.schema import RawTableSpec
from lsvcr.errors import ConfigError, DataError
from lsvcr.storage import SUCCESS_MARKER, promote

RAW_SUFFIXES = (".parquet", ".csv")


def find_table(raw_dir: Path, name: str) -> Path | None:
    """`raw_dir/name.parquet` or `raw_dir/name.csv` (Parquet wins when both exist)."""
    for suffix in RAW_SUFFIXES:
        path = Path(raw_dir) / f"{name}{suffix}"
        if path.is_file():
            return path
    return None


def read_table(path: Path, spec: RawTableSpec | None = None) -> pa.Table:
    """Read one CSV or Parquet table (with a spec: only the columns it uses). Columns the spec declares
    as strings are read as strings (a caption like "2023" must not become an integer); other types are
    checked by validation."""
    path = Path(path)
    try:
        if path.suffix == ".parquet":
            if spec is None:
                return pq.read_table(path)
            present = pq.read_schema(path).names
            return pq.read_table(path, columns=[name for name in present if name in spec.used])
        column_types, include_columns = {}, []
        if spec is not None:
            column_types = {f.name: f.type for f in spec.schema if pa.types.is_string(f.type)}
            with open(path, encoding="utf-8-sig", newline="") as handle:
                header = next(csv.reader(handle), [])
            include_columns = [name for name in header if name in spec.used]
        return pa_csv.read_csv(
            path,
            convert_options=pa_csv.ConvertOptions(
                column_types=column_types, strings_can_be_null=False, include_columns=include_columns),
        )
    except (pa.ArrowInvalid, OSError) as error:
        name = spec.name if spec else path.stem
        raise DataError(f"table {name}: cannot read {path}: {error}") from None


def write_parquet(table: pa.Table, path: Path, schema: pa.Schema | None = None) -> None:
    if schema is not None:
        table = table.select(schema.names).cast(schema)
    pq.write_table(table, path, compression="zstd")


def write_json(data: Any, path: Path) -> None:
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def _remove_stale_temporaries(path: Path) -> None:
    """Temporary siblings left by killed runs (their process is gone) are removed."""
    for leftover in path.parent.glob(f".{path.name}.tmp-*"):
        try:
            pid = int(leftover.name.rsplit("-", 2)[-2])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(leftover, ignore_errors=True)
        except (ValueError, PermissionError, IndexError):
            continue


@contextlib.contextmanager
def atomic_output_dir(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary sibling of `path`; on success it replaces `path`, on error it is removed.

    A killed or failed job therefore never leaves a half-written `path` behind. The finished directory
    carries the `_SUCCESS` marker of `lsvcr.storage`, written last. An existing `path` is replaced only
    if it is empty or a finished output (has `_SUCCESS`): never a directory of something else.
    """
    path = Path(path)
    if path.exists() and (not path.is_dir() or (any(path.iterdir()) and not (path / SUCCESS_MARKER).exists())):
        raise ConfigError(
            f"output {path} exists and is not a finished lsvcr output (no {SUCCESS_MARKER}); "
            "refusing to replace it: choose another --out or remove it"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    temporary = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    temporary.mkdir()
    try:
        yield temporary
        promote(temporary, path)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise

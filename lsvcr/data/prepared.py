"""Reading a PREPARED/ directory (docs/formats.md) with clear errors for what is missing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lsvcr.data import schema
from lsvcr.errors import DataError


def _path(prepared_dir: str | Path, name: str) -> Path:
    path = Path(prepared_dir) / name
    if not path.is_file():
        raise DataError(f"{path} not found: is {prepared_dir} the output of `lsvcr prepare`?")
    return path


def load_manifest(prepared_dir: str | Path) -> dict[str, Any]:
    manifest = json.loads(_path(prepared_dir, "manifest.json").read_text())
    if manifest.get("format_version") != schema.FORMAT_VERSION:
        raise DataError(f"{prepared_dir}: format_version {manifest.get('format_version')} is not "
                        f"{schema.FORMAT_VERSION}; re-run `lsvcr prepare`")
    return manifest


def _read(prepared_dir: str | Path, name: str, columns: list[str] | None = None) -> pa.Table:
    path = _path(prepared_dir, name)
    try:
        return pq.read_table(path, columns=columns)
    except (pa.ArrowInvalid, KeyError) as error:
        raise DataError(f"{path}: {error}") from None


def read_samples(
    prepared_dir: str | Path, task: str, split: str, columns: list[str] | None = None
) -> pa.Table:
    """`{task}_samples.{split}.parquet`; a DataError when the task is absent (video-only data)."""
    if task not in schema.TASKS:
        raise DataError(f"unknown task {task!r}: expected one of {', '.join(schema.TASKS)}")
    if split not in schema.SPLITS:
        raise DataError(f"unknown split {split!r}: expected one of {', '.join(schema.SPLITS)}")
    if task == "comment" and not load_manifest(prepared_dir).get("has_comments", False):
        raise DataError(f"{prepared_dir} has no comment task (has_comments: false, a video-only data set)")
    return _read(prepared_dir, f"{task}_samples.{split}.parquet", columns)


def read_videos(prepared_dir: str | Path, columns: list[str] | None = None) -> pa.Table:
    return _read(prepared_dir, "videos.parquet", columns)


def read_comments(prepared_dir: str | Path, columns: list[str] | None = None) -> pa.Table:
    if not load_manifest(prepared_dir).get("has_comments", False):
        raise DataError(f"{prepared_dir} has no comments (has_comments: false, a video-only data set)")
    return _read(prepared_dir, "comments.parquet", columns)


def read_users(prepared_dir: str | Path) -> pa.Table:
    return _read(prepared_dir, "users.parquet")


def read_user_histories(prepared_dir: str | Path) -> pa.Table:
    """Per user, the histories as of the end of the data (for serving known users)."""
    return _read(prepared_dir, "user_histories.parquet")


def latest_history(prepared_dir: str | Path, user_id: int) -> dict[str, Any]:
    """The user's most recent histories as of the end of the data, by raw `user_id`.

    Returns `{"user_idx", "user_id", "video_history", "comment_history_videos",
    "comment_history_comments"}` with the same conventions as the sample columns.
    """
    table = pq.read_table(_path(prepared_dir, "user_histories.parquet"),
                          filters=pc.field("user_id") == pa.scalar(int(user_id), pa.int64()))
    if table.num_rows == 0:
        raise DataError(f"unknown user_id {user_id} in {prepared_dir}/user_histories.parquet")
    return table.slice(0, 1).to_pylist()[0]

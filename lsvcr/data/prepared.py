"""The PREPARED/ directory (docs/formats.md): its file names, and reading it with clear errors for what is missing.

`lsvcr.data.prepare` writes the files under these names; every reader goes through here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lsvcr.data import schema
from lsvcr.errors import DataError


MANIFEST_FILE = "manifest.json"
VIDEOS_FILE = "videos.parquet"
COMMENTS_FILE = "comments.parquet"  # absent in a video-only data set
USERS_FILE = "users.parquet"
USER_HISTORIES_FILE = "user_histories.parquet"


def samples_file(task: str, split: str) -> str:
    return f"{task}_samples.{split}.parquet"


def id_map_file(name: str) -> str:
    return f"id_map.{name}.parquet"


def table_path(prepared_dir: str | Path, name: str) -> Path:
    """The path of PREPARED file `name`; a DataError when it is missing."""
    path = Path(prepared_dir) / name
    if not path.is_file():
        raise DataError(f"PREPARED table {name} not found in {prepared_dir}: is it the output of `lsvcr prepare`?")
    return path


def samples_path(prepared_dir: str | Path, task: str, split: str) -> Path:
    path = Path(prepared_dir) / samples_file(task, split)
    if not path.is_file():
        hint = " (the data set has no comments: the comment task is disabled)" if task == "comment" else ""
        raise DataError(f"PREPARED table {path.name} not found in {prepared_dir}{hint}")
    return path


def has_comments(prepared_dir: str | Path) -> bool:
    """Whether the comment table exists (a video-only data set has none)."""
    return (Path(prepared_dir) / COMMENTS_FILE).is_file()


def is_prepared(directory: str | Path) -> bool:
    """Whether `directory` holds a finished `lsvcr prepare` output (its manifest)."""
    return (Path(directory) / MANIFEST_FILE).is_file()


def require_prepared(directory: str | Path) -> None:
    if not is_prepared(directory):
        raise DataError(f"{directory} is not a PREPARED directory (no {MANIFEST_FILE}); run `lsvcr prepare` first")


def num_videos(prepared_dir: str | Path) -> int:
    return pq.read_metadata(table_path(prepared_dir, VIDEOS_FILE)).num_rows


def load_manifest(prepared_dir: str | Path) -> dict[str, Any]:
    manifest = json.loads(table_path(prepared_dir, MANIFEST_FILE).read_text())
    if manifest.get("format_version") != schema.FORMAT_VERSION:
        raise DataError(f"{prepared_dir}: format_version {manifest.get('format_version')} is not "
                        f"{schema.FORMAT_VERSION}; re-run `lsvcr prepare`")
    return manifest


def read_table(prepared_dir: str | Path, name: str, columns: list[str] | None = None) -> pa.Table:
    path = table_path(prepared_dir, name)
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
    return read_table(prepared_dir, samples_file(task, split), columns)


def read_videos(prepared_dir: str | Path, columns: list[str] | None = None) -> pa.Table:
    return read_table(prepared_dir, VIDEOS_FILE, columns)


def read_comments(prepared_dir: str | Path, columns: list[str] | None = None) -> pa.Table:
    if not load_manifest(prepared_dir).get("has_comments", False):
        raise DataError(f"{prepared_dir} has no comments (has_comments: false, a video-only data set)")
    return read_table(prepared_dir, COMMENTS_FILE, columns)


def read_users(prepared_dir: str | Path) -> pa.Table:
    return read_table(prepared_dir, USERS_FILE)


def read_user_histories(prepared_dir: str | Path) -> pa.Table:
    """Per user, the histories as of the end of the data (for serving known users)."""
    return read_table(prepared_dir, USER_HISTORIES_FILE)


def latest_history(prepared_dir: str | Path, user_id: int) -> dict[str, Any]:
    """The user's most recent histories as of the end of the data, by raw `user_id`.

    Returns `{"user_idx", "user_id", "video_history", "comment_history_videos",
    "comment_history_comments"}` with the same conventions as the sample columns.
    """
    table = pq.read_table(table_path(prepared_dir, USER_HISTORIES_FILE),
                          filters=pc.field("user_id") == pa.scalar(int(user_id), pa.int64()))
    if table.num_rows == 0:
        raise DataError(f"unknown user_id {user_id} in {prepared_dir}/{USER_HISTORIES_FILE}")
    return table.slice(0, 1).to_pylist()[0]

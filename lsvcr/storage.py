"""Stage outputs on a local path or a cloud URI (pyarrow filesystems), never a node-local assumption.

Stages read and write local directories. For a remote root (s3://, gs://, hdfs://, file://), a stage
works in a local mirror under the cache directory: `pull` brings a finished output down, `push` uploads a
finished output. A stage is finished when its `_SUCCESS` marker exists; the marker is written last, so a
killed upload is redone on the next run instead of being trusted.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from pathlib import Path

import pyarrow.fs as pafs

from lsvcr.errors import ConfigError

SUCCESS_MARKER = "_SUCCESS"


def is_remote(uri: str) -> bool:
    return "://" in uri


def cache_root() -> Path:
    return Path(os.environ.get("LSVCR_CACHE", Path.home() / ".cache" / "lsvcr"))


def join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


def _filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    try:
        return pafs.FileSystem.from_uri(uri)
    except Exception as error:  # noqa: BLE001 - pyarrow raises several types for bad URIs
        raise ConfigError(f"storage URI {uri!r} cannot be opened: {error}") from None


def local_dir(uri: str) -> Path:
    """The local directory a stage reads/writes for `uri`: the path itself, or a mirror in the cache."""
    if not is_remote(uri):
        return Path(uri)
    digest = hashlib.sha1(uri.encode()).hexdigest()[:16]
    return cache_root() / "storage" / digest


def is_finished(uri: str) -> bool:
    if not is_remote(uri):
        return (Path(uri) / SUCCESS_MARKER).exists()
    filesystem, path = _filesystem(uri)
    return filesystem.get_file_info(f"{path}/{SUCCESS_MARKER}").type == pafs.FileType.File


def mark_finished(local: Path) -> None:
    (Path(local) / SUCCESS_MARKER).write_text("")


def partial_dir(out: Path) -> Path:
    """Where a stage builds `out` before it is finished: the hidden sibling `.NAME.partial/`."""
    out = Path(out)
    return out.parent / f".{out.name}.partial"


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def promote(staging: Path, out: Path) -> None:
    """Stage then rename: mark `staging` finished (marker last) and rename it to `out`. A previous `out` is
    first renamed aside and removed after, so `out` is never a half-written directory."""
    staging, out = Path(staging), Path(out)
    mark_finished(staging)
    if out.exists():
        retired = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        out.rename(retired)
        staging.rename(out)
        remove_tree(retired)
    else:
        staging.rename(out)


def pull(uri: str) -> Path:
    """Make a finished remote output available locally; returns the local directory."""
    local = local_dir(uri)
    if not is_remote(uri) or (local / SUCCESS_MARKER).exists():
        return local
    filesystem, path = _filesystem(uri)
    if local.exists():
        shutil.rmtree(local)
    local.mkdir(parents=True)
    pafs.copy_files(path, str(local), source_filesystem=filesystem,
                    destination_filesystem=pafs.LocalFileSystem())
    return local


def push(local: Path, uri: str) -> None:
    """Upload a finished local output (marker last), a no-op for local roots."""
    if not is_remote(uri):
        return
    filesystem, path = _filesystem(uri)
    filesystem.create_dir(path, recursive=True)
    marker = Path(local) / SUCCESS_MARKER
    for file in sorted(Path(local).rglob("*")):
        if file.is_file() and file != marker:
            target = f"{path}/{file.relative_to(local).as_posix()}"
            filesystem.create_dir(target.rsplit("/", 1)[0], recursive=True)
            pafs.copy_files(str(file), target, source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=filesystem)
    with filesystem.open_output_stream(f"{path}/{SUCCESS_MARKER}") as stream:
        stream.write(b"")

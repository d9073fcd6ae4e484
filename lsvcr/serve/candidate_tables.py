"""The comment candidate table of a replica (one normalized vector per pooled comment, `ItemTables.
comment_candidate`), computed once per node and memory-mapped by every replica of the node: at KuaiComt
size 8.2M pooled comments x 64 x 4 B = 2.1 GB, held once in the page cache instead of once per replica."""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from lsvcr.serve.model_dir import LoadedModel
from lsvcr.vectors import read_vectors_manifest_if_any

log = logging.getLogger(__name__)

CACHE_DIR_ENVIRONMENT = "LSVCR_SERVE_CACHE"  # default: <temp dir>/lsvcr-serve-tables (node-local)
TABLES_KEPT = 4  # the most recently opened tables a node keeps (older model versions' tables are deleted)


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_DIR_ENVIRONMENT) or Path(tempfile.gettempdir()) / "lsvcr-serve-tables")


def _table_key(loaded: LoadedModel, pool_comments: np.ndarray) -> str:
    """What the table depends on: the weights, the text vectors and the pools."""
    digest = hashlib.sha256()
    vectors = read_vectors_manifest_if_any(loaded.vectors_dir) if loaded.vectors_dir else {}
    digest.update(json.dumps([loaded.version, str(loaded.vectors_dir), str(loaded.prepared_dir), vectors],
                             sort_keys=True, default=str).encode())
    digest.update(memoryview(np.ascontiguousarray(pool_comments, dtype=np.int64)))
    return digest.hexdigest()[:20]


def shared_comment_candidates(loaded: LoadedModel, pool_comments: np.ndarray) -> torch.Tensor:
    """`loaded.model.comment_candidate_table(pool_comments)` from the node's cache file, as a read-only
    memory map. The first replica that needs it computes it under a file lock (replicas starting together
    wait for it rather than each computing it) and writes a temporary file, then renames it. Where the
    cache cannot be written, the replica keeps its own copy."""
    directory = cache_dir()
    path = directory / f"comment_candidates-{_table_key(loaded, pool_comments)}.npy"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with open(path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not path.is_file():
                table = loaded.model.comment_candidate_table(torch.from_numpy(np.asarray(pool_comments, dtype=np.int64)))
                partial = path.with_name(f"{path.stem}.{os.getpid()}.partial")
                with partial.open("wb") as handle:
                    np.save(handle, table.numpy())
                os.replace(partial, path)
                del table
                _keep_recent_tables(directory, TABLES_KEPT)
            os.utime(path)  # recently used: kept by _keep_recent_tables
    except OSError as error:
        log.warning("comment candidate table not cached in %s (%s): this replica keeps its own copy", path, error)
        return loaded.model.comment_candidate_table(torch.from_numpy(np.asarray(pool_comments, dtype=np.int64)))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.load(path, mmap_mode="r"))


def _keep_recent_tables(directory: Path, keep: int) -> None:
    """Delete all but the `keep` most recently used tables. A replica still mapping a deleted table keeps
    reading it (the file lives until its last map closes); a new replica of that version recomputes it."""
    tables = sorted(directory.glob("comment_candidates-*.npy"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in tables[keep:]:
        old.unlink(missing_ok=True)
        old.with_suffix(".lock").unlink(missing_ok=True)

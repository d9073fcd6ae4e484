"""The comment candidate table of a replica (one normalized vector per pooled comment, `ItemTables.
comment_candidate`), computed once per node and memory-mapped by every replica of the node: at KuaiComt
size 8.2M pooled comments x 64 x 4 B = 2.1 GB, held once in the page cache instead of once per replica."""

from __future__ import annotations

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
    """`loaded.model.comment_candidate_table(pool_comments)` from the node's cache file (written by the first
    replica that needs it: a temporary file, then a rename), as a read-only memory map. Where the cache
    cannot be written, the replica keeps its own copy."""
    path = cache_dir() / f"comment_candidates-{_table_key(loaded, pool_comments)}.npy"
    if not path.is_file():
        table = loaded.model.comment_candidate_table(torch.from_numpy(np.asarray(pool_comments, dtype=np.int64)))
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f"{path.stem}.{os.getpid()}.partial")
            with partial.open("wb") as handle:
                np.save(handle, table.numpy())
            os.replace(partial, path)
        except OSError as error:
            log.warning("comment candidate table not cached in %s (%s): this replica keeps its own copy", path, error)
            return table
        del table
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.load(path, mmap_mode="r"))

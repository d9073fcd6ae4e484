"""Online serving of the fine-tuned SR backbone (METHOD 10): video retrieval and comment ranking.

The LLM is not served. A replica holds the stage-2 SR model(s), the precomputed item text vectors and
the PREPARED catalog (raw id <-> index maps, each video's comment pool, every user's latest history).

Layers, from the inside out:
- `Recommender`: plain Python + torch, testable without a cluster. It answers a *batch* of requests:
  video scoring over all items is one matrix product per batch (user vectors [B, d] @ the precomputed,
  L2-normalized item matrix [V, d]^T, then top-k), comment scoring is one batched product against the
  target videos' comment pools.
- `RecommenderModel` (Ray Serve deployment): the `Recommender` behind `@serve.batch`, autoscaled.
- `Gateway` (Ray Serve FastAPI ingress): parses and validates JSON, calls the model deployment, turns
  every bad input into a 4xx `{"error": {"field", "message"}}` (never a 500).

Scores are the model's logits, cos(u, item) / temperature (METHOD 2.7), so a served ranking is exactly the
offline model's ranking on the same history.

Cold videos (new uploads): a video that has a text vector in VECTORS/ but no row in the model's ID table
is still scored, through the text-only candidate path `gate * 0 + A(e^t)` (METHOD 10, "covers ID-less
cold-start videos through the text path"). Cold videos can be recommended; they cannot appear in a
request's history (the history encoder needs the ID embedding), which is a 422 naming the item.

Error contract (status, field):
| case | status | field |
|---|---|---|
| body is not JSON / not an object | 400 | `body` |
| body larger than `serve.max_body_bytes` | 413 | `body` |
| wrong type, unknown key | 422 | the offending field, e.g. `comment_history[0].video_id` |
| k outside 1..`serve.max_k` | 422 | `k` |
| no user_id and no history | 422 | `user_id` |
| history longer than `serve.max_history_items` | 413 | `video_history` / `comment_history` / `comment_history[i].comment_ids` |
| unknown user_id | 404 | `user_id` |
| unknown video / comment id in a history | 422 | e.g. `video_history[3]` |
| comment request: unknown video, or a video without comments | 404 / 422 | `video_id` |
| endpoint whose model is not loaded | 404 | `endpoint` |
Histories longer than the model's limit (`finetune.history_length` of the MODEL dir) keep the newest
items; the response says so under `truncated`.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError

from lsvcr.config import LSVCRConfig, ServeConfig, load_config
from lsvcr.errors import ConfigError, DataError, ModelNotFoundError

log = logging.getLogger("lsvcr.serving")

APP_NAME = "lsvcr"
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

# ----------------------------------------------------------------------------------------------------
# Request schemas (wrong types are rejected, never coerced: "5" is not a video id)

RawId = Annotated[StrictInt, Field(ge=INT64_MIN, le=INT64_MAX)]


class CommentRecord(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    video_id: RawId
    comment_ids: list[RawId]


class VideoRequest(BaseModel):
    """`POST /v1/recommend/videos`. An explicit history replaces the stored one of `user_id`."""

    model_config = ConfigDict(extra="forbid", strict=True)
    user_id: RawId | None = None
    video_history: list[RawId] | None = None
    comment_history: list[CommentRecord] | None = None
    k: StrictInt = 10
    exclude_seen: StrictBool = True


class CommentRequest(VideoRequest):
    """`POST /v1/recommend/comments`: rank the comment pool of `video_id` (the video being watched)."""

    video_id: RawId


@dataclass
class RequestError:
    """A rejected request: returned (not raised) per item so one bad request never fails its batch."""

    status: int
    field: str | None
    message: str

    def to_json(self) -> dict[str, Any]:
        return {"error": {"field": self.field, "message": self.message}}


class RequestRejected(Exception):
    def __init__(self, status: int, field: str | None, message: str):
        super().__init__(message)
        self.error = RequestError(status, field, message)


def _pydantic_field(location: tuple) -> str:
    name = ""
    for part in location:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    return name or "body"


def parse_request(body: bytes, schema: type[VideoRequest], serve_config: ServeConfig) -> VideoRequest:
    """Raw HTTP body -> validated request, or `RequestRejected` naming the field."""
    if len(body) > serve_config.max_body_bytes:
        raise RequestRejected(413, "body", f"body of {len(body)} bytes exceeds max_body_bytes={serve_config.max_body_bytes}")
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RequestRejected(400, "body", f"body is not valid JSON: {error}") from None
    if not isinstance(payload, dict):
        raise RequestRejected(400, "body", "body must be a JSON object")
    try:
        request = schema.model_validate(payload)
    except ValidationError as error:
        first = error.errors()[0]
        field_name = _pydantic_field(first["loc"])
        raise RequestRejected(422, field_name, f"{field_name}: {first['msg']}") from None
    if not 1 <= request.k <= serve_config.max_k:
        raise RequestRejected(422, "k", f"k must be in 1..{serve_config.max_k}; got {request.k}")
    limit = serve_config.max_history_items
    if request.video_history is not None and len(request.video_history) > limit:
        raise RequestRejected(413, "video_history", f"video_history has {len(request.video_history)} items; the limit is max_history_items={limit}")
    if request.comment_history is not None:
        if len(request.comment_history) > limit:
            raise RequestRejected(413, "comment_history", f"comment_history has {len(request.comment_history)} records; the limit is max_history_items={limit}")
        for i, record in enumerate(request.comment_history):
            if len(record.comment_ids) > limit:
                raise RequestRejected(413, f"comment_history[{i}].comment_ids", f"{len(record.comment_ids)} comment ids; the limit is max_history_items={limit}")
    if request.user_id is None and not request.video_history and not request.comment_history:
        raise RequestRejected(422, "user_id", "give a user_id or a non-empty video_history / comment_history")
    return request


# ----------------------------------------------------------------------------------------------------
# The catalog: raw id <-> index maps, comment pools, stored user histories (PREPARED/, docs/formats.md)


class IdIndex:
    """Vectorised raw-id -> dense-index lookup. `ids_by_index[i]` is the raw id of index i (i >= 1)."""

    def __init__(self, ids_by_index: np.ndarray):
        ids = np.asarray(ids_by_index[1:], dtype=np.int64)
        order = np.argsort(ids, kind="stable")
        self.sorted_ids = ids[order]
        self.indices = (order + 1).astype(np.int64)

    def __len__(self) -> int:
        return len(self.sorted_ids)

    def lookup(self, raw_ids: Any) -> np.ndarray:
        """Index of each raw id; 0 where the id is unknown."""
        raw = np.asarray(raw_ids, dtype=np.int64).reshape(-1)
        if len(self.sorted_ids) == 0:
            return np.zeros(len(raw), dtype=np.int64)
        position = np.searchsorted(self.sorted_ids, raw).clip(max=len(self.sorted_ids) - 1)
        return np.where(self.sorted_ids[position] == raw, self.indices[position], 0)


def _list_column(column) -> tuple[np.ndarray, np.ndarray]:
    """A list<int> Arrow column as (offsets [N+1] starting at 0, flat values), without a Python loop."""
    column = column.combine_chunks() if hasattr(column, "combine_chunks") else column
    offsets = column.offsets.to_numpy().astype(np.int64)
    values = column.flatten().to_numpy(zero_copy_only=False)
    return offsets - offsets[0], values


@dataclass
class UserHistory:
    """One user's history in index space (chronological, oldest first)."""

    video_history: np.ndarray
    comment_history_videos: np.ndarray
    comment_history_comments: list[np.ndarray]


class Catalog:
    """What a replica needs from PREPARED/: id maps, each video's comment pool, stored user histories."""

    def __init__(self, prepared_dir: str | Path):
        self.prepared_dir = Path(prepared_dir)
        videos = pq.read_table(self.prepared_dir / "videos.parquet",
                               columns=["video_idx", "video_id", "hot_comments"]).sort_by("video_idx")
        self.num_videos = videos.num_rows
        self.video_ids = np.concatenate([[0], videos.column("video_id").to_numpy()]).astype(np.int64)
        self.video_index = IdIndex(self.video_ids)
        pool_offsets, pool_values = _list_column(videos.column("hot_comments"))
        self.pool_offsets = np.concatenate([[0], pool_offsets])  # video_idx i -> pool_offsets[i]:[i+1]
        self.pool_comments = pool_values
        pool_sizes = np.diff(self.pool_offsets)
        self.hot_comment = np.zeros(self.num_videos + 1, dtype=np.int64)  # comment_list[0] (METHOD 2.2, eval)
        self.hot_comment[pool_sizes > 0] = pool_values[self.pool_offsets[:-1][pool_sizes > 0]]

        comments_path = self.prepared_dir / "comments.parquet"
        if comments_path.exists():
            comments = pq.read_table(comments_path, columns=["comment_idx", "comment_id", "video_idx"]).sort_by("comment_idx")
            self.comment_ids = np.concatenate([[0], comments.column("comment_id").to_numpy()]).astype(np.int64)
            self.comment_video = np.concatenate([[0], comments.column("video_idx").to_numpy()]).astype(np.int64)
        else:
            self.comment_ids = np.zeros(1, dtype=np.int64)
            self.comment_video = np.zeros(1, dtype=np.int64)
        self.comment_index = IdIndex(self.comment_ids)
        self._load_user_histories()

    def _load_user_histories(self) -> None:
        """The stored end-of-data history of every user, kept as flat Arrow-style arrays."""
        path = self.prepared_dir / "user_histories.parquet"
        if not path.exists():
            raise DataError(f"{path} is missing: re-run `lsvcr prepare` (serving needs each user's latest history)")
        table = pq.read_table(path)
        self.user_ids = table.column("user_id").to_numpy().astype(np.int64)
        self.user_index = IdIndex(np.concatenate([[0], self.user_ids]))
        self._video_offsets, self._video_values = _list_column(table.column("video_history"))
        self._record_offsets, self._record_videos = _list_column(table.column("comment_history_videos"))
        nested = table.column("comment_history_comments").combine_chunks()
        self._comment_offsets, self._comment_values = _list_column(nested.flatten())

    def user_history(self, user_id: int) -> UserHistory | None:
        row = int(self.user_index.lookup([user_id])[0]) - 1
        if row < 0:
            return None
        videos = self._video_values[self._video_offsets[row]:self._video_offsets[row + 1]]
        start, end = self._record_offsets[row], self._record_offsets[row + 1]
        offsets = self._comment_offsets[start:end + 1]
        values = self._comment_values
        return UserHistory(
            video_history=videos,
            comment_history_videos=self._record_videos[start:end],
            comment_history_comments=[values[a:b] for a, b in zip(offsets[:-1], offsets[1:])],
        )

    def comment_pool(self, video_idx: int) -> np.ndarray:
        return self.pool_comments[self.pool_offsets[video_idx]:self.pool_offsets[video_idx + 1]]

    def example_video_id(self) -> int | None:
        """A video with a comment pool (a valid `video_id` of a comment request)."""
        with_comments = np.flatnonzero(np.diff(self.pool_offsets)[1:] > 0)
        return int(self.video_ids[with_comments[0] + 1]) if len(with_comments) else None

    def example_user_id(self) -> int | None:
        return int(self.user_ids[0]) if len(self.user_ids) else None


# ----------------------------------------------------------------------------------------------------
# Loading MODEL/ dirs (docs/formats.md)


@dataclass
class LoadedModel:
    task: str  # video | comment
    model_dir: Path
    model: Any  # lsvcr.model.LSVCRModel, in eval mode
    config: LSVCRConfig
    prepared_dir: Path
    vectors_dir: Path | None  # None for ID-only models
    history_length: int  # histories are truncated to the newest `history_length` items
    comments_per_record: int
    metrics: dict[str, Any]
    version: str  # content hash of model.pt

    def describe(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "version": self.version,
            "checkpoint": str(self.model_dir / "model.pt"),
            "prepared": str(self.prepared_dir),
            "vectors": str(self.vectors_dir) if self.vectors_dir else None,
            "mode": self.config.model.mode,
            "history_length": self.history_length,
            "comments_per_record": self.comments_per_record,
            "protocol": self.metrics.get("protocol"),
            "metrics": {split: self.metrics.get(split) for split in ("valid", "test") if split in self.metrics},
            "full_ranking": self.metrics.get("full_ranking"),
            "best_epoch": self.metrics.get("best_epoch"),
        }


def _file_hash(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def load_model_dir(model_dir: str | Path, expected_task: str) -> LoadedModel:
    """A MODEL/ dir of `lsvcr finetune` (local or URI) -> the SR model in eval mode, with the text
    tables of the PREPARED/ + VECTORS/ named in its inputs.json (via `lsvcr.evaluate.load_trained_model`)."""
    from lsvcr import storage
    from lsvcr.evaluate import load_trained_model

    model_dir = (storage.pull(str(model_dir)) if storage.is_remote(str(model_dir)) else Path(model_dir)).resolve()
    trained = load_trained_model(model_dir)
    if trained.task != expected_task:
        raise ConfigError(f"{model_dir} holds a {trained.task!r} model; --{expected_task}-model needs a {expected_task!r} model")
    if trained.config.model.architecture != "lsvcr":
        raise ConfigError(f"{model_dir} holds a {trained.config.model.architecture!r} baseline; serving runs the LSVCR backbone")
    metrics_path = model_dir / "metrics.json"
    return LoadedModel(
        task=trained.task,
        model_dir=model_dir,
        model=trained.model,
        config=trained.config,
        prepared_dir=trained.data_dir.resolve(),
        vectors_dir=trained.vectors_dir.resolve() if trained.vectors_dir else None,
        history_length=min(trained.config.finetune.history_length, trained.config.model.max_position),
        comments_per_record=trained.config.data.max_comments_per_record,
        metrics=json.loads(metrics_path.read_text()) if metrics_path.is_file() else {},
        version=_file_hash(model_dir / "model.pt"),
    )


def read_cold_video_vectors(vectors_dir: Path, catalog: Catalog) -> tuple[np.ndarray, torch.Tensor]:
    """Videos with a text vector in VECTORS/ but no index in PREPARED/ (uploaded after training):
    their raw ids and text vectors, scored through the text-only candidate path."""
    from lsvcr.vectors import _read_vector_file

    table = _read_vector_file(Path(vectors_dir), "videos", "video_id")
    ids = table.column("video_id").to_numpy().astype(np.int64)
    cold = np.flatnonzero(catalog.video_index.lookup(ids) == 0)
    vectors = table.column("vector").combine_chunks().take(cold)
    dim = vectors.type.list_size
    text = np.nan_to_num(vectors.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, dim))
    return ids[cold], torch.from_numpy(text)


# ----------------------------------------------------------------------------------------------------
# The recommender (no Serve needed)


@dataclass
class ResolvedRequest:
    """A validated request in index space, its history truncated to the model's limit."""

    video_history: np.ndarray
    comment_history_videos: np.ndarray
    comment_history_comments: list[np.ndarray]
    seen_videos: np.ndarray  # every history video (before truncation): masked when exclude_seen
    seen_comments: np.ndarray
    truncated: dict[str, dict[str, int]]
    k: int
    exclude_seen: bool
    current_video: int = 0  # comment requests: the video being watched


def _pad_rows(rows: list[np.ndarray], min_width: int = 1) -> np.ndarray:
    """Right-pad 1-D integer arrays with 0 into [len(rows), width] (vectorised scatter)."""
    lengths = np.array([len(row) for row in rows], dtype=np.int64)
    out = np.zeros((len(rows), max(min_width, int(lengths.max(initial=0)))), dtype=np.int64)
    if lengths.sum():
        row_index = np.repeat(np.arange(len(rows)), lengths)
        column_index = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        out[row_index, column_index] = np.concatenate(rows)
    return out


def build_history_batch(resolved: list[ResolvedRequest], hot_comment: np.ndarray):
    """Index-space histories -> the model's padded `HistoryBatch` (right-padded, oldest first)."""
    from lsvcr.model import HistoryBatch

    video_history = _pad_rows([r.video_history for r in resolved])
    record_videos = _pad_rows([r.comment_history_videos for r in resolved])
    records = [record for r in resolved for record in r.comment_history_comments]
    per_record = _pad_rows(records) if records else np.zeros((0, 1), dtype=np.int64)
    record_comments = np.zeros((len(resolved), record_videos.shape[1], per_record.shape[1]), dtype=np.int64)
    record_counts = np.array([len(r.comment_history_comments) for r in resolved])
    if len(records):
        row_index = np.repeat(np.arange(len(resolved)), record_counts)
        slot_index = np.arange(len(records)) - np.repeat(np.cumsum(record_counts) - record_counts, record_counts)
        record_comments[row_index, slot_index] = per_record
    return HistoryBatch(
        video_history=torch.from_numpy(video_history),
        video_history_hot_comment=torch.from_numpy(hot_comment[video_history]),
        comment_history_videos=torch.from_numpy(record_videos),
        comment_history_comments=torch.from_numpy(record_comments),
    )


class Recommender:
    """Video retrieval and comment ranking for batches of requests, from MODEL/ dirs.

    `recommend_videos` / `recommend_comments` take a list of validated `VideoRequest` /
    `CommentRequest` and return, per request and in order, either a response dict
    `{"items": [...], "truncated": {...}, "model": {...}}` or a `RequestError` (a bad request never
    fails the others of its batch).
    """

    def __init__(self, video: LoadedModel | None, comment: LoadedModel | None, catalog: Catalog,
                 cold_video_ids: np.ndarray | None = None, cold_video_text: torch.Tensor | None = None):
        if video is None and comment is None:
            raise ConfigError("serving needs at least one model: give --video-model and/or --comment-model")
        self.video = video
        self.comment = comment
        self.catalog = catalog
        self.cold_video_ids = np.zeros(0, dtype=np.int64) if cold_video_ids is None else cold_video_ids
        self.row_video_ids = catalog.video_ids  # matrix row -> raw video id
        self.video_matrix = None
        if video is not None:
            self._build_video_matrix(cold_video_text)

    @classmethod
    def from_model_dirs(cls, video_model_dir: str | Path | None, comment_model_dir: str | Path | None) -> "Recommender":
        video = load_model_dir(video_model_dir, "video") if video_model_dir else None
        comment = load_model_dir(comment_model_dir, "comment") if comment_model_dir else None
        models = [m for m in (video, comment) if m is not None]
        if not models:
            raise ConfigError("serving needs at least one model: give --video-model and/or --comment-model")
        prepared = {m.prepared_dir.resolve() for m in models}
        if len(prepared) > 1:
            raise ConfigError(f"the video and comment models were trained on different PREPARED dirs: {sorted(map(str, prepared))}")
        catalog = Catalog(models[0].prepared_dir)
        cold_ids, cold_text = (None, None)
        if video is not None and video.model.use_text and video.vectors_dir is not None:
            cold_ids, cold_text = read_cold_video_vectors(video.vectors_dir, catalog)
        return cls(video, comment, catalog, cold_ids, cold_text)

    # ---------------------------------------------------------------- the serving item matrix

    @torch.inference_mode()
    def _build_video_matrix(self, cold_video_text: torch.Tensor | None) -> None:
        """Normalized candidate vectors of every known video (row = video_idx, row 0 = pad) followed by
        the cold videos' text-only vectors: gate*0 + A(e^t), i.e. the candidate path without an ID."""
        model = self.video.model
        known = model.video_candidate_vectors(None)
        if cold_video_text is not None and len(cold_video_text):
            cold = F.normalize(model.llm_adapter(cold_video_text.float()), dim=-1)
            known = torch.cat([known, cold], dim=0)
            self.row_video_ids = np.concatenate([self.catalog.video_ids, self.cold_video_ids])
        self.video_matrix = known.contiguous()

    # ---------------------------------------------------------------- request -> index space

    def _lookup_videos(self, raw_ids: list[int], field_name: str) -> np.ndarray:
        indices = self.catalog.video_index.lookup(raw_ids)
        unknown = np.flatnonzero(indices == 0)
        if len(unknown):
            i = int(unknown[0])
            cold = np.isin(raw_ids[i], self.cold_video_ids)
            reason = ("is a new video without an ID embedding: it can be recommended but not used in a history"
                      if cold else "is not a known video")
            raise RequestRejected(422, f"{field_name}[{i}]", f"video_id {raw_ids[i]} {reason}")
        return indices

    def _resolve(self, request: VideoRequest, loaded: LoadedModel) -> ResolvedRequest:
        stored = None
        if request.user_id is not None and (request.video_history is None or request.comment_history is None):
            stored = self.catalog.user_history(request.user_id)
            if stored is None:
                raise RequestRejected(404, "user_id", f"unknown user_id {request.user_id}")

        if stored is None:  # no user_id, or both histories given: a missing one is empty
            stored = UserHistory(np.zeros(0, np.int64), np.zeros(0, np.int64), [])
        if request.video_history is not None:
            video_history = self._lookup_videos(request.video_history, "video_history")
        else:
            video_history = stored.video_history

        if request.comment_history is not None:
            record_videos = self._lookup_videos([r.video_id for r in request.comment_history], "comment_history")
            record_comments = []
            for i, record in enumerate(request.comment_history):
                comment_idx = self.catalog.comment_index.lookup(record.comment_ids)
                bad = np.flatnonzero((comment_idx == 0) | (self.catalog.comment_video[comment_idx] != record_videos[i]))
                if len(bad):
                    j = int(bad[0])
                    problem = "is not a known comment" if comment_idx[j] == 0 else f"is not a comment of video_id {record.video_id}"
                    raise RequestRejected(422, f"comment_history[{i}].comment_ids[{j}]", f"comment_id {record.comment_ids[j]} {problem}")
                record_comments.append(comment_idx)
        else:
            record_videos, record_comments = stored.comment_history_videos, stored.comment_history_comments

        if len(video_history) == 0 and len(record_videos) == 0:
            raise RequestRejected(422, "video_history", "the history is empty: give a non-empty video_history or comment_history")

        truncated: dict[str, dict[str, int]] = {}
        limit = loaded.history_length
        if len(video_history) > limit:
            truncated["video_history"] = {"given": len(video_history), "kept": limit}
        if len(record_videos) > limit:
            truncated["comment_history"] = {"given": len(record_videos), "kept": limit}
        kept_records = record_comments[-limit:]
        per_record = loaded.comments_per_record
        if any(len(c) > per_record for c in kept_records):
            truncated["comment_ids_per_record"] = {"given": max(len(c) for c in kept_records), "kept": per_record}
        return ResolvedRequest(
            video_history=np.asarray(video_history[-limit:], dtype=np.int64),
            comment_history_videos=np.asarray(record_videos[-limit:], dtype=np.int64),
            comment_history_comments=[np.asarray(c[:per_record], dtype=np.int64) for c in kept_records],  # as batching.py
            seen_videos=np.unique(np.concatenate([video_history, record_videos]).astype(np.int64)),
            seen_comments=np.unique(np.concatenate([np.zeros(0, np.int64), *record_comments]).astype(np.int64)),
            truncated=truncated,
            k=request.k,
            exclude_seen=request.exclude_seen,
        )

    def _resolve_all(self, requests: list, loaded: LoadedModel | None, endpoint: str, extra=None):
        results: list[Any] = [None] * len(requests)
        resolved: list[ResolvedRequest] = []
        positions: list[int] = []
        for position, request in enumerate(requests):
            try:
                if loaded is None:
                    raise RequestRejected(404, "endpoint", f"no {endpoint} model is loaded: start the server with --{endpoint}-model DIR")
                item = self._resolve(request, loaded)
                if extra is not None:
                    extra(request, item)
                resolved.append(item)
                positions.append(position)
            except RequestRejected as rejected:
                results[position] = rejected.error
        return results, resolved, positions

    # ---------------------------------------------------------------- scoring

    @torch.inference_mode()
    def recommend_videos(self, requests: list[VideoRequest]) -> list[dict[str, Any] | RequestError]:
        results, resolved, positions = self._resolve_all(requests, self.video, "video")
        if not resolved:
            return results
        model = self.video.model
        states = model.encode_histories(build_history_batch(resolved, self.catalog.hot_comment), outputs=("video",))
        users = F.normalize(model.video_user_vector(states), dim=-1) / model.config.temperature  # tau folded in
        scores = users @ self.video_matrix.T  # ONE product for the whole batch: [B, d] @ [d, V]
        scores[:, 0] = float("-inf")  # padding row
        self._mask(scores, [r.seen_videos if r.exclude_seen else np.zeros(0, np.int64) for r in resolved])
        top_scores, top_rows = torch.topk(scores, min(max(r.k for r in resolved), scores.shape[1]), dim=1)
        top_ids = self.row_video_ids[top_rows.numpy()]
        for row, (position, item) in enumerate(zip(positions, resolved)):
            results[position] = self._response(top_ids[row], top_scores[row], item, "video_id", self.video)
        return results

    @torch.inference_mode()
    def recommend_comments(self, requests: list[CommentRequest]) -> list[dict[str, Any] | RequestError]:
        def set_current_video(request: CommentRequest, item: ResolvedRequest) -> None:
            video_idx = int(self.catalog.video_index.lookup([request.video_id])[0])
            if video_idx == 0:
                raise RequestRejected(404, "video_id", f"unknown video_id {request.video_id}")
            if len(self.catalog.comment_pool(video_idx)) == 0:
                raise RequestRejected(422, "video_id", f"video_id {request.video_id} has no comments to rank")
            item.current_video = video_idx

        results, resolved, positions = self._resolve_all(requests, self.comment, "comment", set_current_video)
        if not resolved:
            return results
        model = self.comment.model
        current_video = torch.tensor([r.current_video for r in resolved])
        pools = torch.from_numpy(_pad_rows([self.catalog.comment_pool(r.current_video) for r in resolved]))
        # The model's own scoring (cosine/τ, plus the like prior when the model has one); pad → -inf.
        scores = model.score_comments(build_history_batch(resolved, self.catalog.hot_comment), current_video, pools)
        seen_columns = [np.flatnonzero(np.isin(pools[row].numpy(), r.seen_comments)) if r.exclude_seen else np.zeros(0, np.int64)
                        for row, r in enumerate(resolved)]
        self._mask(scores, seen_columns)
        top_scores, top_columns = torch.topk(scores, min(max(r.k for r in resolved), scores.shape[1]), dim=1)
        top_ids = self.catalog.comment_ids[torch.gather(pools, 1, top_columns).numpy()]
        for row, (position, item) in enumerate(zip(positions, resolved)):
            results[position] = self._response(top_ids[row], top_scores[row], item, "comment_id", self.comment)
        return results

    @staticmethod
    def _mask(scores: torch.Tensor, columns_per_row: list[np.ndarray]) -> None:
        counts = np.array([len(c) for c in columns_per_row])
        if counts.sum():
            rows = torch.from_numpy(np.repeat(np.arange(len(columns_per_row)), counts))
            scores[rows, torch.from_numpy(np.concatenate(columns_per_row).astype(np.int64))] = float("-inf")

    @staticmethod
    def _response(ids: np.ndarray, scores: torch.Tensor, item: ResolvedRequest, id_name: str,
                  loaded: LoadedModel) -> dict[str, Any]:
        keep = torch.isfinite(scores[: item.k]).numpy()
        return {
            "items": [{id_name: int(i), "score": float(s)}
                      for i, s in zip(ids[: item.k][keep].tolist(), scores[: item.k][keep].tolist())],
            "truncated": item.truncated,
            "model": {"task": loaded.task, "version": loaded.version},
        }

    def describe(self) -> dict[str, Any]:
        return {
            "models": {m.task: m.describe() for m in (self.video, self.comment) if m is not None},
            "catalog": {
                "prepared": str(self.catalog.prepared_dir),
                "videos": self.catalog.num_videos,
                "cold_videos": int(len(self.cold_video_ids)),
                "comments": int(len(self.catalog.comment_ids) - 1),
                "users": int(len(self.catalog.user_ids)),
                "example_user_id": self.catalog.example_user_id(),
                "example_video_id": self.catalog.example_video_id(),
            },
        }


# ----------------------------------------------------------------------------------------------------
# Ray Serve: a FastAPI ingress + a batched, autoscaled model deployment

from fastapi import FastAPI, Request  # noqa: E402
from fastapi.responses import JSONResponse  # noqa: E402
from ray import serve  # noqa: E402

api = FastAPI(title="LSVCR recommendation API", version="1")


@serve.deployment(name="RecommenderModel")
class RecommenderModel:
    """One replica = one `Recommender` (SR model(s) + item vectors + catalog). Requests from many
    HTTP connections are gathered by `@serve.batch` so one forward pass serves a batch."""

    def __init__(self, video_model_dir: str | None, comment_model_dir: str | None, serve_config: dict):
        from lsvcr.runtime import set_threads

        set_threads(1)  # a replica owns a fraction of a core on a small machine (STACK.md)
        config = ServeConfig(**serve_config)
        self.recommender = Recommender.from_model_dirs(video_model_dir, comment_model_dir)
        for handler in (self.recommend_videos, self.recommend_comments):
            handler.set_max_batch_size(config.max_batch_size)
            handler.set_batch_wait_timeout_s(config.batch_wait_timeout_s)
        self.batches = {"video": [0, 0], "comment": [0, 0]}  # task -> [batches, requests] of this replica

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def recommend_videos(self, requests: list[VideoRequest]) -> list[dict | RequestError]:
        self.batches["video"][0] += 1
        self.batches["video"][1] += len(requests)
        return self.recommender.recommend_videos(requests)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def recommend_comments(self, requests: list[CommentRequest]) -> list[dict | RequestError]:
        self.batches["comment"][0] += 1
        self.batches["comment"][1] += len(requests)
        return self.recommender.recommend_comments(requests)

    def describe(self) -> dict[str, Any]:
        batching = {task: {"batches": batches, "requests": requests,
                           "mean_batch_size": round(requests / batches, 2) if batches else None}
                    for task, (batches, requests) in self.batches.items()}
        return {**self.recommender.describe(), "replica_batching": batching}

    def ping(self) -> bool:
        return True


def _error_response(error: RequestError) -> JSONResponse:
    return JSONResponse(error.to_json(), status_code=error.status)


def _package_version() -> str:
    # Defined before `Gateway`: `serve.ingress` pickles the FastAPI app (and the globals its routes
    # use) when the class is defined.
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lsvcr")
    except PackageNotFoundError:
        return "unknown"


@serve.deployment(name="Gateway")
@serve.ingress(api)
class Gateway:
    """HTTP ingress: body limits, JSON and schema validation, then the model deployment."""

    def __init__(self, model, serve_config: dict):
        self.model = model
        self.config = ServeConfig(**serve_config)

    async def _call(self, method: str, request: Request, schema: type[VideoRequest]) -> JSONResponse:
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length")
        too_large = RequestError(413, "body", f"body exceeds max_body_bytes={limit}")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return _error_response(too_large)
        body = bytearray()
        async for chunk in request.stream():  # chunked bodies have no length: stop reading at the limit
            body += chunk
            if len(body) > limit:
                return _error_response(too_large)
        try:
            parsed = parse_request(bytes(body), schema, self.config)
        except RequestRejected as rejected:
            return _error_response(rejected.error)
        result = await self._remote_with_retry(method, parsed)
        if isinstance(result, RequestError):
            return _error_response(result)
        return JSONResponse(result)

    async def _remote_with_retry(self, method: str, *args) -> Any:
        """Retry a read-only call whose replica died under it (e.g. killed or preempted): the router
        sends the retry to a live replica, or holds it until the replacement is up."""
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

        for attempt in range(3):
            try:
                return await getattr(self.model, method).remote(*args)
            except (ActorDiedError, ActorUnavailableError, RayActorError):
                if attempt == 2:
                    return RequestError(503, None, "the model replica is unavailable; retry shortly")
                log.warning("model replica died during %s; retrying", method)
            except Exception as error:  # noqa: BLE001 - a server bug: still a JSON error, logged with its trace
                log.exception("%s failed", method)
                return RequestError(500, None, f"internal error: {type(error).__name__}")

    @api.post("/v1/recommend/videos")
    async def recommend_videos(self, request: Request) -> JSONResponse:
        return await self._call("recommend_videos", request, VideoRequest)

    @api.post("/v1/recommend/comments")
    async def recommend_comments(self, request: Request) -> JSONResponse:
        return await self._call("recommend_comments", request, CommentRequest)

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        alive = await self._remote_with_retry("ping")
        if alive is True:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "unavailable"}, status_code=503)

    @api.get("/v1/model")
    async def model_info(self) -> JSONResponse:
        import ray

        info = await self._remote_with_retry("describe")
        if isinstance(info, RequestError):
            return _error_response(info)
        info["versions"] = {"lsvcr": _package_version(), "ray": ray.__version__, "torch": torch.__version__}
        info["serve"] = {k: getattr(self.config, k) for k in ("max_batch_size", "batch_wait_timeout_s", "max_k",
                                                                "max_history_items", "max_body_bytes")}
        return JSONResponse(info)


def check_model_dir(model_dir: str | Path, task: str) -> None:
    """Cheap checks in the driver, so a wrong path fails with one line before any replica starts."""
    from lsvcr import storage

    if storage.is_remote(str(model_dir)):
        return  # pulled and checked by the replicas
    model_dir = Path(model_dir)
    if not (model_dir / "model.pt").is_file():
        raise ModelNotFoundError(f"--{task}-model {model_dir}: no model.pt (is this a MODEL dir of `lsvcr finetune`?)")
    found = torch.load(model_dir / "model.pt", map_location="cpu", weights_only=False).get("task")
    if found != task:
        raise ConfigError(f"--{task}-model {model_dir} holds a {found!r} model")
    inputs_path = model_dir / "inputs.json"
    inputs = json.loads(inputs_path.read_text()) if inputs_path.is_file() else {}
    for key in ("data", "vectors"):
        value = inputs.get(key)
        if value and not storage.is_remote(value) and not Path(value).is_dir():
            raise DataError(f"{inputs_path}: the {key} dir {value} does not exist")
    if not inputs.get("data"):
        raise DataError(f"{inputs_path} names no PREPARED dir ('data'): the catalog cannot be loaded")


def build_application(video_model_dir: str | None, comment_model_dir: str | None, serve_config: ServeConfig):
    """Bind the two deployments with the resources and autoscaling of `serve_config`."""
    if not video_model_dir and not comment_model_dir:
        raise ConfigError("serving needs at least one model: give --video-model and/or --comment-model")
    for task, model_dir in (("video", video_model_dir), ("comment", comment_model_dir)):
        if model_dir:
            check_model_dir(model_dir, task)
    settings = {f: getattr(serve_config, f) for f in serve_config.__dataclass_fields__}
    model = RecommenderModel.options(
        autoscaling_config={
            "min_replicas": serve_config.min_replicas,
            "max_replicas": serve_config.max_replicas,
            "target_ongoing_requests": serve_config.target_ongoing_requests,
        },
        # Enough in flight per replica for @serve.batch to fill a batch.
        max_ongoing_requests=max(2 * serve_config.max_batch_size, 8),
        ray_actor_options={"num_cpus": serve_config.num_cpus_per_replica},
    ).bind(
        str(Path(video_model_dir).resolve()) if video_model_dir else None,
        str(Path(comment_model_dir).resolve()) if comment_model_dir else None,
        settings,
    )
    gateway = Gateway.options(
        ray_actor_options={"num_cpus": 0},  # I/O only: the proxy-like ingress must not hold a core
        max_ongoing_requests=max(4 * serve_config.max_batch_size, 64),
    )
    return gateway.bind(model, settings)


def build_app(args: dict[str, Any]):
    """Ray Serve application builder (`import_path: serve.app:app` with `args:` in serve/config.yaml).

    args: `video_model` / `comment_model` (MODEL dirs, either optional), `config` (an LSVCR YAML file
    whose `serve:` section is used) and `overrides` (a list of `section.key=value`).
    """
    known = {"video_model", "comment_model", "config", "overrides"}
    unknown = set(args) - known
    if unknown:
        raise ConfigError(f"unknown Serve application arg(s) {sorted(unknown)} (known: {sorted(known)})")
    config = load_config(args.get("config"), list(args.get("overrides") or []))
    return build_application(args.get("video_model"), args.get("comment_model"), config.serve)


def start_serving(video_model_dir: str | Path | None, comment_model_dir: str | Path | None,
                  config: LSVCRConfig | ServeConfig | None = None) -> str:
    """Start Serve on this Ray cluster (starting a local one if needed) and return the base URL."""
    from lsvcr.runtime import ensure_ray

    serve_config = config.serve if isinstance(config, LSVCRConfig) else (config or ServeConfig())
    application = build_application(
        str(video_model_dir) if video_model_dir else None,
        str(comment_model_dir) if comment_model_dir else None,
        serve_config,
    )
    ensure_ray()
    serve.start(http_options={"host": serve_config.host, "port": serve_config.port})
    serve.run(application, name=APP_NAME, route_prefix="/")
    base_url = f"http://{serve_config.host}:{serve_config.port}"
    _wait_until_healthy(base_url)
    return base_url


def _wait_until_healthy(base_url: str, timeout_s: float = 20.0) -> None:
    """The app is RUNNING when `serve.run` returns; this also proves the proxy answers on *our* port
    (Serve keeps the HTTP options of an instance that was already running in the cluster)."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{base_url}/healthz", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError) as error:
            if time.monotonic() > deadline:
                raise ConfigError(
                    f"Serve started but {base_url}/healthz does not answer ({error}); if Serve was already "
                    "running on this cluster with other HTTP options, call stop_serving() (serve.shutdown) first"
                ) from None
        time.sleep(0.5)


def stop_serving() -> None:
    serve.shutdown()


# ----------------------------------------------------------------------------------------------------
# CLI: `lsvcr serve`


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--video-model", default=None, help="MODEL dir of `lsvcr finetune` (video task)")
    parser.add_argument("--comment-model", default=None, help="MODEL dir of `lsvcr finetune` (comment task)")
    parser.add_argument("--host", default=None, help="HTTP host (default serve.host = 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="HTTP port (default serve.port = 8000)")


def cli_main(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    if args.host:
        config.serve.host = args.host
    if args.port:
        config.serve.port = args.port
    import signal

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    # Ctrl-C and `kill` both stop Serve cleanly (a background job may start with SIGINT ignored).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, interrupt)
    base_url = start_serving(args.video_model, args.comment_model, config)
    try:
        import urllib.request

        with urllib.request.urlopen(f"{base_url}/v1/model", timeout=30) as response:
            catalog = json.loads(response.read())["catalog"]
        example_user = catalog["example_user_id"]
        endpoint = "videos" if args.video_model else "comments"
        body = {"user_id": example_user, "k": 5}
        if endpoint == "comments":
            body["video_id"] = catalog["example_video_id"]
        print(f"LSVCR serving at {base_url}  (GET {base_url}/healthz, GET {base_url}/v1/model)")
        print(f"try: curl -s -X POST {base_url}/v1/recommend/{endpoint} "
              f"-H 'content-type: application/json' -d '{json.dumps(body)}'")
        print("Ctrl-C to stop")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping")
        return 0
    finally:
        stop_serving()

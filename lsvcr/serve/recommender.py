"""The recommender: plain Python + torch, testable without a cluster (no Ray import here).

It answers a *batch* of requests: video scoring over all items is one matrix product per batch
(user vectors [B, d] @ the precomputed, L2-normalized item matrix [V, d]^T, then top-k), comment scoring
is one batched product against the target videos' comment pools. Scores are the model's logits,
cos(u, item) / temperature (METHOD 2.7), so a served ranking is exactly the offline model's ranking on
the same history.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lsvcr.config import ServeConfig
from lsvcr.errors import ConfigError
from lsvcr.model import HistoryBatch, LSVCRModel
from lsvcr.serve.candidate_tables import shared_comment_candidates
from lsvcr.serve.catalog import Catalog, UserHistory, read_cold_video_vectors
from lsvcr.serve.model_dir import LoadedModel, load_model_dir
from lsvcr.serve.schemas import CommentRequest, RequestError, RequestRejected, VideoRequest

NO_INDICES = np.zeros(0, dtype=np.int64)
RECORD_COMMENT_TABLE_MAX_MB = ServeConfig.record_comment_table_max_mb


@dataclass
class ResolvedRequest:
    """A validated request in index space, its history truncated to the model's limit."""

    video_history: np.ndarray  # integer indices (int32 views of the catalog or int64 lookups)
    comment_history_videos: np.ndarray
    comment_history_comments: list[np.ndarray]
    seen_videos: np.ndarray  # every history video (before truncation) when exclude_seen, else empty
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


def _record_table_fits(model: LSVCRModel, max_mb: float) -> bool:
    """Whether a replica keeps a projected row per comment for history records (`ItemTables.record_comment`):
    exact for a linear comment path, and only within `max_mb` (KuaiComt's 8.5M comments at hidden 64 are 2.2 GB
    per replica; their few rows per request are then projected from the memory-mapped text table)."""
    size_mb = len(model.comment_text) * model.config.hidden_size * 4 / 1e6 if model.use_text else 0.0
    return model.records_precompute_exactly() and size_mb <= max_mb


def build_history_batch(resolved: list[ResolvedRequest], hot_comment: np.ndarray) -> HistoryBatch:
    """Index-space histories -> the model's padded `HistoryBatch` (right-padded, oldest first)."""
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
                 cold_video_ids: np.ndarray | None = None, cold_video_text: torch.Tensor | None = None,
                 record_comment_table_max_mb: float = RECORD_COMMENT_TABLE_MAX_MB):
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
        # Item-side work once per replica: every video's history tokens; the comments it ranks (the pools)
        # once per node, memory-mapped (candidate_tables.py).
        hot_comment = torch.from_numpy(catalog.hot_comment)
        self.video_tables = self.comment_tables = None
        if video is not None:
            self.video_tables = video.model.item_tables(
                hot_comment, record_comments=_record_table_fits(video.model, record_comment_table_max_mb))
        if comment is not None:
            self.comment_tables = comment.model.item_tables(
                hot_comment, record_comments=_record_table_fits(comment.model, record_comment_table_max_mb))
        if comment is not None and comment.model.use_text:
            self.comment_tables.comment_candidate = shared_comment_candidates(comment, catalog.pool_comments)

    @classmethod
    def from_model_dirs(cls, video_model_dir: str | Path | None, comment_model_dir: str | Path | None,
                        record_comment_table_max_mb: float = RECORD_COMMENT_TABLE_MAX_MB) -> "Recommender":
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
        return cls(video, comment, catalog, cold_ids, cold_text, record_comment_table_max_mb)

    # ---------------------------------------------------------------- the serving item matrix

    @torch.inference_mode()
    def _build_video_matrix(self, cold_video_text: torch.Tensor | None) -> None:
        """Normalized candidate vectors of every known video (row = video_idx, row 0 = pad) followed by
        the cold videos' text-only vectors: gate*0 + A(e^t), i.e. the candidate path without an ID."""
        model = self.video.model
        known = model.video_candidate_vectors(None)
        if cold_video_text is not None and len(cold_video_text):
            cold = F.normalize(model.project_text(cold_video_text.float()), dim=-1)
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

    def _lookup_record_comments(self, records: list, record_videos: np.ndarray) -> list[np.ndarray]:
        """Each record's comment indices, all records looked up at once; a comment that is unknown or not
        under its record's video is a 422 naming it."""
        counts = np.array([len(record.comment_ids) for record in records], dtype=np.int64)
        raw_ids = [comment_id for record in records for comment_id in record.comment_ids]
        comment_idx = self.catalog.comment_index.lookup(raw_ids)
        bad = np.flatnonzero((comment_idx == 0) | (self.catalog.comment_video[comment_idx] != np.repeat(record_videos, counts)))
        if len(bad):
            record_of = np.repeat(np.arange(len(records)), counts)
            i, flat = int(record_of[bad[0]]), int(bad[0])
            j = flat - int(counts[:i].sum())
            problem = "is not a known comment" if comment_idx[flat] == 0 else f"is not a comment of video_id {records[i].video_id}"
            raise RequestRejected(422, f"comment_history[{i}].comment_ids[{j}]", f"comment_id {raw_ids[flat]} {problem}")
        return np.split(comment_idx, np.cumsum(counts)[:-1]) if len(records) else []

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
            record_comments = self._lookup_record_comments(request.comment_history, record_videos)
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
        if request.exclude_seen:  # repeats are harmless: masking a column twice is masking it
            seen_videos = np.concatenate([video_history, record_videos]).astype(np.int64)
            seen_comments = np.concatenate([NO_INDICES, *record_comments]).astype(np.int64)
        else:
            seen_videos = seen_comments = NO_INDICES
        # Views, not copies: build_history_batch casts while padding.
        return ResolvedRequest(
            video_history=video_history[-limit:],
            comment_history_videos=record_videos[-limit:],
            comment_history_comments=[c[:per_record] for c in kept_records],  # as sample_arrays.py
            seen_videos=seen_videos,
            seen_comments=seen_comments,
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
        histories = build_history_batch(resolved, self.catalog.hot_comment)
        states = model.encode_histories(histories, outputs=("video",), tables=self.video_tables)
        users = F.normalize(model.video_user_vector(states), dim=-1) / model.config.temperature  # tau folded in
        scores = users @ self.video_matrix.T  # ONE product for the whole batch: [B, d] @ [d, V]
        scores[:, 0] = float("-inf")  # padding row
        if model.use_repeat_logit:  # the model's own scoring of history videos, when they are not excluded
            scores = model.add_repeat_logit(scores, histories.video_history)
        self._mask(scores, [r.seen_videos for r in resolved])
        top_scores, top_rows = torch.topk(scores, min(max(r.k for r in resolved), scores.shape[1]), dim=1)
        top_ids = self.row_video_ids[top_rows.numpy()]
        top_scores, finite = top_scores.numpy(), torch.isfinite(top_scores).numpy()
        for row, (position, item) in enumerate(zip(positions, resolved)):
            results[position] = self._response(top_ids[row], top_scores[row], finite[row], item, "video_id", self.video)
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
        pool_rows = torch.from_numpy(_pad_rows([self.catalog.comment_pool_rows(r.current_video) for r in resolved]))
        # The model's own scoring (cosine/τ, plus the like prior when the model has one); pad → -inf.
        scores = model.score_comments(build_history_batch(resolved, self.catalog.hot_comment), current_video, pools,
                                      tables=self.comment_tables, candidate_rows=pool_rows)
        seen_columns = [np.flatnonzero(np.isin(pools[row].numpy(), r.seen_comments)) for row, r in enumerate(resolved)]
        self._mask(scores, seen_columns)
        top_scores, top_columns = torch.topk(scores, min(max(r.k for r in resolved), scores.shape[1]), dim=1)
        top_ids = self.catalog.comment_ids[torch.gather(pools, 1, top_columns).numpy()]
        top_scores, finite = top_scores.numpy(), torch.isfinite(top_scores).numpy()
        for row, (position, item) in enumerate(zip(positions, resolved)):
            results[position] = self._response(top_ids[row], top_scores[row], finite[row], item, "comment_id", self.comment)
        return results

    @staticmethod
    def _mask(scores: torch.Tensor, columns_per_row: list[np.ndarray]) -> None:
        counts = np.array([len(c) for c in columns_per_row])
        if counts.sum():
            rows = torch.from_numpy(np.repeat(np.arange(len(columns_per_row)), counts))
            scores[rows, torch.from_numpy(np.concatenate(columns_per_row).astype(np.int64))] = float("-inf")

    @staticmethod
    def _response(ids: np.ndarray, scores: np.ndarray, finite: np.ndarray, item: ResolvedRequest, id_name: str,
                  loaded: LoadedModel) -> dict[str, Any]:
        """The first `item.k` of a row's top ids and scores, masked (-inf) columns left out."""
        keep = finite[: item.k]
        return {
            "items": [{id_name: i, "score": s}
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


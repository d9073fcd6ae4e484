"""The Ray Serve deployment: `RecommenderModel`, one `Recommender` per replica, which is also the HTTP
ingress (FastAPI). A request reaches the replica that answers it in one hop from the ingress (HAProxy by
default, serve.ingress; or Serve's Python proxy): no separate gateway deployment (docs/serving.md)."""

from __future__ import annotations

import logging
import os
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import ray
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from lsvcr.config import ServeConfig
from lsvcr.runtime import pin_to_cores, serve_ingress_in_effect, set_threads
from lsvcr.serve.recommender import Recommender
from lsvcr.serve.schemas import CommentRequest, RequestError, RequestRejected, VideoRequest, parse_request

log = logging.getLogger("lsvcr.serve")

api = FastAPI(title="LSVCR recommendation API", version="1")


def _error_response(error: RequestError) -> JSONResponse:
    return JSONResponse(error.to_json(), status_code=error.status)


def _package_version() -> str:
    # Defined before the deployment class: `serve.ingress` pickles the FastAPI app (and the globals its
    # routes use) when the class is defined.
    try:
        return version("lsvcr")
    except PackageNotFoundError:
        return "unknown"


async def _read_body(request: Request, limit: int) -> bytes | RequestError:
    """The body, or a 413 once it exceeds `limit` (a chunked body has no length: stop reading there)."""
    too_large = RequestError(413, "body", f"body exceeds max_body_bytes={limit}")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            return too_large
    return bytes(body)


@serve.deployment(name="RecommenderModel")
@serve.ingress(api)
class RecommenderModel:
    """One replica = one `Recommender` (SR model(s), precomputed item tables, catalog) behind the HTTP
    routes. Requests from many connections are gathered by `@serve.batch` so one forward pass serves a
    batch; validation (body limit, JSON, schema) runs per request before it joins a batch."""

    def __init__(self, video_model_dir: str | None, comment_model_dir: str | None, serve_config: dict):
        self.config = ServeConfig(**serve_config)
        # A replica computes on the cores it reserves, no more (oversubscribed torch is several times slower).
        threads = max(1, int(self.config.num_cpus_per_replica))
        set_threads(threads)
        if self.config.pin_replica_cpus:
            pin_to_cores(serve.get_replica_context().rank.local_rank, threads)
        self.recommender = Recommender.from_model_dirs(video_model_dir, comment_model_dir,
                                                        self.config.record_comment_table_max_mb)
        for handler in (self._video_batch, self._comment_batch):
            handler.set_max_batch_size(self.config.max_batch_size)
            handler.set_batch_wait_timeout_s(self.config.batch_wait_timeout_s)
        self.batches = {"video": [0, 0], "comment": [0, 0]}  # task -> [batches, requests] of this replica
        self.ongoing = 0  # requests inside this replica: being read, queued for a batch or in one

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0)
    async def _video_batch(self, requests: list[VideoRequest]) -> list[dict | RequestError]:
        self.batches["video"][0] += 1
        self.batches["video"][1] += len(requests)
        return self.recommender.recommend_videos(requests)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0)
    async def _comment_batch(self, requests: list[CommentRequest]) -> list[dict | RequestError]:
        self.batches["comment"][0] += 1
        self.batches["comment"][1] += len(requests)
        return self.recommender.recommend_comments(requests)

    async def _read_and_validate(self, request: Request, schema: type[VideoRequest]) -> VideoRequest | RequestError:
        body = await _read_body(request, self.config.max_body_bytes)
        if isinstance(body, RequestError):
            return body
        try:
            return parse_request(body, schema, self.config)
        except RequestRejected as rejected:
            return rejected.error

    async def _answer(self, request: Request, schema: type[VideoRequest], batch) -> JSONResponse:
        self.ongoing += 1
        try:
            return await self._answer_one(request, schema, batch)
        finally:
            self.ongoing -= 1

    async def _answer_one(self, request: Request, schema: type[VideoRequest], batch) -> JSONResponse:
        parsed = await self._read_and_validate(request, schema)
        if isinstance(parsed, RequestError):
            return _error_response(parsed)
        # A batch opened by this request waits for company only on a busy replica (other requests being read,
        # queued or computed): a lone request never waits, a loaded replica still fills its batches.
        batch.set_batch_wait_timeout_s(self.config.batch_wait_timeout_s if self.ongoing > 1 else 0.0)
        try:
            result = await batch(parsed)
        except Exception as error:  # noqa: BLE001 - a server bug: still a JSON error, logged with its trace
            log.exception("%s failed", schema.__name__)
            return _error_response(RequestError(500, None, f"internal error: {type(error).__name__}"))
        if isinstance(result, RequestError):
            return _error_response(result)
        return JSONResponse(result)

    @api.post("/v1/recommend/videos")
    async def recommend_videos(self, request: Request) -> JSONResponse:
        return await self._answer(request, VideoRequest, self._video_batch)

    @api.post("/v1/recommend/comments")
    async def recommend_comments(self, request: Request) -> JSONResponse:
        return await self._answer(request, CommentRequest, self._comment_batch)

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @api.get("/v1/model")
    async def model_info(self) -> JSONResponse:
        batching = {task: {"batches": batches, "requests": requests,
                           "mean_batch_size": round(requests / batches, 2) if batches else None}
                    for task, (batches, requests) in self.batches.items()}
        info = {**self.recommender.describe(), "replica_batching": batching}
        info["versions"] = {"lsvcr": _package_version(), "ray": ray.__version__, "torch": torch.__version__}
        info["serve"] = {k: getattr(self.config, k) for k in ("max_batch_size", "batch_wait_timeout_s", "max_k",
                                                                "max_history_items", "max_body_bytes")}
        info["serve"]["ingress"] = serve_ingress_in_effect()
        info["serve"]["cpu_affinity"] = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        return JSONResponse(info)

    def describe(self) -> dict[str, Any]:
        """For Python callers with a deployment handle (the HTTP route is `/v1/model`)."""
        return self.recommender.describe()

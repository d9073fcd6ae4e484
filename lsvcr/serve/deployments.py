"""The Ray Serve deployments: a FastAPI ingress (`Gateway`) and the batched, autoscaled model
deployment (`RecommenderModel`, one `Recommender` per replica)."""

from __future__ import annotations

import logging
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import ray
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

from lsvcr.config import ServeConfig
from lsvcr.runtime import set_threads
from lsvcr.serve.recommender import Recommender
from lsvcr.serve.schemas import CommentRequest, RequestError, RequestRejected, VideoRequest, parse_request

log = logging.getLogger("lsvcr.serve")

api = FastAPI(title="LSVCR recommendation API", version="1")


@serve.deployment(name="RecommenderModel")
class RecommenderModel:
    """One replica = one `Recommender` (SR model(s) + item vectors + catalog). Requests from many
    HTTP connections are gathered by `@serve.batch` so one forward pass serves a batch."""

    def __init__(self, video_model_dir: str | None, comment_model_dir: str | None, serve_config: dict):
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
        info = await self._remote_with_retry("describe")
        if isinstance(info, RequestError):
            return _error_response(info)
        info["versions"] = {"lsvcr": _package_version(), "ray": ray.__version__, "torch": torch.__version__}
        info["serve"] = {k: getattr(self.config, k) for k in ("max_batch_size", "batch_wait_timeout_s", "max_k",
                                                                "max_history_items", "max_body_bytes")}
        return JSONResponse(info)


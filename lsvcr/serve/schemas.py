"""Request schemas of the serving API and their validation (wrong types are rejected, never coerced:
"5" is not a video id). Every rejection names the field; the error contract is in `lsvcr.serve`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError

from lsvcr.config import ServeConfig

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

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


"""When a client sends a recommendation request again (docs/serving.md, "Replica loss and reloads").

Both endpoints only read, so a request the service never answered is safe to send again, as HTTP clients do
for idempotent requests (RFC 9110 9.2.2). Two outcomes mean "never answered by a replica":
- the connection closed before a whole response: a replica killed while writing one, or HAProxy closing its
  keep-alive connections (and a connection it had only just accepted) when it reloads on a change of
  replicas. One reload can cut the same request twice within a few milliseconds (measured: the re-sent
  request's new connection was accepted by the HAProxy process being replaced), hence a few re-sends with a
  growing delay, not one;
- HAProxy's own error page. Ray's HAProxy configuration answers its own 502/503/504 (no replica reachable,
  retries exhausted) with a plain-text `500 Internal Server Error`. lsvcr's app never sends that body: its
  errors are JSON (`{"error": {"field", "message"}}`), so the two cannot be confused. (Serve's Python proxy,
  `serve.ingress: proxy`, answers a request lost with a dead replica by a 500 carrying the Ray error's text:
  not recognized here, it stays a failure.)
"""

from __future__ import annotations

MAX_RESENDS = 3
INGRESS_ERROR_BODY = b"Internal Server Error"


def resend_delay_s(resend: int) -> float:
    """Wait before re-send number `resend` (0-based): 50, 100, 200 ms, past a reload's socket hand-over."""
    return 0.05 * 2 ** resend


def is_ingress_error(status: int, body: bytes) -> bool:
    """Whether a response is the ingress's own error page (no replica answered), not lsvcr's."""
    return status == 500 and body.strip() == INGRESS_ERROR_BODY

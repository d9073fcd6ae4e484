"""Online serving of the fine-tuned SR backbone (METHOD 10): video retrieval and comment ranking.

The LLM is not served. A replica holds the stage-2 SR model(s), the precomputed item text vectors and
the PREPARED catalog (raw id <-> index maps, each video's comment pool, every user's latest history).

Modules, from the inside out (each imports only the ones above it):
- `schemas`: the request models and `parse_request` (validation, the error contract below).
- `catalog`: PREPARED/ id maps, comment pools, stored user histories; VECTORS/ cold videos.
- `model_dir`: loading and checking MODEL/ dirs.
- `recommender`: `Recommender`, plain Python + torch, testable without a cluster. It answers a
  *batch* of requests: video scoring over all items is one matrix product per batch (user vectors [B, d] @ the precomputed,
  L2-normalized item matrix [V, d]^T, then top-k), comment scoring is one batched product against the
  target videos' comment pools.
- `deployments`: `RecommenderModel` (Ray Serve deployment, autoscaled): the HTTP ingress (FastAPI:
  parses and validates JSON, turns every bad input into a 4xx `{"error": {"field", "message"}}`) and the
  `Recommender` behind `@serve.batch`, in one replica (one hop from the ingress, HAProxy by default: docs/serving.md).
- `app`: the typed app builder (`ServeAppArgs` -> `build_app`), `start_serving` / `stop_serving`.
- `resend`: which outcomes a client sends again (a connection cut before a whole response, the ingress's own
  error page): the policy of the serving tests and `bench/bench_serve.py`, for any client of the endpoints.
- `cli`: `lsvcr serve` (arguments only).

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

The package imports nothing on its own: `from lsvcr.serve.recommender import Recommender` needs no Ray.
"""

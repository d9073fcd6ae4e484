"""Serving: the `Recommender` against the offline model, cold videos, input validation, and the Ray Serve
app over real HTTP on 127.0.0.1 (docs: lsvcr/serve/__init__.py)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
import yaml

from lsvcr.batching import make_batch
from lsvcr.sample_arrays import load_comment_pools, load_sample_arrays
from lsvcr.config import LSVCRConfig, ServeConfig, save_config
from lsvcr.errors import ConfigError, ModelNotFoundError
from lsvcr.model import LSVCRModel
from lsvcr.runtime import free_local_port
from lsvcr.serve.recommender import Recommender
from lsvcr.serve.schemas import CommentRequest, RequestError, RequestRejected, VideoRequest, parse_request
from lsvcr.vectors import load_item_vectors, write_item_vectors

REPO = Path(__file__).resolve().parents[1]
TEXT_DIM = 32
HISTORY_LENGTH = 12  # below the tiny data's longest histories, so truncation is exercised
COLD_VIDEO_IDS = np.array([7_000_000_001, 7_000_000_002, 7_000_000_003], dtype=np.int64)


# ----------------------------------------------------------------------------------------------------
# fixtures: PREPARED (tiny synthetic), VECTORS (random, plus cold videos), two MODEL dirs


@pytest.fixture(scope="module")
def prepared_dir(tiny_prepared_dir) -> Path:
    return tiny_prepared_dir


@pytest.fixture(scope="module")
def vectors_dir(prepared_dir: Path, tmp_path_factory) -> Path:
    """Random text vectors for every video and comment, plus videos unknown to PREPARED (cold)."""
    rng = np.random.default_rng(0)
    video_ids = pq.read_table(prepared_dir / "videos.parquet")["video_id"].to_numpy()
    comment_ids = pq.read_table(prepared_dir / "comments.parquet")["comment_id"].to_numpy()
    all_video_ids = np.concatenate([video_ids, COLD_VIDEO_IDS])
    out = tmp_path_factory.mktemp("serving") / "vectors"
    write_item_vectors(out, all_video_ids, rng.standard_normal((len(all_video_ids), TEXT_DIM)),
                       comment_ids, rng.standard_normal((len(comment_ids), TEXT_DIM)), {"model": "random"})
    return out


def _write_model_dir(out: Path, task: str, prepared_dir: Path, vectors_dir: Path, seed: int,
                     repeat_logit: float | None = None) -> Path:
    """A MODEL/ dir (docs/formats.md) of an SR model with random (not default-init) weights.

    Built directly rather than by `lsvcr finetune` (Ray Train took 85-280 s for one tiny epoch on this
    shared machine); serving reads it through `lsvcr.evaluate.load_trained_model`, the loader that the
    finetune/evaluate tests check against real `finetune` outputs, and the rankings are compared with
    these same weights."""
    config = LSVCRConfig()
    config.finetune.task = task
    config.finetune.history_length = HISTORY_LENGTH
    config.data.max_comments_per_record = 2
    config.model.repeat_logit = repeat_logit is not None
    video_text, comment_text = load_item_vectors(vectors_dir, prepared_dir)
    torch.manual_seed(seed)
    model = LSVCRModel(config.model, len(video_text) - 1, torch.from_numpy(video_text),
                       None if comment_text is None else torch.from_numpy(comment_text),
                       torch.from_numpy(load_comment_pools(prepared_dir).comment_likes))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
        if repeat_logit is not None:
            model.repeat_logit.fill_(repeat_logit)
    out.mkdir(parents=True)
    torch.save({"model_config": asdict(config.model), "task": task, "num_videos": len(video_text) - 1,
                "text_dim": TEXT_DIM, "state_dict": model.state_dict()}, out / "model.pt")
    (out / "inputs.json").write_text(json.dumps({"data": str(prepared_dir), "vectors": str(vectors_dir)}))
    save_config(config, out / "config.yaml")
    (out / "metrics.json").write_text(json.dumps({"task": task, "model": "lsvcr", "protocol": {"candidates": 100},
                                                  "valid": {"ndcg@5": 0.1}, "test": {"ndcg@5": 0.1}}))
    return out


@pytest.fixture(scope="module")
def model_dirs(prepared_dir: Path, vectors_dir: Path) -> dict[str, Path]:
    root = vectors_dir.parent / "models"
    return {task: _write_model_dir(root / task, task, prepared_dir, vectors_dir, seed)
            for task, seed in (("video", 1), ("comment", 2))}


@pytest.fixture(scope="module")
def recommender(model_dirs) -> Recommender:
    return Recommender.from_model_dirs(model_dirs["video"], model_dirs["comment"])


def _offline_model(model_dir: Path, prepared_dir: Path, vectors_dir: Path) -> LSVCRModel:
    """The model rebuilt independently of lsvcr.serve, straight from the MODEL files."""
    checkpoint = torch.load(model_dir / "model.pt", weights_only=False)
    video_text, comment_text = load_item_vectors(vectors_dir, prepared_dir)
    model = LSVCRModel(LSVCRConfig().model.__class__(**checkpoint["model_config"]), checkpoint["num_videos"],
                       torch.from_numpy(video_text), torch.from_numpy(comment_text),
                       torch.from_numpy(load_comment_pools(prepared_dir).comment_likes))
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval()


def _offline_video_scores(model_dirs, prepared_dir, vectors_dir, rows: np.ndarray) -> torch.Tensor:
    """Logits [B, V+1] of the offline model over all videos, on test samples batched by lsvcr.batching."""
    model = _offline_model(model_dirs["video"], prepared_dir, vectors_dir)
    arrays = load_sample_arrays(prepared_dir, "video", "test", HISTORY_LENGTH, max_comments_per_record=2)
    batch = make_batch(arrays, load_comment_pools(prepared_dir), rows, rng=None)
    with torch.no_grad():
        return model.score_videos(batch.history)


def _offline_comment_scores(model_dirs, prepared_dir, vectors_dir, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(comment pools [B, P] of the target videos, the offline model's logits over them [B, P])."""
    model = _offline_model(model_dirs["comment"], prepared_dir, vectors_dir)
    arrays = load_sample_arrays(prepared_dir, "comment", "test", HISTORY_LENGTH, max_comments_per_record=2)
    tables = load_comment_pools(prepared_dir)
    batch = make_batch(arrays, tables, rows, rng=None)
    pool = torch.from_numpy(tables.comment_pool[batch.target_video.numpy()])
    with torch.no_grad():
        return pool, model.score_comments(batch.history, batch.target_video, pool)


def _raw_requests(prepared_dir: Path, task: str, rows: slice) -> tuple[list[dict], np.ndarray]:
    """Test samples as raw-id request bodies (full, untruncated histories) and their row numbers."""
    table = pq.read_table(prepared_dir / f"{task}_samples.test.parquet").slice(rows.start, rows.stop - rows.start)
    video_ids = np.concatenate([[0], pq.read_table(prepared_dir / "videos.parquet")["video_id"].to_numpy()])
    comment_ids = np.concatenate([[0], pq.read_table(prepared_dir / "comments.parquet")["comment_id"].to_numpy()])
    bodies = []
    for sample in table.to_pylist():
        body = {
            "video_history": video_ids[sample["video_history"]].tolist(),
            "comment_history": [{"video_id": int(video_ids[v]), "comment_ids": comment_ids[c].tolist()}
                                for v, c in zip(sample["comment_history_videos"], sample["comment_history_comments"])],
            "exclude_seen": False,
        }
        if task == "comment":
            body["video_id"] = int(video_ids[sample["target_video"]])
        bodies.append(body)
    return bodies, np.arange(rows.start, rows.stop)


# ----------------------------------------------------------------------------------------------------
# Recommender == offline model


def test_video_rankings_equal_offline_model(recommender, model_dirs, prepared_dir, vectors_dir):
    bodies, rows = _raw_requests(prepared_dir, "video", slice(0, 12))
    offline = _offline_video_scores(model_dirs, prepared_dir, vectors_dir, rows)  # [B, V+1], column 0 = pad
    num_videos = offline.shape[1] - 1
    video_ids = recommender.catalog.video_ids
    k = num_videos + len(COLD_VIDEO_IDS)
    served = recommender.recommend_videos([VideoRequest(**body, k=k) for body in bodies])
    for row, response in enumerate(served):
        assert isinstance(response, dict), response
        known = [item for item in response["items"] if item["video_id"] not in set(COLD_VIDEO_IDS.tolist())]
        assert len(known) == num_videos
        expected_order = torch.argsort(offline[row, 1:], descending=True, stable=True).numpy() + 1
        served_scores = np.array([item["score"] for item in known])
        expected_scores = offline[row, expected_order].numpy()
        np.testing.assert_allclose(served_scores, expected_scores, rtol=1e-4, atol=1e-4)
        # Same ranking (ties aside): every served video has the offline score of its position.
        served_idx = recommender.catalog.video_index.lookup([item["video_id"] for item in known])
        np.testing.assert_allclose(offline[row, served_idx].numpy(), expected_scores, rtol=1e-4, atol=1e-4)
        assert set(video_ids[expected_order[:10]]) == set(video_ids[served_idx[:10]])
        truncated = response["truncated"]
        if len(bodies[row]["video_history"]) > HISTORY_LENGTH:
            assert truncated["video_history"] == {"given": len(bodies[row]["video_history"]), "kept": HISTORY_LENGTH}


def test_served_scores_carry_the_models_repeat_logit(prepared_dir, vectors_dir, tmp_path):
    """model.repeat_logit: with exclude_seen false the served history videos get the model's learned logit, as
    in evaluation; with it true they are masked as before."""
    model_dir = _write_model_dir(tmp_path / "video", "video", prepared_dir, vectors_dir, seed=3, repeat_logit=100.0)
    served_by = Recommender.from_model_dirs(model_dir, None)
    bodies, rows = _raw_requests(prepared_dir, "video", slice(0, 6))
    offline = _offline_video_scores({"video": model_dir}, prepared_dir, vectors_dir, rows)
    k = served_by.catalog.num_videos + len(COLD_VIDEO_IDS)
    cold = set(COLD_VIDEO_IDS.tolist())
    for row, response in enumerate(served_by.recommend_videos([VideoRequest(**body, k=k) for body in bodies])):
        known = [item for item in response["items"] if item["video_id"] not in cold]
        served_idx = served_by.catalog.video_index.lookup([item["video_id"] for item in known])
        np.testing.assert_allclose([item["score"] for item in known], offline[row, served_idx].numpy(), rtol=1e-4, atol=1e-4)
        # A logit of 100 lifts exactly the videos of the (truncated, latest-kept) history above every other.
        lifted = {item["video_id"] for item in known if item["score"] > 50}
        assert lifted == set(bodies[row]["video_history"][-HISTORY_LENGTH:]) and lifted


def test_comment_rankings_equal_offline_model(recommender, model_dirs, prepared_dir, vectors_dir):
    bodies, rows = _raw_requests(prepared_dir, "comment", slice(0, 10))
    pool, offline = _offline_comment_scores(model_dirs, prepared_dir, vectors_dir, rows)
    served = recommender.recommend_comments([CommentRequest(**body, k=200) for body in bodies])
    comment_ids = recommender.catalog.comment_ids
    for row, response in enumerate(served):
        assert isinstance(response, dict), response
        expected = {int(comment_ids[c]): float(s) for c, s in zip(pool[row].tolist(), offline[row].tolist()) if c}
        got = {item["comment_id"]: item["score"] for item in response["items"]}
        assert got.keys() == expected.keys()
        for comment_id, score in got.items():
            assert score == pytest.approx(expected[comment_id], abs=1e-4)
        scores = [item["score"] for item in response["items"]]
        assert scores == sorted(scores, reverse=True)


def test_history_records_from_the_precomputed_comment_table_equal_the_per_request_projection(
        recommender, model_dirs, prepared_dir):
    """A replica that can hold a projected row per comment (serve.record_comment_table_max_mb) reads history
    records from it; one that cannot projects them per request. Same scores either way; the fixture's
    replica holds the table, so the offline-equality tests above cover that path."""
    assert recommender.video_tables.record_comment is not None and recommender.comment_tables.record_comment is not None
    per_request = Recommender.from_model_dirs(model_dirs["video"], model_dirs["comment"], record_comment_table_max_mb=0)
    assert per_request.video_tables.record_comment is None and per_request.comment_tables.record_comment is None
    for task, schema, recommend in (("video", VideoRequest, "recommend_videos"), ("comment", CommentRequest, "recommend_comments")):
        bodies, _ = _raw_requests(prepared_dir, task, slice(0, 12))
        assert any(body["comment_history"] for body in bodies)
        requests = [schema(**body, k=50) for body in bodies]
        for with_table, without in zip(getattr(recommender, recommend)(requests), getattr(per_request, recommend)(requests)):
            id_name = f"{task}_id"
            assert [i[id_name] for i in with_table["items"]] == [i[id_name] for i in without["items"]]
            np.testing.assert_allclose([i["score"] for i in with_table["items"]], [i["score"] for i in without["items"]],
                                       rtol=1e-5, atol=1e-5)


def test_no_comment_record_table_for_a_model_with_an_llm_emb_mlp():
    """Raw LLM vectors go through a non-linear llm_emb_mlp after the record's mean: a per-comment table would
    not be exact, so it is refused and serving projects records per request."""
    from lsvcr.config import ModelConfig
    from lsvcr.errors import ConfigError
    from lsvcr.serve.recommender import _record_table_fits

    model = LSVCRModel(ModelConfig(text_mlp_dim=16), 5, torch.randn(6, 32), torch.randn(9, 32), torch.zeros(9))
    assert model.text_mlp is not None and not model.records_precompute_exactly()
    assert not _record_table_fits(model, max_mb=1e6)
    with pytest.raises(ConfigError, match="without llm_emb_mlp"):
        model.comment_record_table()
    linear = LSVCRModel(ModelConfig(), 5, torch.randn(6, 32), torch.randn(9, 32), torch.zeros(9))
    assert _record_table_fits(linear, max_mb=1.0) and not _record_table_fits(linear, max_mb=0.0)


def test_replicas_starting_together_compute_the_comment_table_once(model_dirs, prepared_dir, tmp_path, monkeypatch):
    """Replicas of a node share one memory-mapped candidate table: one computes it under the file lock while
    the others wait, and the node keeps only the most recently used tables."""
    from concurrent.futures import ThreadPoolExecutor

    from lsvcr.serve import candidate_tables
    from lsvcr.serve.catalog import Catalog
    from lsvcr.serve.model_dir import load_model_dir

    monkeypatch.setenv(candidate_tables.CACHE_DIR_ENVIRONMENT, str(tmp_path / "cache"))
    loaded = load_model_dir(model_dirs["comment"], "comment")
    pools = Catalog(prepared_dir).pool_comments
    computed = []
    compute = loaded.model.comment_candidate_table

    def counted(pool_comments):
        computed.append(len(pool_comments))
        return compute(pool_comments)

    monkeypatch.setattr(loaded.model, "comment_candidate_table", counted)
    with ThreadPoolExecutor(4) as replicas:
        tables = list(replicas.map(lambda _: candidate_tables.shared_comment_candidates(loaded, pools), range(4)))
    assert len(computed) == 1
    assert all(torch.equal(table, tables[0]) for table in tables)
    assert len(list((tmp_path / "cache").glob("comment_candidates-*.npy"))) == 1
    assert torch.allclose(tables[0], compute(torch.from_numpy(pools)))

    for dropped in range(1, candidate_tables.TABLES_KEPT + 2):  # other pools: other tables (as new versions)
        candidate_tables.shared_comment_candidates(loaded, pools[:-dropped])
    kept = sorted((tmp_path / "cache").glob("comment_candidates-*.npy"))
    assert len(kept) == candidate_tables.TABLES_KEPT and len(computed) == 1 + candidate_tables.TABLES_KEPT + 1
    first_file = candidate_tables.cache_dir() / f"comment_candidates-{candidate_tables._table_key(loaded, pools)}.npy"
    assert not first_file.exists()  # the least recently used table was deleted ...
    assert torch.allclose(tables[0], compute(torch.from_numpy(pools)))  # ... and its map still reads


def test_evaluate_breakdown_of_a_comment_model_is_a_clear_error(model_dirs):
    from lsvcr.evaluate import evaluate_model_dir

    with pytest.raises(ConfigError, match="--breakdown splits a video model's metrics.*holds a comment model"):
        evaluate_model_dir(model_dirs["comment"], breakdown=True, write=False)


def test_user_id_uses_the_stored_latest_history(recommender, prepared_dir):
    histories = pq.read_table(prepared_dir / "user_histories.parquet").slice(0, 3).to_pylist()
    catalog = recommender.catalog
    for history in histories:
        explicit = VideoRequest(
            video_history=catalog.video_ids[history["video_history"]].tolist(),
            comment_history=[{"video_id": int(catalog.video_ids[v]), "comment_ids": catalog.comment_ids[c].tolist()}
                             for v, c in zip(history["comment_history_videos"], history["comment_history_comments"])],
        )
        by_user, by_history = recommender.recommend_videos([VideoRequest(user_id=history["user_id"]), explicit])
        assert [i["video_id"] for i in by_user["items"]] == [i["video_id"] for i in by_history["items"]]
        np.testing.assert_allclose([i["score"] for i in by_user["items"]], [i["score"] for i in by_history["items"]], atol=1e-5)
        # An explicit history replaces the stored one.
        override = recommender.recommend_videos([VideoRequest(user_id=history["user_id"], video_history=explicit.video_history[:1],
                                                              comment_history=[])])[0]
        assert override["items"] != by_user["items"]


def test_exclude_seen_masks_history_videos(recommender, prepared_dir):
    history = pq.read_table(prepared_dir / "user_histories.parquet").slice(0, 1).to_pylist()[0]
    seen = set(recommender.catalog.video_ids[history["video_history"] + history["comment_history_videos"]].tolist())
    k = recommender.catalog.num_videos + len(COLD_VIDEO_IDS)
    shown = recommender.recommend_videos([VideoRequest(user_id=history["user_id"], k=k),
                                          VideoRequest(user_id=history["user_id"], k=k, exclude_seen=False)])
    excluded = {item["video_id"] for item in shown[0]["items"]}
    included = {item["video_id"] for item in shown[1]["items"]}
    assert not excluded & seen
    assert seen <= included
    assert len(included) - len(excluded) == len(seen)


def test_cold_videos_are_scored_through_the_text_path(recommender, model_dirs, prepared_dir, vectors_dir):
    """A video with a text vector but no ID embedding (uploaded after training) is ranked with
    gate*0 + A(title): cos(u, A(e^t)) / tau, next to the known videos."""
    model = _offline_model(model_dirs["video"], prepared_dir, vectors_dir)
    vectors = pq.read_table(vectors_dir / "videos.parquet").to_pydict()
    cold_text = torch.tensor([vectors["vector"][vectors["video_id"].index(int(i))] for i in COLD_VIDEO_IDS])
    bodies, rows = _raw_requests(prepared_dir, "video", slice(0, 3))
    arrays = load_sample_arrays(prepared_dir, "video", "test", HISTORY_LENGTH, max_comments_per_record=2)
    batch = make_batch(arrays, load_comment_pools(prepared_dir), rows, rng=None)
    with torch.no_grad():
        user = F.normalize(model.video_user_vector(model.encode_histories(batch.history)), dim=-1)
        expected = user @ F.normalize(model.llm_adapter(cold_text), dim=-1).T / model.config.temperature
    k = recommender.catalog.num_videos + len(COLD_VIDEO_IDS)
    served = recommender.recommend_videos([VideoRequest(**body, k=k) for body in bodies])
    assert recommender.describe()["catalog"]["cold_videos"] == len(COLD_VIDEO_IDS)
    for row, response in enumerate(served):
        scores = {item["video_id"]: item["score"] for item in response["items"]}
        for j, cold_id in enumerate(COLD_VIDEO_IDS.tolist()):
            assert scores[cold_id] == pytest.approx(float(expected[row, j]), abs=1e-4)
    # Cold videos can be recommended, not used as history (no ID embedding to encode them with).
    error = recommender.recommend_videos([VideoRequest(video_history=[int(COLD_VIDEO_IDS[0])])])[0]
    assert isinstance(error, RequestError) and error.status == 422 and error.field == "video_history[0]"
    assert "new video" in error.message


def test_one_bad_request_does_not_fail_its_batch(recommender, prepared_dir):
    user_id = int(pq.read_table(prepared_dir / "users.parquet")["user_id"][0].as_py())
    good, bad, good_again = recommender.recommend_videos(
        [VideoRequest(user_id=user_id), VideoRequest(user_id=-5), VideoRequest(user_id=user_id)])
    assert good == good_again and len(good["items"]) == 10
    assert bad == RequestError(404, "user_id", "unknown user_id -5")


def test_video_only_data_set(tiny_video_only_prepared_dir, tmp_path):
    """A data set without comment tables (RecBole/CSV import): videos are served, comments are a 404."""
    video_ids = pq.read_table(tiny_video_only_prepared_dir / "videos.parquet")["video_id"].to_numpy()
    write_item_vectors(tmp_path / "vectors", video_ids, np.random.default_rng(0).standard_normal((len(video_ids), TEXT_DIM)),
                       None, None, {"model": "random"})
    model_dir = _write_model_dir(tmp_path / "model", "video", tiny_video_only_prepared_dir, tmp_path / "vectors", 3)
    video_only = Recommender.from_model_dirs(model_dir, None)
    user_id = video_only.catalog.example_user_id()
    response = video_only.recommend_videos([VideoRequest(user_id=user_id, k=5)])[0]
    assert len(response["items"]) == 5 and video_only.catalog.example_video_id() is None
    error = video_only.recommend_comments([CommentRequest(user_id=user_id, video_id=int(video_ids[0]))])[0]
    assert (error.status, error.field) == (404, "endpoint")


# ----------------------------------------------------------------------------------------------------
# validation (no cluster): every case names its field


SERVE = ServeConfig(max_k=50, max_history_items=30, max_body_bytes=4000)


@pytest.mark.parametrize("body, status, field", [
    (b"{not json", 400, "body"),
    (b"[1, 2]", 400, "body"),
    (json.dumps({"user_id": 1, "pad": "x" * 5000}).encode(), 413, "body"),
    (json.dumps({"user_id": "12"}).encode(), 422, "user_id"),
    (json.dumps({"user_id": 1.5}).encode(), 422, "user_id"),
    (json.dumps({"user_id": True}).encode(), 422, "user_id"),
    (json.dumps({"video_history": [1, "2"]}).encode(), 422, "video_history[1]"),
    (json.dumps({"comment_history": [{"video_id": 1, "comment_ids": [1.0]}]}).encode(), 422, "comment_history[0].comment_ids[0]"),
    (json.dumps({"comment_history": [{"video_id": 1}]}).encode(), 422, "comment_history[0].comment_ids"),
    (json.dumps({"user_id": 1, "colour": "red"}).encode(), 422, "colour"),
    (json.dumps({"user_id": 2**64}).encode(), 422, "user_id"),
    (json.dumps({"user_id": 1, "k": 0}).encode(), 422, "k"),
    (json.dumps({"user_id": 1, "k": 51}).encode(), 422, "k"),
    (json.dumps({"user_id": 1, "exclude_seen": "yes"}).encode(), 422, "exclude_seen"),
    (json.dumps({}).encode(), 422, "user_id"),
    (json.dumps({"video_history": [], "comment_history": []}).encode(), 422, "user_id"),
    (json.dumps({"video_history": list(range(31))}).encode(), 413, "video_history"),
    (json.dumps({"comment_history": [{"video_id": 1, "comment_ids": []}] * 31}).encode(), 413, "comment_history"),
    (json.dumps({"comment_history": [{"video_id": 1, "comment_ids": list(range(31))}]}).encode(), 413,
     "comment_history[0].comment_ids"),
])
def test_parse_request_rejects_bad_input_naming_the_field(body, status, field):
    with pytest.raises(RequestRejected) as caught:
        parse_request(body, VideoRequest, SERVE)
    assert (caught.value.error.status, caught.value.error.field) == (status, field)


def test_parse_request_comment_needs_video_id():
    with pytest.raises(RequestRejected) as caught:
        parse_request(json.dumps({"user_id": 1}).encode(), CommentRequest, SERVE)
    assert (caught.value.error.status, caught.value.error.field) == (422, "video_id")
    request = parse_request(json.dumps({"user_id": 1, "video_id": 3, "k": 5}).encode(), CommentRequest, SERVE)
    assert (request.video_id, request.k, request.exclude_seen) == (3, 5, True)


def test_unknown_ids_and_empty_pools_are_rejected(recommender, prepared_dir):
    catalog = recommender.catalog
    user_id = catalog.example_user_id()
    known_video = int(catalog.video_ids[1])
    other_video_comment = int(catalog.comment_ids[np.flatnonzero(catalog.comment_video != 1)[1]])
    own_comments = catalog.comment_ids[np.flatnonzero(catalog.comment_video == 1)].tolist()
    no_comments = np.flatnonzero(np.diff(catalog.pool_offsets)[1:] == 0)
    cases = [
        (VideoRequest(video_history=[known_video, 123]), 422, "video_history[1]"),
        (VideoRequest(comment_history=[{"video_id": 5, "comment_ids": []}]), 422, "comment_history[0]"),
        (VideoRequest(comment_history=[{"video_id": known_video, "comment_ids": [99]}]), 422, "comment_history[0].comment_ids[0]"),
        (VideoRequest(comment_history=[{"video_id": known_video, "comment_ids": [other_video_comment]}]), 422,
         "comment_history[0].comment_ids[0]"),
        # records are validated all at once: the error still names the record and the position in it
        (VideoRequest(comment_history=[{"video_id": known_video, "comment_ids": own_comments[:2]},
                                       {"video_id": known_video, "comment_ids": [*own_comments[:1], 99]}]), 422,
         "comment_history[1].comment_ids[1]"),
    ]
    for request, status, field in cases:
        error = recommender.recommend_videos([request])[0]
        assert (error.status, error.field) == (status, field), error
    error = recommender.recommend_comments([CommentRequest(user_id=user_id, video_id=42)])[0]
    assert (error.status, error.field) == (404, "video_id")
    if len(no_comments):
        empty_video = int(catalog.video_ids[no_comments[0] + 1])
        error = recommender.recommend_comments([CommentRequest(user_id=user_id, video_id=empty_video)])[0]
        assert (error.status, error.field) == (422, "video_id")
    video_only = Recommender(recommender.video, None, catalog)
    error = video_only.recommend_comments([CommentRequest(user_id=user_id, video_id=known_video)])[0]
    assert (error.status, error.field) == (404, "endpoint")


def test_a_client_resends_on_the_ingress_error_page_only():
    """The body `is_ingress_error` recognizes is the one Ray's HAProxy writes for its own 502/503/504, and
    lsvcr's own 500 (JSON) is not mistaken for it: a client re-sends the first, never the second."""
    import inspect

    from ray.serve._private import haproxy

    from lsvcr.serve.deployments import _error_response
    from lsvcr.serve.resend import INGRESS_ERROR_BODY, is_ingress_error, resend_delay_s
    from lsvcr.serve.schemas import RequestError

    assert f'ef.write("{INGRESS_ERROR_BODY.decode()}")' in inspect.getsource(haproxy)
    assert is_ingress_error(500, INGRESS_ERROR_BODY)
    ours = _error_response(RequestError(500, None, "internal error: RuntimeError"))
    assert ours.status_code == 500 and not is_ingress_error(ours.status_code, ours.body)
    assert not is_ingress_error(503, INGRESS_ERROR_BODY)
    assert [resend_delay_s(k) for k in range(3)] == [0.05, 0.1, 0.2]


# ----------------------------------------------------------------------------------------------------
# serve/config.yaml against Ray's own schema


def test_serve_config_yaml_parses_against_rays_schema():
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    parsed = ServeDeploySchema.model_validate(raw)
    (application,) = parsed.applications
    assert application.import_path == "serve.app:app"
    assert set(application.args) >= {"video_model", "comment_model"}
    model = next(d for d in application.deployments if d.name == "RecommenderModel")
    autoscaling = AutoscalingConfig(**model.autoscaling_config)
    assert autoscaling.min_replicas >= 1 and autoscaling.max_replicas >= autoscaling.min_replicas
    assert model.ray_actor_options.num_cpus > 0
    assert parsed.http_options.host == "127.0.0.1"


def test_serve_app_builder_takes_args(model_dirs, monkeypatch):
    """`serve.app:app` is the application builder Serve calls with the config's args."""
    import importlib

    monkeypatch.syspath_prepend(str(REPO))  # `serve run` imports from the repository root

    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    builder = importlib.import_module("serve.app").app
    application = call_user_app_builder_with_args_if_necessary(
        builder, {"video_model": str(model_dirs["video"]), "overrides": ["serve.max_batch_size=8"]})
    assert type(application).__name__ == "Application"
    with pytest.raises(Exception, match="unknown Serve application arg"):
        builder({"video_model": str(model_dirs["video"]), "colour": "red"})
    # Wrong inputs fail in the driver with one line, before any replica starts.
    with pytest.raises(ConfigError, match="holds a 'comment' model"):
        builder({"video_model": str(model_dirs["comment"])})
    with pytest.raises(ModelNotFoundError, match="no model.pt"):
        builder({"comment_model": str(model_dirs["comment"].parent)})
    with pytest.raises(ConfigError, match="at least one model"):
        builder({})


def test_serve_app_builder_is_typed():
    """Serve validates the config's args into `ServeAppArgs` before calling the builder."""
    import inspect

    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    from lsvcr.serve.app import ServeAppArgs, build_app

    assert inspect.signature(build_app).parameters["args"].annotation is ServeAppArgs
    with pytest.raises(Exception, match=r"unknown Serve application arg\(s\) \['colour'\]"):
        call_user_app_builder_with_args_if_necessary(build_app, {"colour": "red"})
    with pytest.raises(Exception, match="overrides"):
        call_user_app_builder_with_args_if_necessary(build_app, {"overrides": "serve.max_k=5"})


# ----------------------------------------------------------------------------------------------------
# the Ray Serve app over real HTTP



@pytest.fixture(scope="module")
def served_recommender(model_dirs) -> Recommender:
    """The same models as the HTTP app, in-process: the reference for the HTTP answers."""
    return Recommender.from_model_dirs(model_dirs["video"], model_dirs["comment"])


LONG_BATCH_WAIT_S = 3.0


@pytest.fixture(scope="module")
def served(ray_cluster, model_dirs):
    from lsvcr.serve.app import start_serving, stop_serving

    # A long batch wait: a lone request must not pay it (test_http_endpoints_match_the_offline_model).
    config = ServeConfig(port=free_local_port(), min_replicas=1, max_replicas=1, num_cpus_per_replica=0.5,
                         max_k=500, max_history_items=200, max_body_bytes=20_000, batch_wait_timeout_s=LONG_BATCH_WAIT_S)
    base_url = start_serving(model_dirs["video"], model_dirs["comment"], config)
    try:
        yield base_url
    finally:
        stop_serving()


@pytest.mark.slow
def test_http_endpoints_match_the_offline_model(served, model_dirs, served_recommender, prepared_dir, vectors_dir):
    recommender = served_recommender
    import requests

    assert requests.get(f"{served}/healthz", timeout=30).json() == {"status": "ok"}
    response = requests.get(f"{served}/v1/model", timeout=30)
    assert response.status_code == 200, response.text
    info = response.json()
    trained_metrics = json.loads((model_dirs["video"] / "metrics.json").read_text())
    assert info["models"]["video"]["checkpoint"] == str(model_dirs["video"].resolve() / "model.pt")
    assert info["models"]["video"]["metrics"]["test"] == trained_metrics["test"]
    assert info["models"]["video"]["protocol"] == trained_metrics["protocol"]
    assert info["models"]["comment"]["metrics"]["test"] == {"ndcg@5": 0.1}
    assert info["versions"]["ray"] and info["catalog"]["cold_videos"] == len(COLD_VIDEO_IDS)
    assert info["serve"]["ingress"] == "haproxy"  # one hop: HAProxy → the replica's own HTTP server
    # serve.pin_replica_cpus (default on): the replica's threads run on its own core, one per torch thread
    affinity = info["serve"]["cpu_affinity"]
    assert len(affinity) == 1 and affinity[0] in os.sched_getaffinity(0), affinity

    # Video endpoint: top-k scores equal the offline model's logits on the same history.
    bodies, rows = _raw_requests(prepared_dir, "video", slice(0, 4))
    offline = _offline_video_scores(model_dirs, prepared_dir, vectors_dir, rows)
    for row, body in enumerate(bodies):
        response = requests.post(f"{served}/v1/recommend/videos", json={**body, "k": 20}, timeout=30)
        assert response.status_code == 200, response.text
        # Sent one at a time, each request is alone on the replica: its batch does not wait for company.
        assert response.elapsed.total_seconds() < LONG_BATCH_WAIT_S / 2, response.elapsed
        items = [i for i in response.json()["items"] if i["video_id"] not in set(COLD_VIDEO_IDS.tolist())]
        idx = recommender.catalog.video_index.lookup([i["video_id"] for i in items])
        np.testing.assert_allclose([i["score"] for i in items], offline[row, idx].numpy(), atol=1e-4)
        top = torch.sort(offline[row, 1:], descending=True).values[: len(items)].numpy()
        np.testing.assert_allclose([i["score"] for i in items], top, atol=1e-4)

    # Comment endpoint: the whole pool, scored as the offline model scores it.
    bodies, rows = _raw_requests(prepared_dir, "comment", slice(0, 3))
    pool, offline = _offline_comment_scores(model_dirs, prepared_dir, vectors_dir, rows)
    for row, body in enumerate(bodies):
        response = requests.post(f"{served}/v1/recommend/comments", json={**body, "k": 100}, timeout=30)
        assert response.status_code == 200, response.text
        expected = {int(recommender.catalog.comment_ids[c]): s for c, s in zip(pool[row].tolist(), offline[row].tolist()) if c}
        got = {i["comment_id"]: i["score"] for i in response.json()["items"]}
        assert got.keys() == expected.keys()
        assert all(abs(got[c] - expected[c]) < 1e-4 for c in got)

    # serve.access_log (off by default): the replica logged no line per request (Ray's access-log line is
    # "POST /v1/recommend/videos 200 3.1ms"), though its log file exists.
    replica_logs = _replica_log_files()
    assert replica_logs, "no replica log file: where does Ray write them now?"
    access_lines = [line for path in replica_logs for line in path.read_text(errors="replace").splitlines()
                    if "POST /v1/recommend/" in line]
    assert not access_lines, access_lines[:3]


def _replica_log_files() -> list[Path]:
    import ray

    serve_logs = Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"
    return sorted(serve_logs.glob("replica_*RecommenderModel*.log"))


@pytest.mark.slow
def test_http_bad_input_is_a_4xx_naming_the_field_and_the_replica_keeps_serving(served, served_recommender):
    recommender = served_recommender
    import requests

    catalog = recommender.catalog
    user_id = catalog.example_user_id()
    video_with_comments = catalog.example_video_id()
    no_comments = np.flatnonzero(np.diff(catalog.pool_offsets)[1:] == 0)
    videos, comments = f"{served}/v1/recommend/videos", f"{served}/v1/recommend/comments"
    cases = [
        (videos, b"{oops", 400, "body"),
        (videos, json.dumps({"user_id": 1, "pad": "x" * 30_000}).encode(), 413, "body"),
        (videos, json.dumps({"user_id": "x"}).encode(), 422, "user_id"),
        (videos, json.dumps({"user_id": user_id, "k": 0}).encode(), 422, "k"),
        (videos, json.dumps({"user_id": user_id, "k": 501}).encode(), 422, "k"),
        (videos, json.dumps({}).encode(), 422, "user_id"),
        (videos, json.dumps({"video_history": [int(catalog.video_ids[1])] * 201}).encode(), 413, "video_history"),
        (videos, json.dumps({"user_id": -1}).encode(), 404, "user_id"),
        (videos, json.dumps({"video_history": [123]}).encode(), 422, "video_history[0]"),
        (videos, json.dumps({"comment_history": [{"video_id": int(catalog.video_ids[1]), "comment_ids": [5]}]}).encode(),
         422, "comment_history[0].comment_ids[0]"),
        (comments, json.dumps({"user_id": user_id}).encode(), 422, "video_id"),
        (comments, json.dumps({"user_id": user_id, "video_id": 77}).encode(), 404, "video_id"),
    ]
    if len(no_comments):
        cases.append((comments, json.dumps({"user_id": user_id, "video_id": int(catalog.video_ids[no_comments[0] + 1])}).encode(),
                      422, "video_id"))
    for url, body, status, field in cases:
        response = requests.post(url, data=body, headers={"content-type": "application/json"}, timeout=30)
        assert response.status_code == status, (body[:80], response.text)
        assert response.json()["error"]["field"] == field, (body[:80], response.text)
        assert response.json()["error"]["message"]
    # A chunked body has no Content-Length: it is cut off at the limit too.
    response = requests.post(videos, data=(b" " * 1000 for _ in range(30)), timeout=30)
    assert response.status_code == 413 and response.json()["error"]["field"] == "body"
    # Long (but allowed) histories are truncated to the model's limit, and the response says so.
    long_history = catalog.video_ids[1:1 + HISTORY_LENGTH + 5].tolist()
    response = requests.post(videos, json={"video_history": long_history, "k": 3}, timeout=30)
    assert response.status_code == 200
    assert response.json()["truncated"]["video_history"] == {"given": HISTORY_LENGTH + 5, "kept": HISTORY_LENGTH}
    # The same replica still serves correct answers after all of that.
    good = requests.post(videos, json={"user_id": user_id, "k": 5}, timeout=30)
    assert good.status_code == 200 and len(good.json()["items"]) == 5
    expected = recommender.recommend_videos([VideoRequest(user_id=user_id, k=5)])[0]["items"]
    assert [i["video_id"] for i in good.json()["items"]] == [i["video_id"] for i in expected]
    good = requests.post(comments, json={"user_id": user_id, "video_id": video_with_comments, "k": 3}, timeout=30)
    assert good.status_code == 200 and len(good.json()["items"]) == 3
    assert requests.get(f"{served}/healthz", timeout=30).status_code == 200


# ----------------------------------------------------------------------------------------------------
# reliability under change: replica loss, rollout of a new model version (real Serve, real HTTP)


def _redeploy(served: str, video_model_dir: Path, comment_model_dir: Path, **serve_options) -> None:
    """Deploy the app again on the running Serve instance (same HTTP port): Serve rolls the replicas
    over to the new version and `serve.run` returns when it is RUNNING."""
    from ray import serve

    from lsvcr.serve.app import APP_NAME, build_application

    config = ServeConfig(port=int(served.rsplit(":", 1)[1]), num_cpus_per_replica=0.5, max_k=500,
                         max_history_items=200, max_body_bytes=20_000, **serve_options)
    serve.run(build_application(str(video_model_dir), str(comment_model_dir), config), name=APP_NAME, route_prefix="/")


def _load_while(served: str, bodies: list[dict], clients: int, action, seconds: float) -> list[tuple]:
    """`clients` keep-alive HTTP clients post `bodies` for `seconds` while `action()` runs once, after a
    third of the time. Returns (status | exception, Retry-After header, seconds, re-sends, body of a non-200
    answer) per request.

    A client re-sends a request the service never answered (lsvcr.serve.resend: its connection closed before
    a whole response, or the ingress's own error page), on a new connection, up to MAX_RESENDS times: what
    HTTP clients do for retry-safe requests, and our endpoints only read. HAProxy closes client connections
    when it reloads on a change of replicas, and a replica killed while writing a response leaves it
    truncated: HAProxy cannot replay a response already started (docs/serving.md)."""
    import threading
    import time

    import requests

    from lsvcr.serve.resend import MAX_RESENDS, is_ingress_error, resend_delay_s

    outcomes: list[tuple] = []
    deadline = time.monotonic() + seconds

    def client(seed: int) -> None:
        session, i = requests.Session(), seed
        while time.monotonic() < deadline:
            start, resends = time.monotonic(), 0
            while True:
                try:
                    response = session.post(f"{served}/v1/recommend/videos", json=bodies[i % len(bodies)], timeout=20)
                    outcome = (response.status_code, response.headers.get("retry-after"), response.content)
                    never_answered = is_ingress_error(response.status_code, response.content)
                except requests.RequestException as error:  # a timeout here is a hung request
                    outcome = (f"{type(error).__name__}: {str(error)[:160]}", None, b"")
                    never_answered = _cut_off_by_the_server(error)
                if not never_answered or resends == MAX_RESENDS:
                    break
                time.sleep(resend_delay_s(resends))
                session, resends = requests.Session(), resends + 1
            status, retry_after, body = outcome
            outcomes.append((status, retry_after, time.monotonic() - start, resends,
                             "" if status == 200 else body[:200].decode(errors="replace")))
            if status != 200:
                session = requests.Session()
            i += clients

    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(clients)]
    for thread in threads:
        thread.start()
    time.sleep(seconds / 3)
    action()
    for thread in threads:
        thread.join(timeout=seconds + 60)
    assert not any(thread.is_alive() for thread in threads), "a client is still waiting: a request hangs"
    return outcomes


def _cut_off_by_the_server(error: Exception) -> bool:
    """The connection closed before a whole response: with none (requests' ConnectionError wraps urllib3's
    ProtocolError('Connection aborted.', REASON)) or with a truncated body (a replica killed mid-response:
    ChunkedEncodingError). Not a refused connection or a timeout: those are failures."""
    import http.client

    import requests

    if isinstance(error, requests.exceptions.ChunkedEncodingError):
        return True
    reasons = getattr(error.args[0], "args", ()) if error.args else ()
    return any(isinstance(reason, (http.client.RemoteDisconnected, ConnectionResetError)) for reason in reasons)


def _failures(outcomes: list[tuple]) -> list[tuple]:
    return [outcome for outcome in outcomes if outcome[0] != 200]


@pytest.mark.slow
def test_killing_one_of_two_replicas_under_load(served, model_dirs, prepared_dir):
    """8 clients; one of two replicas is killed: no request hangs, and a failed request (target: none)
    is a 503 with Retry-After, never a 500."""
    import ray

    _redeploy(served, model_dirs["video"], model_dirs["comment"], min_replicas=2, max_replicas=2)
    replicas = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                if a["namespace"] == "serve" and "RecommenderModel" in a["name"] and a["name"].startswith("SERVE_REPLICA")]
    assert len(replicas) == 2, replicas
    bodies, _ = _raw_requests(prepared_dir, "video", slice(0, 20))
    outcomes = _load_while(served, bodies, 8, lambda: ray.kill(ray.get_actor(replicas[0], namespace="serve"),
                                                                no_restart=True), seconds=9)
    failures = _failures(outcomes)
    assert sum(1 for o in outcomes if o[0] == 200) > 50
    assert all(status == 503 and retry_after for status, retry_after, *_ in failures), (
        f"{len(failures)} of {len(outcomes)} requests failed: {failures[:10]}")
    assert max(seconds for _, _, seconds, *_ in outcomes) < 20
    # Re-sent after a connection closed before a whole response: measured 0-3 of ~2,000-5,000 here.
    assert sum(resends > 0 for _, _, _, resends, _ in outcomes) <= 0.01 * len(outcomes)


@pytest.mark.slow
def test_rolling_out_a_new_model_version_under_load(served, model_dirs, prepared_dir, vectors_dir, tmp_path):
    """`serve.run` with a new MODEL dir while 8 clients post: no request fails, and `/v1/model` then
    reports the new version. With a surge allowance (serve/config.yaml's 25%; the fixture's cluster has room for
    one more replica) the new replica starts before the old one stops; with Ray's default 0 a one-replica
    deployment answers nothing until its replacement runs, and on a loaded machine (two training processes
    beside this test) all 8 clients timed out after 20 s in 3 runs of 3 (docs/serving.md)."""
    import requests

    shipped = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())["applications"][0]["deployments"][0]
    surge_percent = shipped["max_surge_percent"]
    assert surge_percent > 0
    _redeploy(served, model_dirs["video"], model_dirs["comment"], min_replicas=1, max_replicas=1,
              max_surge_percent=surge_percent)
    old_version = requests.get(f"{served}/v1/model", timeout=30).json()["models"]["video"]["version"]
    new_model_dir = _write_model_dir(tmp_path / "video_v2", "video", prepared_dir, vectors_dir, seed=3)
    bodies, _ = _raw_requests(prepared_dir, "video", slice(0, 20))
    outcomes = _load_while(served, bodies, 8, lambda: _redeploy(served, new_model_dir, model_dirs["comment"],
                                                                min_replicas=1, max_replicas=1,
                                                                max_surge_percent=surge_percent),
                           seconds=20)
    failures = _failures(outcomes)
    assert not failures, f"{len(failures)} of {len(outcomes)} requests failed during the rollout: {failures[:10]}"
    info = requests.get(f"{served}/v1/model", timeout=30).json()["models"]["video"]
    assert info["version"] != old_version and info["checkpoint"] == str(new_model_dir.resolve() / "model.pt")

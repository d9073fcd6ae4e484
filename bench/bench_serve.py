"""Load test of the Ray Serve deployment (video recommendation over ~10k items) vs the same model in-process.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_serve.py [--videos 10000] [--duration 20] [--long 60]

What it does, all on 127.0.0.1, each phase of fixed length (it stops by itself):
1. writes a synthetic PREPARED/ + VECTORS/ + MODEL/ of `--videos` items (an untrained SR model of the
   paper's size; the weights do not change the cost) into a temporary directory;
2. in-process: `Recommender.recommend_videos` on batches of 1, 8 and 32 requests, with the time split
   into history resolution, model forward (history encoder), the item matrix product + top-k, and
   response building;
3. starts Ray (2 CPUs) and the Serve app, then drives it with a raw-socket HTTP/1.1 keep-alive load
   generator at 1, 8 and 32 concurrent clients (8 clients for `--long` seconds) and measures p50/p95/p99
   latency, throughput and failed requests; also the model deployment called through a Serve handle
   (no HTTP, no proxy, no gateway), to split the overhead;
4. a replica-kill phase: 8 clients for `--kill-duration` s, one RecommenderModel replica is `ray.kill`ed
   mid-run, and the failed requests are counted.
A client re-sends a request the service never answered (lsvcr.serve.resend: the connection closed before the
whole response, or the ingress's own error page) up to 3 times, as HTTP clients do for idempotent requests:
`resent_after_no_answer` counts those requests, `failed` what still failed. Runs before commit a30cb0b
(2026-12-06 19:35 UTC) did not re-send: their `failed` includes cut-off responses; runs from then until the
change to lsvcr.serve.resend (2026-12-07) re-sent once, on a cut-off only (`resent_once_after_a_cut_off`).
Results: bench/results/serve.json.

`--variants haproxy proxy haproxy+throughput` runs the whole bench once per Serve set-up, back to back in
one invocation (each in its own process: the RAY_SERVE_* environment is read when Ray starts), and
writes them side by side: `{"variants": {NAME: report}, "comparison": [...]}`. An ingress alone is
`serve.ingress`'s environment as shipped (lsvcr.config.SERVE_INGRESS_ENVIRONMENT); each `+EXTRA` adds
Ray variables (VARIANT_EXTRAS): `throughput` Ray's RAY_SERVE_THROUGHPUT_OPTIMIZED=1 (user code on the
replica's event loop, buffered request logs, ...), `plain` sets it to 0, `loop` only runs user code on
the replica's event loop, `logs` only buffers the request-path logs and keeps them off stderr, `nostderr`
only keeps Serve's logs off stderr; `accesslog` / `noaccesslog` set serve.access_log on / off; `waitN`
sets serve.batch_wait_timeout_s to N ms (e.g. `haproxy+wait0.5`), `batchN` serve.max_batch_size to N,
`pin` / `nopin` set serve.pin_replica_cpus on / off (each replica's threads on its own core; on by default).
The Serve replicas run at nice 0, as `lsvcr`'s own clusters start them (lsvcr.runtime.ensure_ray).
`--interleave-waits-ms 2 0` / `--interleave-access-log` compare settings inside one cluster instead (redeployed in
turn, `--interleave-rounds` times). CPU per request is counted for the processes on a request's path
(`serve_total`) and, apart, for the rest of this Ray instance (`other_ray_processes`: raylet, GCS, the log
monitor that reads what replicas write to stderr, ...).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Replicas at nice 0, as lsvcr.runtime.ensure_ray starts them (at Ray's default of 15 the load generator, at
# nice 0, takes the replicas' CPU).
os.environ.setdefault("RAY_worker_niceness", "0")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from lsvcr.config import LSVCRConfig, ServeConfig, save_config  # noqa: E402
from lsvcr.data import schema  # noqa: E402
from lsvcr.model import LSVCRModel  # noqa: E402
from lsvcr.config import SERVE_INGRESS_ENVIRONMENT  # noqa: E402
from lsvcr.runtime import apply_serve_ingress_environment, free_local_port  # noqa: E402
from lsvcr.serve.resend import MAX_RESENDS, is_ingress_error, resend_delay_s  # noqa: E402
from lsvcr.vectors import write_item_vectors  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "serve.json"


# ----------------------------------------------------------------------------------------------------
# Synthetic inputs of realistic size


def write_synthetic_model(root: Path, num_videos: int, num_users: int, comments_per_video: int = 5,
                          text_dim: int = 256, history: int = 50, seed: int = 0) -> Path:
    """PREPARED/ (videos, comments, users, user_histories), VECTORS/ and a MODEL/ dir with an
    untrained paper-size video model. Returns the MODEL dir."""
    rng = np.random.default_rng(seed)
    prepared, vectors, model_dir = root / "prepared", root / "vectors", root / "model"
    for path in (prepared, vectors, model_dir):
        path.mkdir(parents=True, exist_ok=True)
    video_ids = rng.choice(10**9, num_videos, replace=False).astype(np.int64)
    num_comments = num_videos * comments_per_video
    comment_ids = rng.choice(10**12, num_comments, replace=False).astype(np.int64)
    comment_video = np.repeat(np.arange(1, num_videos + 1), comments_per_video).astype(np.int32)
    pools = np.arange(1, num_comments + 1, dtype=np.int32).reshape(num_videos, comments_per_video)
    pq.write_table(pa.table({
        "video_idx": pa.array(np.arange(1, num_videos + 1, dtype=np.int32)),
        "video_id": pa.array(video_ids),
        "caption": pa.array([f"video {i}" for i in range(num_videos)]),
        "category": pa.array(["synthetic"] * num_videos),
        "hot_comments": pa.array(list(pools), type=pa.list_(pa.int32())),
    }, schema=schema.VIDEOS), prepared / "videos.parquet")
    pq.write_table(pa.table({
        "comment_idx": pa.array(np.arange(1, num_comments + 1, dtype=np.int32)),
        "comment_id": pa.array(comment_ids),
        "video_idx": pa.array(comment_video),
        "content": pa.array([""] * num_comments),
        "like_count": pa.array(np.zeros(num_comments, dtype=np.int64)),
    }, schema=schema.COMMENTS), prepared / "comments.parquet")
    user_ids = np.arange(1, num_users + 1, dtype=np.int64) * 7
    pq.write_table(pa.table({"user_idx": pa.array(np.arange(1, num_users + 1, dtype=np.int32)),
                             "user_id": pa.array(user_ids)}, schema=schema.USERS), prepared / "users.parquet")
    video_history = rng.integers(1, num_videos + 1, (num_users, history)).astype(np.int32)
    record_videos = rng.integers(1, num_videos + 1, (num_users, history // 2)).astype(np.int32)
    record_comments = (record_videos[..., None] - 1) * comments_per_video + 1 + rng.integers(
        0, comments_per_video, (num_users, history // 2, 2))
    pq.write_table(pa.table({
        "user_idx": pa.array(np.arange(1, num_users + 1, dtype=np.int32)),
        "user_id": pa.array(user_ids),
        "video_history": pa.array(list(video_history), type=pa.list_(pa.int32())),
        "comment_history_videos": pa.array(list(record_videos), type=pa.list_(pa.int32())),
        "comment_history_comments": pa.array([[list(c) for c in user] for user in record_comments.astype(np.int32)],
                                             type=pa.list_(pa.list_(pa.int32()))),
    }, schema=schema.USER_HISTORIES), prepared / "user_histories.parquet")
    (prepared / "manifest.json").write_text(json.dumps({"format_version": 1, "source": "bench", "synthetic": True,
                                                         "has_comments": True}))
    video_text = rng.standard_normal((num_videos, text_dim)).astype(np.float32)
    comment_text = rng.standard_normal((num_comments, text_dim)).astype(np.float32)
    write_item_vectors(vectors, video_ids, video_text, comment_ids, comment_text, {"model": "random"})

    config = LSVCRConfig()
    torch.manual_seed(seed)
    model = LSVCRModel(config.model, num_videos, torch.zeros(num_videos + 1, text_dim),
                       torch.zeros(num_comments + 1, text_dim), torch.zeros(num_comments + 1))  # likes: shape only
    torch.save({"model_config": asdict(config.model), "task": "video", "num_videos": num_videos, "text_dim": text_dim,
                "state_dict": model.state_dict()}, model_dir / "model.pt")
    (model_dir / "inputs.json").write_text(json.dumps({"data": str(prepared), "vectors": str(vectors)}))
    save_config(config, model_dir / "config.yaml")
    (model_dir / "metrics.json").write_text(json.dumps({"task": "video", "model": "untrained (benchmark)",
                                                         "protocol": {}, "valid": {}, "test": {}}))
    return model_dir


def request_bodies(prepared: Path, count: int, explicit_share: float = 0.3, seed: int = 1) -> list[bytes]:
    """The request mix: stored-history lookups (`user_id`) and, for `explicit_share` of them, explicit
    histories of a new user (a live session): 10-50 videos and 0-10 comment records of 1-3 comments."""
    rng = random.Random(seed)
    user_ids = pq.read_table(prepared / "users.parquet")["user_id"].to_numpy()
    video_ids = pq.read_table(prepared / "videos.parquet", columns=["video_id"])["video_id"].to_numpy()
    comments = pq.read_table(prepared / "comments.parquet", columns=["comment_id", "video_idx"])
    comment_ids = comments["comment_id"].to_numpy()
    comments_of_video: dict[int, list[int]] = {}
    for comment_id, video_idx in zip(comment_ids.tolist(), comments["video_idx"].to_numpy().tolist()):
        comments_of_video.setdefault(int(video_idx), []).append(comment_id)
    bodies = []
    for _ in range(count):
        if rng.random() >= explicit_share:
            bodies.append(json.dumps({"user_id": int(rng.choice(user_ids)), "k": 10, "exclude_seen": True}).encode())
            continue
        history = [int(video_ids[rng.randrange(len(video_ids))]) for _ in range(rng.randint(10, 50))]
        records = []
        for _ in range(rng.randint(0, 10)):
            video_idx = rng.randrange(1, len(video_ids) + 1)
            pool = comments_of_video[video_idx]
            records.append({"video_id": int(video_ids[video_idx - 1]), "comment_ids": rng.sample(pool, rng.randint(1, min(3, len(pool))))})
        bodies.append(json.dumps({"video_history": history, "comment_history": records, "k": 10,
                                  "exclude_seen": True}).encode())
    return bodies


def percentiles(latencies_ms: list[float]) -> dict[str, float]:
    if not latencies_ms:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None, "mean_ms": None}
    values = np.asarray(latencies_ms)
    return {"p50_ms": round(float(np.percentile(values, 50)), 2), "p95_ms": round(float(np.percentile(values, 95)), 2),
            "p99_ms": round(float(np.percentile(values, 99)), 2), "mean_ms": round(float(values.mean()), 2)}


# ----------------------------------------------------------------------------------------------------
# In-process baseline


def bench_in_process(model_dir: Path, bodies: list[bytes], duration: float) -> dict:
    """`Recommender.recommend_videos` called directly on batches of 1, 8 and 32 requests. Every tenth
    batch is run a second time in stages (not counted) to split its time."""
    from lsvcr.serve.recommender import Recommender, build_history_batch
    from lsvcr.serve.schemas import VideoRequest

    recommender = Recommender.from_model_dirs(model_dir, None)
    requests = [VideoRequest.model_validate_json(body) for body in bodies]
    recommender.recommend_videos(requests[:32])  # warm-up
    results = {}
    for batch_size in (1, 8, 32):
        parts = {"resolve": 0.0, "encode": 0.0, "item_product_topk": 0.0, "build_response": 0.0}
        done, cursor, wall, cpu = 0, 0, 0.0, 0.0
        end = time.perf_counter() + duration
        while time.perf_counter() < end:
            batch = [requests[(cursor + i) % len(requests)] for i in range(batch_size)]
            cursor += batch_size
            t0, c0 = time.perf_counter(), time.process_time()
            recommender.recommend_videos(batch)
            whole = time.perf_counter() - t0
            wall, cpu, done = wall + whole, cpu + time.process_time() - c0, done + batch_size
            if cursor % (batch_size * 10) == 0:
                t1 = time.perf_counter()
                _, resolved, _ = recommender._resolve_all(batch, recommender.video, "video")
                t2 = time.perf_counter()
                model = recommender.video.model
                with torch.inference_mode():
                    states = model.encode_histories(build_history_batch(resolved, recommender.catalog.hot_comment),
                                                    outputs=("video",), tables=recommender.video_tables)
                    users = torch.nn.functional.normalize(model.video_user_vector(states), dim=-1)
                    t3 = time.perf_counter()
                    torch.topk(users @ recommender.video_matrix.T, 10, dim=1)
                t4 = time.perf_counter()
                parts["resolve"] += t2 - t1
                parts["encode"] += t3 - t2
                parts["item_product_topk"] += t4 - t3
                parts["build_response"] += max(0.0, whole - (t4 - t1))
        share_total = sum(parts.values()) or 1.0
        results[f"batch_{batch_size}"] = {
            "requests_per_s": round(done / wall, 1),
            "ms_per_batch": round(1000 * wall / (done / batch_size), 2),
            "cpu_ms_per_request": round(1000 * cpu / done, 2),
            "time_share": {k: round(v / share_total, 3) for k, v in parts.items()},
        }
        print(f"in-process batch {batch_size}: {results[f'batch_{batch_size}']}", flush=True)
    return results


# ----------------------------------------------------------------------------------------------------
# HTTP load generator (raw sockets, keep-alive: the client must cost less CPU than the server)


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> tuple[int, str | None, bool]:
    """Send one request on a keep-alive connection and read its whole response: (status, Retry-After, whether
    the server closes the connection after it, body)."""
    writer.write(request)
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=30)
    status = int(head.split(b" ", 2)[1])
    length, retry_after, server_closes = 0, None, False
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
        elif line.lower().startswith(b"retry-after:"):
            retry_after = line.split(b":", 1)[1].strip().decode()
        elif line.lower().replace(b" ", b"") == b"connection:close":
            server_closes = True
    body = await reader.readexactly(length)
    return status, retry_after, server_closes, body


async def _one_client(host: str, port: int, bodies: list[bytes], deadline: float, path: str, stats: dict,
                      seed: int) -> None:
    """A keep-alive client. A request the service never answered (lsvcr.serve.resend: its connection closed
    before a whole response, a replica killed mid-write or HAProxy reloading, or the ingress's own error page)
    is re-sent on a new connection, up to MAX_RESENDS times with a growing delay, as an HTTP client does for
    an idempotent request; `stats["resent"]` counts the requests re-sent, `stats["failed"]` what still failed
    (and every timeout, malformed response or non-200)."""
    rng = random.Random(seed)
    reader = writer = None
    while time.perf_counter() < deadline:
        body = bodies[rng.randrange(len(bodies))]
        request = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                   f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        start = time.perf_counter()
        for resend in range(MAX_RESENDS + 1):
            error: BaseException | None = None
            never_answered = False
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection(host, port)
                status, retry_after, server_closes, answer = await _exchange(reader, writer, request)
                never_answered = is_ingress_error(status, answer)
            except (OSError, asyncio.IncompleteReadError) as closed:  # the connection closed under the request
                error, never_answered = closed, True
            except (asyncio.TimeoutError, ValueError, IndexError) as other:  # a hang or a malformed response
                error = other
            if error is not None or never_answered or server_closes:
                if writer is not None:
                    writer.close()
                reader = writer = None
            if not never_answered or resend == MAX_RESENDS:
                break
            if resend == 0:
                stats["resent"] += 1
            what = f"{type(error).__name__}: {error}" if error is not None else f"the ingress's HTTP {status}"
            stats["errors"].append(f"{time.perf_counter() - stats['t0']:.2f}s re-sent after {what}")
            await asyncio.sleep(resend_delay_s(resend))
        if error is not None:
            stats["failed"] += 1
            stats["errors"].append(f"{time.perf_counter() - stats['t0']:.2f}s {type(error).__name__}: {error}")
            await asyncio.sleep(0.05)
            continue
        latency = (time.perf_counter() - start) * 1000
        if status == 200:
            stats["latencies"].append(latency)
            stats["completed_at"].append(time.perf_counter())
        else:
            stats["failed"] += 1
            stats["errors"].append(f"{time.perf_counter() - stats['t0']:.2f}s HTTP {status} retry-after={retry_after}")
            stats["failed_by_status"][status] = stats["failed_by_status"].get(status, 0) + 1
    if writer is not None:
        writer.close()


async def _load(host: str, port: int, bodies: list[bytes], clients: int, duration: float,
                path: str = "/v1/recommend/videos", during=None) -> dict:
    stats = {"latencies": [], "completed_at": [], "failed": 0, "resent": 0, "failed_by_status": {}, "errors": [],
             "t0": time.perf_counter()}
    deadline = time.perf_counter() + duration
    tasks = [asyncio.create_task(_one_client(host, port, bodies, deadline, path, stats, seed)) for seed in range(clients)]
    if during is not None:
        await during(stats)
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - stats["t0"]
    completions = np.sort(np.asarray([stats["t0"], *stats["completed_at"]]))
    longest_gap = float(np.diff(completions).max()) if len(completions) > 1 else elapsed
    return {"clients": clients, "longest_gap_without_a_response_s": round(longest_gap, 2), "load_average_1min": round(os.getloadavg()[0], 2), "duration_s": round(elapsed, 1), "ok": len(stats["latencies"]),
            "failed": stats["failed"], "resent_after_no_answer": stats["resent"],
            "failed_by_status": {str(k): v for k, v in stats["failed_by_status"].items()},
            "requests_per_s": round(len(stats["latencies"]) / elapsed, 1),
            **percentiles(stats["latencies"]), "first_errors": stats["errors"][:10]}


def path_cpu_seconds() -> dict[int, tuple[str, float]]:
    """pid -> (kind, CPU seconds user + system so far) of every process of *this* Ray instance (the
    children of this driver): those that can sit on a request's path by kind (the Serve actors by their
    process title: `ray::ProxyActor`, `ray::ServeReplica:lsvcr:RecommenderModel`, `ray::ServeController`, ...;
    HAProxy by name; this driver, the load generator), the rest as `other_ray_processes`. Per pid, so a replica that starts or dies within a
    phase is still counted. Unlike latency, CPU time per request does not depend on what else runs."""
    import psutil

    me = psutil.Process()
    times = me.cpu_times()
    found = {me.pid: ("load_generator", times.user + times.system)}
    for child in me.children(recursive=True):
        try:
            title, name, times = " ".join(child.cmdline()), child.name(), child.cpu_times()
        except psutil.Error:
            continue
        if "haproxy" in name:
            kind = "haproxy"
        elif title.startswith("ray::") and ("Serve" in title or "Proxy" in title):
            kind = title.removeprefix("ray::").split(" ")[0].split(".")[0]
        else:
            kind = "other_ray_processes"  # not on the path, but busier when replicas log per request
        found[child.pid] = (kind, times.user + times.system)
    return found


def cpu_ms_per_request(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]],
                       requests: int) -> dict[str, float]:
    per_kind: dict[str, float] = {}
    for pid, (kind, seconds) in after.items():
        per_kind[kind] = per_kind.get(kind, 0.0) + seconds - before.get(pid, (kind, 0.0))[1]
    per_request = {kind: round(1000 * seconds / max(requests, 1), 2) for kind, seconds in sorted(per_kind.items())}
    per_request["serve_total"] = round(sum(v for k, v in per_request.items()
                                           if k not in ("load_generator", "other_ray_processes")), 2)
    return per_request


def _model_info(host: str, port: int) -> dict:
    import urllib.request

    with urllib.request.urlopen(f"http://{host}:{port}/v1/model", timeout=30) as response:
        return json.loads(response.read())



def _replica_actor_names() -> list[str]:
    import ray

    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == "serve" and "RecommenderModel" in a["name"] and a["name"].startswith("SERVE_REPLICA")]


def running_replicas() -> int:
    from ray import serve

    from lsvcr.serve.app import APP_NAME

    states = serve.status().applications[APP_NAME].deployments["RecommenderModel"].replica_states
    return int(states.get("RUNNING", 0))


def interleaved_settings(model_dir: Path, bodies: list[bytes], settings: dict[str, ServeConfig], rounds: int,
                         seconds: float) -> dict:
    """The same Serve app redeployed with each named ServeConfig in turn, `rounds` times (A, B, A, B, ...),
    measuring 1, 8 and 32 clients for `seconds` each: ratios between set-ups taken minutes apart on a shared
    machine drift by ±20%; interleaved, the drift falls on every set-up alike."""
    from ray import serve

    from lsvcr.serve.app import APP_NAME, build_application

    phases: dict[str, list[dict]] = {}
    for round_index in range(rounds):
        for name, setting in settings.items():
            serve.run(build_application(str(model_dir), None, setting), name=APP_NAME, route_prefix="/")
            asyncio.run(_load(setting.host, setting.port, bodies, 4, 3))  # warm-up of the new replicas
            for clients in (1, 8, 32):
                cpu_before = path_cpu_seconds()
                phase = asyncio.run(_load(setting.host, setting.port, bodies, clients, seconds))
                cpu = cpu_ms_per_request(cpu_before, path_cpu_seconds(), phase["ok"])
                phases.setdefault(f"{name}_{clients}_clients", []).append(
                    {"round": round_index, **{k: phase[k] for k in ("requests_per_s", "p50_ms", "p99_ms", "failed")},
                     "serve_cpu_ms_per_request": cpu.get("serve_total"), "load_average_1min": phase["load_average_1min"]})
            print(f"round {round_index}, {name}: " + ", ".join(
                f"{c} clients {phases[f'{name}_{c}_clients'][-1]['requests_per_s']} req/s "
                f"p50 {phases[f'{name}_{c}_clients'][-1]['p50_ms']} ms" for c in (1, 8, 32)), flush=True)
    summary = {name: {"requests_per_s_mean": round(float(np.mean([r["requests_per_s"] for r in runs])), 1),
                      "requests_per_s_std": round(float(np.std([r["requests_per_s"] for r in runs])), 1),
                      "p50_ms_mean": round(float(np.mean([r["p50_ms"] for r in runs])), 2),
                      "p99_ms_mean": round(float(np.mean([r["p99_ms"] for r in runs])), 2),
                      "serve_cpu_ms_per_request_mean": round(float(np.mean([r["serve_cpu_ms_per_request"] for r in runs])), 2),
                      "failed": sum(r["failed"] for r in runs)}
               for name, runs in phases.items()}
    return {"settings": list(settings), "rounds": rounds, "seconds_per_phase": seconds, "summary": summary,
            "phases": phases}


def autoscale_timeline(model_dir: Path, bodies: list[bytes], config: ServeConfig, load_s: float) -> dict:
    """A load step on an autoscaled deployment (min 1, max 2 replicas, short delays): idle, 16 clients
    for `load_s`, idle again; the number of RUNNING replicas is sampled every 0.5 s."""
    from ray import serve

    from lsvcr.serve.app import APP_NAME, build_application

    scaled = ServeConfig(**{**asdict(config), "min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2.0,
                            "upscale_delay_s": 2.0, "downscale_delay_s": 10.0})
    serve.run(build_application(str(model_dir), None, scaled), name=APP_NAME, route_prefix="/")
    timeline: list[tuple[float, int, int]] = []  # (seconds, running replicas, clients)
    t0 = time.perf_counter()

    async def sample(seconds: float, clients: int, until_replicas: int | None = None) -> None:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            timeline.append((round(time.perf_counter() - t0, 1), await asyncio.to_thread(running_replicas), clients))
            if timeline[-1][1] == until_replicas:
                return
            await asyncio.sleep(0.5)

    async def step() -> dict:
        await sample(5, 0)
        load = asyncio.create_task(_load(config.host, config.port, bodies, 16, load_s))
        await sample(load_s, 16)
        phase = await load
        # Serve averages the load over its 30 s look-back window, then waits downscale_delay_s: back to
        # min_replicas takes about 40 s after the load stops.
        await sample(90, 0, until_replicas=scaled.min_replicas)
        return phase

    phase = asyncio.run(step())
    changes = [point for i, point in enumerate(timeline) if i == 0 or point[1:] != timeline[i - 1][1:]]
    print("autoscaling timeline (s, running replicas, clients): " + ", ".join(map(str, changes)), flush=True)
    return {"serve_config": asdict(scaled), "load_phase": {k: phase[k] for k in ("ok", "failed", "p50_ms", "p99_ms")},
            "timeline_changes": changes, "max_replicas_seen": max(p[1] for p in timeline),
            "replicas_at_end": timeline[-1][1]}


def bench_serve(model_dir: Path, bodies: list[bytes], duration: float, long_duration: float,
                kill_duration: float, replicas: int, autoscale_duration: float = 0.0,
                serve_config: ServeConfig | None = None, interleave_waits_ms: list[float] | None = None,
                interleave_rounds: int = 3, interleave_access_log: bool = False) -> dict:
    import ray
    from ray import serve

    from lsvcr.serve.app import APP_NAME, start_serving, stop_serving
    from lsvcr.serve.schemas import VideoRequest

    # address="local": never join a cluster another process started with `ray start` on this machine.
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    # A fixed replica count for the measured phases: no replica starts inside one.
    config = replace(serve_config or ServeConfig(), port=free_local_port(), min_replicas=replicas, max_replicas=replicas)
    results: dict = {"serve_config": asdict(config)}
    try:
        t0 = time.perf_counter()
        base_url = start_serving(model_dir, None, config)
        results["startup_s"] = round(time.perf_counter() - t0, 1)
        print(f"serving at {base_url} after {results['startup_s']} s", flush=True)
        host, port = config.host, config.port
        asyncio.run(_load(host, port, bodies, 4, 5))  # warm-up
        # the cores each replica may run on, as /v1/model reports them (serve.pin_replica_cpus)
        results["replica_cpu_affinity"] = sorted({tuple(_model_info(host, port)["serve"]["cpu_affinity"] or ())
                                                  for _ in range(16)})

        requests = [VideoRequest.model_validate_json(body) for body in bodies]

        async def call_through_handle() -> list[float]:
            # Inside a running loop: works whether or not Serve runs its router in a separate loop.
            handle = serve.get_deployment_handle("RecommenderModel", app_name=APP_NAME)
            latencies: list[float] = []
            end = time.perf_counter() + min(duration, 10)
            while time.perf_counter() < end:
                start = time.perf_counter()
                await handle._video_batch.remote(requests[len(latencies) % len(requests)])
                latencies.append((time.perf_counter() - start) * 1000)
            return latencies

        latencies = asyncio.run(call_through_handle())
        results["handle_1_client"] = {"requests": len(latencies), **percentiles(latencies)}
        print(f"handle, 1 client: {results['handle_1_client']}", flush=True)

        for clients, seconds in ((1, duration), (8, long_duration), (32, duration)):
            cpu_before = path_cpu_seconds()
            phase = asyncio.run(_load(host, port, bodies, clients, seconds))
            phase["cpu_ms_per_request"] = cpu_ms_per_request(cpu_before, path_cpu_seconds(), phase["ok"])
            phase["batching_one_replica_cumulative"] = _model_info(host, port)["replica_batching"]["video"]
            results[f"http_{clients}_clients"] = phase
            print(f"HTTP, {clients} clients: {phase}", flush=True)

        async def kill_one_replica(stats: dict) -> None:
            await asyncio.sleep(kill_duration / 3)
            names = _replica_actor_names()
            victim = names[0]
            ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
            stats["killed"] = victim
            stats["killed_at_s"] = round(time.perf_counter() - stats["t0"], 2)
            stats["replicas_before"] = len(names)
            print(f"killed {victim} at {stats['killed_at_s']} s ({len(names)} replicas)", flush=True)

        holder: dict = {}

        async def during(stats: dict) -> None:
            await kill_one_replica(stats)
            holder.update({k: stats[k] for k in ("killed", "killed_at_s", "replicas_before")})

        phase = asyncio.run(_load(host, port, bodies, 8, kill_duration, during=during))
        phase.update(holder)
        phase["replicas_after"] = len(_replica_actor_names())
        results["http_8_clients_replica_killed"] = phase
        print(f"HTTP, 8 clients, replica killed: {phase}", flush=True)

        if interleave_waits_ms:
            waits = {f"wait_{ms:g}ms": replace(config, batch_wait_timeout_s=ms / 1000) for ms in interleave_waits_ms}
            results["interleaved_batch_waits"] = interleaved_settings(model_dir, bodies, waits, interleave_rounds,
                                                                      min(duration, 15))
        if interleave_access_log:
            logs = {f"access_log_{'on' if on else 'off'}": replace(config, access_log=on) for on in (True, False)}
            results["interleaved_access_log"] = interleaved_settings(model_dir, bodies, logs, interleave_rounds,
                                                                     min(duration, 15))
        if autoscale_duration > 0:
            results["autoscaling"] = autoscale_timeline(model_dir, bodies, config, autoscale_duration)
    finally:
        try:
            stop_serving()
        except RuntimeError as error:  # RAY_SERVE_THROUGHPUT_OPTIMIZED: the handle's router ran on a closed loop
            print(f"serve.shutdown: {error} (Ray stops with the process)", flush=True)
        ray.shutdown()
    return results


VARIANT_EXTRAS = {"throughput": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},
                  "plain": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "0"},
                  "loop": {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"},
                  "logs": {"RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1000", "RAY_SERVE_LOG_TO_STDERR": "0"},
                  "nostderr": {"RAY_SERVE_LOG_TO_STDERR": "0"}}


def variant_setup(variant: str) -> tuple[str, dict[str, str], list[str]]:
    """`INGRESS[+EXTRA...]` -> (ingress, extra environment, extra bench arguments)."""
    ingress, *extras = variant.split("+")
    if ingress not in SERVE_INGRESS_ENVIRONMENT:
        raise SystemExit(f"unknown ingress in variant {variant!r}: one of {sorted(SERVE_INGRESS_ENVIRONMENT)}")
    environment: dict[str, str] = {}
    arguments: list[str] = []
    for extra in extras:
        wait_ms, batch_size = extra.removeprefix("wait"), extra.removeprefix("batch")
        if extra in VARIANT_EXTRAS:
            environment.update(VARIANT_EXTRAS[extra])
        elif extra in ("pin", "nopin"):
            arguments.append("--pin-replica-cpus" if extra == "pin" else "--no-pin-replica-cpus")
        elif extra in ("accesslog", "noaccesslog"):
            arguments.append("--access-log" if extra == "accesslog" else "--no-access-log")
        elif wait_ms != extra and wait_ms.replace(".", "", 1).isdigit():
            arguments.append(f"--batch-wait-ms={wait_ms}")
        elif batch_size != extra and batch_size.isdigit():
            arguments.append(f"--max-batch-size={batch_size}")
        else:
            raise SystemExit(f"unknown extra {extra!r} in variant {variant!r}: one of {sorted(VARIANT_EXTRAS)}, "
                             "pin, nopin, accesslog, noaccesslog, waitMS or batchN")
    return ingress, environment, arguments


def run_variants(variants: list[str], passed: list[str], out: Path) -> int:
    """The bench once per variant (`INGRESS[+EXTRA...]`), each in a fresh process, into one JSON."""
    import subprocess

    setups = {variant: variant_setup(variant) for variant in variants}
    reports: dict[str, dict] = {}
    for variant, (ingress, environment, arguments) in setups.items():
        variant_out = out.with_name(f"{out.stem}.{variant}.json")
        command = [sys.executable, __file__, *passed, *arguments, "--ingress", ingress, "--out", str(variant_out)]
        env = {**os.environ, **environment}
        print(f"== variant {variant}: {' '.join(command[1:])}", flush=True)
        finished = subprocess.run(command, env=env)
        if finished.returncode or not variant_out.exists():
            reports[variant] = {"error": f"exit code {finished.returncode}: see the output above"}
        else:
            reports[variant] = json.loads(variant_out.read_text())
            variant_out.unlink()
        _write_comparison(out, reports)  # after each variant: a later failure keeps the earlier ones
    print(f"wrote {out}")
    return 0 if all("error" not in report for report in reports.values()) else 1


def _write_comparison(out: Path, reports: dict[str, dict]) -> None:
    comparison = [{"variant": name, **{k: report["summary"][k] for k in (
        "http_1_client", "http_8_clients", "serve_vs_in_process_throughput", "failed_requests_with_replica_kill",
        "resent_requests_with_replica_kill", "cpu_ms_per_request_at_8_clients", "load_average_1min_at_end")},
        "load_average_1min_at_start": report["machine"]["load_average_1min_at_start"]}
        for name, report in reports.items() if "error" not in report]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": " ".join([Path(sys.executable).name, *sys.argv]),
                               "comparison": comparison, "variants": reports}, indent=2) + "\n")
    print(json.dumps(comparison, indent=2), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=10_000)
    parser.add_argument("--users", type=int, default=2_000)
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per load phase")
    parser.add_argument("--long", type=float, default=60.0, help="seconds of the 8-client phase")
    parser.add_argument("--kill-duration", type=float, default=30.0)
    parser.add_argument("--explicit-share", type=float, default=0.3,
                        help="share of requests carrying an explicit history (new users) instead of a user_id")
    parser.add_argument("--autoscale-duration", type=float, default=30.0,
                        help="seconds of the 16-client step of the autoscaling phase (0: skip it)")
    parser.add_argument("--replicas", type=int, default=2, help="model replicas (min = max) in the measured phases")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--ingress", choices=tuple(SERVE_INGRESS_ENVIRONMENT), default=ServeConfig.ingress,
                        help="haproxy (serve.ingress's default): HAProxy in front of replicas that serve HTTP "
                             "themselves (direct ingress); proxy: Serve's Python HTTP proxy")
    parser.add_argument("--batch-wait-ms", type=float, default=ServeConfig.batch_wait_timeout_s * 1000,
                        help="serve.batch_wait_timeout_s, in ms (default: the shipped value)")
    parser.add_argument("--max-batch-size", type=int, default=ServeConfig.max_batch_size,
                        help="serve.max_batch_size (default: the shipped value)")
    parser.add_argument("--pin-replica-cpus", action=argparse.BooleanOptionalAction, default=ServeConfig.pin_replica_cpus,
                        help="serve.pin_replica_cpus: each replica's threads on its own core(s) (default: the shipped value)")
    parser.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=ServeConfig.access_log,
                        help="serve.access_log: the replicas log a line per request (default: the shipped value)")
    parser.add_argument("--interleave-waits-ms", type=float, nargs="+", default=None, metavar="MS",
                        help="after the kill phase: redeploy with each batch wait in turn, --interleave-rounds times, "
                             "measuring 1, 8 and 32 clients (side-by-side ratios on a noisy machine)")
    parser.add_argument("--interleave-access-log", action="store_true",
                        help="after the kill phase: redeploy with serve.access_log on and off in turn, "
                             "--interleave-rounds times, measuring 1, 8 and 32 clients")
    parser.add_argument("--interleave-rounds", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=None, metavar="INGRESS[+EXTRA...]",
                        help="run the bench once per variant, back to back, into one JSON (see the module doc)")
    args = parser.parse_args()
    if args.variants:
        passed = []
        for name, value in vars(args).items():
            if name in ("variants", "ingress", "out", "batch_wait_ms", "max_batch_size", "pin_replica_cpus",
                        "access_log") \
                    or value is None or value is False:
                continue
            flag = f"--{name.replace('_', '-')}"
            passed += [flag, *map(str, value)] if isinstance(value, list) else [f"{flag}={value}"]
        return run_variants(args.variants, passed, args.out)
    # Read when Ray's processes start, and inherited by them from this one.
    apply_serve_ingress_environment(args.ingress)
    serve_config = ServeConfig(ingress=args.ingress, batch_wait_timeout_s=args.batch_wait_ms / 1000,
                               max_batch_size=args.max_batch_size, pin_replica_cpus=args.pin_replica_cpus,
                               access_log=args.access_log)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="lsvcr-bench-serve-") as tmp:
        model_dir = write_synthetic_model(Path(tmp), args.videos, args.users)
        bodies = request_bodies(Path(tmp) / "prepared", 2000, args.explicit_share)
        report = {
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch_threads": torch.get_num_threads(),
                        "load_average_1min_at_start": round(os.getloadavg()[0], 2)},
            "ingress": args.ingress,
            "ray_environment": {name: value for name, value in sorted(os.environ.items())
                                if name.startswith("RAY_SERVE_") or name == "RAY_worker_niceness"},
            "explicit_history_share": args.explicit_share,
            "videos": args.videos,
            "users": args.users,
            "in_process": bench_in_process(model_dir, bodies, min(args.duration, 10)),
        }
        report["serve"] = bench_serve(model_dir, bodies, args.duration, args.long, args.kill_duration, args.replicas,
                                      args.autoscale_duration, serve_config, args.interleave_waits_ms,
                                      args.interleave_rounds, args.interleave_access_log)
    in_process_best = report["in_process"]["batch_32"]["requests_per_s"]
    serve_best = max(report["serve"][f"http_{c}_clients"]["requests_per_s"] for c in (1, 8, 32))
    eight = report["serve"]["http_8_clients"]
    one = report["serve"]["http_1_clients"]
    in_process_8 = report["in_process"]["batch_8"]["cpu_ms_per_request"]
    throughput_ratio = round(serve_best / in_process_best, 3)
    report["summary"] = {
        "load_average_1min_at_end": round(os.getloadavg()[0], 2),
        "serve_vs_in_process_throughput": throughput_ratio,
        "targets": {  # issue 13
            "p50_at_8_clients_le_15ms": eight["p50_ms"] is not None and eight["p50_ms"] <= 15,
            "p99_at_8_clients_le_60ms": eight["p99_ms"] is not None and eight["p99_ms"] <= 60,
            "no_failed_request_in_long_run": eight["failed"] == 0,
            "p50_at_1_client_le_8ms": one["p50_ms"] is not None and one["p50_ms"] <= 8,
            "serve_throughput_ge_0.6x_in_process": throughput_ratio >= 0.6,
            "in_process_cpu_le_1ms_at_batch_8": in_process_8 <= 1.0,
        },
        "http_8_clients": {k: eight[k] for k in ("requests_per_s", "p50_ms", "p99_ms", "failed")},
        "http_1_client": {k: one[k] for k in ("requests_per_s", "p50_ms", "p99_ms", "failed")},
        "failed_requests_with_replica_kill": report["serve"]["http_8_clients_replica_killed"]["failed"],
        "resent_requests_with_replica_kill": report["serve"]["http_8_clients_replica_killed"]["resent_after_no_answer"],
        # Where the CPU goes per request at 8 clients: the model's own work (in-process, batch 8) vs every
        # process on the request path (the model replica's figure includes the model's work).
        "cpu_ms_per_request_at_8_clients": {"model_in_process_batch_8": in_process_8, **eight["cpu_ms_per_request"]},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["summary"], indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

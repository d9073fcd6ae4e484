"""The `serve` stage of bench/bench_scale.py: `lsvcr serve` (the real CLI) on the trained models, then
1,000 real HTTP requests on 127.0.0.1, one keep-alive client, users drawn from PREPARED's stored histories.

    python bench/scale_serve.py --prepared W/prepared --video-model W/model_video --comment-model W/model_comment --out W/serve.json

Writes the start time (process start to /healthz answering), the request time, latency percentiles and
failures to --out; bench_scale.py watches this process's tree (the server, Ray, its replicas) for RSS.
Requests alternate between /v1/recommend/videos and /v1/recommend/comments when both models are given.
"""

from __future__ import annotations

import argparse
import http.client
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lsvcr.data.prepared import USER_HISTORIES_FILE, read_videos  # noqa: E402


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_healthy(port: int, server: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"lsvcr serve exited with {server.returncode} before answering")
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("GET", "/healthz")
            if connection.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"lsvcr serve did not answer /healthz within {timeout_s:.0f} s")


def request_bodies(prepared: Path, count: int, with_comments: bool, seed: int = 0) -> list[tuple[str, dict]]:
    """`count` (path, body) pairs: stored users at random; comment requests on videos with a comment pool."""
    rng = np.random.default_rng(seed)
    users = pq.read_table(prepared / USER_HISTORIES_FILE, columns=["user_id"]).column("user_id").to_numpy()
    videos = read_videos(prepared, ["video_id", "hot_comments"])
    with_pool = videos.column("video_id").to_numpy()[videos.column("hot_comments").combine_chunks().value_lengths()
                                                       .to_numpy(zero_copy_only=False) > 0]
    bodies = []
    for i in range(count):
        user = int(rng.choice(users))
        if with_comments and i % 2:
            bodies.append(("/v1/recommend/comments", {"user_id": user, "video_id": int(rng.choice(with_pool)), "k": 10}))
        else:
            bodies.append(("/v1/recommend/videos", {"user_id": user, "k": 10}))
    return bodies


def send_all(port: int, bodies: list[tuple[str, dict]]) -> dict:
    latencies, failed, statuses = [], 0, {}
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    started = time.perf_counter()
    for path, body in bodies:
        sent = time.perf_counter()
        for attempt in range(2):  # HAProxy closes keep-alive connections on a reload: re-send once
            try:
                connection.request("POST", path, body=json.dumps(body), headers={"content-type": "application/json"})
                response = connection.getresponse()
                response.read()
                break
            except (http.client.HTTPException, OSError):
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                response = None
        latencies.append(time.perf_counter() - sent)
        status = response.status if response is not None else 0
        statuses[str(status)] = statuses.get(str(status), 0) + 1
        failed += status != 200
    seconds = time.perf_counter() - started
    latency_ms = np.array(latencies) * 1000
    return {"requests": len(bodies), "requests_seconds": round(seconds, 2), "failed": failed, "statuses": statuses,
            "p50_ms": round(float(np.percentile(latency_ms, 50)), 2),
            "p99_ms": round(float(np.percentile(latency_ms, 99)), 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepared", type=Path, required=True, help="PREPARED dir of the models (request users)")
    parser.add_argument("--video-model", type=Path, required=True)
    parser.add_argument("--comment-model", type=Path, default=None)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--port", type=int, default=0, help="HTTP port (default: a free one)")
    parser.add_argument("--start-timeout", type=float, default=900.0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.port = args.port or free_port()
    command = [sys.executable, "-m", "lsvcr", "serve", "--video-model", str(args.video_model), "--port", str(args.port)]
    if args.comment_model:
        command += ["--comment-model", str(args.comment_model)]
    started = time.perf_counter()
    # `lsvcr serve` starts its own local cluster, with free HAProxy stats/metrics ports (lsvcr.runtime).
    server = subprocess.Popen(command, stdout=sys.stdout, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        wait_until_healthy(args.port, server, args.start_timeout)
        report = {"start_seconds": round(time.perf_counter() - started, 2), "command": " ".join(command[1:])}
        report |= send_all(args.port, request_bodies(args.prepared, args.requests, args.comment_model is not None))
    finally:
        stopping = time.perf_counter()
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=120)
        except subprocess.TimeoutExpired:
            server.kill()
    report["stop_seconds"] = round(time.perf_counter() - stopping, 2)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))
    return 0 if report["failed"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""Simulated multi-node cluster: a vLLM encode actor is killed (SIGKILL) after some shards are written. Ray Data
restarts the actor and retries only the unfinished blocks; shards finished before the kill are not rewritten.
Run as a script (its own Ray cluster); prints one JSON line.

usage: encode_actor_failure.py PREPARED WORKDIR
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import ray
from ray.cluster_utils import Cluster
from ray.util.state import list_actors


def shard_times(partial: Path) -> dict[str, int]:
    return {str(p.relative_to(partial)): p.stat().st_mtime_ns for p in partial.glob("*/part-*.parquet")}


def main() -> None:
    prepared, workdir = sys.argv[1], Path(sys.argv[2])
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    out = workdir / "vectors"
    partial = workdir / ".vectors.partial"
    command = [sys.executable, "-m", "lsvcr", "encode", "--data", prepared, "--what", "items", "--out", str(out),
               "--set", "encode.shard_size=128", "--set", "encode.batch_size=32"]
    driver = subprocess.Popen(command, env={**os.environ, "RAY_ADDRESS": cluster.address},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    before_kill, killed_pid = {}, None
    while driver.poll() is None:
        if killed_pid is None and partial.exists() and len(shard_times(partial)) >= 2:
            actors = [a for a in list_actors(filters=[("state", "=", "ALIVE")])
                      if "VLLMEmbedder" in (a.class_name or "")]
            if actors:
                before_kill = shard_times(partial)
                killed_pid = actors[0].pid
                os.kill(killed_pid, signal.SIGKILL)
        time.sleep(0.2)
    after = {str(p.relative_to(out)): p.stat().st_mtime_ns for p in out.glob("*/part-*.parquet")} \
        if driver.returncode == 0 else {}
    rewritten = [name for name, stamp in before_kill.items() if after.get(name) != stamp]
    vectors_ok = True
    rows = 0
    for part in [*out.glob("videos/part-*.parquet"), *out.glob("comments/part-*.parquet")]:
        table = pq.read_table(part)
        rows += table.num_rows
        flat = table["vector"].combine_chunks().values.to_numpy(zero_copy_only=False)
        vectors_ok &= bool(np.isfinite(flat).all())
    expected = pq.read_metadata(Path(prepared) / "videos.parquet").num_rows + \
        pq.read_metadata(Path(prepared) / "comments.parquet").num_rows
    print(json.dumps({"returncode": driver.returncode, "killed_pid": killed_pid,
                      "shards_before_kill": len(before_kill), "shards_after": len(after),
                      "rewritten_after_kill": rewritten, "rows": rows, "expected_rows": expected,
                      "finite": vectors_ok}))
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main()

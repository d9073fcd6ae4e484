"""Simulated multi-node cluster: the node running the fine-tuning worker dies mid-run; Ray Train restarts the
worker group on a replacement node from the last checkpoint and the run finishes. Also trains the same config
without a failure on the same cluster, for comparison. Run as a script (its own Ray cluster); prints one JSON line.

usage: finetune_node_failure.py PREPARED VECTORS WORKDIR EPOCHS KILL_AFTER_EPOCH
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from ray.cluster_utils import Cluster

from lsvcr.report import read_jsonl


def finetune_command(prepared: str, vectors: str, out: Path, epochs: int) -> list[str]:
    return [sys.executable, "-m", "lsvcr", "finetune", "--data", prepared, "--vectors", vectors, "--task", "video",
            "--out", str(out), "--set", f"finetune.max_epochs={epochs}", "--set", "finetune.patience=100",
            "--set", "finetune.batch_size=64", "--set", "finetune.max_failures=3",
            "--set", "finetune.checkpoints_to_keep=2"]


def main() -> None:
    prepared, vectors, workdir = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    epochs, kill_after = int(sys.argv[4]), int(sys.argv[5])
    # Head without CPUs: the Train worker must run on a worker node, which is then killed.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    doomed = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    env = {**os.environ, "RAY_ADDRESS": cluster.address}
    out = workdir / "killed"
    log_path = workdir / ".killed.partial" / "train_log.jsonl"
    driver = subprocess.Popen(finetune_command(prepared, vectors, out, epochs), env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed_after = None
    while driver.poll() is None:
        rows = read_jsonl(log_path) if log_path.exists() else []
        checkpoints = list((workdir / ".killed.partial" / "ray_train").glob("checkpoint_*"))
        # Kill only once a checkpoint is persisted: before that, a restart rightly begins at epoch 1.
        if killed_after is None and len(rows) >= kill_after and checkpoints:
            killed_after = len(rows)
            cluster.remove_node(doomed, allow_graceful=False)
            cluster.add_node(num_cpus=1)  # the replacement an autoscaler would bring up
        time.sleep(0.2)
    killed_metrics = json.loads((out / "metrics.json").read_text()) if driver.returncode == 0 else None

    reference = workdir / "reference"
    subprocess.run(finetune_command(prepared, vectors, reference, epochs), env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    reference_metrics = json.loads((reference / "metrics.json").read_text())
    print(json.dumps({
        "killed_after_epoch": killed_after, "returncode": driver.returncode,
        "killed_run": killed_metrics and {key: killed_metrics[key] for key in ("test", "valid", "epochs_run",
                                                                               "resumed_after_epochs")},
        "history_epochs": [row["epoch"] for row in read_jsonl(out / "train_log.jsonl")],
        "reference_run": {key: reference_metrics[key] for key in ("test", "valid", "epochs_run")},
    }))
    cluster.shutdown()


if __name__ == "__main__":
    main()

"""Simulated multi-node cluster: a worker node dies during fine-tuning; Ray Train restarts the worker on a new node
from the last checkpoint and the run finishes. Run as a script (its own Ray cluster), prints one JSON line.

usage: finetune_node_failure.py PREPARED VECTORS OUT EPOCHS KILL_AFTER_EPOCH
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

from lsvcr.config import load_config
from lsvcr.finetune import run_finetune
from lsvcr.report import read_jsonl


def main() -> None:
    prepared, vectors, out, epochs, kill_after = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    # Head without CPUs: the Train worker must live on a worker node, which we then kill.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    doomed = cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address)
    config = load_config(overrides=[
        f"finetune.max_epochs={epochs}", "finetune.patience=100", "finetune.batch_size=64",
        "finetune.max_failures=3", "finetune.checkpoints_to_keep=2", "model.hidden_dropout=0.1",
    ])
    log_path = out.parent / f".{out.name}.partial" / "train_log.jsonl"
    killed = {}

    def kill_when_ready() -> None:
        while True:
            rows = read_jsonl(log_path) if log_path.exists() else []
            if len(rows) >= kill_after:
                killed["after_epoch"] = len(rows)
                cluster.add_node(num_cpus=1)  # the replacement the autoscaler would bring up
                cluster.remove_node(doomed, allow_graceful=False)
                killed["at"] = time.time()
                return
            time.sleep(0.2)

    watcher = threading.Thread(target=kill_when_ready, daemon=True)
    watcher.start()
    result = run_finetune(config, prepared, vectors, out)
    watcher.join(timeout=1)
    print(json.dumps({"killed": killed, "resumed_after_epochs": result.metrics.get("resumed_after_epochs"),
                      "epochs_run": result.metrics.get("epochs_run"),
                      "history_epochs": [row["epoch"] for row in result.history],
                      "test": result.metrics["test"]}))
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main()

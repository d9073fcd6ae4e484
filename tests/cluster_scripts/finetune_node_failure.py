"""Simulated multi-node cluster: the node running the fine-tuning worker dies mid-run; Ray Train restarts the
worker group on a replacement node from the last checkpoint and the run finishes. Also trains the same config
without a failure on the same cluster, for comparison. Run as a script (its own Ray cluster); prints one JSON line.

usage: finetune_node_failure.py PREPARED VECTORS WORKDIR EPOCHS

The node is killed once Ray Train's controller has *registered* a checkpoint of an epoch <= EPOCHS - 2 (its
`checkpoint_manager_snapshot.json` lists it). A checkpoint folder on disk is not enough: the controller
collects reports when it polls the workers, and a worker group restarted before that poll starts from
scratch (the flake this test had while it watched the folders).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from ray.cluster_utils import Cluster

from lsvcr.training_log import read_jsonl

# The controller polls (and registers reported checkpoints) every 2 s by default; poll faster so a
# registered checkpoint appears while the short test run still has epochs to go.
os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.5"


def finetune_command(prepared: str, vectors: str, out: Path, epochs: int) -> list[str]:
    return [sys.executable, "-m", "lsvcr", "finetune", "--data", prepared, "--vectors", vectors, "--task", "video",
            "--out", str(out), "--set", f"finetune.max_epochs={epochs}", "--set", "finetune.patience=100",
            "--set", "finetune.batch_size=64", "--set", "finetune.max_failures=3",
            "--set", "finetune.checkpoints_to_keep=2"]


def registered_epoch(run_dir: Path) -> int | None:
    """The epoch of the latest checkpoint the Train controller has registered, if any."""
    snapshot = run_dir / "ray_train" / "checkpoint_manager_snapshot.json"
    try:
        latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result")
    except (OSError, ValueError):  # not written yet, or caught mid-write
        return None
    return latest["metrics"]["epoch"] if latest else None


def main() -> None:
    prepared, vectors, workdir, epochs = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
    # Head without CPUs: the Train worker must run on a worker node, which is then killed.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    doomed = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    env = {**os.environ, "RAY_ADDRESS": cluster.address}
    out = workdir / "killed"
    driver_log = workdir / "killed_driver.log"
    with driver_log.open("w") as log_file:
        driver = subprocess.Popen(finetune_command(prepared, vectors, out, epochs), env=env,
                                  stdout=log_file, stderr=subprocess.STDOUT)
        killed_at_registered_epoch = None
        while driver.poll() is None:
            epoch = registered_epoch(workdir / ".killed.partial")
            if killed_at_registered_epoch is None and epoch is not None and epoch <= epochs - 2:
                killed_at_registered_epoch = epoch
                cluster.remove_node(doomed, allow_graceful=False)
                cluster.add_node(num_cpus=1)  # the replacement an autoscaler would bring up
            time.sleep(0.1)
    killed_metrics = json.loads((out / "metrics.json").read_text()) if driver.returncode == 0 else None

    reference = workdir / "reference"
    subprocess.run(finetune_command(prepared, vectors, reference, epochs), env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    reference_metrics = json.loads((reference / "metrics.json").read_text())
    print(json.dumps({
        "killed_at_registered_epoch": killed_at_registered_epoch, "returncode": driver.returncode,
        "driver_log": str(driver_log),
        "killed_run": killed_metrics and {key: killed_metrics[key] for key in ("test", "valid", "epochs_run",
                                                                               "resumed_after_epochs")},
        "history_epochs": [row["epoch"] for row in read_jsonl(out / "train_log.jsonl")] if killed_metrics else None,
        "reference_run": {key: reference_metrics[key] for key in ("test", "valid", "epochs_run")},
    }))
    cluster.shutdown()


if __name__ == "__main__":
    main()

"""Failure handling on a simulated multi-node cluster (`ray.cluster_utils.Cluster`, in a subprocess so it has
its own Ray cluster next to the session's)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).parent / "cluster_scripts"
pytestmark = pytest.mark.slow

# Random ranking of 100 candidates gives NDCG@5 of about 0.03.
RANDOM_NDCG5 = 0.03


def run_script(name: str, *args: str, timeout: float = 1200) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    result = subprocess.run([sys.executable, str(SCRIPTS / name), *args], capture_output=True, text=True,
                            timeout=timeout, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads([line for line in result.stdout.splitlines() if line.startswith("{")][-1])


def test_killed_worker_node_resumes_from_checkpoint(tiny_prepared_dir, tiny_minilm_vectors_dir, tmp_path):
    epochs = 5
    outcome = run_script("finetune_node_failure.py", str(tiny_prepared_dir), str(tiny_minilm_vectors_dir),
                         str(tmp_path), str(epochs))
    driver_log = Path(outcome["driver_log"]).read_text()[-4000:]
    assert outcome["killed_at_registered_epoch"] is not None, "the worker node was never killed\n" + driver_log
    assert outcome["returncode"] == 0, driver_log
    killed, reference = outcome["killed_run"], outcome["reference_run"]
    # The restarted worker group continued from a registered checkpoint instead of starting over...
    resumed = killed["resumed_after_epochs"]
    assert resumed and resumed[0] >= outcome["killed_at_registered_epoch"], driver_log
    assert outcome["history_epochs"] == list(range(1, epochs + 1))
    assert killed["epochs_run"] == reference["epochs_run"] == epochs
    # ...and ends with the quality of an uninterrupted run (120 test users: a few points of noise).
    assert killed["test"]["ndcg@5"] > 2 * RANDOM_NDCG5
    assert abs(killed["valid"]["ndcg@5"] - reference["valid"]["ndcg@5"]) < 0.05
    assert abs(killed["test"]["ndcg@5"] - reference["test"]["ndcg@5"]) < 0.06


def test_killed_encode_actor_redoes_only_unfinished_shards(tiny_prepared_dir, tmp_path):
    outcome = run_script("encode_actor_failure.py", str(tiny_prepared_dir), str(tmp_path))
    assert outcome["returncode"] == 0
    assert outcome["killed_pid"] is not None, "no encode actor was killed (the run finished too fast?)"
    assert outcome["shards_before_kill"] >= 2
    assert outcome["rewritten_after_kill"] == [], "shards finished before the kill were encoded again"
    assert outcome["shards_after"] > outcome["shards_before_kill"]
    assert outcome["rows"] == outcome["expected_rows"] and outcome["finite"]

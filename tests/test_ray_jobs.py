"""`ray job submit` of the ray_jobs entry points against a real local head node (`ray start --head`).

The head runs in its own process group with a private temp dir and is ended by signalling that group:
`ray stop` would kill every Ray process of the user, including the test session's cluster.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from lsvcr.runtime import free_local_port

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = str(Path(sys.executable).parent)
pytestmark = pytest.mark.slow



def _job_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"RAY_AUTH_MODE": "disabled", "PATH": f"{VENV_BIN}:{env.get('PATH', '')}", "OMP_NUM_THREADS": "1"})
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.fixture(scope="module")
def head_node():
    temp_dir = tempfile.mkdtemp(prefix="lsvcr-head-", dir="/tmp")  # short: Unix socket paths are limited
    gcs_port, dashboard_port, agent_port = free_local_port(), free_local_port(), free_local_port()
    # Every port is chosen here: the test session's own Ray (conftest) already holds the defaults, e.g. the
    # dashboard agent's 52365, and a head whose agent cannot bind accepts no job ("No available agent").
    process = subprocess.Popen(
        [f"{VENV_BIN}/ray", "start", "--head", f"--port={gcs_port}", f"--dashboard-port={dashboard_port}",
         "--dashboard-host=127.0.0.1", f"--dashboard-agent-listen-port={agent_port}",
         f"--dashboard-agent-grpc-port={free_local_port()}", f"--runtime-env-agent-port={free_local_port()}",
         f"--metrics-export-port={free_local_port()}", f"--ray-client-server-port={free_local_port()}",
         "--num-cpus=2", "--block", f"--temp-dir={temp_dir}"],
        env=_job_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard_port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:  # the dashboard answers first; jobs need the head's agent as well
            urllib.request.urlopen(f"{address}/api/version", timeout=2)
            urllib.request.urlopen(f"http://127.0.0.1:{agent_port}/api/healthz", timeout=2)
            break
        except OSError:
            time.sleep(1)
    else:
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail("the local head node and its dashboard agent did not start within 120 s")
    yield address
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # whatever the graceful stop left behind
    except ProcessLookupError:
        pass


def submit(address: str, script: str, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    runtime_env = {"env_vars": {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}}
    return subprocess.run(
        [f"{VENV_BIN}/ray", "job", "submit", "--address", address, "--working-dir", str(REPO),
         "--runtime-env-json", json.dumps(runtime_env), "--", "python", f"ray_jobs/{script}", *args],
        env=_job_env(), capture_output=True, text=True, timeout=timeout,
    )


def write_job_config(path: Path, storage: Path, **sections) -> Path:
    config = {"paths": {"storage": str(storage), "synth_preset": "tiny"}, **sections}
    path.write_text(yaml.safe_dump(config))
    return path


def test_prepare_job_then_resubmit_skips(head_node, tmp_path):
    config = write_job_config(tmp_path / "job.yaml", tmp_path / "run")
    first = submit(head_node, "prepare.py", "--config", str(config))
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "succeeded" in first.stdout
    manifest = json.loads((tmp_path / "run/prepared/manifest.json").read_text())
    assert manifest["synthetic"] is True and manifest["counts"]["video_samples"]["test"] > 0
    assert (tmp_path / "run/prepared/_SUCCESS").exists()
    stamp = (tmp_path / "run/prepared/manifest.json").stat().st_mtime_ns

    again = submit(head_node, "prepare.py", "--config", str(config))
    assert again.returncode == 0
    assert '"skipped"' in again.stdout and '"prepare"' in again.stdout.split('"skipped"')[1]
    assert (tmp_path / "run/prepared/manifest.json").stat().st_mtime_ns == stamp


def test_bad_job_config_fails_with_a_clear_message(head_node, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("finetune:\n  learning_rate: 0.1\n")
    result = submit(head_node, "finetune.py", "--config", str(config))
    assert result.returncode != 0
    assert "unknown config key 'finetune.learning_rate'" in result.stdout + result.stderr


def test_pipeline_job_runs_every_stage_and_a_resubmit_skips_them(head_node, tmp_path):
    """The whole pipeline as a submitted job on the tiny data set: vLLM encoding with the default LLM on a
    sample of prompts, frozen alignment, four fine-tunes, evaluation, report. A re-submit redoes nothing."""
    config = write_job_config(
        tmp_path / "job.yaml", tmp_path / "run",
        encode={"max_user_samples": 16, "history_length": 4, "max_prompt_tokens": 256, "cpus_per_actor": 2},
        align={"epochs": 1, "batch_size": 8},
        finetune={"max_epochs": 2, "patience": 2, "batch_size": 64},
    )
    first = submit(head_node, "pipeline.py", "--config", str(config), timeout=1500)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    run = tmp_path / "run"
    for stage in ("prepared", "vectors", "aligned", "report"):
        assert (run / stage / "_SUCCESS").exists(), f"{stage} is not finished"
    for model in ("video", "video-noalign", "comment", "comment-noalign", "comment-likeprior"):
        metrics = json.loads((run / "models" / model / "metrics.json").read_text())
        assert metrics["epochs_run"] >= 1 and 0 <= metrics["test"]["ndcg@5"] <= 1
    report = (run / "report" / "report.md").read_text()
    for row in ("LSVCR (aligned)", "LSVCR (no alignment)", "LSVCR (aligned), another user's history",
                "LSVCR + like prior (aligned)", "popularity (like count, reference)",
                "popularity (train interactions, the bar)"):
        assert row in report
    assert "Protocol:" in report and (run / "report" / "results.png").stat().st_size > 0
    assert "Stage 2 ran at most 2 epochs, stopping after 2 without improvement" in report

    again = submit(head_node, "pipeline.py", "--config", str(config))
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    skipped = again.stdout.split('"skipped"')[1]
    for stage in ("prepare", "encode", "align", "finetune-video", "finetune-video-noalign", "finetune-comment",
                  "finetune-comment-noalign", "finetune-comment-likeprior"):
        assert f'"{stage}"' in skipped, f"{stage} ran again on re-submit"


def test_the_report_says_which_runs_the_epoch_cap_ended():
    """A run whose best epoch is within `patience` of the cap was still improving: the report must say its
    figures are the budget's (the demo caps stage 2 at 12 epochs; the paper runs up to 50, patience 5)."""
    from lsvcr.pipeline_report import budget_lines

    rows = {"LSVCR (aligned)": {"best_epoch": 11, "epochs_run": 12},
            "LSVCR (no alignment)": {"best_epoch": 6, "epochs_run": 9},
            "LSVCR (aligned), another user's history": {"test": {}}, "popularity": {"test": {}}}
    text = budget_lines(rows, max_epochs=12, patience=3)[0]
    assert "LSVCR (aligned) 11 of 12, LSVCR (no alignment) 6 of 9" in text
    assert "still improving:** LSVCR (aligned)." in text
    assert "cap" not in budget_lines({"LSVCR (aligned)": {"best_epoch": 8, "epochs_run": 12}}, 12, 3)[0]
    assert budget_lines({"popularity": {"test": {}}}, 12, 3) == []

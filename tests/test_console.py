"""The console (lsvcr.console): `lsvcr demo` prints a short stage log, progress bars that never flood a
log file, the workers' epoch lines relayed to the driver; Ray's and vLLM's output goes to files under the
run's logs/; errors (bad input, a failing Ray Train worker) still show their message on the console."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from lsvcr import console

ROOT = Path(__file__).resolve().parents[1]
# What the quiet console must never show: Ray Data's progress blocks, forwarded worker/actor output,
# Ray Train's per-report dumps and health-check warnings, Ray's start-up lines, C-level core-worker logs.
NOISE = ("logging_progress", "PlacementGroupCleaner", "RayTrainWorker", "TrainController", "MapWorker",
         "TrainingReport", "core_worker.cc", "Started a local Ray instance", "non-default args", "(raylet)", "\r")


def run_lsvcr(*args: str, timeout: float = 1200, **env: str) -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items() if key != console.VERBOSE_ENV}
    environment.update(OMP_NUM_THREADS="1", **env)
    return subprocess.run([sys.executable, "-m", "lsvcr", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=environment)


def console_lines(result: subprocess.CompletedProcess) -> list[str]:
    return (result.stdout + result.stderr).splitlines()


# ----------------------------------------------------------------------------- progress bars


def test_progress_in_a_log_file_is_a_few_quarter_lines_and_a_short_step_none(monkeypatch):
    monkeypatch.setattr(console, "QUIET_SECONDS", 0.05)
    stream = io.StringIO()
    with console.Progress(1000, "encode items", unit="text", stream=stream) as bar:
        time.sleep(0.06)
        for _ in range(1000):
            bar.update(1)
            bar.set_postfix(tokens_per_s=12.5)
    lines = stream.getvalue().splitlines()
    assert [line.split(":")[1].split()[0] for line in lines] == ["25%", "50%", "75%", "100%"]
    assert "\r" not in stream.getvalue() and all("tokens_per_s=12.5" in line for line in lines)

    quick = io.StringIO()
    monkeypatch.setattr(console, "QUIET_SECONDS", 60.0)
    assert list(console.iterate(range(50), 50, "eval valid", leave=False)) == list(range(50))
    with console.Progress(50, "eval valid", stream=quick) as bar:
        bar.update(50)
    assert quick.getvalue() == ""


def test_progress_on_a_terminal_is_one_live_tqdm_line():
    main_fd, terminal_fd = pty.openpty()
    fcntl.ioctl(terminal_fd, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a 100-column terminal
    with os.fdopen(terminal_fd, "w") as terminal:
        with console.Progress(200, "encode items", unit="text", stream=terminal) as bar:
            for _ in range(200):
                bar.update(1)
        terminal.flush()
        chunks = []
        while select.select([main_fd], [], [], 0.2)[0]:
            chunks.append(os.read(main_fd, 65536))
    os.close(main_fd)
    output = b"".join(chunks).decode(errors="replace")
    assert "encode items" in output and "200/200" in output
    assert output.count("\r") >= 2 and output.count("\n") <= 1  # redrawn in place, not one line per update


# ----------------------------------------------------------------------------- errors (a Ray cluster each)


def test_bad_input_shows_one_clear_error_and_names_the_logs(tmp_path):
    result = run_lsvcr("demo", "--config", "configs/demo.yaml", "--raw", str(tmp_path / "missing"),
                       "--out", str(tmp_path / "run"), timeout=300)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "lsvcr demo: error:" in result.stderr and str(tmp_path / "missing") in result.stderr
    assert "Traceback" not in result.stderr
    assert f"logs: {tmp_path / 'run' / 'logs' / 'driver.log'}" in result.stderr
    lines = console_lines(result)
    assert len(lines) <= 10, lines
    assert not [line for line in lines if any(noise in line for noise in NOISE)]


# ----------------------------------------------------------------------------- the demo end to end


@pytest.fixture(scope="module")
def tiny_demo(tiny_llm_dir, tmp_path_factory):
    """`lsvcr demo` on the tiny preset with the tiny random Llama on vLLM: every stage, Serve included."""
    out = tmp_path_factory.mktemp("console") / "run"
    result = run_lsvcr(
        "demo", "--config", "configs/demo.yaml", "--out", str(out),
        "--set", "paths.synth_preset=tiny", "--set", f"encode.model={tiny_llm_dir}",
        "--set", "encode.max_user_samples=16", "--set", "encode.history_length=5",
        "--set", "encode.max_prompt_tokens=400", "--set", "align.epochs=2", "--set", "align.batch_size=8",
        "--set", "finetune.max_epochs=1")
    return out, result


@pytest.mark.slow
@pytest.mark.timeout(2400)  # the module's demo run: about 5 min on a quiet 2-core machine
def test_demo_console_is_short_and_free_of_ray_noise(tiny_demo):
    out, result = tiny_demo
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = console_lines(result)
    assert len(lines) <= 90, "\n".join(lines)
    noisy = [line for line in lines if any(noise in line for noise in NOISE)]
    assert not noisy, noisy
    text = "\n".join(lines)
    for stage in ("synth", "prepare", "encode", "align", "finetune-video", "finetune-comment"):
        assert f"==> stage {stage}" in text and f"<== stage {stage}:" in text
    # the workers' epoch lines come through the relay: one per epoch and model, with loss, metric and time
    epoch_lines = [line for line in lines if re.search(r" epoch \d+: loss .* valid ndcg@5 ", line)]
    assert len(epoch_lines) >= 4 and all(line.rstrip().endswith(" s") for line in epoch_lines)
    assert "align epoch 2/2: loss" in text
    assert "POST http://" in text and f"results: {out}/report/report.md" in text
    assert f"logs: {out / 'logs' / 'driver.log'}" in result.stdout.splitlines()[-1]


@pytest.mark.slow
def test_demo_ray_and_worker_output_is_in_the_run_log_files(tiny_demo):
    out, result = tiny_demo
    assert result.returncode == 0
    driver_log = (out / "logs" / "driver.log").read_text()
    assert "Started a local Ray instance" in driver_log  # Ray's driver-side lines: the file, not the console
    ray_logs = out / "logs" / "ray"
    assert ray_logs.is_symlink() and ray_logs.is_dir()
    worker_output = "\n".join(path.read_text(errors="replace") for path in ray_logs.glob("worker-*"))
    assert "epoch 1:" in worker_output  # what a Ray Train worker printed, kept in its log file
    assert "Initializing a V1 LLM engine" in worker_output or "vllm" in worker_output.lower()


@pytest.mark.slow
def test_a_failing_train_worker_shows_its_error_on_the_console(tiny_demo, tmp_path):
    """A bad --init checkpoint fails inside the Ray Train worker: the console shows the worker's clear
    error (not a wrapped Ray traceback), though worker output itself is not forwarded."""
    import torch

    out, result = tiny_demo
    assert result.returncode == 0
    bad = tmp_path / "unrelated.pt"
    torch.save({"state_dict": {"some.other.weight": torch.zeros(3)}}, bad)
    failed = run_lsvcr("finetune", "--data", str(out / "prepared"), "--vectors", str(out / "vectors"),
                       "--init", str(bad), "--out", str(tmp_path / "model"), "--set", "finetune.max_epochs=1",
                       "--set", "finetune.max_failures=0", timeout=600)
    assert failed.returncode == 2, failed.stdout[-3000:] + failed.stderr[-3000:]
    assert "lsvcr finetune: error: --init" in failed.stderr and "no key matches the SR model" in failed.stderr
    assert "Traceback" not in failed.stderr
    assert not [line for line in console_lines(failed) if any(noise in line for noise in NOISE)]


@pytest.mark.slow
def test_verbose_restores_the_forwarded_worker_output(tiny_demo):
    out, result = tiny_demo
    assert result.returncode == 0
    again = run_lsvcr("finetune", "--data", str(out / "prepared"), "--vectors", str(out / "vectors"),
                      "--out", str(out / "verbose-model"), "--set", "finetune.max_epochs=1", "--verbose",
                      timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "(RayTrainWorker pid=" in again.stdout + again.stderr

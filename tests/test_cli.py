"""The `lsvcr` entry point lists every sub-command and each has --help."""

import subprocess
import sys

import pytest

from lsvcr.cli import COMMANDS


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lsvcr", *args], capture_output=True, text=True, timeout=120)


def test_top_level_help_lists_commands():
    result = run_cli("--help")
    assert result.returncode == 0
    for name in ("synth", "prepare", "encode", "align", "finetune", "evaluate", "tune", "serve", "demo"):
        assert name in result.stdout


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_each_command_has_help(command):
    result = run_cli(command, "--help")
    assert result.returncode == 0, result.stderr
    assert "--config" in result.stdout and "--set" in result.stdout


def test_bad_override_is_one_clear_line(tmp_path):
    result = run_cli("synth", "--out", str(tmp_path / "x"), "--set", "finetune.nope=1")
    assert result.returncode == 2
    assert "unknown config key 'finetune.nope'" in result.stderr
    assert "Traceback" not in result.stderr

"""finetune.allocator: the Ray Train workers' malloc, set in their environment before they start."""

from __future__ import annotations

from pathlib import Path

import pytest

from lsvcr import train_driver
from lsvcr.errors import ConfigError
from lsvcr.runtime import allocator_environment


def test_allocator_environment_names_the_library_or_nothing():
    environment = allocator_environment("mimalloc")
    assert Path(environment["LD_PRELOAD"].split()[0]).name == "libmimalloc.so"
    assert Path(environment["LD_PRELOAD"].split()[0]).is_file()
    assert environment["MIMALLOC_PURGE_DELAY"] == "-1"
    assert environment["ARROW_DEFAULT_MEMORY_POOL"] == "system"  # Arrow's buffers from the same malloc
    assert allocator_environment("auto") == environment  # the wheel is installed here (Linux x86_64)
    assert allocator_environment("system") == {}
    with pytest.raises(ConfigError, match="finetune.allocator must be one of auto, mimalloc, system"):
        allocator_environment("jemalloc")


def test_without_the_library_auto_falls_back_and_mimalloc_is_a_clear_error(monkeypatch):
    monkeypatch.setattr("sys.path", ["/nonexistent"])
    assert allocator_environment("auto") == {}
    with pytest.raises(ConfigError, match="needs libmimalloc.so from the cmeel-mimalloc wheel"):
        allocator_environment("mimalloc")


@pytest.mark.parametrize("allocator", ["mimalloc", "system"])
def test_ray_train_workers_run_on_the_configured_allocator(ray_cluster, tmp_path, allocator):
    def report_allocator(config: dict) -> None:  # defined here: pickled by value for the worker
        import os

        import ray.train

        from lsvcr import train_driver

        import pyarrow as pa

        with open("/proc/self/maps") as maps:
            mapped = "libmimalloc" in maps.read()
        state = {"mimalloc_mapped": mapped, "purge_delay": os.environ.get("MIMALLOC_PURGE_DELAY"),
                 "arrow_pool": pa.default_memory_pool().backend_name}
        train_driver.report(ray.train.report, {"done": 1}, lambda: state, ray.train.Checkpoint)

    settings = train_driver.TrainerSettings(
        num_workers=1, use_gpu="false", threads_per_worker=1, max_failures=0, checkpoints_to_keep=1,
        no_checkpoint_message="no checkpoint", env_vars=allocator_environment(allocator))
    state = train_driver.fit(report_allocator, {}, settings, tmp_path)
    assert state["mimalloc_mapped"] is (allocator == "mimalloc")
    assert state["purge_delay"] == ("-1" if allocator == "mimalloc" else None)
    assert (state["arrow_pool"] == "system") is (allocator == "mimalloc")


RELEASE_ARROW = r"""
import numpy as np, pyarrow as pa, pyarrow.parquet as pq, sys
from lsvcr.runtime import release_arrow_memory
def anon_mb():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("RssAnon:")) // 1024
pq.write_table(pa.table({"likes": np.arange(20_000_000)}), sys.argv[1])
before = anon_mb()
likes = pq.read_table(sys.argv[1]).column("likes").to_numpy()  # a copy: the Arrow buffers are freed ...
read = anon_mb()
release_arrow_memory()  # ... but kept by Arrow's allocator until this
print(before, read, anon_mb(), likes.nbytes // 2**20)
"""


def test_release_arrow_memory_gives_back_the_buffers_of_a_finished_read(tmp_path):
    import subprocess
    import sys

    before, read, released, kept = map(int, subprocess.run(
        [sys.executable, "-c", RELEASE_ARROW, str(tmp_path / "likes.parquet")], check=True, capture_output=True,
        text=True).stdout.split())
    assert read - before > kept + 100  # the 153 MB copy plus what Arrow's allocator kept
    assert read - released > 100  # given back

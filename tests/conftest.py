"""Shared fixtures: one real local Ray cluster per test session, small synthetic data sets."""

from __future__ import annotations

import os

# Two cores: one torch thread per process, or every process fights for both (several times slower).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster that ends with the test process (never `ray stop`)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray

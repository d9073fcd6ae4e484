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
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray


# --- data layer (lsvcr.data): tiny synthetic KuaiComt data set, prepared, and a video-only variant ---


@pytest.fixture(scope="session")
def tiny_raw_dir(tmp_path_factory):
    """`lsvcr synth --preset tiny` (KuaiComt layout, Parquet): ~120 users, 150 videos, 8 comments/video."""
    from lsvcr.data.synth import PRESETS, write_synthetic

    out = tmp_path_factory.mktemp("data") / "tiny_raw"
    write_synthetic(out, PRESETS["tiny"], "parquet")
    return out


@pytest.fixture(scope="session")
def tiny_prepared_dir(tiny_raw_dir, tmp_path_factory):
    """PREPARED/ of `tiny_raw_dir` with the default data config (both tasks)."""
    from lsvcr.data.prepare import prepare

    out = tmp_path_factory.mktemp("data") / "tiny_prepared"
    prepare(tiny_raw_dir, out)
    return out


@pytest.fixture(scope="session")
def tiny_video_only_prepared_dir(tmp_path_factory):
    """PREPARED/ of a RecBole export (NAME.inter with string tokens + NAME.item): comment task disabled."""
    from lsvcr.data.prepare import prepare
    from lsvcr.data.synth import PRESETS, write_synthetic

    raw = tmp_path_factory.mktemp("data") / "tiny_recbole"
    write_synthetic(raw, PRESETS["tiny"], "recbole")
    out = tmp_path_factory.mktemp("data") / "tiny_video_only_prepared"
    prepare(raw, out)
    return out


# --- SR backbone (lsvcr.model / finetune): real MiniLM text vectors of the tiny data set ---


@pytest.fixture(scope="session")
def tiny_minilm_vectors_dir(tiny_prepared_dir, tmp_path_factory):
    """VECTORS/ of `tiny_prepared_dir`: every caption and comment embedded by all-MiniLM-L6-v2 (384-d)."""
    from lsvcr.vectors import write_minilm_vectors

    return write_minilm_vectors(tiny_prepared_dir, tmp_path_factory.mktemp("vectors") / "tiny_minilm")

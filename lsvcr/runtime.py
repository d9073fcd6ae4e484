"""Process-level runtime choices: device, threads, Ray start-up. Chosen at run time, never hard-coded."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported lazily: `lsvcr synth`/`prepare` start without it
    import torch

log = logging.getLogger("lsvcr")


def choose_device(use_gpu: str = "auto") -> "torch.device":
    """`auto` takes CUDA when present; `true` insists on it; `false` stays on CPU."""
    import torch

    if use_gpu == "true" and not torch.cuda.is_available():
        from lsvcr.errors import ConfigError

        raise ConfigError("use_gpu=true but no CUDA device is visible")
    if use_gpu in ("auto", "true") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def wants_gpu(use_gpu: str) -> bool:
    """For Ray resource requests: should workers ask for a GPU?"""
    if use_gpu == "true":
        return True
    if use_gpu == "false":
        return False
    try:
        import ray

        return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0
    except Exception:  # noqa: BLE001 - resource probing must never fail a run
        import torch

        return torch.cuda.is_available()


def set_threads(num_threads: int) -> None:
    """Oversubscribing a small machine makes torch several times slower: set threads deliberately."""
    import torch

    num_threads = max(1, int(num_threads))
    os.environ["OMP_NUM_THREADS"] = str(num_threads)
    torch.set_num_threads(num_threads)


def ensure_ray(num_cpus: int | None = None, address: str | None = None) -> None:
    """Join the cluster named by RAY_ADDRESS/`address`, or start a local one sized to this machine."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # address="local": start our own cluster, never attach to a stranger's `ray start` on this machine.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )

"""Process-level runtime choices: device, threads, memory (allocator, memory maps), Ray start-up. Chosen at run time,
never hard-coded."""

from __future__ import annotations

import logging
import mmap
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported lazily: `lsvcr synth`/`prepare` start without it
    import numpy as np
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


def release_arrow_memory() -> None:
    """Give back the buffers Arrow's allocator kept after large Parquet reads (it caches freed memory for
    reuse): a KuaiComt training worker held ~280 MB of them after loading the comment pools and like counts,
    which nothing reads again."""
    import pyarrow as pa

    pa.default_memory_pool().release_unused()


def map_readonly(path: "os.PathLike[str]", dtype, count: int, offset: int = 0) -> tuple["np.ndarray", mmap.mmap]:
    """(a read-only array of `count` `dtype` items at byte `offset` of the file, its memory map): the node's
    processes share the pages, and the caller keeps the map to give them back (`release_mapped_pages`)."""
    import numpy as np

    with open(path, "rb") as handle:
        mapping = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    return np.frombuffer(mapping, dtype=dtype, count=count, offset=offset), mapping


def release_mapped_pages(mappings: "Iterable[mmap.mmap]") -> None:
    """Unmap from this process the file pages read so far (MADV_DONTNEED): they stay in the node's page cache
    and map again when read. A scattered read maps ~64 KB of file around each row (the kernel maps a faulting
    page's cached neighbours; MADV_RANDOM does not stop it), so a reader of random rows would otherwise end up
    with whole files in its RSS."""
    for mapping in list(mappings):
        mapping.madvise(mmap.MADV_DONTNEED)


MIMALLOC_LIBRARY = ("cmeel.prefix", "lib", "libmimalloc.so")  # where the cmeel-mimalloc wheel installs it


def allocator_environment(allocator: str) -> dict[str, str]:
    """Environment that makes a process (started after it is set: a Ray worker) use `allocator`.

    mimalloc: LD_PRELOAD of the cmeel-mimalloc wheel's library, looked up on this process's sys.path (a cluster's
    nodes share one image, so the path holds on every node; a node without it prints a loader warning and keeps
    glibc), with purging off (MIMALLOC_PURGE_DELAY=-1): freed pages stay with the process for the next step's
    activations, as fast as glibc, where purging them after 10 ms (mimalloc's default) made steps ~35% slower.
    Arrow then allocates from that same malloc (ARROW_DEFAULT_MEMORY_POOL=system): its own bundled mimalloc reads
    the same purge setting and would keep the buffers of the table reads (~0.55 GB at KuaiComt size) where torch
    cannot reuse them (a KuaiComt video step: 1.91 against 2.17 GB anonymous memory).
    auto: mimalloc where the wheel is installed (Linux x86_64), else the system's malloc."""
    import sys
    from pathlib import Path

    from lsvcr.errors import ConfigError

    if allocator not in ("auto", "mimalloc", "system"):
        raise ConfigError(f"finetune.allocator must be one of auto, mimalloc, system; got {allocator!r}")
    if allocator == "system":
        return {}
    library = next((Path(entry, *MIMALLOC_LIBRARY) for entry in sys.path
                    if entry and Path(entry, *MIMALLOC_LIBRARY).is_file()), None)
    if library is None:
        if allocator == "auto":
            log.info("finetune.allocator=auto: no libmimalloc.so (cmeel-mimalloc) here, workers use the system malloc")
            return {}
        raise ConfigError("finetune.allocator=mimalloc needs libmimalloc.so from the cmeel-mimalloc wheel (Linux x86_64; "
                          "`pip install cmeel-mimalloc`), not found on sys.path; or set finetune.allocator=system")
    preload = " ".join(part for part in (str(library), os.environ.get("LD_PRELOAD", "")) if part)
    return {"LD_PRELOAD": preload, "MIMALLOC_PURGE_DELAY": "-1", "ARROW_DEFAULT_MEMORY_POOL": "system"}


def pin_to_cores(slot: int, num_cores: int) -> list[int] | None:
    """Pin every thread of this process (and so the threads it starts later) to `num_cores` of the CPUs it
    may use: slot k takes the k-th group of `num_cores`, wrapping around. The cores, or None where the OS
    has no affinity API (not Linux)."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    allowed = sorted(os.sched_getaffinity(0))
    count = max(1, min(int(num_cores), len(allowed)))
    start = (slot * count) % len(allowed)
    cores = {allowed[(start + i) % len(allowed)] for i in range(count)}
    for thread_id in os.listdir("/proc/self/task"):  # sched_setaffinity(0, ...) would pin the calling thread only
        try:
            os.sched_setaffinity(int(thread_id), cores)
        except OSError:  # the thread ended meanwhile
            pass
    return sorted(cores)


def apply_serve_ingress_environment(ingress: str | None = None) -> None:
    """Set the RAY_SERVE_* variables of `ingress` (default: serve.ingress's) in this process, for the Ray
    processes it starts next; an explicit value of the other variables (e.g. RAY_SERVE_HAPROXY_RETRY_ON) wins."""
    from lsvcr.config import SERVE_INGRESS_ENVIRONMENT, ServeConfig

    environment = SERVE_INGRESS_ENVIRONMENT[ingress or ServeConfig.ingress]
    os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = environment["RAY_SERVE_ENABLE_HA_PROXY"]
    for name, value in environment.items():
        os.environ.setdefault(name, value)
    # HAProxy's stats and Prometheus ports default to fixed 8404 and 9101: a second local cluster on the same
    # machine (a test run beside a job) would fail to start HAProxy. Local clusters take free ports instead.
    for name in ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT"):
        os.environ.setdefault(name, str(free_local_port()))


def free_local_port() -> int:
    """A TCP port free on every interface of this machine now (Serve, Ray and HAProxy ports of local runs)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


def serve_ingress_in_effect() -> str:
    """The ingress this process's Ray cluster runs (what its environment says; read in a Serve replica)."""
    return "haproxy" if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1" else "proxy"


def ensure_ray(num_cpus: int | None = None, address: str | None = None, serve_ingress: str | None = None) -> None:
    """Join the cluster named by RAY_ADDRESS/`address`, or start a local one sized to this machine.

    A local cluster gets the environment of `serve_ingress` (default serve.ingress's; lsvcr.config.
    SERVE_INGRESS_ENVIRONMENT); a joined cluster keeps the one it was started with.

    Under the CLI's quiet console (lsvcr.console) workers' stdout/stderr stay in the session's log files
    (linked into the run's logs/) instead of being forwarded: Ray Data, Ray Train and vLLM actors print
    hundreds of start-up, progress and health-check lines. Errors still reach the driver as exceptions."""
    import ray

    from lsvcr import console

    if ray.is_initialized():
        return
    console.route_ray_loggers()  # before ray.init: its own start-up lines go to driver.log
    address = address or os.environ.get("RAY_ADDRESS")
    log_to_driver = console.forward_worker_output()
    if address:
        context = ray.init(address=address, log_to_driver=log_to_driver)
    else:
        # Ray starts its workers at nice 15 (its `worker_niceness`), so any other process at nice 0 (a test
        # run, an HTTP load generator, another job) takes the CPU from our training workers, vLLM actors and
        # Serve replicas: measured on a 2-core machine, a fine-tune step went from about 0.9 s to 8 s beside ten
        # busy processes (docs/cluster.md). The workers are the work; an explicit RAY_worker_niceness still wins.
        os.environ.setdefault("RAY_worker_niceness", "0")
        apply_serve_ingress_environment(serve_ingress)
        # address="local": start our own cluster, never attach to a stranger's `ray start` on this machine.
        context = ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=log_to_driver)
    console.route_ray_loggers()
    console.note_ray_session(getattr(context, "address_info", {}).get("session_dir"))


def setup_logging(verbose: bool = False) -> None:
    """The console of a CLI command or job (lsvcr.console): quiet unless `verbose` or LSVCR_VERBOSE=1."""
    from lsvcr import console

    console.start(verbose)

"""The one Ray Train driver of stage 1 (`lsvcr align`) and stage 2 (`lsvcr finetune`).

    staging = open_staging(out, config, comparable)      # .OUT.partial/, config.yaml checked on resume
    state = fit(worker, loop_config, TrainerSettings(...), staging)   # TorchTrainer → last checkpoint's state
    ... the stage writes its files into staging ...
    finalise(staging, out, out_uri)                      # _SUCCESS last, rename into place, push

and, inside a worker, `report(metrics, payload, ...)`: every rank reports the metrics, rank 0 attaches a
checkpoint holding `payload` (what the worker needs to resume). Re-running with the same OUT resumes:
Ray Train restores a run whose name and storage path (`staging/ray_train`) already hold a checkpoint.
Ray is imported lazily (the stages' pure-torch parts run without it).

Under the CLI's quiet console (lsvcr.console) Ray does not forward worker output: `fit` relays the
workers' `lsvcr` log records (one line per epoch) and Ray Train's worker failures to the driver's console.
"""

from __future__ import annotations

import functools
import logging
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from lsvcr import console, storage
from lsvcr.config import LSVCRConfig, load_config, save_config
from lsvcr.errors import ConfigError, DataError, LSVCRError

RELAY_KEY = "lsvcr_log_relay"  # the relay actor's handle inside the loop config
STATE_FILE = "state.pt"
RUN_NAME = "ray_train"


def wrap_ddp(module: torch.nn.Module, move_to_device: bool = True) -> torch.nn.Module:
    """`ray.train.torch.prepare_model` for a worker group of several ranks. The module's buffers (the frozen
    text tables and the like prior, built from the same files on every rank) stay out of DDP's
    synchronisation: they may be read-only memory maps shared by a node's workers, which a broadcast would
    write into, and sending gigabytes of identical rows would be wasted."""
    import ray.train.torch

    module._ddp_params_and_buffers_to_ignore = [name for name, _ in module.named_buffers()]
    return ray.train.torch.prepare_model(module, move_to_device=move_to_device, parallel_strategy_kwargs={
        "find_unused_parameters": True, "broadcast_buffers": False})


def open_staging(out: Path, config: LSVCRConfig,
                 comparable: Callable[[LSVCRConfig], Any] = lambda config: config) -> Path:
    """Create `.OUT.partial/` beside `out` and save config.yaml there; a partial run left by another config
    (as seen through `comparable`: what a resumed run must share) is refused."""
    staging = storage.partial_dir(out)
    staging.mkdir(parents=True, exist_ok=True)
    config_yaml = staging / "config.yaml"
    if config_yaml.is_file() and comparable(load_config(config_yaml)) != comparable(config):
        raise ConfigError(f"{staging} holds a partial run with a different config; delete it or rerun with the same one")
    save_config(config, config_yaml)
    return staging


@dataclass
class TrainerSettings:
    """What the TorchTrainer of a stage needs: resources, fault tolerance, checkpoints kept."""

    num_workers: int
    use_gpu: str  # "auto" | "true" | "false", resolved once Ray is up (auto: does the cluster have GPUs?)
    threads_per_worker: int
    max_failures: int
    checkpoints_to_keep: int
    no_checkpoint_message: str  # the error when training ends without one checkpoint
    resources_per_worker: dict[str, float] | None = None  # default {"CPU": threads_per_worker}
    env_vars: dict[str, str] = field(default_factory=dict)  # extra worker environment
    callbacks: list | None = None  # extra RunConfig callbacks (e.g. Tune's report callback)


def fit(worker: Callable[[dict], None], loop_config: dict, settings: TrainerSettings, staging: Path) -> dict:
    """Run `worker` on a TorchTrainer (DDP; nccl on GPU, gloo on CPU) storing its run under `staging`;
    re-raise a worker error; return the state saved in the last checkpoint."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from lsvcr.runtime import ensure_ray, wants_gpu

    ensure_ray()
    use_gpu = wants_gpu(settings.use_gpu) or (settings.resources_per_worker or {}).get("GPU", 0) > 0
    threads = str(settings.threads_per_worker)
    with relayed_worker_logs() as relay:  # the workers' `lsvcr` log lines (epochs) on the console
        trainer = TorchTrainer(
            relayed(worker) if relay is not None else worker,
            train_loop_config={**loop_config, RELAY_KEY: relay} if relay is not None else loop_config,
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            scaling_config=ray.train.ScalingConfig(
                num_workers=settings.num_workers, use_gpu=use_gpu,
                resources_per_worker=settings.resources_per_worker or {"CPU": settings.threads_per_worker}),
            run_config=ray.train.RunConfig(
                name=RUN_NAME, storage_path=str(staging),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=settings.checkpoints_to_keep),
                failure_config=ray.train.FailureConfig(max_failures=settings.max_failures),
                worker_runtime_env={"env_vars": {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
                                                 **settings.env_vars}},
                callbacks=(settings.callbacks or []) + worker_failure_callbacks(relay) or None,
            ),
        )
        try:
            result = trainer.fit()  # Ray Train v2 raises a failed run's WorkerGroupError here
        except Exception as error:
            clear = _worker_input_error(error)
            if clear is None:
                raise
            raise clear from None
    if result.error is not None:
        raise _worker_input_error(result.error) or result.error
    if result.checkpoint is None:
        raise DataError(settings.no_checkpoint_message)
    with result.checkpoint.as_directory() as directory:
        return torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=False)


def _worker_input_error(error: BaseException) -> LSVCRError | None:
    """A worker that stopped on bad input (an LSVCRError, e.g. an --init checkpoint that fits no key)
    reaches the driver wrapped in Ray Train's WorkerGroupError: hand back the clear error itself."""
    pending = [error]
    seen: set[int] = set()
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, LSVCRError):  # Ray's RayTaskError subclasses its cause: prefer the cause
            cause = getattr(current, "cause", None)
            return cause if isinstance(cause, LSVCRError) else current
        pending += list((getattr(current, "worker_failures", None) or {}).values())
        pending += [getattr(current, "cause", None), current.__cause__]
    return None


def load_checkpoint_state(checkpoint) -> dict:
    """The payload a `report` call saved (in a worker resuming from `get_checkpoint()`)."""
    with checkpoint.as_directory() as directory:
        return torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=False)


def report(report_fn: Callable[..., None], metrics: dict, payload: Callable[[], dict] | None,
           checkpoint_class: Any = None) -> None:
    """Report `metrics`; with a `payload` (rank 0 only, and only where checkpoints are kept) attach a
    checkpoint of `payload()`. `report_fn`/`checkpoint_class` are ray.train's or ray.tune's (distinct
    classes in Ray 2.60)."""
    if payload is None:
        report_fn(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="lsvcr-ckpt-") as directory:
        torch.save(payload(), Path(directory) / STATE_FILE)
        report_fn(metrics, checkpoint=checkpoint_class.from_directory(directory))


def finalise(staging: Path, out: Path, out_uri: str, *, drop_ray_run: bool = False) -> None:
    """The staged output becomes `out`: (optionally the Ray run directory removed), _SUCCESS written last,
    renamed into place (replacing a previous `out`), pushed to a remote root."""
    if drop_ray_run:
        storage.remove_tree(staging / RUN_NAME)
    storage.promote(staging, out)
    storage.push(out, out_uri)


# ----------------------------------------------------------------------------- the workers' log lines on the console


class _RelayHandler(logging.Handler):
    """In a Ray Train worker: send each `lsvcr` record to the driver's relay actor (and wait, so none is
    lost when the worker exits right after)."""

    def __init__(self, relay) -> None:
        super().__init__(logging.INFO)
        self.relay = relay

    def emit(self, record: logging.LogRecord) -> None:
        import ray

        try:
            ray.get(self.relay.put.remote(record.name, record.levelno, record.getMessage()), timeout=30)
        except Exception:  # noqa: BLE001 - the console must never fail a training run
            self.handleError(record)


def _relay_actor_class():
    import ray

    @ray.remote(num_cpus=0)
    class WorkerLogRelay:
        def __init__(self) -> None:
            self.records: list[tuple[str, int, str]] = []

        def put(self, name: str, level: int, message: str) -> None:
            self.records.append((name, level, message))

        def drain(self) -> list[tuple[str, int, str]]:
            records, self.records = self.records, []
            return records

    return WorkerLogRelay


def _emit_relayed(records: list[tuple[str, int, str]]) -> None:
    for name, level, message in records:
        logging.getLogger(name).log(level, "  %s", message)


@contextmanager
def relayed_worker_logs(poll_seconds: float = 1.0) -> Iterator[Any]:
    """Driver side, around a Ray Train `fit()`: yields the relay handle to put in the loop config under
    RELAY_KEY (None when Ray forwards worker output itself: verbose mode, library use)."""
    if console.forward_worker_output():
        yield None
        return
    import ray

    relay = _relay_actor_class().remote()
    stop = threading.Event()

    def pump() -> None:
        while not stop.wait(poll_seconds):
            try:
                _emit_relayed(ray.get(relay.drain.remote(), timeout=30))
            except Exception:  # noqa: BLE001 - Ray shutting down: the final drain below reports what is left
                return

    thread = threading.Thread(target=pump, name="lsvcr-worker-logs", daemon=True)
    thread.start()
    try:
        yield relay
    finally:
        stop.set()
        thread.join(timeout=35)
        try:
            _emit_relayed(ray.get(relay.drain.remote(), timeout=30))
            ray.kill(relay)
        except Exception:  # noqa: BLE001
            pass


def worker_failure_callbacks(relay) -> list:
    """Ray Train callbacks (run in the Train controller) that put each worker failure on the console as a
    warning before Ray Train restarts the group: an OOM kill would otherwise only be in the files."""
    if relay is None:
        return []
    from ray.train import UserCallback

    class WorkerFailureRelay(UserCallback):
        def __init__(self, relay) -> None:
            self.relay = relay

        def after_exception(self, run_context, worker_exceptions: dict) -> None:
            import ray

            for rank, error in sorted(worker_exceptions.items()):
                first_line = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
                message = f"Ray Train worker {rank} failed: {first_line[:300]} (details: logs/ray/)"
                try:
                    ray.get(self.relay.put.remote("lsvcr.train", logging.WARNING, message), timeout=30)
                except Exception:  # noqa: BLE001 - the console must never change how training fails
                    pass

    return [WorkerFailureRelay(relay)]


def run_with_relay(worker: Callable[[dict], Any], loop_config: dict) -> Any:
    """Worker side: run the loop with its `lsvcr` records also sent to the relay named in the config."""
    relay = loop_config.get(RELAY_KEY)
    if relay is None:
        return worker(loop_config)
    handler = _RelayHandler(relay)
    logger = logging.getLogger("lsvcr")
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        return worker(loop_config)
    finally:
        logger.removeHandler(handler)


def relayed(worker: Callable[[dict], Any]) -> Callable[[dict], Any]:
    """The Train loop to hand to TorchTrainer: `worker` run by `run_with_relay` (picklable)."""
    return functools.partial(run_with_relay, worker)

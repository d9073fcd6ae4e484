"""What a person reads: stage lines, one progress bar per long step, epoch lines, the final summary.

Everything else (Ray's and vLLM's start-up logs, Ray Data's progress reports, the output of every Ray
worker, third-party INFO/WARNING records, C-level stderr of the driver) goes to files below the run's
`logs/` directory, named at the end of the run. Errors stay on the console. `--verbose` (or
LSVCR_VERBOSE=1) restores the full output: Ray forwards every worker's stdout/stderr to the driver again.

    start(verbose)                        # the CLI, once per command: the console handler, quiet defaults
    with log_files(run_dir / "logs"):     # driver.log (+ ray/ -> the Ray session's logs)
        with progress(total, "encode items", unit="text") as bar: bar.update(n)

`runtime.ensure_ray` asks `forward_worker_output()` for `log_to_driver`; `train_driver.fit` brings the
Ray Train workers' `lsvcr` log records (the epoch lines) to the driver's console through a small actor
instead of forwarded stdout. Without `start()` (lsvcr used as a
library, the tests) nothing changes: Ray's defaults, no files.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

VERBOSE_ENV = "LSVCR_VERBOSE"
QUIET_SECONDS = 5.0  # a step shorter than this prints no progress lines when the stream is not a terminal

# Ray Data's logger as configured by Ray (a file in the session's logs/) but without its console handler:
# its records propagate to the root logger, where the console gate and driver.log take them.
_RAY_DATA_LOGGING = """\
version: 1
disable_existing_loggers: false
formatters:
  ray:
    format: "%(asctime)s\\t%(levelname)s %(filename)s:%(lineno)s -- %(message)s"
handlers:
  file:
    class: ray.data._internal.logging.SessionFileHandler
    formatter: ray
    filename: ray-data.log
loggers:
  ray.data:
    level: DEBUG
    handlers: [file]
    propagate: true
"""


@dataclass
class _State:
    active: bool = False  # start() was called: the console is ours
    verbose: bool = False
    log_dir: Path | None = None
    ray_logs: Path | None = None  # the Ray session's logs/ directory, once Ray is up
    handlers: list[logging.Handler] = field(default_factory=list)
    hidden_warnings: int = 0  # third-party warnings written to driver.log only


_state = _State()


def is_verbose() -> bool:
    return _state.verbose


def forward_worker_output() -> bool:
    """`ray.init(log_to_driver=...)`: forward workers' stdout/stderr unless the quiet console is ours."""
    return not _state.active or _state.verbose


class _ConsoleHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at emit time (log_files() points it at the saved console)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it
        pass


class _ConsoleFormatter(logging.Formatter):
    """`12:01:02 message` for lsvcr's INFO lines; level and logger name beside anything else."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        text = record.getMessage()
        if record.exc_info and (_state.verbose or not _is_lsvcr(record)):
            text += "\n" + self.formatException(record.exc_info)
        if record.levelno == logging.INFO and _is_lsvcr(record):
            return f"{stamp} {text}"
        return f"{stamp} {record.levelname} {record.name}: {text}"


def _is_lsvcr(record: logging.LogRecord) -> bool:
    if record.name == "py.warnings":  # warnings.warn: lsvcr's own when raised from its files
        return f"{os.sep}lsvcr{os.sep}" in record.getMessage().split(":", 1)[0]
    return record.name == "lsvcr" or record.name.startswith("lsvcr.")


class _ConsoleGate(logging.Filter):
    """Quiet mode: lsvcr's INFO and up, everybody's ERROR and up. The rest is in driver.log."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _state.verbose or record.levelno >= logging.ERROR:
            return True
        if _is_lsvcr(record):
            return record.levelno >= logging.INFO
        if record.levelno >= logging.WARNING:
            _state.hidden_warnings += 1
        return False


def start(verbose: bool = False) -> None:
    """Take over the console for one CLI command (idempotent). Quiet unless `verbose`/LSVCR_VERBOSE."""
    verbose = verbose or os.environ.get(VERBOSE_ENV, "") not in ("", "0")
    _state.active, _state.verbose, _state.hidden_warnings = True, verbose, 0
    root = logging.getLogger()
    for handler in _state.handlers:
        root.removeHandler(handler)
    handler = _ConsoleHandler()
    handler.setFormatter(_ConsoleFormatter())
    handler.addFilter(_ConsoleGate())
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    _state.handlers = [handler]
    logging.captureWarnings(True)
    if verbose:
        return
    # Set before Ray Data / huggingface_hub are imported (the CLI imports them lazily, after this):
    # Ray Data's progress reporter prints a block every few seconds when stdout is no terminal, and its
    # logger has its own console handler; our progress bars and the gate replace both.
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", str(_ray_data_logging_file()))
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' GGUF conversion bars


def _ray_data_logging_file() -> Path:
    path = Path(tempfile.gettempdir()) / f"lsvcr-{os.getuid()}" / "ray_data_logging.yaml"
    if not path.is_file() or path.read_text() != _RAY_DATA_LOGGING:
        path.parent.mkdir(parents=True, exist_ok=True)
        staged = path.with_suffix(f".{os.getpid()}.tmp")
        staged.write_text(_RAY_DATA_LOGGING)
        staged.replace(path)
    return path


def route_ray_loggers() -> None:
    """Ray's own loggers (`ray`, `ray.serve`, ...) print through their own console handlers and do not
    propagate; in quiet mode drop those handlers and let the records reach the root logger (gate + file)."""
    if not _state.active or _state.verbose:
        return
    names = ["ray"] + [name for name in logging.Logger.manager.loggerDict if name.startswith("ray.")]
    for name in names:
        logger = logging.getLogger(name)
        consoles = [h for h in logger.handlers
                    if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
        if name == "ray" or consoles:
            for handler in consoles:
                logger.removeHandler(handler)
            logger.propagate = True


def note_ray_session(session_dir: str | None) -> None:
    """`ray.init` tells where the session keeps its logs: link them into the run's logs/ directory."""
    if session_dir:
        _state.ray_logs = Path(session_dir) / "logs"
        _link_ray_logs()
        if _state.active and not _state.verbose and _state.log_dir is None:  # a command without a run directory
            logging.getLogger("lsvcr.console").info("Ray and vLLM worker logs: %s (--verbose shows them here)",
                                                    _state.ray_logs)


def _link_ray_logs() -> None:
    if _state.log_dir is None or _state.ray_logs is None:
        return
    link = _state.log_dir / "ray"
    try:
        if link.is_symlink() or link.exists():
            if link.is_symlink() and Path(os.readlink(link)) == _state.ray_logs:
                return
            link.unlink()
        link.symlink_to(_state.ray_logs, target_is_directory=True)
    except OSError as error:  # a read-only or odd file system must not fail a run
        logging.getLogger("lsvcr.console").debug("could not link the Ray logs: %s", error)


@contextmanager
def log_files(log_dir: str | Path) -> Iterator[Path | None]:
    """Within: every log record also goes to `log_dir/driver.log`; in quiet mode the process's C-level
    stderr (Ray's core worker, torch, gloo) too, while Python's sys.stderr stays on the console."""
    if not _state.active:
        yield None
        return
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / "driver.log"
    file_handler = logging.FileHandler(path, encoding="utf-8")
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    file_handler.setLevel(logging.DEBUG if _state.verbose else logging.INFO)
    root = logging.getLogger()
    root.addHandler(file_handler)
    previous_dir, _state.log_dir = _state.log_dir, log_dir
    _link_ray_logs()
    redirect = not _state.verbose
    if redirect:
        sys.stderr.flush()
        saved_fd = os.dup(2)
        file_fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(file_fd, 2)
        os.close(file_fd)
        previous_stderr = sys.stderr
        sys.stderr = os.fdopen(os.dup(saved_fd), "w", buffering=1, encoding="utf-8", errors="backslashreplace")
    try:
        yield path
    finally:
        if redirect:
            sys.stderr.flush()
            sys.stderr.close()
            sys.stderr = previous_stderr
            os.dup2(saved_fd, 2)
            os.close(saved_fd)
        root.removeHandler(file_handler)
        file_handler.close()
        _state.log_dir = previous_dir


@contextmanager
def ray_output_to_log() -> Iterator[None]:
    """Within (quiet mode, inside `log_files`): Python's stdout goes to driver.log. Ray's driver prints the
    task failures of its own shutdown to stdout (Serve's controller exits under its graceful_shutdown call:
    "(raylet) Task ServeController.graceful_shutdown failed ..."), which is nothing a user can act on."""
    if not _state.active or _state.verbose or _state.log_dir is None:
        yield
        return
    with open(_state.log_dir / "driver.log", "a", encoding="utf-8") as log, redirect_stdout(log):
        yield


def stop_ray() -> None:
    """`ray.shutdown()` with its late output kept off the console (`ray_output_to_log`)."""
    import ray

    if ray.is_initialized():
        with ray_output_to_log():
            ray.shutdown()


def log_summary(log_dir: Path) -> str:
    """The closing line that names the files."""
    parts = [f"logs: {log_dir / 'driver.log'}"]
    if (log_dir / "ray").exists():
        parts.append(f"Ray and vLLM worker logs: {log_dir / 'ray'}")
    if _state.hidden_warnings:
        parts.append(f"{_state.hidden_warnings} library warning(s) are in driver.log")
    if _state.active and not _state.verbose:
        parts.append("--verbose shows everything here")
    return "; ".join(parts)


# ----------------------------------------------------------------------------- progress bars


class Progress:
    """One bar for one long step. On a terminal a live tqdm line; elsewhere (`make demo > log`, a pipe)
    a line at each quarter and a final one, and none at all for a step shorter than QUIET_SECONDS."""

    def __init__(self, total: int, description: str, unit: str = "it", leave: bool = True, stream=None):
        self.total, self.description, self.unit = max(int(total), 0), description, unit
        self.stream = stream if stream is not None else sys.stderr
        self.done, self.postfix = 0, {}
        self.started = time.perf_counter()
        self._quarters_shown = 0
        self._closed = False
        self._bar = None
        route_ray_loggers()
        if _isatty(self.stream):
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total or None, desc=description, unit=unit, leave=leave, file=self.stream,
                             mininterval=0.5)

    def update(self, count: int = 1) -> None:
        self.done += count
        if self._bar is not None:
            self._bar.update(count)
            return
        if not self.total or time.perf_counter() - self.started < QUIET_SECONDS:
            return
        quarter = min(4 * self.done // self.total, 4)
        if quarter > self._quarters_shown and quarter < 4:
            self._quarters_shown = quarter
            self._line()

    def set_postfix(self, refresh: bool = False, **values: Any) -> None:
        self.postfix = values
        if self._bar is not None:
            self._bar.set_postfix(values, refresh=refresh)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif time.perf_counter() - self.started >= QUIET_SECONDS or self._quarters_shown:
            self._line()

    def _line(self) -> None:
        seconds = time.perf_counter() - self.started
        share = f"{100 * self.done // self.total:3d}% " if self.total else ""
        of = f"/{self.total}" if self.total else ""
        rate = f"  {self.done / seconds:.1f} {self.unit}/s" if seconds > 0 else ""
        extra = "".join(f"  {key}={value}" for key, value in self.postfix.items())
        print(f"  {self.description}: {share}{self.done}{of} {self.unit}  {seconds:.0f} s{rate}{extra}",
              file=self.stream, flush=True)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def progress(total: int, description: str, unit: str = "it", leave: bool = True) -> Progress:
    return Progress(total, description, unit=unit, leave=leave)


def iterate(items: Iterable, total: int, description: str, unit: str = "it", leave: bool = True) -> Iterator:
    """`for x in iterate(items, len(items), "eval valid")`: `items` with one progress bar."""
    with Progress(total, description, unit=unit, leave=leave) as bar:
        for item in items:
            yield item
            bar.update(1)

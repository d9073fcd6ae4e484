"""The MODEL/ directory of `lsvcr finetune` (docs/formats.md): its file names, and reading/writing them.

`lsvcr.finetune` writes it; evaluation (`lsvcr.evaluate.load_trained_model`), serving
(`lsvcr.serve.model_dir`), the pipeline report and the bench scripts read it through here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from lsvcr.config import LSVCRConfig, load_config
from lsvcr.errors import ModelNotFoundError

CHECKPOINT = "model.pt"  # {"model_config", "task", "num_videos", "text_dim", "state_dict", "best_epoch", ...}
CONFIG = "config.yaml"  # the LSVCRConfig of the run (written by lsvcr.train_driver.open_staging)
INPUTS = "inputs.json"  # {"data": PREPARED, "vectors": VECTORS | None, "init": ALIGNED checkpoint | None}
METRICS = "metrics.json"  # lsvcr.evaluate.evaluate_model_dir's result (+ best_epoch, epochs_run, ...)
TRAIN_LOG = "train_log.jsonl"  # one row per epoch
CURVES = "curves.png"


def checkpoint_path(model_dir: str | Path) -> Path:
    return Path(model_dir) / CHECKPOINT


def has_checkpoint(model_dir: str | Path) -> bool:
    return checkpoint_path(model_dir).is_file()


def write_checkpoint(model_dir: str | Path, checkpoint: dict[str, Any]) -> None:
    torch.save(checkpoint, checkpoint_path(model_dir))


def read_checkpoint(model_dir: str | Path) -> dict[str, Any]:
    path = checkpoint_path(model_dir)
    if not path.is_file():
        raise ModelNotFoundError(f"no {CHECKPOINT} in {model_dir} (is it the --out of a finished `lsvcr finetune`?)")
    return torch.load(path, map_location="cpu", weights_only=False)


def read_config(model_dir: str | Path) -> LSVCRConfig:
    """The run's config; the defaults for a MODEL/ dir written without one."""
    path = Path(model_dir) / CONFIG
    return load_config(path) if path.is_file() else LSVCRConfig()


def write_inputs(model_dir: str | Path, data: str | None, vectors: str | None, init: str | None = None) -> None:
    _write_json(Path(model_dir) / INPUTS, {"data": data, "vectors": vectors, "init": init})


def read_inputs(model_dir: str | Path) -> dict[str, Any]:
    """The PREPARED/VECTORS/init the model was trained on; {} when the file is absent."""
    path = Path(model_dir) / INPUTS
    return json.loads(path.read_text()) if path.is_file() else {}


def write_metrics(model_dir: str | Path, metrics: dict[str, Any]) -> None:
    _write_json(Path(model_dir) / METRICS, metrics)


def read_metrics(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / METRICS
    if not path.is_file():
        raise ModelNotFoundError(f"no {METRICS} in {model_dir} (is it the --out of a finished `lsvcr finetune`?)")
    return json.loads(path.read_text())


def read_metrics_if_any(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / METRICS
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_json(path: Path, value: dict[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")

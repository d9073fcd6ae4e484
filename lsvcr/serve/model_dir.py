"""Loading MODEL/ dirs of `lsvcr finetune` for serving (docs/formats.md), and the cheap driver-side
check that fails with one line before any replica starts."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


from lsvcr import model_files, storage
from lsvcr.config import LSVCRConfig
from lsvcr.errors import ConfigError, DataError, ModelNotFoundError
from lsvcr.evaluate import load_trained_model

@dataclass
class LoadedModel:
    task: str  # video | comment
    model_dir: Path
    model: Any  # lsvcr.model.LSVCRModel, in eval mode
    config: LSVCRConfig
    prepared_dir: Path
    vectors_dir: Path | None  # None for ID-only models
    history_length: int  # histories are truncated to the newest `history_length` items
    comments_per_record: int
    metrics: dict[str, Any]
    version: str  # content hash of model.pt

    def describe(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "version": self.version,
            "checkpoint": str(model_files.checkpoint_path(self.model_dir)),
            "prepared": str(self.prepared_dir),
            "vectors": str(self.vectors_dir) if self.vectors_dir else None,
            "mode": self.config.model.mode,
            "history_length": self.history_length,
            "comments_per_record": self.comments_per_record,
            "protocol": self.metrics.get("protocol"),
            "metrics": {split: self.metrics.get(split) for split in ("valid", "test") if split in self.metrics},
            "full_ranking": self.metrics.get("full_ranking"),
            "best_epoch": self.metrics.get("best_epoch"),
        }


def _file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def load_model_dir(model_dir: str | Path, expected_task: str) -> LoadedModel:
    """A MODEL/ dir of `lsvcr finetune` (local or URI) -> the SR model in eval mode, with the text
    tables of the PREPARED/ + VECTORS/ named in its inputs.json (via `lsvcr.evaluate.load_trained_model`)."""
    model_dir = (storage.pull(str(model_dir)) if storage.is_remote(str(model_dir)) else Path(model_dir)).resolve()
    trained = load_trained_model(model_dir)
    if trained.task != expected_task:
        raise ConfigError(f"{model_dir} holds a {trained.task!r} model; --{expected_task}-model needs a {expected_task!r} model")
    if trained.config.model.architecture != "lsvcr":
        raise ConfigError(f"{model_dir} holds a {trained.config.model.architecture!r} baseline; serving runs the LSVCR backbone")
    return LoadedModel(
        task=trained.task,
        model_dir=model_dir,
        model=trained.model,
        config=trained.config,
        prepared_dir=trained.data_dir.resolve(),
        vectors_dir=trained.vectors_dir.resolve() if trained.vectors_dir else None,
        history_length=min(trained.config.finetune.history_length, trained.config.model.max_position),
        comments_per_record=trained.config.data.max_comments_per_record,
        metrics=model_files.read_metrics_if_any(model_dir),
        version=_file_hash(model_files.checkpoint_path(model_dir)),
    )



def check_model_dir(model_dir: str | Path, task: str) -> None:
    """Cheap checks in the driver, so a wrong path fails with one line before any replica starts."""
    if storage.is_remote(str(model_dir)):
        return  # pulled and checked by the replicas
    model_dir = Path(model_dir)
    if not model_files.has_checkpoint(model_dir):
        raise ModelNotFoundError(f"--{task}-model {model_dir}: no {model_files.CHECKPOINT} "
                                 "(is this a MODEL dir of `lsvcr finetune`?)")
    found = model_files.read_checkpoint(model_dir).get("task")
    if found != task:
        raise ConfigError(f"--{task}-model {model_dir} holds a {found!r} model")
    inputs_path = model_dir / model_files.INPUTS
    inputs = model_files.read_inputs(model_dir)
    for key in ("data", "vectors"):
        value = inputs.get(key)
        if value and not storage.is_remote(value) and not Path(value).is_dir():
            raise DataError(f"{inputs_path}: the {key} dir {value} does not exist")
    if not inputs.get("data"):
        raise DataError(f"{inputs_path} names no PREPARED dir ('data'): the catalog cannot be loaded")


"""The configuration as YAML: load a file and `section.key=value` overrides into the dataclasses of
`lsvcr.config.sections` (unknown keys and wrong types are errors naming the key), validate across
fields, save, and render the reference file (configs/reference.yaml)."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from lsvcr.config.sections import SERVE_INGRESS_ENVIRONMENT, LSVCRConfig
from lsvcr.errors import ConfigError


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check and convert one YAML value against its dataclass field type."""
    if isinstance(annotation, str):
        annotation = eval(annotation, vars(typing))  # noqa: S307 - our own annotations only
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0])
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_type,) = typing.get_args(annotation)
        return [_coerce(item, item_type, f"{where}[{i}]") for i, item in enumerate(value)]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
    if annotation is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if annotation is str:
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def _update(instance: Any, values: dict[str, Any], where: str) -> None:
    if not isinstance(values, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(instance)}
    for key, value in values.items():
        path = f"{where}.{key}" if where else key
        if key not in fields:
            raise ConfigError(f"unknown config key '{path}' (known: {', '.join(sorted(fields))})")
        current = getattr(instance, key)
        if dataclasses.is_dataclass(current):
            _update(current, value, path)
        else:
            setattr(instance, key, _coerce(value, fields[key].type, path))


def _file_values(path: Path, included_by: tuple[Path, ...] = ()) -> list[dict[str, Any]]:
    """The mappings a config file stands for, to apply in order: those of its `base: OTHER.yaml` (a path
    relative to the file; bases may have bases) first, then its own keys."""
    where = f" (the base of {included_by[-1]})" if included_by else ""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}{where}")
    if path.resolve() in included_by:
        raise ConfigError("config files are each other's base: " + " -> ".join(map(str, (*included_by, path.resolve()))))
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path}{where} is not valid YAML: {error}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path}{where}: expected a mapping of sections, got {values!r}")
    base = values.pop("base", None)
    if base is None:
        return [values]
    if not isinstance(base, str) or not base:
        raise ConfigError(f"config file {path}: base: expected the path of another config file, got {base!r}")
    return [*_file_values(path.parent / base, (*included_by, path.resolve())), values]


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> LSVCRConfig:
    """Defaults, then the YAML file (if any; after its `base:` file, if it names one), then `section.key=value`
    overrides."""
    config = LSVCRConfig()
    if path is not None:
        for values in _file_values(Path(path)):
            _update(config, values, "")
    for override in overrides or []:
        apply_override(config, override)
    validate_config(config)
    return config


def config_from_dict(values: dict[str, Any]) -> LSVCRConfig:
    """The inverse of `config_to_dict` (e.g. a config shipped to Ray workers), validated."""
    config = LSVCRConfig()
    _update(config, values, "")
    validate_config(config)
    return config


def update_config(config: LSVCRConfig, values: dict[str, Any]) -> None:
    """Apply a nested mapping shaped like a config file (`{"finetune": {"lr": 3e-4}}`) onto `config`,
    with the same key and type checks; call `validate_config` afterwards for cross-field checks."""
    _update(config, values, "")


def apply_override(config: LSVCRConfig, override: str) -> None:
    if "=" not in override:
        raise ConfigError(f"override '{override}' must look like section.key=value")
    dotted, raw = override.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else ""
    nested: dict[str, Any] = {}
    cursor = nested
    keys = dotted.strip().split(".")
    for key in keys[:-1]:
        cursor = cursor.setdefault(key, {})
    cursor[keys[-1]] = value
    _update(config, nested, "")


def validate_config(config: LSVCRConfig) -> None:
    """Cross-field checks that a type alone cannot express."""
    choices = {
        "data.video_signal": (config.data.video_signal, ("like", "long_view", "click")),
        "model.mode": (config.model.mode, ("id+text", "text", "id")),
        "model.stacking": (config.model.stacking, ("faithful", "standard")),
        "model.architecture": (config.model.architecture, ("lsvcr", "sasrec")),
        "data.tie_break": (config.data.tie_break, ("raw_id", "file_order")),
        "data.history_before": (config.data.history_before, ("time", "position")),
        "data.like_counts": (config.data.like_counts, ("outside_users", "snapshot")),
        "finetune.selection_ranking": (config.finetune.selection_ranking, ("sampled", "full")),
        "finetune.train_targets": (config.finetune.train_targets, ("last", "all_positions")),
        "finetune.task": (config.finetune.task, ("video", "comment")),
        "finetune.use_gpu": (config.finetune.use_gpu, ("auto", "true", "false")),
        "finetune.allocator": (config.finetune.allocator, ("auto", "mimalloc", "system")),
        "align.mode": (config.align.mode, ("frozen", "lora")),
        "align.use_gpu": (config.align.use_gpu, ("auto", "true", "false")),
        "encode.language": (config.encode.language, ("en", "zh")),
        "tune.scheduler": (config.tune.scheduler, ("asha", "none")),
        "serve.ingress": (config.serve.ingress, tuple(SERVE_INGRESS_ENVIRONMENT)),
    }
    for name, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
    if config.model.hidden_size % config.model.num_heads:
        raise ConfigError("model.hidden_size must be divisible by model.num_heads")
    if config.finetune.history_length > config.model.max_position:
        raise ConfigError("finetune.history_length must not exceed model.max_position")
    if not 1 <= config.finetune.target_stride <= config.finetune.history_length:
        raise ConfigError("finetune.target_stride must be between 1 and finetune.history_length; "
                          f"got {config.finetune.target_stride}")
    if config.model.pooling_recency_bias and config.model.architecture != "lsvcr":
        raise ConfigError("model.pooling_recency_bias is a term of LSVCR's F_v pooling; "
                          f"model.architecture={config.model.architecture} has no F_v")
    if config.model.text_only_untrained_videos and (config.model.architecture != "lsvcr" or config.model.mode != "id+text"):
        raise ConfigError("model.text_only_untrained_videos drops ID embeddings so that text scores a video alone: it "
                          f"needs model.architecture=lsvcr and model.mode=id+text (got {config.model.architecture}, "
                          f"{config.model.mode})")
    if config.finetune.train_targets == "all_positions" and config.finetune.task != "video":
        raise ConfigError("finetune.train_targets=all_positions is for the video task only")
    if config.align.history_length > config.model.max_position:
        raise ConfigError("align.history_length must not exceed model.max_position")
    positive = {
        "finetune.lr": config.finetune.lr,
        "finetune.batch_size": config.finetune.batch_size,
        "finetune.num_workers": config.finetune.num_workers,
        "finetune.contrast_negatives_shared_by": config.finetune.contrast_negatives_shared_by,
        "model.temperature": config.model.temperature,
        "model.text_mlp_dim": config.model.text_mlp_dim,
        "align.batch_size": config.align.batch_size,
        "encode.batch_size": config.encode.batch_size,
    }
    zero_or_positive = {  # key: (value, what 0 means, what a positive value is)
        "finetune.max_steps_per_epoch": (config.finetune.max_steps_per_epoch, "whole epochs", "positive"),
        "finetune.checkpoint_every_steps": (config.finetune.checkpoint_every_steps, "at epoch ends only", "positive"),
        "finetune.max_logits_mb": (config.finetune.max_logits_mb, "one pass", "a positive size in MB"),
        "serve.record_comment_table_max_mb": (config.serve.record_comment_table_max_mb,
                                              "records projected per request", "a positive size in MB"),
    }
    for name, (value, zero_means, positive_is) in zero_or_positive.items():
        if value < 0:
            raise ConfigError(f"{name} must be 0 ({zero_means}) or {positive_is}; got {value}")
    if config.finetune.selection_ranking == "full" and config.finetune.task != "video":
        raise ConfigError("finetune.selection_ranking=full ranks all videos: only for finetune.task=video")
    for name, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{name} must be positive; got {value}")
    if not 0 <= config.serve.max_surge_percent <= 100:
        raise ConfigError(f"serve.max_surge_percent must be a percentage in [0, 100]; got {config.serve.max_surge_percent}")
    for name in ("video_view_aug_p", "comment_view_aug_p", "view_aug_item_p"):
        if not 0.0 <= getattr(config.align, name) <= 1.0:
            raise ConfigError(f"align.{name} must be a probability in [0, 1]; got {getattr(config.align, name)}")


def config_to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def save_config(config: LSVCRConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))


def reference_yaml() -> str:
    """Every section and key with its default and the comment beside it in this file (docs/config.md embeds it)."""
    import inspect
    import re

    lines = ["# lsvcr configuration reference: every key with its default (generated by lsvcr.config.reference_yaml)."]
    defaults = LSVCRConfig()
    for section in dataclasses.fields(LSVCRConfig):
        cls = type(getattr(defaults, section.name))
        comments = {}
        for source_line in inspect.getsource(cls).splitlines():
            match = re.match(r"\s+(\w+): [^=]+=.*?#\s*(.+)$", source_line)
            if match:
                comments[match.group(1)] = match.group(2)
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        lines += ["", f"{section.name}:  # {doc}"]
        for key, value in dataclasses.asdict(getattr(defaults, section.name)).items():
            rendered = yaml.safe_dump({key: value}, default_flow_style=True, width=1000).strip()[1:-1]
            comment = f"  # {comments[key]}" if key in comments else ""
            lines.append(f"  {rendered}{comment}")
    return "\n".join(lines) + "\n"

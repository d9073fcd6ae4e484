"""The search space of `lsvcr tune` (configs/tune_space.yaml, docs/tune.md): parsing and checking it against
the config dataclasses, its Ray Tune form, and applying one sampled point to a config."""

from __future__ import annotations

import copy
import dataclasses
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lsvcr.config import LSVCRConfig, update_config, validate_config
from lsvcr.errors import ConfigError


SEARCHABLE_SECTIONS = ("model", "finetune", "align")


DISTRIBUTIONS = ("loguniform", "uniform", "randint", "choice", "grid")


@dataclass(frozen=True)
class SearchParam:
    """One searched config value: `kind` is a distribution name or "constant"."""

    key: str  # dotted config path, e.g. finetune.lr
    kind: str
    values: tuple  # [low, high] for ranges, the options for choice/grid, (value,) for a constant


def _field_type(key: str) -> Any:
    """The annotation of the config field at dotted path `key`; ConfigError naming the key if none."""
    parts = key.split(".")
    if len(parts) != 2 or parts[0] not in SEARCHABLE_SECTIONS:
        raise ConfigError(
            f"search space key '{key}': expected section.field with section one of "
            f"{', '.join(SEARCHABLE_SECTIONS)} (data/encode are fixed by the PREPARED/VECTORS inputs, "
            "tune.* configures the sweep itself)")
    section = getattr(LSVCRConfig(), parts[0])
    hints = typing.get_type_hints(type(section))
    if parts[1] not in hints:
        known = ", ".join(f.name for f in dataclasses.fields(section))
        raise ConfigError(f"search space key '{key}': unknown config key (known in {parts[0]}: {known})")
    return hints[parts[1]]


def _check_value(key: str, value: Any) -> Any:
    """Type-check one candidate value against the config field (the same coercion as config files)."""
    section, field = key.split(".")
    probe = LSVCRConfig()
    try:
        update_config(probe, {section: {field: value}})
    except ConfigError as error:
        raise ConfigError(f"search space key '{key}': {str(error).removeprefix(key + ': ')}") from None
    return getattr(getattr(probe, section), field)


def _number(key: str, kind: str, value: Any) -> int | float:
    """A range bound. YAML reads `1e-4` (no dot) as a string, so numeric strings are accepted."""
    if isinstance(value, str):
        try:
            value = int(value) if value.strip().lstrip("+-").isdigit() else float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"search space key '{key}': {kind} bounds must be numbers, got {value!r}")
    return value


def _parse_param(key: str, spec: Any) -> SearchParam:
    annotation = _field_type(key)
    if not isinstance(spec, dict):
        return SearchParam(key, "constant", (_check_value(key, spec),))
    if len(spec) != 1:
        raise ConfigError(f"search space key '{key}': a distribution is a mapping with one key "
                          f"({', '.join(DISTRIBUTIONS)}); got {sorted(spec)}")
    (kind, args), = spec.items()
    if kind not in DISTRIBUTIONS:
        raise ConfigError(f"search space key '{key}': unknown distribution '{kind}' (known: {', '.join(DISTRIBUTIONS)})")
    if not isinstance(args, list) or not args:
        raise ConfigError(f"search space key '{key}': {kind} needs a non-empty list, got {args!r}")
    if kind in ("choice", "grid"):
        return SearchParam(key, kind, tuple(_check_value(key, value) for value in args))
    if len(args) != 2:
        raise ConfigError(f"search space key '{key}': {kind} needs [low, high], got {args!r}")
    low, high = (_number(key, kind, value) for value in args)
    if not low < high:
        raise ConfigError(f"search space key '{key}': {kind} needs low < high, got [{low}, {high}]")
    if kind == "randint":
        if annotation is not int or not all(isinstance(v, int) for v in args):
            raise ConfigError(f"search space key '{key}': randint needs an integer field and integer bounds")
        return SearchParam(key, kind, (low, high))
    if annotation is not float:
        raise ConfigError(f"search space key '{key}': {kind} needs a float field; use randint/choice for "
                          f"integers and choice for other types")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"search space key '{key}': loguniform needs 0 < low, got {low}")
    return SearchParam(key, kind, (float(low), float(high)))


def parse_space(values: Any, where: str = "search space") -> dict[str, SearchParam]:
    """A mapping of dotted config paths to distributions or constants → validated SearchParams."""
    if not isinstance(values, dict) or not values:
        raise ConfigError(f"{where}: expected a non-empty mapping of config keys to distributions, got {values!r}")
    space = {}
    for key, spec in values.items():
        if not isinstance(key, str):
            raise ConfigError(f"{where}: keys must be dotted config paths like finetune.lr, got {key!r}")
        fixed = {"finetune.task": "choose it with --task", "finetune.max_epochs": "set tune.max_epochs instead"}
        if key in fixed:
            raise ConfigError(f"search space key '{key}' cannot be searched: {fixed[key]}")
        space[key] = _parse_param(key, spec)
    return space


def load_space(path: str | Path) -> dict[str, SearchParam]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"search space file not found: {path}")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"search space file {path} is not valid YAML: {error}") from None
    return parse_space(values, where=f"search space {path}")


def space_to_dict(space: dict[str, SearchParam]) -> dict[str, Any]:
    """The YAML form of a parsed space (written beside the sweep, compared on restore)."""
    return {p.key: p.values[0] if p.kind == "constant" else {p.kind: list(p.values)} for p in space.values()}


def tune_param_space(space: dict[str, SearchParam]) -> dict[str, Any]:
    """Tune's `param_space`: {"params": {dotted key: Tune domain}} (dotted keys keep the table readable)."""
    from ray import tune

    makers = {
        "loguniform": lambda v: tune.loguniform(*v),
        "uniform": lambda v: tune.uniform(*v),
        "randint": lambda v: tune.randint(*v),
        "choice": lambda v: tune.choice(list(v)),
        "grid": lambda v: tune.grid_search(list(v)),
        "constant": lambda v: v[0],
    }
    return {"params": {p.key: makers[p.kind](p.values) for p in space.values()}}


def apply_params(config: LSVCRConfig, params: dict[str, Any]) -> LSVCRConfig:
    """A copy of `config` with the trial's sampled values (dotted keys) applied and validated."""
    nested: dict[str, dict[str, Any]] = {}
    for key, value in params.items():
        section, field = key.split(".")
        nested.setdefault(section, {})[field] = value.item() if hasattr(value, "item") else value
    trial_config = copy.deepcopy(config)
    update_config(trial_config, nested)
    validate_config(trial_config)
    return trial_config

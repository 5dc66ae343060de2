"""Modules import only from their own layer or lower ones; the core stays free of torch."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "kvforge"

LAYERS = {
    0: {"config", "engine_args", "sampling_params", "request", "outputs", "errors", "utils"},
    1: {"tokenizer", "core", "structured", "quant"},
    2: {"ops", "layers", "models", "loader", "sample", "runner"},
    3: {"engine", "output_processor", "beam_search", "async_engine", "tools"},
    4: {"entrypoints", "__init__"},
}
NO_TORCH = LAYERS[0] | {"core"}


def layer_of(top: str) -> int:
    for layer, names in LAYERS.items():
        if top in names:
            return layer
    raise AssertionError(f"module kvforge.{top} is not assigned to a layer")


def kvforge_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
    return names


def test_no_upward_imports():
    violations = []
    for path in SRC.rglob("*.py"):
        top = path.relative_to(SRC).parts[0].removesuffix(".py")
        own = layer_of(top)
        for name in kvforge_imports(path):
            if name.startswith("kvforge."):
                target = name.split(".")[1]
                if layer_of(target) > own:
                    violations.append(f"{path.relative_to(SRC)} imports {name}")
            if top in NO_TORCH and name.split(".")[0] == "torch":
                violations.append(f"{path.relative_to(SRC)} imports torch")
    assert not violations, "\n".join(violations)

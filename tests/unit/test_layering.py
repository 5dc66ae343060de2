"""Modules import only from their own layer or lower ones; the core stays free of torch."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "kvforge"

LAYERS = {
    0: {"config", "engine_args", "sampling_params", "request", "outputs", "errors", "utils"}
    | {"multimodal", "presets", "hub"}
    | {"lora.__init__", "lora.request"},
    # ops (the C++ extension's loader) needs only torch and utils: quant's searches call it
    1: {"tokenizer", "core", "structured", "quant", "ops", "lang.__init__", "lang.ir"}
    | {"lang.interpreter"}
    | {"spec_decode.__init__", "spec_decode.ngram", "spec_decode.stats"},
    2: {"parallel", "layers", "models", "loader", "sample", "runner", "spec_decode.draft"}
    | {"lora.adapter", "lora.manager", "lora.train"},
    3: {"engine", "output_processor", "beam_search", "async_engine", "tools", "clip"},
    4: {"entrypoints", "__init__", "lang.runtime"},
}
# Packages whose modules sit in different layers (named "package.module" above).
SPLIT = {"spec_decode", "lora", "lang"}
NO_TORCH = LAYERS[0] | {
    "core",
    "lang",
    "spec_decode.__init__",
    "spec_decode.ngram",
    "spec_decode.stats",
}


def key_of(parts: list[str]) -> str:
    """The LAYERS name of module ``kvforge.<parts>``."""
    top = parts[0].removesuffix(".py")
    if top in SPLIT:
        return f"{top}.{parts[1].removesuffix('.py') if len(parts) > 1 else '__init__'}"
    return top


def layer_of(key: str) -> int:
    for layer, names in LAYERS.items():
        if key in names:
            return layer
    raise AssertionError(f"module kvforge.{key} is not assigned to a layer")


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
        top = key_of(list(path.relative_to(SRC).parts))
        own = layer_of(top)
        for name in kvforge_imports(path):
            if name.startswith("kvforge."):
                target = key_of(name.split(".")[1:])
                if layer_of(target) > own:
                    violations.append(f"{path.relative_to(SRC)} imports {name}")
            if top in NO_TORCH and name.split(".")[0] == "torch":
                violations.append(f"{path.relative_to(SRC)} imports torch")
    assert not violations, "\n".join(violations)

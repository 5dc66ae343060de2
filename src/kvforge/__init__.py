"""kvforge: a small, readable LLM inference and serving engine on PyTorch.

``LLM`` is imported on first use, so ``import kvforge.core`` (the torch-free engine core) does
not load torch and the model stack.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kvforge.errors import ContextLengthError, InvalidRequestError, KVForgeError, ModelNotFoundError
from kvforge.lora.request import LoRARequest
from kvforge.outputs import CompletionOutput, Logprob, RequestOutput
from kvforge.sampling_params import SamplingParams

if TYPE_CHECKING:
    from kvforge.entrypoints.llm import LLM

__version__ = "0.1.0"

__all__ = [
    "LLM",
    "CompletionOutput",
    "ContextLengthError",
    "InvalidRequestError",
    "KVForgeError",
    "Logprob",
    "LoRARequest",
    "ModelNotFoundError",
    "RequestOutput",
    "SamplingParams",
    "__version__",
]


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from kvforge.entrypoints.llm import LLM

        return LLM
    raise AttributeError(f"module 'kvforge' has no attribute {name!r}")

"""kvforge: a small, readable LLM inference and serving engine on PyTorch."""

from kvforge.entrypoints.llm import LLM
from kvforge.errors import ContextLengthError, InvalidRequestError, KVForgeError, ModelNotFoundError
from kvforge.outputs import CompletionOutput, Logprob, RequestOutput
from kvforge.sampling_params import SamplingParams

__version__ = "0.1.0"

__all__ = [
    "LLM",
    "CompletionOutput",
    "ContextLengthError",
    "InvalidRequestError",
    "KVForgeError",
    "Logprob",
    "ModelNotFoundError",
    "RequestOutput",
    "SamplingParams",
    "__version__",
]

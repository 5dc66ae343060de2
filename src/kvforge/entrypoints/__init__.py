"""Entry points: the offline LLM API and the command line.

``LLM`` and ``engine_config`` are imported on first use, so the command line starts without
loading torch for commands that never need it (``--version``, ``quantize`` of the legacy types).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvforge.entrypoints.llm import LLM, engine_config

__all__ = ["LLM", "engine_config"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from kvforge.entrypoints import llm

        return getattr(llm, name)
    raise AttributeError(f"module 'kvforge.entrypoints' has no attribute {name!r}")

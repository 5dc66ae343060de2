"""Entry points: the offline LLM API and the command line."""

from kvforge.entrypoints.llm import LLM, engine_config

__all__ = ["LLM", "engine_config"]

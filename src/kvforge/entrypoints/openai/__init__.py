"""OpenAI-compatible and native HTTP API."""

from kvforge.entrypoints.openai.api_server import ServerConfig, build_app, serve

__all__ = ["ServerConfig", "build_app", "serve"]

"""Chat templates rendered in a sandboxed Jinja2 environment (templates come from files)."""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from kvforge.errors import InvalidRequestError

MAX_TEMPLATE_CHARS = 64 * 1024


def _raise_exception(message: str) -> None:
    raise InvalidRequestError(f"chat template error: {message}")


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False) -> str:
    # Hugging Face templates expect unescaped non-ASCII and optional indentation.
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=32)
def compile_template(source: str) -> jinja2.Template:
    """Compile a chat template once; invalid or oversized templates raise InvalidRequestError."""
    if len(source) > MAX_TEMPLATE_CHARS:
        raise InvalidRequestError(
            f"chat template is {len(source)} characters, more than {MAX_TEMPLATE_CHARS}",
            "chat_template",
        )
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateError as exc:
        raise InvalidRequestError(f"invalid chat template: {exc}", "chat_template") from exc


def render_chat_template(
    source: str,
    messages: list[dict[str, Any]],
    *,
    add_generation_prompt: bool = True,
    special_tokens: dict[str, str] | None = None,
    **kwargs: Any,
) -> str:
    """Render ``messages`` (OpenAI shape) to prompt text with a chat template."""
    if not messages:
        raise InvalidRequestError("messages must not be empty", "messages")
    try:
        return compile_template(source).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            **(special_tokens or {}),
            **kwargs,
        )
    except InvalidRequestError:
        raise
    except (jinja2.TemplateError, TypeError, KeyError, AttributeError) as exc:
        raise InvalidRequestError(f"chat template failed to render: {exc}", "messages") from exc

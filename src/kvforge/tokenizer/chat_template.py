"""Chat templates rendered in a sandboxed Jinja2 environment.

Templates may come from a request (``chat_template``), so rendering is bounded three ways:
the sandbox forbids attribute tricks, :class:`_BoundedEnvironment` refuses string or list
products and sums longer than the output cap before they are built, and
:func:`render_chat_template` stops a render that runs past its time budget (a per-thread trace
hook, so only the rendering thread pays for it) or whose output passes the cap.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable
from datetime import datetime
from functools import lru_cache
from types import FrameType
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.sandbox import ImmutableSandboxedEnvironment

from kvforge.errors import InvalidRequestError
from kvforge.utils import one_line

MAX_TEMPLATE_CHARS = 64 * 1024
# A rendered prompt longer than this is refused (far beyond any context the engine runs).
MAX_RENDERED_CHARS = 1 << 20
RENDER_TIME_BUDGET_S = 2.0
_NUMBER = re.compile(r"\d+")
_YIELD_EVERY = 256  # trace events between voluntary GIL hand-offs
# Names the renderer passes itself; a request's chat_template_kwargs may not override them.
RESERVED_TEMPLATE_NAMES = frozenset(
    {
        "messages",
        "tools",
        "add_generation_prompt",
        "bos_token",
        "eos_token",
        "special_tokens",
        "source",
        "self",
    }
)


def _too_large(what: str, size: int) -> InvalidRequestError:
    return InvalidRequestError(
        f"chat template {what} of {size} items, more than {MAX_RENDERED_CHARS}", "chat_template"
    )


def _check_format(spec: str) -> None:
    """Refuse printf / format() widths and precisions that would build a huge string."""
    for digits in _NUMBER.findall(spec):
        if len(digits) > 7 or int(digits) > MAX_RENDERED_CHARS:
            raise _too_large("formats a field", int(digits[:20]))


class _BoundedCodeGenerator(CodeGenerator):
    """Compiles ``a ~ b`` to a size-checked join (the sandbox cannot intercept ``~``)."""

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:  # noqa: N802
        """See jinja2's CodeGenerator: the same, through ``environment.bounded_concat``."""
        self.write("environment.bounded_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    """A sandbox whose operators and calls cannot build a value larger than the output cap."""

    intercepted_binops = frozenset({"*", "+", "**", "%", "/", "//"})
    code_generator_class = _BoundedCodeGenerator

    @staticmethod
    def bounded_concat(parts: tuple[Any, ...]) -> str:
        """``~``: join the parts' text unless the result would pass the cap."""
        texts = [str(part) for part in parts]
        size = sum(len(text) for text in texts)
        if size > MAX_RENDERED_CHARS:
            raise _too_large("builds a string", size)
        return "".join(texts)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        """Check the size of sequence products and sums (and exponents, formats and divisors)
        before computing."""
        if operator == "**" and isinstance(right, (int, float)) and abs(right) > 1024:
            raise InvalidRequestError("chat template exponent is too large", "chat_template")
        if operator in ("/", "//", "%") and isinstance(right, (int, float)) and right == 0:
            raise InvalidRequestError("chat template divides by zero", "chat_template")
        if operator == "%" and isinstance(left, str):
            _check_format(left)
        size = None
        if operator == "*":
            for seq, count in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(count, int):
                    size = len(seq) * count
        elif operator == "+" and isinstance(left, (str, list, tuple)):
            size = len(left) + (len(right) if hasattr(right, "__len__") else 0)
        if size is not None and size > MAX_RENDERED_CHARS:
            raise _too_large("builds a value", size)
        return super().call_binop(context, operator, left, right)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        """Refuse calls with a huge integer argument (``'x'.ljust(10**10)``, ``'{:>9999999999}'``)."""
        for value in (*args, *kwargs.values()):
            if isinstance(value, int) and abs(value) > MAX_RENDERED_CHARS:
                raise _too_large("passes a call a number", value)
        return super().call(__context, __obj, *args, **kwargs)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        """``str.format`` / ``format_map`` with bounded field widths."""
        if isinstance(getattr(value, "__self__", None), str):
            _check_format(value.__self__)
        return super().wrap_str_format(value)


def _raise_exception(message: str) -> None:
    raise InvalidRequestError(f"chat template error: {one_line(str(message))}", "chat_template")


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False) -> str:
    # Hugging Face templates expect unescaped non-ASCII and optional indentation.
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii)


def _strftime_now(fmt: str) -> str:
    if len(fmt) > 256:
        raise InvalidRequestError("chat template strftime_now format is too long", "chat_template")
    return datetime.now().strftime(fmt)


def _format_filter(value: str, *args: Any, **kwargs: Any) -> str:
    """Jinja's ``format`` filter (printf style) with bounded field widths."""
    _check_format(str(value))
    return str(value) % (kwargs or args)


@lru_cache(maxsize=32)
def compile_template(source: str) -> jinja2.Template:
    """Compile a chat template once; invalid or oversized templates raise InvalidRequestError."""
    if len(source) > MAX_TEMPLATE_CHARS:
        raise InvalidRequestError(
            f"chat template is {len(source)} characters, more than {MAX_TEMPLATE_CHARS}",
            "chat_template",
        )
    env = _BoundedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.filters["format"] = _format_filter
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except (jinja2.TemplateError, SyntaxError, RecursionError, MemoryError, ValueError) as exc:
        # SyntaxError: Python's own limits on the generated code (nesting, indentation).
        reason = exc.message if isinstance(exc, jinja2.TemplateError) else type(exc).__name__
        raise InvalidRequestError(
            f"invalid chat template: {one_line(str(reason))}", "chat_template"
        ) from exc


def render_chat_template(
    source: str,
    messages: list[dict[str, Any]],
    *,
    add_generation_prompt: bool = True,
    special_tokens: dict[str, str] | None = None,
    **kwargs: Any,
) -> str:
    """Render ``messages`` (OpenAI shape) to prompt text with a chat template.

    Raises InvalidRequestError when the template fails, runs longer than
    ``RENDER_TIME_BUDGET_S`` or writes more than ``MAX_RENDERED_CHARS``.
    """
    if not messages:
        raise InvalidRequestError("messages must not be empty", "messages")
    template = compile_template(source)
    context = {
        "messages": messages,
        "add_generation_prompt": add_generation_prompt,
        **(special_tokens or {}),
        **kwargs,
    }
    parts: list[str] = []
    size = 0
    try:
        with _time_budget(RENDER_TIME_BUDGET_S):
            for part in template.generate(context):
                size += len(part)
                if size > MAX_RENDERED_CHARS:
                    raise InvalidRequestError(
                        f"chat template output exceeds {MAX_RENDERED_CHARS} characters",
                        "chat_template",
                    )
                parts.append(part)
    except InvalidRequestError:
        raise
    except (OverflowError, MemoryError, RecursionError) as exc:
        raise InvalidRequestError(
            f"chat template is too expensive to render: {type(exc).__name__}", "chat_template"
        ) from exc
    except Exception as exc:  # noqa: BLE001 - whatever a template does wrong is the request's
        raise InvalidRequestError(
            f"chat template failed to render: {type(exc).__name__}: {one_line(str(exc))}",
            "chat_template",
        ) from exc
    return "".join(parts)


class _time_budget:  # noqa: N801 - used as a context manager
    """Raise InvalidRequestError inside the current thread once ``seconds`` have passed.

    A trace hook on this thread only (``sys.settrace``) checks the clock on every executed
    line of the template's code, and now and then yields the GIL so that other threads (the
    event loop above all) keep answering while a hostile template runs.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.deadline = 0.0
        self.num_events = 0
        self._previous: Callable[..., Any] | None = None

    def _trace(self, frame: FrameType, event: str, arg: Any) -> Any:
        self.num_events += 1
        if self.num_events % _YIELD_EVERY == 0:
            time.sleep(0)  # hand the GIL to the event loop: a long render must not starve it
        if time.monotonic() > self.deadline:
            raise InvalidRequestError(
                f"chat template took longer than {self.seconds:g}s to render", "chat_template"
            )
        return self._trace

    def __enter__(self) -> None:
        self.deadline = time.monotonic() + self.seconds
        self._previous = sys.gettrace()
        sys.settrace(self._trace)

    def __exit__(self, *exc: object) -> None:
        sys.settrace(self._previous)

"""The frontend language's expressions: what a program appends to its state.

``s += "text"``, ``s += user("...")``, ``s += assistant(gen("answer", max_tokens=64))`` and
concatenations such as ``"I need a " + gen("tool", choices=[...]) + "."`` build these plain
objects; the interpreter (``interpreter.py``) runs them in order against a backend.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class Expr:
    """Something a program can append to its state; ``+`` concatenates."""

    def __add__(self, other: object) -> Concat:
        return Concat([self, as_expr(other)])

    def __radd__(self, other: object) -> Concat:
        return Concat([as_expr(other), self])


@dataclass(eq=False)
class Text(Expr):
    """Literal text."""

    text: str


@dataclass(eq=False)
class Concat(Expr):
    """Expressions run one after the other."""

    parts: list[Expr]

    def __post_init__(self) -> None:  # keep it flat
        flat: list[Expr] = []
        for part in self.parts:
            flat.extend(part.parts if isinstance(part, Concat) else [part])
        self.parts = flat


@dataclass(eq=False)
class RoleBegin(Expr):
    """Opens a chat turn of ``role`` (system, user or assistant)."""

    role: str


@dataclass(eq=False)
class RoleEnd(Expr):
    """Closes the open chat turn."""

    role: str


@dataclass(eq=False)
class Gen(Expr):
    """Generate text into variable ``name`` (sampling options as the OpenAI API names them)."""

    name: str | None = None
    max_tokens: int = 128
    stop: str | list[str] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    regex: str | None = None
    json_schema: str | dict[str, Any] | None = None
    ignore_eos: bool = False

    def sampling(self) -> dict[str, Any]:
        """The options that were set, by name."""
        options = {
            "max_tokens": self.max_tokens,
            "stop": self.stop,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "regex": self.regex,
            "json_schema": self.json_schema,
            "ignore_eos": self.ignore_eos or None,
        }
        return {k: v for k, v in options.items() if v is not None}


@dataclass(eq=False)
class Select(Expr):
    """Append the most likely of ``choices`` (token-length-normalised log-probability given
    the text so far) and store it in variable ``name``."""

    name: str | None
    choices: list[str] = field(default_factory=list)


def as_expr(value: object) -> Expr:
    """``value`` as an expression (strings become Text)."""
    if isinstance(value, Expr):
        return value
    if isinstance(value, str):
        return Text(value)
    raise TypeError(f"cannot append {type(value).__name__} to a program state (str or an expr)")


def _role(role: str, expr: object | None) -> Expr:
    if expr is None:
        return RoleBegin(role)
    return Concat([RoleBegin(role), as_expr(expr), RoleEnd(role)])


def system(expr: object | None = None) -> Expr:
    """A system turn holding ``expr`` (without it: only the turn's start, see system_end)."""
    return _role("system", expr)


def user(expr: object | None = None) -> Expr:
    """A user turn holding ``expr``."""
    return _role("user", expr)


def assistant(expr: object | None = None) -> Expr:
    """An assistant turn holding ``expr`` (usually text and gen calls)."""
    return _role("assistant", expr)


def system_begin() -> Expr:
    """Open a system turn."""
    return RoleBegin("system")


def system_end() -> Expr:
    """Close the system turn."""
    return RoleEnd("system")


def user_begin() -> Expr:
    """Open a user turn."""
    return RoleBegin("user")


def user_end() -> Expr:
    """Close the user turn."""
    return RoleEnd("user")


def assistant_begin() -> Expr:
    """Open an assistant turn."""
    return RoleBegin("assistant")


def assistant_end() -> Expr:
    """Close the assistant turn."""
    return RoleEnd("assistant")


def gen(
    name: str | None = None,
    max_tokens: int = 128,
    stop: str | list[str] | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    regex: str | None = None,
    json_schema: str | dict[str, Any] | None = None,
    choices: list[str] | None = None,
    ignore_eos: bool = False,
) -> Expr:
    """Generate into ``name``; with ``choices``, pick one of them (as :func:`select`)."""
    if choices is not None:
        return select(name, choices)
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise ValueError(f"gen({name!r}): max_tokens must be a positive integer")
    return Gen(name, max_tokens, stop, temperature, top_p, top_k, regex, json_schema, ignore_eos)


def select(name: str | None = None, choices: list[str] | None = None) -> Expr:
    """Pick the most likely of ``choices`` and store it in ``name``."""
    if isinstance(choices, (str, bytes)):
        raise ValueError(f"select({name!r}): choices must be a list of strings, not one string")
    options = list(choices or [])
    if not options or not all(isinstance(c, str) for c in options):
        raise ValueError(f"select({name!r}): choices must be a non-empty list of strings")
    return Select(name, options)

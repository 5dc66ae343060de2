"""kvforge's frontend language: SGLang-style programs (``@function``, ``gen``, ``select``, chat
turns, ``fork``) over a backend. Importable without torch."""

from kvforge.lang.interpreter import (
    Backend,
    Completion,
    ForkGroup,
    Program,
    ProgramError,
    ProgramState,
    function,
    set_default_backend,
)
from kvforge.lang.ir import (
    assistant,
    assistant_begin,
    assistant_end,
    gen,
    select,
    system,
    system_begin,
    system_end,
    user,
    user_begin,
    user_end,
)

__all__ = [
    "Backend",
    "Completion",
    "ForkGroup",
    "Program",
    "ProgramError",
    "ProgramState",
    "assistant",
    "assistant_begin",
    "assistant_end",
    "function",
    "gen",
    "select",
    "set_default_backend",
    "system",
    "system_begin",
    "system_end",
    "user",
    "user_begin",
    "user_end",
]

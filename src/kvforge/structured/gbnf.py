"""llama.cpp GBNF -> the EBNF dialect xgrammar parses.

GBNF allows empty alternatives (``ws ::= | " "``); xgrammar wants them spelled ``""``.
This pass inserts ``""`` wherever an alternative is empty, skipping strings, character
classes and comments. No grammar library covers this dialect difference, hence this code.
"""

from __future__ import annotations

import re

_RULE_START = re.compile(r"\s*[A-Za-z_][A-Za-z0-9_-]*\s*::=")


def normalize_gbnf(text: str) -> str:
    """Return ``text`` with every empty alternative written as ``""``."""
    out: list[str] = []
    i, n = 0, len(text)
    last = "::="  # the previous significant token: "::=", "|", "(" or "x" (anything else)
    while i < n:
        ch = text[i]
        if ch in "\"'[":
            end = _skip_literal(text, i)
            out.append(text[i:end])
            i, last = end, "x"
            continue
        if ch == "#":
            end = text.find("\n", i)
            end = n if end < 0 else end
            out.append(text[i:end])
            i = end
            continue
        if text.startswith("::=", i):
            out.append("::=")
            i, last = i + 3, "::="
            continue
        if ch == "|":
            if last in ("::=", "|", "("):
                out.append('""')
            out.append("|")
            i, last = i + 1, "|"
            if _alternative_ends(text, i):
                out.append(' ""')
                last = "x"
            continue
        if ch == "\n" and last in ("::=",) and _RULE_START.match(text, i + 1):
            out.append(' ""')  # a rule with an empty body
            last = "x"
        if not ch.isspace():
            last = "(" if ch == "(" else "x"
        out.append(ch)
        i += 1
    return "".join(out)


def _skip_literal(text: str, start: int) -> int:
    close = "]" if text[start] == "[" else text[start]
    i = start + 1
    while i < len(text) and text[i] != close:
        i += 2 if text[i] == "\\" else 1
    return i + 1


def _alternative_ends(text: str, i: int) -> bool:
    """After a ``|``: is the next alternative empty (``)``, a new rule, or the end)?"""
    while i < len(text):
        if text[i] == "#":
            newline = text.find("\n", i)
            i = len(text) if newline < 0 else newline
        elif text[i].isspace():
            if text[i] == "\n" and _RULE_START.match(text, i + 1):
                return True
            i += 1
        else:
            return text[i] == ")"
    return True

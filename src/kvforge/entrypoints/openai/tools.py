"""Tool calling: tool definitions into the prompt, grammar-enforced calls, parsing calls back.

Calls are written Hermes / Qwen style, ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``;
bare JSON objects (or lists of them) with ``name`` and ``arguments`` are accepted too.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from kvforge.errors import InvalidRequestError
from kvforge.sampling_params import StructuredOutputsParams

_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
_EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}
MAX_PARALLEL_CALLS = 4  # bounds an enforced reply so it can close within a normal max_tokens


def functions(tools: list[dict[str, Any]] | None) -> dict[str, dict[str, Any]]:
    """Tool definitions by function name (validated)."""
    found: dict[str, dict[str, Any]] = {}
    for tool in tools or []:
        function = tool.get("function") if tool.get("type", "function") == "function" else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise InvalidRequestError(
                "each tool needs type 'function' and a function name", "tools"
            )
        found[function["name"]] = function
    return found


def chosen_functions(tools: dict[str, dict[str, Any]], tool_choice: Any) -> tuple[str, list[str]]:
    """(mode, allowed function names) for a ``tool_choice`` value."""
    if tool_choice is None:
        tool_choice = "auto" if tools else "none"
    if isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name")
        if name not in tools:
            raise InvalidRequestError(f"tool_choice names unknown function {name!r}", "tool_choice")
        return "named", [name]
    if tool_choice not in ("none", "auto", "required"):
        raise InvalidRequestError(f"unknown tool_choice {tool_choice!r}", "tool_choice")
    if tool_choice != "none" and not tools:
        raise InvalidRequestError(f"tool_choice {tool_choice!r} needs tools", "tool_choice")
    return tool_choice, list(tools)


def call_constraint(
    tools: dict[str, dict[str, Any]], names: list[str], parallel: bool
) -> StructuredOutputsParams:
    """A JSON schema whose instances are exactly the valid calls of the named functions."""
    options = [
        {
            "type": "object",
            "properties": {
                "name": {"const": name},
                "arguments": tools[name].get("parameters") or _EMPTY_PARAMETERS,
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for name in names
    ]
    call = options[0] if len(options) == 1 else {"anyOf": options}
    schema = (
        {"type": "array", "items": call, "minItems": 1, "maxItems": MAX_PARALLEL_CALLS}
        if parallel
        else call
    )
    return StructuredOutputsParams(json=schema)


def system_instruction(tools: dict[str, dict[str, Any]]) -> str:
    """Default tool instruction for chat templates that do not render ``tools`` themselves."""
    specs = "\n".join(json.dumps({"type": "function", "function": f}) for f in tools.values())
    return (
        "You can call these functions:\n<tools>\n" + specs + "\n</tools>\n"
        'To call one, reply with <tool_call>{"name": <function name>, "arguments": '
        "<arguments object>}</tool_call>."
    )


def render_messages(
    messages: list[dict[str, Any]], tools: dict[str, dict[str, Any]], template: str | None
) -> list[dict[str, Any]]:
    """Messages as a template without tool support can show them: the instruction for the
    offered ``tools`` in the system message, past calls as ``<tool_call>`` text, tool results
    as ``tool`` turns. Templates that render ``tools`` themselves get the messages unchanged."""
    if template is not None and "tools" in template:
        return messages
    out = []
    for message in messages:
        message = dict(message)
        calls = message.pop("tool_calls", None)
        if calls:
            text = "".join(
                "<tool_call>"
                + json.dumps({"name": c["function"]["name"], "arguments": _arguments(c)})
                + "</tool_call>"
                for c in calls
            )
            message["content"] = (message.get("content") or "") + text
        out.append(message)
    if tools:
        instruction = system_instruction(tools)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{instruction}"}
        else:
            out.insert(0, {"role": "system", "content": instruction})
    return out


def _arguments(call: dict[str, Any]) -> Any:
    """The parsed arguments of a past tool call (a JSON string, or already an object)."""
    arguments = call["function"].get("arguments") or "{}"
    if not isinstance(arguments, str):
        return arguments
    try:
        return json.loads(arguments)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, digit limits, nesting
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "too large or deep"
        raise InvalidRequestError(
            f"tool call arguments are not valid JSON: {reason}", "messages"
        ) from exc


def _as_calls(value: Any, tools: dict[str, dict[str, Any]]) -> list[dict[str, Any]] | None:
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        if not (
            isinstance(item, dict)
            and item.get("name") in tools
            and isinstance(item.get("arguments", {}), dict)
        ):
            return None
        calls.append(
            {
                "id": f"call_{uuid.uuid4().hex[:24]}",
                "type": "function",
                "function": {
                    "name": item["name"],
                    "arguments": json.dumps(item.get("arguments", {})),
                },
            }
        )
    return calls or None


def parse_tool_calls(
    text: str, tools: dict[str, dict[str, Any]]
) -> tuple[str | None, list[dict[str, Any]]]:
    """(remaining content, OpenAI tool_calls) found in generated text."""
    calls: list[dict[str, Any]] = []
    for match in _TOOL_CALL.finditer(text):
        try:
            parsed = _as_calls(json.loads(match.group(1)), tools)
        except json.JSONDecodeError:
            parsed = None
        if parsed:
            calls.extend(parsed)
    if calls:
        content = _TOOL_CALL.sub("", text).strip()
        return content or None, calls
    try:
        parsed = _as_calls(json.loads(text.strip()), tools)
    except json.JSONDecodeError:
        parsed = None
    return (None, parsed) if parsed else (text, [])

"""Tool-call parsing and enforcement schemas without a model."""

from __future__ import annotations

import json

import jsonschema
import pytest

from kvforge.entrypoints.openai.tools import (
    call_constraint,
    chosen_functions,
    functions,
    parse_tool_calls,
    render_messages,
)
from kvforge.errors import InvalidRequestError

TOOLS = functions(
    [
        {
            "type": "function",
            "function": {
                "name": "f",
                "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}},
            },
        },
        {"type": "function", "function": {"name": "g"}},
    ]
)


def test_parses_hermes_and_bare_json():
    text = 'Sure.<tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call><tool_call>{"name": "g", "arguments": {}}</tool_call>'
    content, calls = parse_tool_calls(text, TOOLS)
    assert content == "Sure."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("f", {"x": 1}),
        ("g", {}),
    ]
    assert len({c["id"] for c in calls}) == 2
    content, calls = parse_tool_calls('[{"name": "f", "arguments": {"x": 2}}]', TOOLS)
    assert content is None and json.loads(calls[0]["function"]["arguments"]) == {"x": 2}
    assert parse_tool_calls('{"name": "unknown", "arguments": {}}', TOOLS)[1] == []
    assert parse_tool_calls("just text", TOOLS) == ("just text", [])


def test_constraint_schema_accepts_exactly_valid_calls():
    schema = call_constraint(TOOLS, ["f", "g"], parallel=True).json
    assert isinstance(schema, dict)
    jsonschema.validate(
        [{"name": "f", "arguments": {"x": 3}}, {"name": "g", "arguments": {}}], schema
    )
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "f", "arguments": {"x": "no"}}], schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([], schema)
    single = call_constraint(TOOLS, ["g"], parallel=False).json
    jsonschema.validate({"name": "g", "arguments": {}}, single)


def test_tool_choice_and_rendering():
    assert chosen_functions(TOOLS, None) == ("auto", ["f", "g"])
    assert chosen_functions(TOOLS, {"type": "function", "function": {"name": "g"}}) == (
        "named",
        ["g"],
    )
    with pytest.raises(InvalidRequestError):
        chosen_functions(TOOLS, "sometimes")
    with pytest.raises(InvalidRequestError):
        chosen_functions({}, "required")
    history = [
        {"role": "user", "content": "hi"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"id": "1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "1", "content": "42"},
    ]
    rendered = render_messages(history, TOOLS, template="{{ messages }}")
    assert rendered[0]["role"] == "system" and "<tools>" in rendered[0]["content"]
    assert '<tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>' in rendered[2]["content"]
    assert render_messages(history, TOOLS, template="{{ tools }}") == history

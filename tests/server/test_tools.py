"""Tool calling through the official client: enforced calls always carry valid arguments."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two integers",
        "parameters": {
            "type": "object",
            "properties": {
                "a": {"type": "integer", "minimum": -1000, "maximum": 1000},
                "b": {"type": "integer", "minimum": -1000, "maximum": 1000},
            },
            "required": ["a", "b"],
        },
    },
}
TOOLS = [WEATHER, ADD]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def check_calls(message) -> list[tuple[str, dict]]:
    assert message.tool_calls, message
    found = []
    for call in message.tool_calls:
        arguments = json.loads(call.function.arguments)
        jsonschema.validate(arguments, SCHEMAS[call.function.name])
        assert call.id and call.type == "function"
        found.append((call.function.name, arguments))
    return found


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize(
    "question", ["What's the weather in Paris?", "What is 2 plus 40?", "Hello!"]
)
def test_required_calls_are_always_valid(client, question, temperature):
    reply = client.chat.completions.create(
        model="smollm",
        messages=[{"role": "user", "content": question}],
        tools=TOOLS,
        tool_choice="required",
        temperature=temperature,
        seed=1,
        max_tokens=120,
    )
    assert reply.choices[0].finish_reason == "tool_calls"
    check_calls(reply.choices[0].message)


def test_named_choice_calls_that_function(client):
    reply = client.chat.completions.create(
        model="smollm",
        messages=[{"role": "user", "content": "Weather in Oslo, please."}],
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=0,
        max_tokens=80,
    )
    [(name, arguments)] = check_calls(reply.choices[0].message)
    assert name == "get_weather" and set(arguments) == {"city", "unit"}


def test_streaming_tool_calls_equal_non_streaming(client):
    request = dict(
        model="smollm",
        messages=[{"role": "user", "content": "Add 3 and 4."}],
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "add"}},
        temperature=0,
        max_tokens=60,
    )
    full = client.chat.completions.create(**request)
    expected = [(c.function.name, c.function.arguments) for c in full.choices[0].message.tool_calls]
    streamed: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in client.chat.completions.create(**request, stream=True):
        if not chunk.choices:
            continue
        for delta in chunk.choices[0].delta.tool_calls or []:
            entry = streamed.setdefault(delta.index, {"name": "", "arguments": ""})
            entry["name"] += delta.function.name or ""
            entry["arguments"] += delta.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert [(e["name"], e["arguments"]) for _, e in sorted(streamed.items())] == expected
    assert finish == "tool_calls"


def test_two_turn_tool_conversation(client):
    messages = [{"role": "user", "content": "What's the weather in Rome?"}]
    first = client.chat.completions.create(
        model="smollm",
        messages=messages,
        tools=TOOLS,
        tool_choice="required",
        temperature=0,
        max_tokens=80,
    )
    call = first.choices[0].message.tool_calls[0]
    messages.append(
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.function.name, "arguments": call.function.arguments},
                }
            ],
        }
    )
    messages.append(
        {
            "role": "tool",
            "tool_call_id": call.id,
            "content": json.dumps({"temperature": 21, "sky": "sunny"}),
        }
    )
    second = client.chat.completions.create(
        model="smollm",
        messages=messages,
        tools=TOOLS,
        tool_choice="none",
        temperature=0,
        max_tokens=40,
    )
    assert second.choices[0].message.content
    assert not second.choices[0].message.tool_calls
    alone = client.chat.completions.create(
        model="smollm", messages=messages[:1], tools=TOOLS, tool_choice="none", max_tokens=1
    )
    # The call and its result were rendered into the second prompt.
    assert second.usage.prompt_tokens > alone.usage.prompt_tokens + 20


def test_bad_tool_choice_is_400(server):
    body = {
        "messages": [{"role": "user", "content": "hi"}],
        "tools": TOOLS,
        "tool_choice": {"type": "function", "function": {"name": "nope"}},
    }
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body)
    assert response.status_code == 400 and "nope" in response.json()["error"]["message"]
    response = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hi"}], "tool_choice": "required"},
    )
    assert response.status_code == 400

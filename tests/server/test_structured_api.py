"""Structured output over HTTP: response_format, vLLM / SGLang extension fields, 400s."""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field


class City(BaseModel):
    name: str = Field(max_length=16)
    country: str = Field(max_length=16)
    population_millions: int = Field(ge=0, le=50)


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def test_response_format_json_schema_and_object(client):
    schema = City.model_json_schema()
    reply = client.chat.completions.create(
        model="smollm",
        messages=[{"role": "user", "content": "Describe Paris as JSON."}],
        max_tokens=120,
        temperature=0,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "city", "schema": schema, "strict": True},
        },
    )
    jsonschema.validate(json.loads(reply.choices[0].message.content), schema)
    parsed = (
        client.beta.chat.completions.parse(
            model="smollm",
            messages=[{"role": "user", "content": "Describe Rome as JSON."}],
            max_tokens=120,
            temperature=0,
            response_format=City,
        )
        if hasattr(client, "beta")
        else None
    )
    if parsed is not None:
        assert isinstance(parsed.choices[0].message.parsed, City)


def test_extension_fields(client, server):
    choice = client.chat.completions.create(
        model="smollm",
        messages=[{"role": "user", "content": "Is the sky blue?"}],
        max_tokens=5,
        extra_body={"guided_choice": ["yes", "no"]},
    )
    assert choice.choices[0].message.content in ("yes", "no")
    regex = client.completions.create(
        model="smollm", prompt="Phone:", max_tokens=12, extra_body={"regex": r"\d{3}-\d{4}"}
    )
    assert re.fullmatch(r"\d{3}-\d{4}", regex.choices[0].text)
    grammar = client.completions.create(
        model="smollm",
        prompt="Sum:",
        max_tokens=12,
        extra_body={"guided_grammar": 'root ::= [0-9] [0-9]? "+" [0-9] [0-9]?'},
    )
    assert re.fullmatch(r"[0-9]{1,2}\+[0-9]{1,2}", grammar.choices[0].text)
    streamed = client.chat.completions.create(
        model="smollm",
        messages=[{"role": "user", "content": "Pick a color."}],
        max_tokens=5,
        stream=True,
        extra_body={"choice": ["red", "green"]},
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) in (
        "red",
        "green",
    )
    native = httpx.post(
        f"{server.url}/generate",
        timeout=60,
        json={
            "text": "Answer:",
            "sampling_params": {
                "max_new_tokens": 30,
                "json_schema": json.dumps(
                    {
                        "type": "object",
                        "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}},
                        "required": ["a"],
                    }
                ),
            },
        },
    ).json()
    assert json.loads(native["text"])["a"] in range(10)


BAD = [
    (
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "bogus"}},
            }
        },
        "invalid JSON schema",
    ),
    (
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}},
            }
        },
        "uniqueItems",
    ),
    ({"guided_regex": "(unclosed"}, "regex"),
    ({"guided_grammar": "root ::= missing_rule"}, "grammar"),
    ({"guided_choice": []}, "choice"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "only one"),
    ({"response_format": {"type": "yaml"}}, "response_format"),
]


@pytest.mark.parametrize("extra,needle", BAD, ids=[b[1] for b in BAD])
def test_bad_constraints_are_400(server, extra, needle):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, **extra}
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    assert needle in response.json()["error"]["message"]
    ok = httpx.post(
        f"{server.url}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=60
    )
    assert ok.status_code == 200

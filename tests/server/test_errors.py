"""Every bad input gets an OpenAI error body and the right status; the server keeps serving."""

from __future__ import annotations

import httpx
import pytest


def assert_error(response: httpx.Response, status: int, *needles: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    for needle in needles:
        assert needle in error["message"]


CASES = [
    ("not json", "/v1/chat/completions", "{not json", 400, ["JSON"]),
    ("wrong type", "/v1/chat/completions", {"messages": "hello"}, 400, ["messages"]),
    ("empty messages", "/v1/chat/completions", {"messages": []}, 400, ["messages"]),
    (
        "negative max_tokens",
        "/v1/completions",
        {"prompt": "hi", "max_tokens": -1},
        400,
        ["max_tokens"],
    ),
    ("too long", "/v1/completions", {"prompt": "hi", "max_tokens": 5000}, 400, ["5000", "1024"]),
    ("n too large", "/v1/completions", {"prompt": "hi", "n": 1000}, 400, ["n must be"]),
    (
        "bad temperature",
        "/v1/completions",
        {"prompt": "hi", "temperature": -2},
        400,
        ["temperature"],
    ),
    ("bad token id", "/v1/completions", {"prompt": [10**9]}, 400, ["token id"]),
    ("unknown model", "/v1/completions", {"prompt": "hi", "model": "gpt-9"}, 404, ["gpt-9"]),
    (
        "bad role",
        "/v1/chat/completions",
        {"messages": [{"role": "wizard", "content": "x"}]},
        400,
        [],
    ),
    ("bad generate", "/generate", {"text": "hi", "sampling_params": {"bogus": 1}}, 400, ["bogus"]),
    (
        "bad template",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "chat_template": "{% for %}"},
        400,
        ["template"],
    ),
]


@pytest.mark.parametrize("name,path,body,status,needles", CASES, ids=[c[0] for c in CASES])
def test_bad_input(server, name, path, body, status, needles):
    if isinstance(body, str):
        response = httpx.post(
            server.url + path, content=body, headers={"content-type": "application/json"}
        )
    else:
        response = httpx.post(server.url + path, json=body)
    assert_error(response, status, *needles)
    ok = httpx.post(
        f"{server.url}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=60
    )
    assert ok.status_code == 200


def assert_still_serving(server) -> None:
    ok = httpx.post(
        f"{server.url}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=60
    )
    assert ok.status_code == 200


def test_body_too_large(server):
    response = httpx.post(f"{server.url}/v1/completions", json={"prompt": "x " * 200_000})
    assert_error(response, 413)
    chunked = httpx.post(
        f"{server.url}/v1/completions",
        content=iter([b'{"prompt": "', b"x" * 300_000, b'"}']),
        headers={"content-type": "application/json"},
    )
    assert_error(chunked, 413)
    assert_still_serving(server)


def test_unknown_route_is_404(server):
    assert_error(httpx.get(f"{server.url}/v1/nothing"), 404)
    assert_still_serving(server)

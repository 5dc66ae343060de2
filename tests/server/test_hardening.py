"""Hostile input over HTTP: every body below gets a 4xx with an OpenAI error body (or correct
behaviour) and the server goes on serving; nothing heavy runs on the event loop."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time

import httpx
import pytest

from tests.server.test_errors import assert_error, assert_still_serving
from tests.server.test_lifecycle import metric, wait_for

MESSAGES = [{"role": "user", "content": "hi"}]
NESTED_LOOPS = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"

HOSTILE = [
    ("logprobs huge", "/v1/completions", {"prompt": "hi", "logprobs": 1_000_000}, "logprobs"),
    ("logprobs 21", "/v1/completions", {"prompt": "hi", "logprobs": 21}, "logprobs"),
    (
        "top_logprobs 21",
        "/v1/chat/completions",
        {"messages": MESSAGES, "logprobs": True, "top_logprobs": 21},
        "top_logprobs",
    ),
    ("seed 2**64", "/v1/completions", {"prompt": "hi", "seed": 2**64}, "seed"),
    ("seed 2**70", "/v1/completions", {"prompt": "hi", "seed": 2**70}, "seed"),
    ("seed -2**64", "/v1/completions", {"prompt": "hi", "seed": -(2**64)}, "seed"),
    ("top_k 2**63", "/v1/completions", {"prompt": "hi", "top_k": 2**63}, "top_k"),
    ("top_k -5", "/v1/completions", {"prompt": "hi", "top_k": -5}, "top_k"),
    ("best_of huge", "/v1/completions", {"prompt": "hi", "best_of": 1_000_000}, "best_of"),
    ("generate n huge", "/generate", {"text": "hi", "sampling_params": {"n": 1_000_000}}, "n"),
    ("generate n 64", "/generate", {"text": "hi", "sampling_params": {"n": 64}}, "n"),
    (
        "generate max_new_tokens string",
        "/generate",
        {"text": "hi", "sampling_params": {"max_new_tokens": "3"}},
        "max_tokens",
    ),
    (
        "generate temperature NaN",
        "/generate",
        {"text": "hi", "sampling_params": {"temperature": float("nan")}},
        "temperature",
    ),
    (
        "generate stop not strings",
        "/generate",
        {"text": "hi", "sampling_params": {"stop": [1, 2]}},
        "stop",
    ),
    (
        "generate regex not a string",
        "/generate",
        {"text": "hi", "sampling_params": {"regex": 5}},
        "regex",
    ),
    (
        "template builds a huge string",
        "/v1/chat/completions",
        {"messages": MESSAGES, "chat_template": "{{ 'x' * 50000000 }}"},
        "chat template",
    ),
    (
        "template loops for hours",
        "/v1/chat/completions",
        {"messages": MESSAGES, "chat_template": NESTED_LOOPS},
        "chat template",
    ),
    (
        "template range(10**9)",
        "/v1/chat/completions",
        {"messages": MESSAGES, "chat_template": "{% for i in range(10**9) %}{% endfor %}"},
        "chat template",
    ),
    (
        "template ljust huge",
        "/v1/chat/completions",
        {"messages": MESSAGES, "chat_template": "{{ 'x'.ljust(10**10) }}"},
        "chat template",
    ),
    ("lone surrogate in prompt", "/v1/completions", {"prompt": "a\ud800b"}, "surrogate"),
    (
        "lone surrogate in a message",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "a\udfffb"}]},
        "surrogate",
    ),
    ("lone surrogate in /tokenize", "/tokenize", {"prompt": "\ud800"}, "surrogate"),
    (
        "lone surrogate in a stop string",
        "/v1/completions",
        {"prompt": "hi", "stop": ["\ud800"]},
        "surrogate",
    ),
    *[
        (
            f"reserved chat_template_kwargs {key}",
            "/v1/chat/completions",
            {"messages": MESSAGES, "chat_template_kwargs": {key: value}},
            key,
        )
        for key, value in [
            ("tools", []),
            ("messages", []),
            ("special_tokens", {}),
            ("add_generation_prompt", False),
        ]
    ],
    (
        "tool call without function",
        "/v1/chat/completions",
        {
            "messages": [
                {"role": "user", "content": "x"},
                {"role": "assistant", "tool_calls": [{"id": "a", "type": "function"}]},
            ]
        },
        "function",
    ),
    (
        "tool call arguments not JSON",
        "/v1/chat/completions",
        {
            "messages": [
                {"role": "user", "content": "x"},
                {
                    "role": "assistant",
                    "tool_calls": [{"function": {"name": "f", "arguments": "{nope"}}],
                },
            ]
        },
        "arguments",
    ),
    (
        "tool_choice function not an object",
        "/v1/chat/completions",
        {
            "messages": MESSAGES,
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "tool_choice": {"type": "function", "function": "f"},
        },
        "tool_choice",
    ),
    (
        "json_schema as a string",
        "/v1/chat/completions",
        {"messages": MESSAGES, "response_format": {"type": "json_schema", "json_schema": "{}"}},
        "json_schema",
    ),
    (
        "unknown response_format",
        "/v1/chat/completions",
        {"messages": MESSAGES, "response_format": {"type": "yaml"}},
        "response_format",
    ),
    ("temperature NaN", "/v1/completions", {"prompt": "hi", "temperature": float("nan")}, "temp"),
    ("temperature inf", "/v1/completions", {"prompt": "hi", "temperature": float("inf")}, "temp"),
    (
        "repetition_penalty NaN",
        "/v1/completions",
        {"prompt": "hi", "repetition_penalty": float("nan")},
        "repetition_penalty",
    ),
    (
        "logit_bias NaN",
        "/v1/completions",
        {"prompt": "hi", "logit_bias": {"5": float("nan")}},
        "logit_bias",
    ),
    ("max_tokens string", "/v1/completions", {"prompt": "hi", "max_tokens": "3"}, "max_tokens"),
    ("max_tokens bool", "/v1/completions", {"prompt": "hi", "max_tokens": True}, "max_tokens"),
    ("n float", "/v1/completions", {"prompt": "hi", "n": 2.0}, "n"),
    ("min_tokens 1e9", "/v1/completions", {"prompt": "hi", "min_tokens": 10**9}, "min_tokens"),
    (
        "min_tokens beyond the context",
        "/v1/completions",
        {"prompt": "hi", "min_tokens": 10**9, "max_tokens": None},
        "min_tokens",
    ),
    (
        "length_penalty huge",
        "/v1/completions",
        {"prompt": "hi", "use_beam_search": True, "n": 2, "length_penalty": 1e300},
        "length_penalty",
    ),
    ("bad regex", "/v1/completions", {"prompt": "hi", "regex": "("}, "regex"),
    ("stop string too long", "/v1/completions", {"prompt": "hi", "stop": ["x" * 5000]}, "stop"),
    (
        "too many stop token ids",
        "/v1/completions",
        {"prompt": "hi", "stop_token_ids": [5] * 5000},
        "stop_token_ids",
    ),
    *[
        (f"template {name}", "/v1/chat/completions", {"messages": MESSAGES, "chat_template": t}, n)
        for name, t, n in [
            ("divides by zero", "{{ 1/0 }}", "chat template"),
            ("modulo by zero", "{{ 1 % 0 }}", "chat template"),
            ("undefined name", "{{ 'inf'|float * 0 }}", "chat template"),
            ("nested ifs", "{% if 1 %}" * 200 + "{% endif %}" * 200, "chat template"),
            ("deep parentheses", "{{ " + "(" * 3000 + "1" + ")" * 3000 + " }}", "chat template"),
            ("printf width", "{{ '%0999999999d' % 1 }}", "chat template"),
            ("format width", "{{ '{:>999999999}'.format(1) }}", "chat template"),
            ("format filter width", "{{ '%0999999999d'|format(1) }}", "chat template"),
            (
                "doubling with ~",
                "{% set ns = namespace(s='a') %}{% for i in range(40) %}"
                "{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
                "chat template",
            ),
            ("long strftime format", "{{ strftime_now('%Y' * 100000) }}", "chat template"),
        ]
    ],
    *[
        (
            f"reserved chat_template_kwargs {key}",
            "/v1/chat/completions",
            {"messages": MESSAGES, "chat_template_kwargs": {key: 1}},
            key,
        )
        for key in ("self", "source")
    ],
    (
        "tool call arguments nested too deep",
        "/v1/chat/completions",
        {
            "messages": [
                {"role": "user", "content": "x"},
                {
                    "role": "assistant",
                    "tool_calls": [
                        {"function": {"name": "f", "arguments": "[" * 5000 + "]" * 5000}}
                    ],
                },
            ]
        },
        "arguments",
    ),
    ("generate n null", "/generate", {"text": "hi", "sampling_params": {"n": None}}, "n"),
    (
        "generate temperature 10**400",
        "/generate",
        {"text": "hi", "sampling_params": {"temperature": 10**400}},
        "temperature",
    ),
    ("unsatisfiable regex", "/v1/completions", {"prompt": "hi", "regex": "[^\\s\\S]"}, "regex"),
    (
        "unsatisfiable grammar",
        "/v1/completions",
        {"prompt": "hi", "grammar": "root ::= a\na ::= a"},
        "grammar",
    ),
    (
        "beam width above 10",
        "/v1/completions",
        {"prompt": "hi", "use_beam_search": True, "n": 11, "max_tokens": 2},
        "beam width",
    ),
    (
        "required tool call with beam search",
        "/v1/chat/completions",
        {
            "messages": MESSAGES,
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
            "tool_choice": "required",
            "use_beam_search": True,
            "n": 2,
        },
        "beam",
    ),
    ("rid with '#'", "/generate", {"text": "hi", "rid": "x#0"}, "request id"),
    ("rid with a newline", "/generate", {"text": "hi", "rid": "a\nb"}, "request id"),
    ("rid too long", "/generate", {"text": "hi", "rid": "r" * 1000}, "request id"),
    (
        "too many sequences",
        "/v1/completions",
        {"prompt": ["hi"] * 200, "n": 16, "max_tokens": 1},
        "sequences",
    ),
]


@pytest.mark.parametrize("name,path,body,needle", HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_body_is_400(server, name, path, body, needle):
    response = httpx.post(
        server.url + path,
        content=json.dumps(body, allow_nan=True),  # NaN / Infinity as Python's json writes them
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert_error(response, 400, needle)
    assert "\n" not in response.json()["error"]["message"]
    assert_still_serving(server)


def test_library_errors_hide_build_paths(server):
    response = httpx.post(
        f"{server.url}/v1/completions", json={"prompt": "hi", "grammar": "root ::= foo"}
    )
    assert_error(response, 400, "foo")
    message = response.json()["error"]["message"]
    assert ".cc" not in message and "/" not in message


def test_json_object_mode_gives_an_object(server):
    for seed in range(4):
        response = httpx.post(
            f"{server.url}/v1/chat/completions",
            json={
                "messages": [{"role": "user", "content": "Give me a JSON list of numbers."}],
                "response_format": {"type": "json_object"},
                "temperature": 1.0,
                "seed": seed,
                "max_tokens": 24,
            },
            timeout=60,
        )
        assert response.status_code == 200, response.text
        text = response.json()["choices"][0]["message"]["content"]
        assert text.lstrip().startswith("{"), text


def _health_latencies(server, seconds: float) -> list[float]:
    latencies = []
    deadline = time.monotonic() + seconds
    with httpx.Client() as client:
        while time.monotonic() < deadline:
            start = time.monotonic()
            assert client.get(f"{server.url}/health", timeout=10).status_code == 200
            latencies.append(time.monotonic() - start)
            time.sleep(0.02)
    return latencies


def test_health_stays_fast_while_a_template_renders(server):
    def hostile() -> None:
        httpx.post(
            f"{server.url}/v1/chat/completions",
            json={"messages": MESSAGES, "chat_template": NESTED_LOOPS},
            timeout=60,
        )

    workers = [threading.Thread(target=hostile) for _ in range(2)]
    for worker in workers:
        worker.start()
    time.sleep(0.2)
    latencies = _health_latencies(server, 1.5)
    for worker in workers:
        worker.join()
    assert max(latencies) < 0.1, max(latencies)


def test_non_streaming_request_is_aborted_on_disconnect(server):
    body = {"prompt": "Tell a very long story.", "max_tokens": 900, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=body, timeout=1.0)
    # 900 tokens take far longer than this: the request was aborted, not finished.
    assert wait_for(lambda: metric(server, "kvforge:num_requests_running") == 0, timeout=5)
    assert_still_serving(server)


def test_slow_header_connections_are_closed(guarded):
    sockets = []
    host, port = guarded.url.removeprefix("http://").split(":")
    for _ in range(50):
        sock = socket.create_connection((host, int(port)))
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # headers never end
        sockets.append(sock)
    # Other clients are served meanwhile.
    assert httpx.get(f"{guarded.url}/health", timeout=5).status_code == 200
    time.sleep(3.0)  # the fixture's --timeout-header-read is 2 s
    for sock in sockets:
        sock.settimeout(5)
        assert sock.recv(1024) == b""  # closed by the server
        sock.close()


def test_cors_preflight_is_answered_before_auth(guarded):
    origin = {"Origin": "http://ok.example"}
    preflight = httpx.options(
        f"{guarded.url}/v1/chat/completions",
        headers={
            **origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "http://ok.example"
    denied = httpx.post(f"{guarded.url}/v1/completions", json={"prompt": "hi"}, headers=origin)
    assert denied.status_code == 401
    assert denied.headers["access-control-allow-origin"] == "http://ok.example"
    other = httpx.post(
        f"{guarded.url}/v1/completions",
        json={"prompt": "hi"},
        headers={"Origin": "http://evil.example"},
    )
    assert other.status_code == 401 and "access-control-allow-origin" not in other.headers


def test_health_stays_fast_while_a_huge_enum_compiles(guarded):
    schema = {"type": "string", "enum": [f"value{i}" for i in range(100_000)]}

    def hostile() -> None:
        # The client gives up early; the compile goes on in the worker pool regardless.
        with contextlib.suppress(httpx.TimeoutException):
            httpx.post(
                f"{guarded.url}/v1/completions",
                json={"prompt": "hi", "max_tokens": 1, "json_schema": schema},
                headers={"Authorization": "Bearer s3cret"},
                timeout=4,
            )

    worker = threading.Thread(target=hostile)
    worker.start()
    time.sleep(0.5)
    latencies = _health_latencies(guarded, 2.0)
    worker.join()
    assert max(latencies) < 0.1, max(latencies)


def test_embeddings_are_bounded_and_batched(server, guarded):
    too_many = {"input": [[17] * 1000] * 70}  # 70,000 tokens in one request
    response = httpx.post(
        f"{guarded.url}/v1/embeddings",
        json=too_many,
        headers={"Authorization": "Bearer s3cret"},
        timeout=60,
    )
    assert_error(response, 400, "tokens")
    # 5 x 1000 tokens run as two forward passes; each vector equals the one computed alone.
    inputs = [[100 + i] * 1000 for i in range(5)]
    batched = httpx.post(f"{server.url}/v1/embeddings", json={"input": inputs}, timeout=300)
    assert batched.status_code == 200, batched.text
    vectors = [item["embedding"] for item in batched.json()["data"]]
    for ids, vector in zip(inputs[::4], vectors[::4]):
        alone = httpx.post(f"{server.url}/v1/embeddings", json={"input": [ids]}, timeout=300)
        expected = alone.json()["data"][0]["embedding"]
        assert max(abs(a - b) for a, b in zip(vector, expected)) < 1e-3


def test_multi_line_messages_are_one_line(server):
    template = "{{ raise_exception('boom\\nline2') }}"
    response = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"messages": MESSAGES, "chat_template": template},
    )
    assert_error(response, 400, "boom line2")
    garbage = httpx.post(
        f"{server.url}/v1/completions",
        content=b'{"prompt": "hi"} trailing',
        headers={"content-type": "application/json"},
    )
    assert_error(garbage, 400, "JSON")
    assert garbage.json()["error"]["param"] is None


def test_sample_ids_cannot_collide_with_request_ids(server):
    """n > 1 samples run under internal ids; a user id can never take one of them."""
    body = {
        "text": "Once upon a time",
        "rid": "x",
        "sampling_params": {"max_new_tokens": 8, "n": 2, "temperature": 0.8, "ignore_eos": True},
    }
    response = httpx.post(f"{server.url}/generate", json=body, timeout=60)
    assert response.status_code == 200, response.text
    assert [len(r["output_ids"]) for r in response.json()] == [8, 8]


def test_constraint_the_vocabulary_cannot_spell_is_400(server):
    """A choice with a character no token spells dead-ends after its first token: the
    request gets 400 (streamed: an error event with code 400) and the engine goes on."""
    body = {"prompt": [0], "choice": ["0\x16"], "max_tokens": 8}
    response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
    assert_error(response, 400, "vocabulary")
    with httpx.stream(
        "POST", f"{server.url}/v1/completions", json={**body, "stream": True}, timeout=60
    ) as stream:
        events = [line[6:] for line in stream.iter_lines() if line.startswith("data: ")]
    errors = [json.loads(e)["error"] for e in events if e != "[DONE]" and "error" in e]
    assert errors and errors[0]["code"] == 400, events
    assert_still_serving(server)

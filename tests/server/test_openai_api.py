"""The OpenAI-compatible API through the official client and plain HTTP."""

from __future__ import annotations

import json
import math

import httpx
import openai
import pytest

CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def sse_events(response: httpx.Response) -> list[dict]:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            events.append(json.loads(line[6:]))
    return events


def test_models_lists_names_and_aliases(client):
    assert [m.id for m in client.models.list().data] == ["smollm", "smol-alias"]


def test_chat_and_streaming_agree(client):
    full = client.chat.completions.create(
        model="smollm", messages=CHAT, max_tokens=20, temperature=0
    )
    assert "Paris" in full.choices[0].message.content
    assert full.choices[0].finish_reason == "stop"
    assert full.usage.prompt_tokens > 0 and full.usage.completion_tokens > 0
    chunks = list(
        client.chat.completions.create(
            model="smol-alias",
            messages=CHAT,
            max_tokens=20,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == full.choices[0].message.content
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].delta.content is None
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_completion_streaming_agrees(client):
    full = client.completions.create(
        model="smollm", prompt="The three primary colors are", max_tokens=16, temperature=0
    )
    stream = client.completions.create(
        model="smollm",
        prompt="The three primary colors are",
        max_tokens=16,
        temperature=0,
        stream=True,
    )
    assert "".join(c.choices[0].text for c in stream) == full.choices[0].text
    assert full.choices[0].finish_reason == "length"


def test_n_seed_stop_echo_and_prompt_lists(client):
    many = client.completions.create(
        model="smollm", prompt="My favourite animal is", max_tokens=8, n=3, temperature=1.0, seed=5
    )
    assert sorted(c.index for c in many.choices) == [0, 1, 2]
    again = client.completions.create(
        model="smollm", prompt="My favourite animal is", max_tokens=8, n=3, temperature=1.0, seed=5
    )
    assert [c.text for c in again.choices] == [c.text for c in many.choices]
    free = client.completions.create(
        model="smollm", prompt="Count: one, two, three,", max_tokens=12, temperature=0
    )
    word = free.choices[0].text.strip().split()[0].strip(",")
    stopped = client.completions.create(
        model="smollm", prompt="Count: one, two, three,", max_tokens=12, temperature=0, stop=[word]
    )
    assert word not in stopped.choices[0].text and stopped.choices[0].finish_reason == "stop"
    echoed = client.completions.create(
        model="smollm", prompt="Hello there", max_tokens=3, temperature=0, echo=True
    )
    assert echoed.choices[0].text.startswith("Hello there")
    batch = client.completions.create(
        model="smollm", prompt=["Hi", "Hello"], max_tokens=3, temperature=0
    )
    assert sorted(c.index for c in batch.choices) == [0, 1]
    ids = client.completions.create(
        model="smollm", prompt=[[1, 2, 3], [4, 5]], max_tokens=3, temperature=0
    )
    assert sorted(c.index for c in ids.choices) == [0, 1]


def test_logprobs(client):
    comp = client.completions.create(
        model="smollm", prompt="The sky is", max_tokens=4, temperature=0, logprobs=2
    )
    lp = comp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == 4
    assert all(len(top) >= 2 for top in lp.top_logprobs)
    chat = client.chat.completions.create(
        model="smollm", messages=CHAT, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == 4
    for item in content:
        assert len(item.top_logprobs) == 3
        assert item.top_logprobs[0].logprob == pytest.approx(item.logprob)  # greedy: top-1


def test_embeddings(client):
    result = client.embeddings.create(
        model="smollm", input=["a cat sat on the mat", "a dog sat on the rug"]
    )
    assert [d.index for d in result.data] == [0, 1]
    for item in result.data:
        assert math.isclose(sum(x * x for x in item.embedding), 1.0, rel_tol=1e-4)
    assert result.usage.prompt_tokens > 0


def test_tokenize_detokenize_and_native_generate(server):
    tokens = httpx.post(f"{server.url}/tokenize", json={"prompt": "Hello world"}).json()
    assert tokens["count"] == len(tokens["tokens"]) > 0
    text = httpx.post(f"{server.url}/detokenize", json={"tokens": tokens["tokens"]}).json()[
        "prompt"
    ]
    assert text == "Hello world"
    chat_tokens = httpx.post(f"{server.url}/tokenize", json={"messages": CHAT}).json()
    assert chat_tokens["count"] > tokens["count"]
    body = {
        "text": "The capital of France is",
        "sampling_params": {"temperature": 0, "max_new_tokens": 8},
    }
    result = httpx.post(f"{server.url}/generate", json=body, timeout=60).json()
    assert result["text"] and result["meta_info"]["completion_tokens"] == 8
    assert result["meta_info"]["finish_reason"]["type"] == "length"
    with httpx.stream(
        "POST", f"{server.url}/generate", json={**body, "stream": True}, timeout=60
    ) as response:
        events = sse_events(response)
    assert events[-1]["text"] == result["text"]
    assert httpx.get(f"{server.url}/version").json()["version"]


def test_32_concurrent_streams_interleave(server):
    import asyncio
    import time

    async def one(client: openai.AsyncOpenAI, i: int) -> list[float]:
        stamps = []
        stream = await client.chat.completions.create(
            model="smollm",
            messages=[{"role": "user", "content": f"Tell me a fact about number {i}."}],
            max_tokens=12,
            temperature=0,
            stream=True,
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                stamps.append(time.monotonic())
        return stamps

    async def main() -> list[list[float]]:
        client = openai.AsyncOpenAI(
            base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=300
        )
        return await asyncio.gather(*(one(client, i) for i in range(32)))

    stamps = asyncio.run(main())
    assert all(s for s in stamps)
    # Continuous batching: every stream started before any stream finished.
    assert max(s[0] for s in stamps) < min(s[-1] for s in stamps)


def test_presets_over_http(server):
    """A request naming a preset is answered as with the preset's values written out; an
    unknown preset is a 400 that lists the valid ones."""
    from kvforge.presets import SAMPLING

    body = {"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 8}
    with_preset = httpx.post(
        f"{server.url}/v1/chat/completions", json={**body, "preset": "factual"}, timeout=60
    )
    spelled = httpx.post(
        f"{server.url}/v1/chat/completions", json={**body, **SAMPLING["factual"].values}, timeout=60
    )
    assert with_preset.status_code == 200
    text = with_preset.json()["choices"][0]["message"]["content"]
    assert text == spelled.json()["choices"][0]["message"]["content"]
    bad = httpx.post(f"{server.url}/v1/chat/completions", json={**body, "preset": "turbo"})
    assert bad.status_code == 400
    assert "valid presets: code, factual" in bad.json()["error"]["message"]
    bad = httpx.post(
        f"{server.url}/v1/completions", json={"prompt": "hi", "max_tokens": 2, "preset": "turbo"}
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "preset"


def test_json_access_log(tmp_path):
    """--json-access-log: one JSON object per request on stderr, refused ones included."""
    from tests.server.conftest import start_server, stop_server

    handle = start_server(tmp_path, "--json-access-log", "--api-key", "k")
    try:
        ok = httpx.get(f"{handle.url}/v1/models", headers={"Authorization": "Bearer k"})
        refused = httpx.get(f"{handle.url}/v1/models")
        assert (ok.status_code, refused.status_code) == (200, 401)
    finally:
        stop_server(handle)
    entries = []
    for line in handle.log().splitlines():
        if line.startswith("{"):
            entries.append(json.loads(line))
    models = [e for e in entries if e["path"] == "/v1/models"]
    assert [e["status"] for e in models] == [200, 401]
    assert all(e["method"] == "GET" and e["duration_ms"] >= 0 and e["bytes"] > 0 for e in models)

"""Acceptance: a tight KV cache under load preempts, and every request still finishes exactly
as it does alone (float32 path, 64 MiB of KV, 32 concurrent greedy requests over 8 prompts)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.server.conftest import ServerHandle, start_server, stop_server
from tests.server.test_lifecycle import metric

NUM_PROMPTS = 8
COPIES = 4
MAX_NEW_TOKENS = 200


@pytest.fixture(scope="module")
def tight(tmp_path_factory) -> Iterator[ServerHandle]:
    handle = start_server(
        tmp_path_factory.mktemp("tight"),
        "--kv-cache-memory",
        "64MiB",
        "--max-model-len",
        "1024",
        "--dtype",
        "float32",
    )
    yield handle
    stop_server(handle)


def prompts(server: ServerHandle) -> list[list[int]]:
    """Eight distinct prompts of about 360 tokens."""
    out = []
    for i in range(NUM_PROMPTS):
        text = f"Document {i}. " + " ".join(f"line {i}-{j} of the report" for j in range(60))
        ids = httpx.post(f"{server.url}/tokenize", json={"prompt": text}).json()["tokens"]
        out.append(ids[:360])
    return out


def generate(server: ServerHandle, ids: list[int]) -> dict:
    body = {
        "input_ids": ids,
        "sampling_params": {
            "max_new_tokens": MAX_NEW_TOKENS,
            "temperature": 0,
            "ignore_eos": True,
        },
    }
    response = httpx.post(f"{server.url}/generate", json=body, timeout=1800)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.slow
def test_tight_kv_preempts_and_matches_solo_runs(tight):
    inputs = prompts(tight)
    assert all(len(ids) == 360 for ids in inputs)
    solo = [generate(tight, ids)["output_ids"] for ids in inputs]
    before = metric(tight, "kvforge:num_preemptions_total")
    with ThreadPoolExecutor(NUM_PROMPTS * COPIES) as pool:
        results = list(pool.map(lambda i: generate(tight, inputs[i % NUM_PROMPTS]), range(32)))
    for i, result in enumerate(results):
        assert result["meta_info"]["finish_reason"]["type"] == "length"
        assert result["output_ids"] == solo[i % NUM_PROMPTS], f"request {i} differs"
    assert metric(tight, "kvforge:num_preemptions_total") > before
    assert metric(tight, "kvforge:kv_cache_blocks_used") == 0
    assert httpx.get(f"{tight.url}/health").status_code == 200

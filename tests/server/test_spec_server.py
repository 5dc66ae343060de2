"""A server with n-gram speculation: same greedy text as without, drafts counted in /metrics
and in the per-request log line."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from tests.server.conftest import ServerHandle, start_server, stop_server
from tests.server.test_lifecycle import metric

PROMPT = (
    "Repeat this list exactly: apple, banana, cherry, date, elderberry, fig, grape. "
    "List: apple, banana,"
)


@pytest.fixture(scope="module")
def spec_server(tmp_path_factory) -> Iterator[ServerHandle]:
    handle = start_server(
        tmp_path_factory.mktemp("spec"),
        "--speculative-method",
        "ngram",
        "--num-speculative-tokens",
        "5",
        "--max-model-len",
        "1024",
    )
    yield handle
    stop_server(handle)


def complete(server: ServerHandle, stream: bool = False) -> str:
    body = {"prompt": PROMPT, "max_tokens": 40, "temperature": 0, "ignore_eos": True}
    if not stream:
        response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=300)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["text"]
    text = ""
    with httpx.stream(
        "POST", f"{server.url}/v1/completions", json={**body, "stream": True}, timeout=300
    ) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                choices = json.loads(line[6:])["choices"]
                text += "".join(c.get("text", "") for c in choices)
    return text


@pytest.mark.slow
def test_speculation_keeps_text_and_reports_drafts(server, spec_server):
    plain = complete(server)
    assert complete(spec_server) == plain
    assert complete(spec_server, stream=True) == plain
    drafts = metric(spec_server, "kvforge:spec_decode_num_draft_tokens_total")
    accepted = metric(spec_server, "kvforge:spec_decode_num_accepted_tokens_total")
    assert drafts > 0 and 0 < accepted <= drafts
    assert metric(spec_server, "kvforge:spec_decode_mean_accepted_length") > 1
    first = metric(
        spec_server, "kvforge:spec_decode_acceptance_rate_per_position", '{position="0"}'
    )
    assert 0 < first <= 1
    assert "accepted" in spec_server.log() and "drafts " in spec_server.log()

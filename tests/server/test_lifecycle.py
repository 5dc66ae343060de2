"""Disconnects, metrics, auth, queue limits and SIGTERM draining on real server processes."""

from __future__ import annotations

import re
import signal
import threading
import time

import httpx

from tests.server.conftest import start_server


def metric(server, name: str, labels: str = "") -> float:
    text = httpx.get(f"{server.url}/metrics").text
    pattern = rf"^{re.escape(name)}{re.escape(labels)} ([0-9.e+-]+)$"
    match = re.search(pattern, text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def wait_for(predicate, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_disconnects_abort_and_free_blocks(server):
    baseline = metric(server, "kvforge:kv_cache_blocks_used")
    body = {
        "prompt": "Write a very long story about a lighthouse keeper.",
        "max_tokens": 400,
        "stream": True,
    }
    for _ in range(20):
        with httpx.stream(
            "POST", f"{server.url}/v1/completions", json=body, timeout=60
        ) as response:
            for i, _line in enumerate(response.iter_lines()):
                if i >= 2:
                    break  # leave mid-stream: the connection closes here
    assert wait_for(lambda: metric(server, "kvforge:num_requests_running") == 0)
    assert wait_for(lambda: metric(server, "kvforge:kv_cache_blocks_used") == baseline)
    start = time.monotonic()
    ok = httpx.post(
        f"{server.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 4}, timeout=60
    )
    assert ok.status_code == 200
    assert time.monotonic() - start < 10  # nothing left running in the way


def test_metrics_move_with_requests(server):
    length_before = metric(server, "kvforge:request_success_total", '{finished_reason="length"}')
    stop_before = metric(server, "kvforge:request_success_total", '{finished_reason="stop"}')
    gen_before = metric(server, "kvforge:generation_tokens_total")
    prompt_before = metric(server, "kvforge:prompt_tokens_total")
    ttft_before = metric(server, "kvforge:time_to_first_token_seconds_count")
    queries_before = metric(server, "kvforge:prefix_cache_queries_total")
    for _ in range(2):
        httpx.post(
            f"{server.url}/v1/completions",
            json={
                "prompt": "One two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen",
                "max_tokens": 5,
                "temperature": 0,
            },
            timeout=60,
        )
    chat = {
        "messages": [{"role": "user", "content": "Say hi."}],
        "max_tokens": 64,
        "temperature": 0,
    }
    reply = httpx.post(f"{server.url}/v1/chat/completions", json=chat, timeout=60).json()
    assert reply["choices"][0]["finish_reason"] == "stop"
    assert (
        metric(server, "kvforge:request_success_total", '{finished_reason="length"}')
        == length_before + 2
    )
    assert (
        metric(server, "kvforge:request_success_total", '{finished_reason="stop"}')
        == stop_before + 1
    )
    generated = 10 + reply["usage"]["completion_tokens"]
    assert metric(server, "kvforge:generation_tokens_total") == gen_before + generated
    assert metric(server, "kvforge:prompt_tokens_total") > prompt_before
    assert metric(server, "kvforge:time_to_first_token_seconds_count") == ttft_before + 3
    assert metric(server, "kvforge:prefix_cache_queries_total") > queries_before
    assert metric(server, "kvforge:prefix_cache_hits_total") > 0  # the second identical prompt


def test_api_key_is_required_but_health_is_public(guarded):
    assert httpx.get(f"{guarded.url}/health").status_code == 200
    denied = httpx.post(f"{guarded.url}/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    assert denied.status_code == 401 and denied.json()["error"]["type"] == "authentication_error"
    wrong = httpx.post(
        f"{guarded.url}/v1/completions",
        json={"prompt": "hi"},
        headers={"Authorization": "Bearer nope"},
    )
    assert wrong.status_code == 401
    ok = httpx.post(
        f"{guarded.url}/v1/completions",
        json={"prompt": "hi", "max_tokens": 2},
        headers={"Authorization": "Bearer s3cret"},
        timeout=60,
    )
    assert ok.status_code == 200


def test_queue_limit_gives_429(guarded):
    headers = {"Authorization": "Bearer s3cret"}
    # ignore_eos: the first request must still be running when the others arrive
    body = {
        "prompt": "Tell me a long story.",
        "max_tokens": 500,
        "stream": True,
        "ignore_eos": True,
    }
    first_running, done = threading.Event(), threading.Event()
    results: dict[str, int] = {}

    def stream(name: str) -> None:
        with httpx.stream(
            "POST", f"{guarded.url}/v1/completions", json=body, headers=headers, timeout=120
        ) as r:
            results[name] = r.status_code
            for _ in r.iter_lines():
                first_running.set()
                if done.is_set():
                    break  # disconnect: the server aborts the request

    threads = {name: threading.Thread(target=stream, args=(name,)) for name in ("one", "two")}
    threads["one"].start()
    assert first_running.wait(60)  # running: the waiting queue is empty again
    threads["two"].start()
    assert wait_for(lambda: metric_guarded(guarded) >= 1)
    third = httpx.post(
        f"{guarded.url}/v1/completions", json={"prompt": "hi"}, headers=headers, timeout=60
    )
    assert third.status_code == 429 and third.json()["error"]["type"] == "rate_limit_error"
    done.set()
    for thread in threads.values():
        thread.join(120)
    assert results == {"one": 200, "two": 200}
    ok = httpx.post(
        f"{guarded.url}/v1/completions",
        json={"prompt": "hi", "max_tokens": 2},
        headers=headers,
        timeout=60,
    )
    assert ok.status_code == 200


def metric_guarded(handle) -> float:
    text = httpx.get(f"{handle.url}/metrics", headers={"Authorization": "Bearer s3cret"}).text
    match = re.search(r"^kvforge:num_requests_waiting ([0-9.]+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_sigterm_drains_in_flight_requests(tmp_path):
    handle = start_server(tmp_path, "--shutdown-timeout", "60")
    lines: list[str] = []
    started = threading.Event()

    def stream() -> None:
        body = {"prompt": "Once upon a time", "max_tokens": 40, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{handle.url}/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line:
                    lines.append(line)
                    started.set()

    thread = threading.Thread(target=stream)
    thread.start()
    assert started.wait(60)
    handle.process.send_signal(signal.SIGTERM)
    assert wait_for(lambda: httpx.get(f"{handle.url}/health").status_code == 503, 10)
    refused = httpx.post(f"{handle.url}/v1/completions", json={"prompt": "hi"})
    assert refused.status_code == 503
    thread.join(120)
    assert lines[-1] == "data: [DONE]"
    assert '"finish_reason": "length"' in "\n".join(lines)
    assert handle.process.wait(60) == 0
    assert "draining" in handle.log()

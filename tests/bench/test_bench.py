"""``kvforge bench``: the offline modes on the embedded model, the load generator against a
stub OpenAI-compatible server (known sleeps, failures) and a real ``kvforge serve``, and the
table of ``benchmarks/vs_llamacpp.py`` from fake results."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import random
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from kvforge.entrypoints.bench.loadgen import ServeBenchConfig, run_serve_benchmark
from kvforge.entrypoints.bench.offline import decode_rate
from kvforge.entrypoints.cli import main
from kvforge.outputs import CompletionOutput, RequestMetrics, RequestOutput
from tests.server.conftest import free_port, start_server, stop_server

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- offline modes


def test_latency_reports_fresh_prefill_and_decode_rates(tmp_path, capsys):
    path = tmp_path / "latency.json"
    argv = ["bench", "latency", "-p", "40", "-n", "4", "-r", "2", "--kv-cache-memory", "64MiB"]
    assert main([*argv, "--batch-size", "2", "--output-json", str(path)]) == 0
    data = json.loads(path.read_text())
    assert [t["test"] for t in data["tests"]] == ["pp40", "tg4"]
    assert [(t["n_prompt"], t["n_gen"]) for t in data["tests"]] == [(40, 0), (0, 4)]
    for test in data["tests"]:
        assert len(test["samples_ts"]) == 2 and min(test["samples_ts"]) > 0
        assert min(test["samples_ts"]) <= test["median_ts"] <= max(test["samples_ts"])
    # Every sequence drew fresh tokens: the same 40 again would find 32 in the prefix cache.
    assert data["num_cached_tokens"] == 0
    assert data["batch_size"] == 2 and data["num_threads"] >= 1 and data["cpu"]
    out = capsys.readouterr().out
    assert re.search(r"\| +pp40 \| +[0-9.]+ ± [0-9.]+ \|", out), out
    assert re.search(r"\| +tg4 \| +[0-9.]+ ± [0-9.]+ \|", out), out
    assert "CPU:" in out and "torch threads:" in out


def test_latency_on_a_prompt_file_with_speculation(tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    lines = [
        {"name": "copy", "prompt": "Copy exactly: one two three four five six seven eight."},
        {"name": "chat", "messages": [{"role": "user", "content": "Say hello."}]},
    ]
    prompts.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    path = tmp_path / "latency.json"
    argv = ["bench", "latency", "-p", "0", "-n", "12", "-r", "2", "--kv-cache-memory", "64MiB"]
    argv += ["--prompt-file", str(prompts), "--speculative-method", "ngram"]
    assert main([*argv, "--output-json", str(path)]) == 0
    data = json.loads(path.read_text())
    assert [t["test"] for t in data["tests"]] == ["tg12 copy", "tg12 chat"]
    assert all(min(t["samples_ts"]) > 0 for t in data["tests"])
    spec = data["spec_decode"]
    # The warm-up's drafts are left out; the copy prompt has n-grams to look up.
    assert spec["num_verifications"] > 0
    assert 0 <= spec["num_accepted_tokens"] <= spec["num_draft_tokens"]
    assert sum(spec["proposed_per_position"]) == spec["num_draft_tokens"]
    assert "speculative decoding: drafts:" in capsys.readouterr().out


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "holds no prompts"),
        ("{not json\n", "line 1: not JSON"),
        ('{"prompt": "x"}\n', "string 'name'"),
        ('{"name": "a", "messages": []}\n', "needs a 'prompt' string or 'messages'"),
    ],
)
def test_latency_rejects_a_bad_prompt_file(tmp_path, capsys, content, message):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(content)
    argv = ["bench", "latency", "-n", "4", "--prompt-file", str(prompts)]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert main(["bench", "latency", "--prompt-file", str(tmp_path / "missing.jsonl")]) == 2


def test_throughput_counts_requests_and_tokens(tmp_path, capsys):
    path = tmp_path / "throughput.json"
    argv = ["bench", "throughput", "--num-prompts", "3", "--input-len", "8", "--output-len", "4"]
    assert main([*argv, "--kv-cache-memory", "64MiB", "--output-json", str(path)]) == 0
    data = json.loads(path.read_text())
    assert data["num_requests"] == 3
    assert data["num_prompt_tokens"] == 24 and data["num_output_tokens"] == 12
    assert data["output_tokens_per_s"] * data["elapsed_s"] == pytest.approx(12)
    assert data["total_tokens_per_s"] * data["elapsed_s"] == pytest.approx(36)
    assert data["requests_per_s"] * data["elapsed_s"] == pytest.approx(3)
    assert "requests/s:" in capsys.readouterr().out


def _finished(num_tokens: int, first: float, last: float) -> RequestOutput:
    metrics = RequestMetrics(arrival_time=0.0, first_token_time=first, finished_time=last)
    completion = CompletionOutput(0, "", list(range(num_tokens)), finish_reason="length")
    return RequestOutput("r", None, [1], [completion], True, metrics=metrics)


def test_decode_rate_leaves_out_the_prefill():
    # 5 tokens each, the first at t=10 (after prefill): 4 decode tokens per sequence in 2 s.
    assert decode_rate([_finished(5, 10.0, 12.0)]) == pytest.approx(2.0)
    assert decode_rate([_finished(5, 10.0, 12.0), _finished(5, 10.0, 11.5)]) == pytest.approx(4.0)


def test_latency_rejects_a_single_generated_token():
    # -n 1 has no token after the first: the CLI says so instead of dividing by zero.
    assert main(["bench", "latency", "-p", "0", "-n", "1", "--kv-cache-memory", "16MiB"]) == 2


# ---------------------------------------------------------------- stub server


@dataclass
class Stub:
    """Behaviour and observations of the stub OpenAI-compatible server."""

    first_delay: float = 0.2  # seconds before the first chunk
    gap: float = 0.05  # seconds between chunks
    num_chunks: int = 6
    usage: bool = True
    fail_every: int = 0  # every n-th request (1-based) gets a 500
    bodies: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0


def stub_app(stub: Stub) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": "stub-model", "object": "model"}]}

    async def complete(request: Request) -> Any:
        stub.arrivals.append(time.perf_counter())
        stub.bodies.append(await request.json())
        stub.headers.append(dict(request.headers))
        if stub.fail_every and len(stub.bodies) % stub.fail_every == 0:
            return JSONResponse({"error": {"message": "boom"}}, status_code=500)
        is_chat = request.url.path.endswith("/chat/completions")
        return StreamingResponse(events(is_chat), media_type="text/event-stream")

    async def events(is_chat: bool) -> Any:
        stub.in_flight += 1
        stub.max_in_flight = max(stub.max_in_flight, stub.in_flight)
        try:
            await asyncio.sleep(stub.first_delay)
            for i in range(stub.num_chunks):
                if i:
                    await asyncio.sleep(stub.gap)
                choice = (
                    {"index": 0, "delta": {"content": f" w{i}"}} if is_chat else {"text": f" w{i}"}
                )
                yield f"data: {json.dumps({'choices': [choice]})}\n\n"
            if stub.usage:
                usage = {"prompt_tokens": 11, "completion_tokens": stub.num_chunks}
                yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            stub.in_flight -= 1

    app.post("/v1/completions")(complete)
    app.post("/v1/chat/completions")(complete)
    return app


@pytest.fixture
def start_stub() -> Iterator[Callable[..., tuple[str, Stub]]]:
    """Factory: start a stub server in a thread with the given behaviour; stopped at teardown."""
    servers: list[tuple[uvicorn.Server, threading.Thread]] = []

    def start(**behaviour: Any) -> tuple[str, Stub]:
        stub = Stub(**behaviour)
        port = free_port()
        config = uvicorn.Config(stub_app(stub), host="127.0.0.1", port=port, log_level="warning")
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.started, "stub server did not start"
        servers.append((server, thread))
        return f"http://127.0.0.1:{port}", stub

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(timeout=10)


def test_serve_timings_match_the_stub(start_stub):
    url, stub = start_stub()
    config = ServeBenchConfig(
        base_url=f"{url}/v1",
        num_prompts=8,
        input_len=12,
        output_len=6,
        max_concurrency=4,
        api_key="k3y",
        headers=(("X-Bench", "yes"),),
    )
    result = run_serve_benchmark(config)
    assert (result.num_completed, result.num_failed) == (8, 0)
    assert result.model == "stub-model"  # from GET /v1/models
    assert result.num_output_tokens == 48 and result.num_prompt_tokens == 88  # from usage
    for request in result.requests:
        assert request.ttft is not None and 0.2 <= request.ttft < 1.5
        assert len(request.itl) == 5 and min(request.itl) >= 0  # 6 chunks, 5 gaps
        assert request.tpot == pytest.approx((request.e2e - request.ttft) / 5)
        assert request.e2e >= 0.2 + 5 * 0.05 * 0.95  # the stub slept this long at least
    # A busy client may read two chunks together, so bound the medians, not every gap.
    assert 200 <= result.ttft.median <= result.ttft.p99 < 1500  # milliseconds
    assert 40 <= result.itl.median < 300 and 40 <= result.tpot.median < 300
    # Two waves of 4: the run lasts at least two requests' worth of sleeps.
    assert result.duration >= 2 * (0.2 + 5 * 0.05) * 0.9
    assert result.output_throughput == pytest.approx(48 / result.duration)
    assert result.total_throughput == pytest.approx((48 + 88) / result.duration)
    body = stub.bodies[0]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["max_tokens"] == 6 and body["min_tokens"] == 6 and body["ignore_eos"] is True
    assert body["model"] == "stub-model" and len(body["prompt"].split()) == 12
    assert stub.headers[0]["authorization"] == "Bearer k3y"
    assert stub.headers[0]["x-bench"] == "yes"
    assert stub.max_in_flight == 4  # --max-concurrency held


def test_serve_counts_failed_requests(start_stub):
    url, _ = start_stub(fail_every=3, first_delay=0.01, gap=0.01)
    result = run_serve_benchmark(ServeBenchConfig(base_url=url, num_prompts=9, output_len=6))
    assert (result.num_completed, result.num_failed) == (6, 3)
    assert result.num_output_tokens == 36  # failed requests count no tokens
    assert any("HTTP 500" in error for error in result.errors)
    assert sum(not r.is_success for r in result.requests) == 3


def test_serve_chat_without_usage_counts_chunks(start_stub):
    url, stub = start_stub(usage=False, num_chunks=4, first_delay=0.01, gap=0.01)
    config = ServeBenchConfig(
        base_url=url,
        model="named",
        endpoint="chat",
        dataset="shared-prefix",
        num_prompts=3,
        prefix_len=40,
    )
    result = run_serve_benchmark(config)
    assert result.num_completed == 3 and result.num_output_tokens == 12
    assert result.num_prompt_tokens == 0  # no usage chunk: unknown
    contents = [b["messages"][0]["content"] for b in stub.bodies]
    assert all(b["model"] == "named" for b in stub.bodies)
    contexts = {c.split("\n\n")[0] for c in contents}
    assert len(contexts) == 1 and len(next(iter(contexts)).split()) == 40  # one shared context
    assert len(set(contents)) == 3  # distinct questions


def test_request_rate_spaces_arrivals(start_stub):
    url, stub = start_stub(first_delay=0.0, gap=0.0, num_chunks=2)
    config = ServeBenchConfig(base_url=url, num_prompts=6, request_rate=20.0, seed=3)
    result = run_serve_benchmark(config)
    rng = random.Random(3)
    expected = sum(rng.expovariate(20.0) for _ in range(5))  # gaps before requests 2..6
    arrivals = sorted(stub.arrivals)
    assert result.num_completed == 6
    # Sleeps never end early; a busy machine may stretch them a little.
    assert expected - 0.02 <= arrivals[-1] - arrivals[0] <= expected + 0.5


def test_serve_command_writes_json_and_needs_matplotlib_to_plot(
    start_stub, tmp_path, capsys, monkeypatch
):
    url, stub = start_stub(first_delay=0.01, gap=0.01)
    path = tmp_path / "serve.json"
    argv = ["bench", "serve", "--base-url", url, "--num-prompts", "3", "--output-len", "6"]
    assert main([*argv, "--header", "X-A=b=c", "--output-json", str(path)]) == 0
    data = json.loads(path.read_text())
    assert data["completed"] == 3 and data["failed"] == 0 and data["total_output_tokens"] == 18
    assert data["median_ttft_ms"] > 0 and data["config"]["request_rate"] == "inf"
    assert "headers" not in data["config"] and "api_key" not in data["config"]
    assert stub.headers[0]["x-a"] == "b=c"
    out = capsys.readouterr().out
    assert "TTFT" in out and "TPOT" in out and "completed: 3" in out

    real_find_spec = importlib.util.find_spec

    def no_matplotlib(name: str, *args: Any) -> Any:
        return None if name == "matplotlib" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", no_matplotlib)
    assert main([*argv, "--plot", str(tmp_path / "p.png")]) == 2
    assert "pip install matplotlib" in capsys.readouterr().err
    assert len(stub.bodies) == 3  # refused before sending anything


def test_serve_command_reports_an_unreachable_server(capsys):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    assert main(["bench", "serve", "--base-url", url, "--num-prompts", "1"]) == 2
    err = capsys.readouterr().err
    assert "/v1/models failed" in err and "is the server up?" in err


# ---------------------------------------------------------------- real server


@pytest.fixture(scope="module")
def kvforge_server(tmp_path_factory) -> Iterator[str]:
    handle = start_server(
        tmp_path_factory.mktemp("bench"), "--max-model-len", "512", "--max-num-seqs", "4"
    )
    yield handle.url
    stop_server(handle)


def test_serve_against_kvforge(kvforge_server):
    base = ServeBenchConfig(
        base_url=kvforge_server, num_prompts=4, input_len=16, output_len=8, max_concurrency=2
    )
    result = run_serve_benchmark(base)
    assert (result.num_completed, result.num_failed) == (4, 0), result.errors
    assert result.model == "SmolLM2-135M-Instruct"
    assert result.num_output_tokens == 32  # ignore_eos: every request ran to max_tokens
    assert result.num_prompt_tokens >= 4 * 16
    assert all(r.ttft is not None and r.tpot is not None for r in result.requests)
    assert 0 < result.ttft.median < result.e2e.median and result.tpot.median > 0
    chat = run_serve_benchmark(
        ServeBenchConfig(
            base_url=kvforge_server, endpoint="chat", num_prompts=2, input_len=8, output_len=4
        )
    )
    assert (chat.num_completed, chat.num_output_tokens) == (2, 8)


# ---------------------------------------------------------------- vs_llamacpp pieces


@pytest.fixture(scope="module")
def vs() -> Iterator[Any]:
    spec = importlib.util.spec_from_file_location("vs_llamacpp", ROOT / "benchmarks/vs_llamacpp.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through it
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_comparison_table_from_fake_results(vs):
    rows = vs.empty_rows()
    server = {"throughput": 300.0, "shared_rps": 2.0, "shared_ttft": 50.0, "tpot": 20.0}
    vs.fill(rows, "kvforge", {"pp": 500.0, "tg": 40.0}, {**server, "rss": 400.0})
    vs.fill(rows, "llama_cpp", {"pp": 1000.0, "tg": 80.0}, {**server, "rss": 200.0})
    table = vs.format_rows(rows)
    lines = table.splitlines()
    assert "llama.cpp" in lines[0] and "kvforge/llama.cpp" in lines[0]
    assert len(lines) == 2 + len(rows)
    pp = next(line for line in lines if line.startswith("| pp512"))
    assert "500.00" in pp and "1000.00" in pp and "0.50x" in pp
    memory = next(line for line in lines if "memory" in line)
    assert "2.00x" in memory and "lower" in memory
    only = vs.format_rows(rows, kvforge_only=True)
    assert "llama.cpp" not in only and "500.00" in only


def test_llama_bench_json_and_missing_binaries(vs, tmp_path):
    entries = [
        {"n_prompt": 512, "n_gen": 0, "samples_ts": [10.0, 30.0, 20.0], "avg_ts": 20.0},
        {"n_prompt": 0, "n_gen": 128, "avg_ts": 7.0},
    ]
    assert vs.median_rates(entries) == {"pp": 20.0, "tg": 7.0}
    assert vs.Row("x", "u", True, 1.0, None).ratio is None
    args = argparse.Namespace(llama_cpp_dir=str(tmp_path), llama_bench=None, llama_server=None)
    with pytest.raises(SystemExit) as exit_info:
        vs.llama_binaries(args)
    assert "llama-bench not found" in str(exit_info.value)
    assert "--kvforge-only" in str(exit_info.value)


def test_statistics_helpers():
    from kvforge.entrypoints.bench.report import LatencyStats, markdown_table, percentile

    stats = LatencyStats.of([0.001 * v for v in range(1, 101)])
    assert stats.median == pytest.approx(50.5) and stats.mean == pytest.approx(50.5)
    assert stats.p90 == pytest.approx(90.1) and stats.p99 == pytest.approx(99.01)
    assert percentile([1.0], 99) == 1.0 and LatencyStats.of([]) == LatencyStats(0, 0, 0, 0)
    table = markdown_table(["a", "b"], [["x", "1"], ["yy", "22"]])
    assert table.splitlines()[1] == "| -- | -: |"

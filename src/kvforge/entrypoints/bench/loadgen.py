"""``kvforge bench serve``: a streaming load generator for any OpenAI-compatible server
(kvforge, vLLM, llama.cpp's llama-server). Measures per request TTFT, the gaps between
content chunks (ITL), TPOT and end-to-end latency; summarizes them in a ``ServeResult``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from kvforge.entrypoints.bench.datasets import make_prompts
from kvforge.entrypoints.bench.report import LatencyStats
from kvforge.errors import KVForgeError


@dataclass(frozen=True)
class ServeBenchConfig:
    """One load run: the server, the workload and how requests arrive."""

    base_url: str
    model: str | None = None  # None: the first model of GET /v1/models
    endpoint: str = "completions"  # or "chat"
    dataset: str = "random"  # or "shared-prefix"
    num_prompts: int = 64
    input_len: int = 64  # words per prompt (random dataset)
    output_len: int = 128
    prefix_len: int = 600  # words of shared context (shared-prefix dataset)
    max_concurrency: int | None = None  # None: no limit
    request_rate: float = math.inf  # Poisson arrivals per second; inf: all at once
    seed: int = 0
    ignore_eos: bool = True  # also send ignore_eos and min_tokens = output_len
    headers: tuple[tuple[str, str], ...] = ()
    api_key: str | None = None
    timeout: float = 600.0  # seconds per request


@dataclass(slots=True)
class RequestResult:
    """What one streamed request took. Times are seconds from sending the request."""

    is_success: bool = False
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    ttft: float | None = None  # first content chunk
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)  # gaps between content chunks
    error: str | None = None

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first: (e2e - ttft) / (output tokens - 1)."""
        if self.ttft is None or self.num_output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.num_output_tokens - 1)


@dataclass
class ServeResult:
    """Summary of one load run; ``requests`` keeps every request's own numbers."""

    model: str
    num_completed: int
    num_failed: int
    duration: float
    num_prompt_tokens: int
    num_output_tokens: int
    ttft: LatencyStats
    tpot: LatencyStats
    itl: LatencyStats
    e2e: LatencyStats
    errors: list[str]
    requests: list[RequestResult] = field(repr=False)

    @property
    def request_throughput(self) -> float:
        """Completed requests per second."""
        return self.num_completed / self.duration if self.duration > 0 else 0.0

    @property
    def output_throughput(self) -> float:
        """Output tokens of completed requests per second."""
        return self.num_output_tokens / self.duration if self.duration > 0 else 0.0

    @property
    def total_throughput(self) -> float:
        """Prompt (as the server's usage reports them) plus output tokens per second."""
        total = self.num_prompt_tokens + self.num_output_tokens
        return total / self.duration if self.duration > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        """Flat JSON-ready summary (latencies in milliseconds, vLLM's key names)."""
        data: dict[str, Any] = {
            "model": self.model,
            "completed": self.num_completed,
            "failed": self.num_failed,
            "duration_s": self.duration,
            "total_input_tokens": self.num_prompt_tokens,
            "total_output_tokens": self.num_output_tokens,
            "request_throughput": self.request_throughput,
            "output_throughput": self.output_throughput,
            "total_token_throughput": self.total_throughput,
        }
        for name in ("ttft", "tpot", "itl", "e2e"):
            for stat, value in getattr(self, name)._asdict().items():
                data[f"{stat}_{name}_ms"] = value
        data["errors"] = self.errors
        return data


def summarize(model: str, requests: list[RequestResult], duration: float) -> ServeResult:
    """Aggregate per-request results; latencies count successful requests only."""
    done = [r for r in requests if r.is_success]
    return ServeResult(
        model=model,
        num_completed=len(done),
        num_failed=len(requests) - len(done),
        duration=duration,
        num_prompt_tokens=sum(r.num_prompt_tokens for r in done),
        num_output_tokens=sum(r.num_output_tokens for r in done),
        ttft=LatencyStats.of([r.ttft for r in done if r.ttft is not None]),
        tpot=LatencyStats.of([t for r in done if (t := r.tpot) is not None]),
        itl=LatencyStats.of([gap for r in done for gap in r.itl]),
        e2e=LatencyStats.of([r.e2e for r in done]),
        errors=sorted({r.error for r in requests if r.error})[:10],
        requests=requests,
    )


def run_serve_benchmark(config: ServeBenchConfig) -> ServeResult:
    """Run the load described by ``config`` and summarize it."""
    return asyncio.run(_run(config))


def api_root(base_url: str) -> str:
    """``http://host:port`` from a base URL with or without a trailing ``/v1``."""
    root = base_url.rstrip("/")
    return root.removesuffix("/v1")


async def _run(config: ServeBenchConfig) -> ServeResult:
    headers = dict(config.headers)
    if config.api_key:
        headers["Authorization"] = f"Bearer {config.api_key}"
    limit = config.max_concurrency or config.num_prompts
    async with httpx.AsyncClient(
        base_url=api_root(config.base_url),
        headers=headers,
        timeout=httpx.Timeout(config.timeout, connect=30.0),
        limits=httpx.Limits(max_connections=limit, max_keepalive_connections=limit),
    ) as client:
        model = config.model or await first_model(client)
        prompts = make_prompts(
            config.dataset, config.num_prompts, config.input_len, config.prefix_len, config.seed
        )
        gate = asyncio.Semaphore(config.max_concurrency) if config.max_concurrency else None
        arrivals = random.Random(config.seed)
        start = time.perf_counter()
        tasks = []
        for i, prompt in enumerate(prompts):
            if i and math.isfinite(config.request_rate):
                await asyncio.sleep(arrivals.expovariate(config.request_rate))
            body = request_body(config, model, prompt)
            tasks.append(asyncio.create_task(_gated(gate, client, config.endpoint, body)))
        results = list(await asyncio.gather(*tasks))
        duration = time.perf_counter() - start
    return summarize(model, results, duration)


async def first_model(client: httpx.AsyncClient) -> str:
    """The first model id the server lists under GET /v1/models."""
    url = f"{client.base_url}/v1/models"
    try:
        response = await client.get("/v1/models")
        response.raise_for_status()
        return str(response.json()["data"][0]["id"])
    except httpx.HTTPError as exc:
        raise KVForgeError(
            f"GET {url} failed ({exc}); is the server up? (or pass --model)"
        ) from exc
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise KVForgeError(f"GET {url} listed no model; pass --model NAME") from exc


def request_body(config: ServeBenchConfig, model: str, prompt: str) -> dict[str, Any]:
    """A streamed, greedy request with usage in the last chunk."""
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": config.output_len,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if config.ignore_eos:  # servers that do not know these fields ignore them
        body |= {"ignore_eos": True, "min_tokens": config.output_len}
    if config.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return body


async def _gated(
    gate: asyncio.Semaphore | None, client: httpx.AsyncClient, endpoint: str, body: dict[str, Any]
) -> RequestResult:
    async with gate or contextlib.nullcontext():
        return await send_request(client, endpoint, body)


async def send_request(
    client: httpx.AsyncClient, endpoint: str, body: dict[str, Any]
) -> RequestResult:
    """Send one streaming request and time its content chunks."""
    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    result = RequestResult()
    num_chunks = 0
    usage: dict[str, Any] | None = None
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {text[:200]}"
                return result
            async for line in response.aiter_lines():
                data = line.removeprefix("data:").strip()
                if not line.startswith("data:") or not data:
                    continue
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = f"stream error: {json.dumps(chunk['error'])[:200]}"
                    return result
                usage = chunk.get("usage") or usage
                if _content(chunk, endpoint):
                    now = time.perf_counter()
                    if result.ttft is None:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
                    num_chunks += 1
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    result.e2e = time.perf_counter() - start
    result.num_output_tokens = int(usage["completion_tokens"]) if usage else num_chunks
    result.num_prompt_tokens = int(usage.get("prompt_tokens", 0)) if usage else 0
    result.is_success = True
    return result


def _content(chunk: dict[str, Any], endpoint: str) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    if endpoint == "chat":
        delta = choices[0].get("delta") or {}
        return str(delta.get("content") or delta.get("reasoning_content") or "")
    return str(choices[0].get("text") or "")

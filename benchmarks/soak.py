"""Soak test: many mixed requests against a real server; memory and KV must come back.

Starts ``kvforge serve`` (or uses ``--url``), warms it up, then sends ``--num-requests``
requests at ``--concurrency``: plain and streamed completions and chats, /generate, n > 1,
clients that abort mid-stream or give up on a non-streamed reply, and a few hostile bodies.
Reports the server's RSS before and after (after warm-up), the KV blocks and running requests
once idle, and the status codes seen. Pass criteria: zero 5xx, RSS within 10%, KV back to 0.

python benchmarks/soak.py --num-requests 10000 --concurrency 16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx

# Prompt vocabulary (random sentences of these words).
WORDS = (
    "cache block token model engine paged radix prefix batch stream queue sample logit "
    "river mountain castle dragon lighthouse keeper story garden winter summer"
)
HOSTILE = [
    ("/v1/completions", '{"prompt": "hi", "temperature": NaN}'),
    ("/v1/completions", '{"prompt": "hi", "logprobs": 1000000}'),
    ("/v1/completions", '{"prompt": "hi", "seed": 18446744073709551616}'),
    ("/v1/completions", '{"prompt": "a\\ud800b"}'),
    ("/v1/completions", '{"prompt": "hi", "max_tokens": "3"}'),
    ("/generate", '{"text": "hi", "sampling_params": {"n": 1000000}}'),
    (
        "/v1/chat/completions",
        '{"messages": [{"role": "user", "content": "x"}], "chat_template": "{{ \'x\' * 50000000 }}"}',
    ),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "x"}], "top_logprobs": 5}'),
    ("/v1/completions", "{not json"),
]


def cpu_model() -> str:
    """The CPU's model name (benchmarks compare ratios within one run, never across machines)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        match = re.search(r"model name\s*:\s*(.*)", text)
        if match:
            return match.group(1).strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def rss_mib(pid: int) -> float:
    """Resident memory of a process in MiB."""
    match = re.search(r"VmRSS:\s*(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    return int(match.group(1)) / 1024 if match else float("nan")


def metric(text: str, name: str) -> float:
    """One Prometheus sample value from /metrics text."""
    match = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.eE+-]+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else float("nan")


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [
        sys.executable,
        "-m",
        "kvforge.entrypoints.cli",
        "serve",
        "--port",
        str(port),
        "--kv-cache-memory",
        args.kv_cache_memory,
        "--max-model-len",
        str(args.max_model_len),
    ]
    log = open(args.server_log, "w")  # noqa: SIM115 - lives as long as the server
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited; see {args.server_log}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.kill()
    raise SystemExit("server did not start")


def make_request(rng: random.Random) -> tuple[str, str, dict | str, str]:
    """(kind, path, body, client behaviour) of one random request."""
    prompt = " ".join(rng.choice(WORDS.split()) for _ in range(rng.randint(1, 40)))
    max_tokens = rng.randint(1, 8)
    roll = rng.random()
    if roll < 0.03:
        path, raw = rng.choice(HOSTILE)
        return "hostile", path, raw, "wait"
    if roll < 0.35:
        body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": rng.random()}
        return "completion", "/v1/completions", body, "wait"
    if roll < 0.55:
        body = {
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "stream": True,
        }
        return "chat_stream", "/v1/chat/completions", body, rng.choice(["wait", "abort"])
    if roll < 0.70:
        body = {"prompt": prompt, "max_tokens": max_tokens, "n": rng.randint(2, 4), "seed": 1}
        return "n_samples", "/v1/completions", body, "wait"
    if roll < 0.85:
        body = {"text": prompt, "sampling_params": {"max_new_tokens": max_tokens}}
        return "generate", "/generate", body, "wait"
    body = {"prompt": prompt, "max_tokens": 48, "ignore_eos": True}
    return "give_up", "/v1/completions", body, "give_up"


async def one(
    client: httpx.AsyncClient, url: str, rng: random.Random, statuses: Counter[str]
) -> None:
    kind, path, body, behaviour = make_request(rng)
    content = body if isinstance(body, str) else json.dumps(body)
    headers = {"content-type": "application/json"}
    try:
        if behaviour == "give_up":  # a client that stops waiting for a non-streamed reply
            await client.post(url + path, content=content, headers=headers, timeout=0.2)
        elif isinstance(body, dict) and body.get("stream"):
            async with client.stream(
                "POST", url + path, content=content, headers=headers, timeout=120
            ) as response:
                statuses[f"{kind} {response.status_code}"] += 1
                async for i, _ in _enumerate(response.aiter_lines()):
                    if behaviour == "abort" and i >= 2:
                        break  # leave mid-stream
            return
        else:
            response = await client.post(url + path, content=content, headers=headers, timeout=120)
            statuses[f"{kind} {response.status_code}"] += 1
            return
    except httpx.TimeoutException:
        statuses[f"{kind} client-timeout"] += 1
        return
    statuses[f"{kind} done"] += 1


async def _enumerate(lines):  # type: ignore[no-untyped-def]
    i = 0
    async for line in lines:
        yield i, line
        i += 1


async def run_load(url: str, num_requests: int, concurrency: int, seed: int) -> Counter[str]:
    statuses: Counter[str] = Counter()
    rng = random.Random(seed)
    remaining = iter(range(num_requests))
    done = 0
    start = time.monotonic()
    limits = httpx.Limits(max_connections=concurrency * 2)

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal done
        for _ in remaining:
            await one(client, url, random.Random(rng.random()), statuses)
            done += 1
            if done % 500 == 0:
                rate = done / (time.monotonic() - start)
                print(f"  {done}/{num_requests} requests ({rate:.1f} req/s)", flush=True)

    async with httpx.AsyncClient(limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return statuses


def wait_idle(url: str, timeout: float = 60.0) -> tuple[float, float]:
    """(running requests, KV blocks used) once the server is idle or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    running = blocks = float("nan")
    while time.monotonic() < deadline:
        text = httpx.get(f"{url}/metrics", timeout=10).text
        running = metric(text, "kvforge:num_requests_running")
        blocks = metric(text, "kvforge:kv_cache_blocks_used")
        if running == 0 and blocks == 0:
            break
        time.sleep(0.5)
    return running, blocks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default=None, help="use a running server (RSS is then not read)")
    parser.add_argument("--num-requests", type=int, default=10_000)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--kv-cache-memory", default="128MiB")
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--server-log", default="soak-server.log")
    args = parser.parse_args()
    print(f"CPU: {cpu_model()} ({os.cpu_count()} cores)")
    process, url = (None, args.url) if args.url else start_server(args)
    try:
        print(f"warm-up: {args.warmup} requests")
        asyncio.run(run_load(url, args.warmup, args.concurrency, args.seed + 1))
        wait_idle(url)
        rss_before = rss_mib(process.pid) if process else float("nan")
        print(f"soak: {args.num_requests} requests at concurrency {args.concurrency}")
        start = time.monotonic()
        statuses = asyncio.run(run_load(url, args.num_requests, args.concurrency, args.seed))
        elapsed = time.monotonic() - start
        running, blocks = wait_idle(url)
        rss_after = rss_mib(process.pid) if process else float("nan")
        healthy = httpx.get(f"{url}/health", timeout=10).status_code == 200
    finally:
        if process is not None:
            process.send_signal(signal.SIGINT)
            process.wait(timeout=60)
    num_5xx = sum(n for key, n in statuses.items() if key.split()[-1].startswith("5"))
    print(f"\n{args.num_requests} requests in {elapsed:.0f}s ({args.num_requests / elapsed:.1f}/s)")
    for key in sorted(statuses):
        print(f"  {key:<28} {statuses[key]}")
    change = (rss_after - rss_before) / rss_before * 100
    print(
        f"server RSS: {rss_before:.0f} MiB after warm-up, {rss_after:.0f} MiB after ({change:+.1f}%)"
    )
    print(f"once idle: {running:.0f} running requests, {blocks:.0f} KV blocks in use")
    print(f"5xx responses: {num_5xx}; healthy after: {healthy}")
    ok = num_5xx == 0 and healthy and running == 0 and blocks == 0 and abs(change) <= 10
    print("PASS" if ok or (process is None and num_5xx == 0) else "FAIL")


if __name__ == "__main__":
    main()

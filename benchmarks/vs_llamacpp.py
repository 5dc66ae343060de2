"""kvforge next to llama.cpp on the same GGUF file and thread count, in one run.

python benchmarks/vs_llamacpp.py --llama-cpp-dir path/to/llama.cpp --threads 2
python benchmarks/vs_llamacpp.py --llama-bench BIN --llama-server BIN --output-json vs.json
python benchmarks/vs_llamacpp.py --kvforge-only

Rows: pp512 and tg128 (``llama-bench`` against ``kvforge bench latency``); then each server in
turn (``llama-server -np 16`` and ``kvforge serve --max-num-seqs 16``, same KV size) under the
``kvforge bench serve`` load generator: 64 requests of 64-word prompts and 128 output tokens at
concurrency 16, 64 requests sharing a 600-word context with distinct questions at concurrency
16, 16 requests one at a time (TPOT), and the server's resident memory after the load. Every
measure runs ``--repeats`` times; the table shows medians and kvforge / llama.cpp.

A script, not a test: it takes many minutes of CPU time and needs llama.cpp built.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import IO, Any

import httpx

from kvforge.config import default_model_path
from kvforge.entrypoints.bench.loadgen import ServeBenchConfig, ServeResult, run_serve_benchmark
from kvforge.entrypoints.bench.report import cpu_model, markdown_table, write_json

N_PROMPT = 512  # llama-bench's pp test
N_GEN = 128  # and tg test
NUM_SLOTS = 16
SLOT_CONTEXT = 1024  # tokens per sequence: a 600-word context + question + answer fits
KVFORGE = [sys.executable, "-m", "kvforge.entrypoints.cli"]


@dataclass
class Row:
    """One measure on both sides."""

    name: str
    unit: str
    is_higher_better: bool
    kvforge: float | None = None
    llama_cpp: float | None = None

    @property
    def ratio(self) -> float | None:
        """kvforge's value over llama.cpp's, whichever way is better."""
        if self.kvforge is None or not self.llama_cpp:
            return None
        return self.kvforge / self.llama_cpp


def format_rows(rows: list[Row], kvforge_only: bool = False) -> str:
    """The comparison as a markdown table (kvforge's column only with ``kvforge_only``)."""

    def value(number: float | None) -> str:
        return "-" if number is None else f"{number:.2f}"

    headers = ["measure", "unit", "better", "kvforge"]
    if not kvforge_only:
        headers += ["llama.cpp", "kvforge/llama.cpp"]
    table = []
    for row in rows:
        cells = [row.name, row.unit, "higher" if row.is_higher_better else "lower"]
        cells.append(value(row.kvforge))
        if not kvforge_only:
            ratio = row.ratio
            cells += [value(row.llama_cpp), "-" if ratio is None else f"{ratio:.2f}x"]
        table.append(cells)
    return markdown_table(headers, table, right=len(headers) - 3)


def empty_rows() -> list[Row]:
    """The rows of the comparison, in order, before anything is measured."""
    return [
        Row(f"pp{N_PROMPT}", "tok/s", True),
        Row(f"tg{N_GEN}", "tok/s", True),
        Row("server 64 req @16, 64 words -> 128 tok", "out tok/s", True),
        Row("server shared 600-word context @16", "req/s", True),
        Row("server shared 600-word context @16 TTFT", "ms (median)", False),
        Row("server one stream at a time TPOT", "ms (median)", False),
        Row("server resident memory after load", "MiB", False),
    ]


def llama_binaries(args: argparse.Namespace) -> tuple[str, str]:
    """Paths of llama-bench and llama-server, or exit with what to pass."""
    found = []
    for name, given in (("llama-bench", args.llama_bench), ("llama-server", args.llama_server)):
        path = given or (
            str(Path(args.llama_cpp_dir) / "build" / "bin" / name)
            if args.llama_cpp_dir
            else shutil.which(name)
        )
        if not path or not os.access(path, os.X_OK):
            sys.exit(
                f"{name} not found{f' at {path}' if path else ''}: pass --llama-cpp-dir DIR "
                "(with build/bin/llama-bench and build/bin/llama-server), or --llama-bench and "
                "--llama-server, or run with --kvforge-only"
            )
        found.append(path)
    return found[0], found[1]


def median_rates(entries: list[dict[str, Any]]) -> dict[str, float]:
    """``{"pp": t/s, "tg": t/s}``: medians of llama-bench's or kvforge's JSON tests."""
    rates = {}
    for entry in entries:
        kind = "tg" if entry.get("n_gen") else "pp"
        rates[kind] = statistics.median(entry.get("samples_ts") or [entry["avg_ts"]])
    return rates


def run_quietly(command: list[str], what: str) -> str:
    """stdout of ``command``; on failure exit with the tail of its stderr."""
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{what} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return done.stdout


def run_llama_bench(binary: str, gguf: str, threads: int, repeats: int) -> dict[str, float]:
    """pp and tg from ``llama-bench -o json``."""
    command = [binary, "-m", gguf, "-p", str(N_PROMPT), "-n", str(N_GEN), "-t", str(threads)]
    out = run_quietly([*command, "-r", str(repeats), "-o", "json"], "llama-bench")
    return median_rates(json.loads(out))


def run_kvforge_latency(gguf: str, threads: int, repeats: int) -> dict[str, float]:
    """pp and tg from ``kvforge bench latency`` in its own process."""
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "latency.json")
        command = ["bench", "latency", "-m", gguf, "-p", str(N_PROMPT), "-n", str(N_GEN)]
        extra = ["-t", str(threads), "-r", str(repeats), "--kv-cache-memory", "512MiB"]
        run_quietly([*KVFORGE, *command, *extra, "--output-json", path], "kvforge bench latency")
        return median_rates(json.loads(Path(path).read_text())["tests"])


def kv_cache_bytes(gguf: str) -> int:
    """llama-server's f16 KV size for NUM_SLOTS x SLOT_CONTEXT tokens, for kvforge to match."""
    from gguf import GGUFReader

    meta = {key: field.contents() for key, field in GGUFReader(gguf).fields.items()}
    arch = meta["general.architecture"]
    num_heads = meta[f"{arch}.attention.head_count"]
    num_kv_heads = meta.get(f"{arch}.attention.head_count_kv", num_heads)
    head_dim = meta.get(
        f"{arch}.attention.key_length", meta[f"{arch}.embedding_length"] // num_heads
    )
    per_token = 2 * meta[f"{arch}.block_count"] * num_kv_heads * head_dim * 2  # K and V, f16
    return int(NUM_SLOTS * SLOT_CONTEXT * per_token)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def running_server(
    name: str, command: list[str], port: int, threads: int
) -> Iterator[subprocess.Popen[bytes]]:
    """Start a server, wait for /health, stop it (SIGINT, then kill) on the way out."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}  # torch's intra-op threads
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            wait_healthy(name, process, port, log)
            yield process
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


def wait_healthy(name: str, process: subprocess.Popen[bytes], port: int, log: IO[bytes]) -> None:
    """Return once GET /health answers 200; exit with the server's log if it dies first."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log.seek(0)
            sys.exit(f"{name} server exited early:\n{log.read().decode()[-4000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    sys.exit(f"{name} server did not become healthy in 600 s")


def rss_mib(pid: int) -> float:
    """Resident memory of a process and all its descendants, in MiB."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    total_kib, todo = 0, [pid]
    while todo:
        current = todo.pop()
        todo.extend(children.get(current, []))
        try:
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kib += int(line.split()[1])
        except OSError:
            continue
    return total_kib / 1024


def server_loads(base_url: str) -> dict[str, ServeBenchConfig]:
    """The three workloads, by name."""
    base = ServeBenchConfig(base_url=base_url, input_len=64, output_len=128)
    return {
        "throughput": replace(base, num_prompts=64, max_concurrency=NUM_SLOTS),
        "shared": replace(
            base, dataset="shared-prefix", num_prompts=64, output_len=32, max_concurrency=NUM_SLOTS
        ),
        "single": replace(base, num_prompts=16, max_concurrency=1),
    }


def measures_of(load: str, result: ServeResult) -> dict[str, float]:
    """The numbers the table takes from one run of ``load``."""
    if load == "throughput":
        return {"throughput": result.output_throughput}
    if load == "shared":
        return {"shared_rps": result.request_throughput, "shared_ttft": result.ttft.median}
    return {"tpot": result.tpot.median}


def measure_server(name: str, port: int, pid: int, repeats: int) -> dict[str, float]:
    """The server measures (medians over ``repeats``) and the RSS after the load."""
    loads = server_loads(f"http://127.0.0.1:{port}")
    warm_up = replace(loads["single"], num_prompts=4, output_len=8, seed=-1)
    run_serve_benchmark(warm_up)
    samples: dict[str, list[float]] = {}
    for load, config in loads.items():
        for seed in range(repeats):  # a new seed per repeat: no prompt is seen twice
            result = run_serve_benchmark(replace(config, seed=seed))
            if result.num_failed:
                sys.exit(f"{name} {load}: {result.num_failed} requests failed: {result.errors}")
            if result.num_output_tokens != result.num_completed * config.output_len:
                print(f"warning: {name} {load}: requests stopped before max_tokens", flush=True)
            for key, number in measures_of(load, result).items():
                samples.setdefault(key, []).append(number)
    medians = {key: statistics.median(values) for key, values in samples.items()}
    return {**medians, "rss": rss_mib(pid)}


def server_commands(
    gguf: str, threads: int, port: int, llama_server: str | None
) -> dict[str, list[str]]:
    """The command line of each side's server on ``port``."""
    commands = {
        "kvforge": [
            *KVFORGE,
            *("serve", "-m", gguf, "--port", str(port), "--max-num-seqs", str(NUM_SLOTS)),
            *("--max-model-len", str(SLOT_CONTEXT), "--kv-cache-memory", str(kv_cache_bytes(gguf))),
        ]
    }
    if llama_server:
        commands["llama_cpp"] = [
            *(llama_server, "-m", gguf, "-t", str(threads), "-np", str(NUM_SLOTS)),
            *("-c", str(NUM_SLOTS * SLOT_CONTEXT), "--host", "127.0.0.1", "--port", str(port)),
        ]
    return commands


def fill(rows: list[Row], side: str, latency: dict[str, float], server: dict[str, float]) -> None:
    """Put one side's numbers into the rows, in ``empty_rows`` order."""
    values = [latency.get("pp"), latency.get("tg")]
    values += [server.get(k) for k in ("throughput", "shared_rps", "shared_ttft", "tpot", "rss")]
    for row, number in zip(rows, values):
        setattr(row, side, number)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--llama-cpp-dir", default=None, help="llama.cpp checkout with build/bin")
    parser.add_argument("--llama-bench", default=None, help="llama-bench binary")
    parser.add_argument("--llama-server", default=None, help="llama-server binary")
    parser.add_argument("--gguf", default=None, help="GGUF file (default: the embedded model)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kvforge-only", action="store_true", help="skip llama.cpp")
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()
    llama_bench, llama_server = (None, None) if args.kvforge_only else llama_binaries(args)
    gguf = args.gguf or default_model_path()
    print(f"CPU: {cpu_model()}, threads: {args.threads}, model: {Path(gguf).name}", flush=True)
    rows = empty_rows()
    raw: dict[str, dict[str, float]] = {}
    latency = {"kvforge": run_kvforge_latency(gguf, args.threads, args.repeats)}
    if llama_bench:
        latency["llama_cpp"] = run_llama_bench(llama_bench, gguf, args.threads, args.repeats)
    port = free_port()
    for side, command in server_commands(gguf, args.threads, port, llama_server).items():
        print(f"measuring {side} server ...", flush=True)
        with running_server(side, command, port, args.threads) as process:
            server = measure_server(side, port, process.pid, args.repeats)
        fill(rows, side, latency[side], server)
        raw[side] = {**latency[side], **server}
    print(format_rows(rows, args.kvforge_only))
    if args.output_json:
        write_json(
            args.output_json,
            {
                "cpu": cpu_model(),
                "threads": args.threads,
                "gguf": Path(gguf).name,
                "repeats": args.repeats,
                "rows": [{**asdict(row), "ratio": row.ratio} for row in rows],
                "raw": raw,
            },
        )


if __name__ == "__main__":
    main()

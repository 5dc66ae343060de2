"""``kvforge bench latency | throughput | serve``: arguments, and the tables and JSON printed
from the result dataclasses of ``offline.py`` and ``loadgen.py``."""

from __future__ import annotations

import argparse
import functools
import logging
import math
import os
from collections.abc import Callable
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from kvforge.entrypoints.bench.datasets import DATASETS
from kvforge.entrypoints.bench.report import (
    markdown_table,
    plot_latencies,
    require_matplotlib,
    write_json,
)
from kvforge.errors import KVForgeError
from kvforge.utils import format_size

if TYPE_CHECKING:  # the measuring modules load on use (httpx, the engine)
    from kvforge.entrypoints.bench.loadgen import ServeResult
    from kvforge.entrypoints.bench.offline import LatencyResult, ThroughputResult

AddArgs = Callable[[argparse.ArgumentParser], None]
MakeLLM = Callable[[argparse.Namespace], Any]


def add_bench_parser(sub: Any, add_engine_args: AddArgs, make_llm: MakeLLM) -> None:
    """Register ``bench`` and its three modes; the offline modes take the engine flags."""
    bench = sub.add_parser("bench", help="benchmark the engine or any OpenAI-compatible server")
    modes = bench.add_subparsers(dest="bench_mode", required=True)
    latency = modes.add_parser("latency", help="llama-bench style prompt / generation t/s")
    add_engine_args(latency)
    latency.add_argument("-p", "--n-prompt", type=int, default=512, help="prompt tokens (pp)")
    latency.add_argument("-n", "--n-gen", type=int, default=128, help="generated tokens (tg)")
    latency.add_argument("-r", "--repetitions", type=int, default=3)
    latency.add_argument("--batch-size", type=int, default=1, help="sequences at once")
    latency.add_argument(
        "--prompt-file",
        default=None,
        metavar="PATH.jsonl",
        help='tg on these chat prompts, one test each: {"name": ..., "prompt": ...} per line',
    )
    _add_common(latency)
    latency.set_defaults(func=functools.partial(cmd_latency, make_llm=make_llm))
    throughput = modes.add_parser("throughput", help="offline batch throughput")
    add_engine_args(throughput)
    throughput.add_argument("--num-prompts", type=int, default=64)
    throughput.add_argument("--input-len", type=int, default=128, help="prompt tokens")
    throughput.add_argument("--output-len", type=int, default=128, help="generated tokens")
    _add_common(throughput)
    throughput.set_defaults(func=functools.partial(cmd_throughput, make_llm=make_llm))
    _add_serve_parser(modes)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-t", "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument("--output-json", default=None, metavar="PATH")


def _add_serve_parser(modes: Any) -> None:
    serve = modes.add_parser("serve", help="streaming load against an OpenAI-compatible server")
    serve.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8000")
    serve.add_argument("--model", default=None, help="model name (default: first of /v1/models)")
    serve.add_argument("--endpoint", default="completions", choices=["completions", "chat"])
    serve.add_argument("--dataset", default="random", choices=list(DATASETS))
    serve.add_argument("--num-prompts", type=int, default=64)
    serve.add_argument("--input-len", type=int, default=64, help="words per random prompt")
    serve.add_argument("--output-len", type=int, default=128, help="max_tokens per request")
    serve.add_argument("--prefix-len", type=int, default=600, help="words of shared context")
    serve.add_argument("--max-concurrency", type=int, default=None, help="requests in flight")
    serve.add_argument(
        "--request-rate", type=float, default=math.inf, help="Poisson requests/s (inf: at once)"
    )
    serve.add_argument("--seed", type=int, default=0)
    serve.add_argument(
        "--no-ignore-eos",
        dest="ignore_eos",
        action="store_false",
        help="do not send ignore_eos / min_tokens (for servers that reject them)",
    )
    serve.add_argument("--header", action="append", default=[], metavar="KEY=VALUE")
    serve.add_argument("--api-key", default=None, help="sent as a bearer token")
    serve.add_argument("--request-timeout", type=float, default=600.0, help="seconds")
    serve.add_argument("--output-json", default=None, metavar="PATH")
    serve.add_argument("--plot", default=None, metavar="PATH.png", help="needs matplotlib")
    serve.set_defaults(func=cmd_serve)


def _set_threads(args: argparse.Namespace) -> None:
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)


def cmd_latency(args: argparse.Namespace, make_llm: MakeLLM) -> int:
    """Prompt processing and generation rates of the offline engine."""
    from kvforge.entrypoints.bench.offline import LatencyConfig, load_prompt_file, run_latency

    prompts = load_prompt_file(args.prompt_file) if args.prompt_file else ()
    config = LatencyConfig(
        args.n_prompt, args.n_gen, args.repetitions, args.batch_size, args.seed, prompts
    )
    config.check()  # before loading the model
    _set_threads(args)
    result = run_latency(make_llm(args), config)
    print(format_latency(result))
    if args.output_json:
        write_json(args.output_json, result.to_json())
    return 0


def format_latency(result: LatencyResult) -> str:
    """llama-bench's table: one row per test, the rate as median ± standard deviation."""
    size = format_size(os.path.getsize(result.model)) if os.path.isfile(result.model) else "-"
    rows = [
        [
            os.path.basename(result.model),
            size,
            str(result.num_threads),
            str(result.batch_size),
            test.name,
            f"{test.median_ts:.2f} ± {test.stddev_ts:.2f}",
        ]
        for test in result.tests
    ]
    table = markdown_table(["model", "size", "threads", "seqs", "test", "t/s"], rows, right=4)
    text = f"CPU: {result.cpu}, torch threads: {result.num_threads}\n\n{table}"
    if result.spec_decode is not None:
        text += f"\n\nspeculative decoding: {result.spec_decode.summary()}"
    return text


def cmd_throughput(args: argparse.Namespace, make_llm: MakeLLM) -> int:
    """Offline batch throughput: all prompts submitted at once."""
    from kvforge.entrypoints.bench.offline import run_throughput

    if min(args.num_prompts, args.input_len, args.output_len) < 1:
        raise KVForgeError("--num-prompts, --input-len and --output-len must be >= 1")
    _set_threads(args)
    llm = make_llm(args)
    result = run_throughput(llm, args.num_prompts, args.input_len, args.output_len, args.seed)
    print(format_throughput(result))
    if args.output_json:
        write_json(args.output_json, result.to_json())
    return 0


def format_throughput(result: ThroughputResult) -> str:
    """The offline batch result in three lines."""
    return (
        f"CPU: {result.cpu}, torch threads: {result.num_threads}\n"
        f"requests: {result.num_requests}  elapsed: {result.elapsed:.2f} s  prompt tokens: "
        f"{result.num_prompt_tokens}  output tokens: {result.num_output_tokens}\n"
        f"requests/s: {result.requests_per_s:.2f}  output tok/s: "
        f"{result.output_tokens_per_s:.1f}  total tok/s: {result.total_tokens_per_s:.1f}"
    )


def cmd_serve(args: argparse.Namespace) -> int:
    """Streaming load against a running OpenAI-compatible server."""
    from kvforge.entrypoints.bench.loadgen import ServeBenchConfig, run_serve_benchmark

    if args.plot:
        require_matplotlib()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # no log line per request
    if args.num_prompts < 1 or (args.max_concurrency is not None and args.max_concurrency < 1):
        raise KVForgeError("--num-prompts and --max-concurrency must be >= 1")
    if not args.request_rate > 0:
        raise KVForgeError("--request-rate must be > 0 (inf: all at once)")
    config = ServeBenchConfig(
        base_url=args.base_url,
        model=args.model,
        endpoint=args.endpoint,
        dataset=args.dataset,
        num_prompts=args.num_prompts,
        input_len=args.input_len,
        output_len=args.output_len,
        prefix_len=args.prefix_len,
        max_concurrency=args.max_concurrency,
        request_rate=args.request_rate,
        seed=args.seed,
        ignore_eos=args.ignore_eos,
        headers=tuple(parse_header(h) for h in args.header),
        api_key=args.api_key,
        timeout=args.request_timeout,
    )
    result = run_serve_benchmark(config)
    print(format_serve(result))
    if args.output_json:
        settings = {
            key: value
            for key, value in asdict(config).items()
            if key not in ("base_url", "headers", "api_key")  # may carry secrets
        }
        settings["request_rate"] = str(config.request_rate)  # inf is not JSON
        write_json(args.output_json, {**result.to_json(), "config": settings})
    if args.plot:
        done = [r for r in result.requests if r.is_success]
        ms = {
            "TTFT": [1000 * r.ttft for r in done if r.ttft is not None],
            "TPOT": [1000 * t for r in done if (t := r.tpot) is not None],
            "E2E": [1000 * r.e2e for r in done],
        }
        plot_latencies(args.plot, ms)
    return 0 if result.num_completed else 1


def parse_header(text: str) -> tuple[str, str]:
    """``KEY=VALUE`` of ``--header``."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise KVForgeError(f"--header takes KEY=VALUE, not {text!r}")
    return key.strip(), value


def format_serve(result: ServeResult) -> str:
    """Counts and rates, then mean / median / p90 / p99 of each latency in milliseconds."""
    lines = [
        f"model: {result.model}",
        f"completed: {result.num_completed}  failed: {result.num_failed}  "
        f"duration: {result.duration:.2f} s",
        f"requests/s: {result.request_throughput:.2f}  output tok/s: "
        f"{result.output_throughput:.1f}  total tok/s: {result.total_throughput:.1f}",
        "",
    ]
    rows = [
        [name, *(f"{value:.1f}" for value in getattr(result, key))]
        for name, key in (("TTFT", "ttft"), ("TPOT", "tpot"), ("ITL", "itl"), ("E2E", "e2e"))
    ]
    lines.append(markdown_table(["ms", "mean", "median", "p90", "p99"], rows, right=4))
    lines.extend(f"error: {error}" for error in result.errors)
    return "\n".join(lines)

"""``kvforge bench latency`` (llama-bench's pp / tg rates) and ``kvforge bench throughput``,
both over the offline ``LLM`` API. Measurement only: printing lives in ``bench/cli.py``."""

from __future__ import annotations

import json
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from kvforge.entrypoints.bench.report import cpu_model, stddev
from kvforge.entrypoints.llm import LLM
from kvforge.errors import KVForgeError
from kvforge.outputs import RequestOutput
from kvforge.sampling_params import SamplingParams
from kvforge.spec_decode.stats import SpecDecodeStats


@dataclass(frozen=True)
class LatencyConfig:
    """What ``kvforge bench latency`` measures (llama-bench's ``-p``, ``-n``, ``-r``)."""

    n_prompt: int = 512
    n_gen: int = 128
    repetitions: int = 3
    batch_size: int = 1
    seed: int = 0
    # Named chat prompts (``load_prompt_file``): a tg test per prompt, greedy replies of up to
    # n_gen tokens that may end early, instead of tokens after a one-token random prompt.
    prompts: tuple[tuple[str, list[dict[str, Any]]], ...] = ()

    def check(self) -> None:
        """Raise ``KVForgeError`` for settings that measure nothing."""
        if min(self.n_prompt, self.n_gen) < 0 or self.repetitions < 1 or self.batch_size < 1:
            raise KVForgeError("-p and -n must be >= 0, -r and --batch-size >= 1")
        if self.n_gen == 1:  # tg times the tokens after the first
            raise KVForgeError("-n/--n-gen must be 0 or at least 2")
        if self.prompts and self.n_gen == 0:
            raise KVForgeError("--prompt-file needs -n/--n-gen >= 2")


def load_prompt_file(path: str) -> tuple[tuple[str, list[dict[str, Any]]], ...]:
    """Chat prompts from a JSON Lines file: each line ``{"name": ..., "prompt": "text"}`` (one
    user message) or ``{"name": ..., "messages": [...]}``."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line for line in f if line.strip()]
    except OSError as exc:
        raise KVForgeError(f"cannot read the prompt file: {exc}") from exc
    prompts = []
    for number, line in enumerate(lines, 1):
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            raise KVForgeError(f"{path} line {number}: not JSON ({exc.msg})") from exc
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise KVForgeError(f"{path} line {number}: expected an object with a string 'name'")
        if isinstance(entry.get("prompt"), str):
            messages = [{"role": "user", "content": entry["prompt"]}]
        elif isinstance(entry.get("messages"), list) and entry["messages"]:
            messages = entry["messages"]
        else:
            raise KVForgeError(f"{path} line {number}: needs a 'prompt' string or 'messages'")
        prompts.append((entry["name"], messages))
    if not prompts:
        raise KVForgeError(f"{path} holds no prompts")
    return tuple(prompts)


@dataclass
class LatencyTest:
    """Rates of one test (``pp512``: prompt tokens/s, ``tg128``: generated tokens/s)."""

    name: str
    n_prompt: int
    n_gen: int
    samples_ts: list[float]

    @property
    def median_ts(self) -> float:
        """Median rate over the repetitions."""
        return statistics.median(self.samples_ts)

    @property
    def stddev_ts(self) -> float:
        """Sample standard deviation of the rate."""
        return stddev(self.samples_ts)

    def to_json(self) -> dict[str, Any]:
        """The llama-bench JSON fields of this test."""
        return {
            "test": self.name,
            "n_prompt": self.n_prompt,
            "n_gen": self.n_gen,
            "samples_ts": self.samples_ts,
            "avg_ts": statistics.fmean(self.samples_ts),
            "median_ts": self.median_ts,
            "stddev_ts": self.stddev_ts,
        }


@dataclass
class LatencyResult:
    """All tests of one ``kvforge bench latency`` run and the host they ran on."""

    model: str
    cpu: str
    num_threads: int
    batch_size: int
    tests: list[LatencyTest]
    # Prompt tokens served from the prefix cache: 0 unless the prompts failed to be fresh.
    num_cached_tokens: int
    # Speculative decoding's counters over the run (None without it).
    spec_decode: SpecDecodeStats | None = None

    def to_json(self) -> dict[str, Any]:
        """The result as JSON-ready data."""
        return {
            "model": self.model,
            "cpu": self.cpu,
            "num_threads": self.num_threads,
            "batch_size": self.batch_size,
            "num_cached_tokens": self.num_cached_tokens,
            "tests": [test.to_json() for test in self.tests],
            "spec_decode": None if self.spec_decode is None else asdict(self.spec_decode),
        }


@dataclass
class ThroughputResult:
    """One offline batch: every prompt submitted at once, timed until the last finishes."""

    model: str
    cpu: str
    num_threads: int
    num_requests: int
    num_prompt_tokens: int
    num_output_tokens: int
    elapsed: float

    @property
    def requests_per_s(self) -> float:
        """Finished requests per second."""
        return self.num_requests / self.elapsed

    @property
    def output_tokens_per_s(self) -> float:
        """Generated tokens per second."""
        return self.num_output_tokens / self.elapsed

    @property
    def total_tokens_per_s(self) -> float:
        """Prompt plus generated tokens per second."""
        return (self.num_prompt_tokens + self.num_output_tokens) / self.elapsed

    def to_json(self) -> dict[str, Any]:
        """The result as JSON-ready data, rates included."""
        return {
            "model": self.model,
            "cpu": self.cpu,
            "num_threads": self.num_threads,
            "num_requests": self.num_requests,
            "num_prompt_tokens": self.num_prompt_tokens,
            "num_output_tokens": self.num_output_tokens,
            "elapsed_s": self.elapsed,
            "requests_per_s": self.requests_per_s,
            "output_tokens_per_s": self.output_tokens_per_s,
            "total_tokens_per_s": self.total_tokens_per_s,
        }


class RandomPrompts:
    """Prompts of random token ids; a fresh draw per call, so the prefix cache never hits."""

    def __init__(self, llm: LLM, seed: int) -> None:
        self.rng = random.Random(seed)
        self.vocab_size = llm.engine.vocab_size
        self.eos_token_id = llm.get_tokenizer().eos_token_id

    def draw(self, num_prompts: int, length: int) -> list[list[int]]:
        """``num_prompts`` prompts of ``length`` token ids, EOS excluded."""
        prompts = []
        for _ in range(num_prompts):
            prompt = [self.rng.randrange(self.vocab_size) for _ in range(length)]
            prompts.append(
                [t if t != self.eos_token_id else (t + 1) % self.vocab_size for t in prompt]
            )
        return prompts


def run_latency(llm: LLM, config: LatencyConfig) -> LatencyResult:
    """pp: ``n_prompt`` fresh prompt tokens per sequence prefilled with ``max_tokens=1``;
    tg: ``n_gen`` greedy tokens after a one-token prompt (or replies to each of
    ``config.prompts``), timed from the first generated token to the last (the engine's
    per-request metrics), so prefill time is left out."""
    config.check()
    prompts = RandomPrompts(llm, config.seed)
    llm.generate(prompts.draw(config.batch_size, 16), _greedy(4), use_tqdm=False)  # warm-up
    spec_before = llm.engine.scheduler.spec_stats.copy()
    tests = []
    num_cached = 0
    if config.n_prompt > 0:
        samples = []
        for _ in range(config.repetitions):
            start = time.perf_counter()
            outputs = llm.generate(
                prompts.draw(config.batch_size, config.n_prompt), _greedy(1), use_tqdm=False
            )
            elapsed = time.perf_counter() - start
            num_cached += sum(o.num_cached_tokens for o in outputs)
            samples.append(config.batch_size * config.n_prompt / elapsed)
        tests.append(LatencyTest(f"pp{config.n_prompt}", config.n_prompt, 0, samples))
    if config.n_gen > 0 and config.prompts:
        for name, messages in config.prompts:
            params = SamplingParams(temperature=0.0, max_tokens=config.n_gen)
            samples = []
            for _ in range(config.repetitions):
                outputs = llm.chat([messages] * config.batch_size, params, use_tqdm=False)
                samples.append(decode_rate(outputs))
            tests.append(LatencyTest(f"tg{config.n_gen} {name}", 0, config.n_gen, samples))
    elif config.n_gen > 0:
        samples = []
        for _ in range(config.repetitions):
            outputs = llm.generate(
                prompts.draw(config.batch_size, 1), _greedy(config.n_gen), use_tqdm=False
            )
            samples.append(decode_rate(outputs))
        tests.append(LatencyTest(f"tg{config.n_gen}", 0, config.n_gen, samples))
    spec = llm.engine.scheduler.spec_stats.since(spec_before)
    return LatencyResult(
        model=llm.engine.config.model_config.model_path,
        cpu=cpu_model(),
        num_threads=torch.get_num_threads(),
        batch_size=config.batch_size,
        tests=tests,
        num_cached_tokens=num_cached,
        spec_decode=spec if spec.num_verifications else None,
    )


def decode_rate(outputs: Sequence[RequestOutput]) -> float:
    """Generated tokens per second after each request's first token: every token but the
    first of each sequence, over the span from the earliest first token to the last finish."""
    first, last = [], []
    for output in outputs:
        metrics = output.metrics
        if metrics is None or metrics.first_token_time is None or metrics.finished_time is None:
            raise KVForgeError("the engine reported no token timings")
        first.append(metrics.first_token_time)
        last.append(metrics.finished_time)
    span = max(last) - min(first)
    num_tokens = sum(len(o.outputs[0].token_ids) - 1 for o in outputs)
    return num_tokens / span


def run_throughput(
    llm: LLM, num_prompts: int, input_len: int, output_len: int, seed: int = 0
) -> ThroughputResult:
    """Submit ``num_prompts`` random prompts at once and time the whole batch."""
    prompts = RandomPrompts(llm, seed).draw(num_prompts, input_len)
    start = time.perf_counter()
    outputs = llm.generate(prompts, _greedy(output_len), use_tqdm=False)
    elapsed = time.perf_counter() - start
    return ThroughputResult(
        model=llm.engine.config.model_config.model_path,
        cpu=cpu_model(),
        num_threads=torch.get_num_threads(),
        num_requests=len(outputs),
        num_prompt_tokens=sum(len(o.prompt_token_ids) for o in outputs),
        num_output_tokens=sum(len(c.token_ids) for o in outputs for c in o.outputs),
        elapsed=elapsed,
    )


def _greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)

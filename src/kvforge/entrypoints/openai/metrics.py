"""Prometheus metrics of one server (own registry: no module-level state)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from kvforge.async_engine import AsyncLLM
from kvforge.outputs import RequestOutput

if TYPE_CHECKING:
    from kvforge.layers.moe import LayerExpertStats

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


def read_engine_stats(engine: Any) -> tuple[int, ...]:
    """Queue sizes, KV usage, prefix-cache and preemption counts (run on the engine thread)."""
    kv = engine.kv_cache_manager
    spec = engine.scheduler.spec_stats
    return (
        len(engine.scheduler.running),
        len(engine.scheduler.waiting),
        kv.pool.num_in_use,
        kv.num_blocks,
        kv.prefix_cache.num_queries,
        kv.prefix_cache.num_hits,
        engine.num_preemptions,
        spec.num_verifications,
        spec.num_draft_tokens,
        spec.num_accepted_tokens,
        *spec.proposed_per_position,
        *spec.accepted_per_position,
    )


def read_expert_stats(engine: Any) -> list[LayerExpertStats]:
    """Routing counters of each mixture-of-experts layer (run on the engine thread; empty for a
    dense model)."""
    return engine.runner.expert_stats()  # type: ignore[no-any-return]


class _EngineCollector(Collector):
    """Exports the engine stats read just before the scrape."""

    def __init__(self) -> None:
        self.stats: tuple[int, ...] = (0, 0, 0, 1, 0, 0, 0, 0, 0, 0)
        self.experts: list[LayerExpertStats] = []

    def collect(self) -> Iterator[Any]:
        running, waiting, used, total, queries, hits, preemptions = self.stats[:7]
        verifications, drafts, accepted = self.stats[7:10]
        positions = self.stats[10:]
        proposed_at, accepted_at = (
            positions[: len(positions) // 2],
            positions[len(positions) // 2 :],
        )
        yield GaugeMetricFamily(
            "kvforge:num_requests_running", "Requests in the running queue", running
        )
        yield GaugeMetricFamily(
            "kvforge:num_requests_waiting", "Requests waiting for admission", waiting
        )
        yield GaugeMetricFamily(
            "kvforge:kv_cache_usage_perc", "Fraction of KV blocks in use", used / total
        )
        yield GaugeMetricFamily("kvforge:kv_cache_blocks_used", "KV blocks in use", used)
        yield CounterMetricFamily(
            "kvforge:prefix_cache_queries", "Prompt tokens looked up in the prefix cache", queries
        )
        yield CounterMetricFamily(
            "kvforge:prefix_cache_hits", "Prompt tokens found in the prefix cache", hits
        )
        yield CounterMetricFamily(
            "kvforge:num_preemptions", "Requests preempted for lack of KV blocks", preemptions
        )
        yield CounterMetricFamily(
            "kvforge:spec_decode_num_verifications",
            "Steps of a request that verified draft tokens",
            verifications,
        )
        yield CounterMetricFamily(
            "kvforge:spec_decode_num_draft_tokens", "Draft tokens proposed", drafts
        )
        yield CounterMetricFamily(
            "kvforge:spec_decode_num_accepted_tokens", "Draft tokens accepted", accepted
        )
        yield GaugeMetricFamily(
            "kvforge:spec_decode_mean_accepted_length",
            "Tokens per verification: accepted drafts plus the target's own token",
            1 + accepted / verifications if verifications else 0.0,
        )
        rate = GaugeMetricFamily(
            "kvforge:spec_decode_acceptance_rate_per_position",
            "Accepted over proposed drafts at each draft position",
            labels=["position"],
        )
        for position, (p, a) in enumerate(zip(proposed_at, accepted_at)):
            rate.add_metric([str(position)], a / p if p else 0.0)
        yield rate
        if self.experts:
            yield from self._expert_metrics()

    def _expert_metrics(self) -> Iterator[Any]:
        tokens = CounterMetricFamily(
            "kvforge:moe_expert_tokens",
            "Tokens routed to each expert of each mixture-of-experts layer",
            labels=["layer", "expert"],
        )
        entropy = GaugeMetricFamily(
            "kvforge:moe_router_entropy",
            "Mean entropy of the router's distribution over experts (nats; log(experts) is "
            "uniform)",
            labels=["layer"],
        )
        dropped = CounterMetricFamily(
            "kvforge:moe_dropped_tokens",
            "(token, expert) pairs dropped over an expert's capacity (expert parallelism with "
            "--moe-capacity-factor)",
            labels=["layer"],
        )
        for stats in self.experts:
            for expert, count in enumerate(stats.tokens):
                tokens.add_metric([str(stats.layer), str(expert)], count)
            entropy.add_metric([str(stats.layer)], stats.mean_entropy)
            dropped.add_metric([str(stats.layer)], stats.dropped)
        yield tokens
        yield entropy
        yield dropped


class ServerMetrics:
    """Request-level counters and latency histograms, plus the engine collector."""

    def __init__(self, llm: AsyncLLM) -> None:
        self.llm = llm
        self.registry = CollectorRegistry()
        self.engine_stats = _EngineCollector()
        self.registry.register(self.engine_stats)
        r = self.registry
        self.requests = Counter(
            "kvforge:request_success",
            "Finished requests by finish reason",
            ["finished_reason"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "kvforge:prompt_tokens", "Prompt tokens of finished requests", registry=r
        )
        self.generation_tokens = Counter(
            "kvforge:generation_tokens", "Generated tokens", registry=r
        )
        self.ttft = Histogram(
            "kvforge:time_to_first_token_seconds",
            "Time to first token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "kvforge:inter_token_latency_seconds",
            "Time between tokens",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "kvforge:e2e_request_latency_seconds",
            "Arrival to finish",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue = Histogram(
            "kvforge:request_queue_time_seconds",
            "Arrival to first scheduled",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )

    async def render(self) -> bytes:
        """The text exposition of every metric, engine stats read fresh."""
        stats = self.engine_stats
        stats.stats, stats.experts = await self.llm.acall(
            lambda engine: (read_engine_stats(engine), read_expert_stats(engine))
        )
        return generate_latest(self.registry)


class RequestTracker:
    """Follows one request's outputs to observe token timing and its end."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics
        self.last_time: float | None = None
        self.num_tokens = 0

    def observe(self, output: RequestOutput) -> None:
        """Call with every RequestOutput of the request, in order."""
        now = time.monotonic()
        num_tokens = sum(len(c.token_ids) for c in output.outputs)
        new = num_tokens - self.num_tokens
        if new > 0 and self.last_time is not None:
            self.metrics.itl.observe((now - self.last_time) / new)
        if new > 0:
            self.last_time, self.num_tokens = now, num_tokens
        if output.finished and output.metrics is not None:
            m = output.metrics
            for completion in output.outputs:
                self.metrics.requests.labels(completion.finish_reason or "abort").inc()
            self.metrics.prompt_tokens.inc(m.num_prompt_tokens)
            self.metrics.generation_tokens.inc(num_tokens)
            if m.time_to_first_token is not None:
                self.metrics.ttft.observe(m.time_to_first_token)
            if m.first_scheduled_time is not None:
                self.metrics.queue.observe(m.first_scheduled_time - m.arrival_time)
            self.metrics.e2e.observe(now - m.arrival_time)

"""Shared pieces of the benchmarks: latency statistics, markdown tables, host facts, JSON."""

from __future__ import annotations

import importlib.util
import json
import math
import platform
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from kvforge.errors import KVForgeError


class LatencyStats(NamedTuple):
    """Summary of one latency distribution, in milliseconds."""

    mean: float
    median: float
    p90: float
    p99: float

    @classmethod
    def of(cls, seconds: Sequence[float]) -> LatencyStats:
        """Statistics of ``seconds`` (all zero when there are no samples)."""
        if not seconds:
            return cls(0.0, 0.0, 0.0, 0.0)
        ms = sorted(1000.0 * s for s in seconds)
        return cls(
            statistics.fmean(ms), statistics.median(ms), percentile(ms, 90), percentile(ms, 99)
        )


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile ``q`` (0-100) of already sorted values (numpy's default)."""
    if not sorted_values:
        return 0.0
    rank = (len(sorted_values) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (rank - low)


def stddev(values: Sequence[float]) -> float:
    """Sample standard deviation, 0 for fewer than two values (llama-bench's ``stddev_ts``)."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: int = 1) -> str:
    """A markdown table padded to column width; the last ``right`` columns align right."""
    widths = [max(len(str(row[i])) for row in [headers, *rows]) for i in range(len(headers))]
    first_right = len(headers) - right

    def line(cells: Sequence[str]) -> str:
        padded = [
            str(c).rjust(w) if i >= first_right else str(c).ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths))
        ]
        return "| " + " | ".join(padded) + " |"

    rule = [("-" * (w - 1) + ":") if i >= first_right else "-" * w for i, w in enumerate(widths)]
    return "\n".join([line(headers), line(rule), *(line(row) for row in rows)])


def write_json(path: str, data: Any) -> None:
    """Write ``data`` as indented JSON to ``path`` (parent folders created)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(data, indent=2) + "\n")


def require_matplotlib() -> None:
    """Fail early, before a long run, when ``--plot`` cannot be honoured."""
    if importlib.util.find_spec("matplotlib") is None:
        raise KVForgeError(
            "--plot needs matplotlib, which is not installed: pip install matplotlib"
        )


def plot_latencies(path: str, series: dict[str, list[float]]) -> None:
    """Histograms (left) and CDFs (right) of latency series given in milliseconds."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, (hist, cdf) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, values in series.items():
        if not values:
            continue
        hist.hist(values, bins=30, alpha=0.5, label=name)
        ordered = sorted(values)
        cdf.plot(ordered, [(i + 1) / len(ordered) for i in range(len(ordered))], label=name)
    hist.set(xlabel="ms", ylabel="requests", title="latency histogram")
    cdf.set(xlabel="ms", ylabel="fraction of requests", title="latency CDF")
    for axes in (hist, cdf):
        axes.legend()
        axes.grid(alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)

"""Scenario presets: sampling settings per kind of task, and serving settings per goal.

A sampling preset fills the sampling fields a request leaves out (``"preset": "code"``, or
``kvforge serve --preset code`` for every request that names none); fields the request sets
win. A serving preset sets engine options that the command line leaves at their defaults.
Every value carries the reason it was chosen (``kvforge presets`` prints them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvforge.errors import InvalidRequestError


@dataclass(frozen=True)
class Preset:
    name: str
    kind: str  # "sampling" or "serving"
    use: str  # what it is for
    values: dict[str, Any]
    reasons: dict[str, str]


def _preset(name: str, kind: str, use: str, **entries: tuple[Any, str]) -> Preset:
    return Preset(
        name,
        kind,
        use,
        {key: value for key, (value, _) in entries.items()},
        {key: reason for key, (_, reason) in entries.items()},
    )


SAMPLING = {
    p.name: p
    for p in (
        _preset(
            "code",
            "sampling",
            "writing and editing code",
            temperature=(
                0.1,
                "code has one right token far more often than prose: stay near greedy",
            ),
            top_p=(0.95, "cut the long tail that turns identifiers into typos"),
            repetition_penalty=(1.0, "code repeats itself on purpose (names, brackets, patterns)"),
        ),
        _preset(
            "factual",
            "sampling",
            "questions with one correct answer, extraction",
            temperature=(0.0, "greedy: the most likely answer, the same every time"),
            top_p=(1.0, "no truncation needed when greedy"),
            repetition_penalty=(1.0, "short answers: nothing to penalise"),
        ),
        _preset(
            "summarize",
            "sampling",
            "summaries of a given text",
            temperature=(0.3, "faithful to the source, a little freedom in wording"),
            top_p=(0.9, "keep phrasing to likely words"),
            repetition_penalty=(1.1, "summaries of long texts tend to loop on key phrases"),
        ),
        _preset(
            "translate",
            "sampling",
            "translation",
            temperature=(0.2, "one meaning to carry over; low variance"),
            top_p=(0.9, "idiomatic choices stay among likely words"),
            repetition_penalty=(1.1, "guards against repeated clauses on long inputs"),
        ),
        _preset(
            "chat",
            "sampling",
            "open conversation, assistants",
            temperature=(0.7, "varied but coherent replies"),
            top_p=(0.9, "nucleus sampling: drop the unlikely tail"),
            repetition_penalty=(1.15, "long conversations drift into repeating themselves"),
        ),
        _preset(
            "creative",
            "sampling",
            "stories, brainstorming, poetry",
            temperature=(1.0, "the model's own distribution: the most diverse text it writes"),
            top_p=(0.95, "a wide nucleus, without the very unlikely tail"),
            repetition_penalty=(1.05, "a light touch: repetition can be a device"),
        ),
    )
}
SERVING = {
    p.name: p
    for p in (
        _preset(
            "throughput",
            "serving",
            "batch jobs: most tokens per second",
            max_num_seqs=(
                256,
                "more sequences per step: matrix products grow, cost per token falls",
            ),
            max_num_batched_tokens=(8192, "long prompts in fewer, bigger steps"),
        ),
        _preset(
            "low-latency",
            "serving",
            "interactive use: steady time per token",
            max_num_seqs=(32, "a small batch keeps each decode step short"),
            max_num_batched_tokens=(1024, "a prompt never stalls the running streams for long"),
            long_prefill_token_threshold=(256, "long prompts are chunked between decode steps"),
        ),
        _preset(
            "memory-constrained",
            "serving",
            "small machines",
            kv_cache_memory=("256MiB", "the KV cache is the largest allocation after the weights"),
            max_model_len=(4096, "a shorter context bounds one request's KV"),
            max_num_seqs=(16, "fewer sequences share the smaller cache without thrashing"),
        ),
    )
}


def sampling_preset(name: str) -> Preset:
    """The sampling preset ``name``; InvalidRequestError (400) lists the valid ones."""
    if name not in SAMPLING:
        raise InvalidRequestError(
            f"unknown preset {name!r}; valid presets: {', '.join(SAMPLING)}", "preset"
        )
    return SAMPLING[name]


def find(name: str) -> Preset:
    """A sampling or serving preset by name."""
    if name in SERVING:
        return SERVING[name]
    if name in SAMPLING:
        return SAMPLING[name]
    valid = ", ".join([*SAMPLING, *SERVING])
    raise InvalidRequestError(f"unknown preset {name!r}; valid presets: {valid}", "preset")


def table() -> str:
    """Every preset, its values and why, as plain text."""
    lines = []
    for group, presets in (("sampling", SAMPLING), ("serving", SERVING)):
        lines.append(f"{group} presets")
        for preset in presets.values():
            lines.append(f"  {preset.name}: {preset.use}")
            for key, value in preset.values.items():
                lines.append(f"    {key} = {value}  ({preset.reasons[key]})")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"

"""``kvforge perplexity`` and ``kvforge imatrix``: teacher-forced passes over a text file.

Perplexity follows llama.cpp: the token stream is cut into chunks of ``ctx`` tokens (each
starting with BOS when the model adds one); the first half of a chunk is context and each
later token's negative log-likelihood is scored. With a base logits file (written by a run of
the source model) it also reports the mean KL divergence of the source distribution to this
model's and how often both pick the same top token. The imatrix pass runs the same chunks and
accumulates, per weight matrix, the sum of squared input activations of each column.
"""

from __future__ import annotations

import json
import math
import struct
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch

from kvforge.config import CacheConfig, EngineConfig, ModelConfig
from kvforge.errors import InvalidRequestError
from kvforge.layers.linear import Linear, MergedLinear
from kvforge.runner import ModelRunner

_MAGIC = b"KVFLOGP1"


def make_runner(
    model: str | None, dtype: str = "float32", kv_cache_dtype: str = "auto"
) -> ModelRunner:
    """A model runner with a small KV cache (the passes use scratch caches)."""
    config = EngineConfig(
        model_config=ModelConfig(model=model, dtype=dtype),
        cache_config=CacheConfig(num_blocks=4, kv_cache_dtype=kv_cache_dtype),
        show_progress=False,
    )
    return ModelRunner(config)


def text_chunks(
    runner: ModelRunner, text: str, ctx: int, max_chunks: int | None = None
) -> list[list[int]]:
    """The text's tokens in whole chunks of ``ctx``, BOS first when the model uses one."""
    tokenizer = runner.loaded.tokenizer
    tokens = tokenizer.encode(text)
    num_chunks = len(tokens) // ctx
    if max_chunks is not None:
        num_chunks = min(num_chunks, max_chunks)
    if num_chunks == 0:
        raise InvalidRequestError(
            f"the text has {len(tokens)} tokens, fewer than one chunk of {ctx}"
        )
    chunks = [tokens[i * ctx : (i + 1) * ctx] for i in range(num_chunks)]
    bos = tokenizer.bos_token_id
    if bos is not None and tokens and tokens[0] == bos:
        for chunk in chunks:
            chunk[0] = bos
    return chunks


@dataclass
class PerplexityResult:
    """Scores of one perplexity run (``kld`` / ``top1`` only against base logits)."""

    ppl: float
    num_tokens: int
    kld: float | None = None
    kld_stderr: float | None = None
    top1: float | None = None
    base_ppl: float | None = None
    chunk_ppl: list[float] = field(default_factory=list)


class LogprobFile:
    """Saved log-probabilities of scored positions: a JSON header, then float16 rows."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def write(self, header: dict[str, Any], rows: Iterator[np.ndarray]) -> None:
        """Write the header and stream the rows."""
        blob = json.dumps(header).encode()
        with self.path.open("wb") as handle:
            handle.write(_MAGIC + struct.pack("<Q", len(blob)) + blob)
            for row_block in rows:
                handle.write(row_block.astype(np.float16).tobytes())

    def read(self) -> tuple[dict[str, Any], np.ndarray]:
        """Header and a memory-mapped [rows, vocab] float16 array."""
        with self.path.open("rb") as handle:
            if handle.read(8) != _MAGIC:
                raise InvalidRequestError(f"{self.path} is not a kvforge logits file")
            (size,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(size))
        rows = np.memmap(self.path, dtype=np.float16, mode="r", offset=16 + size)
        return header, rows.reshape(-1, header["vocab"])


def _chunk_logprobs(runner: ModelRunner, chunk: list[int]) -> torch.Tensor:
    """Log-probabilities [ctx/2 - 1, V] at the scored positions of one chunk."""
    first = len(chunk) // 2
    logits = runner.score(chunk)[first : len(chunk) - 1]
    return logits.float().log_softmax(-1)


def _progress(out: TextIO, i: int, value: float, show: bool) -> None:
    if show:
        out.write(f"[{i + 1}]{value:.4f},")
        out.flush()


def perplexity(
    runner: ModelRunner,
    chunks: list[list[int]],
    save_base: str | Path | None = None,
    compare_base: str | Path | None = None,
    show_progress: bool = True,
) -> PerplexityResult:
    """Chunked perplexity; optionally save logprobs as a base or compare with a saved base."""
    base_rows: np.ndarray | None = None
    if compare_base is not None:
        header, base_rows = LogprobFile(compare_base).read()
        if header["chunks"] != chunks:
            raise InvalidRequestError("the base logits were computed on other tokens or ctx")
    nll_sum, count = 0.0, 0
    base_nll_sum = 0.0
    klds: list[torch.Tensor] = []
    same_top = 0
    chunk_ppl: list[float] = []
    saved: list[np.ndarray] = []
    row = 0
    for i, chunk in enumerate(chunks):
        logprobs = _chunk_logprobs(runner, chunk)
        targets = torch.tensor(chunk[len(chunk) // 2 + 1 :])
        nll = -logprobs.gather(1, targets[:, None])[:, 0]
        nll_sum += float(nll.sum())
        count += len(targets)
        chunk_ppl.append(math.exp(nll_sum / count))
        _progress(sys.stderr, i, chunk_ppl[-1], show_progress)
        if save_base is not None:
            saved.append(logprobs.numpy().astype(np.float16))
        if base_rows is not None:
            base = torch.from_numpy(
                np.asarray(base_rows[row : row + len(targets)], dtype=np.float32)
            )
            row += len(targets)
            klds.append((base.exp() * (base - logprobs)).sum(-1))
            same_top += int((base.argmax(-1) == logprobs.argmax(-1)).sum())
            base_nll_sum += float(-base.gather(1, targets[:, None]).sum())
    if show_progress:
        sys.stderr.write("\n")
    if save_base is not None:
        vocab = saved[0].shape[-1]
        LogprobFile(save_base).write({"chunks": chunks, "vocab": vocab}, iter(saved))
    result = PerplexityResult(math.exp(nll_sum / count), count, chunk_ppl=chunk_ppl)
    if klds:
        kld = torch.cat(klds)
        result.kld = float(kld.mean())
        result.kld_stderr = float(kld.std() / math.sqrt(len(kld)))
        result.top1 = same_top / count
        result.base_ppl = math.exp(base_nll_sum / count)
    return result


# fused module name part -> GGUF names of its shards
_GGUF_NAMES = {
    "self_attn.qkv_proj": ("attn_q", "attn_k", "attn_v"),
    "self_attn.o_proj": ("attn_output",),
    "mlp.gate_up_proj": ("ffn_gate", "ffn_up"),
    "mlp.down_proj": ("ffn_down",),
}


def score_with_input_hooks(
    runner: ModelRunner,
    chunks: list[list[int]],
    record: Callable[[str, torch.Tensor], None],
    label: str,
    show_progress: bool = True,
) -> None:
    """Teacher-forced passes over ``chunks`` calling ``record(module name, inputs [T, in])``
    for the input of every linear layer of every decoder layer (``layers.3.mlp.down_proj``)."""

    def hook(name: str) -> Any:
        def call(_: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            record(name, inputs[0].reshape(-1, inputs[0].shape[-1]).float())

        return call

    handles = [
        module.register_forward_pre_hook(hook(name))
        for name, module in runner.model.named_modules()
        if isinstance(module, (Linear, MergedLinear)) and name.startswith("layers.")
    ]
    try:
        for i, chunk in enumerate(chunks):
            runner.score(chunk)
            if show_progress:
                sys.stderr.write(f"\r{label}: {i + 1}/{len(chunks)} chunks")
                sys.stderr.flush()
    finally:
        for handle in handles:
            handle.remove()
    if show_progress:
        sys.stderr.write("\n")


def collect_imatrix(
    runner: ModelRunner, chunks: list[list[int]], show_progress: bool = True
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Per GGUF weight name: sum over tokens of squared input activations, and token count."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def accumulate(module_name: str, x: torch.Tensor) -> None:
        _, layer, part = module_name.split(".", 2)
        squares = (x * x).sum(0)
        for n in _GGUF_NAMES[part]:
            name = f"blk.{layer}.{n}.weight"
            sums[name] = sums.get(name, 0) + squares  # type: ignore[assignment]
            counts[name] = counts.get(name, 0) + x.shape[0]

    score_with_input_hooks(runner, chunks, accumulate, "imatrix", show_progress)
    return {k: v.numpy() for k, v in sums.items()}, counts

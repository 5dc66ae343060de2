"""Sampler: penalties -> logit bias -> bans -> temperature -> top-k / top-p / min-p -> sample.

Logprobs are those of the model's raw distribution (before any processing), like vLLM.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from kvforge.ops import cpu_ops
from kvforge.sample.metadata import SamplingMetadata
from kvforge.sampling_params import SamplingParams

_NEG_INF = float("-inf")


class SamplerOutput(NamedTuple):
    """Sampled ids and logprobs for R rows; top-k columns only when logprobs were asked."""

    token_ids: torch.Tensor  # [R]
    logprobs: torch.Tensor  # [R] raw logprob of the sampled token
    ranks: torch.Tensor  # [R] 1-based rank of the sampled token in the raw distribution
    top_token_ids: torch.Tensor | None  # [R, K]
    top_logprobs: torch.Tensor | None  # [R, K]


def token_counts(token_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[R, V] occurrences of each token in padded rows ``token_ids`` (pad value V)."""
    counts = torch.zeros(
        token_ids.shape[0], vocab_size + 1, dtype=torch.long, device=token_ids.device
    )
    counts.scatter_add_(1, token_ids, torch.ones_like(token_ids))
    return counts[:, :vocab_size]


def apply_penalties(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    """Repetition (prompt + output), frequency and presence (output) penalties."""
    if md.output_token_ids is None or md.prompt_token_ids is None:
        return logits
    vocab_size = logits.shape[1]
    output_counts = token_counts(md.output_token_ids, vocab_size)
    if md.repetition_penalty is not None:
        seen = (output_counts > 0) | (token_counts(md.prompt_token_ids, vocab_size) > 0)
        penalty = md.repetition_penalty[:, None].expand_as(logits)
        # Divide positive logits and multiply negative ones: both make a seen token less likely.
        penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(seen, penalized, logits)
    if md.frequency_penalty is not None:
        logits = logits - md.frequency_penalty[:, None] * output_counts
    if md.presence_penalty is not None:
        logits = logits - md.presence_penalty[:, None] * (output_counts > 0)
    return logits


def apply_top_k_top_p_min_p(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    """Mask tokens outside top-k, outside the top-p nucleus, or below min_p * max prob."""
    if md.top_k is not None:
        vocab_size = logits.shape[1]
        k = torch.where(md.top_k > 0, md.top_k, vocab_size).clamp(max=vocab_size)
        kth = logits.sort(dim=-1, descending=True).values.gather(1, (k - 1)[:, None])
        logits = logits.masked_fill(logits < kth, _NEG_INF)  # ties with the k-th stay in
    if md.top_p is not None:
        probs_sorted, order = logits.softmax(-1).sort(dim=-1, descending=True)
        # Drop a token when the tokens ranked above it already reach top_p.
        before = probs_sorted.cumsum(-1) - probs_sorted
        drop_sorted = before > md.top_p[:, None]
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, _NEG_INF)
    if md.min_p is not None:
        probs = logits.softmax(-1)
        threshold = md.min_p[:, None] * probs.max(-1, keepdim=True).values
        logits = logits.masked_fill(probs < threshold, _NEG_INF)
    return logits


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[R, W] int32 words (bit b of word w = token 32w + b) -> [R, V] bool allowed mask."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1  # [R, W, 32]
    return bits.view(bitmask.shape[0], -1)[:, :vocab_size].bool()


def random_sample(probs: torch.Tensor, generators: dict[int, torch.Generator]) -> torch.Tensor:
    """Draw one token per row via the exponential race: argmax(p / E), E ~ Exp(1).

    Rows with their own generator draw their noise from it, so a seeded request samples
    the same tokens whatever else is in the batch.
    """
    noise = torch.empty_like(probs).exponential_()
    for row, generator in generators.items():
        noise[row].exponential_(generator=generator)
    return (probs / noise).argmax(dim=-1)


def plain_greedy(params: SamplingParams) -> bool:
    """Greedy, with nothing that changes the logits and no logprobs asked: the argmax and its
    logprob are the whole answer (:meth:`Sampler.greedy`)."""
    return (
        params.is_greedy
        and params.logprobs is None
        and params.repetition_penalty == 1
        and not params.frequency_penalty
        and not params.presence_penalty
        and not params.logit_bias
    )


class Sampler:
    """Batched sampling with every OpenAI / vLLM parameter; see the module docstring."""

    @staticmethod
    def greedy(
        logits: torch.Tensor, banned: list[list[int]] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(argmax, its logprob) per row of float32 logits [R, V], never one of the row's
        ``banned`` ids (the logprob is of the unbanned row, as :meth:`__call__`'s): one C++
        pass per row on the CPU, else argmax + logsumexp."""
        width = max((len(ids) for ids in banned or []), default=0)
        table = None
        if width:
            table = torch.full((logits.shape[0], width), -1, dtype=torch.long)
            for row, ids in enumerate(banned or []):
                table[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        ops = cpu_ops(logits) if logits.dtype == torch.float32 else None
        if ops is not None:
            tokens, logprobs = ops.greedy_sample(logits.contiguous(), table)
            return tokens, logprobs
        masked = logits
        if table is not None:
            rows = torch.arange(logits.shape[0])[:, None].expand_as(table)[table >= 0]
            masked = logits.index_put(
                (rows.to(logits.device), table[table >= 0].to(logits.device)),
                torch.tensor(float("-inf"), dtype=logits.dtype, device=logits.device),
            )
        tokens = masked.argmax(dim=-1)
        return tokens, logits.gather(1, tokens[:, None]).squeeze(1) - logits.logsumexp(-1)

    def __call__(self, logits: torch.Tensor, md: SamplingMetadata) -> SamplerOutput:
        """Sample one token per row of ``logits`` [R, V] (float32)."""
        if not md.needs_ranks:
            # Fast path: the sampled token's logprob is logit - logsumexp(logits); no
            # [R, V] log_softmax and no rank pass when no row asked for logprobs.
            sampled = self._sample(self.process(logits, md), md)
            chosen = logits.gather(1, sampled[:, None]).squeeze(1) - logits.logsumexp(-1)
            return SamplerOutput(sampled, chosen, torch.zeros_like(sampled), None, None)
        raw_logprobs = logits.log_softmax(dim=-1)
        sampled = self._sample(self.process(logits, md), md)
        return gather_logprobs(raw_logprobs, sampled, md.max_num_logprobs)

    def _sample(self, logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
        greedy = logits.argmax(dim=-1)
        if md.all_greedy:
            return greedy
        random = random_sample(self.probs(logits, md), md.generators)
        return torch.where(md.is_greedy, greedy, random)

    @staticmethod
    def process(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
        """Penalties, logit bias and banned tokens (applied to greedy rows too)."""
        logits = apply_penalties(logits, md)
        if md.logit_bias is not None:
            rows, ids, values = md.logit_bias
            logits = logits.index_put((rows, ids), values, accumulate=True)
        unbanned = logits
        if md.banned is not None:
            logits = logits.index_put(md.banned, torch.tensor(_NEG_INF, device=logits.device))
        if md.grammar_bitmask is not None:
            allowed = unpack_bitmask(md.grammar_bitmask, logits.shape[1])
            constrained = logits.masked_fill(~allowed, _NEG_INF)
            # If bans left a row nothing the grammar allows, the grammar wins.
            empty = torch.isinf(constrained).all(dim=-1, keepdim=True)
            logits = torch.where(empty, unbanned.masked_fill(~allowed, _NEG_INF), constrained)
        return logits

    @staticmethod
    def probs(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
        """The distribution random rows draw from: temperature, then top-k / top-p / min-p."""
        temperature = torch.where(md.is_greedy, 1.0, md.temperature)
        return apply_top_k_top_p_min_p(logits / temperature[:, None], md).softmax(dim=-1)


def gather_logprobs(logprobs: torch.Tensor, token_ids: torch.Tensor, num_top: int) -> SamplerOutput:
    """The logprob and rank of ``token_ids`` [R] in ``logprobs`` [R, V], plus the top ``num_top``."""
    chosen = logprobs.gather(1, token_ids[:, None]).squeeze(1)
    ranks = (logprobs > chosen[:, None]).sum(-1) + 1
    top_ids = top_lp = None
    if num_top > 0:
        top_lp, top_ids = logprobs.topk(num_top, dim=-1)
    return SamplerOutput(token_ids, chosen, ranks, top_ids, top_lp)

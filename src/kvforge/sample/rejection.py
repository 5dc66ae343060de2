"""Rejection sampling of draft tokens: keep the output distribution exactly the target's.

For a request with drafts d_0..d_{k-1}, the target model scored k + 1 positions: p_j is its
distribution (after penalties, bias, temperature, top-k / top-p / min-p) for the token after
d_{j-1}. A proposer here is deterministic (n-gram lookup), so its distribution q_j is a point
mass on d_j, and the rule of Leviathan et al. / Chen et al. (accept with min(1, p / q), on
rejection sample from max(0, p - q) normalized) becomes: accept d_j with probability p_j(d_j);
at the first rejection draw from p_j without d_j; if every draft held, draw a bonus token from
p_k. Each emitted token then has exactly the target's distribution given the tokens before it.
Greedy rows accept d_j iff it is p_j's argmax and emit the argmax where it is not, so greedy
output is token-identical with and without speculation.

Penalties see the drafts before each position as generated tokens (row j's output tokens are
the request's plus d_0..d_{j-1}), as they would be had the tokens been sampled one at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvforge.sample.metadata import SamplingMetadata
from kvforge.sample.sampler import Sampler, gather_logprobs, random_sample


@dataclass
class Verified:
    """One request's kept tokens (accepted drafts, then one of the target's) and their raw
    logprobs; ``top`` holds the top logprobs per token when the request asked for them."""

    token_ids: list[int]
    logprobs: list[float]
    ranks: list[int]
    top: list[list[tuple[int, float]]]


class RejectionSampler:
    """Verifies the drafts of a batch of requests in one pass over their scored rows."""

    def __call__(
        self,
        logits: torch.Tensor,
        md: SamplingMetadata,
        drafts: list[list[int]],
        generators: list[torch.Generator | None],
        num_top: list[int | None],
    ) -> list[Verified]:
        """``logits`` [sum(k_i + 1), V] in request order (request i owns k_i + 1 rows);
        ``md`` has one row per logits row; ``generators`` per request (seeded ones)."""
        processed = Sampler.process(logits, md)
        argmax = processed.argmax(dim=-1).tolist()
        probs = None if md.all_greedy else Sampler.probs(processed, md)
        greedy = md.is_greedy.tolist()
        starts, kept, final_rows, final_masks = [], [], [], []
        row = 0
        for draft, generator in zip(drafts, generators):
            k = len(draft)
            starts.append(row)
            if greedy[row]:
                accepted = 0
                while accepted < k and argmax[row + accepted] == draft[accepted]:
                    accepted += 1
                kept.append((accepted, argmax[row + accepted]))
            else:
                assert probs is not None
                draft_ids = torch.tensor(draft, device=probs.device)
                rows = torch.arange(row, row + k, device=probs.device)
                p_draft = probs[rows, draft_ids].tolist()
                uniform = torch.rand(k, generator=generator, device=probs.device).tolist()
                accepted = 0
                while accepted < k and uniform[accepted] < p_draft[accepted]:
                    accepted += 1
                kept.append((accepted, -1))
                # The residual p_j without the rejected draft, or the bonus row p_k.
                final_rows.append(row + accepted)
                final_masks.append(draft[accepted] if accepted < k else -1)
            row += k + 1
        if final_rows:
            assert probs is not None
            chosen = self._sample_final(probs, final_rows, final_masks, drafts, generators, kept)
            it = iter(chosen)
            kept = [(a, next(it) if token < 0 else token) for a, token in kept]
        return self._results(logits, starts, drafts, kept, num_top)

    @staticmethod
    def _sample_final(
        probs: torch.Tensor,
        rows: list[int],
        masked: list[int],
        drafts: list[list[int]],
        generators: list[torch.Generator | None],
        kept: list[tuple[int, int]],
    ) -> list[int]:
        """The token after the accepted drafts of each random request, in request order."""
        dist = probs[torch.tensor(rows, device=probs.device)].clone()
        for i, token in enumerate(masked):
            if token >= 0:
                dist[i, token] = 0.0
        # A rejected draft had p < 1, so its residual is not all zero; guard anyway.
        empty = dist.sum(-1) <= 0
        if bool(empty.any()):
            dist[empty] = probs[torch.tensor(rows, device=probs.device)][empty]
        random_ids = [i for i, (_, token) in enumerate(kept) if token < 0]
        seeded = {n: g for n, i in enumerate(random_ids) if (g := generators[i]) is not None}
        return random_sample(dist, seeded).tolist()

    @staticmethod
    def _results(
        logits: torch.Tensor,
        starts: list[int],
        drafts: list[list[int]],
        kept: list[tuple[int, int]],
        num_top: list[int | None],
    ) -> list[Verified]:
        rows: list[int] = []
        tokens: list[int] = []
        for start, draft, (accepted, last) in zip(starts, drafts, kept):
            ids = [*draft[:accepted], last]
            rows.extend(range(start, start + len(ids)))
            tokens.extend(ids)
        device = logits.device
        row_index = torch.tensor(rows, device=device)
        token_index = torch.tensor(tokens, device=device)
        widest = max((n or 0 for n in num_top), default=0)
        if any(n is not None for n in num_top):
            out = gather_logprobs(logits[row_index].log_softmax(-1), token_index, widest)
            lps, ranks = out.logprobs.tolist(), out.ranks.tolist()
            top_ids = out.top_token_ids.tolist() if out.top_token_ids is not None else None
            top_lps = out.top_logprobs.tolist() if out.top_logprobs is not None else None
        else:
            chosen = logits[row_index, token_index] - logits[row_index].logsumexp(-1)
            lps, ranks, top_ids, top_lps = chosen.tolist(), [0] * len(rows), None, None
        results, offset = [], 0
        for (accepted, _), n in zip(kept, num_top):
            count = accepted + 1
            span = range(offset, offset + count)
            top = [
                list(zip(top_ids[i][: n or 0], top_lps[i][: n or 0])) if top_ids and top_lps else []
                for i in span
            ]
            results.append(
                Verified(
                    tokens[offset : offset + count],
                    lps[offset : offset + count],
                    ranks[offset : offset + count],
                    top,
                )
            )
            offset += count
        return results

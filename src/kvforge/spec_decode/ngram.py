"""N-gram prompt lookup: propose what followed the latest earlier occurrence of the last n tokens.

Pure Python (no torch), so it runs in the scheduler. Each request keeps an index, per n, from
every n-gram of its tokens to where its latest occurrence ended; it is extended with the tokens
generated since the last call, so a proposal costs O(max_n - min_n) lookups however long the
sequence is (a scan of the whole context per step would grow with it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvforge.request import Request


@dataclass(slots=True)
class NgramIndex:
    """One request's tokens and, per n, n-gram -> end of its latest indexed occurrence."""

    tokens: list[int] = field(default_factory=list)
    by_n: dict[int, dict[tuple[int, ...], int]] = field(default_factory=dict)
    # n-grams ending at positions < indexed_end are in the index (each such end e has a
    # continuation tokens[e], so a match can propose something).
    indexed_end: int = 0


class NgramProposer:
    """Prompt lookup decoding: the longest n in [min_n, max_n] whose last n tokens occurred
    before proposes (up to k of) the tokens that followed that occurrence."""

    def __init__(self, min_n: int, max_n: int) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError(f"need 1 <= min_n <= max_n, got {min_n}, {max_n}")
        self.min_n = min_n
        self.max_n = max_n

    def propose(self, request: Request, k: int) -> list[int]:
        """Up to ``k`` draft tokens to follow ``request``'s tokens (``[]``: no match)."""
        if k <= 0:
            return []
        index = request.spec_state
        if not isinstance(index, NgramIndex):
            index = request.spec_state = NgramIndex(list(request.prompt_token_ids))
        generated = len(index.tokens) - request.num_prompt_tokens
        index.tokens.extend(request.output_token_ids[generated:])
        return self._lookup(index, k)

    def _lookup(self, index: NgramIndex, k: int) -> list[int]:
        tokens = index.tokens
        end = len(tokens)
        # Index every n-gram that ends before the last position (the suffix itself is what we
        # look up, so it must not find itself).
        for e in range(max(index.indexed_end, self.min_n), end):
            for n in range(self.min_n, min(self.max_n, e) + 1):
                index.by_n.setdefault(n, {})[tuple(tokens[e - n : e])] = e
        index.indexed_end = max(index.indexed_end, end)
        for n in range(min(self.max_n, end), self.min_n - 1, -1):
            found = index.by_n.get(n, {}).get(tuple(tokens[end - n :]))
            if found is not None:
                # Past the end, the continuation repeats itself (a loop of period end - found).
                out: list[int] = []
                for i in range(k):
                    pos = found + i
                    out.append(tokens[pos] if pos < end else out[pos - end])
                return out
        return []

"""Speculative decoding: proposers of draft tokens that the target model verifies in one pass.

A proposer suggests up to k tokens that may follow a request's tokens; the scheduler runs them
with the request's last token as one chunk, and the runner's rejection sampler keeps the
longest prefix the target's distribution accepts plus one token of its own, so the output
distribution is exactly the target's (``kvforge.sample.rejection``).
"""

from kvforge.spec_decode.ngram import NgramProposer
from kvforge.spec_decode.stats import SpecDecodeStats

__all__ = ["NgramProposer", "SpecDecodeStats"]

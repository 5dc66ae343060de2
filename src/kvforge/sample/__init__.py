"""Sampling: metadata tensors, the batched sampler and logprob gathering."""

from kvforge.sample.metadata import SamplingMetadata
from kvforge.sample.sampler import Sampler, SamplerOutput, gather_logprobs

__all__ = ["Sampler", "SamplerOutput", "SamplingMetadata", "gather_logprobs"]

"""Tensor parallelism over torch.distributed (gloo on CPU, NCCL on CUDA)."""

from kvforge.parallel.group import TensorParallel, shard_range

__all__ = ["TensorParallel", "shard_range"]

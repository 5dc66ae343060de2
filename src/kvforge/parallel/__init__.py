"""Tensor, pipeline and expert parallelism over torch.distributed (gloo on CPU, NCCL on CUDA)."""

from kvforge.parallel.group import ExpertParallel, ModelShard, TensorParallel, shard_range
from kvforge.parallel.layout import Layout

__all__ = ["ExpertParallel", "Layout", "ModelShard", "TensorParallel", "shard_range"]

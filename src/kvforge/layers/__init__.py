"""Model building blocks: linear layers, norms, rotary embeddings, attention backends."""

from kvforge.layers.forward_batch import ForwardBatch
from kvforge.layers.linear import Linear, MergedLinear
from kvforge.layers.norm import RMSNorm
from kvforge.layers.rotary import RotaryEmbedding, apply_rotary

__all__ = ["ForwardBatch", "Linear", "MergedLinear", "RMSNorm", "RotaryEmbedding", "apply_rotary"]

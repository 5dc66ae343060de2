"""Model families built from the shared decoder in ``common``."""

from kvforge.models.common import DecoderLM
from kvforge.models.registry import ModelFamily, family_for_gguf, family_for_hf

__all__ = ["DecoderLM", "ModelFamily", "family_for_gguf", "family_for_hf"]

"""Model loading from GGUF files and Hugging Face directories into :class:`DecoderLM`."""

from kvforge.loader.model_loader import LoadedModel, load_model

__all__ = ["LoadedModel", "load_model"]

"""Tokenizers (GGUF and Hugging Face), chat templates and incremental detokenization."""

from kvforge.tokenizer.detokenizer import IncrementalDetokenizer
from kvforge.tokenizer.gguf_tokenizer import tokenizer_from_gguf
from kvforge.tokenizer.tokenizer import Tokenizer

__all__ = ["IncrementalDetokenizer", "Tokenizer", "tokenizer_from_gguf"]

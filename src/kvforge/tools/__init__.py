"""Offline tools over a loaded model: quantize, imatrix, perplexity, convert."""

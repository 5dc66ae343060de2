"""CLIP: image and text embeddings in one space, zero-shot classification, retrieval.

``clip, preprocess = kvforge.clip.load(path)``; ``clip.encode_image(images)``,
``clip.encode_text(texts)``, ``clip(images, texts) -> (logits_per_image, logits_per_text)``.
"""

from kvforge.clip.image import ImageError, Preprocess, decode_data_url, open_image
from kvforge.clip.model import Clip, load

__all__ = ["Clip", "ImageError", "Preprocess", "decode_data_url", "load", "open_image"]

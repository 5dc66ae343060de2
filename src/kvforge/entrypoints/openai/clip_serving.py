"""A CLIP model next to the language model (``kvforge serve --clip PATH``): text and image
embeddings on /v1/embeddings, zero-shot classification on /v1/classify.

Images are decoded in the worker pool (with the limits of ``kvforge.clip.image``); the model
runs on the engine thread between steps (``AsyncLLM.acall``), as the LLM's own embeddings do.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import torch

from kvforge.async_engine import AsyncLLM
from kvforge.clip import Clip, decode_data_url, load
from kvforge.clip.tasks import TEMPLATES, class_embeddings
from kvforge.errors import InvalidRequestError

MAX_CLIP_INPUTS = 256


class ClipServing:
    def __init__(self, llm: AsyncLLM, path: str) -> None:
        self.llm = llm
        self.clip: Clip = load(path)[0]
        self.name = Path(path).name

    async def _pixels(self, images: list[str]) -> torch.Tensor:
        def decode() -> torch.Tensor:
            return torch.stack([self.clip.preprocess(decode_data_url(url)) for url in images])

        return await self.llm.offload(decode)

    async def embeddings(self, body: Any) -> dict[str, Any]:
        """Unit embeddings of texts and images, in input order."""
        raw = body.input
        if isinstance(raw, str):
            raw = [raw]
        if not raw:
            raise InvalidRequestError("input must not be empty", "input")
        if len(raw) > MAX_CLIP_INPUTS:
            raise InvalidRequestError(
                f"input has {len(raw)} items, at most {MAX_CLIP_INPUTS} are allowed", "input"
            )
        texts: list[tuple[int, str]] = []
        images: list[tuple[int, str]] = []
        for index, item in enumerate(raw):
            if isinstance(item, str):
                texts.append((index, item))
            elif getattr(item, "type", None) == "text" and item.text is not None:
                texts.append((index, item.text))
            elif getattr(item, "type", None) == "image_url" and item.image_url is not None:
                images.append((index, item.image_url.url))
            else:
                raise InvalidRequestError(
                    f"input[{index}]: a CLIP model embeds strings, text parts and image_url parts",
                    "input",
                )
        pixels = await self._pixels([url for _, url in images]) if images else None
        clip = self.clip
        ids, mask = await self.llm.offload(clip.tokenize, [t for _, t in texts])

        def embed(_: Any) -> torch.Tensor:
            out = torch.zeros(len(raw), clip.config.projection_dim)
            if texts:
                with torch.inference_mode():
                    vectors = clip.model.encode_text(ids, mask, normalize=True)
                out[[i for i, _ in texts]] = vectors
            if pixels is not None:
                out[[i for i, _ in images]] = clip.encode_image(pixels)
            return out

        vectors = await self.llm.acall(embed)
        if body.encoding_format == "base64":
            data: list[Any] = [
                base64.b64encode(v.numpy().astype("<f4").tobytes()).decode() for v in vectors
            ]
        else:
            data = vectors.tolist()
        tokens = int(mask.sum())
        return {
            "object": "list",
            "model": self.name,
            "data": [
                {"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(data)
            ],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    async def classify(self, body: Any) -> dict[str, Any]:
        """Labels ranked by probability for one image (prompt ensemble over the templates)."""
        templates = body.templates or list(TEMPLATES)
        if any("{}" not in t for t in templates):
            raise InvalidRequestError("every template needs a {} for the label", "templates")
        if any(not label.strip() for label in body.labels):
            raise InvalidRequestError("labels must not be empty", "labels")
        pixels = await self._pixels([body.image])
        clip = self.clip

        def classify(_: Any) -> torch.Tensor:
            classes = class_embeddings(clip, body.labels, templates)
            scale = clip.model.logit_scale.detach().exp()
            return (scale * clip.encode_image(pixels) @ classes.t()).softmax(-1)[0]

        probabilities = (await self.llm.acall(classify)).tolist()
        ranked = sorted(zip(body.labels, probabilities), key=lambda pair: -pair[1])
        return {
            "object": "classification",
            "model": self.name,
            "data": [{"label": label, "probability": p} for label, p in ranked],
        }

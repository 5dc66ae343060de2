"""Images in a prompt: where their placeholder tokens sit and how the prefix cache tells them
apart (plain data; the embeddings ride along as an opaque tensor).

A vision chat prompt holds ``length`` placeholder tokens per image; the runner replaces their
embeddings with the image's. Token ids alone would let two different images share cached KV,
so the prefix cache keys image positions by the image's content hash instead
(:func:`cache_key_ids`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvforge.errors import InvalidRequestError


@dataclass(slots=True)
class ImageInput:
    offset: int  # prompt position of the image's first placeholder
    length: int  # placeholders (tokens per image)
    content_hash: int  # 63-bit hash of the image's pixels
    embeds: Any = None  # [length, hidden] tensor, filled by the engine


def expand_placeholders(
    token_ids: list[int], placeholder: int, length: int, count: int
) -> tuple[list[int], list[int]]:
    """(ids, offsets): every run of ``placeholder`` tokens (one token, or already ``length``
    of them) becomes ``length`` placeholders; the runs must number ``count``."""
    ids: list[int] = []
    offsets: list[int] = []
    index = 0
    while index < len(token_ids):
        if token_ids[index] != placeholder:
            ids.append(token_ids[index])
            index += 1
            continue
        run = index
        while run < len(token_ids) and token_ids[run] == placeholder:
            run += 1
        if run - index not in (1, length):
            raise InvalidRequestError(
                f"an image takes one placeholder token or {length} of them, not {run - index}",
                "prompt",
            )
        offsets.append(len(ids))
        ids.extend([placeholder] * length)
        index = run
    if len(offsets) != count:
        raise InvalidRequestError(
            f"the prompt has {len(offsets)} image placeholders for {count} images", "prompt"
        )
    return ids, offsets


def cache_key_ids(token_ids: list[int], images: list[ImageInput]) -> list[int]:
    """``token_ids`` with each image's placeholders replaced by negative ids derived from its
    content hash (never a real token), position by position."""
    if not images:
        return token_ids
    keys = list(token_ids)
    for image in images:
        for i in range(image.length):
            keys[image.offset + i] = -1 - ((image.content_hash + i) & ((1 << 62) - 1))
    return keys


def whole_images(images: list[ImageInput], start: int, num_new: int) -> int:
    """``num_new`` adjusted so that the chunk [start, start + num_new) does not end inside an
    image: cut back to the image's start, or, when the chunk begins there, take it whole."""
    end = start + num_new
    for image in images:
        first, last = image.offset, image.offset + image.length
        if first < end < last:
            end = first if first > start else last
    return end - start


# Stands for an image in rendered chat text until the prompt is tokenized (then: placeholders).
IMAGE_MARKER = "<|kvforge:image|>"


def chat_images(message: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """A chat message whose content parts are text and ``image_url`` parts, as one text with
    an :data:`IMAGE_MARKER` per image (parts joined by newlines), and the images' URLs."""
    content = message.get("content")
    if not isinstance(content, list):
        return message, []
    texts: list[str] = []
    urls: list[str] = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str):
                raise InvalidRequestError("an image_url part needs image_url.url", "messages")
            texts.append(IMAGE_MARKER)
            urls.append(url)
        else:
            raise InvalidRequestError(f"unsupported content part type {kind!r}", "messages")
    return {**message, "content": "\n".join(texts)}, urls

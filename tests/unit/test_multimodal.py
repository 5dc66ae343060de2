"""Image placeholders: expansion, prefix-cache keys, chunks that keep images whole."""

from __future__ import annotations

import pytest

from kvforge.errors import InvalidRequestError
from kvforge.multimodal import ImageInput, cache_key_ids, expand_placeholders, whole_images

P = 99


def test_expand_placeholders():
    ids, offsets = expand_placeholders([1, P, 2, P, P, P, 3], P, 3, 2)
    assert ids == [1, P, P, P, 2, P, P, P, 3] and offsets == [1, 5]
    with pytest.raises(InvalidRequestError, match="1 image placeholders for 2 images"):
        expand_placeholders([1, P, 2], P, 3, 2)
    with pytest.raises(InvalidRequestError, match="not 2"):
        expand_placeholders([1, P, P, 2], P, 3, 1)


def test_cache_keys_follow_image_content():
    ids = [1, P, P, 2]
    a = cache_key_ids(ids, [ImageInput(1, 2, 1234)])
    b = cache_key_ids(ids, [ImageInput(1, 2, 99)])
    assert a[0] == b[0] == 1 and a[3] == b[3] == 2
    assert a[1:3] != b[1:3] and all(k < 0 for k in a[1:3])
    assert a == cache_key_ids(ids, [ImageInput(1, 2, 1234)])
    assert cache_key_ids(ids, []) == ids


@pytest.mark.parametrize(
    ("start", "num_new", "expected"),
    [
        (0, 3, 3),  # ends before the image (offset 4)
        (0, 6, 4),  # would end inside: cut back to the image's start
        (4, 2, 8),  # starts at the image: the whole image
        (0, 20, 20),  # covers it
        (12, 3, 3),  # after it
    ],
)
def test_chunks_keep_images_whole(start, num_new, expected):
    assert whole_images([ImageInput(4, 8, 0)], start, num_new) == expected

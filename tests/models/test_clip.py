"""CLIP against transformers' CLIPModel (tiny random checkpoints), images in, bad files and
bad images refused."""

from __future__ import annotations

import io
import struct
import zlib

import pytest
import torch

from kvforge.clip import ImageError, decode_data_url, load, open_image
from kvforge.errors import ModelFileError
from tests.clip_util import write_tiny_clip

TEXTS = ["a photo of a red circle", "blue square", "a big green triangle on the left", "zebra"]


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_embeddings_and_logits_match_transformers(tmp_path, act):
    from transformers import CLIPModel

    folder = write_tiny_clip(tmp_path / "clip", act)
    clip, preprocess = load(folder)
    reference = CLIPModel.from_pretrained(folder).eval()
    pixels = torch.randn(3, 3, 32, 32)
    ids, mask = clip.tokenize(TEXTS)
    assert mask.sum(1).tolist() == [8, 4, 9, 3]  # [SOS] words [EOS], "zebra" unknown
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    logits, per_text = clip(pixels, TEXTS)
    torch.testing.assert_close(clip.encode_image(pixels), expected.image_embeds, atol=1e-4, rtol=0)
    torch.testing.assert_close(clip.encode_text(TEXTS), expected.text_embeds, atol=1e-4, rtol=0)
    torch.testing.assert_close(logits, expected.logits_per_image, atol=1e-4, rtol=0)
    torch.testing.assert_close(per_text, expected.logits_per_text, atol=1e-4, rtol=0)
    # one text alone (no padding) gives the same embedding as in the padded batch
    torch.testing.assert_close(clip.encode_text(TEXTS[2:3])[0], clip.encode_text(TEXTS)[2])


def test_images_are_preprocessed_from_pil_bytes_and_paths(tmp_path):
    from PIL import Image

    clip, preprocess = load(write_tiny_clip(tmp_path / "clip"))
    image = Image.new("RGB", (64, 48), (200, 30, 30))
    image.paste((10, 10, 220), (40, 0, 64, 48))
    path = tmp_path / "x.png"
    image.save(path)
    pixels = preprocess(image)
    assert pixels.shape == (3, 32, 32)
    # the centre crop of a 43x32 resize: red on the left, blue on the right
    assert pixels[0, 16, 2] > pixels[2, 16, 2] and pixels[2, 16, 30] > pixels[0, 16, 30]
    torch.testing.assert_close(preprocess(path), pixels)
    torch.testing.assert_close(preprocess(path.read_bytes()), pixels)
    torch.testing.assert_close(clip.encode_image([image]), clip.encode_image(pixels[None]))


def _png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))


def test_bad_images_are_refused():
    from PIL import Image

    with pytest.raises(ImageError, match="not an image"):
        open_image(b"certainly not a picture")
    with pytest.raises(ImageError, match="more than 40000000 pixels"):
        open_image(_png_header(30000, 30000))
    with pytest.raises(ImageError, match="8000x8000: more than"):
        open_image(_png_header(8000, 8000))
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buffer, "PNG", compress_level=0)
    with pytest.raises(ImageError, match="truncated"):
        open_image(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ImageError, match="base64"):
        decode_data_url("data:image/png;base64,@@@@")
    with pytest.raises(ImageError, match="data URL"):
        decode_data_url("data:image/png,rawtext")
    assert decode_data_url("data:image/png;base64,aGk=") == b"hi"


def test_bad_checkpoints_are_refused(tmp_path):
    import json

    folder = write_tiny_clip(tmp_path / "clip")
    (folder / "tokenizer.json").rename(tmp_path / "tok.json")
    with pytest.raises(ModelFileError, match="no tokenizer.json"):
        load(folder)
    (tmp_path / "tok.json").rename(folder / "tokenizer.json")
    config = json.loads((folder / "config.json").read_text())
    config["vision_config"]["num_attention_heads"] = 5
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFileError, match="not a multiple"):
        load(folder)
    folder = write_tiny_clip(tmp_path / "clip2")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelFileError, match="cannot read the weights"):
        load(folder)

"""``kvforge serve --clip``: text and image embeddings equal the in-process model's, zero-shot
classification, bad images as 400s with the server still answering; the ``kvforge clip``
commands on a tiny model."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import httpx
import pytest
import torch

from kvforge.clip import load
from kvforge.clip.tasks import zero_shot
from kvforge.entrypoints.cli import main
from tests.clip_util import write_tiny_clip
from tests.server.conftest import start_server, stop_server


def _png(colour: tuple[int, int, int], size: tuple[int, int] = (40, 32)) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    image = Image.new("RGB", size, colour)
    image.paste((255, 255, 255), (4, 4, 12, 12))
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _huge_png_header() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))


@pytest.fixture(scope="module")
def clip_server(tmp_path_factory):
    folder = write_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")
    handle = start_server(tmp_path_factory.mktemp("log"), "--clip", str(folder))
    yield handle, load(folder)[0]
    stop_server(handle)


def test_embeddings_of_texts_and_images_equal_the_model(clip_server):
    handle, clip = clip_server
    red, blue = _png((200, 20, 20)), _png((20, 20, 200))
    body = {
        "model": "tiny-clip",
        "input": [
            {"type": "text", "text": "a red square"},
            {"type": "image_url", "image_url": {"url": _url(red)}},
            {"type": "image_url", "image_url": {"url": base64.b64encode(blue).decode()}},
        ],
    }
    reply = httpx.post(f"{handle.url}/v1/embeddings", json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    got = torch.tensor([d["embedding"] for d in reply.json()["data"]])
    torch.testing.assert_close(got[0], clip.encode_text(["a red square"])[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(got[1:], clip.encode_image([red, blue]), atol=1e-5, rtol=0)
    # plain strings with the CLIP model's name are CLIP text embeddings
    reply = httpx.post(
        f"{handle.url}/v1/embeddings", json={"model": "tiny-clip", "input": "blue"}, timeout=60
    )
    vector = torch.tensor(reply.json()["data"][0]["embedding"])
    torch.testing.assert_close(vector, clip.encode_text(["blue"])[0], atol=1e-5, rtol=0)
    ids = [m["id"] for m in httpx.get(f"{handle.url}/v1/models").json()["data"]]
    assert "tiny-clip" in ids


def test_classify_ranks_labels_as_zero_shot(clip_server):
    handle, clip = clip_server
    image = _png((30, 200, 30))
    labels = ["red circle", "green square", "blue triangle"]
    reply = httpx.post(
        f"{handle.url}/v1/classify", json={"image": _url(image), "labels": labels}, timeout=60
    )
    assert reply.status_code == 200, reply.text
    data = reply.json()["data"]
    expected = zero_shot(clip, [image], labels)[0].tolist()
    assert [d["label"] for d in data] == sorted(
        labels, key=lambda name: -expected[labels.index(name)]
    )
    for entry in data:
        assert abs(entry["probability"] - expected[labels.index(entry["label"])]) < 1e-5


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (_url(b"certainly not an image"), "not an image"),
        (_url(_huge_png_header()), "more than"),
        (_url(_png((1, 2, 3))[:60]), "truncated"),
        ("data:image/png;base64,@@@", "base64"),
    ],
)
def test_bad_images_get_400s(clip_server, image, message):
    handle, _ = clip_server
    for path, body in (
        ("/v1/classify", {"image": image, "labels": ["a", "b"]}),
        ("/v1/embeddings", {"input": [{"type": "image_url", "image_url": {"url": image}}]}),
    ):
        reply = httpx.post(f"{handle.url}{path}", json=body, timeout=60)
        assert reply.status_code == 400, reply.text
        assert message in reply.json()["error"]["message"]
    ok = httpx.post(
        f"{handle.url}/v1/classify", json={"image": _url(_png((9, 9, 9))), "labels": ["a"]}
    )
    assert ok.status_code == 200


def test_bad_classify_requests(clip_server):
    handle, _ = clip_server
    image = _url(_png((9, 9, 9)))
    for body, status in (
        ({"image": image, "labels": []}, 400),
        ({"image": image, "labels": ["a"], "templates": ["no slot"]}, 400),
        ({"image": image, "labels": ["a"], "model": "other"}, 404),
        ({"image": image, "labels": [" "]}, 400),
    ):
        reply = httpx.post(f"{handle.url}/v1/classify", json=body, timeout=60)
        assert reply.status_code == status, (body, reply.text)
        assert "error" in reply.json()


def test_clip_commands(tmp_path, capsys):
    """zero-shot, index + search and a short training run through the CLI."""
    import json

    from PIL import Image

    folder = write_tiny_clip(tmp_path / "clip")
    images = tmp_path / "images"
    images.mkdir()
    lines = []
    for i, (name, colour) in enumerate([("red", (220, 30, 30)), ("blue", (30, 30, 220))] * 4):
        Image.new("RGB", (32, 32), colour).save(images / f"{name}-{i}.png")
        lines.append(json.dumps({"image": f"{name}-{i}.png", "caption": f"a {name} square"}))
    (images / "captions.jsonl").write_text("\n".join(lines))
    assert (
        main(["clip", "zero-shot", str(folder), str(images / "red-0.png"), "--classes", "red,blue"])
        == 0
    )
    assert "red-0.png:" in capsys.readouterr().out
    index = tmp_path / "index.safetensors"
    assert main(["clip", "index", str(folder), str(images), "--out", str(index)]) == 0
    assert (
        main(
            [
                "clip",
                "search",
                str(folder),
                str(index),
                str(images / "blue-1.png"),
                "--image",
                "-k",
                "1",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.strip().endswith("blue-1.png")  # an image is its own nearest
    out = tmp_path / "trained"
    assert main(["clip", "train", str(images), str(out), "--steps", "3", "--batch-size", "4"]) == 0
    trained, _ = load(out)
    assert trained.encode_text(["a red square"]).shape == (1, 64)
    assert main(["clip", "zero-shot", str(folder), str(images / "red-0.png")]) == 2  # no classes
    assert main(["clip", "train", str(tmp_path / "missing"), str(out)]) == 2

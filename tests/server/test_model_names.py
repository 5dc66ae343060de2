"""Models by name from a local Hugging Face cache: a tiny HF model placed in a temporary cache
is served by its name; a GGUF repository's file by name and quantization; a missing name is a
one-line error that says how to fetch it; ``kvforge models`` lists them."""

from __future__ import annotations

import shutil

import httpx
import pytest

from kvforge.entrypoints.cli import main
from kvforge.errors import ModelNotFoundError
from kvforge.hub import resolve
from tests.models.tiny_checkpoints import write_checkpoint
from tests.server.conftest import start_server, stop_server

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _cache(tmp_path, monkeypatch):
    """An empty HF cache for this test (the environment is inherited by servers)."""
    hub = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hub


def _place(hub, repo: str, source) -> None:
    """Put ``source``'s files in the cache as snapshot COMMIT of ``repo`` (refs/main)."""
    folder = hub / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for path in source.iterdir():
        shutil.copy(path, snapshot / path.name)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(COMMIT)


def test_names_resolve_from_the_cache(tmp_path, monkeypatch):
    hub = _cache(tmp_path, monkeypatch)
    model = tmp_path / "tiny"
    write_checkpoint("llama", model)
    _place(hub, "TinyOrg/Tiny-Llama", model)
    gguf = tmp_path / "gguf"
    gguf.mkdir()
    (gguf / "tiny-Q4_K_M.gguf").write_bytes(b"GGUF")
    (gguf / "tiny-Q8_0.gguf").write_bytes(b"GGUF")
    _place(hub, "TinyOrg/Tiny-GGUF", gguf)
    assert resolve("TinyOrg/Tiny-Llama").endswith(COMMIT)
    assert resolve("TinyOrg/Tiny-GGUF:Q8_0").endswith("tiny-Q8_0.gguf")
    assert resolve("TinyOrg/Tiny-GGUF:q4_k_m").endswith("tiny-Q4_K_M.gguf")
    with pytest.raises(ModelNotFoundError, match="several GGUF files"):
        resolve("TinyOrg/Tiny-GGUF")
    with pytest.raises(ModelNotFoundError, match="no Q2_K file"):
        resolve("TinyOrg/Tiny-GGUF:Q2_K")
    with pytest.raises(ModelNotFoundError, match="huggingface-cli download Nobody/Nothing"):
        resolve("Nobody/Nothing")
    assert resolve(str(model)) == str(model)  # a path stays a path


def test_serve_by_name_and_list(tmp_path, monkeypatch, capsys):
    hub = _cache(tmp_path, monkeypatch)
    model = tmp_path / "tiny"
    write_checkpoint("llama", model)
    _place(hub, "TinyOrg/Tiny-Llama", model)
    assert main(["models"]) == 0
    assert "TinyOrg/Tiny-Llama  (hf" in capsys.readouterr().out
    assert main(["serve", "Nobody/Nothing"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "huggingface-cli download Nobody/Nothing" in err
    handle = start_server(tmp_path, "TinyOrg/Tiny-Llama")
    try:
        ids = [m["id"] for m in httpx.get(f"{handle.url}/v1/models").json()["data"]]
        assert ids == ["TinyOrg/Tiny-Llama"]
        body = {"model": "TinyOrg/Tiny-Llama", "prompt": "w5 w6", "max_tokens": 3}
        reply = httpx.post(f"{handle.url}/v1/completions", json=body, timeout=60)
        assert reply.status_code == 200, reply.text
    finally:
        stop_server(handle)

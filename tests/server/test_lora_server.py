"""LoRA adapters over HTTP: served by name, listed with their base, loaded and unloaded at run
time only when allowed, under the root, with the admin key; bad adapters get 4xx."""

from __future__ import annotations

import httpx
import pytest

from kvforge import LLM, LoRARequest, SamplingParams
from kvforge.entrypoints.cli import main
from tests.models.test_lora import write_adapter
from tests.models.tiny_checkpoints import write_checkpoint
from tests.server.conftest import start_server, stop_server

pytest.importorskip("peft")
ADMIN = {"X-Admin-Key": "admin-secret"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("base")
    reference = write_checkpoint("llama", base)
    root = tmp_path_factory.mktemp("adapters")
    for i in range(3):
        write_adapter(reference, root / f"a{i}", seed=20 + i).unload()
    outside = tmp_path_factory.mktemp("elsewhere")
    write_adapter(reference, outside / "x", seed=30).unload()
    logs = tmp_path_factory.mktemp("logs")
    handle = start_server(
        logs,
        str(base),
        "--served-model-name",
        "tiny",
        "--lora-modules",
        f"one={root / 'a0'}",
        "--lora-scaled",
        f"half={root / 'a0'}:0.5",
        "--allow-runtime-lora",
        "--lora-root",
        str(root),
        "--admin-key",
        "admin-secret",
        "--max-lora-rank",
        "8",
    )
    yield handle, base, root, outside
    stop_server(handle)


def complete(url, model, prompt="w5 w9 w17 w33"):
    body = {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0}
    return httpx.post(f"{url}/v1/completions", json={**body, "ignore_eos": True}, timeout=60)


def expected_text(base, lora, prompt="w5 w9 w17 w33"):
    llm = LLM(
        str(base), enable_lora=True, max_lora_rank=8, show_progress=False, kv_cache_memory="64MiB"
    )
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    return llm.generate(prompt, params, use_tqdm=False, lora_request=lora)[0].outputs[0].text


def test_adapters_are_served_by_name_and_listed(setup):
    handle, base, root, _ = setup
    models = httpx.get(f"{handle.url}/v1/models").json()["data"]
    by_id = {m["id"]: m for m in models}
    assert by_id["tiny"]["parent"] is None
    assert by_id["one"]["parent"] == "tiny" and by_id["half"]["parent"] == "tiny"
    texts = {name: complete(handle.url, name).json()["choices"][0]["text"] for name in by_id}
    assert texts["one"] == expected_text(base, LoRARequest("one", 1, str(root / "a0")))
    assert texts["half"] == expected_text(base, LoRARequest("h", 1, str(root / "a0"), 0.5))
    assert texts["tiny"] == expected_text(base, None)
    assert texts["one"] != texts["tiny"]
    chat = httpx.post(
        f"{handle.url}/v1/chat/completions",
        json={"model": "one", "messages": [{"role": "user", "content": "w7"}], "max_tokens": 4},
        timeout=60,
    )
    assert chat.status_code == 200 and chat.json()["model"] == "one"
    native = httpx.post(
        f"{handle.url}/generate",
        json={
            "text": "w5 w9 w17 w33",
            "lora_path": "one",
            "sampling_params": {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True},
        },
        timeout=60,
    )
    assert native.json()["text"] == texts["one"]
    assert complete(handle.url, "nope").status_code == 404


def test_runtime_load_and_unload(setup):
    handle, base, root, outside = setup
    url = handle.url
    body = {"lora_name": "two", "lora_path": str(root / "a1")}
    assert httpx.post(f"{url}/v1/load_lora_adapter", json=body).status_code == 401
    wrong = {"X-Admin-Key": "guess"}
    assert httpx.post(f"{url}/v1/load_lora_adapter", json=body, headers=wrong).status_code == 401
    escape = {"lora_name": "x", "lora_path": str(root / ".." / outside.name / "x")}
    response = httpx.post(f"{url}/v1/load_lora_adapter", json=escape, headers=ADMIN)
    assert response.status_code == 400 and "--lora-root" in response.json()["error"]["message"]
    missing = {"lora_name": "x", "lora_path": str(root / "missing")}
    response = httpx.post(f"{url}/v1/load_lora_adapter", json=missing, headers=ADMIN)
    assert (
        response.status_code == 400 and "no such directory" in response.json()["error"]["message"]
    )
    taken = {"lora_name": "one", "lora_path": str(root / "a1")}
    assert httpx.post(f"{url}/v1/load_lora_adapter", json=taken, headers=ADMIN).status_code == 400
    assert httpx.post(f"{url}/v1/load_lora_adapter", json=body, headers=ADMIN).status_code == 200
    assert "two" in {m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]}
    text = complete(url, "two").json()["choices"][0]["text"]
    assert text == expected_text(base, LoRARequest("two", 1, str(root / "a1")))
    unload = {"lora_name": "two"}
    assert (
        httpx.post(f"{url}/v1/unload_lora_adapter", json=unload, headers=ADMIN).status_code == 200
    )
    assert complete(url, "two").status_code == 404
    assert (
        httpx.post(f"{url}/v1/unload_lora_adapter", json=unload, headers=ADMIN).status_code == 404
    )
    assert complete(url, "one").status_code == 200  # the others still serve


def test_runtime_lora_needs_a_root_and_an_admin_key(capsys):
    assert main(["serve", "--allow-runtime-lora", "--kv-cache-memory", "16MiB"]) == 2
    assert "--lora-root" in capsys.readouterr().err
    assert main(["serve", "--lora-modules", "bad-spec", "--kv-cache-memory", "16MiB"]) == 2
    assert "name=path" in capsys.readouterr().err
    assert main(["serve", "--lora-scaled", "a=/x:notanumber"]) == 2
    assert "name=path:scale" in capsys.readouterr().err

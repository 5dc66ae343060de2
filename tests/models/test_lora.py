"""LoRA adapters: logits equal transformers + peft; batches mixing adapters equal each alone;
bad adapters are refused with one-line reasons."""

from __future__ import annotations

import json

import pytest
import torch

from kvforge import LoRARequest
from kvforge.config import LoRAConfig, ModelConfig
from kvforge.engine import LLMEngine
from kvforge.entrypoints.llm import engine_config
from kvforge.errors import InvalidRequestError
from kvforge.layers.attention import create_attention_backend, resolve_attention_backend
from kvforge.layers.forward_batch import ForwardBatch
from kvforge.layers.kv_cache import PagedKVCache
from kvforge.loader import load_model
from kvforge.lora.manager import LoRAManager
from kvforge.sampling_params import SamplingParams
from tests.helpers import run_to_completion
from tests.models.test_hf_tiny import kv_caches
from tests.models.tiny_checkpoints import VOCAB, write_checkpoint

peft = pytest.importorskip("peft")

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOLERANCE = 1e-3


def write_adapter(base, directory, seed, r=8, alpha=16, targets=ALL_TARGETS, **extra):
    """A random PEFT LoRA (B not zero) on ``base`` saved to ``directory``; returns the peft
    model (which wraps ``base`` in place: unload it before the next adapter)."""
    torch.manual_seed(seed)
    config = peft.LoraConfig(
        r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False, **extra
    )
    model = peft.get_peft_model(base, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.mul_(0.5)  # updates the size of the base's own
    model.save_pretrained(directory)
    return model


@pytest.fixture(scope="module", params=["llama", "qwen2", "gemma3"])
def base(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    reference = write_checkpoint(request.param, directory)
    return request.param, directory, reference


def forward_logits(loaded, ids, lora_batch):
    cfg = loaded.config
    kv = kv_caches(cfg, 16)
    with torch.inference_mode():
        batch = ForwardBatch.build([ids], [0], [list(range(12))], 4, torch.device("cpu"))
        batch.lora = lora_batch(len(ids))
        return loaded.model.compute_logits(loaded.model(batch, kv))


@pytest.mark.parametrize(
    "options",
    [{}, {"use_rslora": True, "r": 4, "alpha": 3}, {"targets": ["q_proj", "v_proj", "down_proj"]}],
    ids=["all-modules", "rslora", "some-modules"],
)
def test_logits_match_transformers_peft(base, tmp_path, options):
    arch, directory, reference = base
    peft_model = write_adapter(reference, tmp_path / "adapter", seed=5, **options)
    try:
        torch.manual_seed(1)
        ids = torch.randint(3, VOCAB, (30,)).tolist()
        with torch.inference_mode():
            expected = peft_model(torch.tensor([ids])).logits[0]
    finally:
        peft_model.unload()
    loaded = load_model(ModelConfig(model=str(directory)), create_attention_backend(), False)
    manager = LoRAManager(loaded.model, LoRAConfig(enabled=True, max_loras=2, max_lora_rank=8))
    manager.add(LoRARequest("a", 1, str(tmp_path / "adapter")))
    ours = forward_logits(loaded, ids, lambda n: manager.batch([1], [n]))
    assert (ours - expected).abs().max().item() <= TOLERANCE, arch
    base_logits = forward_logits(loaded, ids, lambda n: None)
    with torch.inference_mode():
        plain = reference(torch.tensor([ids])).logits[0]
    assert (base_logits - plain).abs().max().item() <= 1e-4
    assert (ours - base_logits).abs().max().item() > 1e-2  # the adapter changes something


@pytest.fixture(scope="module")
def llama_adapters(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama-base")
    reference = write_checkpoint("llama", directory)
    adapters = []
    for i in range(5):
        path = tmp_path_factory.mktemp(f"adapter{i}")
        write_adapter(reference, path, seed=10 + i, r=4 + 2 * (i % 3)).unload()
        adapters.append(LoRARequest(f"a{i}", i + 1, str(path)))
    return directory, adapters


def make_engine(directory, **kwargs):
    kwargs.setdefault("num_blocks", 128)
    config = engine_config(
        str(directory), block_size=4, show_progress=False, enable_lora=True, **kwargs
    )
    return LLMEngine(config)


GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
PROMPTS = [[0, 5, 9, 17, 33], [0, 44, 45, 46, 47, 48, 49], [0, 7, 7, 7], [0, 60, 61]]


def generate(engine, jobs):
    """jobs: (prompt, lora request or None); the token ids of each, in order."""
    ids = [engine.add_request(p, GREEDY, lora_request=lora) for p, lora in jobs]
    outputs = run_to_completion(engine, engine.scheduler.check_integrity)
    assert engine.kv_cache_manager.pool.num_in_use == 0
    return [outputs[i].outputs[0].token_ids for i in ids]


@pytest.mark.parametrize(
    "flags",
    [
        {},
        {"num_blocks": 16},
        {"speculative_method": "ngram", "speculative_disable_by_batch_size": 0},
        {"max_num_batched_tokens": 6},
    ],
    ids=["batch", "preemption", "ngram-drafts", "chunked"],
)
def test_a_batch_mixing_adapters_equals_each_alone(llama_adapters, flags):
    directory, adapters = llama_adapters
    jobs = [(PROMPTS[i % 4], lora) for i, lora in enumerate([None, *adapters[:4]])]
    jobs += [(PROMPTS[1], adapters[0]), (PROMPTS[1], None)]  # same prompt, other adapter
    reference = make_engine(directory)
    alone = [generate(reference, [job])[0] for job in jobs]
    engine = make_engine(directory, **flags)
    together = generate(engine, jobs)
    assert together == alone
    assert len({tuple(t) for t in alone[:5]}) >= 4  # adapters do change the output
    if "num_blocks" in flags:
        assert engine.num_preemptions > 0


def test_slots_swap_when_more_adapters_than_slots(llama_adapters):
    directory, adapters = llama_adapters
    reference = make_engine(directory, max_loras=4)
    jobs = [(PROMPTS[i % 4], lora) for i, lora in enumerate(adapters)]
    expected = generate(reference, jobs)
    # Two slots, three adapters kept in memory: requests wait for a slot, adapters reload.
    engine = make_engine(directory, max_loras=2, max_cpu_loras=3)
    admitted = []
    original = engine.scheduler._admit_waiting

    def spy(output, budget):
        budget = original(output, budget)
        admitted.append({r.lora_id for r in engine.scheduler.running} - {0})
        return budget

    engine.scheduler._admit_waiting = spy
    assert generate(engine, jobs) == expected
    assert max(len(a) for a in admitted) <= 2
    assert len(engine.runner.lora.loaded) <= 3


def test_prefix_cache_keeps_adapters_apart(llama_adapters):
    directory, adapters = llama_adapters
    engine = make_engine(directory)
    long_prompt = list(range(3, 40))
    first = generate(engine, [(long_prompt, adapters[0])])
    other = generate(engine, [(long_prompt, adapters[1])])
    base = generate(engine, [(long_prompt, None)])
    # Fresh engines: each alone, nothing cached from another adapter.
    for lora, tokens in [(adapters[0], first), (adapters[1], other), (None, base)]:
        assert generate(make_engine(directory), [(long_prompt, lora)]) == tokens


def bad(tmp_path, name, config=None, tensors=None):
    path = tmp_path / name
    path.mkdir()
    if config is not None:
        (path / "adapter_config.json").write_text(
            config if isinstance(config, str) else json.dumps(config)
        )
    if tensors is not None:
        from safetensors.torch import save_file

        save_file(tensors, str(path / "adapter_model.safetensors"))
    return str(path)


def lora_pair(module, r, inp, out):
    prefix = f"base_model.model.model.{module}"
    return {
        f"{prefix}.lora_A.weight": torch.randn(r, inp),
        f"{prefix}.lora_B.weight": torch.randn(out, r),
    }


def test_bad_adapters_are_refused_and_the_engine_goes_on(llama_adapters, tmp_path):
    directory, adapters = llama_adapters
    engine = make_engine(directory, max_lora_rank=8)
    good = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
    q = lora_pair("layers.0.self_attn.q_proj", 4, 64, 64)
    cases = {
        "no such directory": str(tmp_path / "missing"),
        "adapter_config.json is missing": bad(tmp_path, "noconfig", tensors=q),
        "adapter_model.safetensors": bad(tmp_path, "noweights", config=good),
        "not valid JSON": bad(tmp_path, "badjson", config="{", tensors=q),
        "above --max-lora-rank 8": bad(
            tmp_path, "rank", good, lora_pair("layers.0.self_attn.q_proj", 16, 64, 64)
        ),
        "the base model's is 64x64": bad(
            tmp_path, "shape", good, lora_pair("layers.0.self_attn.q_proj", 4, 32, 64)
        ),
        "no module 'layers.7.self_attn.q_proj'": bad(
            tmp_path, "layer", good, lora_pair("layers.7.self_attn.q_proj", 4, 64, 64)
        ),
        "is not supported (targets": bad(
            tmp_path, "embed", good, lora_pair("embed_tokens", 4, 64, 64)
        ),
        "modules_to_save": bad(tmp_path, "save", {**good, "modules_to_save": ["lm_head"]}, q),
        "use_dora is not supported": bad(tmp_path, "dora", {**good, "use_dora": True}, q),
        "lacks lora_B": bad(tmp_path, "half", good, {k: v for k, v in q.items() if "lora_A" in k}),
        "unreadable": bad(tmp_path, "corrupt", good),
    }
    (tmp_path / "corrupt" / "adapter_model.safetensors").write_bytes(b"\x00" * 40)
    for message, path in cases.items():
        with pytest.raises(InvalidRequestError, match=message.replace("(", r"\(")):
            engine.add_request(PROMPTS[0], GREEDY, lora_request=LoRARequest("x", 99, path))
    # The same id cannot change its path; the engine still serves adapters and the base.
    engine.add_request(PROMPTS[0], GREEDY, lora_request=adapters[0])
    with pytest.raises(InvalidRequestError, match="already"):
        engine.add_request(
            PROMPTS[0], GREEDY, lora_request=LoRARequest("y", 1, adapters[1].lora_path)
        )
    run_to_completion(engine)
    assert generate(engine, [(PROMPTS[0], adapters[0]), (PROMPTS[1], None)])


def test_lora_requests_need_lora_enabled(llama_adapters):
    directory, adapters = llama_adapters
    engine = LLMEngine(engine_config(str(directory), num_blocks=32, show_progress=False))
    with pytest.raises(InvalidRequestError, match="--enable-lora"):
        engine.add_request(PROMPTS[0], GREEDY, lora_request=adapters[0])
    for fields in [("", 1, "p"), ("a", 0, "p"), ("a", True, "p"), ("a", 1, "p", float("inf"))]:
        with pytest.raises(InvalidRequestError):
            LoRARequest(*fields)


@pytest.mark.slow
def test_embedded_model_with_an_adapter_matches_transformers_peft(smollm_path, tmp_path):
    from tests.helpers import load_transformers_gguf

    reference, tokenizer = load_transformers_gguf(smollm_path)
    peft_model = write_adapter(reference, tmp_path / "adapter", seed=3, r=8, alpha=16)
    ids = tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 3)
    with torch.inference_mode():
        expected = peft_model(torch.tensor([ids])).logits[0]
    peft_model.unload()
    lora = LoRARequest("a", 1, str(tmp_path / "adapter"))
    results = {}
    for dtype in ("float32", "auto"):  # the reference path and packed Q4_1 weights
        loaded = load_model(
            ModelConfig(model=smollm_path, dtype=dtype), create_attention_backend(), False
        )
        manager = LoRAManager.for_model(
            loaded.model, LoRAConfig(enabled=True, max_loras=1, max_lora_rank=8)
        )
        manager.add(lora)
        cfg = loaded.config
        blocks = list(range((len(ids) + 15) // 16))
        kv = [
            PagedKVCache.allocate(
                len(blocks),
                16,
                cfg.num_kv_heads,
                cfg.head_dim,
                loaded.kv_dtype,
                torch.device("cpu"),
            )
            for _ in range(cfg.num_layers)
        ]
        with torch.inference_mode():
            batch = ForwardBatch.build([ids], [0], [blocks], 16, torch.device("cpu"))
            batch.lora = manager.batch([1], [len(ids)])
            results[dtype] = loaded.model.compute_logits(loaded.model(batch, kv))
    assert (results["float32"] - expected).abs().max().item() <= TOLERANCE
    # Packed weights: the adapter's update on top of the 4-bit kernels keeps the argmax.
    agree = (results["auto"].argmax(-1) == expected.argmax(-1)).float().mean().item()
    assert agree >= 0.9, agree


def test_fused_layers_with_adapters_equal_the_per_op_path(smollm_path, llama_adapters, tmp_path):
    """Packed weights run every layer in the C++ decoder stack, LoRA included; forcing the
    Python per-op path gives the same logits."""
    backend = resolve_attention_backend("auto", torch.device("cpu"))
    loaded = load_model(ModelConfig(model=smollm_path), create_attention_backend(backend), False)
    manager = LoRAManager.for_model(
        loaded.model, LoRAConfig(enabled=True, max_loras=3, max_lora_rank=8)
    )
    model = loaded.model
    paths = []
    for seed in range(2):
        torch.manual_seed(seed)
        tensors = {}
        for i in range(len(model.layers)):
            for module, group in [
                ("q_proj", "self_attn"),
                ("v_proj", "self_attn"),
                ("down_proj", "mlp"),
            ]:
                linear, shard = model.lora_target(f"layers.{i}.{group}.{module}")
                tensors.update(
                    {
                        k: v * 0.05
                        for k, v in lora_pair(
                            f"layers.{i}.{group}.{module}",
                            8,
                            linear.in_features,
                            linear.shard_sizes[shard],
                        ).items()
                    }
                )
        config = {"r": 8, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}
        paths.append(bad(tmp_path, f"adapter{seed}", config, tensors))
    for i, path in enumerate(paths):
        manager.add(LoRARequest(f"a{i}", i + 1, path))
    if model.fused_stack() is None:
        pytest.skip("the C++ extension (fused decoder stack) is not built here")
    chunks = [list(range(100, 120)), list(range(200, 205)), list(range(300, 311))]
    lora_ids = [1, 0, 2]

    def logits():
        cfg = loaded.config
        kv = kv_caches(cfg, 32, block_size=16)
        tables = [[0, 1], [2], [3]]
        with torch.inference_mode():
            batch = ForwardBatch.build(chunks, [0, 0, 0], tables, 16, torch.device("cpu"))
            batch.lora = manager.batch(lora_ids, [len(c) for c in chunks])
            return model.compute_logits(model(batch, kv))

    fused = logits()
    model._stack, model._stack_checked = None, True
    for layer in model.layers:
        layer._fused, layer._fused_checked = None, True
    per_op = logits()
    assert (fused - per_op).abs().max().item() <= 1e-3
    lora_ids = [0, 0, 0]
    base = logits()
    for rows in (slice(0, 20), slice(25, 36)):  # the adapters change their requests only
        assert (per_op[rows] - base[rows]).abs().max().item() > 1e-2
    assert (per_op[20:25] - base[20:25]).abs().max().item() <= 1e-3


def test_an_adapter_in_use_cannot_be_unloaded(llama_adapters):
    directory, adapters = llama_adapters
    engine = make_engine(directory)
    engine.add_request(PROMPTS[0], GREEDY, lora_request=adapters[2])
    with pytest.raises(InvalidRequestError, match="in use by 1 request"):
        engine.remove_lora(adapters[2].lora_int_id)
    run_to_completion(engine)
    assert engine.remove_lora(adapters[2].lora_int_id)
    assert not engine.remove_lora(adapters[2].lora_int_id)
    # Loaded again after unloading, it gives the same tokens.
    assert generate(engine, [(PROMPTS[0], adapters[2])]) == generate(
        make_engine(directory), [(PROMPTS[0], adapters[2])]
    )


def test_merged_directory_gives_the_adapters_tokens(llama_adapters, tmp_path):
    from kvforge.entrypoints.cli import main

    directory, adapters = llama_adapters
    merged = tmp_path / "merged"
    assert main(["lora", "merge", str(directory), adapters[1].lora_path, str(merged)]) == 0
    with_adapter = generate(make_engine(directory), [(p, adapters[1]) for p in PROMPTS])
    config = engine_config(str(merged), block_size=4, num_blocks=128, show_progress=False)
    assert generate(LLMEngine(config), [(p, None) for p in PROMPTS]) == with_adapter


def test_merge_refuses_an_adapter_of_another_base(llama_adapters, tmp_path, capsys):
    from kvforge.entrypoints.cli import main

    directory, _ = llama_adapters
    config = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
    other = bad(tmp_path, "other", config, lora_pair("layers.0.self_attn.q_proj", 4, 32, 64))
    assert main(["lora", "merge", str(directory), other, str(tmp_path / "out")]) == 2
    assert "update is (64, 32)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_merged_gguf_gives_the_adapters_tokens(smollm_path, tmp_path):
    """The embedded Q4_1 file plus an adapter on every projection, merged to F32 GGUF (Q/K
    rows interleaved as llama.cpp stores them), decodes like the base with the adapter."""
    from kvforge import LLM

    lora = LLM(smollm_path, dtype="float32", enable_lora=True, max_lora_rank=4, show_progress=False)
    model = lora.engine.runner.model
    torch.manual_seed(0)
    tensors = {}
    for i in range(len(model.layers)):
        for group, names in (("self_attn", ALL_TARGETS[:4]), ("mlp", ALL_TARGETS[4:])):
            for name in names:
                module = f"layers.{i}.{group}.{name}"
                linear, shard = model.lora_target(module)
                pair = lora_pair(module, 4, linear.in_features, linear.shard_sizes[shard])
                tensors.update({k: v * 0.15 for k, v in pair.items()})
    adapter = bad(
        tmp_path, "adapter", {"r": 4, "lora_alpha": 4, "target_modules": ALL_TARGETS}, tensors
    )
    merged = str(tmp_path / "merged.gguf")
    from kvforge.tools.lora_merge import merge

    merge(smollm_path, adapter, merged, "F32", show_progress=False)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    prompts = ["The capital of France is", "def add(a, b):"]
    lora = LLM(smollm_path, dtype="float32", enable_lora=True, max_lora_rank=4, show_progress=False)
    expected = [
        o.outputs[0].token_ids
        for o in lora.generate(
            prompts, params, use_tqdm=False, lora_request=LoRARequest("a", 1, adapter)
        )
    ]
    base = LLM(smollm_path, dtype="float32", show_progress=False)
    plain = [o.outputs[0].token_ids for o in base.generate(prompts, params, use_tqdm=False)]
    assert expected != plain  # the adapter matters
    merged_llm = LLM(merged, dtype="float32", show_progress=False)
    got = [o.outputs[0].token_ids for o in merged_llm.generate(prompts, params, use_tqdm=False)]
    assert got == expected


def test_an_adapter_whose_files_vanish_fails_only_its_requests(llama_adapters, tmp_path):
    import shutil

    directory, adapters = llama_adapters
    copy = tmp_path / "copy"
    shutil.copytree(adapters[0].lora_path, copy)
    doomed = LoRARequest("doomed", 40, str(copy))
    # One slot and one adapter in memory: the next step must reload "doomed" from disk.
    engine = make_engine(directory, max_loras=1, max_cpu_loras=1)
    ids = [
        engine.add_request(PROMPTS[0], GREEDY, lora_request=doomed),
        engine.add_request(PROMPTS[1], GREEDY),
        engine.add_request(PROMPTS[2], GREEDY, lora_request=adapters[1]),  # evicts doomed
    ]
    shutil.rmtree(copy)
    outputs = run_to_completion(engine, engine.scheduler.check_integrity)
    assert outputs[ids[0]].error is not None and "no such directory" in outputs[ids[0]].error
    assert outputs[ids[1]].error is None and outputs[ids[2]].error is None
    assert len(outputs[ids[2]].outputs[0].token_ids) == GREEDY.max_tokens
    assert engine.kv_cache_manager.pool.num_in_use == 0
    assert len(engine.runner.lora.free_slots) + len(engine.runner.lora.slots) == 1


def test_a_llamacpp_gguf_adapter_equals_its_peft_source(llama_adapters):
    from pathlib import Path

    directory, _ = llama_adapters
    data = Path(__file__).resolve().parents[1] / "data" / "lora"
    loaded = load_model(ModelConfig(model=str(directory)), create_attention_backend(), False)
    manager = LoRAManager.for_model(
        loaded.model, LoRAConfig(enabled=True, max_loras=2, max_lora_rank=8)
    )
    manager.add(LoRARequest("peft", 1, str(data / "peft")))
    manager.add(LoRARequest("gguf", 2, str(data / "llamacpp-f32.gguf")))
    ids = [0, 5, 9, 17, 33, 40, 41]
    logits = {
        i: forward_logits(loaded, ids, lambda n, i=i: manager.batch([i], [n])) for i in (0, 1, 2)
    }
    assert (logits[1] - logits[2]).abs().max().item() <= 1e-4
    assert (logits[1] - logits[0]).abs().max().item() > 1e-2


def test_bad_gguf_adapters_are_refused(llama_adapters, smollm_path, tmp_path):
    directory, _ = llama_adapters
    engine = make_engine(directory)
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + b"\\x00" * 64)
    for path, message in [(smollm_path, "not a LoRA adapter"), (str(corrupt), "corrupt")]:
        with pytest.raises(InvalidRequestError, match=message):
            engine.add_request(PROMPTS[0], GREEDY, lora_request=LoRARequest("g", 7, path))

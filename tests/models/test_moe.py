"""Mixture of experts: tiny random Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE checkpoints written
by transformers match it from the HF directory and from GGUF files of our converter."""

from __future__ import annotations

import pytest
import torch

from kvforge.config import ModelConfig
from kvforge.engine import LLMEngine
from kvforge.entrypoints.llm import engine_config
from kvforge.layers.attention import create_attention_backend
from kvforge.layers.forward_batch import ForwardBatch
from kvforge.layers.moe import SparseMoE, load_balancing_loss, moe_reference, route, router_z_loss
from kvforge.loader import load_model
from kvforge.lora.adapter import TARGETS
from kvforge.lora.train import TrainableLoRA
from kvforge.runner import ModelRunner
from kvforge.sampling_params import SamplingParams
from kvforge.tools.convert import convert
from tests.helpers import run_to_completion
from tests.models.test_hf_tiny import kv_caches
from tests.models.tiny_checkpoints import BPE_VOCAB, MOE_ARCHS, write_checkpoint

pytest.importorskip("transformers")

LOGIT_TOLERANCE = 1e-4


@pytest.fixture(scope="module", params=MOE_ARCHS)
def checkpoint(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    reference = write_checkpoint(request.param, directory)
    gguf = directory.parent / f"{request.param}.gguf"
    convert(directory, gguf, "f32", show_progress=False)
    return directory, gguf, reference


def _load(path, **kwargs):
    return load_model(ModelConfig(model=str(path), **kwargs), create_attention_backend(), False)


def _logits(loaded, ids):
    """Teacher-forced logits of ``ids`` in two chunks over a paged cache."""
    kv = kv_caches(loaded.config, 16)
    blocks = list(range(14))
    cpu = torch.device("cpu")
    with torch.inference_mode():
        first = loaded.model(ForwardBatch.build([ids[:23]], [0], [blocks], 4, cpu), kv)
        second = loaded.model(ForwardBatch.build([ids[23:]], [23], [blocks], 4, cpu), kv)
        return loaded.model.compute_logits(torch.cat([first, second]))


@pytest.mark.parametrize("source", ["hf", "gguf"])
def test_logits_match_transformers(checkpoint, source):
    directory, gguf, reference = checkpoint
    loaded = _load(directory if source == "hf" else gguf, dtype="float32")
    assert loaded.config.num_experts > 0
    torch.manual_seed(3)
    ids = torch.randint(3, BPE_VOCAB, (40,)).tolist()
    with torch.inference_mode():
        ref = reference(torch.tensor([ids])).logits[0]
    assert (_logits(loaded, ids) - ref).abs().max().item() <= LOGIT_TOLERANCE


@pytest.mark.parametrize("source", ["hf", "gguf"])
def test_engine_greedy_matches_transformers(checkpoint, source):
    directory, gguf, reference = checkpoint
    path = directory if source == "hf" else gguf
    config = engine_config(str(path), block_size=4, num_blocks=64, show_progress=False)
    engine = LLMEngine(config, ModelRunner(config, _load(path, dtype="float32")))
    prompts = [[0, 5, 9, 17, 33], [0, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54]]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in prompts]
    outputs = run_to_completion(engine, engine.kv_cache_manager.check_integrity)
    for request_id, prompt in zip(ids, prompts, strict=True):
        tokens = list(prompt)
        with torch.inference_mode():
            for _ in range(12):
                tokens.append(int(reference(torch.tensor([tokens])).logits[0, -1].argmax()))
        assert outputs[request_id].outputs[0].token_ids == tokens[len(prompt) :]


def test_packed_gguf_experts_equal_dequantized(checkpoint, tmp_path):
    """Q8_0 experts stay packed (one quant method per expert and projection) and compute what
    the same file dequantized to float32 computes (the Q8_0 rounding itself moves routing of
    these random models, so the reference is the dequantized file)."""
    directory, _, _ = checkpoint
    q8 = tmp_path / "q8.gguf"
    convert(directory, q8, "q8_0", show_progress=False)
    packed = _load(q8)
    moe = next(m for m in packed.model.modules() if isinstance(m, SparseMoE))
    assert moe.experts.packed_gate_up is not None and moe.experts.gate_up_proj is None
    torch.manual_seed(4)
    ids = torch.randint(3, BPE_VOCAB, (40,)).tolist()
    ours, ref = _logits(packed, ids), _logits(_load(q8, dtype="float32"), ids)
    error = ((ours - ref).abs().max() / ref.abs().max()).item()
    assert error < 5e-3, error


def test_grouped_experts_equal_reference_loop(checkpoint):
    """The grouped (sorted by expert) execution equals one token at a time."""
    directory, _, _ = checkpoint
    loaded = _load(directory, dtype="float32")
    moe = next(m for m in loaded.model.modules() if isinstance(m, SparseMoE))
    x = torch.randn(37, loaded.config.hidden_size)
    with torch.inference_mode():
        torch.testing.assert_close(moe(x), moe_reference(moe, x), rtol=1e-4, atol=1e-5)


def test_expert_stats_count_every_routed_token(checkpoint):
    directory, _, _ = checkpoint
    loaded = _load(directory, dtype="float32")
    moes = [m for m in loaded.model.modules() if isinstance(m, SparseMoE)]
    ids = list(range(3, 43))
    _logits(loaded, ids)
    for moe in moes:
        tokens, entropy = moe.stats.snapshot()
        assert sum(tokens) == len(ids) * moe.top_k
        assert 0 < entropy <= torch.log(torch.tensor(float(moe.num_experts))).item() + 1e-6


def test_routing_options():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 3.0, 1.0]])
    softmax = route(logits, 2, "softmax", renormalize=False)
    probs = torch.softmax(logits, -1)
    assert softmax.expert_ids.tolist() == [[0, 1], [2, 3]]
    torch.testing.assert_close(softmax.weights, probs.topk(2).values)
    renorm = route(logits, 2, "softmax", renormalize=True)
    torch.testing.assert_close(renorm.weights.sum(-1), torch.ones(2))
    torch.testing.assert_close(renorm.weights, torch.softmax(logits.topk(2).values, -1))
    switch = route(logits, 1, "softmax", renormalize=False)  # Switch Transformer: top-1
    torch.testing.assert_close(switch.weights[:, 0], probs.max(-1).values)
    sigmoid = route(logits, 2, "sigmoid", renormalize=False)
    torch.testing.assert_close(sigmoid.weights, torch.sigmoid(logits).topk(2).values)


def test_aux_losses():
    uniform = torch.zeros(64, 8)
    assert load_balancing_loss(uniform, 2).item() == pytest.approx(1.0, abs=1e-5)
    collapsed = torch.zeros(64, 8)
    collapsed[:, 0] = 10.0  # every token to expert 0
    assert load_balancing_loss(collapsed, 1).item() > 7.0
    assert router_z_loss(uniform).item() == pytest.approx(torch.log(torch.tensor(8.0)).item() ** 2)
    logits = torch.randn(16, 8, requires_grad=True)
    (load_balancing_loss(logits, 2) + router_z_loss(logits)).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_training_forward_and_router_losses(checkpoint):
    """The differentiable training forward runs the experts (LoRA on attention only in mixture
    layers) and equals transformers; the router losses carry gradients into the adapter."""
    directory, _, reference = checkpoint
    loaded = _load(directory, dtype="float32")
    lora = TrainableLoRA(loaded.model, TARGETS, rank=4, alpha=8.0)
    dense_mlps = sum(1 for layer in loaded.model.layers if not isinstance(layer.mlp, SparseMoE))
    assert len(lora.pairs) == len(loaded.model.layers) * 4 + dense_mlps * 3
    torch.manual_seed(5)
    ids = torch.randint(3, BPE_VOCAB, (2, 12))
    logits = lora(ids)
    with torch.no_grad():
        ref = reference(ids).logits
    assert (logits - ref).abs().max().item() <= LOGIT_TOLERANCE
    losses = lora.router_losses()
    assert losses is not None
    balance, z = losses
    assert balance.item() >= 0.99 and z.item() > 0  # X * sum f P >= 1 up to rounding
    (logits.logsumexp(-1).mean() + balance + z).backward()
    assert all(p.grad is not None for p in lora.b.values())


def test_server_metrics_report_experts(checkpoint, tmp_path):
    import httpx

    from tests.server.conftest import start_server, stop_server

    directory, _, _ = checkpoint
    if directory.name.rstrip("0123456789") != "mixtral":
        pytest.skip("one architecture is enough for the HTTP path")
    server = start_server(tmp_path, "--model", str(directory))
    try:
        body = {"prompt": "the quick brown fox", "max_tokens": 5, "ignore_eos": True}
        reply = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
        assert reply.status_code == 200, reply.text
        text = httpx.get(f"{server.url}/metrics", timeout=30).text
    finally:
        stop_server(server)
    counts = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("kvforge:moe_expert_tokens_total{") and 'layer="0"' in line
    ]
    assert len(counts) == 4 and sum(counts) >= 2 * 5  # >= (prompt + 5 tokens) x top-2
    assert 'kvforge:moe_router_entropy{layer="1"}' in text


@pytest.mark.slow  # ~30-60 s each: the upcycled files hold 4-8 copies of every MLP
@pytest.mark.parametrize(("experts", "active"), [(4, 4), (8, 2)])
def test_upcycled_embedded_model_generates_the_dense_tokens(tmp_path, experts, active):
    """Real weights through the MoE path: the embedded model's MLPs as identical experts with a
    random router (renormalised top-k weights sum to 1) generate exactly the dense tokens."""
    from kvforge.config import default_model_path
    from kvforge.entrypoints.cli import main
    from kvforge.entrypoints.llm import LLM

    out = tmp_path / f"up-{experts}x{active}.gguf"
    args = ["moe", "upcycle", default_model_path(), str(out), "--experts", str(experts)]
    assert main([*args, "--active", str(active)]) == 0
    prompts = [
        [{"role": "user", "content": "Write a haiku about the sea."}],
        [{"role": "user", "content": "What is 17 times 3? Explain."}],
    ]
    params = SamplingParams(temperature=0, max_tokens=40)
    dense = LLM(default_model_path(), show_progress=False).chat(prompts, params)
    moe_llm = LLM(str(out), show_progress=False)
    assert moe_llm.engine.runner.loaded.config.num_experts == experts
    routed = moe_llm.chat(prompts, params)
    for a, b in zip(dense, routed, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
    counts = moe_llm.engine.runner.model.expert_stats()[0][1]
    assert sum(counts) > 0 and (active == experts or min(counts) < max(counts))


def test_upcycle_refuses_bad_input(tmp_path):
    from kvforge.config import default_model_path
    from kvforge.errors import InvalidRequestError
    from kvforge.tools.upcycle import upcycle

    with pytest.raises(InvalidRequestError):
        upcycle(default_model_path(), tmp_path / "x.gguf", 4, 5, show_progress=False)
    once = tmp_path / "once.gguf"
    upcycle(default_model_path(), once, 2, show_progress=False)
    with pytest.raises(InvalidRequestError, match="already"):
        upcycle(once, tmp_path / "twice.gguf", 2, show_progress=False)


def test_bad_expert_configs_fail_at_load(tmp_path):
    """Experts per token beyond the experts, a 3-D tensor with fewer experts than the
    metadata says: one-line ModelFileErrors at load, never a crash in a forward."""
    import json
    import shutil

    from kvforge.errors import ModelFileError

    good = tmp_path / "good"
    write_checkpoint("mixtral", good)
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    config = json.loads((bad / "config.json").read_text())
    config["num_experts_per_tok"] = 9
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFileError, match="experts per token"):
        _load(bad)
    with pytest.raises(ModelFileError, match="experts per token"):  # convert checks too
        convert(bad, tmp_path / "bad.gguf", "f32", show_progress=False)
    config["num_experts_per_tok"], config["num_local_experts"] = 2, 6  # the files hold 4
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFileError):
        _load(bad)
    # NaN router weights
    from safetensors.torch import load_file, save_file

    config["num_local_experts"] = 4
    (bad / "config.json").write_text(json.dumps(config))
    for shard in sorted(bad.glob("*.safetensors")):
        tensors = load_file(shard)
        routers = [k for k in tensors if k.endswith("block_sparse_moe.gate.weight")]
        if routers:
            tensors[routers[0]][0, 0] = float("nan")
            save_file(tensors, shard, metadata={"format": "pt"})
            break
    with pytest.raises(ModelFileError, match="not finite"):
        _load(bad)
    shutil.rmtree(bad)
    shutil.copytree(good, bad)
    # a string where a boolean belongs would read as true
    config["num_local_experts"], config["norm_topk_prob"] = 4, "false"
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFileError, match="must be a boolean"):
        _load(bad)


def test_hostile_configs_and_formats(tmp_path):
    """Findings of an attack on the MoE paths, each kept as a check."""
    import json
    import shutil

    from kvforge.entrypoints.cli import main
    from kvforge.errors import InvalidRequestError, ModelFileError

    good = tmp_path / "mixtral"
    write_checkpoint("mixtral", good)
    # non-integer counts: a one-line error at load, never a TypeError in a forward
    for key, value in (("num_experts_per_tok", 1.5), ("num_local_experts", "4")):
        bad = tmp_path / f"bad-{key}"
        shutil.copytree(good, bad)
        config = json.loads((bad / "config.json").read_text())
        config[key] = value
        (bad / "config.json").write_text(json.dumps(config))
        with pytest.raises(ModelFileError, match="integers"):
            _load(bad)
        with pytest.raises(ModelFileError):  # convert checks before writing anything
            convert(bad, tmp_path / "never.gguf", "f32", show_progress=False)
        assert not (tmp_path / "never.gguf").exists()
    # on-load quantization reaches Mixtral's w1 / w2 / w3 experts
    int8 = _load(good, quantization="int8", quantization_group_size=16)
    moe = next(m for m in int8.model.modules() if isinstance(m, SparseMoE))
    assert moe.experts.packed_gate_up is not None and moe.experts.packed_down is not None
    # packed Q8_0 experts with bfloat16 activations keep the kernel's scale dtypes
    q8 = tmp_path / "q8.gguf"
    convert(good, q8, "q8_0", show_progress=False)
    llm_bf16 = _load(q8, dtype="bfloat16")
    ids = list(range(3, 43))
    assert torch.isfinite(_logits(llm_bf16, ids)).all()
    # no tokens: an empty result, not an error
    with torch.inference_mode():
        assert moe(torch.empty(0, int8.config.hidden_size)).shape == (0, int8.config.hidden_size)
    # output folders that do not exist; a negative router seed
    with pytest.raises(InvalidRequestError, match="does not exist"):
        convert(good, tmp_path / "no" / "x.gguf", "f32", show_progress=False)
    assert main(["moe", "upcycle", str(q8), str(tmp_path / "u.gguf"), "--seed", "-1"]) != 0


def test_finetune_with_nothing_to_train_is_refused(checkpoint):
    from kvforge.errors import InvalidRequestError

    directory, _, _ = checkpoint
    loaded = _load(directory, dtype="float32")
    if not all(isinstance(layer.mlp, SparseMoE) for layer in loaded.model.layers):
        pytest.skip("a dense layer takes gate_proj")
    with pytest.raises(InvalidRequestError, match="no LoRA targets"):
        TrainableLoRA(loaded.model, ("gate_proj",), rank=4, alpha=8.0)

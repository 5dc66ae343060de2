"""The packed default path against the float32 reference on the embedded model, and on-load
int8/int4 quantization of a float checkpoint."""

from __future__ import annotations

import os

import pytest
import torch

from kvforge.entrypoints.llm import engine_config
from kvforge.layers.quantization import Int4PackedMethod, QuantGemmMethod
from kvforge.ops.extension import load_extension
from kvforge.runner import ModelRunner
from kvforge.tools.text import machine_text

NUM_TOKENS = 2048


def _runner(loaded, path):  # type: ignore[no-untyped-def]
    return ModelRunner(engine_config(path, num_blocks=8, show_progress=False), loaded)


def _logprobs(runner: ModelRunner, ids: list[int], ctx: int = 512) -> torch.Tensor:
    return torch.cat(
        [runner.score(ids[i : i + ctx]).log_softmax(-1) for i in range(0, len(ids), ctx)]
    )


# 512-token passes run the float GEMM on dequantized tiles, 64-token passes quant_gemm's int16
# activations (the decode path): both must agree with float32.
@pytest.mark.parametrize("ctx", [512, 64])
def test_packed_default_agrees_with_float32(smollm, smollm_packed, smollm_path, ctx):
    ids = smollm.tokenizer.encode(machine_text(min_chars=6 * NUM_TOKENS))[:NUM_TOKENS]
    assert len(ids) == NUM_TOKENS
    base = _logprobs(_runner(smollm, smollm_path), ids, ctx)
    packed = _logprobs(_runner(smollm_packed, smollm_path), ids, ctx)
    kld = float((base.exp() * (base - packed)).sum(-1).mean())
    top1 = float((base.argmax(-1) == packed.argmax(-1)).float().mean())
    print(f"packed vs float32, {ctx}-token passes: top-1 {top1:.4f}, mean KLD {kld:.5f}")
    assert top1 >= 0.98
    assert kld <= 0.01


def test_packed_weights_stay_packed_and_small(smollm_packed, smollm_path):
    layer = smollm_packed.model.layers[0]
    # the C++ quant_gemm when the extension builds, else ATen's int4 kernel
    assert isinstance(layer.self_attn.qkv_proj.quant, (QuantGemmMethod, Int4PackedMethod))
    assert layer.self_attn.qkv_proj.weight is None
    ratio = smollm_packed.weight_bytes / os.path.getsize(smollm_path)
    print(f"resident weights {smollm_packed.weight_bytes / 2**20:.1f} MiB = {ratio:.2f}x the file")
    assert ratio <= 1.3


def test_packed_engine_answers(smollm_packed, smollm_path):
    from kvforge.engine import LLMEngine
    from kvforge.sampling_params import SamplingParams
    from tests.helpers import run_to_completion

    config = engine_config(smollm_path, num_blocks=64, show_progress=False)
    engine = LLMEngine(config, ModelRunner(config, smollm_packed))
    prompt = engine.tokenizer.encode_chat(
        [{"role": "user", "content": "What is the capital of France?"}]
    )
    engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=16))
    (output,) = run_to_completion(engine).values()
    assert "Paris" in output.outputs[0].text


@pytest.mark.parametrize(
    ("method", "group", "symmetric"),
    [
        ("int8", None, True),
        ("int8", 32, False),
        ("int4", 32, True),
        ("int4", 64, False),
        ("fp8", None, True),
        ("fp8", 32, True),
    ],
)
def test_on_load_quantization_of_hf_checkpoint(tmp_path, method, group, symmetric):
    """The packed model equals transformers running the same round-to-nearest weights."""
    from kvforge.config import ModelConfig
    from kvforge.layers.attention import create_attention_backend
    from kvforge.loader import load_model
    from kvforge.quant.rtn import quantize_rtn
    from tests.models.tiny_checkpoints import write_checkpoint

    reference = write_checkpoint("llama", tmp_path)
    config = ModelConfig(
        model=str(tmp_path),
        quantization=method,
        quantization_group_size=group,
        quantization_symmetric=symmetric,
    )
    loaded = load_model(config, create_attention_backend(), False)
    assert loaded.model.layers[0].mlp.down_proj.quant is not None
    config = engine_config(str(tmp_path), num_blocks=16, block_size=4, show_progress=False)
    ids = list(range(3, 40))
    ours = ModelRunner(config, loaded).score(ids).log_softmax(-1)
    with torch.inference_mode():
        exact = reference(torch.tensor([ids])).logits[0].log_softmax(-1)
        for name, module in reference.named_modules():
            if isinstance(module, torch.nn.Linear) and name.endswith("_proj"):
                fake = quantize_rtn(module.weight, method, group, symmetric).dequantize()
                module.weight.copy_(fake)
        same_weights = reference(torch.tensor([ids])).logits[0].log_softmax(-1)
    kld_same = float((same_weights.exp() * (same_weights - ours)).sum(-1).mean())
    kld_exact = float((exact.exp() * (exact - ours)).sum(-1).mean())
    print(
        f"{method} group={group} symmetric={symmetric}: KLD vs same weights {kld_same:.5f}, "
        f"vs float {kld_exact:.5f}"
    )
    assert kld_same < 5e-3  # only the kernels' bf16 rounding differs
    if method == "int8":
        assert kld_exact < 0.01
    if method == "fp8":  # 3 mantissa bits: between int8 and int4 (0.55-0.7) on this model
        assert kld_exact < 0.1


def test_quantization_rejects_bad_group(tmp_path):
    from kvforge.config import ModelConfig
    from kvforge.errors import InvalidRequestError
    from kvforge.layers.attention import create_attention_backend
    from kvforge.loader import load_model
    from tests.models.tiny_checkpoints import write_checkpoint

    write_checkpoint("llama", tmp_path)
    config = ModelConfig(model=str(tmp_path), quantization="int4", quantization_group_size=48)
    with pytest.raises(InvalidRequestError, match="group size"):
        load_model(config, create_attention_backend(), False)


@pytest.mark.parametrize("num_tokens", [300, 48])  # the float GEMM, quant_gemm's int16 kernel
def test_fused_decoder_layer_equals_the_per_op_path(smollm_packed, smollm_path, num_tokens):
    """The C++ decoder_stack and decoder_layer run the same kernels in the same order as the
    module path."""
    model = smollm_packed.model
    layers = model.layers
    if layers[0].fused_linears() is None:
        pytest.skip("the fused layer needs the C++ extension and the cpu_paged backend")
    ids = list(range(100, 100 + num_tokens))
    runner = _runner(smollm_packed, smollm_path)
    stacked = runner.score(ids)
    assert model.fused_stack() is not None
    saved_stack = (model._stack, model._stack_checked)
    saved = [(layer._fused, layer._fused_checked) for layer in layers]
    try:
        model._stack, model._stack_checked = None, True
        layer_by_layer = runner.score(ids)
        for layer in layers:
            layer._fused, layer._fused_checked = None, True
        per_op = runner.score(ids)
    finally:
        model._stack, model._stack_checked = saved_stack
        for layer, (linears, checked) in zip(layers, saved, strict=True):
            layer._fused, layer._fused_checked = linears, checked
    assert torch.equal(stacked, layer_by_layer)
    torch.testing.assert_close(layer_by_layer, per_op, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 4])  # decode, and 3 requests x 4 tokens in a step
def test_decode_team_equals_the_layer_by_layer_path(smollm_packed, smollm_path, chunk):
    """decoder_stack at up to 16 tokens runs every layer in one parallel region (threads split
    each op and meet at barriers): the same kernels in the same order per row, so the logits
    equal decoder_layer's, layer by layer, bit for bit (several requests, chunked steps)."""
    model = smollm_packed.model
    if model.layers[0].fused_linears() is None:
        pytest.skip("the fused layer needs the C++ extension and the cpu_paged backend")
    runner = ModelRunner(
        engine_config(smollm_path, num_blocks=64, show_progress=False), smollm_packed
    )
    sequences = [list(range(100, 140)), list(range(500, 517)), list(range(900, 933))]
    if model.layers[0].self_attn.qkv_proj.quant.qs.dim() != 4:
        pytest.skip("the team path runs the interleaved layout (VNNI builds)")
    assert 3 * chunk <= load_extension().module.decoder_team_max_tokens
    team = runner.score_many(sequences, chunk)
    assert model.fused_stack() is not None
    saved = (model._stack, model._stack_checked)
    try:
        model._stack, model._stack_checked = None, True
        layer_by_layer = runner.score_many(sequences, chunk)
    finally:
        model._stack, model._stack_checked = saved
    for a, b in zip(team, layer_by_layer, strict=True):
        assert torch.equal(a, b)

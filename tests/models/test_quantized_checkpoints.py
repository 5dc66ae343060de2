"""Checkpoints quantized by other tools load by path with no flag.

The compressed-tensors folders in tests/data/quantized were written by llm-compressor's own
GPTQ, AWQ and round-to-nearest modifiers (``make_fixtures.py`` there); the reference is
transformers + compressed-tensors decompressing the same folder to float weights.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kvforge.config import ModelConfig
from kvforge.errors import InvalidRequestError, ModelFileError, UnsupportedModelError
from kvforge.layers.attention import create_attention_backend
from kvforge.layers.forward_batch import ForwardBatch
from kvforge.layers.quantization import Fp8Method, PermutedMethod, create_quant_method
from kvforge.loader import load_model
from kvforge.loader.quantized import _unpack_stream
from kvforge.quant.formats import Unpacked
from tests.models.test_hf_tiny import kv_caches
from tests.models.tiny_checkpoints import VOCAB, write_checkpoint

DATA = Path(__file__).parent.parent / "data" / "quantized"
COMPRESSED = [
    "gptq-w4a16-actorder",
    "gptq-w8a16",
    "awq-w4a16-asym",
    "fp8-dynamic",
    "fp8-static",
    "int8-w8a8",
]
# the dequantized float32 path computes what the reference computes; the packed kernels
# quantize activations to int16 and keep bf16 scales (measured 1.5e-3..2e-3 on logits of ~7.6)
FLOAT_TOLERANCE = 1e-4
PACKED_TOLERANCE = 5e-3


def logits(path: Path | str, ids: list[int], **options: object) -> torch.Tensor:
    loaded = load_model(ModelConfig(model=str(path), **options), create_attention_backend(), False)
    kv = kv_caches(loaded.config, 12)
    with torch.inference_mode():
        batch = ForwardBatch.build([ids], [0], [list(range(10))], 4, torch.device("cpu"))
        return loaded.model.compute_logits(loaded.model(batch, kv))


def reference_logits(path: Path, ids: list[int]) -> torch.Tensor:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("compressed_tensors")
    from transformers.utils.quantization_config import CompressedTensorsConfig

    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)
    )
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0]


PROMPT = torch.randint(3, VOCAB, (40,), generator=torch.Generator().manual_seed(3)).tolist()


@pytest.mark.parametrize("name", COMPRESSED)
def test_compressed_tensors_match_the_reference(name):
    path = DATA / name
    ref = reference_logits(path, PROMPT)
    dequantized = logits(path, PROMPT, dtype="float32")
    assert (dequantized - ref).abs().max().item() <= FLOAT_TOLERANCE
    packed = logits(path, PROMPT)
    assert (packed - ref).abs().max().item() <= PACKED_TOLERANCE
    assert torch.equal(packed.argmax(-1), ref.argmax(-1))


def test_packed_layers_stay_packed():
    layer = load_model(
        ModelConfig(model=str(DATA / "fp8-dynamic")), create_attention_backend(), False
    ).model.layers[0]
    assert isinstance(layer.self_attn.qkv_proj.quant, Fp8Method)
    awq = load_model(
        ModelConfig(model=str(DATA / "awq-w4a16-asym")), create_attention_backend(), False
    )
    assert awq.is_packed and awq.model.layers[0].mlp.down_proj.weight is None


def test_act_order_columns_are_gathered():
    """Codes stored sorted by group with the permutation: the method gathers input columns."""
    torch.manual_seed(0)
    out, cols, group = 48, 128, 32
    g_idx = torch.randperm(cols) % (cols // group)
    perm = torch.argsort(g_idx, stable=True)
    codes = torch.randint(-8, 8, (out, cols), dtype=torch.int8)
    scales = torch.rand(out, cols // group) + 0.1
    unpacked = Unpacked(codes[:, perm], scales, None, group, perm)
    expected = codes.float() * scales[:, g_idx]
    assert torch.allclose(unpacked.dequantize(), expected)
    method = create_quant_method(unpacked, torch.device("cpu"))
    assert isinstance(method, PermutedMethod)
    x = torch.randn(3, cols)
    assert torch.allclose(method(x), x @ expected.T, rtol=1e-2, atol=2e-2)


def test_dense_bit_streams_unpack():
    """3- and 5-bit codes run across int32 words (compressed-tensors' dense packing)."""
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    for bits in (3, 5, 6):
        high = 1 << (bits - 1)
        codes = torch.randint(-high, high, (5, 70), dtype=torch.int8)
        packed = helpers.pack_to_int32(codes, bits)
        assert torch.equal(_unpack_stream(packed, bits, 70) - high, codes.to(torch.int32))


def _copy(name: str, tmp_path: Path) -> Path:
    folder = tmp_path / name
    shutil.copytree(DATA / name, folder)
    return folder


def _set_config(folder: Path, edit) -> None:  # type: ignore[no-untyped-def]
    config = json.loads((folder / "config.json").read_text())
    edit(config["quantization_config"])
    (folder / "config.json").write_text(json.dumps(config))


def _load_error(folder: Path) -> str:
    with pytest.raises((ModelFileError, UnsupportedModelError)) as info:
        load_model(ModelConfig(model=str(folder)), create_attention_backend(), False)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_bad_quantization_configs_name_the_field(tmp_path):
    folder = _copy("gptq-w4a16-actorder", tmp_path)
    cases = [
        (lambda q: q.update(quant_method="squeezellm"), "'squeezellm'"),
        (lambda q: q.update(quant_method="gptq", bits=3), "quantization_config.bits 3"),
        (lambda q: q.update(quant_method="gptq", bits=4, sym="false"), "quantization_config.sym"),
        (
            lambda q: q.update(quant_method="gptq", bits=4, checkpoint_format="marlin"),
            "checkpoint_format",
        ),
        (lambda q: q.update(quant_method="awq", bits=8), "quantization_config.bits 8"),
        (lambda q: q.update(quant_method="awq", bits=4, version="gemv"), "version"),
        (lambda q: q.update(sparsity_config={"format": "sparse-24-bitmask"}), "sparsity_config"),
        (lambda q: q.update(config_groups={}), "config_groups"),
    ]
    original = json.loads((folder / "config.json").read_text())
    for edit, expected in cases:
        (folder / "config.json").write_text(json.dumps(original))
        _set_config(folder, edit)
        assert expected in _load_error(folder)
    for key, value, expected in [
        ("format", "marlin-24", "config_groups.group_0.format"),
        ("weights", None, "config_groups.group_0.weights"),
    ]:
        (folder / "config.json").write_text(json.dumps(original))
        _set_config(folder, lambda q, k=key, v=value: q["config_groups"]["group_0"].update({k: v}))
        assert expected in _load_error(folder)
    (folder / "config.json").write_text(json.dumps(original))
    _set_config(folder, lambda q: q["config_groups"]["group_0"]["weights"].update(num_bits=12))
    assert "num_bits 12" in _load_error(folder)


def test_missing_and_wrong_tensors_name_the_layer(tmp_path):
    folder = _copy("awq-w4a16-asym", tmp_path)
    tensors = load_file(folder / "model.safetensors")
    metadata = {"format": "pt"}
    del tensors["model.layers.1.mlp.up_proj.weight_scale"]
    save_file(tensors, folder / "model.safetensors", metadata)
    message = _load_error(folder)
    assert "model.layers.1.mlp.up_proj" in message and "weight_scale" in message
    tensors = load_file(DATA / "awq-w4a16-asym" / "model.safetensors")
    tensors["model.layers.0.self_attn.o_proj.weight_shape"] = torch.tensor([64, 4096])
    save_file(tensors, folder / "model.safetensors", metadata)
    assert "model.layers.0.self_attn.o_proj" in _load_error(folder)


def test_on_load_quantization_of_a_quantized_checkpoint_is_refused():
    with pytest.raises(InvalidRequestError, match="already quantized"):
        load_model(
            ModelConfig(model=str(DATA / "gptq-w8a16"), quantization="int8"),
            create_attention_backend(),
            False,
        )


def test_float_checkpoints_are_unchanged(tmp_path):
    """A checkpoint without quantization_config still loads through the float path."""
    write_checkpoint("llama", tmp_path / "float")
    loaded = load_model(
        ModelConfig(model=str(tmp_path / "float")), create_attention_backend(), False
    )
    assert not loaded.is_packed


# Written by GPTQModel and AutoAWQ themselves (make_gptq_fixtures.py); reference.safetensors
# holds the logits of the tool's own loader on CPU. AutoAWQ's layers compute in float16
# (inputs and weights rounded), hence its wider tolerance.
TOOL_FIXTURES = {"gptq-v1-desc-act": 1e-4, "gptq-v1-asym-8bit": 1e-4, "awq-gemm": 2e-2}


@pytest.mark.parametrize("name", list(TOOL_FIXTURES))
def test_gptq_and_awq_checkpoints_match_their_tools(name):
    reference = load_file(DATA / f"{name}.reference.safetensors")
    ids = reference["input_ids"][0].tolist()
    expected = reference["logits"][0]
    dequantized = logits(DATA / name, ids, dtype="float32")
    assert (dequantized - expected).abs().max().item() <= TOOL_FIXTURES[name]
    packed = logits(DATA / name, ids)
    assert (packed - expected).abs().max().item() <= TOOL_FIXTURES[name] + PACKED_TOLERANCE


def test_act_order_checkpoint_keeps_its_permutation():
    loaded = load_model(
        ModelConfig(model=str(DATA / "gptq-v1-desc-act")), create_attention_backend(), False
    )
    assert isinstance(loaded.model.layers[0].self_attn.qkv_proj.quant, PermutedMethod)

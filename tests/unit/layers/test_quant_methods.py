"""Packed-weight matmuls equal dequantize-then-matmul within bf16 tolerance, for every format,
with the C++ ``quant_gemm`` (the default on CPU) and with the ATen fallback methods."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGUFReader

from kvforge.layers.linear import MergedLinear, VocabEmbedding
from kvforge.layers.quantization import (
    BlockInt8Method,
    Fp8Method,
    Int4PackedMethod,
    QuantGemmMethod,
    create_quant_method,
)
from kvforge.ops import extension
from kvforge.quant import QT, quantize, unpack_rows
from kvforge.quant.formats import Unpacked
from kvforge.quant.rtn import quantize_rtn

CPU = torch.device("cpu")
TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "IQ4_NL", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]


@pytest.fixture(params=["default", "aten"])
def kernels(request, monkeypatch) -> str:
    """Run the test with the extension's kernels, then as if it could not be built."""
    if request.param == "aten":
        failed = extension.ExtensionLoad(None, "RuntimeError: no compiler", None)
        monkeypatch.setattr(extension, "load_extension", lambda: failed)
    elif extension.load_extension().module is None:
        pytest.skip("C++ ops extension unavailable")
    return str(request.param)


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want).norm() / want.norm())


def _check_method(weights, rows: int = 512, cols: int = 768) -> None:
    method = create_quant_method(weights, CPU)
    dense = weights.dequantize()
    for num_tokens in (1, 5, 40):  # the grouped decode path and the tiled prefill path
        x = torch.randn(num_tokens, cols)
        want = x @ dense.T
        assert _relative_error(method(x), want) < 1e-2


@pytest.mark.parametrize("name", TYPES)
def test_every_type_matches_dequantized_matmul(name: str, kernels: str) -> None:
    gen = np.random.default_rng(0)
    values = gen.standard_normal((512, 768)).astype(np.float32)
    weights = unpack_rows(torch.from_numpy(quantize(values, QT[name])), QT[name], (512, 768))
    expected: type = Int4PackedMethod if name in ("Q4_0", "Q4_1", "Q4_K") else BlockInt8Method
    if kernels == "default":
        expected = QuantGemmMethod
    assert isinstance(create_quant_method(weights, CPU), expected)
    _check_method(weights)


def test_real_model_formats(smollm_path: str, gemma_path: str, kernels: str) -> None:
    """One matrix of each type the embedded (Q4_1, Q8_0) and Gemma (Q4_K, Q5_0, Q6_K) use."""
    seen = set()
    for path in (smollm_path, gemma_path):
        for tensor in GGUFReader(path).tensors:
            if len(tensor.shape) != 2 or tensor.tensor_type in seen:
                continue
            seen.add(tensor.tensor_type)
            cols = int(tensor.shape[0])
            rows = min(int(tensor.shape[1]), 2048)
            raw = torch.from_numpy(np.array(tensor.data[:rows]))  # [rows, bytes per row]
            _check_method(unpack_rows(raw, tensor.tensor_type, (rows, cols)), rows, cols)
    assert {QT.Q4_1, QT.Q8_0, QT.Q4_K, QT.Q5_0, QT.Q6_K} <= seen


def test_fused_shards_of_different_formats(kernels: str) -> None:
    """q/k in Q4_K and v in Q6_K: one method per shard, outputs concatenated in order."""
    layer = MergedLinear(512, {"q": 256, "k": 128, "v": 128})
    gen = np.random.default_rng(1)
    parts, dense = {}, []
    for shard, rows, name in (("q", 256, "Q4_K"), ("k", 128, "Q4_K"), ("v", 128, "Q6_K")):
        values = gen.standard_normal((rows, 512)).astype(np.float32)
        parts[shard] = unpack_rows(
            torch.from_numpy(quantize(values, QT[name])), QT[name], (rows, 512)
        )
        dense.append(parts[shard].dequantize())
    for shard, weights in parts.items():
        layer.weight_loader(layer.weight, weights, shard)
    assert layer.weight is None and layer.quant is not None
    x = torch.randn(3, 512)
    assert _relative_error(layer(x), x @ torch.cat(dense).T) < 1e-2


def test_packed_embedding_rows_and_tied_head(kernels: str) -> None:
    gen = np.random.default_rng(2)
    values = gen.standard_normal((1000, 64)).astype(np.float32)
    weights = unpack_rows(torch.from_numpy(quantize(values, QT.Q8_0)), QT.Q8_0, (1000, 64))
    embedding = VocabEmbedding(1000, 64)
    embedding.weight_loader(embedding.weight, weights)
    dense = weights.dequantize()
    ids = torch.tensor([0, 999, 17, 17])
    assert _relative_error(embedding(ids), dense[ids]) < 4e-3
    hidden = torch.randn(20, 64)
    logits = embedding.logits(hidden)
    assert logits.dtype == torch.float32
    # the tied head may quantize its activations to 8 bits per block of 32 (about 5e-3)
    assert _relative_error(logits, hidden @ dense.T) < 1e-2


@pytest.mark.parametrize(
    ("method", "group", "symmetric", "bound"),
    [
        ("int8", None, True, 0.01),
        ("int8", 64, False, 0.01),
        ("int4", None, True, 0.12),
        ("int4", 32, False, 0.1),
    ],
)
def test_on_load_quantization(
    method: str, group: int | None, symmetric: bool, bound: float
) -> None:
    weight = torch.randn(256, 512)
    packed = quantize_rtn(weight, method, group, symmetric)
    assert _relative_error(packed.dequantize(), weight) < bound
    _check_method(packed, 256, 512)


@pytest.mark.parametrize("group", [64, 32], ids=["per-row", "groups-of-32"])
def test_fp8_weights_matmul_and_embedding_rows(group: int) -> None:
    """FP8 (e4m3) codes with per-row or per-group scales: the matmul (bf16 and precise) and the
    embedding lookup equal the dequantized weights."""
    gen = torch.Generator().manual_seed(5)
    rows, cols = 300, 64
    dense = torch.randn(rows, cols, generator=gen)
    scales = dense.view(rows, -1, group).abs().amax(-1) / 448
    codes = (dense.view(rows, -1, group) / scales[..., None]).to(torch.float8_e4m3fn)
    weights = Unpacked(codes.view(rows, cols), scales, None, group)
    method = create_quant_method(weights, CPU)
    assert isinstance(method, Fp8Method)
    want_weights = weights.dequantize()
    assert _relative_error(want_weights, dense) < 0.05  # e4m3 keeps 3 mantissa bits
    x = torch.randn(7, cols, generator=gen)
    torch.testing.assert_close(method(x, precise=True), x @ want_weights.T, rtol=1e-5, atol=1e-4)
    assert _relative_error(method(x.bfloat16()), x @ want_weights.T) < 1e-2
    ids = torch.tensor([[0, 299], [17, 17]])
    torch.testing.assert_close(method.rows(ids), want_weights[ids])
    embedding = VocabEmbedding(rows, cols)
    embedding.weight_loader(embedding.weight, weights)
    torch.testing.assert_close(embedding(ids.view(-1)), want_weights[ids.view(-1)])

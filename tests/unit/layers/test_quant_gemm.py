"""The C++ block-quantized GEMM: exact against int16- / int8-quantized activations, close to
float (int16 much closer than the bfloat16 activations of the ATen kernels); from
``QUANT_GEMM_DENSE_MIN_ROWS`` rows (or ``act_bits=0``) the float GEMM on dequantized tiles, equal
to float32 on the dequantized weights."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from kvforge.layers.linear import VocabEmbedding
from kvforge.layers.quantization import (
    BlockInt8Method,
    Int4PackedMethod,
    QuantGemmMethod,
    create_embedding_method,
    create_quant_method,
)
from kvforge.ops import extension
from kvforge.quant import QT, quantize, unpack_rows
from kvforge.quant.formats import Unpacked
from kvforge.quant.rtn import quantize_rtn

CPU = torch.device("cpu")
TYPES = ["Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K", "Q8_0"]
NUM_OUT = 97  # odd, and not a multiple of the parallel grain


def _in_features(name: str) -> tuple[int, ...]:
    # K-quants need whole 256-blocks, so 576 is out of their reach
    return (768, 1536) if name.endswith("_K") else (576, 1536)


def _weights(name: str, cols: int, seed: int = 0, rows: int = NUM_OUT) -> Unpacked:
    values = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    return unpack_rows(torch.from_numpy(quantize(values, QT[name])), QT[name], (rows, cols))


def _quantized_activations(
    x: torch.Tensor, act_bits: int, interleaved: bool = False
) -> torch.Tensor:
    """x rounded as the kernel does: per block of 32, d = max|x| / Q, q = round(x / d), with
    Q = 127 (8 bits) or 32767 (16 bits; 32639 in the interleaved layout's kernel, whose 16-bit
    codes split into two signed bytes)."""
    top = 127.0 if act_bits == 8 else 32639.0 if interleaved else 32767.0
    blocks = x.float().view(x.shape[0], -1, 32)
    max_abs = blocks.abs().amax(-1, keepdim=True)
    # NOTE: Q / max_abs as a true division (a Python scalar over a tensor is a reciprocal)
    inverse = torch.where(max_abs > 0, torch.full_like(max_abs, top) / max_abs, 0.0)
    return (torch.round(blocks * inverse) * (max_abs / top)).view_as(x).double()


def _has_interleaved(ops) -> bool:  # type: ignore[no-untyped-def]
    return bool(ops.quant_gemm_isa() in ("avx512vnni", "avxvnni"))


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).norm() / want.norm())


@pytest.mark.parametrize("num_out", [NUM_OUT, 96])  # 96: the interleaved layout on VNNI builds
@pytest.mark.parametrize("name", TYPES)
def test_kernel_matches_references(ops, name: str, num_out: int) -> None:
    for cols in _in_features(name):
        weights = _weights(name, cols, rows=num_out)
        qs, scales, mins = ops.quant_gemm_repack(
            weights.codes, weights.scales, weights.mins, weights.group
        )
        interleaved = qs.dim() == 4
        assert interleaved == (num_out % 8 == 0 and weights.group != 16 and _has_interleaved(ops))
        if interleaved:
            width = qs.shape[2]
            assert width in (8, 16) and qs.shape[:3] == (num_out // width, cols // 32, width)
        else:
            assert qs.shape[:2] == (num_out, cols // 32)
        dense = weights.dequantize().double()
        for num_rows, dtype, act_bits in itertools.product(
            (1, 3, 16, 100), (torch.float32, torch.bfloat16), (0, 8, 16)
        ):
            x = torch.randn(num_rows, cols).to(dtype)
            y = ops.quant_gemm(x, qs, scales, mins, act_bits)
            assert y.dtype == torch.float32 and y.shape == (num_rows, num_out)
            if act_bits == 0:  # float GEMM on dequantized tiles: float32 rounding only
                assert _relative_error(y, x.double() @ dense.T) < 1e-6, (cols, num_rows, dtype)
                continue
            exact = _quantized_activations(x, act_bits, interleaved) @ dense.T
            assert _relative_error(y, exact) < 1e-5, (cols, num_rows, dtype, act_bits)
            # per 32-block: int8 ~0.5% relative error on random data, int16 ~2e-5
            bound = 1.5e-2 if act_bits == 8 else 1e-4
            assert _relative_error(y, x.double() @ dense.T) < bound, (cols, num_rows, act_bits)


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q8_0"])
def test_interleaved_layout(ops, name: str) -> None:
    if not _has_interleaved(ops):
        pytest.skip("no VNNI: the interleaved layout is not built")
    weights = _weights(name, 768, seed=3, rows=64)
    packed = ops.quant_gemm_repack(
        weights.codes, weights.scales, weights.mins, weights.group, "interleaved"
    )
    rows = ops.quant_gemm_repack(weights.codes, weights.scales, weights.mins, weights.group, "rows")
    assert packed[0].dim() == 4 and rows[0].dim() == 3
    # rows dequantized from the layout are the weights, in any order
    index = torch.tensor([63, 0, 7, 8, 8, 31])
    assert torch.equal(ops.quant_gemm_il_rows(*packed, index), weights.dequantize()[index])
    # each output row depends only on its own activation row: batches do not change results
    x = torch.randn(37, 768)
    for act_bits in (8, 16):
        whole = ops.quant_gemm(x, *packed, act_bits)
        for i in (0, 5, 36):
            assert torch.equal(whole[i], ops.quant_gemm(x[i : i + 1], *packed, act_bits)[0])
        # the two layouts agree up to the activations' rounding
        other = ops.quant_gemm(x, *rows, act_bits)
        assert _relative_error(whole, other.double()) < (1.5e-2 if act_bits == 8 else 1e-4)
    # the linear runs the integer kernel at any row count on this layout
    many = torch.randn(ops.QUANT_GEMM_DENSE_MIN_ROWS + 3, 768)
    assert torch.equal(ops.quant_linear(many, *packed, 16), ops.quant_gemm(many, *packed, 16))
    with pytest.raises(RuntimeError, match="outside"):
        ops.quant_gemm_il_rows(*packed, torch.tensor([64]))


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q8_0"])
def test_wide_groups_equal_eight_row_groups(ops, name: str) -> None:
    """Groups of 16 rows (512-bit VNNI builds) give the 8-row layout's results bit for bit: each
    output row sums the same blocks in the same order, only more rows share an instruction."""
    if not _has_interleaved(ops):
        pytest.skip("no VNNI: the interleaved layout is not built")
    for num_out in (96, 104):  # 104: not a multiple of 16, so 8-row groups either way
        weights = _weights(name, 576, seed=5, rows=num_out)
        args = (weights.codes, weights.scales, weights.mins, weights.group)
        auto, eight = (
            ops.quant_gemm_repack(*args, "interleaved"),
            ops.quant_gemm_repack(*args, "interleaved8"),
        )
        assert eight[0].shape[2] == 8
        wide = auto[0].shape[2]
        assert wide == (ops.quant_gemm_il_max_rows() if num_out % 16 == 0 else 8)
        for num_rows, act_bits in itertools.product((1, 5, 16, 37), (0, 8, 16)):
            x = torch.randn(num_rows, 576)
            assert torch.equal(
                ops.quant_gemm(x, *auto, act_bits), ops.quant_gemm(x, *eight, act_bits)
            ), (num_out, num_rows, act_bits)
        index = torch.arange(num_out).flip(0)
        assert torch.equal(ops.quant_gemm_il_rows(*auto, index), weights.dequantize()[index])


def test_interleaved_layout_refusals(ops) -> None:
    weights = _weights("Q4_1", 576)  # 97 rows: not a multiple of 8
    with pytest.raises(RuntimeError, match="interleaved layout needs"):
        ops.quant_gemm_repack(
            weights.codes, weights.scales, weights.mins, weights.group, "interleaved"
        )
    with pytest.raises(RuntimeError, match="interleaved layout needs"):
        ops.quant_gemm_repack(
            weights.codes, weights.scales, weights.mins, weights.group, "interleaved8"
        )
    with pytest.raises(RuntimeError, match="layout must be"):
        ops.quant_gemm_repack(weights.codes, weights.scales, weights.mins, weights.group, "cols")
    if _has_interleaved(ops):
        w96 = _weights("Q4_1", 576, rows=96)
        qs, scales, mins = ops.quant_gemm_repack(w96.codes, w96.scales, w96.mins, w96.group)
        with pytest.raises(RuntimeError, match="mins must match"):
            ops.quant_gemm(torch.randn(1, 576), qs, scales, mins.float(), 16)
        with pytest.raises(RuntimeError, match="columns"):
            ops.quant_gemm(torch.randn(1, 544), qs, scales, mins, 16)


def test_linear_takes_the_float_gemm_from_many_rows(ops) -> None:
    weights = _weights("Q4_1", 576)
    qs, scales, mins = ops.quant_gemm_repack(
        weights.codes, weights.scales, weights.mins, weights.group
    )
    threshold = ops.QUANT_GEMM_DENSE_MIN_ROWS
    for num_rows in (1, threshold - 1, threshold, threshold + 5):
        x = torch.randn(num_rows, 576)
        mode = 0 if num_rows >= threshold else 16
        assert torch.equal(
            ops.quant_linear(x, qs, scales, mins, 16), ops.quant_gemm(x, qs, scales, mins, mode)
        )


def test_four_bit_codes_pack_two_a_byte(ops) -> None:
    for name, bits in (("Q4_0", 4), ("Q4_1", 4), ("Q4_K", 4), ("Q5_K", 8), ("Q6_K", 8)):
        weights = _weights(name, 768)
        qs, scales, _ = ops.quant_gemm_repack(
            weights.codes, weights.scales, weights.mins, weights.group
        )
        assert qs.shape[2] == 4 * bits, name
        sub = 16 if weights.group == 16 else 32
        assert scales.shape == (NUM_OUT, 768 // sub)


@pytest.mark.parametrize("name", TYPES)
def test_dispatch_picks_quant_gemm_and_matches_aten(ops, name: str) -> None:
    rows = 112  # ATen's int4 packing needs a multiple of 16 output rows
    weights = _weights(name, 768, seed=1, rows=rows)
    oracle = (Int4PackedMethod if name in ("Q4_0", "Q4_1", "Q4_K") else BlockInt8Method)(weights)
    x = torch.randn(2, 5, 768)
    want = x.reshape(-1, 768).double() @ weights.dequantize().double().T
    errors = {}
    for quantize_activations in (False, True):
        method = create_quant_method(weights, CPU, quantize_activations=quantize_activations)
        assert isinstance(method, QuantGemmMethod)
        assert method.act_bits == (8 if quantize_activations else 16)
        assert method(x).shape == (2, 5, rows) and method(x).dtype == torch.float32
        errors[method.act_bits] = _relative_error(method(x).reshape(-1, rows), want)
        assert method(x.bfloat16()).dtype == torch.bfloat16
    errors["aten"] = _relative_error(oracle(x).reshape(-1, rows), want)
    # the default (16-bit) is far closer to float than ATen's bfloat16 activations
    assert errors[16] < 1e-4 < errors["aten"] < 1.5e-2 and errors[8] < 1.5e-2, errors


def test_weight_bytes_are_the_packed_bytes(ops) -> None:
    weights = _weights("Q4_1", 576)
    method = create_quant_method(weights, CPU, quantize_activations=True)
    # 4-bit codes plus a float16 scale and min per 32 columns (exact: GGUF stores them so),
    # 0.625 bytes per weight as in the file
    assert method.scales.dtype == method.mins.dtype == torch.float16
    assert method.weight_bytes() == NUM_OUT * 576 * 5 // 8
    q8 = create_quant_method(_weights("Q8_0", 576), CPU, quantize_activations=True)
    assert q8.weight_bytes() == NUM_OUT * (576 + 576 // 32 * 2)
    # K-quant scales (super-block scale times a 6-bit sub-scale) stay float32
    assert create_quant_method(_weights("Q4_K", 768), CPU).scales.dtype == torch.float32


def test_scales_keep_float32_unless_float16_is_exact(ops) -> None:
    weights = _weights("Q4_1", 576)
    scales = weights.scales.float() * (1.0 + 2.0**-20)  # not representable in float16
    qs, packed, mins = ops.quant_gemm_repack(weights.codes, scales, weights.mins, weights.group)
    assert packed.dtype == mins.dtype == torch.float32
    x = torch.randn(3, 576)
    want = Unpacked(weights.codes, scales, weights.mins, weights.group).dequantize().double()
    assert _relative_error(ops.quant_gemm(x, qs, packed, mins, 16), x.double() @ want.T) < 1e-4
    with pytest.raises(RuntimeError, match="mins must match scales"):
        ops.quant_gemm(x, qs, packed, mins.half(), 16)


def test_per_channel_int8_runs_in_the_kernel(ops) -> None:
    weight = torch.randn(NUM_OUT, 576)
    weights = quantize_rtn(weight, "int8", symmetric=False)  # one group per row, codes -128..127
    method = create_quant_method(weights, CPU, quantize_activations=True)
    assert isinstance(method, QuantGemmMethod)
    x = torch.randn(4, 576)
    assert _relative_error(method(x), x.double() @ weights.dequantize().double().T) < 1.5e-2


def test_falls_back_to_aten_without_the_extension(monkeypatch) -> None:
    failed = extension.ExtensionLoad(None, "RuntimeError: no compiler", None)
    monkeypatch.setattr(extension, "load_extension", lambda: failed)
    q4, q6 = _weights("Q4_1", 576, rows=96), _weights("Q6_K", 768)
    for quantize_activations in (False, True):
        method = create_quant_method(q4, CPU, quantize_activations=quantize_activations)
        assert isinstance(method, Int4PackedMethod)
        method = create_quant_method(q6, CPU, quantize_activations=quantize_activations)
        assert isinstance(method, BlockInt8Method)
    embedding = VocabEmbedding(NUM_OUT, 576)
    embedding.weight_loader(embedding.weight, _weights("Q8_0", 576))
    assert isinstance(embedding.quant, BlockInt8Method)


@pytest.mark.parametrize("num_out", [NUM_OUT, 96])
@pytest.mark.parametrize("name", ["Q8_0", "Q4_1", "Q6_K"])
def test_packed_embedding_rows_and_tied_head(ops, name: str, num_out: int) -> None:
    cols = 768
    weights = _weights(name, cols, seed=2, rows=num_out)
    embedding = VocabEmbedding(num_out, cols)
    embedding.quant = create_embedding_method(weights, CPU, quantize_activations=True)
    embedding.weight = None
    assert isinstance(embedding.quant, QuantGemmMethod)
    dense = weights.dequantize()
    ids = torch.tensor([[0, 5, num_out - 1], [3, 3, 50]])
    assert torch.equal(embedding(ids), dense[ids])
    hidden = torch.randn(4, cols).bfloat16()
    logits = embedding.logits(hidden)
    assert logits.dtype == torch.float32
    assert _relative_error(logits, hidden.double() @ dense.double().T) < 1.5e-2


def test_activations_stay_16_bit_by_default(ops) -> None:
    """8-bit activations are opt-in (they cost top-1 agreement on small models)."""
    method = create_quant_method(_weights("Q4_1", 576, rows=96), CPU)
    assert isinstance(method, QuantGemmMethod) and method.act_bits == 16
    embedding = VocabEmbedding(NUM_OUT, 576)
    embedding.weight_loader(embedding.weight, _weights("Q8_0", 576))
    assert isinstance(embedding.quant, QuantGemmMethod) and embedding.quant.act_bits == 16


def test_engine_option_selects_8_bit_activations(ops, smollm_path) -> None:  # type: ignore[no-untyped-def]
    from kvforge.config import ModelConfig
    from kvforge.layers.attention import create_attention_backend
    from kvforge.loader import load_model

    config = ModelConfig(model=smollm_path, quantize_activations=True)
    model = load_model(config, create_attention_backend(), False).model
    for method in (model.layers[0].mlp.down_proj.quant, model.embed_tokens.quant):
        assert isinstance(method, QuantGemmMethod) and method.act_bits == 8


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 7, 16])
@pytest.mark.parametrize("n, k", [(1, 8), (2, 5), (7, 64), (100, 576), (33, 1539)])
def test_float_gemm_matches_linear(ops, m: int, n: int, k: int) -> None:
    gen = torch.Generator().manual_seed(m * 1000 + n + k)
    x, w = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen)
    # float32 sums of k products, against a float64 reference: errors grow like sqrt(k)
    tol = {"atol": 2e-6 * k, "rtol": 1e-4}
    expected = x.double().mm(w.double().t()).float()
    torch.testing.assert_close(ops.float_gemm(x, w), expected, **tol)
    # non-contiguous inputs are made contiguous
    torch.testing.assert_close(ops.float_gemm(x.t().contiguous().t(), w), expected, **tol)


def test_float_gemm_rejects_bad_inputs(ops) -> None:
    with pytest.raises(RuntimeError, match="float32"):
        ops.float_gemm(torch.randn(2, 8).double(), torch.randn(3, 8).double())
    with pytest.raises(RuntimeError, match="K"):
        ops.float_gemm(torch.randn(2, 8), torch.randn(3, 9))
    assert ops.float_gemm(torch.randn(0, 8), torch.randn(3, 8)).shape == (0, 3)


@pytest.mark.parametrize("rows", [1, 2, 5, 16, 17])
def test_dense_linear_matches_f_linear(rows: int) -> None:
    from kvforge.layers.linear import dense_linear

    x, w, b = torch.randn(rows, 3, 64), torch.randn(40, 64), torch.randn(40)
    torch.testing.assert_close(
        dense_linear(x, w, b), torch.nn.functional.linear(x, w, b), atol=1e-4, rtol=1e-4
    )

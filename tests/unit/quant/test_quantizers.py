"""Quantizer searches: the C++ path (csrc/quantize.cpp) writes what the torch path writes, up to
float rounding on near-ties, with no more error."""

from __future__ import annotations

from types import ModuleType

import numpy as np
import pytest
import torch
from gguf.quants import dequantize as gguf_dequantize

from kvforge.ops import extension
from kvforge.quant import QT, quantize
from kvforge.quant.quantizers import search_asymmetric, search_symmetric

TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]


@pytest.fixture(scope="module")
def ops() -> ModuleType:
    """The C++ ops module; the tests that use it skip when the extension cannot build."""
    loaded = extension.load_extension()
    if loaded.module is None:
        pytest.skip(f"C++ ops extension unavailable: {loaded.error}")
    return loaded.module


def make_rows(num_rows: int = 48, cols: int = 1024, seed: int = 0) -> np.ndarray:
    """Gaussian rows of varied scales, a few outliers, one all-zero and one constant row."""
    gen = np.random.default_rng(seed)
    rows = gen.standard_normal((num_rows, cols)) * gen.uniform(0.01, 2.0, (num_rows, 1))
    rows[gen.uniform(size=rows.shape) < 0.01] *= 8
    rows[0] = 0.0
    rows[1] = 0.25
    return rows.astype(np.float32)


def _weighted_error(approx: np.ndarray, exact: np.ndarray, weights: np.ndarray) -> float:
    return float((weights * (approx - exact) ** 2).sum() / (weights * exact**2).sum())


@pytest.mark.parametrize("with_imatrix", [False, True])
@pytest.mark.parametrize("name", TYPES)
def test_native_matches_torch(ops: ModuleType, name: str, with_imatrix: bool) -> None:
    qtype = QT[name]
    rows = make_rows()
    gen = np.random.default_rng(1)
    importance = np.where(gen.uniform(size=rows.shape[1]) < 0.1, 50.0, 0.5).astype(np.float32)
    imatrix = importance if with_imatrix else None
    native = quantize(rows, qtype, imatrix)
    reference = quantize(rows, qtype, imatrix, use_native=False)
    assert native.shape == reference.shape
    # words that differ come from float near-ties between candidate scales (a K-quant tie moves
    # its super-block's scale, so a few percent there)
    same = (native.reshape(-1, 8) == reference.reshape(-1, 8)).all(-1).mean()
    assert same > 0.95, f"{name}: only {same:.3f} of the bytes agree"
    weights = np.broadcast_to(importance if with_imatrix else 1.0, rows.shape)
    got = _weighted_error(gguf_dequantize(native, qtype), rows, weights)
    want = _weighted_error(gguf_dequantize(reference, qtype), rows, weights)
    assert got <= want * 1.001, f"{name}: weighted error {got:.6f} vs torch {want:.6f}"


def test_native_searches_match_torch(ops: ModuleType) -> None:
    """Scale (and min) per group, weighted or not, including all-zero and flat groups."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4096, 32, generator=gen) * torch.rand(4096, 1, generator=gen)
    x[0], x[1] = 0.0, 0.5
    w = torch.rand(4096, 32, generator=gen) + 0.1
    for weights in (None, w):
        want = search_symmetric(x, weights, 16)
        got = search_symmetric(x, weights, 16, ops=ops)
        close = torch.isclose(got, want, rtol=1e-4, atol=1e-7)
        assert close.float().mean() > 0.99 and got[0] == 0
        want_scale, want_min = search_asymmetric(x, weights, 15, -0.9, 0.05, 36)
        got_scale, got_min = search_asymmetric(x, weights, 15, -0.9, 0.05, 36, ops=ops)
        close = torch.isclose(got_scale, want_scale, rtol=1e-4, atol=1e-7) & torch.isclose(
            got_min, want_min, rtol=1e-4, atol=1e-7
        )
        assert close.float().mean() > 0.99
        assert got_scale[0] == 0 and got_min[0] == 0 and got_scale[1] == want_scale[1]


def test_codes_round_half_away_and_clamp(ops: ModuleType) -> None:
    x = torch.tensor([[0.5, -0.5, 1.5, -2.5, 100.0, -100.0, 0.0, 0.49]])
    codes = ops.quant_codes(x, torch.tensor([1.0]), None, -8, 7)
    assert codes.dtype == torch.int8
    assert codes.tolist() == [[1, -1, 2, -3, 7, -8, 0, 0]]
    shifted = ops.quant_codes(x, torch.tensor([2.0]), torch.tensor([-1.0]), 0, 15)
    assert shifted.tolist() == [[1, 0, 1, 0, 15, 0, 1, 1]]
    assert ops.quant_codes(x, torch.tensor([0.0]), None, -8, 7).tolist() == [[0] * 8]


def test_torch_fallback_when_the_extension_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the extension the quantizer runs its torch path and still round-trips."""
    failed = extension.ExtensionLoad(None, "RuntimeError: no compiler", None)
    monkeypatch.setattr(extension, "load_extension", lambda: failed)
    rows = make_rows(8, 512)
    packed = quantize(rows, QT.Q4_K)
    assert np.array_equal(packed, quantize(rows, QT.Q4_K, use_native=False))
    error = _weighted_error(gguf_dequantize(packed, QT.Q4_K), rows, np.ones_like(rows))
    assert error < 0.1**2  # relative RMSE under 10% (outliers included)


def test_chunks_in_threads_match_one_chunk_and_restore_torch_threads() -> None:
    """Rows split over the thread pool pack as one serial pass does; torch's setting returns."""
    rows = make_rows(64, 2048)  # 128k values: two chunks on two threads
    before = torch.get_num_threads()
    threaded = quantize(rows, QT.Q4_K)
    assert torch.get_num_threads() == before
    torch.set_num_threads(1)
    try:
        serial = quantize(rows, QT.Q4_K)
    finally:
        torch.set_num_threads(before)
    assert np.array_equal(threaded, serial)

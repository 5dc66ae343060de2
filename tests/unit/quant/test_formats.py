"""Block formats: our quantizers write llama.cpp layouts the gguf package reads back exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from gguf.quants import dequantize as gguf_dequantize

from kvforge.quant import QT, dequantize, quantize

# Relative RMS error bounds on Gaussian rows (llama.cpp's own quantizers land a little below).
BOUNDS = {
    "Q8_0": 0.008,
    "Q6_K": 0.022,
    "Q5_K": 0.042,
    "Q5_1": 0.042,
    "Q5_0": 0.047,
    "Q4_K": 0.08,
    "Q4_1": 0.085,
    "IQ4_NL": 0.085,
    "Q4_0": 0.095,
    "Q3_K": 0.17,
    "Q2_K": 0.31,
}


def _relative_rmse(
    approx: np.ndarray, exact: np.ndarray, weights: np.ndarray | None = None
) -> float:
    w = np.ones_like(exact) if weights is None else np.broadcast_to(weights, exact.shape)
    return float(np.sqrt((w * (approx - exact) ** 2).sum() / (w * exact**2).sum()))


@pytest.fixture(scope="module")
def gaussian_rows() -> np.ndarray:
    gen = np.random.default_rng(0)
    return (gen.standard_normal((48, 1024)) * gen.uniform(0.01, 2.0, (48, 1))).astype(np.float32)


@pytest.mark.parametrize("name", sorted(BOUNDS))
def test_roundtrip_matches_gguf_within_bound(name: str, gaussian_rows: np.ndarray) -> None:
    qtype = QT[name]
    packed = quantize(gaussian_rows, qtype)
    theirs = gguf_dequantize(packed, qtype)
    ours = dequantize(torch.from_numpy(packed), qtype, gaussian_rows.shape).numpy()
    np.testing.assert_array_equal(ours, theirs)
    error = _relative_rmse(theirs, gaussian_rows)
    assert error < BOUNDS[name], f"{name}: relative RMSE {error:.4f}"


@pytest.mark.parametrize("name", ["Q2_K", "Q3_K", "Q4_K", "Q4_0", "IQ4_NL", "Q5_K"])
def test_importance_weights_lower_the_weighted_error(name: str, gaussian_rows: np.ndarray) -> None:
    """With an importance matrix the error it weighs goes down (a few columns matter most)."""
    gen = np.random.default_rng(1)
    importance = np.where(gen.uniform(size=1024) < 0.1, 50.0, 0.5).astype(np.float32)
    qtype = QT[name]
    plain = gguf_dequantize(quantize(gaussian_rows, qtype), qtype)
    weighted = gguf_dequantize(quantize(gaussian_rows, qtype, importance), qtype)
    assert _relative_rmse(weighted, gaussian_rows, importance) < 0.97 * _relative_rmse(
        plain, gaussian_rows, importance
    )


def test_real_tensors_unpack_like_gguf(smollm_path: str, gemma_path: str) -> None:
    """Every quantized type in both real models dequantizes bit-identically to gguf."""
    seen = set()
    for path in (smollm_path, gemma_path):
        for tensor in GGUFReader(path).tensors:
            if tensor.tensor_type in seen or tensor.tensor_type in (QT.F32, QT.F16):
                continue
            seen.add(tensor.tensor_type)
            shape = tuple(int(d) for d in reversed(tensor.shape))
            ours = dequantize(torch.from_numpy(np.array(tensor.data)), tensor.tensor_type, shape)
            theirs = gguf_dequantize(tensor.data, tensor.tensor_type).reshape(shape)
            np.testing.assert_array_equal(ours.numpy(), theirs)
    assert {QT.Q4_1, QT.Q8_0, QT.Q4_K, QT.Q5_0, QT.Q6_K} <= seen


@pytest.mark.parametrize("name", ["Q8_0", "Q6_K", "Q5_K", "Q4_K", "Q4_0", "Q3_K", "Q2_K"])
def test_real_weights_requantize_within_bound(name: str, smollm_path: str) -> None:
    """A real FFN matrix (rows of 1536) quantizes within the Gaussian bounds too."""
    tensor = next(t for t in GGUFReader(smollm_path).tensors if t.name == "blk.3.ffn_down.weight")
    weights = gguf_dequantize(tensor.data, tensor.tensor_type)[:64]
    qtype = QT[name]
    error = _relative_rmse(gguf_dequantize(quantize(weights, qtype), qtype), weights)
    assert error < BOUNDS[name] * 1.1, f"{name}: relative RMSE {error:.4f}"

"""GGUF IQ types without a kernel here (IQ4_XS, IQ2_XXS, ...) load as float weights through
the gguf package's reference dequantization, also when packed weights were asked for."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFWriter
from gguf.quants import dequantize as reference_dequantize

from kvforge.loader.gguf_loader import iter_gguf_weights
from kvforge.models.registry import family_for_gguf
from kvforge.quant.formats import dequantize


def _blocks(qtype: GGMLQuantizationType, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random blocks of ``qtype`` with a sane float16 scale at the start of each block."""
    block, size = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows * cols // block, size), dtype=np.uint8)
    raw[:, :2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    return raw.reshape(rows, cols // block * size)


@pytest.mark.parametrize(
    "qtype", [GGMLQuantizationType.IQ4_XS, GGMLQuantizationType.IQ2_XXS, GGMLQuantizationType.IQ3_S]
)
def test_iq_types_dequantize_as_the_reference(qtype):
    raw = _blocks(qtype, 3, 512)
    ours = dequantize(torch.from_numpy(raw), qtype, (3, 512))
    expected = torch.from_numpy(reference_dequantize(raw, qtype).copy()).float()
    torch.testing.assert_close(ours, expected)
    with pytest.raises(ValueError, match="multiple of 256"):
        dequantize(torch.from_numpy(raw), qtype, (6, 200))


def test_packed_loading_gives_float_weights(tmp_path):
    qtype = GGMLQuantizationType.IQ4_XS
    raw = _blocks(qtype, 2, 256, seed=1)
    path = tmp_path / "iq.gguf"
    writer = GGUFWriter(str(path), arch="llama")
    writer.add_tensor("blk.0.ffn_down.weight", raw, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    reader = GGUFReader(str(path))
    [(name, value)] = list(iter_gguf_weights(reader, family_for_gguf("llama"), 4, 2, False, True))
    assert name == "model.layers.0.mlp.down_proj.weight"
    assert isinstance(value, torch.Tensor) and value.shape == (2, 256)
    torch.testing.assert_close(value, torch.from_numpy(reference_dequantize(raw, qtype).copy()))

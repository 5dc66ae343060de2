"""The torch-free GGUF block library (kvforge.ops.blocks) against the torch quantizers and the
gguf package's dequantization, and the streaming GGUF writer of ``kvforge quantize``."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from gguf import GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import dequantize as gguf_dequantize
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from kvforge.errors import ModelFileError
from kvforge.loader.gguf_check import check_gguf_file, metadata_value
from kvforge.ops import blocks
from kvforge.quant import QT
from kvforge.quant.gguf_file import GGUFStreamWriter, encode_kv
from kvforge.quant.quantizers import quantize as torch_quantize
from kvforge.tools.quantize import quantize_file

pytestmark = pytest.mark.skipif(
    blocks.load_library() is None, reason="the block library needs a C++ compiler"
)
LEGACY = sorted(blocks.TYPES, key=int)


def _hard_rows() -> np.ndarray:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((24, 128)).astype(np.float32)
    x[0] = 0.0  # all-zero blocks: scale +0 (not -0)
    x[1] = -0.0
    x[2, :32] = 1.5  # constant block
    x[3, :32] = np.linspace(-1, 1, 32)  # ties in the codes
    x[4] *= 1e-30  # scales below float16's smallest subnormal
    x[5] *= 1e-6  # subnormal float16 scales
    x[6] *= 6e4  # near float16's largest value
    x[7] = np.abs(x[7])  # no negative value (asymmetric min 0)
    x[8] = -np.abs(x[8])
    x[9, ::2] = 0.0
    x[10] = np.round(x[10] * 4) / 4  # values on a grid: exact codes
    return x


@pytest.mark.parametrize("qtype", LEGACY, ids=lambda t: t.name)
def test_quantize_equals_torch_quantizers(qtype):
    x = _hard_rows()
    native = blocks.quantize(x, qtype)
    assert native is not None and native.dtype == np.uint8
    np.testing.assert_array_equal(native, torch_quantize(x, qtype))


@pytest.mark.parametrize("qtype", LEGACY, ids=lambda t: t.name)
def test_dequantize_equals_gguf(qtype):
    data = torch_quantize(_hard_rows()[:, :], qtype)
    ours = blocks.dequantize(data, qtype, (24, 128))
    np.testing.assert_array_equal(ours, gguf_dequantize(data, qtype).reshape(24, 128))


@settings(max_examples=40, deadline=None)
@given(
    qtype=st.sampled_from(LEGACY),
    x=hnp.arrays(
        np.float32,
        st.tuples(st.integers(1, 3), st.sampled_from([32, 64])),
        elements=st.floats(-1e4, 1e4, width=32),
    ),
)
def test_any_values_quantize_as_torch(qtype, x):
    np.testing.assert_array_equal(blocks.quantize(x, qtype), torch_quantize(x, qtype))


def test_large_tensors_split_over_threads_give_the_same_bytes():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((700, 1024)).astype(np.float32)  # > one chunk of blocks
    data = blocks.quantize(x, QT.Q4_1)
    np.testing.assert_array_equal(data, torch_quantize(x, QT.Q4_1))
    np.testing.assert_array_equal(
        blocks.dequantize(data, QT.Q4_1, x.shape), gguf_dequantize(data, QT.Q4_1).reshape(x.shape)
    )


@pytest.mark.parametrize("src_type", LEGACY, ids=lambda t: t.name)
def test_requantize_equals_dequantize_then_quantize(src_type):
    rows = np.delete(_hard_rows(), 6, axis=0)  # row 6 overflows some float16 scales
    raw = torch_quantize(rows, src_type)
    values = blocks.dequantize(raw, src_type, rows.shape)
    for dst_type in LEGACY:
        np.testing.assert_array_equal(
            blocks.requantize(raw, src_type, dst_type, rows.shape),
            blocks.quantize(values, dst_type),
        )
    assert blocks.requantize(raw, src_type, QT.Q4_K, rows.shape) is None


def test_other_types_and_bad_shapes():
    x = np.ones((2, 256), np.float32)
    assert blocks.quantize(x, QT.Q4_K) is None  # the caller takes the torch quantizers
    assert blocks.dequantize(np.zeros(144, np.uint8), QT.Q4_K, (256,)) is None
    with pytest.raises(ValueError, match="multiple of 32"):
        blocks.quantize(np.ones((2, 48), np.float32), QT.Q8_0)
    with pytest.raises(ValueError, match="do not hold"):
        blocks.dequantize(np.zeros(30, np.uint8), QT.Q8_0, (32,))
    with pytest.raises(ValueError, match="do not hold"):
        blocks.requantize(np.zeros(68, np.uint8), QT.Q8_0, QT.Q4_0, (4, 16))  # rows of 16


# ------------------------------------------------------------------------ streaming writer


def _source(path, alignment: int | None = None, kv_heads: object = 2) -> None:
    """A tiny llama GGUF: Q8_0 and F16 matrices, an F32 norm, a tokenizer array."""
    rng = np.random.default_rng(2)
    writer = GGUFWriter(str(path), arch="llama")
    if alignment:
        writer.add_custom_alignment(alignment)
    writer.add_block_count(1)
    writer.add_head_count(4)
    writer.add_key_value(
        "llama.attention.head_count_kv",
        kv_heads,
        GGUFValueType.ARRAY if isinstance(kv_heads, list) else GGUFValueType.UINT32,
        GGUFValueType.UINT32 if isinstance(kv_heads, list) else None,
    )
    writer.add_token_list(["a", "b", "ünï", ""])
    writer.add_float32("llama.rope.freq_base", 1e4)
    writer.add_file_type(7)
    writer.add_string("quantize.imatrix.file", "old")
    q = rng.standard_normal((64, 64)).astype(np.float32)
    writer.add_tensor("blk.0.attn_q.weight", torch_quantize(q, QT.Q8_0), raw_dtype=QT.Q8_0)
    writer.add_tensor("blk.0.ffn_down.weight", rng.standard_normal((64, 96)).astype(np.float16))
    writer.add_tensor("blk.0.attn_norm.weight", np.ones(64, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("alignment", [None, 64])
def test_requantized_file_keeps_metadata_and_alignment(tmp_path, alignment):
    src, dst = tmp_path / "src.gguf", tmp_path / "dst.gguf"
    _source(src, alignment)
    counts = quantize_file(src, dst, "Q8_0", show_progress=False)
    assert counts == {"Q8_0": 2, "F32": 1}
    before, after = GGUFReader(str(src)), GGUFReader(str(dst))
    assert after.fields["general.architecture"].contents() == "llama"
    assert after.fields["general.file_type"].contents() == 7
    assert "quantize.imatrix.file" not in after.fields  # the source's own run is not ours
    for key in ("tokenizer.ggml.tokens", "llama.rope.freq_base", "llama.block_count"):
        assert after.fields[key].contents() == before.fields[key].contents()
    assert after.alignment == (alignment or 32)
    by_name = {t.name: t for t in after.tensors}
    assert by_name["blk.0.attn_norm.weight"].tensor_type == QT.F32
    values = {t.name: gguf_dequantize(t.data, t.tensor_type) for t in before.tensors}
    for name in ("blk.0.attn_q.weight", "blk.0.ffn_down.weight"):
        expected = torch_quantize(values[name].astype(np.float32), QT.Q8_0)
        np.testing.assert_array_equal(
            np.array(by_name[name].data).reshape(expected.shape), expected
        )
    check_gguf_file(dst)


def test_head_count_kv_per_layer_array(tmp_path):
    src = tmp_path / "src.gguf"
    _source(src, kv_heads=[2])
    header = check_gguf_file(src)
    with open(src, "rb") as handle:
        raw = handle.read()
    assert metadata_value(raw, header, "llama.attention.head_count_kv") == [2]
    assert metadata_value(raw, header, "tokenizer.ggml.tokens") == ["a", "b", "ünï", ""]
    assert metadata_value(raw, header, "missing") is None
    quantize_file(src, tmp_path / "dst.gguf", "Q4_0", show_progress=False)


def test_failed_run_leaves_no_file(tmp_path):
    src, dst = tmp_path / "src.gguf", tmp_path / "dst.gguf"
    _source(src)

    def fail(name, values):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError):
        quantize_file(src, dst, "Q8_0", show_progress=False, adjust=fail)
    assert list(tmp_path.iterdir()) == [src]


def test_stream_writer_checks_order_and_sizes(tmp_path):
    tensors = [("a", (2, 32), QT.Q8_0), ("b", (4,), QT.F32)]
    meta = [encode_kv("general.architecture", GGUFValueType.STRING, "llama")]
    writer = GGUFStreamWriter(tmp_path / "x.gguf", meta, tensors)
    with pytest.raises(ValueError, match="a of 68 bytes was due"):
        writer.write("b", np.zeros(4, np.float32))
    writer.abort()
    writer = GGUFStreamWriter(tmp_path / "x.gguf", meta, tensors)
    writer.write("a", np.zeros((2, 34), np.uint8))
    with pytest.raises(ValueError, match="never written"):
        writer.close()
    assert not any(tmp_path.iterdir())
    writer = GGUFStreamWriter(tmp_path / "x.gguf", meta, tensors)
    writer.write("a", np.zeros((2, 34), np.uint8))
    writer.write("b", np.arange(4, dtype=np.float32))
    writer.close()
    reader = GGUFReader(str(tmp_path / "x.gguf"))
    assert [t.name for t in reader.tensors] == ["a", "b"]
    np.testing.assert_array_equal(reader.tensors[1].data, np.arange(4))


def test_truncated_source_is_one_line_error(tmp_path):
    src = tmp_path / "src.gguf"
    _source(src)
    src.write_bytes(src.read_bytes()[:-100])
    with pytest.raises(ModelFileError, match="truncated"):
        quantize_file(src, tmp_path / "dst.gguf", "Q8_0", show_progress=False)


def test_legacy_requantize_never_imports_torch(tmp_path):
    src = tmp_path / "src.gguf"
    _source(src)
    code = (
        "import sys\n"
        "from kvforge.entrypoints.cli import main\n"
        f"assert main(['quantize', {str(src)!r}, {str(tmp_path / 'q.gguf')!r}, 'Q4_0']) == 0\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]

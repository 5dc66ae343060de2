"""Hostile inputs to ``kvforge quantize`` (kvforge.tools.quantize.quantize_file and the CLI):
malformed sources, awkward destinations, interrupted runs, odd shapes and types, bad imatrix
files, and the block library against the torch quantizers.

Bad input must end in a typed kvforge error (the CLI: one line, exit 2), never a raw
exception or a crash, and never leave DST or DST.partial behind."""

from __future__ import annotations

import contextlib
import os
import random
import struct
from pathlib import Path

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGUFEndian, GGUFReader, GGUFWriter
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType as VT
from gguf import quants as gguf_quants
from gguf.quants import dequantize as gguf_dequantize

from kvforge.entrypoints.cli import main
from kvforge.errors import (
    InvalidRequestError,
    KVForgeError,
    ModelFileError,
    ModelNotFoundError,
    UnsupportedModelError,
)
from kvforge.loader.gguf_check import check_gguf_file, open_gguf
from kvforge.loader.gguf_loader import SUPPORTED_TYPES, dequantize_tensor
from kvforge.ops import blocks
from kvforge.ops.blocks import NonFiniteError
from kvforge.quant.gguf_file import quantize_tensor
from kvforge.quant.imatrix import write_imatrix
from kvforge.quant.mixes import BASE_TYPES
from kvforge.quant.quantizers import quantize as torch_quantize
from kvforge.tools.quantize import quantize_file

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
needs_library = pytest.mark.skipif(
    blocks.load_library() is None, reason="the block library needs a C++ compiler"
)
LEGACY = sorted(blocks.TYPES, key=int)
Q = "blk.0.attn_q.weight"

# ----------------------------------------------------------------------------- raw GGUF bytes


def _s(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def _kv(key: str | bytes, vtype: VT, payload: bytes) -> bytes:
    return _s(key) + struct.pack("<I", int(vtype)) + payload


def _u32(value: int) -> bytes:
    return struct.pack("<I", value)


def _array(element: VT, items: list) -> bytes:
    if element == VT.STRING:
        body = b"".join(_s(i) for i in items)
    else:
        fmt = {VT.UINT32: "<I", VT.FLOAT32: "<f"}[element]
        body = b"".join(struct.pack(fmt, i) for i in items)
    return struct.pack("<IQ", int(element), len(items)) + body


def _gguf(kvs: list[bytes], tensors: list[tuple], alignment: int = 32) -> bytes:
    """A GGUF v3 file; tensors: (name, row-major shape, type id, data[, offset])."""
    infos, data, offset = b"", b"", 0
    for name, shape, qtype, raw, *rest in tensors:
        at = rest[0] if rest else offset
        dims = tuple(reversed(shape))
        infos += _s(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, int(qtype), at)
        data += raw + bytes(-len(raw) % alignment)
        offset = at + len(raw) + (-len(raw) % alignment)
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kvs)) + b"".join(kvs) + infos
    return head + bytes(-len(head) % alignment) + data


def _llama(layers: int = 1) -> list[bytes]:
    return [
        _kv("general.architecture", VT.STRING, _s("llama")),
        _kv("llama.block_count", VT.UINT32, _u32(layers)),
    ]


def _weights(shape=(4, 64), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _f32_source(path: Path, kvs: list[bytes] | None = None, shape=(4, 64), name=Q) -> Path:
    path.write_bytes(_gguf(kvs or _llama(), [(name, shape, QT.F32, _weights(shape).tobytes())]))
    return path


def _leftovers(dst: Path) -> list[str]:
    return [p.name for p in (dst, dst.with_name(dst.name + ".partial")) if os.path.lexists(p)]


def _typed_error(src: Path, dst: Path, file_type: str = "Q8_0", **kwargs) -> KVForgeError:
    with pytest.raises(KVForgeError) as info:
        quantize_file(src, dst, file_type, show_progress=False, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    assert _leftovers(dst) == []
    return info.value


# ----------------------------------------------------------------------- malformed metadata

_ARCH = _kv("general.architecture", VT.STRING, _s("llama"))
_BAD_METADATA = {
    "arch_float": [_kv("general.architecture", VT.FLOAT32, struct.pack("<f", 1.0))],
    "arch_string_array": [_kv("general.architecture", VT.ARRAY, _array(VT.STRING, ["llama"]))],
    "arch_missing": [],
    "block_count_string": [_ARCH, _kv("llama.block_count", VT.STRING, _s("1"))],
    "block_count_float": [_ARCH, _kv("llama.block_count", VT.FLOAT32, struct.pack("<f", 1))],
    "block_count_strings": [_ARCH, _kv("llama.block_count", VT.ARRAY, _array(VT.STRING, ["a"]))],
    "block_count_floats": [_ARCH, _kv("llama.block_count", VT.ARRAY, _array(VT.FLOAT32, [1]))],
    "block_count_empty": [_ARCH, _kv("llama.block_count", VT.ARRAY, _array(VT.UINT32, []))],
    "block_count_nested": [
        _ARCH,
        _kv(
            "llama.block_count",
            VT.ARRAY,
            struct.pack("<IQ", int(VT.ARRAY), 1) + _array(VT.UINT32, [1]),
        ),
    ],
    "block_count_missing": [_ARCH],
    "head_count_string": [*_llama(), _kv("llama.attention.head_count", VT.STRING, _s("x"))],
    "duplicate_key": [*_llama(), _kv("llama.block_count", VT.UINT32, _u32(2))],
    "reserved_key": [*_llama(), _kv("GGUF.version", VT.UINT32, _u32(3))],
    "non_utf8_value": [*_llama(), _kv("general.name", VT.STRING, _s(b"\xff\xfe"))],
    "non_utf8_key": [*_llama(), _kv(b"fo\xff", VT.UINT32, _u32(1))],
    "alignment_string": [*_llama(), _kv("general.alignment", VT.STRING, _s("64"))],
    "alignment_zero": [*_llama(), _kv("general.alignment", VT.UINT32, _u32(0))],
    "alignment_three": [*_llama(), _kv("general.alignment", VT.UINT32, _u32(3))],
}


@pytest.mark.parametrize("case", list(_BAD_METADATA))
def test_bad_metadata_is_a_typed_error(tmp_path, case):
    src = tmp_path / "src.gguf"
    src.write_bytes(_gguf(_BAD_METADATA[case], [(Q, (4, 64), QT.F32, _W)]))
    assert isinstance(_typed_error(src, tmp_path / "dst.gguf"), ModelFileError)


# ------------------------------------------------------------------------- malformed tensors

_W = _weights().tobytes()
_BAD_TENSORS = {
    "offset_beyond_file": [(Q, (4, 64), QT.F32, _W, 4096)],
    "huge_dims": [(Q, (2**40, 2**40), QT.F32, _W)],
    "dims_overflow_u64": [(Q, (2**63, 2**63, 4), QT.F32, _W)],
    "zero_dim": [(Q, (0, 64), QT.F32, b"")],
    "q8_row_of_48": [(Q, (1, 48), QT.Q8_0, bytes(51))],
    "unknown_type": [(Q, (4, 64), 99, _W)],
    "overlap": [("a.weight", (4, 64), QT.F32, _W, 0), ("b.weight", (4, 64), QT.F32, _W, 0)],
    "duplicate_name": [("a.weight", (4, 64), QT.F32, _W), ("a.weight", (4, 64), QT.F32, _W)],
    "misaligned_offset": [(Q, (4, 64), QT.F32, _W, 4)],
    "non_utf8_name": [(b"blk.0.\xff.weight", (4, 64), QT.F32, _W)],
}


@pytest.mark.parametrize("case", list(_BAD_TENSORS))
def test_bad_tensor_infos_are_typed_errors(tmp_path, case):
    src = tmp_path / "src.gguf"
    src.write_bytes(_gguf(_llama(), _BAD_TENSORS[case]))
    assert isinstance(_typed_error(src, tmp_path / "dst.gguf"), ModelFileError)


def test_truncations_empty_and_foreign_files(tmp_path):
    good = _gguf(_llama(), [(Q, (4, 64), QT.F32, _W)])
    src, dst = tmp_path / "src.gguf", tmp_path / "dst.gguf"
    for cut in (0, 3, 4, 20, 60, len(good) // 2, len(good) - 10):
        src.write_bytes(good[:cut])
        _typed_error(src, dst)
    src.write_bytes(b"PK\x03\x04 definitely not gguf" * 4)
    _typed_error(src, dst)
    src.write_bytes(b"GGUF" + struct.pack("<IQQ", 7, 0, 0))  # unknown version
    _typed_error(src, dst)
    assert isinstance(_typed_error(tmp_path / "none.gguf", dst), ModelNotFoundError)
    assert isinstance(_typed_error(tmp_path, dst), ModelNotFoundError)  # a directory


def test_big_endian_source_is_refused(tmp_path):
    src = tmp_path / "be.gguf"
    writer = GGUFWriter(str(src), arch="llama", endianess=GGUFEndian.BIG)
    writer.add_block_count(1)
    writer.add_tensor(Q, _weights())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert isinstance(_typed_error(src, tmp_path / "dst.gguf"), UnsupportedModelError)


@pytest.mark.parametrize("qtype", [QT.I8, QT.I16, QT.I32, QT.F64, QT.Q8_1])
def test_types_that_cannot_be_read_are_unsupported(tmp_path, qtype):
    block, size = GGML_QUANT_SIZES[qtype]
    src = tmp_path / "src.gguf"
    src.write_bytes(_gguf(_llama(), [(Q, (2, 64), qtype, bytes(2 * 64 // block * size))]))
    assert isinstance(_typed_error(src, tmp_path / "dst.gguf"), UnsupportedModelError)


def test_odd_but_sound_metadata_values_still_quantize(tmp_path):
    """Integers of other widths, per-layer arrays, zero KV heads, an empty architecture."""
    cases = [
        [_ARCH, _kv("llama.block_count", VT.UINT64, struct.pack("<Q", 2**40))],
        [_ARCH, _kv("llama.block_count", VT.ARRAY, _array(VT.UINT32, [1, 3]))],
        [
            *_llama(),
            _kv("llama.attention.head_count", VT.UINT32, _u32(4)),
            _kv("llama.attention.head_count_kv", VT.UINT32, _u32(0)),
        ],
        [_kv("general.architecture", VT.STRING, _s("")), _kv(".block_count", VT.UINT32, _u32(1))],
    ]
    for index, kvs in enumerate(cases):
        dst = tmp_path / f"dst{index}.gguf"
        src = _f32_source(tmp_path / f"src{index}.gguf", kvs, shape=(4, 256))
        for file_type in ("Q8_0", "Q2_K", "Q4_K_M"):
            quantize_file(src, dst, file_type, show_progress=False)
            check_gguf_file(dst)


def test_header_fuzz_never_leaks_a_raw_exception(tmp_path):
    writer_path = tmp_path / "good.gguf"
    writer = GGUFWriter(str(writer_path), arch="llama")
    writer.add_custom_alignment(64)
    writer.add_block_count(2)
    writer.add_head_count(4)
    writer.add_array("llama.attention.head_count_kv", [2, 2])
    writer.add_token_list(["a", "bé", ""])
    writer.add_tensor(Q, torch_quantize(_weights((2, 64)), QT.Q8_0), raw_dtype=QT.Q8_0)
    writer.add_tensor("blk.0.attn_norm.weight", np.ones(64, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    good = writer_path.read_bytes()
    header_end = check_gguf_file(writer_path).data_start
    rng = random.Random(0)
    src, dst = tmp_path / "m.gguf", tmp_path / "out.gguf"
    for _ in range(300):
        buf = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            buf[rng.randrange(header_end)] = rng.randrange(256)
        src.write_bytes(bytes(buf))
        try:
            quantize_file(src, dst, rng.choice(["Q4_0", "Q8_0", "Q4_K_M"]), show_progress=False)
        except KVForgeError:
            assert _leftovers(dst) == []
        dst.unlink(missing_ok=True)


# -------------------------------------------------------------------------------- shapes


def test_rows_of_48_and_96_fall_back_and_keep_values(tmp_path):
    src, dst = tmp_path / "src.gguf", tmp_path / "dst.gguf"
    for cols, file_type, expected in [
        (48, "Q4_0", QT.F16),
        (48, "Q4_K_M", QT.F16),
        (48, "Q8_0", QT.F16),
        (48, "IQ4_NL", QT.F16),
        (96, "Q4_K_M", QT.Q5_0),
        (96, "Q2_K", QT.IQ4_NL),
        (96, "Q6_K", QT.Q8_0),
    ]:
        values = _weights((4, cols))
        _f32_source(src, shape=(4, cols))
        quantize_file(src, dst, file_type, show_progress=False)
        [tensor] = GGUFReader(str(dst)).tensors
        assert tensor.tensor_type == expected
        out = gguf_dequantize(np.array(tensor.data), expected).reshape(4, cols)
        np.testing.assert_allclose(out, values, atol=0.4 if expected != QT.F16 else 1e-3)


def test_0d_1d_and_3d_tensors(tmp_path):
    src, dst = tmp_path / "src.gguf", tmp_path / "dst.gguf"
    experts = _weights((2, 4, 256), seed=3)
    src.write_bytes(
        _gguf(
            _llama(),
            [
                ("blk.0.scale.weight", (), QT.F32, struct.pack("<f", 2.5)),
                ("blk.0.attn_norm.weight", (256,), QT.F32, np.ones(256, np.float32).tobytes()),
                ("blk.0.ffn_gate_exps.weight", (2, 4, 256), QT.F32, experts.tobytes()),
            ],
        )
    )
    for file_type in ("Q4_0", "Q4_K_M", "F16"):
        quantize_file(src, dst, file_type, show_progress=False)
        check_gguf_file(dst)
        tensors = {t.name: t for t in GGUFReader(str(dst)).tensors}
        assert float(np.array(tensors["blk.0.scale.weight"].data).reshape(-1)[0]) == 2.5
        assert tensors["blk.0.attn_norm.weight"].tensor_type == QT.F32
        exps = tensors["blk.0.ffn_gate_exps.weight"]
        assert tuple(int(d) for d in exps.shape) == (256, 4, 2)
        out = gguf_dequantize(np.array(exps.data), exps.tensor_type).reshape(2, 4, 256)
        np.testing.assert_allclose(out, experts, atol=0.35)


@pytest.mark.parametrize("name", ["blk.abc.attn_q.weight", "blk", "blk.1"])
def test_unusual_tensor_names_do_not_crash_the_mix(tmp_path, name):
    """llama.cpp reads the layer with sscanf("blk.%d."); a name without one is no layer."""
    src = _f32_source(tmp_path / "src.gguf", shape=(4, 256), name=name)
    dst = tmp_path / "dst.gguf"
    try:
        quantize_file(src, dst, "Q4_K_M", show_progress=False)
    except KVForgeError:
        assert _leftovers(dst) == []
    else:
        check_gguf_file(dst)


# ------------------------------------------------------------ every source type to every target


def _random_blocks(qtype: QT, rows: int, cols: int, seed: int) -> np.ndarray:
    block, size = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows * cols // block, size), dtype=np.uint8)
    raw[:, :2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)  # a sane scale
    return raw.reshape(rows, cols // block * size)


@pytest.fixture(scope="module")
def mixed_source(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("mixed") / "src.gguf"
    x = _weights((2, 256), seed=5)
    writer = GGUFWriter(str(path), arch="llama")
    writer.add_custom_alignment(64)
    writer.add_block_count(1)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_token_list(["a", "ünï", ""])
    writer.add_tensor("blk.0.attn_q.weight", x.astype(np.float16))
    writer.add_tensor("blk.0.attn_k.weight", gguf_quants.quantize(x, QT.BF16), raw_dtype=QT.BF16)
    for qtype in (QT.Q4_K, QT.Q6_K, QT.Q2_K, QT.Q3_K, QT.Q5_K, QT.IQ4_NL, QT.Q4_0, QT.Q8_0):
        writer.add_tensor(f"blk.0.t{qtype.name}.weight", torch_quantize(x, qtype), raw_dtype=qtype)
    for i, qtype in enumerate((QT.IQ4_XS, QT.IQ2_XXS, QT.IQ3_S, QT.IQ1_M, QT.Q5_1)):
        raw = _random_blocks(qtype, 2, 256, i)
        writer.add_tensor(f"blk.0.r{qtype.name}.weight", raw, raw_dtype=qtype)
    writer.add_tensor("blk.0.attn_norm.weight", np.ones(256, np.float32))
    writer.add_tensor("blk.0.ffn_up_exps.weight", _weights((2, 2, 256), seed=6))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("file_type", list(BASE_TYPES))
def test_every_source_type_to_every_target_loads_back(tmp_path, mixed_source, file_type):
    dst = tmp_path / "dst.gguf"
    counts = quantize_file(mixed_source, dst, file_type, show_progress=False)
    before, after = GGUFReader(str(mixed_source)), GGUFReader(str(dst))
    assert sum(counts.values()) == len(before.tensors)
    assert after.alignment == 64 and after.data_offset % 64 == 0
    for key in ("tokenizer.ggml.tokens", "llama.block_count", "llama.attention.head_count"):
        assert after.fields[key].contents() == before.fields[key].contents()
    check_gguf_file(dst)
    reader = open_gguf(dst)
    sources = {t.name: t for t in before.tensors}
    for tensor in reader.tensors:
        source = sources[tensor.name]
        assert list(tensor.shape) == list(source.shape)
        assert tensor.tensor_type in SUPPORTED_TYPES
        dequantize_tensor(tensor)  # kvforge's own loader reads it
        if file_type == "F32":  # lossless: the dequantized source exactly
            expected = gguf_dequantize(np.array(source.data), source.tensor_type)
            np.testing.assert_array_equal(np.array(tensor.data).reshape(expected.shape), expected)


@pytest.mark.parametrize("alignment", [1, 8, 64, 4096])
def test_source_alignment_is_kept(tmp_path, alignment):
    src, dst = tmp_path / "src.gguf", tmp_path / "dst.gguf"
    kvs = [*_llama(), _kv("general.alignment", VT.UINT32, _u32(alignment))]
    tensors = [
        ("blk.0.attn_norm.weight", (33,), QT.F32, np.ones(33, np.float32).tobytes()),
        (Q, (2, 64), QT.Q8_0, torch_quantize(_weights((2, 64)), QT.Q8_0).tobytes()),
    ]
    src.write_bytes(_gguf(kvs, tensors, alignment))
    quantize_file(src, dst, "Q4_0", show_progress=False)
    reader = GGUFReader(str(dst))
    assert reader.alignment == alignment
    assert all(t.data_offset % alignment == 0 for t in reader.tensors)
    check_gguf_file(dst)


# ----------------------------------------------------------------------- NaN / inf weights


@pytest.mark.parametrize("file_type", ["Q8_0", "Q4_0", "Q4_1", "Q4_K_M", "IQ4_NL"])
def test_non_finite_weights_are_refused(tmp_path, file_type):
    """llama.cpp validates every quantized row ("quantized data validation failed"); here a
    NaN/inf weight silently becomes a NaN scale (the whole block reads back NaN) or a zeroed
    block."""
    values = _weights((4, 256))
    values[0, 0], values[1, 3], values[2, 5] = np.nan, np.inf, -np.inf
    src, dst = tmp_path / "src.gguf", tmp_path / "dst.gguf"
    src.write_bytes(_gguf(_llama(), [(Q, (4, 256), QT.F32, values.tobytes())]))
    _typed_error(src, dst, file_type)


@needs_library
def test_native_and_torch_paths_both_refuse_non_finite_values():
    """The same bytes are promised for finite values; NaN and infinity are refused by both."""
    x = np.linspace(-1, 1, 256, dtype=np.float32).reshape(1, 256)
    x[0, 5] = np.nan
    for qtype in [*LEGACY, QT.Q4_K, QT.F16]:
        with pytest.raises(NonFiniteError):
            quantize_tensor(x, qtype)
    with pytest.raises(NonFiniteError):
        blocks.quantize(np.full((1, 32), np.inf, np.float32), QT.Q8_0)
    raw = np.frombuffer(np.float16(np.inf).tobytes() + bytes(32), np.uint8)  # an inf scale
    with pytest.raises(NonFiniteError):
        blocks.requantize(raw, QT.Q8_0, QT.Q4_0, (1, 32))


# ---------------------------------------------------------------- native vs torch, threads


@needs_library
def test_native_blocks_equal_torch_on_random_shapes():
    rng = np.random.default_rng(11)
    for _ in range(12):
        shape = (*rng.integers(1, 3, rng.integers(0, 2)), int(rng.integers(1, 40)))
        shape = (*shape, int(rng.integers(1, 17)) * 32)
        x = (rng.standard_normal(shape) * 10.0 ** rng.uniform(-6, 4)).astype(np.float32)
        for qtype in LEGACY:
            native = blocks.quantize(x, qtype)
            np.testing.assert_array_equal(native, torch_quantize(x, qtype), err_msg=qtype.name)
            values = blocks.dequantize(native, qtype, x.shape)
            np.testing.assert_array_equal(
                values, gguf_dequantize(native, qtype).reshape(x.shape), err_msg=qtype.name
            )
            for target in LEGACY:
                np.testing.assert_array_equal(
                    blocks.requantize(native, qtype, target, x.shape),
                    torch_quantize(values, target),
                    err_msg=f"{qtype.name} -> {target.name}",
                )


@needs_library
def test_many_threads_and_tiny_chunks_give_the_same_bytes(monkeypatch):
    x = _weights((37, 1024), seed=4)
    expected = {qtype: torch_quantize(x, qtype) for qtype in LEGACY}
    monkeypatch.setattr(blocks, "_threads", lambda: 64)
    monkeypatch.setattr(blocks, "_CHUNK_BLOCKS", 7)
    for qtype in LEGACY:
        data = blocks.quantize(x, qtype)
        np.testing.assert_array_equal(data, expected[qtype])
        values = blocks.dequantize(data, qtype, x.shape)
        np.testing.assert_array_equal(values, gguf_dequantize(data, qtype).reshape(x.shape))
        np.testing.assert_array_equal(
            blocks.requantize(data, qtype, QT.Q4_1, x.shape), torch_quantize(values, QT.Q4_1)
        )


@needs_library
def test_requantized_file_equals_the_torch_path(tmp_path, monkeypatch):
    """Legacy to legacy takes blocks.requantize; the same bytes as dequantize + torch."""
    x = _weights((16, 512), seed=8)
    src, dst = tmp_path / "src.gguf", tmp_path / "dst.gguf"
    src.write_bytes(
        _gguf(_llama(), [(Q, (16, 512), QT.Q8_0, torch_quantize(x, QT.Q8_0).tobytes())])
    )
    monkeypatch.setattr(blocks, "_threads", lambda: 16)
    monkeypatch.setattr(blocks, "_CHUNK_BLOCKS", 5)
    for file_type in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"):
        quantize_file(src, dst, file_type, show_progress=False)
        [tensor] = GGUFReader(str(dst)).tensors
        values = gguf_dequantize(torch_quantize(x, QT.Q8_0), QT.Q8_0).reshape(16, 512)
        expected = torch_quantize(values.astype(np.float32), QT[file_type])
        np.testing.assert_array_equal(np.array(tensor.data).reshape(expected.shape), expected)


# ---------------------------------------------------------------------------- destinations


def test_missing_destination_directory_is_a_typed_error(tmp_path):
    src = _f32_source(tmp_path / "src.gguf")
    _typed_error(src, tmp_path / "missing" / "dst.gguf")


def test_destination_under_a_file_is_a_typed_error(tmp_path):
    src = _f32_source(tmp_path / "src.gguf")
    (tmp_path / "file").write_text("x")
    _typed_error(src, tmp_path / "file" / "dst.gguf")


def test_empty_destination_is_a_typed_error(tmp_path):
    src = _f32_source(tmp_path / "src.gguf")
    with pytest.raises(KVForgeError):
        quantize_file(src, "", "Q8_0", show_progress=False)


def test_destination_that_is_a_directory_is_refused_without_leftovers(tmp_path):
    src = _f32_source(tmp_path / "src.gguf")
    dst = tmp_path / "out"
    dst.mkdir()
    with pytest.raises(KVForgeError):
        quantize_file(src, dst, "Q8_0", show_progress=False)
    assert dst.is_dir() and not list(dst.iterdir())
    assert not (tmp_path / "out.partial").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_destination_directory_is_a_typed_error(tmp_path):
    src = _f32_source(tmp_path / "src.gguf")
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        _typed_error(src, folder / "dst.gguf")
    finally:
        folder.chmod(0o755)


def test_stale_partial_file_is_replaced(tmp_path):
    src, dst = _f32_source(tmp_path / "src.gguf"), tmp_path / "dst.gguf"
    (tmp_path / "dst.gguf.partial").write_bytes(b"junk from a killed run")
    quantize_file(src, dst, "Q8_0", show_progress=False)
    assert _leftovers(dst) == ["dst.gguf"]
    check_gguf_file(dst)


def test_partial_path_that_is_a_directory_is_a_typed_error(tmp_path):
    src, dst = _f32_source(tmp_path / "src.gguf"), tmp_path / "dst.gguf"
    (tmp_path / "dst.gguf.partial").mkdir()
    with pytest.raises(KVForgeError):
        quantize_file(src, dst, "Q8_0", show_progress=False)
    assert not dst.exists()


def test_partial_symlink_does_not_clobber_its_target(tmp_path):
    """A DST.partial symlink (planted, or left by a tool) must not be written through."""
    src, dst = _f32_source(tmp_path / "src.gguf"), tmp_path / "dst.gguf"
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "dst.gguf.partial").symlink_to(victim)
    with contextlib.suppress(KVForgeError):
        quantize_file(src, dst, "Q8_0", show_progress=False)
    assert victim.read_text() == "precious"


def test_source_equal_to_destination_is_refused_or_stays_sound(tmp_path):
    src = _f32_source(tmp_path / "model.gguf")
    try:
        quantize_file(src, src, "Q8_0", show_progress=False)
    except InvalidRequestError:
        assert src.read_bytes()[:4] == b"GGUF"
    check_gguf_file(src)
    assert not (tmp_path / "model.gguf.partial").exists()
    link = tmp_path / "link.gguf"
    link.symlink_to(src)
    before = src.read_bytes()
    with contextlib.suppress(InvalidRequestError):
        quantize_file(src, link, "Q4_0", show_progress=False)
    assert src.read_bytes() == before  # the source itself is never half-overwritten
    check_gguf_file(link)


# ------------------------------------------------------------------------ interrupted runs


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_exception_mid_run_leaves_no_file_and_keeps_the_old_one(tmp_path, error):
    src, dst = tmp_path / "src.gguf", tmp_path / "dst.gguf"
    src.write_bytes(
        _gguf(_llama(), [(f"blk.0.t{i}.weight", (4, 64), QT.F32, _W) for i in range(3)])
    )
    dst.write_bytes(b"the previous output")
    seen = []

    def fail_second(name, values):
        seen.append(name)
        if len(seen) == 2:
            raise error("stop")
        return values

    with pytest.raises(error):
        quantize_file(src, dst, "Q8_0", show_progress=False, adjust=fail_second)
    assert dst.read_bytes() == b"the previous output"
    assert not (tmp_path / "dst.gguf.partial").exists()


@needs_library
def test_interrupt_inside_the_native_requantize_path_leaves_nothing(tmp_path, monkeypatch):
    src, dst = tmp_path / "src.gguf", tmp_path / "dst.gguf"
    q8 = torch_quantize(_weights((4, 64)), QT.Q8_0).tobytes()
    src.write_bytes(
        _gguf(_llama(), [(f"blk.0.t{i}.weight", (4, 64), QT.Q8_0, q8) for i in range(3)])
    )
    calls = []
    real = blocks.requantize

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(blocks, "requantize", interrupted)
    with pytest.raises(KeyboardInterrupt):
        quantize_file(src, dst, "Q4_0", show_progress=False)
    assert _leftovers(dst) == []


# ------------------------------------------------------------------------------- imatrix


def _imatrix(path: Path, length: int = 256, value: float = 1.0) -> Path:
    write_imatrix(path, {Q: np.full(length, value)}, {Q: 10}, ["calibration"], 1, 512)
    return path


def _imatrix_with(path: Path, key_value=None, in_sum2=None, raw_dtype=None) -> Path:
    writer = GGUFWriter(str(path), arch="imatrix")
    if key_value is not None:
        writer.add_key_value("imatrix.chunk_count", *key_value)
    data = np.ones((1, 256), np.float32) if in_sum2 is None else in_sum2
    writer.add_tensor(f"{Q}.in_sum2", data, raw_dtype=raw_dtype)
    writer.add_tensor(f"{Q}.counts", np.ones((1, 1), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def imatrix_source(tmp_path) -> Path:
    return _f32_source(tmp_path / "src.gguf", shape=(4, 256))


def test_sound_imatrix_files_work(tmp_path, imatrix_source):
    imatrix = _imatrix(tmp_path / "im.gguf")
    dst = tmp_path / "dst.gguf"
    for file_type in ("Q4_K_M", "Q4_0", "IQ4_NL", "Q2_K", "F16"):
        quantize_file(imatrix_source, dst, file_type, imatrix, show_progress=False)
        reader = GGUFReader(str(dst))
        assert reader.fields["quantize.imatrix.entries_count"].contents() == 1
        check_gguf_file(dst)


def test_broken_imatrix_files_are_typed_errors(tmp_path, imatrix_source):
    dst = tmp_path / "dst.gguf"
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not an imatrix" * 8)
    good = _imatrix(tmp_path / "im.gguf").read_bytes()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(good[: len(good) // 2])
    no_counts = tmp_path / "nocounts.gguf"
    writer = GGUFWriter(str(no_counts), arch="imatrix")
    writer.add_tensor(f"{Q}.in_sum2", np.ones((1, 256), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    folder = tmp_path / "folder"
    folder.mkdir()
    for imatrix in (garbage, truncated, no_counts, folder, tmp_path / "missing.gguf"):
        _typed_error(imatrix_source, dst, "Q4_K_M", imatrix=imatrix)


@pytest.mark.parametrize("file_type", ["Q4_K_M", "Q4_0"])
def test_imatrix_of_the_wrong_length_is_a_typed_error(tmp_path, imatrix_source, file_type):
    imatrix = _imatrix(tmp_path / "im.gguf", length=100)
    _typed_error(imatrix_source, tmp_path / "dst.gguf", file_type, imatrix=imatrix)


def test_imatrix_with_quantized_sums_is_a_typed_error(tmp_path, imatrix_source):
    sums = torch_quantize(np.ones((1, 256), np.float32), QT.Q8_0)
    imatrix = _imatrix_with(tmp_path / "im.gguf", in_sum2=sums, raw_dtype=QT.Q8_0)
    _typed_error(imatrix_source, tmp_path / "dst.gguf", "Q4_K_M", imatrix=imatrix)


@pytest.mark.parametrize(
    "key_value",
    [("lots", VT.STRING), ([1, 2], VT.ARRAY, VT.UINT32), (2**40, VT.UINT64)],
    ids=["string", "array", "huge"],
)
def test_imatrix_chunk_count_of_a_bad_type_is_a_typed_error(tmp_path, imatrix_source, key_value):
    imatrix = _imatrix_with(tmp_path / "im.gguf", key_value=key_value)
    _typed_error(imatrix_source, tmp_path / "dst.gguf", "Q4_K_M", imatrix=imatrix)


def test_non_finite_imatrix_is_refused(tmp_path, imatrix_source):
    """A NaN importance silently writes NaN / inf weights into the output."""
    imatrix = _imatrix(tmp_path / "im.gguf", value=float("nan"))
    _typed_error(imatrix_source, tmp_path / "dst.gguf", "Q4_K_M", imatrix=imatrix)


# ----------------------------------------------------------------------------------- CLI


def test_cli_typed_errors_are_one_line_exit_2(tmp_path, capsys):
    src = tmp_path / "src.gguf"
    src.write_bytes(_gguf(_BAD_METADATA["duplicate_key"], [(Q, (4, 64), QT.F32, _W)]))
    assert main(["quantize", str(src), str(tmp_path / "dst.gguf"), "Q8_0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert main(["quantize", str(src), str(tmp_path / "dst.gguf"), "Q9_9"]) == 2
    assert main(["quantize", str(src), str(tmp_path / "dst.gguf")]) == 2
    assert main(["quantize", str(src), str(tmp_path / "d.gguf"), "Q8_0", "--pure",
                 "--output-tensor-type", "nonsense"]) == 2  # fmt: skip
    assert list(tmp_path.iterdir()) == [src]


def test_cli_unwritable_destination_is_one_line_exit_2(tmp_path, capsys):
    src = _f32_source(tmp_path / "src.gguf")
    assert main(["quantize", str(src), str(tmp_path / "missing" / "dst.gguf"), "Q8_0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err

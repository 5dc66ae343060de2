"""Corrupt, truncated and hostile GGUF files end in a one-line ModelFileError that names the
file: never another exception, a hang or a large allocation. Sound files still load."""

from __future__ import annotations

import random
import struct
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFEndian, GGUFReader, GGUFWriter
from gguf.quants import quantize as gguf_quantize

from kvforge.config import ModelConfig
from kvforge.errors import ModelFileError, ModelNotFoundError
from kvforge.layers.attention import create_attention_backend
from kvforge.loader import load_model
from kvforge.loader.gguf_check import check_gguf_file, open_gguf
from kvforge.loader.gguf_loader import SUPPORTED_TYPES, dequantize_tensor, read_metadata

Q8_0 = GGMLQuantizationType.Q8_0
HUGE_U64 = (2**63 - 1, 2**64 - 1, 2**32, 2**40)
HUGE_U32 = (2**32 - 1, 2**31, 0xFFFF, 13)


def write_small_gguf(
    path: Path, arch: str = "fuzz", endianess: GGUFEndian = GGUFEndian.LITTLE
) -> Path:
    """A few metadata fields (string, numbers, bool, string and int arrays) and three small
    tensors (F32 matrix and vector, Q8_0 matrix), 64-byte aligned."""
    writer = GGUFWriter(str(path), arch=arch, endianess=endianess)
    writer.add_custom_alignment(64)
    writer.add_string("general.name", "fuzz test")
    writer.add_uint32(f"{arch}.block_count", 2)
    writer.add_float32(f"{arch}.rope.freq_base", 10000.0)
    writer.add_bool(f"{arch}.flag", True)
    writer.add_array("tokenizer.ggml.tokens", ["<s>", "a", "bé", "ccc"])
    writer.add_array("tokenizer.ggml.token_type", [1, 1, 1, 1])
    rng = np.random.default_rng(0)
    writer.add_tensor("token_embd.weight", rng.standard_normal((4, 8), dtype=np.float32))
    writer.add_tensor("output_norm.weight", np.ones(8, dtype=np.float32))
    rows = rng.standard_normal((2, 64), dtype=np.float32)
    writer.add_tensor("blk.0.ffn_down.weight", gguf_quantize(rows, Q8_0), raw_dtype=Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


class Layout(NamedTuple):
    """Where things are in the small file."""

    data: bytes
    data_start: int  # end of the header region (tensor infos and padding)
    data_end: int  # end of the last tensor's data
    scalars: list[tuple[int, int]]  # (offset, size) of each u32 / u64 count, length, type ...
    fields: dict[str, list[int]]  # offsets of each part of each key / tensor info


def _layout(path: Path) -> Layout:
    reader = GGUFReader(str(path))
    base = reader.data.ctypes.data
    fields: dict[str, list[int]] = {}
    scalars = set()
    infos = [*reader.fields.values(), *(t.field for t in reader.tensors)]
    for field in infos:
        fields[field.name] = [part.ctypes.data - base for part in field.parts]
        for part in field.parts:
            if part.dtype.kind == "u" and part.dtype.itemsize in (4, 8):
                start = part.ctypes.data - base
                size = part.dtype.itemsize
                scalars.update((start + i * size, size) for i in range(part.size))
    data_end = max(t.data_offset + t.n_bytes for t in reader.tensors)
    return Layout(path.read_bytes(), reader.data_offset, data_end, sorted(scalars), fields)


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Layout:
    return _layout(write_small_gguf(tmp_path_factory.mktemp("gguf") / "valid.gguf"))


def _mutate(data: bytes, edits: list[tuple[int, str, int]]) -> bytes:
    buf = bytearray(data)
    for offset, fmt, value in edits:
        struct.pack_into("<" + fmt, buf, offset, value)
    return bytes(buf)


def _load_or_error(path: Path) -> ModelFileError | None:
    """The typed error (checked to be one line naming the file), or None when the file loads
    and every tensor reads."""
    try:
        check_gguf_file(path)
    except ModelFileError as exc:
        message = str(exc)
        assert message.startswith(f"{path}: ") and "\n" not in message, message
        return exc
    reader = GGUFReader(str(path))  # the pre-pass passed: the reader itself must not trip
    try:
        read_metadata(reader)
    except ModelFileError as exc:
        return exc
    for tensor in reader.tensors:
        assert np.array(tensor.data).nbytes == tensor.n_bytes
        if tensor.tensor_type in SUPPORTED_TYPES:
            dequantize_tensor(tensor)
    return None


def _write(tmp_path: Path, data: bytes, name: str = "mutated.gguf") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_the_small_file_loads(layout: Layout, tmp_path: Path) -> None:
    path = _write(tmp_path, layout.data)
    assert _load_or_error(path) is None
    header = check_gguf_file(path)
    assert (header.num_tensors, header.alignment, header.data_start) == (3, 64, layout.data_start)


def test_a_big_endian_file_passes(tmp_path: Path) -> None:
    path = write_small_gguf(tmp_path / "be.gguf", endianess=GGUFEndian.BIG)
    assert check_gguf_file(path).num_tensors == 3
    assert len(GGUFReader(str(path)).tensors) == 3


def test_every_truncation_fails_cleanly(layout: Layout, tmp_path: Path) -> None:
    rng = random.Random(0)
    in_data = rng.sample(range(layout.data_start + 1, len(layout.data)), 60)
    for cut in [*range(layout.data_start + 1), *in_data]:
        error = _load_or_error(_write(tmp_path, layout.data[:cut]))
        if cut < layout.data_end:
            assert error is not None, f"truncated at {cut} but loads"


@pytest.mark.parametrize("kind", ["byte", "bit"])
def test_random_flips_in_the_header_fail_cleanly_or_load(
    layout: Layout, tmp_path: Path, kind: str
) -> None:
    rng = random.Random(1234 if kind == "byte" else 4321)
    num_errors = 0
    for _ in range(300):
        buf = bytearray(layout.data)
        for _ in range(rng.choice((1, 1, 2, 4))):
            pos = rng.randrange(layout.data_start)
            buf[pos] = rng.randrange(256) if kind == "byte" else buf[pos] ^ (1 << rng.randrange(8))
        num_errors += _load_or_error(_write(tmp_path, bytes(buf))) is not None
    assert num_errors > 100  # most flips in counts, lengths and types are caught


def test_huge_values_in_every_count_and_length_fail_cleanly(layout: Layout, tmp_path: Path) -> None:
    for offset, size in layout.scalars:
        for value in HUGE_U64 if size == 8 else HUGE_U32:
            fmt = "Q" if size == 8 else "I"
            _load_or_error(_write(tmp_path, _mutate(layout.data, [(offset, fmt, value)])))


def _part(layout: Layout, field: str, index: int) -> int:
    return layout.fields[field][index]


# (what, edits as (field, part index or raw offset, struct format, value), expected message)
_CASES: list[tuple[str, list[tuple[str | None, int, str, int]], str]] = [
    ("magic", [(None, 0, "I", 0x4C4D4747)], "not a GGUF file"),  # "GGML"
    ("version 1", [(None, 4, "I", 1)], "unsupported GGUF version 1"),
    ("version 4", [(None, 4, "I", 4)], "unsupported GGUF version 4"),
    ("tensor count", [(None, 8, "Q", 2**60)], f"tensor count {2**60} exceeds file size"),
    ("metadata count", [(None, 16, "Q", 2**63 - 1)], "metadata count"),
    ("key length", [("general.name", 0, "Q", 2**50)], "string length 1125899906842624 exceeds"),
    ("string length", [("general.name", 3, "Q", 2**50)], "string length 1125899906842624"),
    ("value type", [("general.name", 2, "I", 13)], "'general.name': unknown value type 13"),
    ("array type", [("tokenizer.ggml.tokens", 3, "I", 99)], "unknown value type 99"),
    ("array length", [("tokenizer.ggml.token_type", 4, "Q", 2**60)], "array length"),
    ("string in array", [("tokenizer.ggml.tokens", 5, "Q", 2**40)], "string length"),
    ("alignment 0", [("general.alignment", 3, "I", 0)], "alignment 0 is not a power of two"),
    ("alignment 48", [("general.alignment", 3, "I", 48)], "alignment 48 is not a power"),
    ("alignment type", [("general.alignment", 2, "I", 5)], "type INT32, expected UINT32"),
    ("n_dims", [("token_embd.weight", 2, "I", 9)], "9 dimensions (at most 8)"),
    ("dim", [("token_embd.weight", 3, "Q", 2**40)], "exceeds file size"),
    ("zero dim", [("token_embd.weight", 3, "Q", 0)], "has a zero dimension"),
    ("tensor type", [("token_embd.weight", 4, "I", 99)], "unknown tensor type 99"),
    ("block size", [("blk.0.ffn_down.weight", 4, "I", 12)], "not a multiple of the Q4_K block"),
    ("offset", [("output_norm.weight", 5, "Q", 2**40)], "lies beyond the end of the file"),
    ("misaligned", [("output_norm.weight", 5, "Q", 200)], "not a multiple of the alignment 64"),
    ("overlap", [("output_norm.weight", 5, "Q", 0)], "overlap"),
]


@pytest.mark.parametrize(("edits", "expected"), [c[1:] for c in _CASES], ids=[c[0] for c in _CASES])
def test_targeted_corruption_names_the_problem(
    layout: Layout, tmp_path: Path, edits: list[tuple[str | None, int, str, int]], expected: str
) -> None:
    raw = [(o if f is None else _part(layout, f, o), fmt, v) for f, o, fmt, v in edits]
    path = _write(tmp_path, _mutate(layout.data, raw))
    with pytest.raises(ModelFileError) as info:
        open_gguf(path)
    assert str(info.value).startswith(f"{path}: ") and expected in str(info.value)


def test_truncated_data_and_empty_files(layout: Layout, tmp_path: Path) -> None:
    path = _write(tmp_path, layout.data[: layout.data_end - 1])
    with pytest.raises(ModelFileError, match=r"truncated at byte \d+ \(tensor 'blk.0.ffn_down"):
        open_gguf(path)
    with pytest.raises(ModelFileError, match="not a GGUF file"):
        open_gguf(_write(tmp_path, b""))
    with pytest.raises(ModelFileError, match="truncated at byte 2"):
        open_gguf(_write(tmp_path, b"GG"))
    with pytest.raises(ModelNotFoundError):
        open_gguf(tmp_path / "missing.gguf")


def test_long_strings_are_checked_in_chunks(tmp_path: Path) -> None:
    path = tmp_path / "long.gguf"
    writer = GGUFWriter(str(path), arch="fuzz")
    writer.add_string("fuzz.text", "é" * 1_500_000)  # 3 MB: past the 1 MiB decoding chunk
    writer.add_tensor("output_norm.weight", np.ones(8, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert check_gguf_file(path).num_tensors == 1
    data = bytearray(path.read_bytes())
    data[data.index("é".encode()) + 2_000_001] = 0xFF  # in the second chunk
    with pytest.raises(ModelFileError, match="'fuzz.text': string is not valid UTF-8"):
        check_gguf_file(_write(tmp_path, bytes(data)))


@pytest.mark.parametrize(
    ("field", "index", "fmt", "value"),
    [
        (None, 8, "Q", 2**60),  # tensor count
        (None, 16, "Q", 2**60),  # metadata count
        ("general.name", 3, "Q", 2**50),  # string length
        ("tokenizer.ggml.token_type", 4, "Q", 2**60),  # GGUFReader loops over this one
        ("tokenizer.ggml.tokens", 4, "Q", 2**40),  # array of strings
        ("token_embd.weight", 3, "Q", 2**62),  # tensor dimension
    ],
)
def test_huge_claims_fail_fast_in_little_memory(
    layout: Layout, tmp_path: Path, field: str | None, index: int, fmt: str, value: int
) -> None:
    offset = index if field is None else _part(layout, field, index)
    path = _write(tmp_path, _mutate(layout.data, [(offset, fmt, value)]))
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(ModelFileError, match="exceeds file size"):
            open_gguf(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - start < 1.0
    assert peak < 16 * 2**20


def test_metadata_a_model_needs_is_a_typed_error(tmp_path: Path) -> None:
    path = write_small_gguf(tmp_path / "llama.gguf", arch="llama")  # no llama hyperparameters
    with pytest.raises(ModelFileError, match=str(path)):
        load_model(ModelConfig(model=str(path)), create_attention_backend(), False)


def test_the_embedded_model_passes_quickly(smollm_path: str) -> None:
    start = time.perf_counter()
    header = check_gguf_file(smollm_path)
    assert time.perf_counter() - start < 3.0
    assert header.version == 3 and header.num_tensors == 272 and header.alignment == 32


def test_cli_reports_a_corrupt_model_in_one_line(layout: Layout, tmp_path: Path) -> None:
    path = _write(tmp_path, layout.data[: layout.data_start // 2], "corrupt.gguf")
    result = subprocess.run(
        [sys.executable, "-m", "kvforge.entrypoints.cli", "generate", "-m", str(path), "-p", "hi"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: "), result.stderr

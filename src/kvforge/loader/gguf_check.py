"""Validating pre-pass over a GGUF file's header, run before ``gguf.GGUFReader`` sees it.

Why our own walker: ``GGUFReader`` parses first and validates little. It believes every count
and length in the file, so a corrupt or truncated file ends in an IndexError / ValueError
traceback from deep inside numpy, and an array that claims 2**60 elements makes it loop,
appending an empty view per missing element, until memory runs out. This pass reads the
header with ``struct`` from a read-only mmap, bounds every count and length by the bytes left
in the file before acting on it, checks that each tensor's data lies inside the file, and
raises :class:`ModelFileError` (``"<path>: <what is wrong>"``, one line) at the first problem.

Layout (little-endian, or big-endian when the version reads byte-swapped)::

    "GGUF" u32 version  u64 num_tensors  u64 num_kv
    num_kv x      (string key, u32 value_type, value)
    num_tensors x (string name, u32 n_dims, u64 dims[n_dims], u32 ggml_type, u64 offset)
    padding to general.alignment (default 32), then tensor data at data_start + offset
    string = u64 length + UTF-8 bytes; array = u32 element_type + u64 count + elements
"""

from __future__ import annotations

import codecs
import mmap
import os
import struct
import sys
from pathlib import Path
from typing import Any, NamedTuple

from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType, GGUFReader
from gguf import GGUFValueType as VT

from kvforge.errors import ModelFileError, ModelNotFoundError

MAX_DIMS = 8  # ggml uses 4 (GGML_MAX_DIMS); the format itself has no limit, so be lenient
MAX_NAME_BYTES = 1 << 16  # key and tensor name lengths (ggml allows 63 for tensor names)
MAX_ARRAY_DEPTH = 4  # nested arrays; GGUFReader recurses per level
_CHUNK = 1 << 20  # long strings are UTF-8 checked in chunks of this many bytes

_SCALAR_SIZES = {
    VT.UINT8: 1,
    VT.INT8: 1,
    VT.BOOL: 1,
    VT.UINT16: 2,
    VT.INT16: 2,
    VT.UINT32: 4,
    VT.INT32: 4,
    VT.FLOAT32: 4,
    VT.UINT64: 8,
    VT.INT64: 8,
    VT.FLOAT64: 8,
}
# Fewest bytes one value of each type takes: bounds a count before the elements are walked.
_MIN_SIZES = {**_SCALAR_SIZES, VT.STRING: 8, VT.ARRAY: 12}
_MIN_KV_BYTES = 8 + 4 + 1  # empty key, value type, one-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # empty name, n_dims = 0, type, offset
# GGUFReader registers these pseudo-keys itself; a file key of the same name is a duplicate.
_RESERVED_KEYS = {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"}


class MetadataSpan(NamedTuple):
    """Where one key/value pair lies in the file (absolute byte offsets)."""

    start: int  # the key's length field: [start, end) is the whole pair, to copy it as it is
    value_start: int  # the value, after its type field
    end: int
    vtype: VT


class TensorInfo(NamedTuple):
    """One tensor's header entry."""

    name: str
    shape: tuple[int, ...]  # row-major (numpy) order: GGUF's dims reversed
    qtype: GGMLQuantizationType
    offset: int  # relative to the data section
    num_bytes: int


class GGUFHeader(NamedTuple):
    """What the pre-pass learned about a sound GGUF file."""

    version: int
    num_tensors: int
    num_kv: int
    alignment: int
    data_start: int  # absolute byte offset of the tensor data section
    byte_order: str  # struct's "<" or ">"
    metadata: dict[str, MetadataSpan]  # in file order
    tensors: tuple[TensorInfo, ...]  # in file order


def _quote(name: str) -> str:
    """A key or tensor name for a message: quoted, escaped, and cut short."""
    return repr(name) if len(name) <= 64 else repr(name[:64]) + "..."


class _TensorSpan(NamedTuple):
    start: int  # relative to the data section
    end: int
    name: str  # quoted for messages


class _Walker:
    """Cursor over the mapped file; every read is bounds-checked first."""

    def __init__(self, path: Path, buf: mmap.mmap) -> None:
        self.path = path
        self.buf = buf
        self.size = len(buf)
        self.pos = 0
        self.order = "<"

    def fail(self, problem: str) -> ModelFileError:
        return ModelFileError(self.path, problem)

    def need(self, num_bytes: int, where: str) -> None:
        if num_bytes > self.size - self.pos:
            raise self.fail(f"truncated at byte {self.size} ({where})")

    def unpack(self, fmt: str, where: str) -> int:
        size = struct.calcsize(fmt)
        self.need(size, where)
        (value,) = struct.unpack_from(self.order + fmt, self.buf, self.pos)
        self.pos += size
        return int(value)

    def bound(self, count: int, min_size: int, what: str, where: str) -> None:
        """``count`` values of at least ``min_size`` bytes each must fit in what is left."""
        if count * min_size > self.size:
            raise self.fail(f"{what} {count} exceeds file size")
        self.need(count * min_size, where)

    def string(self, where: str, max_len: int | None = None) -> str:
        length = self.unpack("Q", where)
        self.bound(length, 1, f"{where}: string length", where)
        if max_len is not None and length > max_len:
            raise self.fail(f"{where}: length {length} exceeds {max_len} bytes")
        start, self.pos = self.pos, self.pos + length
        try:
            if length <= _CHUNK:
                return str(self.buf[start : self.pos], "utf-8")  # slicing an mmap copies
            # Long values are only checked, a chunk at a time; nothing needs their text here.
            decoder = codecs.getincrementaldecoder("utf-8")()
            for offset in range(start, self.pos, _CHUNK):
                decoder.decode(self.buf[offset : min(offset + _CHUNK, self.pos)])
            decoder.decode(b"", final=True)
            return ""
        except UnicodeDecodeError:
            raise self.fail(f"{where}: string is not valid UTF-8") from None


def _value_type(walker: _Walker, where: str) -> VT:
    raw = walker.unpack("I", where)
    try:
        return VT(raw)
    except ValueError:
        raise walker.fail(f"{where}: unknown value type {raw}") from None


def _skip_value(walker: _Walker, vtype: VT, where: str, depth: int = 0) -> VT | None:
    """Walk one value; returns an array's element type (None for other values)."""
    if vtype in _SCALAR_SIZES:
        walker.need(_SCALAR_SIZES[vtype], where)
        walker.pos += _SCALAR_SIZES[vtype]
        return None
    if vtype == VT.STRING:
        walker.string(where)
        return None
    if depth >= MAX_ARRAY_DEPTH:
        raise walker.fail(f"{where}: arrays nested deeper than {MAX_ARRAY_DEPTH}")
    element = _value_type(walker, where)
    count = walker.unpack("Q", where)
    walker.bound(count, _MIN_SIZES[element], f"{where}: array length", where)
    if element in _SCALAR_SIZES:
        walker.pos += count * _SCALAR_SIZES[element]
    elif element == VT.STRING:
        for _ in range(count):
            walker.string(where)
    else:
        # GGUFReader takes the element types of the first inner array for all of them.
        inner_types = {_skip_value(walker, element, where, depth + 1) for _ in range(count)}
        if len(inner_types) > 1:
            raise walker.fail(f"{where}: inner arrays of different element types")
    return element


def _read_metadata(walker: _Walker, num_kv: int) -> tuple[int, dict[str, MetadataSpan]]:
    """Walk the key/value section; returns the alignment (``general.alignment`` or 32) and
    where each pair lies."""
    spans: dict[str, MetadataSpan] = {}
    alignment = GGUF_DEFAULT_ALIGNMENT
    for index in range(num_kv):
        start = walker.pos
        key = walker.string(f"metadata key #{index}", MAX_NAME_BYTES)
        if key in spans or key in _RESERVED_KEYS:
            raise walker.fail(f"duplicate metadata key {_quote(key)}")
        where = f"metadata key {_quote(key)}"
        vtype = _value_type(walker, where)
        value_pos = walker.pos
        _skip_value(walker, vtype, where)
        spans[key] = MetadataSpan(start, value_pos, walker.pos, vtype)
        if key == "general.alignment":
            if vtype != VT.UINT32:
                raise walker.fail(f"general.alignment has type {vtype.name}, expected UINT32")
            (alignment,) = struct.unpack_from(walker.order + "I", walker.buf, value_pos)
            if alignment == 0 or alignment & (alignment - 1):
                raise walker.fail(f"general.alignment {alignment} is not a power of two")
    return alignment, spans


def _read_tensor_info(walker: _Walker, index: int, names: set[str]) -> TensorInfo:
    """Walk one tensor info (its offset is relative to the data section)."""
    name = walker.string(f"tensor #{index} name", MAX_NAME_BYTES)
    if name in names:
        raise walker.fail(f"duplicate tensor {_quote(name)}")
    names.add(name)
    where = f"tensor {_quote(name)}"
    n_dims = walker.unpack("I", where)
    if n_dims > MAX_DIMS:
        raise walker.fail(f"{where}: {n_dims} dimensions (at most {MAX_DIMS})")
    dims = [walker.unpack("Q", where) for _ in range(n_dims)]
    raw_type = walker.unpack("I", where)
    offset = walker.unpack("Q", where)
    try:
        qtype = GGMLQuantizationType(raw_type)
        block_size, type_size = GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        raise walker.fail(f"{where}: unknown tensor type {raw_type}") from None
    if any(d == 0 for d in dims):
        raise walker.fail(f"{where}: shape {dims} has a zero dimension")
    num_elements = 1
    for d in dims:
        num_elements *= d  # Python ints: no overflow, and at most 8 factors
    num_bytes = num_elements // block_size * type_size
    if num_bytes > walker.size:
        raise walker.fail(f"{where}: shape {dims} needs {num_bytes} bytes, exceeds file size")
    if dims and dims[0] % block_size:
        raise walker.fail(
            f"{where}: row length {dims[0]} is not a multiple of the {qtype.name} "
            f"block size {block_size}"
        )
    return TensorInfo(name, tuple(reversed(dims)), qtype, offset, num_bytes)


def _check_spans(
    walker: _Walker, spans: list[_TensorSpan], alignment: int, data_start: int
) -> None:
    """Tensor data: aligned, inside the file, not overlapping (as llama.cpp requires)."""
    previous: _TensorSpan | None = None
    for span in sorted(spans):
        if span.start % alignment:
            raise walker.fail(
                f"tensor {span.name}: data offset {span.start} is not a multiple of the "
                f"alignment {alignment}"
            )
        end = data_start + span.end
        if span.start >= walker.size:  # an offset no prefix of the file could hold
            raise walker.fail(
                f"tensor {span.name}: data offset {span.start} lies beyond the end of the file "
                f"({walker.size} bytes)"
            )
        if end > walker.size:
            raise walker.fail(
                f"truncated at byte {walker.size} (tensor {span.name} data ends at byte {end})"
            )
        if previous is not None and span.start < previous.end:
            raise walker.fail(f"tensors {previous.name} and {span.name} overlap")
        previous = span


def _walk(walker: _Walker) -> GGUFHeader:
    if walker.size < 4 or walker.buf[:4] != b"GGUF":
        if walker.size and b"GGUF".startswith(walker.buf[:4]):
            raise walker.fail(f"truncated at byte {walker.size} (magic)")
        raise walker.fail("not a GGUF file")
    walker.pos = 4
    native = "<" if sys.byteorder == "little" else ">"
    walker.order = native
    version = walker.unpack("I", "version")
    if version & 0xFFFF == 0:  # written on a host of the other byte order (as GGUFReader does)
        walker.order = ">" if native == "<" else "<"
        version = struct.unpack_from(walker.order + "I", walker.buf, 4)[0]
    if version not in (2, 3):
        raise walker.fail(f"unsupported GGUF version {version} (kvforge reads 2 and 3)")
    num_tensors = walker.unpack("Q", "tensor count")
    num_kv = walker.unpack("Q", "metadata count")
    walker.bound(num_kv, _MIN_KV_BYTES, "metadata count", "metadata")
    if num_tensors * _MIN_TENSOR_INFO_BYTES > walker.size:
        raise walker.fail(f"tensor count {num_tensors} exceeds file size")
    walker.need(num_kv * _MIN_KV_BYTES + num_tensors * _MIN_TENSOR_INFO_BYTES, "tensor infos")
    alignment, metadata = _read_metadata(walker, num_kv)
    names: set[str] = set()
    tensors = tuple(_read_tensor_info(walker, i, names) for i in range(num_tensors))
    data_start = -(-walker.pos // alignment) * alignment
    spans = [_TensorSpan(t.offset, t.offset + t.num_bytes, _quote(t.name)) for t in tensors]
    _check_spans(walker, spans, alignment, data_start)
    return GGUFHeader(
        version, num_tensors, num_kv, alignment, data_start, walker.order, metadata, tensors
    )


_FORMATS = {
    VT.UINT8: "B",
    VT.INT8: "b",
    VT.BOOL: "?",
    VT.UINT16: "H",
    VT.INT16: "h",
    VT.UINT32: "I",
    VT.INT32: "i",
    VT.FLOAT32: "f",
    VT.UINT64: "Q",
    VT.INT64: "q",
    VT.FLOAT64: "d",
}


def _decode(buf: bytes | mmap.mmap, pos: int, vtype: VT, order: str) -> tuple[Any, int]:
    if vtype in _FORMATS:
        return struct.unpack_from(order + _FORMATS[vtype], buf, pos)[0], pos + _SCALAR_SIZES[vtype]
    (length,) = struct.unpack_from(order + "Q", buf, pos + (4 if vtype == VT.ARRAY else 0))
    if vtype == VT.STRING:
        return str(buf[pos + 8 : pos + 8 + length], "utf-8"), pos + 8 + length
    (element,) = struct.unpack_from(order + "I", buf, pos)
    pos += 12
    if element in _FORMATS:
        values = struct.unpack_from(f"{order}{length}{_FORMATS[VT(element)]}", buf, pos)
        return list(values), pos + length * _SCALAR_SIZES[VT(element)]
    items = []
    for _ in range(length):
        item, pos = _decode(buf, pos, VT(element), order)
        items.append(item)
    return items, pos


def metadata_value(buf: bytes | mmap.mmap, header: GGUFHeader, key: str) -> Any:
    """The value of ``key`` in the file ``header`` was read from (``buf``: its bytes or map), as
    Python values (lists for arrays); None when the key is absent."""
    span = header.metadata.get(key)
    if span is None:
        return None
    return _decode(buf, span.value_start, span.vtype, header.byte_order)[0]


def check_gguf_file(path: str | os.PathLike[str]) -> GGUFHeader:
    """Raise :class:`ModelFileError` unless ``path`` is a structurally sound GGUF file.

    Reads only the header (through an mmap, so memory stays small whatever the file claims);
    a typical model file checks in a fraction of a second.
    """
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            if os.fstat(handle.fileno()).st_size == 0:
                raise ModelFileError(path, "not a GGUF file (empty)")
            # NOTE: no memoryview of the map: a view still referenced from a traceback would
            # make closing the map fail. Slices of an mmap are bytes copies, bounded above.
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                return _walk(_Walker(path, mapped))
    except FileNotFoundError:
        raise ModelNotFoundError(f"no GGUF file at {path}") from None
    except (OSError, ValueError) as exc:  # unreadable, or not a regular file (mmap refuses)
        raise ModelFileError(path, f"cannot read: {exc}") from None


def open_gguf(path: str | os.PathLike[str]) -> GGUFReader:
    """A ``GGUFReader`` over ``path`` once :func:`check_gguf_file` passes; anything the reader
    still trips over becomes a :class:`ModelFileError` too, never a traceback."""
    check_gguf_file(path)
    try:
        return GGUFReader(str(path))
    except (OSError, ValueError, KeyError, IndexError, TypeError, OverflowError) as exc:
        raise ModelFileError(path, f"unreadable GGUF file: {exc}") from exc

"""Writing GGUF files: quantizing one tensor, and two writers.

``GGUFWriter`` (the gguf package's) keeps every tensor in memory until the end; it serves the
small writers (convert, imatrix). :class:`GGUFStreamWriter` writes front to back, tensor by
tensor as each is quantized, with metadata copied from a source file as raw bytes (parsing the
tokenizer's ~150k strings only to write them back took seconds): it serves ``kvforge quantize``.

Layout written (GGUF v3, little-endian)::

    "GGUF" u32 3  u64 num_tensors  u64 num_kv
    num_kv x      (string key, u32 value_type, value)
    num_tensors x (string name, u32 n_dims, u64 dims[n_dims] (innermost first), u32 type, u64 offset)
    padding to the alignment, then each tensor's data at its offset, padded to the alignment
"""

from __future__ import annotations

import math
import os
import struct
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, GGUFWriter
from gguf import quants as gguf_quants

from kvforge.ops import blocks
from kvforge.ops.blocks import NonFiniteError

QT = GGMLQuantizationType
_FLOAT_DTYPES = {QT.F32: np.float32, QT.F16: np.float16}


def quantize_tensor(
    values: np.ndarray, qtype: GGMLQuantizationType, imatrix: np.ndarray | None = None
) -> np.ndarray:
    """Float ``values`` [..., cols] as ``qtype``: uint8 [..., row bytes], or a float array.

    The legacy types without an importance matrix take the torch-free block library; the
    K-quants and importance-weighted types take kvforge.quant.quantizers (torch, imported here
    only then). Both give the same bytes. Raises ``NonFiniteError`` for NaN or infinite values
    (llama.cpp refuses them too)."""
    if imatrix is None:
        data = blocks.quantize(values, qtype)  # checks finiteness itself
        if data is not None:
            return data
    if not np.isfinite(values).all():
        raise NonFiniteError("NaN or infinite values cannot be quantized")
    if qtype in _FLOAT_DTYPES:
        return np.array(values, dtype=_FLOAT_DTYPES[qtype])  # a copy: never alias ``values``
    if qtype == QT.BF16:
        return gguf_quants.quantize(np.asarray(values, dtype=np.float32), qtype)
    from kvforge.quant.quantizers import quantize  # deferred: loads torch

    return quantize(values, qtype, imatrix)


def add_tensor(
    writer: GGUFWriter,
    name: str,
    values: np.ndarray,
    qtype: GGMLQuantizationType,
    imatrix: np.ndarray | None = None,
) -> None:
    """Quantize float ``values`` to ``qtype`` (float types stay arrays) and add them."""
    data = quantize_tensor(values, qtype, imatrix)
    writer.add_tensor(name, data, raw_dtype=qtype if data.dtype == np.uint8 else None)


def finish(writer: GGUFWriter) -> None:
    """Write everything added to ``writer`` and close the file."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()


# ------------------------------------------------------------------------------ streaming writer

_SCALAR_FORMATS = {
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
}


def _string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def encode_kv(key: str, vtype: GGUFValueType, value: Any) -> bytes:
    """One key/value pair of a string or scalar value, as the file holds it."""
    head = _string(key) + struct.pack("<I", int(vtype))
    if vtype == GGUFValueType.STRING:
        return head + _string(str(value))
    return head + struct.pack(_SCALAR_FORMATS[vtype], value)


def tensor_bytes(shape: tuple[int, ...], qtype: GGMLQuantizationType) -> int:
    """Bytes of a ``qtype`` tensor of ``shape`` (row-major)."""
    block, size = GGML_QUANT_SIZES[qtype]
    return math.prod(shape) // block * size  # Python ints: no overflow


def _create(path: Path) -> BinaryIO:
    """A new file at ``path`` for writing. A leftover file or link there (a killed run's) is
    removed first and the file is created exclusively, so a planted link is never written
    through."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    return os.fdopen(descriptor, "wb")


class GGUFStreamWriter:
    """A GGUF file written front to back into ``path`` (through ``path.partial``, renamed by
    :meth:`close`, so a failed run leaves nothing half-written under the final name). Raises
    OSError where the file cannot be created.

    ``metadata``: encoded key/value pairs (:func:`encode_kv`, or a source file's own bytes);
    ``tensors``: (name, row-major shape, type) of every tensor, in the order :meth:`write` gets
    them."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        metadata: list[bytes],
        tensors: list[tuple[str, tuple[int, ...], GGMLQuantizationType]],
        alignment: int = 32,
    ) -> None:
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.alignment = alignment
        self.pending = list(reversed(tensors))
        infos, offset = [], 0
        for name, shape, qtype in tensors:
            dims = tuple(reversed(shape))
            infos.append(
                _string(name)
                + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, int(qtype), offset)
            )
            offset = self._aligned(offset + tensor_bytes(shape, qtype))
        header = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata))
        front = header + b"".join(metadata) + b"".join(infos)
        self.file = _create(self.partial)
        self.file.write(front + bytes(self._aligned(len(front)) - len(front)))

    def _aligned(self, offset: int) -> int:
        return -(-offset // self.alignment) * self.alignment

    def write(self, name: str, data: np.ndarray) -> None:
        """The next tensor's data (quantized bytes or float values)."""
        expected_name, shape, qtype = self.pending.pop()
        if name != expected_name or data.nbytes != tensor_bytes(shape, qtype):
            raise ValueError(
                f"tensor {name} ({data.nbytes} bytes) where {expected_name} of "
                f"{tensor_bytes(shape, qtype)} bytes was due"
            )
        self.file.write(np.ascontiguousarray(data).data)
        self.file.write(bytes(self._aligned(data.nbytes) - data.nbytes))

    def close(self) -> None:
        """Finish the file and move it to its name; every tensor must have been written."""
        if self.pending:
            self.abort()
            raise ValueError(f"{len(self.pending)} tensors were never written")
        self.file.close()
        self.partial.replace(self.path)

    def abort(self) -> None:
        """Drop the partial file."""
        self.file.close()
        self.partial.unlink(missing_ok=True)

"""``kvforge quantize``: requantize a GGUF file to another type, tensor by tensor.

Metadata, tokenizer and chat template are copied as the source file holds them (raw bytes);
every weight matrix is dequantized to float32 and quantized to the type the file type's mix
gives it (optionally weighted by an importance matrix); norms and other vectors stay float32.
The output is written front to back as tensors are done, so memory holds one tensor at a time.

Speed: the legacy types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) go through the torch-free block library
both ways (``kvforge.ops.blocks``), so such a run never imports torch; K-quants and imatrix runs
use the torch quantizers and the C++ searches.
"""

from __future__ import annotations

import logging
import mmap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import dequantize as gguf_dequantize
from tqdm import tqdm

from kvforge.errors import (
    InvalidRequestError,
    ModelFileError,
    ModelNotFoundError,
    UnsupportedModelError,
)
from kvforge.loader.gguf_check import GGUFHeader, TensorInfo, check_gguf_file, metadata_value
from kvforge.ops import blocks
from kvforge.ops.blocks import NonFiniteError
from kvforge.quant.gguf_file import GGUFStreamWriter, encode_kv, quantize_tensor
from kvforge.quant.imatrix import read_imatrix
from kvforge.quant.mixes import MixOptions, file_type_id, parse_file_type, tensor_type
from kvforge.utils import check_output_path

logger = logging.getLogger(__name__)

_SKIPPED_KEYS = (
    "GGUF.",
    "general.architecture",
    "general.file_type",
    "general.quantization_version",
    "quantize.",
)
_VT = GGUFValueType


def copy_metadata(reader: GGUFReader, writer: GGUFWriter) -> None:
    """Every key/value field of ``reader`` except those the writer sets itself."""
    for key, field in reader.fields.items():
        if key.startswith(_SKIPPED_KEYS):
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type)


def _raw(mapped: mmap.mmap, header: GGUFHeader, tensor: TensorInfo) -> np.ndarray:
    """The bytes of one tensor of the mapped source file (a view)."""
    start = header.data_start + tensor.offset
    return np.frombuffer(mapped, dtype=np.uint8, count=tensor.num_bytes, offset=start)


def _read_values(mapped: mmap.mmap, header: GGUFHeader, tensor: TensorInfo, src: Any) -> np.ndarray:
    """The float32 values of one tensor of the mapped source file."""
    raw = _raw(mapped, header, tensor)
    values = blocks.dequantize(raw, tensor.qtype, tensor.shape)
    if values is not None:
        return values
    try:
        return gguf_dequantize(raw, tensor.qtype).reshape(tensor.shape).astype(np.float32)
    except NotImplementedError:
        raise UnsupportedModelError(
            f"{src}: tensor {tensor.name} has type {tensor.qtype.name}, which cannot be dequantized"
        ) from None


def _integer(mapped: mmap.mmap, header: GGUFHeader, key: str, src: Any) -> int | None:
    """An integer key (the largest entry of a per-layer array); None when absent."""
    value = metadata_value(mapped, header, key)
    if isinstance(value, list):
        value = max(value, default=None)
    if value is not None and not isinstance(value, int):
        raise ModelFileError(src, f"metadata key {key!r} is not an integer")
    return value


def _plan(
    m: mmap.mmap, header: GGUFHeader, src: Any, file_type: str, options: MixOptions
) -> tuple[str, list[tuple[TensorInfo, GGMLQuantizationType]]]:
    """The architecture, and every tensor with the type the file type's mix gives it."""
    arch = metadata_value(m, header, "general.architecture")
    if not isinstance(arch, str):
        raise ModelFileError(src, "metadata key 'general.architecture' is missing or not a string")
    num_layers = _integer(m, header, f"{arch}.block_count", src)
    if num_layers is None:
        raise ModelFileError(src, f"metadata key '{arch}.block_count' is missing")
    heads = _integer(m, header, f"{arch}.attention.head_count", src)
    kv_heads = _integer(m, header, f"{arch}.attention.head_count_kv", src)
    gqa = heads // kv_heads if heads and kv_heads else 1
    has_output = any(t.name == "output.weight" for t in header.tensors)
    plan = []
    for tensor in header.tensors:
        columns = tensor.shape[-1] if tensor.shape else 1
        if len(tensor.shape) < 2:
            qtype = tensor_type(tensor.name, columns, "F32", num_layers, True)
        else:
            qtype = tensor_type(
                tensor.name, columns, file_type, num_layers, has_output, gqa, options
            )
        plan.append((tensor, qtype))
    return arch, plan


def _imatrix(imatrix: str | Path) -> tuple[dict[str, np.ndarray], list[bytes]]:
    """Importance per weight name, and the keys that record the file in the output."""
    check_gguf_file(imatrix)  # read_imatrix sits below the loader and cannot check it
    importance, meta = read_imatrix(imatrix)
    keys = [
        encode_kv("quantize.imatrix.file", _VT.STRING, str(imatrix)),
        encode_kv("quantize.imatrix.entries_count", _VT.INT32, len(importance)),
    ]
    chunks = meta.get("imatrix.chunk_count")
    if chunks is not None:
        if not (isinstance(chunks, int) and 0 <= chunks < 2**31):
            raise ModelFileError(imatrix, f"imatrix.chunk_count is {chunks!r}")
        keys.append(encode_kv("quantize.imatrix.chunks_count", _VT.INT32, chunks))
    return importance, keys


def _convert(
    m: mmap.mmap,
    header: GGUFHeader,
    tensor: TensorInfo,
    qtype: GGMLQuantizationType,
    src: Any,
    importance: np.ndarray | None,
    adjust: Callable[[str, np.ndarray], np.ndarray] | None,
) -> np.ndarray:
    """One tensor of the source as ``qtype``: straight from block to block where the block
    library takes both types, else through float32 values."""
    try:
        if adjust is None and importance is None:
            data = blocks.requantize(_raw(m, header, tensor), tensor.qtype, qtype, tensor.shape)
            if data is not None:
                return data
        values = _read_values(m, header, tensor, src)
        if adjust is not None:
            values = adjust(tensor.name, values)
        return quantize_tensor(values, qtype, importance)
    except NonFiniteError:
        raise ModelFileError(src, f"tensor {tensor.name} holds NaN or infinite values") from None


def quantize_file(
    src: str | Path,
    dst: str | Path,
    file_type: str,
    imatrix: str | Path | None = None,
    options: MixOptions | None = None,
    show_progress: bool = True,
    adjust: Callable[[str, np.ndarray], np.ndarray] | None = None,
) -> dict[str, int]:
    """Write ``dst`` as ``file_type``; returns how many tensors got each type. ``adjust(name,
    values)`` may change each dequantized tensor first (``kvforge lora merge``)."""
    file_type = parse_file_type(file_type)
    options = options or MixOptions()
    if not Path(src).is_file():
        raise ModelNotFoundError(f"no GGUF file at {src}")
    check_output_path(dst)
    header = check_gguf_file(src)  # one-line ModelFileError
    if header.byte_order != "<":
        raise UnsupportedModelError(f"{src}: big-endian GGUF files cannot be requantized")
    importance, imatrix_keys = _imatrix(imatrix) if imatrix is not None else ({}, [])
    # Not closed explicitly: numpy views of the map (in a traceback, say) would make closing
    # it fail; it is unmapped when the last view goes.
    with open(src, "rb") as handle:
        m = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    arch, plan = _plan(m, header, src, file_type, options)
    for tensor, _ in plan:
        weights = importance.get(tensor.name)
        if weights is not None and weights.size != tensor.shape[-1]:
            raise ModelFileError(
                imatrix,
                f"{tensor.name}: {weights.size} importance values for {tensor.shape[-1]} columns",
            )
    metadata = [encode_kv("general.architecture", _VT.STRING, arch)]
    metadata += [
        m[span.start : span.end]
        for key, span in header.metadata.items()
        if not key.startswith(_SKIPPED_KEYS)
    ]
    metadata += [
        encode_kv("general.file_type", _VT.UINT32, file_type_id(file_type)),
        encode_kv("general.quantization_version", _VT.UINT32, 2),
        *imatrix_keys,
    ]
    try:
        writer = GGUFStreamWriter(
            dst, metadata, [(t.name, t.shape, qtype) for t, qtype in plan], header.alignment
        )
    except OSError as exc:
        raise InvalidRequestError(f"cannot write {dst}: {exc.strerror or exc}", "output") from None
    counts: dict[str, int] = {}
    try:
        for tensor, qtype in tqdm(
            plan, desc=f"Quantizing to {file_type}", disable=not show_progress
        ):
            data = _convert(m, header, tensor, qtype, src, importance.get(tensor.name), adjust)
            writer.write(tensor.name, data)
            counts[qtype.name] = counts.get(qtype.name, 0) + 1
        writer.close()
    except OSError as exc:
        writer.abort()
        raise InvalidRequestError(f"cannot write {dst}: {exc.strerror or exc}", "output") from None
    except BaseException:
        writer.abort()
        raise
    logger.info("wrote %s (%s): %s", dst, file_type, counts)
    return counts

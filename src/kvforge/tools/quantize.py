"""``kvforge quantize``: requantize a GGUF file to another type, tensor by tensor.

Metadata, tokenizer and chat template are copied; every weight matrix is dequantized to
float32 and quantized to the type the file type's mix gives it (optionally weighted by an
importance matrix); norms and other vectors stay float32.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import dequantize
from tqdm import tqdm

from kvforge.errors import ModelFileError, ModelNotFoundError, UnsupportedModelError
from kvforge.loader.gguf_check import check_gguf_file, open_gguf
from kvforge.quant.gguf_file import add_tensor, finish
from kvforge.quant.imatrix import read_imatrix
from kvforge.quant.mixes import MixOptions, file_type_id, parse_file_type, tensor_type

logger = logging.getLogger(__name__)

_SKIPPED_KEYS = (
    "GGUF.",
    "general.architecture",
    "general.file_type",
    "general.quantization_version",
)


def copy_metadata(reader: GGUFReader, writer: GGUFWriter) -> None:
    """Every key/value field of ``reader`` except those the writer sets itself."""
    for key, field in reader.fields.items():
        if key.startswith(_SKIPPED_KEYS) or key.startswith("quantize."):
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type)


def _contents(reader: GGUFReader, path: str | Path, key: str) -> Any:
    field = reader.fields.get(key)
    if field is None:
        raise ModelFileError(path, f"metadata key {key!r} is missing")
    return field.contents()


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
    reader = open_gguf(src)
    if imatrix is not None:
        check_gguf_file(imatrix)  # read_imatrix sits below the loader and cannot check it
    arch = str(_contents(reader, src, "general.architecture"))
    importance: dict[str, np.ndarray] = {}
    writer = GGUFWriter(str(dst), arch=arch)
    copy_metadata(reader, writer)
    writer.add_file_type(file_type_id(file_type))
    writer.add_quantization_version(2)
    if imatrix is not None:
        importance, meta = read_imatrix(imatrix)
        writer.add_string("quantize.imatrix.file", str(imatrix))
        writer.add_int32("quantize.imatrix.entries_count", len(importance))
        if "imatrix.chunk_count" in meta:
            writer.add_int32("quantize.imatrix.chunks_count", int(meta["imatrix.chunk_count"]))  # type: ignore[call-overload]
    names = {t.name for t in reader.tensors}
    num_layers = int(_contents(reader, src, f"{arch}.block_count"))
    heads = reader.fields.get(f"{arch}.attention.head_count")
    kv_heads = reader.fields.get(f"{arch}.attention.head_count_kv")
    gqa = int(heads.contents()) // int(kv_heads.contents()) if heads and kv_heads else 1
    counts: dict[str, int] = {}
    for tensor in tqdm(
        reader.tensors, desc=f"Quantizing to {file_type}", disable=not show_progress
    ):
        shape = tuple(int(d) for d in reversed(tensor.shape))
        try:
            values = dequantize(tensor.data, tensor.tensor_type).reshape(shape)
        except NotImplementedError:
            raise UnsupportedModelError(
                f"{src}: tensor {tensor.name} has type {tensor.tensor_type.name}, "
                "which cannot be dequantized"
            ) from None
        if adjust is not None:
            values = adjust(tensor.name, values)
        if len(shape) < 2:
            qtype = tensor_type(tensor.name, shape[-1], "F32", num_layers, True)
        else:
            qtype = tensor_type(
                tensor.name,
                shape[-1],
                file_type,
                num_layers,
                "output.weight" in names,
                gqa,
                options,
            )
        add_tensor(writer, tensor.name, values, qtype, importance.get(tensor.name))
        counts[qtype.name] = counts.get(qtype.name, 0) + 1
    finish(writer)
    logger.info("wrote %s (%s): %s", dst, file_type, counts)
    return counts

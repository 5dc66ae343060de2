"""Importance matrices in llama.cpp's ``imatrix.gguf`` layout.

For each weight matrix, ``<name>.in_sum2`` holds the sum over calibration tokens of each input
column's squared activation and ``<name>.counts`` the number of tokens; the importance of a
column is their ratio (the mean square activation that multiplies that column).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter

from kvforge.errors import InvalidRequestError, ModelFileError
from kvforge.quant.gguf_file import finish


def write_imatrix(
    path: str | Path,
    sums: dict[str, np.ndarray],
    counts: dict[str, int],
    datasets: list[str],
    chunk_count: int,
    chunk_size: int,
) -> None:
    """Write per-tensor column sums of squares and token counts."""
    writer = GGUFWriter(str(path), arch="imatrix")
    writer.add_type("imatrix")
    writer.add_array("imatrix.datasets", datasets)
    writer.add_uint32("imatrix.chunk_count", chunk_count)
    writer.add_uint32("imatrix.chunk_size", chunk_size)
    for name in sorted(sums):
        writer.add_tensor(f"{name}.in_sum2", sums[name].astype(np.float32).reshape(1, -1))
        writer.add_tensor(f"{name}.counts", np.array([[counts[name]]], dtype=np.float32))
    finish(writer)


def read_imatrix(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, object]]:
    """Importance per column for each weight name, and the file's metadata.

    Run :func:`kvforge.loader.gguf_check.check_gguf_file` on an untrusted file first: the gguf
    reader believes the counts in the file (this layer cannot import the loader's check).
    """
    try:
        reader = GGUFReader(str(path))
        for tensor in reader.tensors:
            if tensor.tensor_type != GGMLQuantizationType.F32:
                raise ModelFileError(
                    path, f"{tensor.name} is {tensor.tensor_type.name}; imatrix tensors are F32"
                )
        tensors = {t.name: np.array(t.data, dtype=np.float32).reshape(-1) for t in reader.tensors}
        meta = {k: f.contents() for k, f in reader.fields.items() if k.startswith("imatrix.")}
    except OSError as exc:
        raise InvalidRequestError(f"cannot read imatrix file {path}: {exc}", "imatrix") from exc
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise ModelFileError(path, f"not a valid imatrix file: {exc}") from exc
    importance = {}
    for name, values in tensors.items():
        if name.endswith(".in_sum2"):
            weight = name.removesuffix(".in_sum2")
            counts = tensors.get(f"{weight}.counts")
            if counts is None or counts.size == 0:
                raise ModelFileError(path, f"{weight}.in_sum2 has no {weight}.counts tensor")
            if not (np.isfinite(values).all() and (values >= 0).all()):
                raise ModelFileError(path, f"{name} holds negative, NaN or infinite sums")
            if not (np.isfinite(counts[0]) and counts[0] >= 0):
                raise ModelFileError(path, f"{weight}.counts is {counts[0]}")
            importance[weight] = values / max(float(counts[0]), 1.0)
    return importance, meta

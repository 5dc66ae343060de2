"""Importance matrices in llama.cpp's ``imatrix.gguf`` layout.

For each weight matrix, ``<name>.in_sum2`` holds the sum over calibration tokens of each input
column's squared activation and ``<name>.counts`` the number of tokens; the importance of a
column is their ratio (the mean square activation that multiplies that column).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGUFReader, GGUFWriter

from kvforge.errors import InvalidRequestError
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
    """Importance per column for each weight name, and the file's metadata."""
    try:
        reader = GGUFReader(str(path))
    except (OSError, ValueError) as exc:
        raise InvalidRequestError(f"cannot read imatrix file {path}: {exc}", "imatrix") from exc
    tensors = {t.name: np.array(t.data, dtype=np.float32).reshape(-1) for t in reader.tensors}
    importance = {}
    for name, values in tensors.items():
        if name.endswith(".in_sum2"):
            weight = name.removesuffix(".in_sum2")
            count = float(tensors[f"{weight}.counts"][0])
            importance[weight] = values / max(count, 1.0)
    meta = {k: f.contents() for k, f in reader.fields.items() if k.startswith("imatrix.")}
    return importance, meta

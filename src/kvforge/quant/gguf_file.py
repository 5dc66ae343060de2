"""Writing GGUF files: quantize-and-add one tensor, then flush header, metadata and data."""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter

from kvforge.quant.quantizers import quantize


def add_tensor(
    writer: GGUFWriter,
    name: str,
    values: np.ndarray,
    qtype: GGMLQuantizationType,
    imatrix: np.ndarray | None = None,
) -> None:
    """Quantize float ``values`` to ``qtype`` (float types stay arrays) and add them."""
    data = quantize(values, qtype, imatrix)
    writer.add_tensor(name, data, raw_dtype=qtype if data.dtype == np.uint8 else None)


def finish(writer: GGUFWriter) -> None:
    """Write everything added to ``writer`` and close the file."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()

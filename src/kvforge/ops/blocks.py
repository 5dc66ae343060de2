"""GGUF's legacy block types to and from float32 in native code, without torch.

``csrc/gguf_blocks.cpp`` is compiled with the C++ compiler into a plain shared library (cached
beside the ops extension, keyed by its sources, flags and CPU) and called through ctypes, which
releases the GIL: tensors are cut into row chunks run on a thread per core. Used by
``kvforge quantize``, whose legacy types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) then need neither torch
nor numpy's full-tensor passes. Both functions return None where the library does not build or
the type is not one of these; the caller takes its portable path then.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT

from kvforge.ops import compiler
from kvforge.utils import one_line

logger = logging.getLogger(__name__)

SOURCE = compiler.CSRC / "gguf_blocks.cpp"
HEADERS = (compiler.CSRC / "quant_search.h",)
_LIBRARY = "libkvforge_blocks.so"
# bytes per block of each type handled here; every one holds 32 values
TYPES = {t: GGML_QUANT_SIZES[t][1] for t in (QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0)}
BLOCK = 32
_CHUNK_BLOCKS = 1 << 14  # blocks per call: enough work to hide the call, many calls per core


class NonFiniteError(ValueError):
    """Values to quantize hold NaN or infinity (no block scale represents them)."""


def _library_path(flags: list[str]) -> Path:
    digest = hashlib.sha256()
    for path in (SOURCE, *HEADERS):
        digest.update(path.read_bytes())
    digest.update(f"{platform.machine()} {' '.join(flags)}".encode())
    if "-march=native" in flags:
        digest.update(compiler.cpu_identity().encode())
    return compiler.cache_root() / f"blocks-{digest.hexdigest()[:16]}" / _LIBRARY


def _build() -> Path:
    cxx = compiler.cxx()
    if not compiler.accepts(cxx, compiler.REQUIRED_FLAGS):
        raise RuntimeError(f"C++ compiler {cxx!r} is missing or rejects {compiler.REQUIRED_FLAGS}")
    flags = compiler.with_optional_flags(
        cxx, [*compiler.REQUIRED_FLAGS, "-std=c++17", "-fPIC", "-shared"]
    )
    path = _library_path(flags)
    path.parent.mkdir(parents=True, exist_ok=True)
    with compiler.build_lock(path.parent):
        if not path.exists():
            logger.info("building the GGUF block library in %s (once, seconds)", path.parent)
            staged = path.with_suffix(f".{os.getpid()}.tmp")
            done = subprocess.run(
                [cxx, *flags, str(SOURCE), "-o", str(staged)],
                capture_output=True,
                text=True,
                timeout=300,
            )
            if done.returncode != 0:
                raise RuntimeError(f"compile failed: {done.stderr.strip()[-400:]}")
            staged.replace(path)  # a half-written library is never loaded
    return path


@functools.cache
def load_library() -> ctypes.CDLL | None:
    """The block library, built on first use; None (logged once) where it cannot build."""
    try:
        library = ctypes.CDLL(str(_build()))
    except Exception as exc:  # noqa: BLE001 - any failure means "use the portable path"
        logger.info("GGUF block library unavailable: %s", one_line(str(exc), limit=300))
        return None
    pointer, count, kind = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32
    library.kvf_dequantize.argtypes = [kind, pointer, pointer, count]
    library.kvf_quantize.argtypes = [kind, pointer, pointer, count]
    library.kvf_requantize.argtypes = [kind, pointer, kind, pointer, count]
    for function in (library.kvf_dequantize, library.kvf_quantize, library.kvf_requantize):
        function.restype = ctypes.c_int32
    return library


def _threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _run_chunked(num_blocks: int, call: Callable[[int, int], int], what: str) -> None:
    """``call(first, count)`` over all blocks, in chunks spread over the cores."""

    def run(first: int) -> None:
        status = call(first, min(_CHUNK_BLOCKS, num_blocks - first))
        if status == 1:
            raise NonFiniteError("NaN or infinite values cannot be quantized")
        if status != 0:
            raise ValueError(f"the block library does not handle {what}")

    starts = range(0, num_blocks, _CHUNK_BLOCKS)
    if len(starts) <= 1 or _threads() == 1:
        for first in starts:
            run(first)
        return
    with ThreadPoolExecutor(min(_threads(), len(starts))) as pool:
        list(pool.map(run, starts))


def _blocks_of(raw: np.ndarray, qtype: QT, shape: tuple[int, ...]) -> np.ndarray:
    """``raw`` as flat bytes, checked to hold ``qtype`` blocks of ``shape``."""
    src = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    count = int(np.prod(shape))
    if not shape or shape[-1] % BLOCK or src.nbytes != count // BLOCK * TYPES[qtype]:
        raise ValueError(f"{src.nbytes} bytes do not hold {qtype.name} values of shape {shape}")
    return src


def dequantize(raw: np.ndarray, qtype: QT, shape: tuple[int, ...]) -> np.ndarray | None:
    """float32 ``shape`` from the blocks in ``raw`` (bytes); None when not handled here."""
    library = load_library()
    if library is None or qtype not in TYPES:
        return None
    src = _blocks_of(raw, qtype, shape)
    out = np.empty(shape, dtype=np.float32)
    src_ptr, out_ptr, size = src.ctypes.data, out.ctypes.data, TYPES[qtype]
    _run_chunked(
        src.nbytes // size,
        lambda first, n: library.kvf_dequantize(
            int(qtype), src_ptr + first * size, out_ptr + first * BLOCK * 4, n
        ),
        qtype.name,
    )
    return out


def quantize(values: np.ndarray, qtype: QT) -> np.ndarray | None:
    """uint8 [..., row bytes] of float ``values`` [..., cols] as ``qtype``, the same bytes as
    ``kvforge.quant.quantizers.quantize`` without an imatrix; None when not handled here."""
    library = load_library()
    if library is None or qtype not in TYPES:
        return None
    src = np.ascontiguousarray(values, dtype=np.float32)
    cols = src.shape[-1]
    if cols % BLOCK:
        raise ValueError(f"{qtype.name} needs rows of a multiple of {BLOCK} values, got {cols}")
    size = TYPES[qtype]
    out = np.empty((*src.shape[:-1], cols // BLOCK * size), dtype=np.uint8)
    src_ptr, out_ptr = src.ctypes.data, out.ctypes.data
    _run_chunked(
        src.size // BLOCK,
        lambda first, n: library.kvf_quantize(
            int(qtype), src_ptr + first * BLOCK * 4, out_ptr + first * size, n
        ),
        qtype.name,
    )
    return out


def requantize(
    raw: np.ndarray, src_type: QT, dst_type: QT, shape: tuple[int, ...]
) -> np.ndarray | None:
    """``dst_type`` bytes [..., row bytes] of the ``src_type`` blocks in ``raw`` holding values
    of ``shape``: the same bytes as :func:`dequantize` then :func:`quantize`, without the float
    tensor in memory; None when a type is not handled here."""
    library = load_library()
    if library is None or src_type not in TYPES or dst_type not in TYPES:
        return None
    src = _blocks_of(raw, src_type, shape)
    src_size, dst_size = TYPES[src_type], TYPES[dst_type]
    out = np.empty((*shape[:-1], shape[-1] // BLOCK * dst_size), dtype=np.uint8)
    src_ptr, out_ptr = src.ctypes.data, out.ctypes.data
    _run_chunked(
        src.nbytes // src_size,
        lambda first, n: library.kvf_requantize(
            int(src_type), src_ptr + first * src_size, int(dst_type), out_ptr + first * dst_size, n
        ),
        f"{src_type.name} to {dst_type.name}",
    )
    return out

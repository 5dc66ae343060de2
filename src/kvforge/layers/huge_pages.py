"""Weights and KV caches in transparent huge pages (Linux, CPU).

Decoding one token streams every weight once: ~96 MB for the embedded model, 24k pages of
4 KiB, many times what the TLB covers, so each page costs a page-table walk and the hardware
prefetchers restart at every page. Kernels read the same bytes 12-37% faster from 2 MiB pages
(``benchmarks/matmul.py --huge-pages``). Where the kernel only honours ``madvise``
(``/sys/kernel/mm/transparent_hugepage/enabled`` = ``madvise``, the usual default), memory
must be advised before it is first touched: this module allocates an untouched arena aligned
to 2 MiB, advises it and copies the tensors in. Everything falls back to plain allocations
where ``madvise`` is missing or refused.
"""

from __future__ import annotations

import ctypes
import logging
import sys

import torch
from torch import nn

logger = logging.getLogger(__name__)

HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14  # linux/mman.h
_ALIGN = 64  # each tensor starts on a cache line


def _madvise() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_MADVISE = _madvise()


def empty_huge(nbytes: int) -> torch.Tensor | None:
    """An uninitialised uint8 CPU tensor of ``nbytes`` whose pages are advised to be huge, or
    None where that cannot be done (not Linux, madvise refused, under a page in size)."""
    if _MADVISE is None or nbytes < HUGE_PAGE:
        return None
    # The advised span (whole huge pages from an aligned start) must lie inside the
    # allocation, or madvise fails on the unmapped tail depending on where the allocation fell.
    span = (nbytes + HUGE_PAGE - 1) // HUGE_PAGE * HUGE_PAGE
    raw = torch.empty(span + HUGE_PAGE, dtype=torch.uint8)  # untouched: no pages yet
    start = -raw.data_ptr() % HUGE_PAGE
    if _MADVISE(raw.data_ptr() + start, span, _MADV_HUGEPAGE) != 0:
        return None
    return raw[start : start + nbytes]  # the view keeps the whole allocation alive


def zeros_huge(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.zeros`` in huge pages on the CPU (plain ``torch.zeros`` elsewhere)."""
    numel = 1
    for size in shape:
        numel *= size
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    arena = empty_huge(nbytes) if device.type == "cpu" else None
    if arena is None:
        return torch.zeros(shape, dtype=dtype, device=device)
    return arena.zero_().view(dtype).view(shape)


def move_to_huge_pages(module: nn.Module) -> int:
    """Copy ``module``'s CPU parameters and buffers into one huge-page arena, in registration
    order (which follows the forward pass), and point the tensors at their copies (``.data``,
    so tied weights and anything holding the tensor objects follow). Views of larger storages
    are left alone; a module already moved is not moved again. Returns the bytes moved (0
    where huge pages are not available)."""
    if getattr(module, "_in_huge_pages", False):
        return 0
    tensors: list[torch.Tensor] = []
    seen: set[int] = set()
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.device.type != "cpu" or tensor.is_sparse or id(tensor) in seen:
            continue
        nbytes = tensor.numel() * tensor.element_size()
        if not tensor.is_contiguous() or tensor.untyped_storage().nbytes() != nbytes:
            continue
        seen.add(id(tensor))
        tensors.append(tensor)
    sizes = [-(-t.numel() * t.element_size() // _ALIGN) * _ALIGN for t in tensors]
    arena = empty_huge(sum(sizes))
    if arena is None:
        return 0
    offset = 0
    with torch.no_grad():
        for tensor, size in zip(tensors, sizes, strict=True):
            nbytes = tensor.numel() * tensor.element_size()
            copy = arena[offset : offset + nbytes].view(tensor.dtype).view(tensor.shape)
            copy.copy_(tensor)
            tensor.data = copy
            offset += size
    object.__setattr__(module, "_in_huge_pages", True)
    logger.debug("moved %d tensors (%d bytes) into huge pages", len(tensors), offset)
    return offset

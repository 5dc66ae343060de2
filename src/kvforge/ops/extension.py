"""Build and load kvforge's C++ CPU ops (paged attention, quantized GEMM, fused layer ops,
quantizer searches),
never raising.

The sources are compiled on first use with ``torch.utils.cpp_extension.load`` (ninja and a C++
compiler) into ``$XDG_CACHE_HOME/kvforge/ext/<hash>`` (default ``~/.cache``), where the hash
covers the sources, the torch and Python versions, the compiler flags and, with
``-march=native``, the CPU; later processes load the cached build in well under a second.
``python -m kvforge.ops.build`` builds it ahead of time.

Flags: ``-O3 -fopenmp`` (``at::parallel_for`` is a header template that is serial without
OpenMP; the process shares torch's own libgomp), ``-fno-trapping-math`` (lets branch-free
float code with compares vectorize; kvforge never reads FP exception flags), ``-march=native``
when the compiler takes it and, when it knows them, ``-mno-amx-*``: some of our CPUs trap AMX
instructions, so the build must never emit them whatever the CPU reports.

Any failure (no compiler, no ninja, compile error, unwritable cache) gives ``module=None`` with
a one-line ``error``; the result is cached per process.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import platform
import sys
from pathlib import Path
from types import ModuleType
from typing import NamedTuple

import torch

from kvforge.ops.compiler import (
    CSRC,
    REQUIRED_FLAGS,
    accepts,
    build_lock,
    cache_root,
    cpu_identity,
    cxx,
    with_optional_flags,
)
from kvforge.utils import one_line

logger = logging.getLogger(__name__)

# paged_attention.cpp holds the module definition; the others add their ops to it.
SOURCES = (
    CSRC / "paged_attention.cpp",
    CSRC / "quant_gemm.cpp",
    CSRC / "quant_gemm_il.cpp",
    CSRC / "fused_ops.cpp",
    CSRC / "quantize.cpp",
)
HEADERS = (CSRC / "kvforge_ops.h", CSRC / "quant_search.h", CSRC / "simd.h")
_NAME = "kvforge_ops"
_REQUIRED_FLAGS = [*REQUIRED_FLAGS, "-fopenmp"]


class ExtensionLoad(NamedTuple):
    """The loaded extension module, or None with the reason; and its build directory."""

    module: ModuleType | None
    error: str | None
    build_dir: Path | None


def compiler_flags(compiler: str) -> list[str]:
    """The required flags plus the optional flag groups ``compiler`` accepts."""
    return with_optional_flags(compiler, _REQUIRED_FLAGS)


def build_dir(flags: list[str]) -> Path:
    """Cache directory of the build for these sources, torch, Python, flags (and CPU)."""
    digest = hashlib.sha256()
    for source in (*SOURCES, *HEADERS):
        digest.update(source.read_bytes())
    digest.update(f"{torch.__version__} {sys.version} {platform.machine()}".encode())
    # the build files name the sources by path: two checkouts sharing one directory would
    # rebuild each time the other loads
    digest.update(str(SOURCES[0].resolve().parent).encode())
    digest.update(" ".join(flags).encode())
    if "-march=native" in flags:
        digest.update(cpu_identity().encode())
    return cache_root() / digest.hexdigest()[:16]


def _build_and_load() -> tuple[ModuleType, Path]:
    compiler = cxx()
    if not accepts(compiler, _REQUIRED_FLAGS):
        raise RuntimeError(f"C++ compiler {compiler!r} is missing or rejects {_REQUIRED_FLAGS}")
    flags = compiler_flags(compiler)
    directory = build_dir(flags)
    directory.mkdir(parents=True, exist_ok=True)
    if not any(directory.glob(f"{_NAME}*.so")):
        logger.info("building the C++ ops extension in %s (once, a minute or two)", directory)
    from torch.utils import cpp_extension  # deferred: imports setuptools

    # torch's own build lock is a file that stays when its holder is killed (every later load
    # would wait forever). An flock dies with its process: whoever holds it is the only
    # builder, so a torch lock file found then is stale.
    with build_lock(directory):
        (directory / "lock").unlink(missing_ok=True)
        module = cpp_extension.load(
            name=_NAME,
            sources=[str(source) for source in SOURCES],
            extra_cflags=flags,
            extra_ldflags=["-fopenmp"],
            build_directory=str(directory),
            verbose=False,
        )
    return module, directory


@functools.cache
def load_extension() -> ExtensionLoad:
    """Build (if needed) and load the extension once per process; never raises."""
    try:
        module, directory = _build_and_load()
    except Exception as exc:  # noqa: BLE001 - any failure means "use the torch fallback"
        error = one_line(f"{type(exc).__name__}: {exc}", limit=300)
        logger.debug("C++ ops extension failed to build or load", exc_info=True)
        logger.info("C++ ops extension unavailable: %s", error)
        return ExtensionLoad(None, error, None)
    return ExtensionLoad(module, None, directory)


def cpu_ops(x: torch.Tensor) -> ModuleType | None:
    """The C++ ops module when ``x`` lives on the CPU and the extension loads, else None: the
    caller then takes its torch path (other devices, or no compiler)."""
    return load_extension().module if x.is_cpu else None

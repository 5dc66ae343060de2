"""What both native builds share, without torch: the compiler check, the flags, the CPU identity
for ``-march=native`` builds, the cache root, and the build lock."""

from __future__ import annotations

import fcntl
import os
import platform
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CSRC = Path(__file__).resolve().parents[1] / "csrc"
REQUIRED_FLAGS = ["-O3", "-fno-trapping-math"]
# Each group is added when the compiler accepts it.
OPTIONAL_FLAGS = [
    ["-march=native"],
    ["-mno-amx-tile", "-mno-amx-int8", "-mno-amx-bf16"],
]


def cxx() -> str:
    """The C++ compiler (the one torch's extension builder itself uses on Linux / macOS)."""
    return os.environ.get("CXX", "c++")


def accepts(compiler: str, flags: list[str]) -> bool:
    """Whether ``compiler`` compiles an empty program with ``flags``."""
    try:
        done = subprocess.run(
            [compiler, *flags, "-x", "c++", "-c", "-", "-o", os.devnull],
            input="int main() { return 0; }\n",
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


def with_optional_flags(compiler: str, flags: list[str]) -> list[str]:
    """``flags`` plus the optional flag groups ``compiler`` accepts."""
    flags = list(flags)
    for group in OPTIONAL_FLAGS:
        if accepts(compiler, group):
            flags += group
    return flags


def cpu_identity() -> str:
    """CPU model and feature flags, for builds tuned with -march=native."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    keys = ("model name", "flags", "Features", "CPU part")
    return "\n".join(sorted({line for line in lines if line.startswith(keys)}))


def cache_root() -> Path:
    """Where native builds are kept: ``$XDG_CACHE_HOME/kvforge/ext`` (default ``~/.cache``)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kvforge" / "ext"


@contextmanager
def build_lock(directory: Path) -> Iterator[None]:
    """Exclusive right to build in ``directory``: an flock, which dies with its holder (a lock
    file would stay behind a killed builder and hang every later load)."""
    with open(directory / "kvforge.flock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        yield

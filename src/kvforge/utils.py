"""Small helpers shared by every layer. No torch."""

from __future__ import annotations

import re
from pathlib import Path

from kvforge.errors import InvalidRequestError

_SIZE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def cdiv(a: int, b: int) -> int:
    """Ceiling division of non-negative integers."""
    return -(-a // b)


def parse_size(text: str | int) -> int:
    """Parse a byte count such as ``4GiB``, ``512M``, ``1.5g`` or ``1048576``."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgtKMGT]?)(i?[bB])?\s*", text)
    if match is None:
        raise InvalidRequestError(f"cannot parse a memory size from {text!r} (e.g. 4GiB, 512M)")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


def format_size(num_bytes: int) -> str:
    """Format a byte count for logs, e.g. ``1.50 GiB``."""
    size = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.2f} {unit}"
        size /= 1024
    return f"{size:.2f} GiB"


def available_memory() -> int:
    """Bytes of RAM available to new allocations (``MemAvailable``), or total RAM as fallback."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


_LOG_TIME = re.compile(r"\[\d{2}:\d{2}:\d{2}\]\s*")
_SOURCE_PATH = re.compile(r"(?:[\w.+-]*/)+[\w.+-]+\.(?:cc|cpp|cxx|c|h|hpp|py|rs)(?::\d+)?:?\s*")


def one_line(text: str, limit: int = 500) -> str:
    """``text`` on one line, at most ``limit`` characters (for error messages)."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def sanitize_message(message: str) -> str:
    """A library's error message without log timestamps or source paths, on one line."""
    return one_line(_SOURCE_PATH.sub("", _LOG_TIME.sub("", message))) or "unknown error"


def check_output_path(path: str | Path, folder: bool = False) -> None:
    """An output's path must name a file (``folder``: a folder) whose parent folder exists: a
    clear error before any work is done."""
    if not str(path).strip():
        raise InvalidRequestError("the output path is empty", "output")
    if not folder and Path(path).is_dir():
        raise InvalidRequestError(f"output {path} is a directory, not a file", "output")
    parent = Path(path).resolve().parent
    if not parent.is_dir():
        raise InvalidRequestError(f"output folder {parent} does not exist", "output")

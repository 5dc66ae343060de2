"""English technical prose read at run time from the installed Python's own documentation.

Benchmarks and tests need calibration and evaluation text without shipping a corpus: the
docstrings of standard-library modules, their classes and functions are plain English about
software, present on every machine that runs kvforge. Two disjoint module sets keep the
calibration text (for importance matrices) apart from the evaluation text (for perplexity).
"""

from __future__ import annotations

import importlib
import inspect

_CALIBRATION_MODULES = (
    "argparse",
    "asyncio",
    "collections",
    "concurrent.futures",
    "contextlib",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "email.message",
    "enum",
    "fractions",
    "ftplib",
    "gettext",
    "gzip",
    "hashlib",
    "heapq",
    "imaplib",
    "ipaddress",
    "mailbox",
    "mimetypes",
    "optparse",
    "pdb",
    "pprint",
    "queue",
    "sched",
    "selectors",
    "smtplib",
    "statistics",
    "string",
    "tempfile",
)
_EVALUATION_MODULES = (
    "functools",
    "inspect",
    "json",
    "logging",
    "os",
    "pathlib",
    "pickle",
    "random",
    "re",
    "shutil",
    "socket",
    "sqlite3",
    "subprocess",
    "tarfile",
    "textwrap",
    "threading",
    "typing",
    "unittest",
    "urllib.parse",
    "uuid",
    "zipfile",
    "difflib",
    "http.client",
    "codecs",
    "calendar",
    "configparser",
    "doctest",
    "fileinput",
    "getopt",
    "locale",
    "tokenize",
)


def _docstrings(module_name: str) -> list[str]:
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return []
    docs = [inspect.getdoc(module) or ""]
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(obj) or inspect.isfunction(obj):
            docs.append(inspect.getdoc(obj) or "")
            if inspect.isclass(obj):
                for attr, member in sorted(vars(obj).items()):
                    if not attr.startswith("_") and inspect.isfunction(member):
                        docs.append(inspect.getdoc(member) or "")
    return [d for d in docs if len(d) > 80]


def machine_text(part: str = "evaluation", min_chars: int = 0) -> str:
    """Documentation prose of the standard library (``part``: evaluation or calibration)."""
    modules = _CALIBRATION_MODULES if part == "calibration" else _EVALUATION_MODULES
    seen: set[str] = set()
    chunks: list[str] = []
    total = 0
    for module_name in modules:
        for doc in _docstrings(module_name):
            if doc in seen:
                continue
            seen.add(doc)
            chunks.append(doc)
            total += len(doc) + 2
            if min_chars and total >= min_chars:
                return "\n\n".join(chunks)
    return "\n\n".join(chunks)

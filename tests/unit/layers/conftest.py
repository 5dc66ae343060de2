"""Shared fixtures of the layer tests."""

from __future__ import annotations

from types import ModuleType

import pytest

from kvforge.ops import extension


@pytest.fixture(scope="module")
def ops() -> ModuleType:
    """The C++ ops module; the tests that use it skip when the extension cannot build."""
    loaded = extension.load_extension()
    if loaded.module is None:
        pytest.skip(f"C++ ops extension unavailable: {loaded.error}")
    return loaded.module

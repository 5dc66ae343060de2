"""docs/cli.md is what the argument parser prints now (regenerate it with
``python -m kvforge.entrypoints.cli_docs > docs/cli.md``)."""

from __future__ import annotations

from pathlib import Path

from kvforge.entrypoints.cli_docs import render

DOC = Path(__file__).resolve().parents[2] / "docs" / "cli.md"


def test_cli_reference_is_current():
    assert DOC.read_text() == render(), (
        "docs/cli.md is stale: python -m kvforge.entrypoints.cli_docs > docs/cli.md"
    )


def test_version_flag(capsys):
    import pytest

    from kvforge import __version__
    from kvforge.entrypoints.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"kvforge {__version__}"

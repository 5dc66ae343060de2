#!/usr/bin/env bash
# Set up the dev environment, then lint, type-check and run the tests (slow suite last).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
export PATH="$PWD/.venv/bin:$PATH"
ruff check src tests benchmarks
ruff format --check src tests benchmarks
mypy
pytest -m "not slow" "$@"
# Slow suites (real-model comparisons on the larger model); exit code 5 means none selected.
pytest -m slow "$@" || [ $? -eq 5 ]

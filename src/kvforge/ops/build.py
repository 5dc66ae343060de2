"""Build the C++ ops ahead of time: ``python -m kvforge.ops.build`` (exit 1 if it cannot)."""

from __future__ import annotations

import logging
import sys

from kvforge.ops.extension import load_extension


def main() -> int:
    """Build (or find) the C++ ops extension and print where it lives."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = load_extension()
    if result.module is None:
        print(f"C++ ops extension not built: {result.error}", file=sys.stderr)
        return 1
    isa = result.module.quant_gemm_isa()
    print(f"C++ ops extension ready in {result.build_dir} (quant_gemm SIMD path: {isa})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

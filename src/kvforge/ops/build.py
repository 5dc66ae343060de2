"""Build the native code ahead of time: ``python -m kvforge.ops.build`` (exit 1 if the C++ ops
extension cannot build; the GGUF block library is reported but optional)."""

from __future__ import annotations

import logging
import sys

from kvforge.ops.blocks import load_library
from kvforge.ops.extension import load_extension


def main() -> int:
    """Build (or find) the C++ ops extension and the block library and print where they live."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    library = load_library()
    print(f"GGUF block library: {library._name if library else 'unavailable (portable path)'}")
    result = load_extension()
    if result.module is None:
        print(f"C++ ops extension not built: {result.error}", file=sys.stderr)
        return 1
    isa = result.module.quant_gemm_isa()
    print(f"C++ ops extension ready in {result.build_dir} (quant_gemm SIMD path: {isa})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Quantization quality: file size, perplexity and KL divergence of each GGUF type vs F32.

The embedded model is dequantized to an F32 GGUF (the source); an importance matrix is
collected on calibration text; every type is quantized with and without it and scored on
evaluation text against the source's saved log-probabilities. Calibration and evaluation
texts are disjoint sets of the installed Python's standard-library documentation.

python benchmarks/quant_quality.py [--chunks 12] [--types Q8_0,Q5_K_M,Q4_K_M,Q4_0,Q3_K_M,Q2_K]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from kvforge.quant.imatrix import write_imatrix
from kvforge.tools.perplexity import collect_imatrix, make_runner, perplexity, text_chunks
from kvforge.tools.quantize import quantize_file
from kvforge.tools.text import machine_text

DEFAULT_TYPES = "Q8_0,Q5_K_M,Q4_K_M,Q4_0,Q3_K_M,Q2_K"


def _check(label: str, ok: bool) -> bool:
    print(f"{'PASS' if ok else 'FAIL'}: {label}")
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("-m", "--model", default=None, help="GGUF source (default: embedded model)")
    parser.add_argument("--types", default=DEFAULT_TYPES)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--chunks", type=int, default=12, help="evaluation chunks")
    parser.add_argument("--calibration-chunks", type=int, default=32)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="kvforge-quant-"))
    work.mkdir(parents=True, exist_ok=True)
    source = work / "source-f32.gguf"
    from kvforge.config import default_model_path

    quantize_file(args.model or default_model_path(), source, "F32", show_progress=False)
    runner = make_runner(str(source))
    evaluation = text_chunks(runner, machine_text("evaluation"), args.ctx, args.chunks)
    calibration = text_chunks(
        runner, machine_text("calibration"), args.ctx, args.calibration_chunks
    )
    print(
        f"evaluation: {len(evaluation)} chunks of {args.ctx}; calibration: {len(calibration)} chunks"
    )
    start = time.perf_counter()
    sums, counts = collect_imatrix(runner, calibration, show_progress=False)
    imatrix = work / "imatrix.gguf"
    write_imatrix(imatrix, sums, counts, ["python stdlib docs"], len(calibration), args.ctx)
    print(f"imatrix: {len(sums)} matrices in {time.perf_counter() - start:.0f}s")
    base_file = work / "base.logprobs"
    base = perplexity(runner, evaluation, save_base=base_file, show_progress=False)
    print(f"F32 source: {source.stat().st_size / 2**20:.1f} MiB, perplexity {base.ppl:.4f}\n")
    header = f"{'type':8} {'imatrix':7} {'MiB':>7} {'ppl':>8} {'KLD':>16} {'top-1':>7} {'secs':>5}"
    print(header)
    print("-" * len(header))
    rows: dict[tuple[str, bool], tuple[float, float]] = {}
    for file_type in args.types.split(","):
        for use_imatrix in (False, True):
            out = work / f"{file_type}{'-imat' if use_imatrix else ''}.gguf"
            start = time.perf_counter()
            quantize_file(
                source, out, file_type, imatrix if use_imatrix else None, show_progress=False
            )
            result = perplexity(
                make_runner(str(out)), evaluation, compare_base=base_file, show_progress=False
            )
            size = out.stat().st_size / 2**20
            assert result.kld is not None and result.top1 is not None
            rows[(file_type, use_imatrix)] = (size, result.kld)
            kld = f"{result.kld:.4f}+-{result.kld_stderr:.4f}"
            print(
                f"{file_type:8} {'yes' if use_imatrix else 'no':7} {size:7.1f} {result.ppl:8.4f} "
                f"{kld:>16} {100 * result.top1:6.2f}% {time.perf_counter() - start:5.0f}"
            )
            out.unlink()
    print()
    types = args.types.split(",")
    by_size = sorted(types, key=lambda t: -rows[(t, False)][0])
    if by_size != types:
        # NOTE: rows whose length is not a multiple of 256 cannot hold K-quants; llama.cpp's
        # mix then substitutes 32-block types (IQ4_NL for Q2_K/Q3_K, Q5_0 for Q4_K, ...), so
        # a nominally smaller type can end up the larger file on such a model.
        print(f"file sizes order the types as {' > '.join(by_size)}")
    for use_imatrix in (False, True):
        klds = [rows[(t, use_imatrix)][1] for t in by_size]
        tag = "with" if use_imatrix else "without"
        _check(f"KLD grows as the file shrinks ({tag} imatrix)", klds == sorted(klds))
    for file_type in types:
        if file_type.startswith(("Q2", "Q3")):
            lower = rows[(file_type, True)][1] < rows[(file_type, False)][1]
            _check(f"imatrix lowers KLD at {file_type}", lower)


if __name__ == "__main__":
    main()

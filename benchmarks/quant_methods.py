"""4-bit methods side by side: round-to-nearest, imatrix, GPTQ, AWQ (and QAT when given).

The embedded model is dequantized to an F32 GGUF (the float source). Each method quantizes it
to 4 bits on the same calibration text (disjoint from the evaluation text, both from the
installed Python's standard-library documentation); every result is scored by the perplexity
tool against the source's saved log-probabilities on the evaluation text.

Rows: ``rtn`` / ``gptq`` / ``gptq-act-order`` / ``awq`` write Hugging Face directories with
4-bit codes in groups of ``--group-size`` (``kvforge quantize --method``; embeddings, norms and
the tied head stay float32, so sizes differ only in the linear layers); ``Q4_0`` and
``Q4_0+imatrix`` are GGUF files (groups of 32, ``kvforge quantize``) for reference.

python benchmarks/quant_methods.py [--chunks 12] [--calibration-chunks 16] [--qat DIR]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from kvforge.config import default_model_path
from kvforge.quant.imatrix import write_imatrix
from kvforge.tools.calibrated import quantize_calibrated
from kvforge.tools.perplexity import collect_imatrix, make_runner, perplexity, text_chunks
from kvforge.tools.quantize import quantize_file
from kvforge.tools.text import machine_text


def _size(path: Path) -> float:
    files = [path] if path.is_file() else list(path.glob("*.safetensors"))
    return sum(f.stat().st_size for f in files) / 2**20


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("-m", "--model", default=None, help="GGUF source (default: embedded)")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--chunks", type=int, default=12, help="evaluation chunks")
    parser.add_argument("--calibration-chunks", type=int, default=16)
    parser.add_argument(
        "--methods", default="rtn,rtn-asym,gptq,gptq-act-order,awq,Q4_0,Q4_0+imatrix"
    )
    parser.add_argument("--qat", default=None, help="a QAT-trained directory to score as well")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    print(f"CPU: {_cpu()}")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="kvforge-methods-"))
    work.mkdir(parents=True, exist_ok=True)
    source = work / "source-f32.gguf"
    quantize_file(args.model or default_model_path(), source, "F32", show_progress=False)
    runner = make_runner(str(source))
    evaluation = text_chunks(runner, machine_text("evaluation"), args.ctx, args.chunks)
    calibration_text = machine_text("calibration")
    base_file = work / "base.logprobs"
    base = perplexity(runner, evaluation, save_base=base_file, show_progress=False)
    print(f"F32 source: {_size(source):.1f} MiB, perplexity {base.ppl:.4f}")
    print(
        f"evaluation {len(evaluation)} x {args.ctx} tokens; calibration {args.calibration_chunks}"
    )
    group = args.group_size

    def calibrated(method: str, **options: object) -> Callable[[Path], None]:
        def make(out: Path) -> None:
            quantize_calibrated(
                str(source),
                out,
                method,
                calibration_text,
                group_size=group,
                ctx=args.ctx,
                max_chunks=args.calibration_chunks,
                show_progress=False,
                **options,  # type: ignore[arg-type]
            )

        return make

    def gguf(file_type: str, use_imatrix: bool) -> Callable[[Path], None]:
        def make(out: Path) -> None:
            imatrix = None
            if use_imatrix:
                chunks = text_chunks(runner, calibration_text, args.ctx, args.calibration_chunks)
                sums, counts = collect_imatrix(runner, chunks, show_progress=False)
                imatrix = work / "imatrix.gguf"
                write_imatrix(imatrix, sums, counts, ["stdlib docs"], len(chunks), args.ctx)
            quantize_file(source, out, file_type, imatrix, show_progress=False)

        return make

    makers: dict[str, tuple[str, Callable[[Path], None]]] = {
        "rtn": (f"int4 g{group} sym", calibrated("rtn")),
        "rtn-asym": (f"int4 g{group} asym", calibrated("rtn", symmetric=False)),
        "gptq": (f"int4 g{group} sym", calibrated("gptq")),
        "gptq-act-order": (f"int4 g{group} sym", calibrated("gptq", act_order=True)),
        "awq": (f"int4 g{group} asym", calibrated("awq")),
        "Q4_0": ("GGUF g32", gguf("Q4_0", False)),
        "Q4_0+imatrix": ("GGUF g32", gguf("Q4_0", True)),
    }
    header = f"{'method':16} {'grid':16} {'MiB':>6} {'ppl':>8} {'KLD':>17} {'top-1':>7} {'secs':>5}"
    print("\n" + header + "\n" + "-" * len(header))
    names = [m for m in args.methods.split(",") if m]
    if args.qat:
        names.append("qat")
    for name in names:
        start = time.perf_counter()
        if name == "qat":
            out, grid = Path(args.qat), "QAT"
        else:
            grid, make = makers[name]
            out = work / (name + (".gguf" if name.startswith("Q") else ""))
            make(out)
        seconds = time.perf_counter() - start
        result = perplexity(
            make_runner(str(out)), evaluation, compare_base=base_file, show_progress=False
        )
        assert result.kld is not None and result.top1 is not None
        kld = f"{result.kld:.4f}+-{result.kld_stderr:.4f}"
        print(
            f"{name:16} {grid:16} {_size(out):6.1f} {result.ppl:8.4f} {kld:>17} "
            f"{100 * result.top1:6.2f}% {seconds:5.0f}",
            flush=True,
        )


if __name__ == "__main__":
    main()

"""``kvforge quantize`` next to ``llama-quantize`` on the same GGUF file, in one run.

python benchmarks/quantize_speed.py [--llama-quantize BIN] [--types Q4_K_M,Q4_0,Q8_0]
                                    [--repeats 3] [--kld]

Each repeat times the whole command (process start to exit, wall clock) of kvforge and then of
llama-quantize (``--llama-quantize``, else found on PATH) for every type, alternating so both
see the same machine load; the table shows medians and kvforge / llama-quantize. The source is
the embedded model (``-m`` another GGUF); llama-quantize gets ``--allow-requantize`` as the
embedded file is Q4_1 (both dequantize it to float32 first). The C++ extension and the GGUF
block library are built (once) before timing. ``--kld`` adds the KL divergence of each output
vs the float model on evaluation text (as benchmarks/quant_quality.py). Exits non-zero when a ratio passes ``--max-ratio``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kvforge.config import default_model_path
from kvforge.entrypoints.bench.report import cpu_model, markdown_table
from kvforge.ops.blocks import load_library
from kvforge.ops.extension import load_extension

DEFAULT_TYPES = "Q4_K_M,Q4_0,Q8_0"


def _kvforge_command() -> list[str]:
    script = Path(sys.executable).with_name("kvforge")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "kvforge.entrypoints.cli"]


def _timed(command: list[str]) -> float:
    """Wall seconds of one run of ``command``; its output is kept only when it fails."""
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return elapsed


def _kld_column(source: str, outputs: dict[str, Path], work: Path, chunks: int) -> dict[str, str]:
    """KL divergence vs the float model of each output, by label."""
    from kvforge.tools.perplexity import make_runner, perplexity, text_chunks
    from kvforge.tools.quantize import quantize_file
    from kvforge.tools.text import machine_text

    float_model = work / "source-f32.gguf"
    quantize_file(source, float_model, "F32", show_progress=False)
    runner = make_runner(str(float_model))
    evaluation = text_chunks(runner, machine_text("evaluation"), 512, chunks)
    base = work / "base.logprobs"
    perplexity(runner, evaluation, save_base=base, show_progress=False)
    klds = {}
    for label, path in outputs.items():
        result = perplexity(
            make_runner(str(path)), evaluation, compare_base=base, show_progress=False
        )
        klds[label] = f"{result.kld:.4f}+-{result.kld_stderr:.4f}"
    return klds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("-m", "--model", default=None, help="GGUF source (default: embedded)")
    parser.add_argument("--llama-quantize", default=None, help="llama-quantize binary")
    parser.add_argument("--types", default=DEFAULT_TYPES)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-ratio", type=float, default=5.0)
    parser.add_argument("--kld", action="store_true", help="also KL divergence vs float")
    parser.add_argument("--kld-chunks", type=int, default=12)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    source = args.model or default_model_path()
    llama = args.llama_quantize or shutil.which("llama-quantize")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="kvforge-qspeed-"))
    work.mkdir(parents=True, exist_ok=True)
    loaded = load_extension()  # a first build takes minutes: never inside a timing
    library = load_library()
    print(f"CPU: {cpu_model()} ({os.cpu_count()} logical CPUs)")
    print(f"source: {source}")
    print(f"C++ extension: {'loaded' if loaded.module else f'unavailable ({loaded.error})'}")
    print(f"GGUF block library: {'loaded' if library else 'unavailable (numpy and torch path)'}")
    print(f"llama-quantize: {llama or 'not found (pass --llama-quantize)'}\n")
    types = args.types.split(",")
    times: dict[tuple[str, str], list[float]] = {}
    outputs: dict[str, Path] = {}
    for repeat in range(args.repeats):
        for file_type in types:
            out = work / f"kvforge-{file_type}.gguf"
            command = [*_kvforge_command(), "quantize", source, str(out), file_type]
            times.setdefault(("kvforge", file_type), []).append(_timed(command))
            outputs[f"kvforge {file_type}"] = out
            if llama:
                out = work / f"llama-{file_type}.gguf"
                command = [llama, "--allow-requantize", source, str(out), file_type]
                times.setdefault(("llama", file_type), []).append(_timed(command))
                outputs[f"llama-quantize {file_type}"] = out
        print(f"repeat {repeat + 1}/{args.repeats} done", file=sys.stderr)
    klds = _kld_column(source, outputs, work, args.kld_chunks) if args.kld else {}
    headers = ["type", "kvforge s", "llama-quantize s", "ratio"] + (
        ["kvforge KLD", "llama KLD"] if klds else []
    )
    rows, failed = [], False
    for file_type in types:
        ours = statistics.median(times[("kvforge", file_type)])
        theirs = statistics.median(times[("llama", file_type)]) if llama else None
        ratio = ours / theirs if theirs else None
        failed |= ratio is not None and ratio > args.max_ratio
        row = [
            file_type,
            f"{ours:.2f}",
            "-" if theirs is None else f"{theirs:.2f}",
            "-" if ratio is None else f"{ratio:.2f}x",
        ]
        if klds:
            row += [klds[f"kvforge {file_type}"], klds.get(f"llama-quantize {file_type}", "-")]
        rows.append(row)
    print(markdown_table(headers, rows, right=len(headers) - 1))
    print(f"\nmedians of {args.repeats} runs, whole commands, wall clock")
    if llama:
        print(f"{'FAIL' if failed else 'PASS'}: every ratio within {args.max_ratio:g}x")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

"""Quantization-aware training against post-training quantization at the same bits.

The embedded model is dequantized to an F32 GGUF (the float source). Three int4 models (groups
of ``--group-size``, symmetric) are scored by the perplexity tool on evaluation text against the
source's saved log-probabilities:

- ``PTQ``: the source rounded to the grid (``kvforge quantize --method rtn``);
- ``finetune + PTQ``: LoRA adapters trained ``--steps`` steps on calibration text in float,
  merged, then rounded (the same training as QAT, quantized afterwards);
- ``QAT``: the same adapters trained through the rounded weights (``kvforge finetune --qat``),
  merged and written on the grid they trained on.

Training and evaluation texts are disjoint parts of the installed Python's documentation.

python benchmarks/qat.py [--steps 40] [--group-size 64] [--chunks 8]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from kvforge.config import ModelConfig, default_model_path
from kvforge.loader import load_model
from kvforge.quant.gptq import Grid
from kvforge.tools.calibrated import write_quantized
from kvforge.tools.finetune import FinetuneConfig, finetune
from kvforge.tools.lora_merge import merge_gguf
from kvforge.tools.perplexity import make_runner, perplexity, text_chunks
from kvforge.tools.quantize import quantize_file
from kvforge.tools.text import machine_text


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--length", type=int, default=256, help="tokens per training line")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--chunks", type=int, default=8, help="evaluation chunks")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="kvforge-qat-"))
    work.mkdir(parents=True, exist_ok=True)
    source = work / "source-f32.gguf"
    if not source.exists():
        quantize_file(default_model_path(), source, "F32", show_progress=False)
    runner = make_runner(str(source))
    tokenizer = runner.loaded.tokenizer
    evaluation = text_chunks(runner, machine_text("evaluation"), args.ctx, args.chunks)
    base_file = work / "base.logprobs"
    base = perplexity(runner, evaluation, save_base=base_file, show_progress=False)
    # training lines: consecutive pieces of the calibration text
    ids = tokenizer.encode(machine_text("calibration"), add_special_tokens=False)
    need = args.steps * args.batch_size
    pieces = [ids[i * args.length : (i + 1) * args.length] for i in range(need)]
    data = work / "train.jsonl"
    data.write_text("\n".join(json.dumps({"text": tokenizer.decode(p)}) for p in pieces))
    grid = Grid(4, args.group_size, True)

    def train(name: str, qat: str | None) -> dict[str, object]:
        start = time.perf_counter()
        metrics = finetune(
            FinetuneConfig(
                model=str(source),
                data=str(data),
                output=str(work / name),
                rank=args.rank,
                alpha=2.0 * args.rank,
                learning_rate=args.learning_rate,
                batch_size=args.batch_size,
                eval_fraction=0.0,
                dropout=0.0,
                max_length=args.length + 1,
                qat=qat,
                qat_group_size=args.group_size,
            )
        )
        print(f"{name}: trained in {time.perf_counter() - start:.0f}s", flush=True)
        return metrics

    rows: list[tuple[str, Path]] = []
    ptq = work / "ptq"
    write_quantized(runner.loaded, ptq, "rtn", grid, show_progress=False)
    rows.append(("PTQ (RTN)", ptq))
    train("float-lora", None)
    merged = work / "float-lora-merged.gguf"
    merge_gguf(str(source), str(work / "float-lora"), str(merged), "F32", show_progress=False)
    tuned = load_model(ModelConfig(model=str(merged), dtype="float32"), None, False)
    write_quantized(tuned, work / "tuned-ptq", "rtn", grid, show_progress=False)
    rows.append(("finetune + PTQ", work / "tuned-ptq"))
    rows.append(("finetune (float)", merged))
    qat = train("qat-lora", "int4")
    rows.append(("QAT", Path(str(qat["quantized"]))))
    print(f"\nF32 source perplexity {base.ppl:.4f}; int4 g{args.group_size} sym")
    header = f"{'model':18} {'ppl':>8} {'KLD':>17} {'top-1':>7}"
    print(header + "\n" + "-" * len(header))
    for name, path in rows:
        result = perplexity(
            make_runner(str(path), "auto"), evaluation, compare_base=base_file, show_progress=False
        )
        assert result.kld is not None and result.top1 is not None
        kld = f"{result.kld:.4f}+-{result.kld_stderr:.4f}"
        print(f"{name:18} {result.ppl:8.4f} {kld:>17} {100 * result.top1:6.2f}%", flush=True)


if __name__ == "__main__":
    main()

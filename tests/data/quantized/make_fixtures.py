"""Write the tiny quantized checkpoints the loader tests read, with llm-compressor.

llm-compressor pins its own transformers, so this runs in a separate environment:

    python -m venv /tmp/lc && /tmp/lc/bin/pip install torch==2.13.0 llmcompressor==0.14.0.1
    PYTHONPATH=. /tmp/lc/bin/python tests/data/quantized/make_fixtures.py

Each folder is a 2-layer random Llama (hidden 64) with the word-level test tokenizer, quantized
by llm-compressor's own modifiers (GPTQ, AWQ, round-to-nearest) on random calibration tokens and
saved in the compressed-tensors format, as a user's checkpoint would be.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.awq import AWQModifier
from llmcompressor.modifiers.gptq import GPTQModifier
from llmcompressor.modifiers.quantization import QuantizationModifier
from tests.models.tiny_checkpoints import VOCAB, write_checkpoint, write_tokenizer
from transformers import AutoTokenizer

HERE = Path(__file__).parent
# AWQ's activation cache pins memory, which needs an accelerator; on a CPU-only machine a
# pinned tensor is just the tensor
if not torch.cuda.is_available():
    torch.Tensor.pin_memory = lambda self, *args, **kwargs: self  # type: ignore[method-assign]


def _group(bits: int, symmetric: bool, group: int, actorder: str | None = None) -> dict:
    weights = {
        "num_bits": bits,
        "type": "int",
        "symmetric": symmetric,
        "strategy": "group",
        "group_size": group,
    }
    if actorder is not None:
        weights["actorder"] = actorder
    return {"group_0": {"targets": ["Linear"], "weights": weights}}


def _channel(bits: int) -> dict:
    weights = {"num_bits": bits, "type": "int", "symmetric": True, "strategy": "channel"}
    return {"group_0": {"targets": ["Linear"], "weights": weights}}


RECIPES = {
    # GPTQ, 4 bits, groups of 32, act-order ("weight": columns visited by Hessian order, groups kept in place)
    "gptq-w4a16-actorder": lambda: GPTQModifier(
        config_groups=_group(4, True, 32, "weight"), ignore=["lm_head"], dampening_frac=0.01
    ),
    # GPTQ, 8 bits per channel
    "gptq-w8a16": lambda: GPTQModifier(config_groups=_channel(8), ignore=["lm_head"]),
    # AWQ, 4 bits asymmetric (zero points), groups of 32
    "awq-w4a16-asym": lambda: AWQModifier(
        config_groups=_group(4, False, 32), ignore=["lm_head"], duo_scaling=True
    ),
    "fp8-dynamic": lambda: QuantizationModifier(scheme="FP8_DYNAMIC", ignore=["lm_head"]),
    "fp8-static": lambda: QuantizationModifier(scheme="FP8", ignore=["lm_head"]),
    "int8-w8a8": lambda: QuantizationModifier(scheme="W8A8", ignore=["lm_head"]),
}


def calibration(samples: int = 32, length: int = 48) -> Dataset:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(5, VOCAB, (samples, length), generator=generator)
    return Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": [[1] * length] * samples}
    )


def main(names: list[str]) -> None:
    for name in names or list(RECIPES):
        out = HERE / name
        shutil.rmtree(out, ignore_errors=True)
        write_checkpoint("llama", HERE / "_float")
        model = oneshot(
            model=str(HERE / "_float"),
            processor=AutoTokenizer.from_pretrained(HERE / "_float"),
            dataset=calibration(),
            recipe=RECIPES[name](),
            num_calibration_samples=32,
            max_seq_length=48,
        )
        model.save_pretrained(out, save_compressed=True)
        write_tokenizer(out)
        shutil.rmtree(HERE / "_float", ignore_errors=True)
        print(name, sorted(p.name for p in out.iterdir()))


if __name__ == "__main__":
    main(sys.argv[1:])

"""Quantization-aware training (``kvforge finetune --qat``): adapters trained through weights
rounded to the int4 grid, exported merged and quantized, beat the same training done without
fake quantization and rounded afterwards (post-training quantization)."""

from __future__ import annotations

import json
import random

import pytest
import torch

from kvforge.config import ModelConfig
from kvforge.errors import InvalidRequestError
from kvforge.loader import load_model
from kvforge.quant.gptq import Grid
from kvforge.tools.calibrated import write_quantized
from kvforge.tools.finetune import FinetuneConfig, finetune
from kvforge.tools.lora_merge import merge_hf_directory
from kvforge.tools.perplexity import make_runner
from tests.models.tiny_checkpoints import WORDS, write_checkpoint


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qat")
    write_checkpoint("llama", folder / "base")
    rng = random.Random(0)
    phrases = [" ".join(rng.choice(WORDS[5:]) for _ in range(5)) for _ in range(8)]
    lines = [
        json.dumps({"text": " ".join(rng.choice(phrases) for _ in range(12))}) for _ in range(48)
    ]
    (folder / "train.jsonl").write_text("\n".join(lines))
    held_out = " ".join(rng.choice(phrases) for _ in range(60))
    return folder, held_out


def _loss(path: str, text: str) -> float:
    runner = make_runner(path, "auto")
    ids = runner.loaded.tokenizer.encode(text)
    logprobs = runner.score(ids).log_softmax(-1)
    return float(-logprobs[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].mean())


def _train(folder, name: str, qat: str | None) -> dict:  # type: ignore[no-untyped-def]
    config = FinetuneConfig(
        model=str(folder / "base"),
        data=str(folder / "train.jsonl"),
        output=str(folder / name),
        rank=8,
        learning_rate=3e-3,
        epochs=3,
        batch_size=4,
        eval_fraction=0.0,
        dropout=0.0,
        show_progress=False,
        qat=qat,
        qat_group_size=32,
    )
    return finetune(config)


def test_qat_beats_quantizing_after_training(setup):
    folder, held_out = setup
    qat = _train(folder, "qat", "int4")
    assert (folder / "qat" / "quantized" / "config.json").exists()
    qat_loss = _loss(qat["quantized"], held_out)
    # PTQ: the same training in float, then merged and rounded to the same grid
    _train(folder, "float", None)
    merged = folder / "float-merged"
    merge_hf_directory(str(folder / "base"), str(folder / "float"), str(merged))
    loaded = load_model(ModelConfig(model=str(merged), dtype="float32"), None, False)
    write_quantized(loaded, folder / "ptq", "rtn", Grid(4, 32, True), show_progress=False)
    ptq_loss = _loss(str(folder / "ptq"), held_out)
    float_loss = _loss(str(merged), held_out)
    print(
        f"held-out loss: float {float_loss:.3f}, PTQ int4 {ptq_loss:.3f}, QAT int4 {qat_loss:.3f}"
    )
    assert qat_loss < ptq_loss


def test_bad_qat_settings(setup):
    folder, _ = setup
    config = FinetuneConfig(
        model=str(folder / "base"), data=str(folder / "train.jsonl"), output=str(folder / "x")
    )
    config.qat = "int3"
    with pytest.raises(InvalidRequestError, match="qat"):
        finetune(config)
    config.qat, config.qat_group_size = "int4", 48
    with pytest.raises(InvalidRequestError, match="group size 48"):
        finetune(config)

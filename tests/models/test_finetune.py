"""kvforge finetune on a tiny random Llama: the loss falls, held-out accuracy rises, the adapter
is a PEFT adapter (transformers + peft give the engine's logits), a resumed run ends where an
uninterrupted one does, and the differentiable forward equals the serving forward."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch
from safetensors.torch import load_file

from kvforge import LoRARequest
from kvforge.config import ModelConfig
from kvforge.engine import LLMEngine
from kvforge.entrypoints.cli import main
from kvforge.entrypoints.llm import engine_config
from kvforge.errors import InvalidRequestError
from kvforge.layers.attention import create_attention_backend
from kvforge.layers.forward_batch import ForwardBatch
from kvforge.loader import load_model
from kvforge.lora.train import TrainableLoRA
from kvforge.sampling_params import SamplingParams
from kvforge.tools.finetune import FinetuneConfig, finetune, tokenize_conversation
from tests.helpers import run_to_completion
from tests.models.test_hf_tiny import kv_caches
from tests.models.tiny_checkpoints import VOCAB, write_checkpoint

CODES = {f"w{10 + i}": f"w{60 + (7 * i) % 30}" for i in range(12)}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    directory = tmp_path_factory.mktemp("base")
    write_checkpoint("llama", directory)
    return directory


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Made-up codes mapped to words: the base model cannot know them."""
    rng = random.Random(0)
    lines = []
    for _ in range(8):
        for code, word in CODES.items():
            filler = " ".join(f"w{rng.randrange(40, 50)}" for _ in range(rng.randrange(0, 3)))
            messages = [
                {"role": "user", "content": f"{filler} {code}".strip()},
                {"role": "assistant", "content": word},
            ]
            lines.append(json.dumps({"messages": messages}))
    path = tmp_path_factory.mktemp("data") / "codes.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def config(base, data, output, **overrides):
    fields = dict(
        model=str(base),
        data=str(data),
        output=str(output),
        rank=8,
        alpha=16,
        dropout=0.05,
        learning_rate=1e-2,
        epochs=4,
        batch_size=8,
        warmup_ratio=0.1,
        eval_fraction=0.1,
        show_progress=False,
    )
    fields.update(overrides)
    return FinetuneConfig(**fields)


def test_training_learns_the_task_and_writes_a_peft_adapter(base, data, tmp_path):
    out = tmp_path / "adapter"
    metrics = finetune(config(base, data, out))
    assert metrics["train_loss_last"] < 0.3 * metrics["train_loss_first"], metrics
    assert metrics["eval_accuracy"] >= 0.9, metrics
    assert metrics["train_tokens_per_s"] > 0
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["r"] == 8 and saved["peft_type"] == "LORA"
    # Served: every code maps to its word, greedy, through the engine's LoRA slots.
    engine = LLMEngine(
        engine_config(
            str(base),
            block_size=4,
            num_blocks=128,
            show_progress=False,
            enable_lora=True,
            max_lora_rank=8,
        )
    )
    lora = LoRARequest("codes", 1, str(out))
    ids = {}
    for code in CODES:
        prompt = engine.tokenizer.encode_chat(
            [{"role": "user", "content": code}], add_generation_prompt=True
        )
        ids[code] = engine.add_request(
            prompt, SamplingParams(temperature=0, max_tokens=1), lora_request=lora
        )
    outputs = run_to_completion(engine)
    right = sum(outputs[ids[c]].outputs[0].text.strip() == w for c, w in CODES.items())
    assert right >= 0.9 * len(CODES)


def test_the_adapter_loads_in_transformers_peft(base, data, tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "adapter"
    finetune(config(base, data, out, epochs=1))
    reference = transformers.AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(reference, str(out)).eval()
    ids = [0, 3, 10, 4, 25, 30]
    with torch.inference_mode():
        expected = model(torch.tensor([ids])).logits[0]
    from kvforge.config import LoRAConfig
    from kvforge.lora.manager import LoRAManager

    loaded = load_model(ModelConfig(model=str(base)), create_attention_backend(), False)
    manager = LoRAManager.for_model(loaded.model, LoRAConfig(enabled=True, max_lora_rank=8))
    manager.add(LoRARequest("a", 1, str(out)))
    kv = kv_caches(loaded.config, 8)
    with torch.inference_mode():
        batch = ForwardBatch.build([ids], [0], [[0, 1]], 4, torch.device("cpu"))
        batch.lora = manager.batch([1], [len(ids)])
        ours = loaded.model.compute_logits(loaded.model(batch, kv))
    assert (ours - expected).abs().max().item() <= 1e-3


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(base, data, tmp_path):
    whole = tmp_path / "whole"
    finetune(config(base, data, whole, epochs=1, save_every=3))
    part = tmp_path / "part"
    finetune(config(base, data, part, epochs=1, save_every=3))
    # Interrupted after the step-3 checkpoint: drop everything written later, then resume.
    for item in part.iterdir():
        if item.name != "checkpoint-3":
            shutil.rmtree(item) if item.is_dir() else item.unlink()
    for extra in part.glob("checkpoint-*"):
        if extra.name != "checkpoint-3":
            shutil.rmtree(extra)
    metrics = finetune(config(base, data, part, epochs=1, save_every=3, resume=True))
    assert metrics["steps"] == json.loads((whole / "finetune_metrics.json").read_text())["steps"]
    a = load_file(str(whole / "adapter_model.safetensors"))
    b = load_file(str(part / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5


def test_the_training_forward_equals_the_serving_forward(base):
    loaded = load_model(ModelConfig(model=str(base)), create_attention_backend(), False)
    lora = TrainableLoRA(loaded.model, ("q_proj", "v_proj"), 4, 8.0)
    torch.manual_seed(2)
    ids = torch.randint(3, VOCAB, (2, 9))
    with torch.no_grad():
        trained = lora(ids)
    kv = kv_caches(loaded.config, 8)
    with torch.inference_mode():
        batch = ForwardBatch.build(
            ids.tolist(), [0, 0], [[0, 1, 2], [3, 4, 5]], 4, torch.device("cpu")
        )
        served = loaded.model.compute_logits(loaded.model(batch, kv)).view(2, 9, -1)
    assert (trained - served).abs().max().item() <= 1e-4  # B starts at zero: the base model


def test_only_assistant_tokens_are_labelled(base):
    loaded = load_model(ModelConfig(model=str(base)), create_attention_backend(), False)
    messages = [
        {"role": "user", "content": "w10"},
        {"role": "assistant", "content": "w60 w61"},
        {"role": "user", "content": "w11"},
        {"role": "assistant", "content": "w62"},
    ]
    example = tokenize_conversation(loaded.tokenizer, messages, 512)
    labelled = [t for t, label in zip(example.input_ids, example.labels) if label != -100]
    words = loaded.tokenizer.decode(labelled).split()
    assert words == ["w60", "w61", "w62"]


def test_bad_training_input_gets_one_line_errors(base, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    for content, message in [
        ("{not json\n", "line 1: not JSON"),
        ('{"prompt": "x"}\n', "needs a 'messages' list"),
        ('{"messages": [{"role": "user", "content": "w5"}]}\n', "no assistant tokens"),
        ("\n", "holds no conversations"),
    ]:
        bad.write_text(content)
        with pytest.raises(InvalidRequestError, match=message):
            finetune(config(base, bad, tmp_path / "out"))
    with pytest.raises(InvalidRequestError, match="targets"):
        finetune(config(base, bad, tmp_path / "out", target_modules=("embed_tokens",)))
    argv = ["finetune", str(base), str(tmp_path / "missing.jsonl"), str(tmp_path / "o")]
    assert main(argv) == 2
    assert "cannot read the training data" in capsys.readouterr().err

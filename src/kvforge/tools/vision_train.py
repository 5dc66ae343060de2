"""Train a LLaVA projector: a frozen CLIP vision tower feeding a frozen language model.

Data: a folder with ``conversations.jsonl``, one ``{"image": "x.png", "question": "...",
"answer": "..."}`` per line. Each example is the model's chat template around a user turn
(the image, then the question) and the assistant's answer; the loss is the cross-entropy of
the answer's tokens (and the end of turn). Only the projector learns (two linear layers, as
LLaVA-1.5's first stage): the tower's features are computed once, the language model runs a
differentiable forward (``TrainableLoRA`` with no adapters) whose gradients reach the image
embeddings. The result is written as an mmproj GGUF file that ``--mmproj`` loads.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from kvforge.clip import load as load_clip
from kvforge.config import ModelConfig
from kvforge.layers.attention import create_attention_backend
from kvforge.loader.mmproj import write_mmproj
from kvforge.loader.model_loader import load_model
from kvforge.lora.train import TrainableLoRA
from kvforge.models.llava import VisionAdapter, VisionAdapterConfig
from kvforge.multimodal import IMAGE_MARKER, expand_placeholders


@dataclass
class ProjectorOptions:
    steps: int = 300
    batch_size: int = 8
    lr: float = 2e-3
    feature_layer: int = -1
    image_token_id: int = 16  # SmolLM2's <empty_output>: a control token no text produces
    seed: int = 0


def read_conversations(folder: Path) -> list[dict[str, str]]:
    index = folder / "conversations.jsonl"
    if not index.is_file():
        raise FileNotFoundError(f"{index}: no such file ({{image, question, answer}} per line)")
    rows = []
    for number, line in enumerate(index.read_text().splitlines(), 1):
        if not line.strip():
            continue
        entry = json.loads(line)
        if not all(isinstance(entry.get(k), str) for k in ("image", "question", "answer")):
            raise ValueError(f"{index}:{number}: needs image, question and answer strings")
        rows.append(entry)
    if not rows:
        raise ValueError(f"{index}: no examples")
    return rows


def train_projector(
    model: str | None,
    clip_dir: str | Path,
    data: str | Path,
    out: str | Path,
    options: ProjectorOptions | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """Train the projector and write ``out`` (mmproj GGUF); returns the last loss and seconds."""
    from tqdm import tqdm

    opts = options or ProjectorOptions()
    torch.manual_seed(opts.seed)
    rng = random.Random(opts.seed)
    folder = Path(data)
    rows = read_conversations(folder)
    loaded = load_model(
        ModelConfig(model=model, dtype="float32"), create_attention_backend(), progress
    )
    tokenizer = loaded.tokenizer
    clip, preprocess = load_clip(clip_dir)
    config = VisionAdapterConfig(
        clip.config.vision,
        loaded.config.hidden_size,
        "gelu",
        opts.feature_layer,
        image_token_id=opts.image_token_id,
        image_mean=tuple(preprocess.mean.flatten().tolist()),
        image_std=tuple(preprocess.std.flatten().tolist()),
    )
    adapter = VisionAdapter(config)
    adapter.vision_tower.load_state_dict(clip.model.vision_model.state_dict())
    for param in adapter.vision_tower.parameters():
        param.requires_grad_(False)
    length = config.tokens_per_image
    # the frozen tower's features, once per image
    pixels = torch.stack([preprocess(folder / row["image"]) for row in rows])
    with torch.no_grad():
        features = adapter.features(pixels)
    examples = []
    end_of_turn = tokenizer.eos_token_ids[0] if tokenizer.eos_token_ids else None
    for row in rows:
        prompt = tokenizer.encode_chat(
            [{"role": "user", "content": f"{IMAGE_MARKER}\n{row['question']}"}],
            opts.image_token_id,
            add_generation_prompt=True,
        )
        prompt, _ = expand_placeholders(prompt, opts.image_token_id, length, 1)
        answer = tokenizer.encode(row["answer"], add_special_tokens=False)
        answer += [end_of_turn] if end_of_turn is not None else []
        examples.append((prompt, answer))
    trainer = TrainableLoRA(loaded.model, (), 1, 1.0)  # no adapters: the frozen forward
    projector = adapter.multi_modal_projector
    optimizer = torch.optim.AdamW(projector.parameters(), lr=opts.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(1.0, step / opts.steps)))
    )
    started = time.monotonic()
    loss_value = float("nan")
    bar = tqdm(range(opts.steps), desc="projector", disable=not progress)
    for _ in bar:
        chosen = [rng.randrange(len(examples)) for _ in range(opts.batch_size)]
        ids, where, labels = _batch([examples[i] for i in chosen], opts.image_token_id)
        vectors = projector(features[torch.tensor(chosen)]).reshape(-1, config.text_hidden_size)
        target_rows = labels >= 0
        logits = trainer(ids, rows=target_rows, images=(where, vectors))
        loss = F.cross_entropy(logits, labels[target_rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        schedule.step()
        loss_value = loss.item()
        bar.set_postfix(loss=f"{loss_value:.3f}")
    write_mmproj(adapter, out, opts.image_token_id)
    return {"loss": loss_value, "seconds": time.monotonic() - started}


def _batch(
    examples: list[tuple[list[int], list[int]]], placeholder: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids [B, L], the image placeholders [B, L], and at each position the token
    it should predict when that token belongs to the answer (-1 elsewhere)."""
    width = max(len(p) + len(a) for p, a in examples)
    ids = torch.zeros(len(examples), width, dtype=torch.long)
    labels = torch.full((len(examples), width), -1, dtype=torch.long)
    for row, (prompt, answer) in enumerate(examples):
        sequence = prompt + answer
        ids[row, : len(sequence)] = torch.tensor(sequence)
        # position i predicts token i + 1: the answer's tokens from the prompt's last position
        labels[row, len(prompt) - 1 : len(sequence) - 1] = torch.tensor(answer)
    where = ids == placeholder
    return ids, where, labels

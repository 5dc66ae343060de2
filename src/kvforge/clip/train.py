"""Contrastive training of a CLIP model from image-caption pairs (the paper's recipe, small).

Data: a folder with ``captions.jsonl`` (one ``{"image": "relative/path.png", "caption": "...",
"group": "..."}`` per line; ``group`` optional: pairs of one group count as matches of each
other, by default pairs with the same caption do). Loss: symmetric InfoNCE over the batch's
image-text similarity matrix scaled by a learnable temperature, whose scale is clamped at 100
as in the paper. A word-level tokenizer is built from the captions when none is given. The
output directory is an HF ``CLIPModel`` checkpoint (config.json, model.safetensors,
tokenizer.json, preprocessor_config.json) that ``kvforge.clip.load`` and transformers read.
"""

from __future__ import annotations

import json
import math
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from kvforge.clip.image import ImageError, Preprocess
from kvforge.models.clip import CLIP_MEAN, CLIP_STD, ClipConfig, ClipModel, TowerConfig

MAX_LOGIT_SCALE = math.log(100.0)
SPECIAL = ("[PAD]", "[UNK]", "[SOS]", "[EOS]")


@dataclass
class TrainOptions:
    image_size: int = 32
    patch_size: int = 8
    width: int = 64  # both towers
    layers: int = 4
    heads: int = 4
    projection_dim: int = 64
    steps: int = 3000
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: int = 100
    seed: int = 0
    checkpoint_every: int = 0  # steps; 0: only at the end
    bf16: bool = False  # autocast on CPU (pays on CPUs with AVX-512 BF16)


@dataclass
class Pairs:
    pixels: torch.Tensor  # [n, 3, size, size]
    captions: list[str]
    groups: list[str]


def read_pairs(folder: str | Path, preprocess: Preprocess) -> Pairs:
    """The image-caption pairs of a folder's captions.jsonl, preprocessed."""
    root = Path(folder)
    index = root / "captions.jsonl"
    if not index.is_file():
        raise FileNotFoundError(f"{index}: no such file (one JSON object per image-caption pair)")
    pixels, captions, groups = [], [], []
    for number, line in enumerate(index.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            image, caption = entry["image"], entry["caption"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{index}:{number}: needs an image and a caption ({exc})") from exc
        if not isinstance(caption, str) or not caption.strip():
            raise ValueError(f"{index}:{number}: the caption must be a non-empty string")
        try:
            pixels.append(preprocess(root / str(image)))
        except ImageError as exc:
            raise ValueError(f"{index}:{number}: {exc}") from exc
        captions.append(caption)
        groups.append(str(entry.get("group", caption)))
    if len(captions) < 2:
        raise ValueError(f"{index}: contrastive training needs at least two pairs")
    return Pairs(torch.stack(pixels), captions, groups)


def words(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]", text.lower())


def build_tokenizer(captions: list[str], folder: Path) -> Any:
    """A lower-casing word-level tokenizer over the captions' words; texts become
    [SOS] words [EOS]."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel

    vocab = {token: i for i, token in enumerate(SPECIAL)}
    for caption in captions:
        for word in words(caption):
            vocab.setdefault(word, len(vocab))
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[SOS] $A [EOS]", special_tokens=[("[SOS]", 2), ("[EOS]", 3)]
    )
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    return tokenizer


def contrastive_loss(
    image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, same: torch.Tensor
) -> torch.Tensor:
    """Symmetric InfoNCE: cross-entropy of each image over the texts and of each text over the
    images; ``same[i, j]``: pair j matches pair i (the diagonal at least), targets spread
    evenly over the matches."""
    logits = scale.exp() * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).t()
    targets = same.float() / same.float().sum(1, keepdim=True)
    loss_images = -(targets * logits.log_softmax(dim=1)).sum(1).mean()
    loss_texts = -(targets.t() * logits.t().log_softmax(dim=1)).sum(1).mean()
    return (loss_images + loss_texts) / 2


def _save(model: ClipModel, out: Path, mean: Any, std: Any) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), {"format": "pt"})
    (out / "config.json").write_text(json.dumps(model.config.to_hf(), indent=2))
    size = model.config.vision.image_size
    processor = {
        "image_processor_type": "CLIPImageProcessor",
        "size": {"shortest_edge": size},
        "crop_size": {"height": size, "width": size},
        "do_center_crop": True,
        "do_normalize": True,
        "do_resize": True,
        "resample": 3,
        "image_mean": list(mean),
        "image_std": list(std),
    }
    (out / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))


def train(
    data: str | Path,
    out: str | Path,
    options: TrainOptions | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """Train a CLIP model on ``data`` into ``out``; returns the final loss and seconds."""
    from tqdm import tqdm

    opts = options or TrainOptions()
    out = Path(out)
    torch.manual_seed(opts.seed)
    rng = random.Random(opts.seed)
    preprocess = Preprocess(opts.image_size, CLIP_MEAN, CLIP_STD)
    pairs = read_pairs(data, preprocess)
    tokenizer = build_tokenizer(pairs.captions, out)
    encodings = tokenizer.encode_batch(pairs.captions)
    longest = max(len(e.ids) for e in encodings)
    ids = torch.zeros(len(encodings), longest, dtype=torch.long)
    for i, encoding in enumerate(encodings):
        ids[i, : len(encoding.ids)] = torch.tensor(encoding.ids)
    mask = (ids != 0).long()
    group_ids = {g: i for i, g in enumerate(dict.fromkeys(pairs.groups))}
    groups = torch.tensor([group_ids[g] for g in pairs.groups])

    def tower(**extra: Any) -> TowerConfig:
        return TowerConfig.from_dict(
            {
                "hidden_size": opts.width,
                "intermediate_size": 4 * opts.width,
                "num_hidden_layers": opts.layers,
                "num_attention_heads": opts.heads,
                "hidden_act": "gelu",
                **extra,
            }
        )

    config = ClipConfig(
        tower(image_size=opts.image_size, patch_size=opts.patch_size),
        tower(
            vocab_size=tokenizer.get_vocab_size(),
            max_position_embeddings=max(16, longest),
            eos_token_id=3,
            pad_token_id=0,
        ),
        opts.projection_dim,
    )
    model = ClipModel(config)
    _initialise(model)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": opts.weight_decay}, {"params": rest, "weight_decay": 0}],
        lr=opts.lr,
        betas=(0.9, 0.98),
        eps=1e-6,
    )

    def rate(step: int) -> float:  # linear warm-up, cosine decay
        if step < opts.warmup:
            return (step + 1) / opts.warmup
        done = (step - opts.warmup) / max(1, opts.steps - opts.warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, done)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, rate)
    count = len(pairs.captions)
    batch = min(opts.batch_size, count)
    order: list[int] = []
    started = time.monotonic()
    loss_value = float("nan")
    bar = tqdm(range(opts.steps), desc="clip train", disable=not progress)
    model.train()
    for step in bar:
        if len(order) < batch:
            fresh = list(range(count))
            rng.shuffle(fresh)
            order += fresh
        chosen, order = order[:batch], order[batch:]
        rows = torch.tensor(chosen)
        width = int(mask[rows].sum(1).max())
        with torch.autocast("cpu", torch.bfloat16, enabled=opts.bf16):
            image = model.encode_image(pairs.pixels[rows])
            text = model.encode_text(ids[rows, :width], mask[rows, :width])
        same = groups[rows][:, None] == groups[rows][None, :]
        loss = contrastive_loss(image.float(), text.float(), model.logit_scale, same)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        with torch.no_grad():  # the paper's clamp: the scale never exceeds 100
            model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        loss_value = loss.item()
        bar.set_postfix(loss=f"{loss_value:.3f}", scale=f"{model.logit_scale.exp().item():.1f}")
        if opts.checkpoint_every and (step + 1) % opts.checkpoint_every == 0:
            _save(model, out, CLIP_MEAN, CLIP_STD)
    model.eval()
    _save(model, out, CLIP_MEAN, CLIP_STD)
    return {"loss": loss_value, "seconds": time.monotonic() - started}


def _initialise(model: ClipModel) -> None:
    """Small normal weights, as CLIP's initialisation (std 0.02; projections width^-0.5)."""
    for name, param in model.named_parameters():
        if name == "logit_scale":
            continue
        if param.dim() >= 2:
            std = param.shape[-1] ** -0.5 if "projection" in name else 0.02
            torch.nn.init.normal_(param, std=std)
        elif name.endswith("class_embedding"):
            torch.nn.init.normal_(param, std=0.02)
        elif name.endswith("bias"):
            torch.nn.init.zeros_(param)

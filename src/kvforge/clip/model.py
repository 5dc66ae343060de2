"""Loading a CLIP checkpoint and using it: ``load(path) -> (clip, preprocess)``.

A checkpoint is a directory: Hugging Face ``CLIPModel`` (config.json, model.safetensors or
pytorch_model.bin, tokenizer.json, preprocessor_config.json) or OpenCLIP
(open_clip_config.json, open_clip_model.safetensors / open_clip_pytorch_model.bin and a
tokenizer.json). :class:`Clip` takes images (PIL images, bytes, paths or preprocessed
tensors) and texts (strings or token ids) and answers normalised embeddings and logits.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from kvforge.clip.image import Preprocess
from kvforge.errors import ModelFileError, ModelNotFoundError
from kvforge.models.clip import (
    CLIP_MEAN,
    CLIP_STD,
    ClipConfig,
    ClipModel,
    TowerConfig,
    from_open_clip,
)


class Clip:
    """A CLIP model with its tokenizer and preprocessing."""

    def __init__(self, model: ClipModel, tokenizer: Any, preprocess: Preprocess) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.config = model.config

    # ------------------------------------------------------------------ text
    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, attention mask), padded on the right; a text too long for the context keeps
        its first tokens and its end token."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise ValueError("texts must be a list of strings")
        limit = self.config.text.max_position_embeddings
        eos, pad = self.config.text.eos_token_id, self.config.text.pad_token_id
        rows = []
        for encoding in self.tokenizer.encode_batch(list(texts)):
            ids = list(encoding.ids)
            if len(ids) > limit:
                ids = ids[: limit - 1] + [ids[-1] if eos == 2 else eos]
            rows.append(ids)
        width = max((len(r) for r in rows), default=1)
        batch = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            batch[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        return batch, mask

    @torch.inference_mode()
    def encode_text(
        self, texts: Sequence[str], normalize: bool = True, batch_size: int = 256
    ) -> torch.Tensor:
        """[len(texts), dim] text embeddings (unit length unless ``normalize=False``)."""
        out = []
        for start in range(0, len(texts), batch_size):
            ids, mask = self.tokenize(texts[start : start + batch_size])
            out.append(self.model.encode_text(ids, mask, normalize))
        return torch.cat(out) if out else torch.zeros(0, self.config.projection_dim)

    # ---------------------------------------------------------------- images
    def pixels(self, images: Sequence[object] | torch.Tensor) -> torch.Tensor:
        """Preprocessed [n, 3, size, size] pixels of images (a tensor is taken as it is)."""
        if isinstance(images, torch.Tensor):
            return images
        return self.preprocess.batch(images)

    @torch.inference_mode()
    def encode_image(
        self, images: Sequence[object] | torch.Tensor, normalize: bool = True, batch_size: int = 64
    ) -> torch.Tensor:
        """[n, dim] image embeddings (unit length unless ``normalize=False``)."""
        out = []
        for start in range(0, len(images), batch_size):
            chunk = self.pixels(images[start : start + batch_size])
            out.append(self.model.encode_image(chunk, normalize))
        return torch.cat(out) if out else torch.zeros(0, self.config.projection_dim)

    @torch.inference_mode()
    def __call__(
        self, images: Sequence[object] | torch.Tensor, texts: Sequence[str]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits_per_image [images, texts], logits_per_text)."""
        scale = self.model.logit_scale.exp()
        logits = scale * self.encode_image(images) @ self.encode_text(texts).t()
        return logits, logits.t()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelFileError(path, f"not readable JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise ModelFileError(path, "not a JSON object")
    return value


def _tensors(folder: Path, names: Sequence[str]) -> dict[str, torch.Tensor]:
    for name in names:
        path = folder / name
        if not path.exists():
            continue
        try:
            if name.endswith(".safetensors"):
                from safetensors.torch import load_file

                return load_file(str(path))
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ModelFileError(path, f"cannot read the weights: {exc}") from exc
        return state.get("state_dict", state) if isinstance(state, dict) else state
    raise ModelFileError(folder, f"no weights file (one of {', '.join(names)})")


def _open_clip_config(raw: dict[str, Any]) -> tuple[ClipConfig, dict[str, Any]]:
    model = raw.get("model_cfg") or {}
    vision, text = model.get("vision_cfg") or {}, model.get("text_cfg") or {}
    act = "quick_gelu" if model.get("quick_gelu") else "gelu"
    v_width = vision.get("width", 768)
    t_width = text.get("width", 512)
    config = ClipConfig(
        TowerConfig.from_dict(
            {
                "hidden_size": v_width,
                "intermediate_size": int(v_width * vision.get("mlp_ratio", 4.0)),
                "num_hidden_layers": vision.get("layers", 12),
                "num_attention_heads": v_width // vision.get("head_width", 64),
                "image_size": vision.get("image_size", 224),
                "patch_size": vision.get("patch_size", 16),
                "hidden_act": act,
            }
        ),
        TowerConfig.from_dict(
            {
                "hidden_size": t_width,
                "intermediate_size": int(t_width * text.get("mlp_ratio", 4.0)),
                "num_hidden_layers": text.get("layers", 12),
                "num_attention_heads": text.get("heads", 8),
                "vocab_size": text.get("vocab_size", 49408),
                "max_position_embeddings": text.get("context_length", 77),
                "hidden_act": act,
                "pool_argmax": True,
                "pad_token_id": 0,
            }
        ),
        model.get("embed_dim", 512),
    )
    return config, raw.get("preprocess_cfg") or {}


def load(path: str | Path) -> tuple[Clip, Preprocess]:
    """A CLIP checkpoint directory (Hugging Face or OpenCLIP) -> (clip, preprocess)."""
    from tokenizers import Tokenizer

    folder = Path(path)
    if not folder.is_dir():
        raise ModelNotFoundError(f"{folder}: no such CLIP checkpoint directory")
    if (folder / "open_clip_config.json").exists():
        raw = _read_json(folder / "open_clip_config.json")
        try:
            config, pre = _open_clip_config(raw)
        except (TypeError, ValueError) as exc:
            raise ModelFileError(folder / "open_clip_config.json", str(exc)) from exc
        names = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
        try:
            state = from_open_clip(_tensors(folder, names))
        except ValueError as exc:
            raise ModelFileError(folder, str(exc)) from exc
        mean, std = pre.get("mean", CLIP_MEAN), pre.get("std", CLIP_STD)
    else:
        raw = _read_json(folder / "config.json")
        if "CLIPModel" not in (raw.get("architectures") or ["CLIPModel"]):
            raise ModelFileError(folder / "config.json", "not a CLIPModel checkpoint")
        try:
            config = ClipConfig.from_hf(raw)
        except (TypeError, ValueError) as exc:
            raise ModelFileError(folder / "config.json", str(exc)) from exc
        state = _tensors(folder, ("model.safetensors", "pytorch_model.bin"))
        pre = (
            _read_json(folder / "preprocessor_config.json")
            if (folder / "preprocessor_config.json").exists()
            else {}
        )
        mean, std = pre.get("image_mean", CLIP_MEAN), pre.get("image_std", CLIP_STD)
    model = ClipModel(config)
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        problem = str(exc).split("\n\t")[0] + ": " + " ".join(str(exc).split("\n\t")[1:])[:300]
        raise ModelFileError(folder, problem) from exc
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise ModelFileError(folder, "the weights hold NaN or infinite values")
    if not math.isfinite(model.logit_scale.item()):
        raise ModelFileError(folder, "logit_scale is not finite")
    tokenizer_file = folder / "tokenizer.json"
    if not tokenizer_file.exists():
        raise ModelFileError(folder, "no tokenizer.json")
    try:
        tokenizer = Tokenizer.from_file(str(tokenizer_file))
    except Exception as exc:
        raise ModelFileError(tokenizer_file, f"not a tokenizers file: {exc}") from exc
    tokenizer.no_padding()  # tokenize() pads and truncates itself
    tokenizer.no_truncation()
    preprocess = Preprocess(config.vision.image_size, mean, std)
    return Clip(model, tokenizer, preprocess), preprocess

"""CLIP: a ViT image encoder and a causal text transformer projected into one embedding space.

The modules keep Hugging Face ``CLIPModel``'s parameter names, so an HF checkpoint loads with
``load_state_dict`` as it is; OpenCLIP checkpoints are renamed onto them
(:func:`from_open_clip`). ``ClipModel(images, texts)`` gives ``logits_per_image`` (images x
texts), scaled by ``exp(logit_scale)`` as in the paper. ``VisionTower.hidden_states`` serves
vision chat models (LLaVA reads a layer before the last).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# OpenAI's preprocessing statistics (RGB), the default of HF and OpenCLIP checkpoints
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class TowerConfig:
    """One encoder's shape (HF ``vision_config`` / ``text_config`` names)."""

    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    # vision
    image_size: int = 224
    patch_size: int = 32
    num_channels: int = 3
    # text
    vocab_size: int = 49408
    max_position_embeddings: int = 77
    eos_token_id: int = 49407
    pad_token_id: int = 1
    pool_argmax: bool = False  # text pooled at the highest token id (OpenAI / OpenCLIP)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TowerConfig:
        names = {f.name for f in fields(cls)}
        config = cls(**{k: v for k, v in values.items() if k in names and v is not None})
        config.check()
        return config

    def check(self) -> None:
        positive = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        for name in (*positive, "image_size", "patch_size", "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"CLIP config {name} must be a positive integer, not {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"CLIP config hidden_size {self.hidden_size} is not a multiple of "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(
                f"CLIP config hidden_act {self.hidden_act!r} is not one of {sorted(_ACTIVATIONS)}"
            )


@dataclass
class ClipConfig:
    vision: TowerConfig = field(default_factory=TowerConfig)
    text: TowerConfig = field(default_factory=TowerConfig)
    projection_dim: int = 512
    logit_scale_init_value: float = math.log(1 / 0.07)

    @classmethod
    def from_hf(cls, config: dict[str, Any]) -> ClipConfig:
        """From a ``CLIPModel`` config.json."""
        projection = config.get("projection_dim", 512)
        if not isinstance(projection, int) or projection < 1:
            raise ValueError(
                f"CLIP config projection_dim must be a positive integer, not {projection!r}"
            )
        return cls(
            TowerConfig.from_dict(config.get("vision_config") or {}),
            TowerConfig.from_dict(config.get("text_config") or {}),
            projection,
            float(config.get("logit_scale_init_value", math.log(1 / 0.07))),
        )

    def to_hf(self) -> dict[str, Any]:
        """A config.json that transformers' ``CLIPModel`` reads."""
        vision_keys = ("image_size", "patch_size", "num_channels")
        text_keys = ("vocab_size", "max_position_embeddings", "eos_token_id", "pad_token_id")
        common = (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "hidden_act",
            "layer_norm_eps",
        )
        return {
            "architectures": ["CLIPModel"],
            "model_type": "clip",
            "projection_dim": self.projection_dim,
            "logit_scale_init_value": self.logit_scale_init_value,
            "vision_config": {k: getattr(self.vision, k) for k in (*common, *vision_keys)},
            "text_config": {k: getattr(self.text, k) for k in (*common, *text_keys)},
        }


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's GELU approximation."""
    return x * torch.sigmoid(1.702 * x)


_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "quick_gelu": quick_gelu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


class Attention(nn.Module):
    def __init__(self, config: TowerConfig) -> None:
        super().__init__()
        width = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        batch, length, width = x.shape
        shape = (batch, length, self.num_heads, width // self.num_heads)
        q, k, v = (
            p(x).view(shape).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, width))


class Mlp(nn.Module):
    def __init__(self, config: TowerConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = _ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, config: TowerConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = Attention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = Mlp(config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, config: TowerConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_hidden_layers))

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None, upto: int | None = None
    ) -> torch.Tensor:
        """The output of layer ``upto`` (1-based, all layers when None)."""
        for layer in self.layers[:upto]:
            x = layer(x, mask)
        return x


class VisionEmbeddings(nn.Module):
    def __init__(self, config: TowerConfig) -> None:
        super().__init__()
        self.patch_size = config.patch_size
        self.class_embedding = nn.Parameter(torch.zeros(config.hidden_size))
        self.patch_embedding = nn.Conv2d(
            config.num_channels,
            config.hidden_size,
            config.patch_size,
            config.patch_size,
            bias=False,
        )
        positions = (config.image_size // config.patch_size) ** 2 + 1
        self.position_embedding = nn.Embedding(positions, config.hidden_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))
        patches = patches.flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(patches.dtype).expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


class VisionTower(nn.Module):
    """ViT: patches + class token, pre-norm, encoder; the class token's output, post-normed,
    is the image's pooled feature."""

    def __init__(self, config: TowerConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = VisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)  # HF name
        self.encoder = Encoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def check_pixels(self, pixels: torch.Tensor) -> None:
        size, channels = self.config.image_size, self.config.num_channels
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (channels, size, size):
            raise ValueError(
                f"images must be a [batch, {channels}, {size}, {size}] tensor, "
                f"not {list(pixels.shape)}"
            )

    def hidden_states(self, pixels: torch.Tensor, layer: int = -1) -> torch.Tensor:
        """Every token's output of encoder layer ``layer`` (negative: from the end; -1 the
        last), before the post-norm: [batch, 1 + patches, hidden]."""
        self.check_pixels(pixels)
        count = len(self.encoder.layers)
        upto = layer + 1 + count if layer < 0 else layer
        if not 0 <= upto <= count:
            raise ValueError(f"the vision tower has {count} layers, no layer {layer}")
        x = self.pre_layrnorm(self.embeddings(pixels))
        return self.encoder(x, None, upto)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.post_layernorm(self.hidden_states(pixels)[:, 0])


class TextEmbeddings(nn.Module):
    def __init__(self, config: TowerConfig) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)


class TextTower(nn.Module):
    """Causal transformer over token ids; the end-of-text token's output is the pooled feature."""

    def __init__(self, config: TowerConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = TextEmbeddings(config)
        self.encoder = Encoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(
        self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        if ids.dim() != 2 or ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(
                f"token ids must be [batch, <= {self.config.max_position_embeddings}], "
                f"not {list(ids.shape)}"
            )
        length = ids.shape[1]
        embeddings = self.embeddings
        x = embeddings.token_embedding(ids) + embeddings.position_embedding.weight[:length]
        mask = torch.full((length, length), float("-inf"), dtype=x.dtype).triu(1)
        mask = mask.expand(ids.shape[0], 1, length, length)
        if attention_mask is not None:  # padding keys are never attended
            padding = (attention_mask[:, None, None, :] == 0).to(x.device)
            mask = mask.masked_fill(padding, float("-inf"))
        x = self.final_layer_norm(self.encoder(x, mask.to(x.device)))
        return x[torch.arange(ids.shape[0]), self.eot_positions(ids)]

    def eot_positions(self, ids: torch.Tensor) -> torch.Tensor:
        """Where each sequence's end-of-text token is: the first ``eos_token_id``; HF's legacy
        configs (eos_token_id 2) and OpenCLIP take the highest id, as OpenAI's code did."""
        eos = self.config.eos_token_id
        if eos == 2 or self.config.pool_argmax:
            return ids.argmax(dim=-1)
        return (ids == eos).int().argmax(dim=-1)


class ClipModel(nn.Module):
    """Both towers, their projections into the shared space and the learnable temperature."""

    def __init__(self, config: ClipConfig) -> None:
        super().__init__()
        self.config = config
        self.vision_model = VisionTower(config.vision)
        self.text_model = TextTower(config.text)
        self.visual_projection = nn.Linear(config.vision.hidden_size, config.projection_dim, False)
        self.text_projection = nn.Linear(config.text.hidden_size, config.projection_dim, False)
        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init_value))

    def encode_image(self, pixels: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Image embeddings [batch, projection_dim] of preprocessed pixels."""
        out = self.visual_projection(self.vision_model(pixels))
        return F.normalize(out, dim=-1) if normalize else out

    def encode_text(
        self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None, normalize: bool = False
    ) -> torch.Tensor:
        """Text embeddings [batch, projection_dim] of token ids (each with its end token)."""
        out = self.text_projection(self.text_model(ids, attention_mask))
        return F.normalize(out, dim=-1) if normalize else out

    def forward(
        self,
        pixels: torch.Tensor,
        ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits_per_image [images, texts], logits_per_text [texts, images])."""
        images = self.encode_image(pixels, normalize=True)
        texts = self.encode_text(ids, attention_mask, normalize=True)
        logits = self.logit_scale.exp() * images @ texts.t()
        return logits, logits.t()


def from_open_clip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An OpenCLIP ``CLIP`` state dict (ViT image tower, default text tower) under HF names."""
    out: dict[str, torch.Tensor] = {}
    direct = {
        "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
        "visual.class_embedding": "vision_model.embeddings.class_embedding",
        "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
        "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
        "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
        "visual.ln_post.weight": "vision_model.post_layernorm.weight",
        "visual.ln_post.bias": "vision_model.post_layernorm.bias",
        "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
        "positional_embedding": "text_model.embeddings.position_embedding.weight",
        "ln_final.weight": "text_model.final_layer_norm.weight",
        "ln_final.bias": "text_model.final_layer_norm.bias",
        "logit_scale": "logit_scale",
    }
    block = {
        "ln_1": "layer_norm1",
        "ln_2": "layer_norm2",
        "attn.out_proj": "self_attn.out_proj",
        "mlp.c_fc": "mlp.fc1",
        "mlp.c_proj": "mlp.fc2",
    }
    for name, tensor in state.items():
        if name in direct:
            out[direct[name]] = tensor
        elif name == "visual.proj":  # [width, dim]: x @ proj
            out["visual_projection.weight"] = tensor.t().contiguous()
        elif name == "text_projection":
            out["text_projection.weight"] = tensor.t().contiguous()
        elif ".resblocks." in name:
            head, rest = name.split(".resblocks.", 1)
            index, part = rest.split(".", 1)
            tower = "vision_model" if head.startswith("visual") else "text_model"
            prefix = f"{tower}.encoder.layers.{index}."
            if part.startswith("attn.in_proj_"):
                kind = part.rsplit("_", 1)[1]  # weight or bias
                for proj, chunk in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0)):
                    out[f"{prefix}self_attn.{proj}.{kind}"] = chunk.contiguous()
                continue
            stem, kind = part.rsplit(".", 1)
            if stem not in block:
                raise ValueError(f"OpenCLIP tensor {name} has no place in the model")
            out[f"{prefix}{block[stem]}.{kind}"] = tensor
        elif name in ("attn_mask", "visual.attn_mask") or name.endswith("num_batches_tracked"):
            continue  # buffers computed from the shape
        else:
            raise ValueError(f"OpenCLIP tensor {name} has no place in the model")
    return out

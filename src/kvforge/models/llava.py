"""LLaVA's vision side: a CLIP vision tower and an MLP projector that turn an image into
embeddings in the language model's hidden space, one per image token.

The language model is one of our decoders (``DecoderLM``); the prompt holds
``tokens_per_image`` placeholder tokens where each image goes, and the runner puts the image's
embeddings there instead of the placeholders' token embeddings (``ForwardBatch.mm_embeds``).
Hugging Face ``LlavaForConditionalGeneration`` checkpoints load here (``from_hf``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kvforge.models.clip import _ACTIVATIONS, CLIP_MEAN, CLIP_STD, TowerConfig, VisionTower


@dataclass
class VisionAdapterConfig:
    tower: TowerConfig
    text_hidden_size: int
    projector_act: str = "gelu"
    feature_layer: int = -2  # the tower layer whose output is projected (negative: from the end)
    keep_class_token: bool = False  # HF's select strategy "full" (default drops it)
    projector_bias: bool = True
    image_token_id: int = -1  # the placeholder token of the prompt (HF image_token_index)
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD

    @property
    def tokens_per_image(self) -> int:
        patches = (self.tower.image_size // self.tower.patch_size) ** 2
        return patches + (1 if self.keep_class_token else 0)

    @classmethod
    def from_hf(cls, config: dict[str, Any], text_hidden_size: int) -> VisionAdapterConfig:
        """From a ``LlavaForConditionalGeneration`` config.json."""
        vision = dict(config.get("vision_config") or {})
        vision.setdefault("hidden_act", "quick_gelu")
        layer = config.get("vision_feature_layer", -2)
        if not isinstance(layer, int) or isinstance(layer, bool):
            raise ValueError(f"vision_feature_layer must be one integer, not {layer!r}")
        strategy = config.get("vision_feature_select_strategy", "default")
        if strategy not in ("default", "full"):
            raise ValueError(f"vision_feature_select_strategy {strategy!r} is not default or full")
        act = config.get("projector_hidden_act", "gelu")
        if act not in _ACTIVATIONS:
            raise ValueError(f"projector_hidden_act {act!r} is not one of {sorted(_ACTIVATIONS)}")
        return cls(
            TowerConfig.from_dict(vision),
            text_hidden_size,
            act,
            layer,
            strategy == "full",
            bool(config.get("multimodal_projector_bias", True)),
            int(config.get("image_token_index", config.get("image_token_id", -1))),
        )


class Projector(nn.Module):
    """Two linear layers with an activation between (LLaVA-1.5's ``mlp2x_gelu``)."""

    def __init__(self, config: VisionAdapterConfig) -> None:
        super().__init__()
        width = config.tower.hidden_size
        self.linear_1 = nn.Linear(width, config.text_hidden_size, bias=config.projector_bias)
        self.linear_2 = nn.Linear(
            config.text_hidden_size, config.text_hidden_size, bias=config.projector_bias
        )
        self.act = _ACTIVATIONS[config.projector_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class VisionAdapter(nn.Module):
    """Images -> [images, tokens_per_image, text hidden] embeddings for the decoder."""

    def __init__(self, config: VisionAdapterConfig) -> None:
        super().__init__()
        self.config = config
        self.vision_tower = VisionTower(config.tower)
        self.multi_modal_projector = Projector(config)

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """The tower's output the projector reads: [images, tokens_per_image, tower width]."""
        hidden = self.vision_tower.hidden_states(pixels, self.config.feature_layer)
        return hidden if self.config.keep_class_token else hidden[:, 1:]

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.multi_modal_projector(self.features(pixels))

    def load_hf_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """``vision_tower.*`` (with or without ``vision_model.``) and
        ``multi_modal_projector.*`` tensors of an HF checkpoint (``model.`` prefixes too)."""
        state = {}
        for name, tensor in weights.items():
            name = name.removeprefix("model.")
            if name.startswith("vision_tower."):
                name = "vision_tower." + name.removeprefix("vision_tower.").removeprefix(
                    "vision_model."
                )
            state[name] = tensor
        own = self.state_dict()
        unused = [n for n in state if n not in own]
        needed = [n for n in own if n not in state]
        if needed:
            raise ValueError(f"the vision tower misses tensors: {', '.join(needed[:5])}")
        for name in unused:
            if not name.startswith("vision_tower."):
                raise ValueError(f"unexpected vision tensor {name}")
        for name, tensor in own.items():
            if state[name].shape != tensor.shape:
                raise ValueError(
                    f"{name}: shape {list(state[name].shape)}, expected {list(tensor.shape)}"
                )
        self.load_state_dict({n: state[n] for n in own})

"""llama.cpp's ``mmproj`` GGUF files: a CLIP vision tower plus a LLaVA MLP projector
(``clip.projector_type`` "mlp"), read into a :class:`VisionAdapter` and written from one.

The file holds the tower's layers up to the one the projector reads (llama.cpp's converter
keeps ``max(clip.vision.feature_layer)`` blocks, or all but the last; llama.cpp runs all the
layers it finds and projects the patch tokens), so an adapter reading layer -2 of a 24-layer
tower is written with 23 blocks and read back with feature layer -1. ``v.post_ln`` is
optional (the projector never reads it). The two MLP tensors of a block are told apart by
their shapes, as llama.cpp's legacy converter names fc1 ``ffn_down`` and fc2 ``ffn_up``.
``clip.vision.projection_dim`` is CLIP's own projection (unused here).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvforge.errors import ModelFileError
from kvforge.loader.gguf_check import open_gguf
from kvforge.loader.gguf_loader import dequantize_tensor, read_metadata
from kvforge.models.clip import CLIP_MEAN, CLIP_STD, TowerConfig
from kvforge.models.llava import VisionAdapter, VisionAdapterConfig

_ATTN = {"attn_q": "q_proj", "attn_k": "k_proj", "attn_v": "v_proj", "attn_out": "out_proj"}
_NORMS = {"ln1": "layer_norm1", "ln2": "layer_norm2"}
# our parameter name -> GGUF name (outside the blocks)
_GLOBAL = {
    "vision_tower.embeddings.class_embedding": "v.class_embd",
    "vision_tower.embeddings.patch_embedding.weight": "v.patch_embd.weight",
    "vision_tower.embeddings.position_embedding.weight": "v.position_embd.weight",
    "vision_tower.pre_layrnorm.weight": "v.pre_ln.weight",
    "vision_tower.pre_layrnorm.bias": "v.pre_ln.bias",
    "vision_tower.post_layernorm.weight": "v.post_ln.weight",
    "vision_tower.post_layernorm.bias": "v.post_ln.bias",
    "multi_modal_projector.linear_1.weight": "mm.0.weight",
    "multi_modal_projector.linear_1.bias": "mm.0.bias",
    "multi_modal_projector.linear_2.weight": "mm.2.weight",
    "multi_modal_projector.linear_2.bias": "mm.2.bias",
}
IMAGE_TOKEN_KEY = "kvforge.image_token_id"  # ours: the placeholder token of the prompt


def read_mmproj(path: str | Path, text_hidden_size: int, image_token_id: int) -> VisionAdapter:
    """The vision adapter of an mmproj file for a language model of ``text_hidden_size``
    (``image_token_id``: the placeholder, unless the file names one)."""
    reader = open_gguf(path)
    meta = read_metadata(reader)
    try:
        kind = meta.get("clip.projector_type", "mlp")
        if kind != "mlp" or not meta.get("clip.has_vision_encoder", True):
            raise ValueError(f"projector type {kind!r} is not supported (only LLaVA's mlp)")
        tensors = {t.name: t for t in reader.tensors}
        if "mm.2.weight" not in tensors:
            raise ValueError("no projector tensors (mm.0, mm.2): not a LLaVA mmproj file")
        made = int(dequantize_tensor(tensors["mm.2.weight"]).shape[0])
        if made != text_hidden_size:  # (clip.vision.projection_dim is CLIP's own, not this)
            raise ValueError(
                f"the projector makes {made}-wide embeddings; the language model's hidden "
                f"size is {text_hidden_size}"
            )
        layers = meta.get("clip.vision.feature_layer")
        if layers is not None and len(list(layers)) > 1:
            raise ValueError(
                "projectors reading several tower layers (LLaVA-NeXT) are not supported"
            )
        width = int(meta["clip.vision.embedding_length"])
        tower = TowerConfig.from_dict(
            {
                "hidden_size": width,
                "intermediate_size": int(meta["clip.vision.feed_forward_length"]),
                "num_hidden_layers": int(meta["clip.vision.block_count"]),
                "num_attention_heads": int(meta["clip.vision.attention.head_count"]),
                "layer_norm_eps": float(meta.get("clip.vision.attention.layer_norm_epsilon", 1e-5)),
                "image_size": int(meta["clip.vision.image_size"]),
                "patch_size": int(meta["clip.vision.patch_size"]),
                "hidden_act": "gelu" if meta.get("clip.use_gelu", False) else "quick_gelu",
            }
        )
        config = VisionAdapterConfig(
            tower,
            text_hidden_size,
            "gelu",
            -1,
            False,
            True,
            int(meta.get(IMAGE_TOKEN_KEY, image_token_id)),
            tuple(float(v) for v in meta.get("clip.vision.image_mean", CLIP_MEAN)),
            tuple(float(v) for v in meta.get("clip.vision.image_std", CLIP_STD)),
        )
        adapter = VisionAdapter(config)
        state = {}
        for name, param in adapter.state_dict().items():
            value = _read(tensors, _gguf_name(name, tensors), param.shape)
            if value is None and "post_layernorm" in name:  # optional: identity
                value = (
                    torch.ones_like(param) if name.endswith("weight") else torch.zeros_like(param)
                )
            if value is None:
                raise ValueError(f"tensor {_gguf_name(name, tensors)} is missing")
            state[name] = value
        adapter.load_state_dict(state)
    except KeyError as exc:
        raise ModelFileError(path, f"metadata key {exc} is missing") from exc
    except (TypeError, ValueError) as exc:
        raise ModelFileError(path, str(exc)) from exc
    return adapter.eval()


def _gguf_name(name: str, tensors: dict[str, Any]) -> str:
    if name in _GLOBAL:
        return _GLOBAL[name]
    _, rest = name.split("encoder.layers.", 1)
    index, part = rest.split(".", 1)
    module, kind = part.rsplit(".", 1)
    prefix = f"v.blk.{index}."
    if module.startswith("self_attn."):
        return (
            prefix
            + {v: k for k, v in _ATTN.items()}[module.removeprefix("self_attn.")]
            + "."
            + kind
        )
    if module in _NORMS.values():
        return prefix + {v: k for k, v in _NORMS.items()}[module] + "." + kind
    # mlp.fc1 / mlp.fc2: "ffn_up" / "ffn_down" now, swapped by older converters; by shape
    return prefix + ("ffn_up" if module == "mlp.fc1" else "ffn_down") + "." + kind


def _read(tensors: dict[str, Any], name: str, shape: torch.Size) -> torch.Tensor | None:
    tensor = tensors.get(name)
    if tensor is None:
        return None
    value = dequantize_tensor(tensor).float()
    if tuple(value.shape) == tuple(shape):
        return value
    if ".ffn_" in name:  # an older file: fc1 and fc2 named the other way round
        other = tensors.get(
            name.replace("ffn_up", "#").replace("ffn_down", "ffn_up").replace("#", "ffn_down")
        )
        if other is not None:
            swapped = dequantize_tensor(other).float()
            if tuple(swapped.shape) == tuple(shape):
                return swapped
    elif value.numel() == int(np.prod(shape)):  # e.g. a class embedding stored as [1, E]
        return value.reshape(shape)
    raise ValueError(f"tensor {name} has shape {list(value.shape)}, expected {list(shape)}")


def write_mmproj(
    adapter: VisionAdapter, path: str | Path, image_token_id: int | None = None
) -> None:
    """An mmproj GGUF file (float32) of ``adapter``: the tower's layers up to the one its
    projector reads, then the projector, with llama.cpp's keys."""
    from gguf import GGUFWriter

    config = adapter.config
    layers = len(adapter.vision_tower.encoder.layers)
    kept = config.feature_layer + 1 + layers if config.feature_layer < 0 else config.feature_layer
    if config.keep_class_token:
        raise ValueError("llama.cpp's mlp projector drops the class token (select strategy full)")
    if config.projector_act != "gelu":
        raise ValueError("llama.cpp's mlp projector uses gelu")
    writer = GGUFWriter(str(path), arch="clip")
    tower = config.tower
    writer.add_bool("clip.has_vision_encoder", True)
    writer.add_bool("clip.has_llava_projector", True)
    writer.add_string("clip.projector_type", "mlp")
    writer.add_uint32("clip.vision.image_size", tower.image_size)
    writer.add_uint32("clip.vision.patch_size", tower.patch_size)
    writer.add_uint32("clip.vision.embedding_length", tower.hidden_size)
    writer.add_uint32("clip.vision.feed_forward_length", tower.intermediate_size)
    writer.add_uint32("clip.vision.projection_dim", config.text_hidden_size)
    writer.add_uint32("clip.vision.block_count", kept)
    writer.add_uint32("clip.vision.attention.head_count", tower.num_attention_heads)
    writer.add_float32("clip.vision.attention.layer_norm_epsilon", tower.layer_norm_eps)
    writer.add_array("clip.vision.image_mean", list(config.image_mean))
    writer.add_array("clip.vision.image_std", list(config.image_std))
    writer.add_bool("clip.use_gelu", tower.hidden_act != "quick_gelu")
    if image_token_id is not None:
        writer.add_uint32(IMAGE_TOKEN_KEY, image_token_id)
    for name, value in adapter.state_dict().items():
        if (
            "encoder.layers." in name
            and int(name.split("encoder.layers.")[1].split(".")[0]) >= kept
        ):
            continue
        if "post_layernorm" in name:
            continue
        writer.add_tensor(_gguf_name(name, {}), value.detach().float().contiguous().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

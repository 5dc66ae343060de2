"""Pick the format, read the config, build the model on the meta device, stream in weights."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from kvforge.config import ModelConfig, TransformerConfig
from kvforge.errors import (
    InvalidRequestError,
    KVForgeError,
    ModelFileError,
    ModelNotFoundError,
)
from kvforge.layers.attention import (
    BaseAttentionBackend,
    create_attention_backend,
    resolve_attention_backend,
)
from kvforge.layers.linear import Linear, VocabEmbedding
from kvforge.layers.moe import expert_param
from kvforge.layers.quantization import QuantGemmMethod
from kvforge.loader.gguf_check import open_gguf
from kvforge.loader.gguf_loader import iter_gguf_weights, read_metadata
from kvforge.loader.hf_loader import iter_hf_weights, read_hf_config, safetensors_files
from kvforge.loader.mmproj import read_mmproj
from kvforge.loader.quantized import iter_quantized_weights, parse_quantization_config
from kvforge.models.clip import CLIP_MEAN, CLIP_STD
from kvforge.models.common import DecoderLM
from kvforge.models.llava import VisionAdapter, VisionAdapterConfig
from kvforge.models.registry import ModelFamily, family_for_gguf, family_for_hf
from kvforge.parallel.group import ModelShard
from kvforge.quant.formats import Unpacked
from kvforge.quant.rtn import quantize_rtn
from kvforge.tokenizer import Tokenizer, tokenizer_from_gguf
from kvforge.utils import format_size

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    """A ready model with its tokenizer and architecture config."""

    model: DecoderLM
    tokenizer: Tokenizer
    config: TransformerConfig
    dtype: torch.dtype
    weight_bytes: int = 0  # resident bytes of all parameters and packed weights
    is_packed: bool = False  # some weights are kept quantized
    vision: VisionAdapter | None = None  # a vision chat model's image encoder and projector

    @property
    def kv_dtype(self) -> torch.dtype:
        """The 16/32-bit KV dtype of ``--kv-cache-dtype auto``: the activation dtype, except
        bfloat16 under float32 activations with packed weights (the weights are approximate
        already; a bf16 cache halves KV memory at no measurable cost in agreement)."""
        if self.is_packed and self.dtype == torch.float32:
            return torch.bfloat16
        return self.dtype


Weights = Iterator[tuple[str, torch.Tensor | Unpacked]]
# Like BitsAndBytes in vLLM, the LM head (whose logits feed sampling) stays in float.
_LINEAR_SUFFIXES = ("_proj.weight",)


def _progress(items: Weights, total: int, show: bool) -> Weights:
    yield from tqdm(items, total=total, desc="Loading weights", unit="tensor", disable=not show)


def _quantize_on_load(weights: Weights, model_config: ModelConfig) -> Weights:
    """Round-to-nearest int8/int4 of every linear layer's float weight as it streams in."""
    assert model_config.quantization is not None
    for name, value in weights:
        if name.endswith(_LINEAR_SUFFIXES) or expert_param(name):
            if isinstance(value, Unpacked):
                raise InvalidRequestError(
                    "--quantization applies to float checkpoints; this one is already quantized",
                    "quantization",
                )
            value = quantize_rtn(
                value,
                model_config.quantization,
                model_config.quantization_group_size,
                model_config.quantization_symmetric,
            )
        yield name, value


def _gguf_model(
    path: Path, meta: dict[str, Any]
) -> tuple[ModelFamily, TransformerConfig, Tokenizer]:
    """Family, config and tokenizer from GGUF metadata; missing or mistyped keys are a
    :class:`ModelFileError`, not a KeyError traceback."""
    try:
        family = family_for_gguf(meta["general.architecture"])
        return family, family.config_from_gguf(meta), tokenizer_from_gguf(meta)
    except KVForgeError:
        raise
    except KeyError as exc:
        raise ModelFileError(path, f"metadata key {exc} is missing") from exc
    except (TypeError, ValueError, IndexError) as exc:
        raise ModelFileError(path, f"invalid metadata: {exc}") from exc


_MAX_EXPERTS = 4096  # DeepSeek-V3 has 256 routed experts a layer


def read_model_config(model_config: ModelConfig) -> TransformerConfig:
    """The architecture config of the model file, without loading weights or tokenizer."""
    model_config.check()
    path = Path(model_config.model_path)
    if path.is_file() and path.suffix == ".gguf":
        meta = read_metadata(open_gguf(path))
        try:
            return family_for_gguf(meta["general.architecture"]).config_from_gguf(meta)
        except KeyError as exc:
            raise ModelFileError(path, f"metadata key {exc} is missing") from exc
    if path.is_dir():
        hf = read_hf_config(path)
        if (hf.get("architectures") or [""])[0] in _VISION_CHAT:
            hf = _text_config(hf, path)
        family = family_for_hf((hf.get("architectures") or ["LlamaForCausalLM"])[0])
        return family.config_from_hf(hf)
    raise ModelNotFoundError(f"{path} is neither a .gguf file nor a model directory")


def check_experts(cfg: TransformerConfig, path: Path) -> None:
    """A mixture-of-experts config that routes each token to 1..X experts of a known scoring."""
    counts = (cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size)
    if not all(isinstance(n, int) and not isinstance(n, bool) for n in counts):
        raise ModelFileError(path, f"expert counts and sizes must be integers, got {counts}")
    if not cfg.num_experts:
        return
    if not 1 <= cfg.num_experts <= _MAX_EXPERTS:
        raise ModelFileError(path, f"{cfg.num_experts} experts (at most {_MAX_EXPERTS})")
    if not 1 <= cfg.num_experts_per_tok <= cfg.num_experts:
        raise ModelFileError(
            path,
            f"routes {cfg.num_experts_per_tok} experts per token of {cfg.num_experts} "
            "(need 1 <= experts per token <= experts)",
        )
    if cfg.router_scoring not in ("softmax", "sigmoid"):
        raise ModelFileError(path, f"unknown router scoring {cfg.router_scoring!r}")
    if not isinstance(cfg.norm_topk_prob, bool):  # a string "false" would read as true
        raise ModelFileError(
            path,
            f"norm_topk_prob / expert_weights_norm must be a boolean, got {cfg.norm_topk_prob!r}",
        )
    if len(cfg.moe_layers) not in (0, cfg.num_layers):
        raise ModelFileError(path, "per-layer expert flags do not match the layer count")


def resolve_dtype(model_config: ModelConfig) -> torch.dtype:
    """Activation dtype: ``auto`` is float32 (packed weights still run bf16 kernels)."""
    return _DTYPES.get(model_config.dtype, torch.float32)


def keeps_packed(model_config: ModelConfig) -> bool:
    """Quantized weights stay packed unless float32 was asked for (the dequantized reference)."""
    return model_config.dtype != "float32" or model_config.quantization is not None


def _module_bytes(model: torch.nn.Module) -> int:
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def load_model(
    model_config: ModelConfig,
    backend: BaseAttentionBackend | None = None,
    show_progress: bool = True,
    shard: ModelShard | None = None,
) -> LoadedModel:
    """Load a GGUF file or a Hugging Face directory. Without ``backend``, the one
    ``model_config.attention_backend`` names is created once the files check out (so a bad
    file is reported before any extension is built or logged)."""
    model_config.check()
    path = Path(model_config.model_path)
    start = time.perf_counter()
    if path.is_file() and path.suffix == ".gguf":
        reader = open_gguf(path)
        family, cfg, tokenizer = _gguf_model(path, read_metadata(reader))
        weights: Weights = iter_gguf_weights(
            reader,
            family,
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.sandwich_norm,
            packed=keeps_packed(model_config),
        )
        num_tensors = len(reader.tensors)
    elif path.is_dir():
        hf = read_hf_config(path)
        architecture = (hf.get("architectures") or ["LlamaForCausalLM"])[0]
        vision_weights: dict[str, torch.Tensor] = {}
        vision_hf: dict[str, Any] = {}
        if architecture in _VISION_CHAT:
            hf, vision_hf = _text_config(hf, path), hf
            architecture = hf["architectures"][0]
        scheme = parse_quantization_config(hf, path)
        family = family_for_hf(architecture)
        cfg = family.config_from_hf(hf)
        tokenizer = Tokenizer.from_hf_dir(model_config.tokenizer or path)
        if scheme is None:
            hf_weights: Weights = iter_hf_weights(path, family)
        else:
            logger.info("%s: %s checkpoint", path.name, scheme.describe())
            hf_weights = iter_quantized_weights(path, scheme, family.fix_hf_tensor)
            if not keeps_packed(model_config):  # --dtype float32: the dequantized reference
                hf_weights = _dequantized(hf_weights)
        weights = _split_vision(hf_weights, vision_weights)
        num_tensors = sum(1 for _ in safetensors_files(path))
    else:
        raise ModelNotFoundError(f"{path} is neither a .gguf file nor a model directory")
    check_experts(cfg, path)
    if model_config.quantization is not None:
        weights = _quantize_on_load(weights, model_config)
    if model_config.chat_template is not None:
        tokenizer.chat_template = model_config.chat_template
    device = torch.device(model_config.device)
    if backend is None:
        backend = create_attention_backend(
            resolve_attention_backend(model_config.attention_backend, device)
        )
    with torch.device("meta"):
        if shard is None:
            model = DecoderLM(cfg, backend)
        else:
            layers = shard.layers
            model = DecoderLM(cfg, backend, shard.tp, shard.experts, layers)
    model = model.to_empty(device=device)
    for module in model.modules():
        if isinstance(module, (Linear, VocabEmbedding)):
            module.quantize_activations = model_config.quantize_activations
    try:
        model.load_weights(_progress(weights, num_tensors, show_progress))
    except KVForgeError:
        raise
    except ValueError as exc:  # tensors missing, unexpected or of the wrong shape
        raise ModelFileError(path, str(exc)) from exc
    vision = None
    if path.is_dir() and vision_weights:
        vision = _vision_adapter(path, vision_hf, cfg, vision_weights, device)
    if model_config.mmproj is not None:
        if vision is not None:
            raise ModelFileError(path, "the model has its own vision tower; drop --mmproj")
        # the placeholder: the file's own choice, else the last id of the vocabulary (in
        # practice a reserved token no text produces)
        vision = read_mmproj(model_config.mmproj, cfg.hidden_size, cfg.vocab_size - 1).to(device)
    dtype = resolve_dtype(model_config)
    if dtype != torch.float32:  # float32 keeps the packed weights' bf16 scales as they are
        _convert_floats(model, dtype)
    model = model.eval()
    weight_bytes = _module_bytes(model)
    is_packed = any(getattr(m, "quant", None) is not None for m in model.modules())
    logger.info(
        "loaded %s (%s, %d layers, %s activations, %s weights) in %.1fs: "
        "resident weights %s (file %s)",
        path.name,
        cfg.architecture,
        cfg.num_layers,
        str(dtype).removeprefix("torch."),
        "packed" if is_packed else "float",
        time.perf_counter() - start,
        format_size(weight_bytes),
        format_size(_checkpoint_bytes(path)),
    )
    return LoadedModel(model, tokenizer, cfg, dtype, weight_bytes, is_packed, vision)


# vision chat architectures: a language model plus a vision tower and projector
_VISION_CHAT = ("LlavaForConditionalGeneration",)
_TEXT_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


def _text_config(hf: dict[str, Any], path: Path) -> dict[str, Any]:
    """The language model's config of a vision chat checkpoint, with its architecture."""
    text = dict(hf.get("text_config") or {})
    if not text:
        raise ModelFileError(path / "config.json", "a vision chat config needs a text_config")
    if not text.get("architectures"):
        model_type = text.get("model_type", "llama")
        if model_type not in _TEXT_ARCHITECTURES:
            raise ModelFileError(
                path / "config.json", f"text_config model_type {model_type!r} is not supported"
            )
        text["architectures"] = [_TEXT_ARCHITECTURES[model_type]]
    text.setdefault("tie_word_embeddings", hf.get("tie_word_embeddings", False))
    return text


def _dequantized(weights: Weights) -> Weights:
    for name, value in weights:
        yield name, value.dequantize() if isinstance(value, Unpacked) else value


def _split_vision(weights: Weights, vision: dict[str, torch.Tensor]) -> Weights:
    """The language model's tensors; the vision tower's and projector's go into ``vision``."""
    for name, tensor in weights:
        if "vision_tower." in name or "multi_modal_projector." in name:
            assert isinstance(tensor, torch.Tensor)
            vision[name] = tensor
        else:
            yield name, tensor


def _vision_adapter(
    path: Path,
    hf: dict[str, Any],
    cfg: TransformerConfig,
    weights: dict[str, torch.Tensor],
    device: torch.device,
) -> VisionAdapter:
    try:
        config = VisionAdapterConfig.from_hf(hf, cfg.hidden_size)
        processor = path / "preprocessor_config.json"
        if processor.exists():
            values = json.loads(processor.read_text())
            config.image_mean = tuple(float(v) for v in values.get("image_mean", CLIP_MEAN))
            config.image_std = tuple(float(v) for v in values.get("image_std", CLIP_STD))
        if not 0 <= config.image_token_id < cfg.vocab_size:
            raise ValueError(f"image_token_index {config.image_token_id} is not a token id")
        adapter = VisionAdapter(config)
        adapter.load_hf_weights(weights)
    except (TypeError, ValueError) as exc:
        raise ModelFileError(path, str(exc)) from exc
    return adapter.to(device).eval()


def _convert_floats(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Parameters and buffers to ``dtype``, except ``quant_gemm``'s scales and mins, which its
    kernel reads as float16 or float32 whatever the activations."""
    for module in model.modules():
        if isinstance(module, QuantGemmMethod):
            continue
        for param in module.parameters(recurse=False):
            if param.is_floating_point():
                param.data = param.data.to(dtype)
        for name, buffer in module.named_buffers(recurse=False):
            if buffer.is_floating_point():
                module._buffers[name] = buffer.to(dtype)


def _checkpoint_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in safetensors_files(path))

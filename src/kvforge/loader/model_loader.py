"""Pick the format, read the config, build the model on the meta device, stream in weights."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from gguf import GGUFReader
from tqdm import tqdm

from kvforge.config import ModelConfig, TransformerConfig
from kvforge.errors import ModelNotFoundError
from kvforge.layers.attention import BaseAttentionBackend
from kvforge.loader.gguf_loader import iter_gguf_weights, read_metadata
from kvforge.loader.hf_loader import iter_hf_weights, read_hf_config, safetensors_files
from kvforge.models.common import DecoderLM
from kvforge.models.registry import family_for_gguf, family_for_hf
from kvforge.tokenizer import Tokenizer, tokenizer_from_gguf

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    """A ready model with its tokenizer and architecture config."""

    model: DecoderLM
    tokenizer: Tokenizer
    config: TransformerConfig
    dtype: torch.dtype


def _progress(
    items: Iterable[tuple[str, torch.Tensor]], total: int, show: bool
) -> Iterator[tuple[str, torch.Tensor]]:
    yield from tqdm(items, total=total, desc="Loading weights", unit="tensor", disable=not show)


def load_model(
    model_config: ModelConfig, backend: BaseAttentionBackend, show_progress: bool = True
) -> LoadedModel:
    """Load a GGUF file or a Hugging Face directory."""
    model_config.check()
    path = Path(model_config.model_path)
    start = time.perf_counter()
    if path.is_file() and path.suffix == ".gguf":
        reader = GGUFReader(str(path))
        meta = read_metadata(reader)
        family = family_for_gguf(meta["general.architecture"])
        cfg = family.config_from_gguf(meta)
        tokenizer = tokenizer_from_gguf(meta)
        weights = iter_gguf_weights(
            reader, family, cfg.num_heads, cfg.num_kv_heads, cfg.sandwich_norm
        )
        num_tensors = len(reader.tensors)
    elif path.is_dir():
        hf = read_hf_config(path)
        family = family_for_hf((hf.get("architectures") or ["LlamaForCausalLM"])[0])
        cfg = family.config_from_hf(hf)
        tokenizer = Tokenizer.from_hf_dir(model_config.tokenizer or path)
        weights = iter_hf_weights(path, family)
        num_tensors = sum(1 for _ in safetensors_files(path))
    else:
        raise ModelNotFoundError(f"{path} is neither a .gguf file nor a model directory")
    if model_config.chat_template is not None:
        tokenizer.chat_template = model_config.chat_template
    device = torch.device(model_config.device)
    with torch.device("meta"):
        model = DecoderLM(cfg, backend)
    model = model.to_empty(device=device)
    model.load_weights(_progress(weights, num_tensors, show_progress))
    dtype = _DTYPES.get(model_config.dtype, torch.float32)
    model = model.to(dtype).eval()
    logger.info(
        "loaded %s (%s, %d layers, %.0fM parameters, %s) in %.1fs",
        path.name,
        cfg.architecture,
        cfg.num_layers,
        sum(p.numel() for p in model.parameters()) / 1e6,
        dtype,
        time.perf_counter() - start,
    )
    return LoadedModel(model, tokenizer, cfg, dtype)

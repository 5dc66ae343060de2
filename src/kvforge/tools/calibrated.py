"""``kvforge quantize --method gptq | awq | rtn``: a float Llama-family model (a Hugging Face
directory, or a GGUF file dequantized to float32) to a quantized Hugging Face directory that
kvforge, vLLM and transformers load by its ``quantization_config``.

One pass of the float model over calibration text records, per linear layer, ``H = X^T X``
(GPTQ) and a sample of input rows (AWQ); then every layer is quantized (see
:mod:`kvforge.quant.gptq`). GPTQ and round-to-nearest write GPTQ's checkpoint layout
(``qweight`` / ``qzeros`` / ``scales`` / ``g_idx``), AWQ writes AutoAWQ's GEMM layout with its
scales folded into the RMSNorm weights and the up projections. Activations come from the float
model throughout (not from the already-quantized layers before each one, as GPTQ's reference
implementation does): one forward pass instead of one per layer.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from kvforge.config import TransformerConfig
from kvforge.errors import InvalidRequestError, UnsupportedModelError
from kvforge.quant.gptq import Grid, GroupCodes, awq_scales, gptq, quantize_rtn_grid
from kvforge.tools.perplexity import make_runner, score_with_input_hooks, text_chunks
from kvforge.utils import check_output_path

logger = logging.getLogger(__name__)

METHODS = ("gptq", "awq", "rtn")
_AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_SAMPLE_ROWS = 128  # AWQ: input rows kept per module and chunk


@dataclass
class _Stats:
    """Calibration statistics of one linear layer's input."""

    hessian: torch.Tensor | None = None  # float64 [in, in]
    samples: list[torch.Tensor] = field(default_factory=list)


def collect_statistics(
    runner: Any, chunks: list[list[int]], hessians: bool, samples: bool, show: bool
) -> dict[str, _Stats]:
    """Per fused module name (``layers.3.mlp.down_proj``): the inputs' ``X^T X`` and/or a
    sample of input rows, over a teacher-forced pass of every chunk."""
    stats: dict[str, _Stats] = {}
    generator = torch.Generator().manual_seed(0)

    def record(name: str, x: torch.Tensor) -> None:
        entry = stats.setdefault(name, _Stats())
        if hessians:
            xtx = (x.T @ x).double()
            entry.hessian = xtx if entry.hessian is None else entry.hessian + xtx
        if samples:
            rows = torch.randperm(x.shape[0], generator=generator)[:_SAMPLE_ROWS]
            entry.samples.append(x[rows].clone())

    score_with_input_hooks(runner, chunks, record, "calibration", show)
    return stats


def _pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 words of ``32 / bits`` codes along dim 0 (code ``i`` at bits ``i * bits``)."""
    per = 32 // bits
    c = codes.to(torch.int64).reshape(codes.shape[0] // per, per, *codes.shape[1:])
    shifts = (torch.arange(per, dtype=torch.int64) * bits).reshape(1, per, *[1] * (c.dim() - 2))
    words = (c << shifts).sum(1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def gptq_tensors(
    prefix: str, codes: GroupCodes, bits: int, minus_one: bool = True
) -> dict[str, torch.Tensor]:
    """GPTQ's layout of one projection: codes packed along the input dimension, zero points
    along the output dimension (stored minus one in the original "gptq" format)."""
    zeros = codes.zeros - 1 if minus_one else codes.zeros  # [out, groups]
    return {
        f"{prefix}.qweight": _pack_rows(codes.codes.T.contiguous(), bits),
        f"{prefix}.qzeros": _pack_rows(zeros.contiguous(), bits).T.contiguous(),
        f"{prefix}.scales": codes.scales.T.contiguous().half(),
        f"{prefix}.g_idx": codes.g_idx.clone(),
    }


def awq_tensors(prefix: str, codes: GroupCodes) -> dict[str, torch.Tensor]:
    """AutoAWQ's GEMM layout: 4-bit codes packed along the output dimension, interleaved."""
    order = torch.tensor(_AWQ_ORDER)

    def pack(values: torch.Tensor) -> torch.Tensor:  # [rows, out] -> [rows, out / 8]
        rows = values.shape[0]
        interleaved = values.reshape(rows, -1, 8)[:, :, order].reshape(rows, -1)
        return _pack_rows(interleaved.T.contiguous(), 4).T.contiguous()

    return {
        f"{prefix}.qweight": pack(codes.codes.T),
        f"{prefix}.qzeros": pack(codes.zeros.T),
        f"{prefix}.scales": codes.scales.T.contiguous().half(),
    }


def _hf_config(cfg: TransformerConfig) -> dict[str, Any]:
    llama = cfg.architecture in ("llama", "LlamaForCausalLM") and cfg.sliding_window is None
    if not llama or cfg.num_experts or cfg.qk_norm or cfg.sandwich_norm or cfg.qkv_bias:
        raise UnsupportedModelError(
            f"calibrated quantization writes Llama checkpoints; this model is {cfg.architecture}"
        )
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "torch_dtype": "float32",
    }
    if cfg.rope_scaling:
        config["rope_scaling"] = cfg.rope_scaling
    return config


@dataclass
class _Group:
    """Projections that read one input, stacked: (fused module, HF names, row sizes)."""

    module: str
    names: list[str]
    sizes: list[int]


def _groups(layer: int, model: Any) -> list[_Group]:
    attn = model.layers[layer].self_attn
    mlp = model.layers[layer].mlp
    base = f"model.layers.{layer}"
    return [
        _Group(
            f"layers.{layer}.self_attn.qkv_proj",
            [f"{base}.self_attn.{p}_proj" for p in "qkv"],
            attn.qkv_proj.shard_sizes,
        ),
        _Group(
            f"layers.{layer}.self_attn.o_proj",
            [f"{base}.self_attn.o_proj"],
            [attn.o_proj.out_features],
        ),
        _Group(
            f"layers.{layer}.mlp.gate_up_proj",
            [f"{base}.mlp.gate_proj", f"{base}.mlp.up_proj"],
            mlp.gate_up_proj.shard_sizes,
        ),
        _Group(
            f"layers.{layer}.mlp.down_proj", [f"{base}.mlp.down_proj"], [mlp.down_proj.out_features]
        ),
    ]


def quantize_calibrated(
    src: str,
    dst: str | Path,
    method: str,
    text: str,
    bits: int = 4,
    group_size: int = 128,
    symmetric: bool | None = None,
    act_order: bool = False,
    damp: float = 0.01,
    ctx: int = 512,
    max_chunks: int | None = 16,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Quantize ``src`` with ``method`` on calibration ``text``; write the directory ``dst``.
    Returns the written ``quantization_config``."""
    if method not in METHODS:
        raise InvalidRequestError(f"unknown method {method!r}; use {', '.join(METHODS)}", "method")
    if method == "awq" and bits != 4:
        raise InvalidRequestError("AWQ's GEMM layout holds 4-bit codes only", "bits")
    if bits not in (2, 4, 8):
        raise InvalidRequestError(f"bits must be 2, 4 or 8, got {bits}", "bits")
    symmetric = (method != "awq") if symmetric is None else symmetric
    if method == "awq" and symmetric:
        raise InvalidRequestError("AWQ stores zero points: it is asymmetric", "symmetric")
    if ctx < 1 or (max_chunks is not None and max_chunks < 1):
        raise InvalidRequestError(
            f"need ctx >= 1 and chunks >= 1, got {ctx} and {max_chunks}", "chunks"
        )
    if not (math.isfinite(damp) and damp >= 0):
        raise InvalidRequestError(f"damp must be a finite number >= 0, got {damp}", "damp")
    out = Path(dst)
    check_output_path(out, folder=True)
    if out.exists() and not out.is_dir():
        raise InvalidRequestError(f"{out} is a file, not a folder to write into", "output")
    runner = make_runner(src, "float32")
    if runner.loaded.is_packed:
        raise InvalidRequestError("the source must load as float weights", "model")
    grid = check_grid(runner.loaded.config, bits, group_size, symmetric)
    stats: dict[str, _Stats] = {}
    if method != "rtn":
        chunks = text_chunks(runner, text, ctx, max_chunks)
        stats = collect_statistics(runner, chunks, method == "gptq", method == "awq", show_progress)
    return write_quantized(runner.loaded, out, method, grid, stats, damp, act_order, show_progress)


def check_grid(cfg: TransformerConfig, bits: int, group_size: int, symmetric: bool) -> Grid:
    """The grid, once every linear layer's input width is a whole number of groups."""
    _hf_config(cfg)
    for cols in (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads * cfg.head_dim):
        if group_size != -1 and (group_size <= 0 or cols % group_size):
            raise InvalidRequestError(
                f"group size {group_size} does not divide rows of {cols} values", "group_size"
            )
    return Grid(bits, group_size, symmetric)


def write_quantized(
    loaded: Any,
    out: Path,
    method: str,
    grid: Grid,
    stats: dict[str, _Stats] | None = None,
    damp: float = 0.01,
    act_order: bool = False,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Quantize a loaded float model's linear layers (``stats``: its calibration statistics
    for GPTQ / AWQ) and write the Hugging Face directory ``out``."""
    model, cfg = loaded.model, loaded.config
    hf_config = _hf_config(cfg)
    bits, group_size, symmetric = grid.bits, grid.group, grid.symmetric
    stats = stats or {}
    params = dict(model.named_parameters())
    tensors: dict[str, torch.Tensor] = {"model.embed_tokens.weight": params["embed_tokens.weight"]}
    tensors["model.norm.weight"] = params["norm.weight"]
    if "lm_head.weight" in params:
        tensors["lm_head.weight"] = params["lm_head.weight"]
    for layer in range(cfg.num_layers):
        base = f"model.layers.{layer}"
        norms = {
            "input": params[f"layers.{layer}.input_layernorm.weight"].detach().clone(),
            "post": params[f"layers.{layer}.post_attention_layernorm.weight"].detach().clone(),
        }
        groups = _groups(layer, model)
        weights = {g.module: params[f"{g.module}.weight"].detach().float().clone() for g in groups}
        if method == "awq":
            _awq_fold(groups, weights, norms, stats, grid, cfg)
        tensors[f"{base}.input_layernorm.weight"] = norms["input"]
        tensors[f"{base}.post_attention_layernorm.weight"] = norms["post"]
        for g in groups:
            w = weights[g.module]
            if method == "gptq":
                hessian = stats[g.module].hessian
                assert hessian is not None
                try:
                    codes = gptq(w, hessian, grid, damp, act_order)
                except ValueError as exc:
                    raise InvalidRequestError(f"{g.module}: {exc}", "damp") from exc
            else:
                codes = quantize_rtn_grid(w, grid)
            start = 0
            for name, size in zip(g.names, g.sizes):
                part = codes.rows(start, start + size)
                start += size
                if method == "awq":
                    tensors.update(awq_tensors(name, part))
                else:  # a zero point of 0 cannot be stored minus one: GPTQModel's v2
                    tensors.update(gptq_tensors(name, part, bits, symmetric))
        if show_progress:
            sys.stderr.write(f"\r{method}: layer {layer + 1}/{cfg.num_layers}")
            sys.stderr.flush()
    if show_progress:
        sys.stderr.write("\n")
    quant_config: dict[str, Any]
    if method == "awq":
        quant_config = {
            "quant_method": "awq",
            "bits": 4,
            "group_size": group_size,
            "zero_point": True,
            "version": "gemm",
        }
    else:
        quant_config = {
            "quant_method": "gptq",
            "bits": bits,
            "group_size": group_size,
            "sym": symmetric,
            "desc_act": act_order and method == "gptq",
            "checkpoint_format": "gptq" if symmetric else "gptq_v2",
            "damp_percent": damp,
        }
    hf_config["quantization_config"] = quant_config
    out.mkdir(parents=True, exist_ok=True)
    contiguous = {k: v.detach().contiguous() for k, v in tensors.items()}
    save_file(contiguous, str(out / "model.safetensors"), {"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config, indent=2))
    loaded.tokenizer.save_hf_dir(out)
    logger.info("wrote %s (%s)", out, quant_config)
    return quant_config


def _awq_fold(
    groups: list[_Group],
    weights: dict[str, torch.Tensor],
    norms: dict[str, torch.Tensor],
    stats: dict[str, _Stats],
    grid: Grid,
    cfg: TransformerConfig,
) -> None:
    """Search every group's scales on the float weights, then apply them: columns of the
    group times ``s``, the op producing its input divided by ``s``."""
    qkv, o, gate_up, down = groups
    scales = {}
    for g in groups:
        inputs = torch.cat(stats[g.module].samples)
        scales[g.module] = awq_scales(weights[g.module], inputs, grid)[0]
    # producers: RMSNorm weights; the up projection's rows; the v projection's rows feed
    # o_proj only without grouped-query attention (with it, o_proj keeps s = 1)
    s = scales[qkv.module]
    weights[qkv.module] *= s
    norms["input"] /= s
    s = scales[gate_up.module]
    weights[gate_up.module] *= s
    norms["post"] /= s
    s = scales[down.module]
    weights[down.module] *= s
    gate_size = gate_up.sizes[0]
    weights[gate_up.module][gate_size:] /= s[:, None]
    if cfg.num_kv_heads == cfg.num_heads:
        s = scales[o.module]
        weights[o.module] *= s
        q_size, k_size = qkv.sizes[0], qkv.sizes[1]
        weights[qkv.module][q_size + k_size :] /= s[:, None]

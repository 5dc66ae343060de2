"""Training LoRA adapters: trainable low-rank pairs and a differentiable forward of the model.

The serving forward runs fused C++ ops over a paged KV cache under ``inference_mode``; training
needs gradients, so ``TrainableLoRA.forward`` runs the same maths with torch ops only, over
right-padded whole sequences ``[B, L]`` with causal attention and no cache (pads sit after each
sequence's tokens, so causal attention never lets a real token see one). The base model stays
frozen and float (``--dtype float32`` or ``bfloat16`` at load); only the adapter's ``A`` and
``B`` are parameters. PEFT's initialization and naming: ``A`` Kaiming-uniform, ``B`` zero, the
update ``scaling * B A x`` with ``scaling = alpha / r``, dropout on the adapter's input.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from kvforge.errors import InvalidRequestError, UnsupportedModelError
from kvforge.layers.linear import Linear
from kvforge.layers.moe import SparseMoE, load_balancing_loss, router_z_loss
from kvforge.layers.rotary import apply_rotary
from kvforge.lora.adapter import TARGETS, module_path
from kvforge.models.common import DecoderLayer, DecoderLM
from kvforge.quant.gptq import Grid, quantize_rtn_grid

_MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")


def _check_model(model: nn.Module) -> DecoderLM:
    if not isinstance(model, DecoderLM):
        raise UnsupportedModelError(f"{type(model).__name__} cannot be fine-tuned")
    cfg = model.config
    if cfg.sandwich_norm or model.rope_local is not None:
        raise UnsupportedModelError("fine-tuning covers pre-norm Llama-family models (not Gemma)")
    for layer in model.layers:
        assert isinstance(layer, DecoderLayer)
        if isinstance(layer.mlp, SparseMoE) and layer.mlp.experts.is_packed:
            raise InvalidRequestError("fine-tuning needs float experts (--dtype float32)", "dtype")
        for linear in layer.linears():
            if linear.weight is None:
                raise InvalidRequestError(
                    "fine-tuning needs float base weights: load the model with --dtype float32 "
                    "(or bfloat16)",
                    "dtype",
                )
    if model.lm_head is None and model.embed_tokens.weight is None:
        raise InvalidRequestError("fine-tuning needs a float LM head (--dtype float32)", "dtype")
    return model


class TrainableLoRA(nn.Module):
    """LoRA pairs on ``targets`` of every layer of ``model`` (frozen), and the forward."""

    def __init__(
        self,
        model: nn.Module,
        targets: tuple[str, ...],
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.model = _check_model(model)
        unknown = sorted(set(targets) - set(TARGETS))
        if unknown:
            raise InvalidRequestError(f"LoRA targets must be among {TARGETS}", "target_modules")
        if not (1 <= rank <= 1024 and math.isfinite(alpha) and 0 <= dropout < 1):
            raise InvalidRequestError("need 1 <= rank <= 1024, finite alpha, 0 <= dropout < 1")
        self.targets, self.rank, self.alpha = tuple(targets), rank, float(alpha)
        # quantization-aware training: linear layers run on fake-quantized merged weights
        self.fake_quant: Grid | None = None
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout)
        for p in self.model.parameters():
            p.requires_grad_(False)
        generator = torch.Generator().manual_seed(seed)
        self.a = nn.ParameterDict()
        self.b = nn.ParameterDict()
        # (layer, target) pairs; a mixture-of-experts layer has no gate/up/down projection
        self.pairs = [
            (i, target)
            for i, layer in enumerate(self.model.layers)
            for target in self.targets
            if not (isinstance(layer.mlp, SparseMoE) and target in _MLP_TARGETS)
        ]
        if targets and not self.pairs:
            raise InvalidRequestError(
                "no LoRA targets in this model: mixture-of-experts layers have no gate/up/down "
                "projection (target q_proj, k_proj, v_proj or o_proj)",
                "target_modules",
            )
        for moe in self._moe_layers():
            moe.keep_router_logits = True
        for i, target in self.pairs:
            linear, shard = self.model.lora_target(module_path(i, target))
            a = torch.empty(rank, linear.in_features)
            bound = 1 / math.sqrt(linear.in_features)  # kaiming_uniform_(a=sqrt(5))
            a.uniform_(-bound, bound, generator=generator)
            self.a[self._key(i, target)] = nn.Parameter(a)
            self.b[self._key(i, target)] = nn.Parameter(
                torch.zeros(linear.shard_sizes[shard], rank)
            )

    @staticmethod
    def _key(layer: int, target: str) -> str:
        return f"{layer}_{target}"

    def _moe_layers(self) -> list[SparseMoE]:
        return [m for m in self.model.modules() if isinstance(m, SparseMoE)]

    def router_losses(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(load-balancing loss, router z-loss) of the last forward, averaged over the mixture
        layers; None for a dense model."""
        logits = [m.router_logits for m in self._moe_layers() if m.router_logits is not None]
        if not logits:
            return None
        tops = [m.top_k for m in self._moe_layers() if m.router_logits is not None]
        balance = torch.stack([load_balancing_loss(x, k) for x, k in zip(logits, tops)]).mean()
        return balance, torch.stack([router_z_loss(x) for x in logits]).mean()

    # ----------------------------------------------------------------- forward
    def _fake_quantized(
        self, layer_idx: int, linear: Linear, names: tuple[str, ...]
    ) -> torch.Tensor:
        """QAT: the layer's weight with its adapters merged, rounded to the grid in the forward
        and passed straight through in the backward (``W + (Q(W) - W).detach()``)."""
        assert linear.weight is not None and self.fake_quant is not None
        w = linear.weight.float()
        deltas = []
        for shard, name in enumerate(names):
            key = self._key(layer_idx, name)
            rows = linear.shard_sizes[shard]
            if name in self.targets and key in self.a:
                deltas.append((self.b[key] @ self.a[key]) * self.scaling)
            else:
                deltas.append(w.new_zeros(rows, w.shape[1]))
        merged = w + torch.cat(deltas)
        with torch.no_grad():
            rounded = quantize_rtn_grid(merged, self.fake_quant).dequantize()
        return merged + (rounded - merged).detach()

    def _linear(self, layer_idx: int, linear: Linear, names: tuple[str, ...], x: torch.Tensor):
        assert linear.weight is not None
        if self.fake_quant is not None:
            weight = self._fake_quantized(layer_idx, linear, names)
            return F.linear(x, weight.to(x.dtype), linear.bias)
        y = F.linear(x, linear.weight.to(x.dtype), linear.bias)
        if not any(n in self.targets for n in names):
            return y
        parts = list(y.split(linear.shard_sizes, dim=-1))
        dropped = self.dropout(x)
        for shard, name in enumerate(names):
            key = self._key(layer_idx, name)
            if name in self.targets:
                a, b = self.a[key], self.b[key]
                parts[shard] = parts[shard] + (dropped @ a.t() @ b.t()) * self.scaling
        return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]

    def forward(
        self,
        input_ids: torch.Tensor,
        rows: torch.Tensor | None = None,
        images: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Logits [B, L, V] (float32) of right-padded token ids [B, L]; with a boolean
        ``rows`` [B, L], only those positions' logits [N, V] (the LM head over a 49k vocabulary
        costs a fifth of a small model's forward: training needs it where labels are).
        ``images``: (boolean [B, L] of image placeholders, their embeddings [N, E]), which
        replace the placeholders' token embeddings (gradients reach them: projector training).
        With no targets the model is a frozen differentiable forward."""
        model, cfg = self.model, self.model.config
        batch, length = input_ids.shape
        emb = model.embed_tokens
        x = (
            emb.weight[input_ids]
            if emb.weight is not None
            else emb(input_ids.flatten()).view(batch, length, -1)
        )
        x = x.float() * cfg.embed_scale
        if images is not None:
            where, vectors = images
            x = x.masked_scatter(where[..., None], vectors.float())
        positions = torch.arange(length, device=input_ids.device)
        cos, sin = model.rope_global.cos_sin(positions)  # [L, 1, D]
        for i, layer in enumerate(model.layers):
            assert isinstance(layer, DecoderLayer)
            attn, mlp = layer.self_attn, layer.mlp
            h = F.rms_norm(x, x.shape[-1:], layer.input_layernorm.weight, layer.input_layernorm.eps)
            qkv = self._linear(i, attn.qkv_proj, ("q_proj", "k_proj", "v_proj"), h)
            q, k, v = qkv.split(attn.qkv_proj.shard_sizes, dim=-1)
            if attn.qk_norm_full and attn.q_norm is not None and attn.k_norm is not None:
                q = F.rms_norm(q, q.shape[-1:], attn.q_norm.weight, attn.q_norm.eps)
                k = F.rms_norm(k, k.shape[-1:], attn.k_norm.weight, attn.k_norm.eps)
            if attn.clip_qkv is not None:
                clip = attn.clip_qkv
                q, k, v = q.clamp(-clip, clip), k.clamp(-clip, clip), v.clamp(-clip, clip)
            q = q.reshape(batch, length, attn.num_heads, attn.head_dim)
            k = k.reshape(batch, length, attn.num_kv_heads, attn.head_dim)
            v = v.reshape(batch, length, attn.num_kv_heads, attn.head_dim)
            if attn.q_norm is not None and attn.k_norm is not None and not attn.qk_norm_full:
                q = F.rms_norm(q, q.shape[-1:], attn.q_norm.weight, attn.q_norm.eps)
                k = F.rms_norm(k, k.shape[-1:], attn.k_norm.weight, attn.k_norm.eps)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
            mask = None
            if attn.sliding_window:
                idx = torch.arange(length, device=x.device)
                delta = idx[:, None] - idx[None, :]
                mask = (delta >= 0) & (delta < attn.sliding_window)
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2),
                k.transpose(1, 2),
                v.transpose(1, 2),
                attn_mask=mask,
                is_causal=mask is None,
                scale=attn.scale,
                enable_gqa=attn.num_heads != attn.num_kv_heads,
            )
            out = out.transpose(1, 2).reshape(batch, length, -1)
            x = x + self._linear(i, attn.o_proj, ("o_proj",), out)
            h = F.rms_norm(
                x,
                x.shape[-1:],
                layer.post_attention_layernorm.weight,
                layer.post_attention_layernorm.eps,
            )
            if isinstance(mlp, SparseMoE):  # the routed experts, torch ops (differentiable)
                x = x + mlp(h.reshape(batch * length, -1)).view_as(x)
                continue
            gate, up = self._linear(i, mlp.gate_up_proj, ("gate_proj", "up_proj"), h).chunk(2, -1)
            x = x + self._linear(i, mlp.down_proj, ("down_proj",), mlp.act(gate) * up)
        if rows is not None:
            x = x[rows]
        x = F.rms_norm(x, x.shape[-1:], model.norm.weight, model.norm.eps)
        head = model.lm_head.weight if model.lm_head is not None else emb.weight
        assert head is not None
        logits = F.linear(x, head.to(x.dtype)).float()
        if cfg.final_logit_softcap:
            logits = torch.tanh(logits / cfg.final_logit_softcap) * cfg.final_logit_softcap
        return logits

    @torch.no_grad()
    def merge_into_model(self) -> None:
        """Add every adapter's ``scaling * B A`` to its base weight (export after QAT)."""
        for i, target in self.pairs:
            linear, shard = self.model.lora_target(module_path(i, target))
            assert linear.weight is not None
            start = sum(linear.shard_sizes[:shard])
            rows = slice(start, start + linear.shard_sizes[shard])
            key = self._key(i, target)
            delta = (self.b[key] @ self.a[key]) * self.scaling
            linear.weight[rows] += delta.to(linear.weight.dtype)

    # -------------------------------------------------------------- PEFT files
    def save_peft(self, directory: str | Path, base_model: str) -> None:
        """``adapter_config.json`` + ``adapter_model.safetensors`` as PEFT writes them."""
        from safetensors.torch import save_file

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for i, target in self.pairs:
            prefix = f"base_model.model.model.{module_path(i, target)}"
            key = self._key(i, target)
            tensors[f"{prefix}.lora_A.weight"] = self.a[key].detach().float().contiguous()
            tensors[f"{prefix}.lora_B.weight"] = self.b[key].detach().float().contiguous()
        save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
        config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": self.rank,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout.p,
            "target_modules": sorted(self.targets),
            "bias": "none",
            "fan_in_fan_out": False,
            "use_rslora": False,
            "inference_mode": True,
        }
        (out / "adapter_config.json").write_text(json.dumps(config, indent=2))

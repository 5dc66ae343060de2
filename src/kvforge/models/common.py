"""Shared decoder-only transformer. Families differ only in their TransformerConfig.

Dimension legend: T tokens in the batch, E hidden size, H / KVH query / key-value heads,
D head dim, F MLP intermediate size, V vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from kvforge.config import TransformerConfig
from kvforge.errors import UnsupportedModelError
from kvforge.layers.attention import BaseAttentionBackend
from kvforge.layers.forward_batch import ForwardBatch
from kvforge.layers.kv_cache import PagedKVCache
from kvforge.layers.linear import Linear, MergedLinear, VocabEmbedding
from kvforge.layers.mlp import GatedMLP
from kvforge.layers.moe import (
    LayerExpertStats,
    SparseMoE,
    StackedExperts,
    canonical_moe_name,
    expert_param,
)
from kvforge.layers.norm import RMSNorm
from kvforge.layers.quantization import QuantGemmMethod
from kvforge.layers.rotary import RotaryEmbedding, apply_rotary
from kvforge.ops import cpu_ops
from kvforge.parallel.group import ExpertParallel, TensorParallel, shard_range
from kvforge.quant.formats import Unpacked

Rope = tuple[torch.Tensor, torch.Tensor]
# decoder_stack's per-layer weights and shared (eps, act_bits, heads, kv heads, scale, window)
FusedStack = tuple[list[torch.Tensor | None], tuple[float, int, int, int, float, int]]

# checkpoint name part -> (fused parameter name part, shard)
_STACKED = (
    (".q_proj", ".qkv_proj", "q"),
    (".k_proj", ".qkv_proj", "k"),
    (".v_proj", ".qkv_proj", "v"),
    (".gate_proj", ".gate_up_proj", 0),
    (".up_proj", ".gate_up_proj", 1),
)


class Attention(nn.Module):
    """Self-attention with fused QKV, optional QK-norm, rotary and a paged KV backend."""

    def __init__(
        self,
        cfg: TransformerConfig,
        layer_idx: int,
        backend: BaseAttentionBackend,
        tp: TensorParallel | None = None,
    ):
        super().__init__()
        size = tp.size if tp is not None else 1
        if size > 1 and cfg.qk_norm_full:
            raise UnsupportedModelError("QK-norm over all heads cannot be split by rank")
        # under tensor parallelism each rank holds H / size query and KVH / size KV heads
        rank = tp.rank if tp is not None else 0
        self.num_heads = shard_range(cfg.num_heads, rank, size, "attention heads")[1]
        self.num_kv_heads = shard_range(cfg.num_kv_heads, rank, size, "KV heads")[1]
        self.head_dim = cfg.head_dim
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = MergedLinear(
            cfg.hidden_size, {"q": q_size, "k": kv_size, "v": kv_size}, cfg.qkv_bias, tp
        )
        self.o_proj = Linear(q_size, cfg.hidden_size, tp=tp, split="row")
        # QK-norm per head, or over all heads at once (``qk_norm_full``, OLMoE)
        q_dim, k_dim = (q_size, kv_size) if cfg.qk_norm_full else (cfg.head_dim, cfg.head_dim)
        self.q_norm = RMSNorm(q_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(k_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.qk_norm_full = cfg.qk_norm_full
        self.clip_qkv = cfg.clip_qkv
        self.scale = cfg.attn_scale if cfg.attn_scale is not None else cfg.head_dim**-0.5
        self.sliding_window = cfg.sliding_window if cfg.is_sliding(layer_idx) else None
        self.backend = backend

    def forward(
        self, x: torch.Tensor, rope: Rope, kv_cache: PagedKVCache, batch: ForwardBatch
    ) -> torch.Tensor:
        """x: [T, E] -> [T, E]."""
        num_tokens = x.shape[0]
        qkv = self.qkv_proj(x, batch.lora)
        if self.clip_qkv is not None and self.q_norm is None:
            qkv = qkv.clamp(-self.clip_qkv, self.clip_qkv)
        q_size = self.num_heads * self.head_dim
        v = qkv[:, q_size + self.num_kv_heads * self.head_dim :]
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)  # [T, KVH, D]
        if self.q_norm is not None and self.k_norm is not None:
            q, k, _ = self.qkv_proj.split(qkv)
            if self.qk_norm_full:
                q, k = self.q_norm(q.contiguous()), self.k_norm(k.contiguous())
            if self.clip_qkv is not None:  # OLMoE clamps after the norm
                clip = self.clip_qkv
                q, k, v = q.clamp(-clip, clip), k.clamp(-clip, clip), v.clamp(-clip, clip)
            q = q.reshape(num_tokens, self.num_heads, self.head_dim)  # [T, H, D]
            k = k.reshape(num_tokens, self.num_kv_heads, self.head_dim)
            if not self.qk_norm_full:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        else:
            # q and k side by side: one rotary call for both, [T, H + KVH, D]
            qk = qkv[:, : q_size + self.num_kv_heads * self.head_dim]
            qk = qk.view(num_tokens, -1, self.head_dim)
            ops = cpu_ops(qk)
            if ops is not None:
                ops.rotary_(qk, *rope)  # in place on the fresh qkv rows
            else:
                qk = apply_rotary(qk, *rope)
            q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]
        out = self.backend.forward(
            q, k, v, kv_cache, batch, scale=self.scale, sliding_window=self.sliding_window
        )
        return self.o_proj(out.reshape(num_tokens, self.num_heads * self.head_dim), batch.lora)


class DecoderLayer(nn.Module):
    """Pre-norm block; with ``sandwich_norm`` also norms after attention and MLP (Gemma)."""

    def __init__(
        self,
        cfg: TransformerConfig,
        layer_idx: int,
        backend: BaseAttentionBackend,
        tp: TensorParallel | None = None,
        experts: ExpertParallel | None = None,
    ):
        super().__init__()
        eps = cfg.rms_norm_eps
        self.tp = tp if tp is not None and tp.size > 1 else None
        self.self_attn = Attention(cfg, layer_idx, backend, tp)
        if cfg.is_moe(layer_idx) and self.tp is not None and experts is None:
            experts = ExpertParallel(None, self.tp)  # every expert split like a dense MLP
        self.mlp: GatedMLP | SparseMoE = (
            SparseMoE(cfg, experts, self.tp) if cfg.is_moe(layer_idx) else GatedMLP(cfg, tp=tp)
        )
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.sandwich = cfg.sandwich_norm
        if cfg.sandwich_norm:
            self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps)
            self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps)
        self._fused: list[torch.Tensor | None] | None = None
        self._fused_checked = False

    def fused_linears(self) -> list[torch.Tensor | None] | None:
        """The packed (qs, scales, mins) of qkv, o, gate_up and down when the whole layer can
        run as the C++ ``decoder_layer`` (plain pre-norm, SiLU, no biases or QK-norm, every
        linear in ``quant_gemm`` with the same activation bits, float32 norms, the ``cpu_paged``
        backend), else None. Decided on the first forward, after the weights are loaded."""
        if self._fused_checked:
            return self._fused
        from kvforge.layers.attention.cpu_paged import CpuPagedAttentionBackend

        attn, mlp = self.self_attn, self.mlp
        if not isinstance(mlp, GatedMLP) or self.tp is not None:  # MoE or split by rank
            self._fused_checked = True
            return None
        linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
        methods = [layer.quant for layer in linears]
        plain = (
            not self.sandwich
            and attn.clip_qkv is None
            and mlp.act is F.silu
            and attn.q_norm is None
            and isinstance(attn.backend, CpuPagedAttentionBackend)
            and all(layer.bias is None for layer in linears)
            and self.input_layernorm.weight.dtype == torch.float32
            and self.post_attention_layernorm.weight.dtype == torch.float32
        )
        if plain and all(isinstance(m, QuantGemmMethod) for m in methods):
            gemms = [m for m in methods if isinstance(m, QuantGemmMethod)]
            if len({m.act_bits for m in gemms}) == 1:
                self._fused = [t for m in gemms for t in (m.qs, m.scales, m.mins)]
        self._fused_checked = True
        return self._fused

    def linears(self) -> tuple[Linear, ...]:
        """qkv, o, gate_up and down: the projections a LoRA may update (qkv and o in a MoE
        layer)."""
        attn, mlp = self.self_attn, self.mlp
        if isinstance(mlp, SparseMoE):
            return attn.qkv_proj, attn.o_proj
        return attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj

    def lora_tensors(self) -> list[torch.Tensor]:
        """(A, B^T) stacks of qkv, o, gate_up and down for the fused C++ layer ([] without
        LoRA slots)."""
        slots = [linear.lora for linear in self.linears()]
        if any(s is None for s in slots):
            return []
        return [t for s in slots if s is not None for t in (s.a, s.bt)]

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        rope: Rope,
        kv_cache: PagedKVCache,
        batch: ForwardBatch,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(x, residual) -> (x, residual), each [T, E]: the hidden state is ``x + residual``
        (``x`` alone when residual is None), so each residual add fuses into the next norm."""
        if self.sandwich:
            if residual is not None:
                x = x + residual
            attn = self.self_attn(self.input_layernorm(x), rope, kv_cache, batch)
            x = x + self.post_attention_layernorm(attn)
            mlp = self.mlp(self.pre_feedforward_layernorm(x), batch.lora)
            return x + self.post_feedforward_layernorm(mlp), None
        fused = self.fused_linears()
        ops = cpu_ops(x) if fused is not None and not kv_cache.is_quantized else None
        if ops is not None and x.dtype == torch.float32:
            attn = self.self_attn
            return ops.decoder_layer(  # type: ignore[no-any-return]
                x,
                residual,
                self.input_layernorm.weight,
                self.post_attention_layernorm.weight,
                self.input_layernorm.eps,
                fused,
                self.mlp.gate_up_proj.quant.act_bits,  # type: ignore[union-attr]
                attn.num_heads,
                attn.num_kv_heads,
                *rope,
                kv_cache.k,
                kv_cache.v,
                batch.slot_mapping,
                batch.block_tables,
                batch.seq_lens,
                batch.query_lens,
                batch.query_start_loc,
                attn.scale,
                attn.sliding_window or 0,
                self.lora_tensors() if batch.lora is not None else [],
                batch.lora.token_slots if batch.lora is not None else None,
            )
        if residual is None:
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm.add_and_norm(x, residual)
        h = self.self_attn(h, rope, kv_cache, batch)
        h, residual = self.post_attention_layernorm.add_and_norm(h, residual)
        return self.mlp(h, batch.lora), residual


class DecoderLM(nn.Module):
    """Embedding, decoder layers, final norm and LM head over a paged KV cache."""

    def __init__(
        self,
        cfg: TransformerConfig,
        backend: BaseAttentionBackend,
        tp: TensorParallel | None = None,
        experts: ExpertParallel | None = None,
        layers: tuple[int, int] | None = None,
    ) -> None:
        """``tp`` / ``experts``: how this rank splits heads, MLPs and experts (None: whole);
        ``layers``: the [start, end) a pipeline stage runs (None: all). The embedding, final
        norm and LM head live on the stage that starts at layer 0."""
        super().__init__()
        self.config = cfg
        self.tp = tp if tp is not None and tp.size > 1 else None
        self.layer_range = layers or (0, cfg.num_layers)
        start, end = self.layer_range
        self.embed_tokens = VocabEmbedding(cfg.vocab_size, cfg.hidden_size, tp)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, i, backend, tp, experts) if start <= i < end else AbsentLayer()
            for i in range(cfg.num_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = (
            None
            if cfg.tie_word_embeddings
            else Linear(cfg.hidden_size, cfg.vocab_size, tp=tp, split="column")
        )
        if start > 0:  # a later pipeline stage: no embedding or head
            self.embed_tokens = None  # type: ignore[assignment]
            self.lm_head = None
            self.norm = None  # type: ignore[assignment]
        scaling = cfg.rope_scaling
        self.rope_global = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, scaling)
        self.rope_local = (
            RotaryEmbedding(cfg.head_dim, cfg.rope_local_theta) if cfg.rope_local_theta else None
        )
        self._stack: FusedStack | None = None
        self._stack_checked = False
        # The lora.manager.LoRAManager of this model's adapter slots, once enabled.
        self.lora_manager: object | None = None

    def fused_stack(self) -> FusedStack | None:
        """Every layer's (input norm, post-attention norm, 12 packed linear tensors) and the
        shared (eps, act_bits, heads, kv heads, scale, sliding window) when all layers run as
        ``decoder_layer`` with one rotary table and the same shapes, so the C++
        ``decoder_stack`` can run them in one call; else None. Decided on the first forward, as
        :meth:`DecoderLayer.fused_linears` (reset both when weights change at run time)."""
        if self._stack_checked:
            return self._stack
        self._stack_checked = True
        layers = [layer for layer in self.layers if isinstance(layer, DecoderLayer)]
        fused = [layer.fused_linears() for layer in layers]
        if self.rope_local is not None or len(layers) != len(self.layers) or None in fused:
            return None
        shared = {
            (
                float(layer.input_layernorm.eps),
                int(layer.mlp.gate_up_proj.quant.act_bits),  # type: ignore[union-attr,arg-type]
                int(layer.self_attn.num_heads),
                int(layer.self_attn.num_kv_heads),
                float(layer.self_attn.scale),
                int(layer.self_attn.sliding_window or 0),
            )
            for layer in layers
        }
        if len(shared) == 1:
            weights = [
                t
                for layer, linears in zip(layers, fused, strict=True)
                for t in [layer.input_layernorm.weight, layer.post_attention_layernorm.weight]
                + list(linears or [])
            ]
            self._stack = (weights, shared.pop())
        return self._stack

    def forward(self, batch: ForwardBatch, kv_caches: list[PagedKVCache]) -> torch.Tensor:
        """Hidden states [T, E] of the batch's tokens, after the final norm."""
        # Activations take the dtype of the float parameters (packed embeddings give bf16).
        x = self.embed_tokens(batch.input_ids).to(self.norm.weight.dtype)
        if self.config.embed_scale != 1.0:
            # Gemma multiplies by sqrt(E) rounded to the activation dtype.
            x = x * torch.tensor(self.config.embed_scale, dtype=x.dtype)
        x = _with_images(x, batch)
        rope_global = self.rope_global.cos_sin(batch.positions)
        rope_local = self.rope_local.cos_sin(batch.positions) if self.rope_local else rope_global
        stack = self.fused_stack()
        ops = cpu_ops(x) if stack is not None and x.dtype == torch.float32 else None
        lora: list[torch.Tensor] = []
        if batch.lora is not None:
            lora = [t for layer in self.layers for t in layer.lora_tensors()]  # type: ignore[operator]
            if len(lora) != 8 * len(self.layers):
                stack = None
        if stack is not None and ops is not None and not any(c.is_quantized for c in kv_caches):
            weights, (eps, act_bits, heads, kv_heads, scale, window) = stack
            out, res = ops.decoder_stack(
                x,
                weights,
                [t for cache in kv_caches for t in (cache.k, cache.v)],
                eps,
                act_bits,
                heads,
                kv_heads,
                *rope_global,
                batch.slot_mapping,
                batch.block_tables,
                batch.seq_lens,
                batch.query_lens,
                batch.query_start_loc,
                scale,
                window,
                lora,
                batch.lora.token_slots if batch.lora is not None else None,
            )
            return self.norm.add_and_norm(out, res)[0]
        residual: torch.Tensor | None = None
        for i, layer in enumerate(self.layers):
            rope = rope_local if self.config.is_sliding(i) else rope_global
            x, residual = layer(x, residual, rope, kv_caches[i], batch)
        return self.norm(x) if residual is None else self.norm.add_and_norm(x, residual)[0]

    def forward_stage(
        self, batch: ForwardBatch, kv_caches: list[PagedKVCache], x: torch.Tensor | None
    ) -> torch.Tensor:
        """A pipeline stage: this stage's layers (``kv_caches`` theirs, in order) over the
        previous stage's hidden states ``x`` [T, E] (None on the first stage: the embedded
        tokens); returns the un-normed hidden states for the next stage (or the final norm)."""
        if x is None:
            x = self.embed_tokens(batch.input_ids).to(self.norm.weight.dtype)
            if self.config.embed_scale != 1.0:
                x = x * torch.tensor(self.config.embed_scale, dtype=x.dtype)
            x = _with_images(x, batch)
        rope_global = self.rope_global.cos_sin(batch.positions)
        rope_local = self.rope_local.cos_sin(batch.positions) if self.rope_local else rope_global
        residual: torch.Tensor | None = None
        start, end = self.layer_range
        for i, cache in zip(range(start, end), kv_caches, strict=True):
            rope = rope_local if self.config.is_sliding(i) else rope_global
            x, residual = self.layers[i](x, residual, rope, cache, batch)
        return x if residual is None else x + residual

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [N, V] (float32) for hidden states [N, E]."""
        if self.lm_head is None:
            logits = self.embed_tokens.logits(hidden).float()  # all-gathered when split
        else:
            logits = self.lm_head(hidden).float()
            logits = logits if self.tp is None else self.tp.all_gather(logits)
        cap = self.config.final_logit_softcap
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def expert_stats(self) -> list[LayerExpertStats]:
        """Routing counters of every mixture-of-experts layer on this rank, since load."""
        return [
            layer.mlp.stats.layer(i)
            for i, layer in enumerate(self.layers)
            if isinstance(layer, DecoderLayer) and isinstance(layer.mlp, SparseMoE)
        ]

    def enable_lora(self, num_slots: int, max_rank: int) -> None:
        """Give every projection a LoRA may target ``num_slots`` empty adapter slots."""
        if self.tp is not None:
            raise UnsupportedModelError("LoRA adapters with tensor parallelism are not built")
        device = self.norm.weight.device
        for layer in self.layers:
            assert isinstance(layer, DecoderLayer)
            for linear in layer.linears():
                linear.enable_lora(num_slots, max_rank, device)

    def lora_target(self, module: str) -> tuple[Linear, int]:
        """The linear layer and shard index that a PEFT module path such as
        ``layers.3.self_attn.q_proj`` updates; KeyError if the model has none."""
        name, shard = module, None
        for part, fused, shard_id in _STACKED:
            if module.endswith(part):
                name, shard = module.replace(part, fused), shard_id
                break
        try:
            linear = self.get_submodule(name)
        except AttributeError as exc:
            raise KeyError(module) from exc
        if not isinstance(linear, Linear):
            raise KeyError(module)
        if isinstance(linear, MergedLinear):
            return linear, list(linear.shard_offsets).index(shard)
        return linear, 0

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor | Unpacked]]) -> None:
        """Load checkpoint tensors (Hugging Face names) through each layer's weight_loader."""
        params = dict(self.named_parameters())
        modules = dict(self.named_modules())
        loaded: set[str] = set()
        start, end = self.layer_range
        for name, tensor in weights:
            name = canonical_moe_name(name.removeprefix("model."))
            if name == "lm_head.weight" and self.lm_head is None:
                continue
            if not _on_stage(name, start, end):
                continue
            shard: object = None
            expert = expert_param(name)
            if expert is not None:
                name, shard = expert
            else:
                for part, fused, shard_id in _STACKED:
                    if part in name:
                        name, shard = name.replace(part, fused), shard_id
                        break
            if name not in params:
                raise ValueError(f"checkpoint tensor {name!r} has no parameter in the model")
            router = name.endswith(".mlp.gate.weight") and isinstance(tensor, torch.Tensor)
            if router and not torch.isfinite(tensor).all():  # type: ignore[arg-type]
                raise ValueError(f"{name}: the router's weights are not finite")  # NaN routes
            module = modules[name.rsplit(".", 1)[0]]
            loader = getattr(module, "weight_loader", None)
            if loader is not None:
                try:
                    loader(params[name], tensor, shard)
                except ValueError as exc:  # name the tensor in shape errors
                    raise ValueError(f"{name}: {exc}") from exc
            else:
                assert isinstance(tensor, torch.Tensor), f"{name} cannot hold packed weights"
                params[name].data.copy_(tensor)
            loaded.add(name)
        missing = set(params) - loaded
        if missing:
            raise ValueError(f"checkpoint lacks tensors for: {sorted(missing)[:8]}")
        for module in self.modules():
            if isinstance(module, (MergedLinear, StackedExperts)):
                module.finish_loading()
        for module_name, module in self.named_modules():
            gaps = module.missing() if isinstance(module, StackedExperts) else []
            if gaps:
                raise ValueError(f"checkpoint lacks {module_name}: {', '.join(gaps[:4])}")


class AbsentLayer(nn.Module):
    """A layer another pipeline stage runs (no parameters here)."""


def _on_stage(name: str, start: int, end: int) -> bool:
    """Whether checkpoint tensor ``name`` belongs to the stage running layers [start, end)."""
    if name.startswith("layers."):
        return start <= int(name.split(".", 2)[1]) < end
    return start == 0  # embedding, final norm, LM head


def gemma_embed_scale(hidden_size: int) -> float:
    """Gemma's embedding multiplier sqrt(hidden_size)."""
    return math.sqrt(hidden_size)


def _with_images(x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
    """Token embeddings with the batch's image embeddings in place of their placeholders."""
    if batch.mm_embeds is None:
        return x
    rows, vectors = batch.mm_embeds
    return x.index_copy(0, rows, vectors.to(x.dtype))

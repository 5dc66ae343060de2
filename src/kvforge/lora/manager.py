"""Adapters loaded in memory and placed in the model's slots for each step.

Loaded adapters (``LoRAAdapter``, float32 tensors) are kept up to ``max_cpu_loras``, least
recently used first out (an evicted one reloads from its path when a request needs it again);
``max_loras`` of them sit in the model's slots (``layers/lora.py``), and a step whose requests
name an adapter without a slot swaps out the least recently used one its batch does not use.
The scheduler admits at most ``max_loras`` distinct adapters among running requests, so a
step's batch always fits the slots.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict

import numpy as np
import torch

from kvforge.config import LoRAConfig
from kvforge.errors import InvalidRequestError
from kvforge.layers.lora import LoRABatch
from kvforge.lora.adapter import LoRAAdapter, load_gguf_adapter, load_peft_adapter
from kvforge.lora.request import LoRARequest
from kvforge.models.common import DecoderLM

logger = logging.getLogger(__name__)


class LoRAManager:
    """Adapters of one model: known requests, loaded tensors, slot assignment. Use
    :meth:`for_model`: engines sharing a loaded model must share its slots' bookkeeping."""

    @classmethod
    def for_model(cls, model: torch.nn.Module, config: LoRAConfig) -> LoRAManager:
        """The model's manager: the one made before for the same limits, else a new one (which
        gives the model fresh slots)."""
        if not isinstance(model, DecoderLM):
            raise InvalidRequestError(f"{type(model).__name__} does not take LoRA adapters")
        existing = model.lora_manager
        if isinstance(existing, LoRAManager) and existing.config == config:
            return existing
        manager = cls(model, config)
        model.lora_manager = manager
        return manager

    def __init__(self, model: torch.nn.Module, config: LoRAConfig) -> None:
        if not isinstance(model, DecoderLM):
            raise InvalidRequestError(f"{type(model).__name__} does not take LoRA adapters")
        self.model = model
        self.config = config
        model.enable_lora(config.max_loras, config.max_lora_rank)
        self.requests: dict[int, LoRARequest] = {}
        self.loaded: OrderedDict[int, LoRAAdapter] = OrderedDict()
        self.slots: OrderedDict[int, int] = OrderedDict()  # lora id -> slot, LRU order
        self.free_slots = list(range(config.max_loras - 1, -1, -1))

    def add(self, request: LoRARequest) -> None:
        """Know and load ``request``'s adapter (checked against the model); a known id must
        keep its name and path."""
        known = self.requests.get(request.lora_int_id)
        if known is not None and (known.lora_path, known.scale) != (
            request.lora_path,
            request.scale,
        ):
            raise InvalidRequestError(
                f"LoRA id {request.lora_int_id} is already {known.lora_name} at "
                f"{known.lora_path}; unload it first",
                "lora_request",
            )
        if known is None or request.lora_int_id not in self.loaded:
            adapter = self._load(request)
            self.requests[request.lora_int_id] = request
            self._keep(request.lora_int_id, adapter)

    def remove(self, lora_id: int) -> bool:
        """Forget an adapter (its slot frees); False if it was not known."""
        if self.requests.pop(lora_id, None) is None:
            return False
        self.loaded.pop(lora_id, None)
        slot = self.slots.pop(lora_id, None)
        if slot is not None:
            self._clear(slot)
            self.free_slots.append(slot)
        return True

    def batch(
        self, lora_ids: list[int], num_tokens: list[int], failed: dict[int, Exception] | None = None
    ) -> LoRABatch | None:
        """The step's ``LoRABatch``: request i names ``lora_ids[i]`` (0: the base model) and
        runs ``num_tokens[i]`` tokens, in batch order. An adapter that cannot be placed (its
        files changed since it was checked) goes into ``failed`` and its tokens run as the base
        model's: the caller fails those requests."""
        wanted = set(lora_ids) - {0}
        if not wanted:
            return None
        slots: dict[int, int] = {}
        for lora_id in sorted(wanted):
            try:
                slots.update(self._activate({lora_id}, keep=wanted))
            except Exception as exc:  # noqa: BLE001 - fails the requests of this adapter only
                if failed is None:
                    raise
                failed[lora_id] = exc
        per_request = np.array([slots.get(i, -1) for i in lora_ids], dtype=np.int64)
        token_slots = np.repeat(per_request, np.asarray(num_tokens, dtype=np.int64))
        device = self.model.norm.weight.device
        return LoRABatch.from_token_slots(torch.from_numpy(token_slots).to(device))

    # ------------------------------------------------------------------ internals
    def _load(self, request: LoRARequest) -> LoRAAdapter:
        if request.lora_path.endswith(".gguf") and os.path.isfile(request.lora_path):
            cfg = self.model.config
            adapter = load_gguf_adapter(
                request.lora_path,
                self.config.max_lora_rank,
                request.scale,
                cfg.num_heads,
                cfg.num_kv_heads,
            )
        else:
            adapter = load_peft_adapter(request.lora_path, self.config.max_lora_rank, request.scale)
        for module, (a, b) in adapter.modules.items():
            try:
                linear, shard = self.model.lora_target(module)
            except KeyError:
                raise InvalidRequestError(
                    f"LoRA adapter {request.lora_path}: the model has no module {module!r}",
                    "lora",
                ) from None
            if linear.lora is None:  # e.g. a MoE shared expert: no adapter slots there
                raise InvalidRequestError(
                    f"LoRA adapter {request.lora_path}: {module!r} cannot take an adapter "
                    "(LoRA covers attention and dense MLP projections)",
                    "lora",
                )
            expected = (linear.shard_sizes[shard], linear.in_features)
            if (b.shape[0], a.shape[1]) != expected:
                raise InvalidRequestError(
                    f"LoRA adapter {request.lora_path}: {module} is {b.shape[0]}x{a.shape[1]}, "
                    f"the base model's is {expected[0]}x{expected[1]} (another base model?)",
                    "lora",
                )
        logger.info(
            "loaded LoRA adapter %s (id %d, rank %d, %d modules) from %s",
            request.lora_name,
            request.lora_int_id,
            adapter.rank,
            len(adapter.modules),
            request.lora_path,
        )
        return adapter

    def _keep(self, lora_id: int, adapter: LoRAAdapter) -> None:
        self.loaded[lora_id] = adapter
        self.loaded.move_to_end(lora_id)
        while len(self.loaded) > self.config.cpu_capacity:
            evicted = next(iter(self.loaded))
            self.loaded.pop(evicted)

    def _activate(self, wanted: set[int], keep: set[int]) -> dict[int, int]:
        """Slots for the adapters ``wanted``, evicting none of ``keep`` (the batch's adapters:
        at most max_loras, as the scheduler admits)."""
        if len(keep) > self.config.max_loras:
            raise RuntimeError(
                f"{len(keep)} adapters in one batch; max_loras is {self.config.max_loras}"
            )
        for lora_id in sorted(wanted):
            if lora_id in self.slots:
                self.slots.move_to_end(lora_id)
                continue
            adapter = self._adapter(lora_id)  # before taking a slot: loading may fail
            if not self.free_slots:
                victim = next(i for i in self.slots if i not in keep)
                slot = self.slots.pop(victim)
                self._clear(slot)
                self.free_slots.append(slot)
            slot = self.free_slots.pop()
            self._fill(slot, adapter)
            self.slots[lora_id] = slot
        return {i: self.slots[i] for i in wanted}

    def _adapter(self, lora_id: int) -> LoRAAdapter:
        adapter = self.loaded.get(lora_id)
        if adapter is None:  # evicted from memory since: reload (it was checked on add)
            adapter = self._load(self.requests[lora_id])
        self._keep(lora_id, adapter)
        return adapter

    def _fill(self, slot: int, adapter: LoRAAdapter) -> None:
        for module, (a, b) in adapter.modules.items():
            linear, shard = self.model.lora_target(module)
            assert linear.lora is not None
            linear.lora.set(slot, shard, a, b)

    def _clear(self, slot: int) -> None:
        for module in self.model.modules():
            lora = getattr(module, "lora", None)
            if lora is not None:
                lora.clear(slot)

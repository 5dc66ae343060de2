"""One layer's paged K/V tensors, optionally stored in one byte per value.

Shapes: K and V are [num_blocks, block_size, KVH, D].

- ``fp8_e4m3`` / ``fp8_e5m2``: ``x / channel_scale`` cast to fp8, one static float32 scale per
  KV head and channel (vLLM's fp8 cache, per channel). fp8 keeps its relative precision at any
  magnitude, so the default scales are 1 (e4m3 reaches +-448); ``calculate_kv_scales`` sets
  them from the first _CALIBRATION_TOKENS tokens.
- ``int8``: channels are first divided by static scales from the first tokens (which
  flattens the outlier channels of K), then each token's head is quantized with its own
  float16 scale (absmax / 127), as llama.cpp's q8_0 cache does per block. The token scales
  cost 2 bytes per head_dim values (about 3% at D = 64).

Recent blocks: one-byte values lose most where attention is sharpest, on the last few tokens
and on the first ("attention sink") token. So :class:`RecentBlocks` also keeps exact 16-bit
copies of each running sequence's first block and its last two blocks (the KIVI idea of a
full-precision residual window, per block). Every write still goes to the one-byte blocks too,
so a block leaves the recent set at no cost and any eviction order is correct. On the embedded
model this lifts fp8_e4m3 from 95% to over 99% greedy agreement with the 16-bit cache.

Calculated scales also record each channel's mean over the first pass and quantize the values
minus that mean (added back on read). A constant K offset only shifts every logit of a query
by the same amount and a constant V offset passes through the softmax average unchanged, so
the offsets cost nothing in exactness while the stored residuals are smaller (SageAttention's
"smooth K").
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from kvforge.layers.huge_pages import zeros_huge
from kvforge.ops import cpu_ops

_STORAGE = {
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
    "int8": torch.int8,
}
# Headroom over the first pass's largest |value| per head, as a multiple of it.
_SCALE_HEADROOM = {"fp8_e4m3": 4.0, "fp8_e5m2": 4.0, "int8": 1.0}
# Largest ratio between a head's largest channel scale and any other of its channel scales.
_CHANNEL_RANGE = 64.0
# Calculated scales come from at least this many tokens (the first pass, or the first few
# passes when they are short); tokens stored before that are re-encoded once they are set.
_CALIBRATION_TOKENS = 128


def kv_storage_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The tensor dtype that holds cached K/V values."""
    return _STORAGE.get(kv_cache_dtype, model_dtype)


def block_bytes(
    kv_cache_dtype: str, model_dtype: torch.dtype, block_size: int, num_kv_heads: int, head_dim: int
) -> int:
    """Bytes of one block of one layer (K and V, with int8's token scales)."""
    itemsize = torch.empty((), dtype=kv_storage_dtype(kv_cache_dtype, model_dtype)).element_size()
    per_token_head = head_dim * itemsize + (2 if kv_cache_dtype == "int8" else 0)
    return 2 * block_size * num_kv_heads * per_token_head


def _max_value(dtype: torch.dtype) -> float:
    if dtype == torch.int8:
        return 127.0
    return float(torch.finfo(dtype).max)


def _raw(x: torch.Tensor) -> torch.Tensor:
    """One-byte caches as uint8 (same bytes); other dtypes unchanged."""
    return x.view(torch.uint8) if x.element_size() == 1 else x


class RecentBlocks:
    """Which blocks also hold an exact 16-bit copy; one table shared by every layer.

    Per forward pass, :meth:`update` keeps each scheduled sequence's first block and last two
    blocks recent: blocks written in this step are promoted (their earlier tokens come from
    the one-byte values), the rest are refreshed if already recent. When all ``capacity``
    slots are taken, the least recently used block outside this step's set is dropped; with
    none free, a block just stays one-byte.
    """

    def __init__(self, capacity: int, num_blocks: int, device: torch.device) -> None:
        self.capacity = capacity
        # Slot of each block's 16-bit copy; -1 for none. Slot ``capacity`` is a write-only
        # spare that absorbs writes to other blocks without a branch.
        self.slot_of_block = torch.full((num_blocks,), -1, dtype=torch.long, device=device)
        self._slots: OrderedDict[int, int] = OrderedDict()  # block -> slot, least recent first
        self._free = list(range(capacity))
        # (blocks, slots) promoted by the last update: each layer fills them once, before
        # its write of that step
        self.promoted: tuple[torch.Tensor, torch.Tensor] | None = None
        self.step = 0

    def like(self, capacity: int, num_blocks: int) -> RecentBlocks:
        """An empty table over another set of blocks (scratch caches)."""
        return RecentBlocks(capacity, num_blocks, self.slot_of_block.device)

    def update(
        self,
        block_tables: Sequence[Sequence[int]],
        starts: Sequence[int],
        lengths: Sequence[int],
        block_size: int,
    ) -> None:
        """Choose recent blocks for a step writing ``lengths[i]`` tokens from ``starts[i]``."""
        wanted: dict[int, bool] = {}  # block -> written in this step
        for table, start, length in zip(block_tables, starts, lengths):
            if length == 0:
                continue
            last = (start + length - 1) // block_size
            for index in {0, last - 1, last} - {-1}:
                wanted[table[index]] = wanted.get(table[index], False) or (
                    index >= start // block_size
                )
        self.step += 1
        evicted: list[int] = []
        promoted: list[tuple[int, int]] = []
        for block, written in wanted.items():
            if block in self._slots:
                self._slots.move_to_end(block)
                continue
            if not written:
                continue  # its exact values are gone; the one-byte copy serves
            slot = self._take_slot(wanted, evicted)
            if slot is not None:
                self._slots[block] = slot
                promoted.append((block, slot))
        if evicted:
            self.slot_of_block[torch.tensor(evicted, device=self.slot_of_block.device)] = -1
        self.promoted = None
        if promoted:
            blocks, slots = (
                torch.tensor(column, device=self.slot_of_block.device) for column in zip(*promoted)
            )
            self.slot_of_block[blocks] = slots
            self.promoted = (blocks, slots)

    def _take_slot(self, wanted: dict[int, bool], evicted: list[int]) -> int | None:
        if self._free:
            return self._free.pop()
        for block in self._slots:  # least recently used first
            if block not in wanted:
                evicted.append(block)
                return self._slots.pop(block)
        return None

    def flat_slots(self, slots: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """For cache slots: the flat index of their 16-bit copy (the spare slot's for blocks
        without one) and whether they have one."""
        recent = self.slot_of_block[slots // block_size]
        has = recent >= 0
        index = torch.where(has, recent, self.capacity) * block_size + slots % block_size
        return index, has


@dataclass
class KVScales:
    """Per-head K and V scales shared by a layer's serving cache and its scratch copies."""

    k: torch.Tensor  # [KVH, D] float32
    v: torch.Tensor
    # Per-channel means of the first pass, subtracted before quantizing (see the module doc).
    k_center: torch.Tensor | None = None
    v_center: torch.Tensor | None = None
    is_set: bool = False
    # K/V of the tokens seen before the scales were set
    seen: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)

    def observe(self, key: torch.Tensor, value: torch.Tensor, headroom: float) -> None:
        """Collect tokens; once _CALIBRATION_TOKENS were seen, set the scales from them."""
        self.seen.append((key.detach().float(), value.detach().float()))
        if sum(k.shape[0] for k, _ in self.seen) < _CALIBRATION_TOKENS:
            return
        centers = []
        for target, x in (
            (self.k, torch.cat([k for k, _ in self.seen])),
            (self.v, torch.cat([v for _, v in self.seen])),
        ):
            center = x.mean(dim=0)  # [KVH, D]
            amax = (x - center).abs().amax(dim=0)
            # A channel quiet in the first tokens may not stay quiet: keep every scale within
            # _CHANNEL_RANGE of its head's largest, so later values cannot blow up.
            amax = torch.maximum(amax, amax.amax(dim=-1, keepdim=True) / _CHANNEL_RANGE)
            target.copy_(torch.where(amax > 0, amax * headroom, torch.ones_like(amax)))
            centers.append(center)
        self.k_center, self.v_center = centers
        self.seen.clear()
        self.is_set = True


@dataclass
class PagedKVCache:
    """K/V blocks of one layer and the conversion to and from their stored dtype."""

    k: torch.Tensor  # [num_blocks, block_size, KVH, D]
    v: torch.Tensor
    kv_cache_dtype: str = "auto"
    calculate_scales: bool = False
    scales: KVScales = field(default_factory=lambda: KVScales(torch.ones(1), torch.ones(1)))
    # int8 only: one float16 scale per token and KV head, [num_blocks, block_size, KVH]
    k_token_scale: torch.Tensor | None = None
    v_token_scale: torch.Tensor | None = None
    # Exact copies of recent blocks, [capacity + 1, block_size, KVH, D] in the model KV dtype
    recent: RecentBlocks | None = None
    recent_k: torch.Tensor | None = None
    recent_v: torch.Tensor | None = None
    _promoted_step: int = 0
    # Before calculated scales are set: writes (K, V, slots) and block copies (src, dst) to
    # redo with them
    _replay: list[tuple[torch.Tensor, ...]] = field(default_factory=list)

    @classmethod
    def allocate(
        cls,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        model_dtype: torch.dtype,
        device: torch.device,
        kv_cache_dtype: str = "auto",
        calculate_scales: bool = False,
        scales: KVScales | None = None,
        recent: RecentBlocks | None = None,
        huge_pages: bool = False,
    ) -> PagedKVCache:
        """Zeroed blocks; int8 always calculates its channel scales. ``recent`` (one-byte
        formats only) keeps exact copies of the blocks it selects. ``huge_pages``: the K and V
        blocks in transparent huge pages (CPU; see layers/huge_pages.py)."""
        dtype = kv_storage_dtype(kv_cache_dtype, model_dtype)
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        if scales is None:
            ones = torch.ones(num_kv_heads, head_dim, dtype=torch.float32, device=device)
            scales = KVScales(ones, ones.clone())
        token_scales: list[torch.Tensor | None] = [None, None]
        if kv_cache_dtype == "int8":
            token_scales = [
                torch.zeros(shape[:3], dtype=torch.float16, device=device) for _ in range(2)
            ]
        exact: list[torch.Tensor | None] = [None, None]
        if recent is not None and dtype != model_dtype:
            recent_shape = (recent.capacity + 1, *shape[1:])
            exact = [torch.zeros(recent_shape, dtype=model_dtype, device=device) for _ in range(2)]
        zeros = zeros_huge if huge_pages else torch.zeros
        return cls(
            zeros(shape, dtype=dtype, device=device),
            zeros(shape, dtype=dtype, device=device),
            kv_cache_dtype,
            calculate_scales or kv_cache_dtype == "int8",
            scales,
            k_token_scale=token_scales[0],
            v_token_scale=token_scales[1],
            recent=recent if exact[0] is not None else None,
            recent_k=exact[0],
            recent_v=exact[1],
        )

    def like(self, num_blocks: int, recent: RecentBlocks | None = None) -> PagedKVCache:
        """A scratch cache of the same format sharing this one's channel scales."""
        _, block_size, num_kv_heads, head_dim = self.k.shape
        return PagedKVCache.allocate(
            num_blocks,
            block_size,
            num_kv_heads,
            head_dim,
            self.recent_k.dtype if self.recent_k is not None else self.k.dtype,
            self.k.device,
            self.kv_cache_dtype,
            self.calculate_scales,
            self.scales,
            recent,
        )

    @property
    def is_quantized(self) -> bool:
        """Whether values are stored in one byte with scales."""
        return self.kv_cache_dtype in _STORAGE

    def _encode(
        self, x: torch.Tensor, scale: torch.Tensor, center: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Stored values of x [T, KVH, D] and, for int8, their per-token scales [T, KVH]."""
        if center is not None:
            x = x.float() - center
        scaled = x.float() / scale  # channel scales flatten outlier channels first
        if self.k.dtype != torch.int8:
            limit = _max_value(self.k.dtype)
            return scaled.clamp(-limit, limit).to(self.k.dtype), None
        fp16_max = torch.finfo(torch.float16).max
        token = (scaled.abs().amax(-1) / 127).clamp(max=fp16_max).to(torch.float16).float()
        inv = torch.where(token > 0, 1 / token, torch.zeros_like(token))
        codes = (scaled * inv[..., None]).round().clamp(-127, 127).to(torch.int8)
        return codes, token.to(torch.float16)

    def write(self, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Store new tokens' K/V [T, KVH, D] at their flat slots."""
        if not self.is_quantized:
            ops = cpu_ops(key)
            if ops is not None and key.stride(-1) == 1 and value.stride(-1) == 1:
                ops.kv_cache_store(key, value, self.k, self.v, slot_mapping)  # one call, no copies
                return
            self._store(self.k, key, slot_mapping)
            self._store(self.v, value, slot_mapping)
            return
        if self.calculate_scales and not self.scales.is_set:
            headroom = _SCALE_HEADROOM[self.kv_cache_dtype]
            if self.kv_cache_dtype != "int8":  # fp8: map the largest expected value near the top
                headroom /= _max_value(self.k.dtype)
            self.scales.observe(key, value, headroom)
            if not self.scales.is_set:
                self._replay.append((key.detach(), value.detach(), slot_mapping))
        self._apply_scales()
        recent = self.recent
        if recent is not None and recent.promoted is not None and self._promoted_step < recent.step:
            self._promote(*recent.promoted)
            self._promoted_step = recent.step
        self._write_stored(key, value, slot_mapping)
        if recent is not None and self.recent_k is not None and self.recent_v is not None:
            index, _ = recent.flat_slots(slot_mapping, self.k.shape[1])
            self._store(self.recent_k, key, index)
            self._store(self.recent_v, value, index)

    def _write_stored(self, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor) -> None:
        for cache, token_cache, x, scale, center in (
            (self.k, self.k_token_scale, key, self.scales.k, self.scales.k_center),
            (self.v, self.v_token_scale, value, self.scales.v, self.scales.v_center),
        ):
            stored, token = self._encode(x, scale, center)
            self._store(cache, stored, slots)
            if token_cache is not None and token is not None:
                token_cache.view(-1, token.shape[-1]).index_copy_(0, slots, token)

    def _apply_scales(self) -> None:
        """Once calculated scales are set, redo (in order) the writes and block copies made
        before, which used unit scales."""
        if not self.scales.is_set or not self._replay:
            return
        replay, self._replay = self._replay, []
        for op in replay:
            if len(op) == 3:
                self._write_stored(*op)
            else:
                self._copy_stored(*op)

    def _block_slots(self, blocks: torch.Tensor) -> torch.Tensor:
        """Flat slots of every token position of ``blocks`` [N] -> [N * block_size]."""
        block_size = self.k.shape[1]
        offsets = torch.arange(block_size, device=blocks.device)
        return (blocks[:, None] * block_size + offsets).flatten()

    def _promote(self, blocks: torch.Tensor, slots: torch.Tensor) -> None:
        """Fill newly recent blocks' exact copies from their one-byte values."""
        assert self.recent_k is not None and self.recent_v is not None
        keys, values = self._decode(self._block_slots(blocks), self.recent_k.dtype)
        self._store(self.recent_k, keys, self._block_slots(slots))
        self._store(self.recent_v, values, self._block_slots(slots))

    @staticmethod
    def _store(cache: torch.Tensor, x: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        flat = PagedKVCache._flat(cache)
        # NOTE: CPU index ops lack float8 kernels; move the bytes through uint8 views.
        _raw(flat).index_copy_(0, slot_mapping, _raw(x.to(cache.dtype)))

    def gather(self, slots: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V at flat ``slots`` (any shape S) as [*S, KVH, D] in ``dtype``."""
        self._apply_scales()
        keys, values = self._decode(slots, dtype)
        if self.recent is None or self.recent_k is None or self.recent_v is None:
            return keys, values
        index, has = self.recent.flat_slots(slots, self.k.shape[1])
        has = has[..., None, None]
        return (
            torch.where(has, self._flat(self.recent_k)[index].to(dtype), keys),
            torch.where(has, self._flat(self.recent_v)[index].to(dtype), values),
        )

    @staticmethod
    def _flat(cache: torch.Tensor) -> torch.Tensor:
        return cache.view(-1, *cache.shape[-2:])

    def _decode(self, slots: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored (one-byte or model dtype) K and V at ``slots``, converted to ``dtype``."""
        out = []
        for cache, token_cache, scale, center in (
            (self.k, self.k_token_scale, self.scales.k, self.scales.k_center),
            (self.v, self.v_token_scale, self.scales.v, self.scales.v_center),
        ):
            values = _raw(self._flat(cache))[slots].view(cache.dtype).to(dtype)
            if self.is_quantized:
                values = values * scale.to(dtype)
            if token_cache is not None:
                values = values * token_cache.view(-1, cache.shape[-2])[slots][..., None].to(dtype)
            if self.is_quantized and center is not None:
                values = values + center.to(dtype)
            out.append(values)
        return out[0], out[1]

    def copy_blocks(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy whole blocks (copy-on-write of shared prefixes)."""
        if self.recent is not None and self.recent_k is not None and self.recent_v is not None:
            # Recent destinations take the source's best values (exact where it has them).
            keys, values = self.gather(self._block_slots(src), self.recent_k.dtype)
            index, _ = self.recent.flat_slots(self._block_slots(dst), self.k.shape[1])
            self._store(self.recent_k, keys, index)
            self._store(self.recent_v, values, index)
        if self.calculate_scales and not self.scales.is_set:
            self._replay.append((src, dst))
        self._copy_stored(src, dst)

    def _copy_stored(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        for cache in (self.k, self.v, self.k_token_scale, self.v_token_scale):
            if cache is not None:
                _raw(cache)[dst] = _raw(cache)[src]

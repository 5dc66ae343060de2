"""One layer's paged K/V tensors, optionally stored in one byte per value.

Shapes: K and V are [num_blocks, block_size, KVH, D].

- ``fp8_e4m3`` / ``fp8_e5m2``: ``x / channel_scale`` cast to fp8, one static float32 scale per
  KV head and channel (vLLM's fp8 cache, per channel). fp8 keeps its relative precision at any
  magnitude, so the default scales are 1 (e4m3 reaches +-448); ``calculate_kv_scales`` sets
  them from the first forward pass.
- ``int8``: channels are first divided by static scales from the first forward pass (which
  flattens the outlier channels of K), then each token's head is quantized with its own
  float16 scale (absmax / 127), as llama.cpp's q8_0 cache does per block. The token scales
  cost 2 bytes per head_dim values (about 3% at D = 64).

Calculated scales also record each channel's mean over the first pass and quantize the values
minus that mean (added back on read). A constant K offset only shifts every logit of a query
by the same amount and a constant V offset passes through the softmax average unchanged, so
the offsets cost nothing in exactness while the stored residuals are smaller (SageAttention's
"smooth K").
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

_STORAGE = {
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
    "int8": torch.int8,
}
# Headroom over the first pass's largest |value| per head, as a multiple of it.
_SCALE_HEADROOM = {"fp8_e4m3": 4.0, "fp8_e5m2": 4.0, "int8": 1.0}


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


@dataclass
class KVScales:
    """Per-head K and V scales shared by a layer's serving cache and its scratch copies."""

    k: torch.Tensor  # [KVH, D] float32
    v: torch.Tensor
    # Per-channel means of the first pass, subtracted before quantizing (see the module doc).
    k_center: torch.Tensor | None = None
    v_center: torch.Tensor | None = None
    is_set: bool = False


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
    ) -> PagedKVCache:
        """Zeroed blocks; int8 always calculates its channel scales."""
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
        return cls(
            torch.zeros(shape, dtype=dtype, device=device),
            torch.zeros(shape, dtype=dtype, device=device),
            kv_cache_dtype,
            calculate_scales or kv_cache_dtype == "int8",
            scales,
            *token_scales,
        )

    def like(self, num_blocks: int) -> PagedKVCache:
        """A scratch cache of the same format sharing this one's channel scales."""
        _, block_size, num_kv_heads, head_dim = self.k.shape
        return PagedKVCache.allocate(
            num_blocks,
            block_size,
            num_kv_heads,
            head_dim,
            self.k.dtype,
            self.k.device,
            self.kv_cache_dtype,
            self.calculate_scales,
            self.scales,
        )

    @property
    def is_quantized(self) -> bool:
        """Whether values are stored in one byte with scales."""
        return self.kv_cache_dtype in _STORAGE

    def _set_scales(self, key: torch.Tensor, value: torch.Tensor) -> None:
        headroom = _SCALE_HEADROOM[self.kv_cache_dtype]
        if self.kv_cache_dtype != "int8":  # fp8: map the largest expected value near the top
            headroom /= _max_value(self.k.dtype)
        centers = []
        for target, x in ((self.scales.k, key), (self.scales.v, value)):
            center = x.detach().float().mean(dim=0)  # [KVH, D]
            amax = (x.detach().float() - center).abs().amax(dim=0)
            target.copy_(torch.where(amax > 0, amax * headroom, torch.ones_like(amax)))
            centers.append(center)
        self.scales.k_center, self.scales.v_center = centers
        self.scales.is_set = True

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
        token = (scaled.abs().amax(-1) / 127).to(torch.float16).float()  # [T, KVH]
        inv = torch.where(token > 0, 1 / token, torch.zeros_like(token))
        codes = (scaled * inv[..., None]).round().clamp(-127, 127).to(torch.int8)
        return codes, token.to(torch.float16)

    def write(self, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Store new tokens' K/V [T, KVH, D] at their flat slots."""
        if not self.is_quantized:
            self._store(self.k, key, slot_mapping)
            self._store(self.v, value, slot_mapping)
            return
        if self.calculate_scales and not self.scales.is_set:
            self._set_scales(key, value)
        for cache, token_cache, x, scale, center in (
            (self.k, self.k_token_scale, key, self.scales.k, self.scales.k_center),
            (self.v, self.v_token_scale, value, self.scales.v, self.scales.v_center),
        ):
            stored, token = self._encode(x, scale, center)
            self._store(cache, stored, slot_mapping)
            if token_cache is not None and token is not None:
                token_cache.view(-1, token.shape[-1]).index_copy_(0, slot_mapping, token)

    @staticmethod
    def _store(cache: torch.Tensor, x: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        flat = cache.view(-1, *cache.shape[-2:])
        # NOTE: CPU index ops lack float8 kernels; move the bytes through uint8 views.
        _raw(flat).index_copy_(0, slot_mapping, _raw(x.to(cache.dtype)))

    def gather(self, slots: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V at flat ``slots`` (any shape S) as [*S, KVH, D] in ``dtype``."""
        out = []
        for cache, token_cache, scale, center in (
            (self.k, self.k_token_scale, self.scales.k, self.scales.k_center),
            (self.v, self.v_token_scale, self.scales.v, self.scales.v_center),
        ):
            flat = cache.view(-1, *cache.shape[-2:])
            values = _raw(flat)[slots].view(cache.dtype).to(dtype)
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
        for cache in (self.k, self.v, self.k_token_scale, self.v_token_scale):
            if cache is not None:
                _raw(cache)[dst] = _raw(cache)[src]

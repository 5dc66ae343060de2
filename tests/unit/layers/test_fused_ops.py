"""The C++ fused layer ops match the torch code they replace, on every float dtype."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvforge.layers.kv_cache import PagedKVCache
from kvforge.layers.norm import RMSNorm
from kvforge.layers.rotary import RotaryEmbedding, apply_rotary

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _torch_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    # float32 sums in another order; 16-bit results may differ by one rounding
    tol = 1e-5 if got.dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 3, 40])
def test_norms(ops, dtype: torch.dtype, rows: int) -> None:
    x, residual = torch.randn(rows, 576).to(dtype), torch.randn(rows, 576).to(dtype)
    weight = torch.randn(576)
    _close(ops.rms_norm(x, weight, 1e-6), _torch_norm(x, weight, 1e-6))
    summed = residual + x
    fused_residual = residual.clone()
    out = ops.add_rms_norm(x, fused_residual, weight, 1e-6)
    assert torch.equal(fused_residual, summed)  # updated in place, rounded as torch rounds
    _close(out, _torch_norm(summed, weight, 1e-6))
    # the module takes the same path and keeps its torch one for other shapes
    norm = RMSNorm(576, 1e-6)
    norm.weight.data.copy_(weight)
    _close(norm(x), _torch_norm(x, weight, 1e-6))
    _close(norm(x[:, None]), _torch_norm(x[:, None], weight, 1e-6))
    normed, new_residual = norm.add_and_norm(x, residual.clone())
    assert torch.equal(new_residual, summed)
    _close(normed, _torch_norm(summed, weight, 1e-6))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_in_place_on_strided_rows(ops, dtype: torch.dtype) -> None:
    tokens, heads, kv_heads, dim = 7, 9, 3, 64
    rope = RotaryEmbedding(dim, 10000.0)
    cos, signed_sin = rope.cos_sin(torch.tensor([0, 1, 5, 17, 300, 2, 9]))
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim).to(dtype)
    qk = qkv[:, : (heads + kv_heads) * dim].view(tokens, -1, dim)  # rows strided by qkv's width
    want = apply_rotary(qk.clone(), cos, signed_sin)
    v_before = qkv[:, (heads + kv_heads) * dim :].clone()
    ops.rotary_(qk, cos, signed_sin)
    _close(qk, want)
    assert torch.equal(qkv[:, (heads + kv_heads) * dim :], v_before)  # v untouched


def test_silu_and_mul_extremes(ops) -> None:
    """The vectorized exp: large and tiny gates, infinities and NaN, a width with a tail."""
    values = [0.0, -0.0, 1e-30, -1e-30, 3.0, -3.0, 30.0, -30.0, 87.0, -87.0, 88.5, -88.5]
    values += [100.0, -100.0, 1e4, -1e4, float("inf"), float("-inf"), float("nan")]
    gate = torch.tensor(values + [0.5] * (21 - len(values)))[None].repeat(3, 1)
    gate = torch.cat([gate, torch.randn(3, 80) * 20], dim=1)  # 101 columns: 12 vectors + 5
    up = torch.randn_like(gate)
    got = ops.silu_and_mul(torch.cat([gate, up], dim=1))
    torch.testing.assert_close(got, F.silu(gate) * up, rtol=2e-6, atol=1e-30, equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(ops, dtype: torch.dtype) -> None:
    gate_up = (torch.randn(5, 2 * 96) * 4).to(dtype)
    gate, up = gate_up.split(96, dim=-1)
    _close(ops.silu_and_mul(gate_up), F.silu(gate) * up)


@pytest.mark.parametrize("src", DTYPES)
@pytest.mark.parametrize("cache_dtype", DTYPES)
def test_kv_cache_store_matches_index_copy(ops, src: torch.dtype, cache_dtype: torch.dtype) -> None:
    blocks, block_size, kv_heads, dim, tokens = 6, 4, 2, 32, 5
    qkv = torch.randn(tokens, 3 * kv_heads * dim).to(src)
    k = qkv[:, : kv_heads * dim].view(tokens, kv_heads, dim)  # strided views, as the model has
    v = qkv[:, kv_heads * dim : 2 * kv_heads * dim].view(tokens, kv_heads, dim)
    slots = torch.tensor([0, 23, 5, 6, 17])
    got_k, got_v = (torch.zeros(blocks, block_size, kv_heads, dim, dtype=cache_dtype) for _ in "kv")
    want_k, want_v = got_k.clone(), got_v.clone()
    ops.kv_cache_store(k, v, got_k, got_v, slots)
    PagedKVCache._store(want_k, k, slots)
    PagedKVCache._store(want_v, v, slots)
    assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)


def test_bad_arguments_raise(ops) -> None:
    cache = torch.zeros(2, 4, 1, 8)
    k = torch.randn(1, 1, 8)
    with pytest.raises(RuntimeError, match="outside the cache"):
        ops.kv_cache_store(k, k, cache, cache.clone(), torch.tensor([8]))
    with pytest.raises(RuntimeError, match="outside the cache"):
        ops.kv_cache_store(k, k, cache, cache.clone(), torch.tensor([-1]))
    with pytest.raises(RuntimeError, match="int64"):
        ops.kv_cache_store(k, k, cache, cache.clone(), torch.tensor([1], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="weight"):
        ops.rms_norm(torch.randn(2, 8), torch.randn(7), 1e-6)
    with pytest.raises(RuntimeError, match="residual"):
        ops.add_rms_norm(torch.randn(2, 8), torch.randn(3, 8), torch.randn(8), 1e-6)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        ops.silu_and_mul(torch.ones(2, 8, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="cos"):
        ops.rotary_(torch.randn(2, 1, 8), torch.randn(3, 8), torch.randn(3, 8))
    with pytest.raises(RuntimeError, match="even width"):
        ops.silu_and_mul(torch.randn(2, 7))


def test_decoder_stack_checks_its_lists(ops) -> None:
    ints = {"dtype": torch.int32}
    shared = (1e-5, 16, 1, 1, torch.ones(1, 8), torch.ones(1, 8), torch.zeros(1, dtype=torch.long))
    batch = (torch.zeros(1, 1, **ints), torch.ones(1, **ints), torch.ones(1, **ints))
    tail = (*batch, torch.zeros(2, **ints), 1.0, 0, [], None)  # no LoRA
    caches = [torch.zeros(1), torch.zeros(1)]
    x = torch.randn(1, 8)
    with pytest.raises(RuntimeError, match="14 weights and 2 caches per layer"):
        ops.decoder_stack(x, [], [], *shared, *tail)
    with pytest.raises(RuntimeError, match="14 weights and 2 caches per layer"):
        ops.decoder_stack(x, [None] * 13, caches, *shared, *tail)
    with pytest.raises(RuntimeError, match="lacks its norms"):
        ops.decoder_stack(x, [None] * 14, caches, *shared, *tail)
    with pytest.raises(RuntimeError, match="8 LoRA tensors per layer"):
        ops.decoder_stack(x, [None] * 14, caches, *shared, *tail[:-2], [x], None)


@pytest.mark.parametrize("vocab", [49152, 13])
def test_greedy_sample(ops, vocab: int) -> None:
    """(argmax, logit - logsumexp) per row, as torch: first maximum on ties, NaN counts as the
    maximum, masked (-inf) entries, an all -inf row, an infinite maximum."""
    torch.manual_seed(0)
    logits = torch.randn(7, vocab) * 8
    logits[1, ::3] = float("-inf")
    logits[2, :] = float("-inf")
    logits[3, 5] = float("nan")
    logits[4, 2] = logits[4, 9] = logits[4].max() + 1  # a tie: the first wins
    logits[5, 7] = float("inf")
    tokens, logprobs = ops.greedy_sample(logits)
    want = logits.argmax(-1)
    assert torch.equal(tokens, want)
    want_lp = logits.gather(1, want[:, None]).squeeze(1) - logits.logsumexp(-1)
    torch.testing.assert_close(logprobs, want_lp, rtol=1e-5, atol=1e-5, equal_nan=True)
    # banned ids are never chosen; the logprob stays the unbanned row's
    banned = torch.full((7, 2), -1, dtype=torch.long)
    banned[0] = want[0]
    banned[4, 1] = 2
    tokens, banned_lp = ops.greedy_sample(logits, banned)
    masked = logits.clone()
    masked[0, want[0]] = masked[4, 2] = float("-inf")
    assert torch.equal(tokens, masked.argmax(-1)) and tokens[0] != want[0] and tokens[4] == 9
    want_lp = logits.gather(1, tokens[:, None]).squeeze(1) - logits.logsumexp(-1)
    torch.testing.assert_close(banned_lp, want_lp, rtol=1e-5, atol=1e-5, equal_nan=True)
    with pytest.raises(RuntimeError, match="float32"):
        ops.greedy_sample(logits.double())
    with pytest.raises(RuntimeError, match="banned"):
        ops.greedy_sample(logits, banned[:3])


def test_sampler_greedy_paths_agree() -> None:
    """Sampler.greedy: the C++ pass (float32 on the CPU) and the torch path (other dtypes and
    devices) choose the same tokens and logprobs, bans included."""
    from kvforge.sample.sampler import Sampler

    torch.manual_seed(1)
    logits = torch.randn(4, 300) * 5
    banned = [[int(logits[0].argmax())], [], [3, 4], []]
    fast = Sampler.greedy(logits, banned)
    slow = Sampler.greedy(logits.double(), banned)
    assert torch.equal(fast[0], slow[0]) and int(fast[0][0]) != banned[0][0]
    torch.testing.assert_close(fast[1].double(), slow[1], rtol=1e-5, atol=1e-5)

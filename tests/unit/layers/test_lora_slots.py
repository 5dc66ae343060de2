"""LoRASlots: the C++ per-token kernel and the stacked-matmul fallback both equal the update
computed token by token in float64."""

from __future__ import annotations

import pytest
import torch

from kvforge.layers.lora import LoRABatch, LoRASlots
from kvforge.ops import cpu_ops


def reference(x, y, adapters, token_slots):
    out = y.double().clone()
    for t, slot in enumerate(token_slots.tolist()):
        if slot < 0:
            continue
        for offset, a, b in adapters[slot]:
            delta = b.double() @ (a.double() @ x[t].double())
            out[t, offset : offset + b.shape[0]] += delta
    return out


@pytest.mark.parametrize("use_extension", [True, False], ids=["cpp", "stacked-matmul"])
@pytest.mark.parametrize("slots", [[0, 2, -1, 1, 2, 0, -1], [1, 1, 1], [-1, 0]])
def test_updates_equal_the_per_token_formula(monkeypatch, use_extension, slots):
    if use_extension and cpu_ops(torch.zeros(1)) is None:
        pytest.skip("the C++ extension is not built here")
    if not use_extension:
        monkeypatch.setattr("kvforge.layers.lora.cpu_ops", lambda _: None)
    torch.manual_seed(0)
    shard_sizes, in_features, max_rank = [24, 8, 8], 40, 6
    lora = LoRASlots(3, max_rank, in_features, shard_sizes, torch.device("cpu"))
    adapters: dict[int, list] = {}
    for slot, (rank, shards) in enumerate([(6, [0, 1, 2]), (2, [0, 2]), (4, [1])]):
        adapters[slot] = []
        for shard in shards:
            a = torch.randn(rank, in_features)
            b = torch.randn(shard_sizes[shard], rank)
            lora.set(slot, shard, a, b)
            adapters[slot].append((lora.shard_offsets[shard], a, b))
    token_slots = torch.tensor(slots, dtype=torch.long)
    x = torch.randn(len(slots), in_features)
    y = torch.randn(len(slots), sum(shard_sizes))
    batch = LoRABatch.from_token_slots(token_slots)
    expected = reference(x, y, adapters, token_slots)
    if batch is None:
        return
    out = lora.apply(x, y.clone(), batch)
    assert torch.allclose(out.double(), expected, atol=1e-4)
    lora.clear(1)
    adapters[1] = []
    out = lora.apply(x, y.clone(), LoRABatch.from_token_slots(token_slots))
    assert torch.allclose(out.double(), reference(x, y, adapters, token_slots), atol=1e-4)


def test_a_batch_of_base_tokens_has_no_lora_batch():
    assert LoRABatch.from_token_slots(torch.tensor([-1, -1])) is None
    one = LoRABatch.from_token_slots(torch.tensor([3, 3]))
    assert one is not None and one.single == 3 and one.slots == [3]
    mixed = LoRABatch.from_token_slots(torch.tensor([3, -1, 1]))
    assert mixed is not None and mixed.single is None and mixed.slots == [1, 3]
    assert mixed.mask(2, torch.float32).shape == (3, 8)


def test_merged_linear_with_packed_and_float_shards_runs_in_float():
    """A fused projection whose shards come in different formats (a Q8_0 gate with an F32 up)
    is dequantized to float, not left half loaded."""
    from kvforge.layers.linear import MergedLinear
    from kvforge.quant.rtn import quantize_rtn

    torch.manual_seed(0)
    gate, up = torch.randn(8, 64), torch.randn(8, 64)
    layer = MergedLinear(64, {0: 8, 1: 8})
    packed_gate = quantize_rtn(gate, "int8", 32, True)
    layer.weight_loader(layer.weight, packed_gate, 0)
    layer.weight_loader(layer.weight, up, 1)
    layer.finish_loading()
    assert layer.quant is None
    x = torch.randn(3, 64)
    expected = torch.cat([x @ packed_gate.dequantize().T, x @ up.T], dim=-1)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    lonely = MergedLinear(64, {0: 8, 1: 8})
    lonely.weight_loader(lonely.weight, up, 1)
    with pytest.raises(ValueError, match="lacks shard"):
        lonely.finish_loading()

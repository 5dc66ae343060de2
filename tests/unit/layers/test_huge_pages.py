"""Weights and KV caches moved into huge-page arenas keep their values, identities and ties."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from kvforge.layers.huge_pages import HUGE_PAGE, empty_huge, move_to_huge_pages, zeros_huge

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise is Linux's")


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(8192, 96)
        self.proj = nn.Linear(96, 300)
        self.head = nn.Linear(96, 8192, bias=False)
        self.head.weight = self.embed.weight  # tied, as an LM head
        self.register_buffer("codes", torch.randint(0, 255, (1000, 37), dtype=torch.uint8))
        self.register_buffer("table", torch.randn(64, 8))
        self.view = self.table[:, :4]  # not moved: a view of a larger storage


@linux
def test_move_keeps_values_identities_and_ties() -> None:
    torch.manual_seed(0)
    model = _Tied()
    before = {name: t.clone() for name, t in model.state_dict().items()}
    params = {name: id(p) for name, p in model.named_parameters()}
    x = torch.randn(3, 96)
    want = model.proj(x), model.head(x)
    moved = move_to_huge_pages(model)
    assert moved >= sum(t.numel() * t.element_size() for t in model.state_dict().values()) - (
        model.embed.weight.numel() * 4  # the tied weight is counted once
    )
    assert {name: id(p) for name, p in model.named_parameters()} == params
    assert model.head.weight is model.embed.weight
    for name, t in model.state_dict().items():
        assert torch.equal(t, before[name]), name
    # every moved tensor lives in one allocation, on a cache line
    bases = {t.untyped_storage().data_ptr() for t in (model.embed.weight, model.codes)}
    assert len(bases) == 1
    assert all(t.data_ptr() % 64 == 0 for t in model.state_dict().values())
    assert model.view.untyped_storage().data_ptr() != model.table.untyped_storage().data_ptr()
    got = model.proj(x), model.head(x)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert move_to_huge_pages(model) == 0  # once


@linux
def test_arenas() -> None:
    arena = empty_huge(3 * HUGE_PAGE + 5)
    assert arena is not None and arena.numel() == 3 * HUGE_PAGE + 5
    assert arena.data_ptr() % HUGE_PAGE == 0
    assert empty_huge(4096) is None  # under a page: not worth an arena
    kv = zeros_huge((40, 16, 3, 64), torch.bfloat16, torch.device("cpu"))
    assert kv.shape == (40, 16, 3, 64) and kv.dtype == torch.bfloat16 and not kv.any()
    small = zeros_huge((4, 4), torch.float32, torch.device("cpu"))
    assert small.shape == (4, 4) and not small.any()
    # wherever the allocation falls, the advised huge pages lie inside it (madvise would fail
    # on an unmapped tail and the arena come back None)
    kept = [torch.empty(4096 * k + 7, dtype=torch.uint8) for k in range(1, 40)]
    for k in range(40):
        arena = empty_huge(HUGE_PAGE + 4096 * k + 5)
        assert arena is not None, k
        kept.append(arena)

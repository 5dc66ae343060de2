"""Rank layout arithmetic and the parallel options (no processes started)."""

from __future__ import annotations

import argparse

import pytest

from kvforge.config import ParallelConfig
from kvforge.engine_args import EngineArgs
from kvforge.errors import InvalidRequestError
from kvforge.parallel.layout import Layout


def test_stage_of_tensor_and_expert_ranks():
    layout = Layout(tp=2, pp=2, ep=4)  # 4 ranks a stage: heads split 2 ways, replicated twice
    assert (layout.stage_size, layout.world_size, layout.expert_tp) == (4, 8, 1)
    assert layout.tp_group(5) == [4, 5]
    assert layout.ep_group(5) == [4, 5, 6, 7]
    assert layout.expert_tp_group(5) == [5]
    assert [layout.stage(r) for r in range(8)] == [0] * 4 + [1] * 4
    assert layout.next_stage_rank(5) == 1 and layout.prev_stage_rank(1) == 5


def test_experts_split_by_tensor_rank_within_a_group():
    layout = Layout(tp=4, ep=2)  # each expert group of 2 ranks splits its experts' matrices
    assert layout.expert_tp == 2
    assert layout.ep_group(1) == [1, 3]
    assert layout.expert_tp_group(3) == [2, 3]


def test_every_rank_belongs_to_one_group_of_each_kind():
    layout = Layout(tp=2, pp=3, ep=2)
    groups = layout.all_groups()
    for kind in ("tp", "ep", "expert_tp"):
        members = sorted(r for k, ranks in groups if k == kind for r in ranks)
        assert members == list(range(layout.world_size)), kind


def test_stage_layers_cover_the_model_in_order():
    layout = Layout(pp=3)
    spans = [layout.stage_layers(10, s) for s in range(3)]
    assert spans == [(0, 4), (4, 7), (7, 10)]
    with pytest.raises(InvalidRequestError, match="at least as many layers"):
        Layout(pp=4).stage_layers(3, 0)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"tensor_parallel_size": 0}, "tensor_parallel_size"),
        ({"tensor_parallel_size": 2, "expert_parallel_size": 3}, "divide one another"),
        ({"tensor_parallel_size": 3, "nnodes": 2}, "evenly over 2 nodes"),
        ({"tensor_parallel_size": 2, "nnodes": 2, "node_rank": 2}, "node_rank"),
        ({"moe_capacity_factor": 0.0}, "positive"),
        ({"moe_capacity_factor": float("nan")}, "positive"),
        ({"distributed_timeout": 0.0}, "distributed_timeout"),
        ({"master_port": 70000}, "master_port"),
        ({"master_port": 0}, "master_port"),
        ({"pipeline_micro_batches": 0}, "pipeline_micro_batches"),
    ],
)
def test_bad_sizes_are_refused(fields, message):
    with pytest.raises(InvalidRequestError, match=message):
        ParallelConfig(**fields).check()


def test_enable_expert_parallel_splits_experts_over_the_tensor_ranks():
    config = ParallelConfig(tensor_parallel_size=2, enable_expert_parallel=True)
    assert (config.ep_size, config.world_size) == (2, 2)
    assert ParallelConfig(expert_parallel_size=4, tensor_parallel_size=2).world_size == 4


def test_flags_reach_the_config(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.7")
    monkeypatch.setenv("MASTER_PORT", "29511")
    parser = argparse.ArgumentParser()
    EngineArgs.add_cli_args(parser)
    args = parser.parse_args(
        ["-tp", "2", "-pp", "2", "--expert-parallel-size", "2", "--moe-capacity-factor", "1.5"]
    )
    parallel = EngineArgs.from_cli_args(args).create_engine_config().parallel_config
    assert (parallel.tensor_parallel_size, parallel.pipeline_parallel_size) == (2, 2)
    assert parallel.enable_expert_parallel and parallel.ep_size == 2
    assert parallel.moe_capacity_factor == 1.5
    assert (parallel.master_addr, parallel.master_port) == ("10.0.0.7", 29511)

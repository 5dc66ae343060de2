"""Regressions from an attack on tensor / pipeline / expert parallelism (worker processes on
gloo): each test reproduced a failure before its fix."""

from __future__ import annotations

import os
import signal
import threading

import pytest
import torch

from kvforge import LLM
from kvforge.errors import EngineDeadError, KVForgeError
from tests.models.test_parallel_engine import COMMON, GREEDY, PROMPTS
from tests.models.tiny_checkpoints import write_checkpoint

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def qwen2_moe(tmp_path_factory):
    path = tmp_path_factory.mktemp("attack") / "qwen2_moe"
    write_checkpoint("qwen2_moe", path)
    return str(path)


@pytest.fixture(scope="module")
def mixtral_kv4(tmp_path_factory):
    """A tiny Mixtral with 4 KV heads, so tensor_parallel_size=4 splits it: the only way to get
    a stage where every expert is split by tensor rank *and* experts are split over groups
    (tp 4 x ep 2 -> expert_tp 2)."""
    import transformers as tf

    from tests.models import tiny_checkpoints as tc

    torch.manual_seed(0)
    config = tf.MixtralConfig(
        **tc._common(
            num_local_experts=4,
            intermediate_size=48,
            num_key_value_heads=4,
            vocab_size=tc.BPE_VOCAB,
            num_experts_per_tok=2,
        )
    )
    model = tf.MixtralForCausalLM(config).float().eval()
    path = tmp_path_factory.mktemp("attack") / "mixtral_kv4"
    model.save_pretrained(path, safe_serialization=True)
    tc.write_bpe_tokenizer(path)
    return str(path)


def _dropped(path: str, **options) -> list[tuple[int, int]]:
    llm = LLM(path, **COMMON, **options)
    try:
        llm.generate(PROMPTS, GREEDY, use_tqdm=False)
        return [(s.layer, s.dropped) for s in llm.engine.runner.expert_stats()]
    finally:
        llm.shutdown()


@pytest.mark.slow
def test_dropped_pairs_are_not_double_counted_when_experts_are_also_tensor_split(mixtral_kv4):
    """tp 4 x ep 2: ranks l and l+1 of a group route the same token slice (expert_tp 2); only
    the one with ``record_stats`` counts dropped pairs (they were counted expert_tp times)."""
    ep_only = _dropped(mixtral_kv4, expert_parallel_size=2, moe_capacity_factor=0.5)
    assert sum(d for _, d in ep_only) > 0
    both = _dropped(
        mixtral_kv4, tensor_parallel_size=4, expert_parallel_size=2, moe_capacity_factor=0.5
    )
    assert both == ep_only


def test_typed_load_error_of_a_rank_reaches_the_caller(qwen2_moe):
    """A rank's ModelFileError (two constructor arguments) reaches the caller whole; it used to
    fail to unpickle in the engine (a TypeError that hid the cause)."""
    # one process loads this fine (48-column shared expert, groups of 16)
    one = LLM(qwen2_moe, **COMMON, quantization="int4", quantization_group_size=16)
    del one
    with pytest.raises(KVForgeError, match="splits blocks of 16"):
        LLM(
            qwen2_moe,
            **COMMON,
            quantization="int4",
            quantization_group_size=16,
            tensor_parallel_size=2,
        )


def test_hung_rank_0_times_out(tmp_path_factory):
    """Rank 0 stopped (SIGSTOP) mid-run: its heartbeats stop and the engine fails after
    distributed_timeout (it used to wait forever: rank 1 idles without a deadline)."""
    path = tmp_path_factory.mktemp("attack") / "llama"
    write_checkpoint("llama", path)
    llm = LLM(str(path), **COMMON, tensor_parallel_size=2, distributed_timeout=5)
    victim = llm.engine.runner.procs[0]
    outcome: list[BaseException | str] = []

    def generate() -> None:
        try:
            llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)
            outcome.append("finished")
        except BaseException as exc:  # noqa: BLE001 - recorded for the assertion
            outcome.append(exc)

    try:
        os.kill(victim.pid, signal.SIGSTOP)
        thread = threading.Thread(target=generate, daemon=True)
        thread.start()
        thread.join(60)
        assert outcome, "generate() still waiting 60 s after rank 0 hung (distributed_timeout=5)"
        assert isinstance(outcome[0], EngineDeadError)
    finally:
        if victim.is_alive():
            os.kill(victim.pid, signal.SIGKILL)
        thread.join(30)
        llm.shutdown()

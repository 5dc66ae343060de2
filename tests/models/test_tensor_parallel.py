"""Tensor-parallel layers: two gloo ranks, each holding half the heads, half of every MLP and
half the vocabulary, compute the logits of one process (float and packed weights)."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kvforge.errors import InvalidRequestError
from kvforge.layers.attention import create_attention_backend
from kvforge.layers.forward_batch import ForwardBatch
from kvforge.layers.kv_cache import PagedKVCache
from kvforge.loader.hf_loader import iter_hf_weights, read_hf_config
from kvforge.models.common import DecoderLM
from kvforge.models.registry import family_for_hf
from kvforge.parallel import TensorParallel, shard_range
from kvforge.quant.rtn import quantize_rtn
from tests.models.tiny_checkpoints import VOCAB, write_checkpoint

pytest.importorskip("transformers")

WORLD = 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _logits(model: DecoderLM, num_kv_heads: int, head_dim: int, ids: list[int]) -> torch.Tensor:
    """Prefill 23 tokens, then the rest one chunk at a time over a paged cache."""
    cpu = torch.device("cpu")
    kv = [
        PagedKVCache.allocate(16, 4, num_kv_heads, head_dim, torch.float32, cpu)
        for _ in model.layers
    ]
    blocks = list(range(14))
    with torch.inference_mode():
        first = model(ForwardBatch.build([ids[:23]], [0], [blocks], 4, cpu), kv)
        second = model(ForwardBatch.build([ids[23:]], [23], [blocks], 4, cpu), kv)
        return model.compute_logits(torch.cat([first, second]))


def _build(path: str, tp: TensorParallel | None, packed: bool) -> tuple[DecoderLM, int, int]:
    """The model of ``path`` built for ``tp`` (each rank loads its shards of the full files);
    ``packed``: int8 weights in groups of 32 columns, quantized as they stream in."""
    hf = read_hf_config(path)
    family = family_for_hf(hf["architectures"][0])
    cfg = family.config_from_hf(hf)
    weights = iter_hf_weights(path, family)
    if packed:
        weights = (
            (
                name,
                quantize_rtn(value, "int8", 32, True) if name.endswith("_proj.weight") else value,
            )
            for name, value in weights
        )
    with torch.device("meta"):
        model = DecoderLM(cfg, create_attention_backend(), tp)
    model = model.to_empty(device="cpu")
    model.load_weights(weights)
    size = tp.size if tp is not None else 1
    return model.eval(), cfg.num_kv_heads // size, cfg.head_dim


def _rank_main(rank: int, port: int, path: str, packed: bool, ids: list[int], out: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        torch.set_num_threads(1)
        model, kv_heads, head_dim = _build(path, TensorParallel(rank, WORLD), packed)
        logits = _logits(model, kv_heads, head_dim, ids)
        if rank == 0:
            torch.save(logits, out)
    finally:
        dist.destroy_process_group()


def _run_ranks(path: str, packed: bool, ids: list[int], out: str) -> torch.Tensor:
    context = mp.get_context("spawn")
    port = _free_port()
    procs = [
        context.Process(target=_rank_main, args=(r, port, path, packed, ids, out))
        for r in range(WORLD)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
        assert p.exitcode == 0, f"rank exited with {p.exitcode}"
    return torch.load(out)


@pytest.mark.parametrize(
    ("arch", "packed"),  # llama: untied head; qwen2: tied head, q/k/v bias
    [
        ("llama", False),
        pytest.param("qwen2", False, marks=pytest.mark.slow),
        pytest.param("llama", True, marks=pytest.mark.slow),
        pytest.param("qwen2", True, marks=pytest.mark.slow),
    ],
)
def test_two_ranks_equal_one_process(tmp_path, arch, packed):
    """Float weights, and packed int8 blocks (column-parallel layers split them by rows,
    row-parallel ones by whole column groups)."""
    directory = tmp_path / arch
    write_checkpoint(arch, directory)
    torch.manual_seed(7)
    ids = torch.randint(3, VOCAB, (40,)).tolist()
    model, kv_heads, head_dim = _build(str(directory), None, packed)
    single = _logits(model, kv_heads, head_dim, ids)
    split = _run_ranks(str(directory), packed, ids, str(tmp_path / "tp.pt"))
    error = (split - single).abs().max().item()
    assert error <= (1e-3 * single.abs().max().item() if packed else 1e-4), error


def test_sizes_must_divide():
    with pytest.raises(InvalidRequestError, match="tensor-parallel size 3"):
        shard_range(4, 0, 3, "attention heads")

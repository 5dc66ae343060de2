"""GPTQ, AWQ and round-to-nearest (``kvforge quantize --method``): the algorithms, the
checkpoints they write, and their quality against each other on a tiny model."""

from __future__ import annotations

import json
import random

import pytest
import torch

from kvforge.errors import InvalidRequestError, KVForgeError
from kvforge.layers.quantization import PermutedMethod
from kvforge.quant.gptq import Grid, awq_scales, gptq, quantize_rtn_grid
from kvforge.tools.calibrated import quantize_calibrated
from kvforge.tools.perplexity import make_runner
from tests.models.tiny_checkpoints import WORDS, write_checkpoint


def _correlated_inputs(n: int, cols: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=generator) / cols**0.5
    scale = torch.rand(cols, generator=generator) * 4 + 0.1  # some channels matter more
    return (torch.randn(n, cols, generator=generator) @ mix + 0.3) * scale


def test_gptq_with_an_identity_hessian_is_round_to_nearest():
    torch.manual_seed(0)
    w = torch.randn(24, 64)
    grid = Grid(4, 32, True)
    codes = gptq(w, torch.eye(64), grid, damp=0.0)
    assert torch.equal(codes.codes, quantize_rtn_grid(w, grid).codes)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_lowers_the_output_error(act_order):
    torch.manual_seed(1)
    w = torch.randn(48, 128)
    x = _correlated_inputs(512, 128)
    grid = Grid(4, 32, True)
    codes = gptq(w, x.T @ x, grid, act_order=act_order)
    rtn = quantize_rtn_grid(w, grid)
    error = (x @ (w - codes.dequantize()).T).pow(2).mean()
    baseline = (x @ (w - rtn.dequantize()).T).pow(2).mean()
    assert error < 0.7 * baseline
    if act_order:  # groups follow the visiting order, not the column order
        assert not torch.equal(codes.g_idx, torch.arange(128, dtype=torch.int32) // 32)
        assert torch.equal(torch.bincount(codes.g_idx.long()), torch.full((4,), 32))


def test_awq_scales_never_lose_to_round_to_nearest():
    torch.manual_seed(2)
    w = torch.randn(48, 128)
    x = _correlated_inputs(256, 128, seed=3)
    grid = Grid(4, 32, False)
    s, alpha = awq_scales(w, x, grid)
    fake = quantize_rtn_grid(w * s, grid).dequantize() / s
    rtn = quantize_rtn_grid(w, grid).dequantize()
    assert (x @ (w - fake).T).pow(2).mean() <= (x @ (w - rtn).T).pow(2).mean()
    assert 0 <= alpha < 1


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny float Llama, calibration text with structure, held-out text of the same kind."""
    folder = tmp_path_factory.mktemp("calibrated")
    write_checkpoint("llama", folder / "float")
    rng = random.Random(0)
    phrases = [" ".join(rng.choice(WORDS[5:]) for _ in range(6)) for _ in range(12)]
    text = " ".join(rng.choice(phrases) for _ in range(1200))
    held_out = " ".join(rng.choice(phrases) for _ in range(300))
    runner = make_runner(str(folder / "float"))
    ids = runner.loaded.tokenizer.encode(held_out)[:256]
    return folder, text, ids, runner.score(ids).log_softmax(-1)


def _kld(path, ids, reference, dtype="auto") -> float:  # type: ignore[no-untyped-def]
    logprobs = make_runner(str(path), dtype).score(ids).log_softmax(-1)
    return float((reference.exp() * (reference - logprobs)).sum(-1).mean())


def test_calibrated_methods_beat_round_to_nearest(tiny):
    folder, text, ids, reference = tiny
    klds = {}
    for name, method, options in [
        ("rtn", "rtn", {}),
        ("rtn-asym", "rtn", {"symmetric": False}),
        ("gptq", "gptq", {}),
        ("gptq-act-order", "gptq", {"act_order": True}),
        ("awq", "awq", {}),
    ]:
        out = folder / name
        config = quantize_calibrated(
            str(folder / "float"),
            out,
            method,
            text,
            group_size=32,
            ctx=128,
            show_progress=False,
            **options,
        )
        assert json.loads((out / "config.json").read_text())["quantization_config"] == config
        klds[name] = _kld(out, ids, reference)
        # the packed kernels compute what the dequantized weights compute
        assert abs(_kld(out, ids, reference, "float32") - klds[name]) < 0.01
    print(klds)
    assert klds["gptq"] < klds["rtn"] and klds["gptq-act-order"] < klds["rtn"]
    assert klds["awq"] < klds["rtn-asym"]
    act_order = make_runner(str(folder / "gptq-act-order"), "auto").loaded.model
    assert isinstance(act_order.layers[0].mlp.down_proj.quant, PermutedMethod)


def test_written_checkpoints_serve_like_any_other(tiny):
    folder, text, _, _ = tiny
    out = folder / "served"
    quantize_calibrated(
        str(folder / "float"), out, "gptq", text, group_size=32, ctx=128, show_progress=False
    )
    from kvforge import LLM, SamplingParams

    packed = LLM(str(out), num_blocks=32, block_size=4)
    dequantized = LLM(str(out), num_blocks=32, block_size=4, dtype="float32")
    assert packed.get_tokenizer().encode("w5 w6 w7") == [0, 5, 6, 7]  # BOS kept
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    ours = packed.generate(["w5 w6 w7"], params)[0].outputs[0]
    assert len(ours.token_ids) == 8
    assert dequantized.generate(["w5 w6 w7"], params)[0].outputs[0].text == ours.text


def test_bad_calibrated_requests(tiny, tmp_path):
    folder, text, _, _ = tiny
    source = str(folder / "float")
    with pytest.raises(InvalidRequestError, match="method"):
        quantize_calibrated(source, tmp_path / "a", "squeeze", text, show_progress=False)
    with pytest.raises(InvalidRequestError, match="4-bit"):
        quantize_calibrated(source, tmp_path / "b", "awq", text, bits=8, show_progress=False)
    with pytest.raises(InvalidRequestError, match="bits"):
        quantize_calibrated(source, tmp_path / "c", "gptq", text, bits=3, show_progress=False)
    with pytest.raises(InvalidRequestError, match="asymmetric"):
        quantize_calibrated(
            source, tmp_path / "d", "awq", text, symmetric=True, show_progress=False
        )
    with pytest.raises(InvalidRequestError, match="group size 48"):
        quantize_calibrated(source, tmp_path / "e", "rtn", text, group_size=48, show_progress=False)
    with pytest.raises(InvalidRequestError, match="output folder"):
        quantize_calibrated(source, tmp_path / "no" / "f", "rtn", text, show_progress=False)
    with pytest.raises(KVForgeError, match="fewer than one chunk"):
        quantize_calibrated(
            source, tmp_path / "g", "gptq", "w5", group_size=32, ctx=128, show_progress=False
        )

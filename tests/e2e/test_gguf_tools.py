"""kvforge quantize / imatrix / perplexity / convert, end to end through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from gguf.quants import dequantize as gguf_dequantize

from kvforge.entrypoints.cli import main
from kvforge.entrypoints.llm import LLM
from kvforge.quant import QT, dequantize
from kvforge.quant.imatrix import read_imatrix
from kvforge.quant.mixes import tensor_type
from kvforge.sampling_params import SamplingParams
from kvforge.tools.text import machine_text


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gguf-tools")


@pytest.fixture(scope="module")
def f32_source(workdir: Path, smollm_path: str) -> Path:
    """The embedded model dequantized to an F32 GGUF."""
    path = workdir / "smollm-f32.gguf"
    assert main(["quantize", smollm_path, str(path), "F32"]) == 0
    return path


@pytest.fixture(scope="module")
def texts(workdir: Path) -> tuple[Path, Path]:
    calibration, evaluation = workdir / "calibration.txt", workdir / "evaluation.txt"
    calibration.write_text(machine_text("calibration", 8000))
    evaluation.write_text(machine_text("evaluation", 8000))
    return calibration, evaluation


def _types(path: Path) -> dict[str, QT]:
    return {t.name: t.tensor_type for t in GGUFReader(str(path)).tensors}


def test_quantize_follows_the_mix_and_round_trips(workdir, f32_source):
    out = workdir / "q4km.gguf"
    assert main(["quantize", str(f32_source), str(out), "Q4_K_M"]) == 0
    types = _types(out)
    assert types["blk.0.ffn_down.weight"] == QT.Q6_K  # more bits in the first eighth
    assert types["blk.4.ffn_down.weight"] == QT.Q4_K
    assert types["blk.4.attn_q.weight"] == QT.Q5_0  # rows of 576: K-quant fallback
    assert types["token_embd.weight"] == QT.Q8_0  # tied output: Q6_K, then its fallback
    assert types["output_norm.weight"] == QT.F32
    for name, qtype in types.items():
        expected = tensor_type(name, 1536 if "ffn_down" in name else 576, "Q4_K_M", 30, False)
        assert qtype == expected or qtype == QT.F32
    reader = GGUFReader(str(out))
    assert int(reader.fields["general.file_type"].contents()) == 15  # MOSTLY_Q4_K_M
    for tensor in reader.tensors[:12]:
        shape = tuple(int(d) for d in reversed(tensor.shape))
        ours = dequantize(torch.from_numpy(np.array(tensor.data)), tensor.tensor_type, shape)
        np.testing.assert_array_equal(
            ours.numpy(), gguf_dequantize(tensor.data, tensor.tensor_type).reshape(shape)
        )
    llm = LLM(str(out), show_progress=False, num_blocks=32)
    prompt = llm.get_tokenizer().encode_chat(
        [{"role": "user", "content": "Who wrote Romeo and Juliet?"}]
    )
    (output,) = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12))
    assert "Shakespeare" in output.outputs[0].text


def test_pure_and_overrides(workdir, f32_source):
    out = workdir / "q4_0-pure.gguf"
    args = ["quantize", str(f32_source), str(out), "Q4_0", "--pure", "--output-tensor-type", "q8_0"]
    assert main(args) == 0
    types = _types(out)
    assert types["token_embd.weight"] == QT.Q8_0
    assert {
        t for n, t in types.items() if n.endswith("_proj.weight") or ".attn_" in n or ".ffn_" in n
    } <= {
        QT.Q4_0,
        QT.F32,
    }


def test_imatrix_perplexity_and_kl_divergence(workdir, f32_source, texts, capsys):
    calibration, evaluation = texts
    imatrix = workdir / "imatrix.gguf"
    common = ["--ctx", "128", "--chunks", "4"]
    assert (
        main(
            ["imatrix", "-m", str(f32_source), "-f", str(calibration), "-o", str(imatrix), *common]
        )
        == 0
    )
    importance, meta = read_imatrix(imatrix)
    assert len(importance) == 30 * 7 and meta["imatrix.chunk_count"] == 4
    assert importance["blk.0.ffn_down.weight"].shape == (1536,)
    assert (importance["blk.0.attn_q.weight"] > 0).all()

    base = workdir / "base.logprobs"
    ppl = ["perplexity", "-f", str(evaluation), *common, "--kl-divergence-base", str(base)]
    assert main([*ppl[:1], "-m", str(f32_source), *ppl[1:]]) == 0
    capsys.readouterr()
    assert main([*ppl[:1], "-m", str(f32_source), *ppl[1:], "--kl-divergence"]) == 0
    same = capsys.readouterr().out
    assert "same top token: 100.00%" in same

    q2k = workdir / "q2k-imatrix.gguf"
    assert main(["quantize", str(f32_source), str(q2k), "Q2_K", "--imatrix", str(imatrix)]) == 0
    fields = GGUFReader(str(q2k)).fields
    assert fields["quantize.imatrix.file"].contents() == str(imatrix)
    assert main([*ppl[:1], "-m", str(q2k), *ppl[1:], "--kl-divergence"]) == 0
    out = capsys.readouterr().out
    kld = float(out.split("mean KL divergence: ")[1].split()[0])
    assert 0.01 < kld < 1.0, out


def test_bad_inputs_give_clear_errors(workdir, f32_source, capsys):
    assert main(["quantize", str(f32_source), str(workdir / "x.gguf"), "Q9_X"]) == 2
    assert "unknown type" in capsys.readouterr().err
    assert main(["perplexity", "-m", str(f32_source), "-f", str(workdir / "missing.txt")]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert main(["quantize", str(workdir / "missing.gguf"), str(workdir / "x.gguf"), "Q4_0"]) == 2
    assert "no GGUF file" in capsys.readouterr().err
    assert main(["convert", str(workdir), str(workdir / "x.gguf")]) == 2
    assert "config.json" in capsys.readouterr().err


def _hf_dir_from_gguf(gguf_path: str, directory: Path) -> None:
    """A Hugging Face directory holding the same model (safetensors, tokenizer, config)."""
    from safetensors.torch import save_file

    from kvforge.loader.gguf_loader import iter_gguf_weights, read_metadata
    from kvforge.models.llama import FAMILY
    from kvforge.tokenizer import tokenizer_from_gguf

    reader = GGUFReader(gguf_path)
    meta = read_metadata(reader)
    cfg = FAMILY.config_from_gguf(meta)
    tensors = {
        name: value.contiguous()
        for name, value in iter_gguf_weights(reader, FAMILY, cfg.num_heads, cfg.num_kv_heads, False)
    }
    save_file(tensors, str(directory / "model.safetensors"))
    hf = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": True,
    }
    (directory / "config.json").write_text(json.dumps(hf))
    tokenizer = tokenizer_from_gguf(meta)
    tokenizer.backend.save(str(directory / "tokenizer.json"))
    tok_config = {
        "bos_token": tokenizer.token_text(tokenizer.bos_token_id),
        "eos_token": tokenizer.token_text(tokenizer.eos_token_id),
        "add_bos_token": tokenizer.add_bos_token,
        "chat_template": tokenizer.chat_template,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(tok_config))


def test_convert_hf_directory(workdir, smollm, smollm_path):
    from kvforge.entrypoints.llm import engine_config
    from kvforge.runner import ModelRunner

    hf_dir = workdir / "SmolLM2-hf"
    hf_dir.mkdir()
    _hf_dir_from_gguf(smollm_path, hf_dir)
    out = workdir / "converted-f32.gguf"
    assert main(["convert", str(hf_dir), str(out), "--outtype", "f32"]) == 0
    converted = LLM(str(out), dtype="float32", show_progress=False, num_blocks=16)
    tokenizer = converted.get_tokenizer()
    text = "Converting 1234 tokens: déjà vu!"
    assert tokenizer.encode(text) == smollm.tokenizer.encode(text)
    assert tokenizer.chat_template == smollm.tokenizer.chat_template
    ids = smollm.tokenizer.encode("The quick brown fox jumps over the lazy dog.")
    ours = converted.engine.runner.score(ids)
    reference = ModelRunner(
        engine_config(smollm_path, num_blocks=16, show_progress=False), smollm
    ).score(ids)
    assert (ours - reference).abs().max() < 1e-3
    for outtype, matrix in (("f16", QT.F16), ("q8_0", QT.Q8_0)):
        path = workdir / f"converted-{outtype}.gguf"
        assert main(["convert", str(hf_dir), str(path), "--outtype", outtype]) == 0
        assert _types(path)["blk.0.attn_q.weight"] == matrix

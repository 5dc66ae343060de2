"""Write tiny GPTQ (v1 / AutoGPTQ layout) and AWQ (GEMM layout) Llama checkpoints with the
real quantizers, GPTQModel and AutoAWQ, plus reference logits from those tools' own loaders.

The two tools need incompatible environments (GPTQModel 7.x wants transformers 5, AutoAWQ 0.2.9
only works with transformers 4.x), so the script has one mode per tool, each run in its own
scratch virtual environment (CPU only is fine; everything is tiny):

    # GPTQModel: writes gptq-v1-desc-act/ and gptq-v1-asym-8bit/
    python -m venv /tmp/gq && /tmp/gq/bin/pip install gptqmodel==7.7.0
    /tmp/gq/bin/python tests/data/quantized/make_gptq_fixtures.py gptq

    # AutoAWQ: writes awq-gemm/ (autoawq 0.2.9 is an sdist whose requirements leave
    # transformers unpinned, which would pull transformers 5 that it cannot run with, so it is
    # installed without dependencies on top of a transformers-4.51 environment)
    python -m venv /tmp/awq && /tmp/awq/bin/pip install torch "transformers==4.51.3" \
        "tokenizers<0.22" "accelerate<1.8" "huggingface_hub<0.31" safetensors "datasets<3.7" zstandard
    /tmp/awq/bin/pip install --no-deps autoawq==0.2.9
    /tmp/awq/bin/python tests/data/quantized/make_gptq_fixtures.py awq

Run from the repository root (or anywhere: the script puts the repository root on sys.path).
Each mode takes under a minute on 2 CPU cores. The packed weights are reproducible byte for
byte; the reference files differ between runs only in the order of its metadata keys.

Workarounds for a CPU-only machine, each commented where it is applied:
  * GPTQMODEL_CPU_WORKERS=2 is set before gptqmodel is imported (its thread pool otherwise
    refuses to start on 2 cores);
  * AutoAWQ's quantize() runs with apply_clip=False (its clip search needs out_features % 64
    == 0, and v_proj/k_proj have 32 outputs here);
  * AutoAWQ's from_quantized() is kept off its IPEX and triton kernels, so the reference comes
    from its WQLinear_GEMM pure-torch path, which computes every quantized Linear in float16.

Each folder is the 2-layer random Llama of tests/models/tiny_checkpoints.py (hidden 64,
intermediate 128, vocab 96, word-level tokenizer) quantized on random calibration tokens
(32 samples of 48 ids in [5, 96), torch.Generator seed 1) and saved by the tool itself:

    gptq-v1-desc-act/   GPTQModel, bits 4, group 32, desc_act (act-order, permuted g_idx), sym,
                        checkpoint_format "gptq" (v1: zero points stored minus one)
    gptq-v1-asym-8bit/  GPTQModel, bits 8, group 64, no act-order, asymmetric, format "gptq"
    awq-gemm/           AutoAWQ, w_bit 4, q_group_size 32, zero_point, version GEMM

The tokenizer files of the float checkpoint are copied over the ones the tools re-save, and the
tools' side files that a loader does not need (quant_log.csv, chat_template.jinja) are dropped.

Each folder gets <folder>.reference.safetensors beside it: input_ids (int64 [1, 7]) and logits (float32 [1, 7, 96])
of the quantized model as loaded back from the folder by the tool's own loader on CPU; the
metadata says which tool, version, backend and dtype. The tools' CPU kernels only accept
float16/bfloat16 at load time, so the model is loaded in float16 and then cast with
``.float()`` (scales, norms and embeddings are float16 values, exact in float32); the packed
integers are untouched, so the GPTQ logits are the tool's own dequantize-and-matmul in float32.
AutoAWQ's WQLinear_GEMM always casts its input to float16, so in awq-gemm/ the quantized
Linears run in float16 (everything else in float32): a float32 loader differs from those
logits by about 1.5e-2 at most, one that rounds the Linear input and weight to float16 matches
them exactly.

Finally every mode checks this file's pure-torch dequantization (``dequantize_gptq_v1`` /
``dequantize_awq_gemm``) against the reference: a plain transformers LlamaForCausalLM with the
folder's unquantized tensors and the dequantized Linear weights must give the same logits.

Packing conventions (confirmed by that check):

GPTQ v1 (AutoGPTQ / GPTQModel "gptq" format), for a Linear with in_features I, out_features O,
bits b, pack factor p = 32 // b (b in 2, 4, 8):
    qweight int32 [I // p, O]   packed along the input dim: input row i lives in word i // p,
                                bits (i % p) * b .. + b, least significant first.
    qzeros  int32 [G, O // p]   packed along the output dim the same way (output o in word
                                o // p, bits (o % p) * b); the stored value is zero - 1 (v1),
                                subtracted on the whole 32-bit word, so decode by adding
                                0x11111111 (b=4) / 0x01010101 (b=8) to the word, then unpacking.
    scales  fp16  [G, O]
    g_idx   int32 [I]           group of each input channel (in the original input order; with
                                desc_act it is a permutation-derived, non-monotonic map, the
                                qweight rows are NOT reordered).
    W[o, i] = scales[g_idx[i], o] * (q[i, o] - zero[g_idx[i], o]); symmetric checkpoints store
    zero = 2**(b-1) (so qzeros words are 0x77777777 for b=4).
AWQ GEMM (AutoAWQ): qweight int32 [I, O // 8], qzeros int32 [I // g, O // 8], scales fp16
    [I // g, O]; packed along the output dim with the nibble order [0, 2, 4, 6, 1, 3, 5, 7]
    (nibble k of a word holds output 8 * word + ORDER[k]); zeros stored as is (no minus one);
    W[o, i] = scales[i // g, o] * (q[i, o] - zero[i // g, o]).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

# GPTQModel sizes its CPU thread pool to (cpu_count + 1) // 2 workers, but always asks for a
# 2-worker "model_loader:cpu" sub-pool; on a 2-core machine that is 1 < 2 and GPTQModel.load
# raises "Virtual pool 'model_loader:cpu' requests 2 workers but parent 'cpu' only has 1".
# GPTQMODEL_CPU_WORKERS (read in gptqmodel/__init__.py) overrides the CPU pool size; it must be
# set before gptqmodel is imported.
if int(os.environ.get("GPTQMODEL_CPU_WORKERS", "0") or 0) < 2:
    os.environ["GPTQMODEL_CPU_WORKERS"] = "2"

import torch
from safetensors import safe_open
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
sys.path.insert(0, str(ROOT))

from tests.models.tiny_checkpoints import VOCAB, write_checkpoint  # noqa: E402

INPUT_IDS = [[0, 5, 17, 33, 60, 90, 12]]
CALIB_SAMPLES, CALIB_LEN, CALIB_SEED = 32, 48, 1
KEEP_TOKENIZER = ("tokenizer.json", "tokenizer_config.json")
DROP = ("quant_log.csv", "chat_template.jinja")
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def calibration() -> list[list[int]]:
    g = torch.Generator().manual_seed(CALIB_SEED)
    return [
        torch.randint(5, VOCAB, (CALIB_LEN,), generator=g).tolist() for _ in range(CALIB_SAMPLES)
    ]


# --------------------------------------------------------------------------- pure-torch dequant


def unpack_int32(
    packed: torch.Tensor, bits: int, dim: int, order: list[int] | None = None
) -> torch.Tensor:
    """Unpack int32 words into bits-wide unsigned fields along ``dim`` (field k at bit k * bits,
    least significant first); ``order[k]`` gives the position within the word's group of
    outputs that field k holds (AWQ's interleave), identity when None."""
    per = 32 // bits
    words = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(per, dtype=torch.int64) * bits
    fields = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [..., per]
    if order is not None:
        inverse = [order.index(j) for j in range(per)]
        fields = fields[..., inverse]
    fields = fields.movedim(-1, dim + 1) if dim != packed.dim() - 1 else fields
    shape = list(packed.shape)
    shape[dim] *= per
    return fields.reshape(shape)


def dequantize_gptq_v1(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
) -> torch.Tensor:
    """The float32 [out, in] weight of a GPTQ v1 (AutoGPTQ) quantized Linear."""
    q = unpack_int32(qweight, bits, dim=0)  # [in, out]
    ones = sum(1 << (k * bits) for k in range(32 // bits))  # 0x11111111 for 4 bits
    zwords = (qzeros.to(torch.int64) + ones) & 0xFFFFFFFF  # v1 stores zero - 1, word-wise
    z = unpack_int32(zwords, bits, dim=1)[:, : scales.shape[1]]  # [groups, out]
    g = g_idx.long()
    w = scales.float()[g] * (q.float() - z.float()[g])  # [in, out]
    return w.t().contiguous()


def dequantize_awq_gemm(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int
) -> torch.Tensor:
    """The float32 [out, in] weight of an AutoAWQ GEMM quantized Linear."""
    q = unpack_int32(qweight, bits, dim=1, order=AWQ_ORDER)  # [in, out]
    z = unpack_int32(qzeros, bits, dim=1, order=AWQ_ORDER)  # [groups, out]
    g = torch.arange(q.shape[0]) // group_size
    w = scales.float()[g] * (q.float() - z.float()[g])
    return w.t().contiguous()


def _check_v1_zero_borrow(qzeros: torch.Tensor, bits: int) -> bool:
    """True when decoding zeros field by field ((field + 1) & mask, as AutoGPTQ's kernels do)
    equals the word-wise decode, i.e. no stored zero - 1 borrowed from its neighbour."""
    ones = sum(1 << (k * bits) for k in range(32 // bits))
    word = unpack_int32((qzeros.to(torch.int64) + ones) & 0xFFFFFFFF, bits, dim=1)
    field = (unpack_int32(qzeros, bits, dim=1) + 1) & ((1 << bits) - 1)
    return bool(torch.equal(word, field))


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (not a dict)


def torch_logits(folder: Path, dequantize, half_linears: bool = False) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """Float32 logits of a plain transformers LlamaForCausalLM built from the folder's config
    (quantization_config dropped), its unquantized tensors and ``dequantize(prefix, tensors)``
    for every quantized Linear; ``half_linears`` runs those Linears as AutoAWQ's WQLinear_GEMM
    does (input and weight rounded to float16, float16 matmul, output back to float32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = json.loads((folder / "config.json").read_text())
    config.pop("quantization_config", None)
    config["torch_dtype"] = config["dtype"] = "float32"
    model = LlamaForCausalLM(LlamaConfig(**config)).float().eval()
    tensors = {}
    for path in sorted(folder.glob("model*.safetensors")):
        tensors.update(read_tensors(path))
    state = {}
    prefixes = sorted({k.rsplit(".", 1)[0] for k in tensors if k.endswith(".qweight")})
    for prefix in prefixes:
        state[prefix + ".weight"] = dequantize(prefix, tensors)
    for key, value in tensors.items():
        if key.rsplit(".", 1)[0] not in prefixes:
            state[key] = value.float()
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if "rotary" not in k]
    assert not missing and not unexpected, (missing, unexpected)
    if half_linears:
        for prefix in prefixes:
            linear = model.get_submodule(prefix)
            linear.half()
            linear.forward = lambda x, m=linear: torch.nn.functional.linear(
                x.half(), m.weight, m.bias
            ).float()
    with torch.no_grad():
        return model(torch.tensor(INPUT_IDS)).logits.float()


def finish_folder(out: Path, float_dir: Path) -> None:
    for name in KEEP_TOKENIZER:
        shutil.copy(float_dir / name, out / name)
    for name in DROP:
        (out / name).unlink(missing_ok=True)
    for path in out.iterdir():
        path.chmod(0o644)


def write_reference(out: Path, logits: torch.Tensor, metadata: dict[str, str]) -> None:
    save_file(
        {
            "input_ids": torch.tensor(INPUT_IDS, dtype=torch.int64),
            "logits": logits.float().contiguous(),
        },
        str(reference_path(out)),
        metadata=metadata,
    )
    reference_path(out).chmod(0o644)


def reference_path(out: Path) -> Path:
    """Next to the folder, not in it: a loader takes every *.safetensors inside as weights."""
    return out.parent / f"{out.name}.reference.safetensors"


def report(
    out: Path, ref: torch.Tensor, mine: torch.Tensor, extra: str = "", tol: float = 1e-3
) -> None:
    diff = (ref - mine).abs().max().item()
    size = sum(p.stat().st_size for p in out.iterdir())
    print(
        f"{out.name}: {size / 1024:.0f} KiB, pure-torch dequant vs tool logits max|diff| = {diff:.3g} {extra}"
    )
    assert diff < tol, diff


# --------------------------------------------------------------------------- GPTQModel

GPTQ_FIXTURES = {
    "gptq-v1-desc-act": dict(bits=4, group_size=32, desc_act=True, sym=True),
    "gptq-v1-asym-8bit": dict(bits=8, group_size=64, desc_act=False, sym=False),
}


def make_gptq(work: Path) -> None:
    import gptqmodel
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig

    float_dir = work / "float"
    shutil.rmtree(float_dir, ignore_errors=True)
    write_checkpoint("llama", float_dir)
    calib = [{"input_ids": ids, "attention_mask": [1] * len(ids)} for ids in calibration()]

    for name, params in GPTQ_FIXTURES.items():
        out = HERE / name
        shutil.rmtree(out, ignore_errors=True)
        cfg = QuantizeConfig(format="gptq", offload_to_disk=False, **params)
        model = GPTQModel.load(str(float_dir), cfg, device="cpu", dtype=torch.float16)
        model.quantize(calib, batch_size=4)
        model.save(str(out))
        del model
        finish_folder(out, float_dir)
        qc = json.loads((out / "config.json").read_text())["quantization_config"]
        assert qc["quant_method"] == "gptq" and qc["checkpoint_format"] == "gptq", qc
        assert qc["sym"] == params["sym"] and qc["desc_act"] == params["desc_act"], qc

        # reference: the tool's own loader and torch kernel, on CPU
        loaded = GPTQModel.load(
            str(out), device="cpu", backend=BACKEND.GPTQ_TORCH, dtype=torch.float16
        )
        kernels = {type(m).__name__ for m in loaded.model.modules() if hasattr(m, "qweight")}
        hf = loaded.model.float().eval()
        with torch.no_grad():
            logits = hf(torch.tensor(INPUT_IDS)).logits.float()
        del loaded, hf
        write_reference(
            out,
            logits,
            {
                "tool": "gptqmodel",
                "version": gptqmodel.__version__,
                "torch": torch.__version__,
                "backend": f"{BACKEND.GPTQ_TORCH.value} ({', '.join(sorted(kernels))}) on cpu",
                "dtype": "loaded float16, model cast to float32 before the forward",
                "quantize": json.dumps(params),
            },
        )

        bits = params["bits"]

        def deq(prefix: str, t: dict, bits: int = bits) -> torch.Tensor:
            return dequantize_gptq_v1(
                t[prefix + ".qweight"],
                t[prefix + ".qzeros"],
                t[prefix + ".scales"],
                t[prefix + ".g_idx"],
                bits,
            )

        mine = torch_logits(out, deq)
        tensors = read_tensors(out / "model.safetensors")
        qz = [v for k, v in tensors.items() if k.endswith(".qzeros")]
        gi = [v for k, v in tensors.items() if k.endswith(".g_idx")]
        no_borrow = all(_check_v1_zero_borrow(z, bits) for z in qz)
        monotonic = all(bool((g[1:] >= g[:-1]).all()) for g in gi)
        report(
            out,
            logits,
            mine,
            f"(field-wise zero decode agrees: {no_borrow}; g_idx monotonic: {monotonic})",
        )


# --------------------------------------------------------------------------- AutoAWQ


def make_awq(work: Path) -> None:
    import awq
    from awq import AutoAWQForCausalLM
    from transformers import AutoTokenizer

    float_dir = work / "float-awq"
    shutil.rmtree(float_dir, ignore_errors=True)
    write_checkpoint("llama", float_dir)
    quant_config = {"zero_point": True, "q_group_size": 32, "w_bit": 4, "version": "GEMM"}
    out = HERE / "awq-gemm"
    shutil.rmtree(out, ignore_errors=True)

    model = AutoAWQForCausalLM.from_pretrained(
        str(float_dir), torch_dtype=torch.float16, device_map="cpu"
    )
    tokenizer = AutoTokenizer.from_pretrained(str(float_dir))
    model.quantize(
        tokenizer,
        quant_config=quant_config,
        calib_data=calibration(),
        max_calib_samples=CALIB_SAMPLES,
        max_calib_seq_len=CALIB_LEN,
        # AutoAWQ's clipping search (_compute_best_clip) asserts out_features % 64 == 0, and this
        # model's v_proj has 32 outputs (2 KV heads x 16), so the clip step is turned off; the
        # scale search and the GEMM packing are unchanged
        apply_clip=False,
    )
    model.save_quantized(str(out))
    del model
    finish_folder(out, float_dir)

    # AutoAWQ's loader on a CPU-only machine: from_quantized forces its IPEX kernel when
    # get_best_device() == "cpu" (intel_extension_for_pytorch, which needs its own exact torch
    # build), and WQLinear_GEMM prefers its triton kernels whenever triton imports (GPU only).
    # Two patches keep AutoAWQ's own GEMM module with its pure-torch path (awq_ext absent:
    # awq.utils.packing_utils.dequantize_gemm + matmul): get_best_device is only consulted there
    # for the IPEX choice and layer fusion (off), and the triton flag is switched off.
    import awq.models.base as awq_base
    import awq.modules.linear.gemm as awq_gemm

    awq_base.get_best_device = lambda: "cuda:0"
    awq_gemm.TRITON_AVAILABLE = False
    loaded = AutoAWQForCausalLM.from_quantized(
        str(out), device_map={"": "cpu"}, fuse_layers=False, torch_dtype=torch.float16
    )
    qlinears = [m for m in loaded.model.modules() if isinstance(m, awq_gemm.WQLinear_GEMM)]
    assert len(qlinears) == 14, len(qlinears)
    kernels = {type(m).__name__ for m in qlinears}
    # everything in float32 except the WQLinear_GEMM modules, whose forward always casts its
    # input to float16 and dequantizes with float16 scales (the output is cast back)
    hf = loaded.model.float().eval()
    for m in qlinears:
        m.scales = m.scales.half()
        if m.bias is not None:
            m.bias = m.bias.half()
    with torch.no_grad():
        logits = hf(torch.tensor(INPUT_IDS)).logits.float()
    del loaded, hf
    write_reference(
        out,
        logits,
        {
            "tool": "autoawq",
            "version": awq.__version__,
            "torch": torch.__version__,
            "backend": f"{', '.join(sorted(kernels))} pure-torch path (dequantize_gemm + matmul, no awq_ext,"
            " triton and IPEX bypassed) on cpu",
            "dtype": "loaded float16, model cast to float32 except the WQLinear_GEMM modules, which"
            " compute in float16 (their forward casts the input to float16) and return float32",
            "quantize": json.dumps(quant_config),
        },
    )

    def deq(prefix: str, t: dict) -> torch.Tensor:
        return dequantize_awq_gemm(
            t[prefix + ".qweight"], t[prefix + ".qzeros"], t[prefix + ".scales"], 4, 32
        )

    # the weights must equal AutoAWQ's own dequantize_gemm bit for bit
    from awq.utils.packing_utils import dequantize_gemm

    tensors = read_tensors(out / "model.safetensors")
    for prefix in sorted(k[: -len(".qweight")] for k in tensors if k.endswith(".qweight")):
        theirs = dequantize_gemm(
            tensors[prefix + ".qweight"],
            tensors[prefix + ".qzeros"],
            tensors[prefix + ".scales"].float(),
            4,
            32,
        )
        assert torch.equal(theirs.t(), deq(prefix, tensors)), prefix
    # float32 Linears differ from the reference by its float16 Linears; emulating those matches
    fp32 = (logits - torch_logits(out, deq)).abs().max().item()
    report(
        out,
        logits,
        torch_logits(out, deq, half_linears=True),
        f"(with float32 Linears: {fp32:.3g})",
        tol=2e-3,
    )


if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else ""
    if mode not in ("gptq", "awq"):
        sys.exit("usage: make_gptq_fixtures.py gptq|awq  (see the header for the venvs)")
    import tempfile

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        (make_gptq if mode == "gptq" else make_awq)(Path(tmp))

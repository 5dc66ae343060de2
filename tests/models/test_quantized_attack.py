"""Hostile inputs for quantized checkpoints, ``--quantization fp8``, ``kvforge quantize
--method`` and ``finetune --qat``: corrupted copies of the fixtures in tests/data/quantized
must fail in one typed line naming the file and tensor (never a raw torch / Python error, never
silently wrong weights), and correct inputs must give the results of the float reference.

Tests marked ``# BUG:`` fail on the code they were written against.
"""

from __future__ import annotations

import contextlib
import io
import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kvforge import LLM, LoRARequest, SamplingParams
from kvforge.config import ModelConfig
from kvforge.entrypoints.cli import main
from kvforge.errors import InvalidRequestError, KVForgeError, ModelFileError
from kvforge.layers.attention import create_attention_backend
from kvforge.layers.quantization import Fp8Method
from kvforge.loader import load_model
from kvforge.quant.gptq import Grid, quantize_rtn_grid
from kvforge.tools.calibrated import gptq_tensors, quantize_calibrated
from kvforge.tools.finetune import FinetuneConfig, finetune
from tests.models.test_quantized_checkpoints import PACKED_TOLERANCE, PROMPT, logits
from tests.models.tiny_checkpoints import WORDS, write_checkpoint

DATA = Path(__file__).parent.parent / "data" / "quantized"
Q_PROJ = "model.layers.0.self_attn.q_proj"
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
Tensors = dict[str, torch.Tensor]


def _variant(
    tmp_path: Path,
    name: str,
    tensors: Callable[[Tensors], object] | None = None,
    config: Callable[[dict], object] | None = None,
) -> Path:
    """A copy of fixture ``name`` with its tensors and / or quantization_config edited."""
    folder = tmp_path / name
    shutil.copytree(DATA / name, folder)
    if tensors is not None:
        values = load_file(folder / "model.safetensors")
        tensors(values)
        save_file(values, folder / "model.safetensors", {"format": "pt"})
    if config is not None:
        hf = json.loads((folder / "config.json").read_text())
        config(hf["quantization_config"])
        (folder / "config.json").write_text(json.dumps(hf))
    return folder


def _load(folder: Path, **options: object):  # type: ignore[no-untyped-def]
    return load_model(ModelConfig(model=str(folder), **options), create_attention_backend(), False)


def _file_error(folder: Path, *expected: str) -> str:
    """Loading fails with a one-line ModelFileError that contains each of ``expected``."""
    with pytest.raises(ModelFileError) as info:
        _load(folder)
    message = str(info.value)
    assert "\n" not in message
    for part in expected:
        assert part in message, message
    return message


def _set(name: str, value: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Tensors], None]:
    def edit(t: Tensors) -> None:
        t[name] = value(t[name]).contiguous()

    return edit


def _weights(cfg: Callable[[dict], object]) -> Callable[[dict], object]:
    """An edit of compressed-tensors' config_groups.group_0.weights."""
    return lambda q: cfg(q["config_groups"]["group_0"]["weights"])


# ---------------------------------------------------------------- corrupted tensors: BUGs


# BUG: a non-finite scale loads silently. The packed GPTQ / pack-quantized path even returns
# finite logits that differ from the checkpoint's (the C++ repack swallows the NaN; the
# dequantized float32 path returns NaN); FP8 returns NaN logits. Expected: ModelFileError
# naming the module and its scale tensor.
@pytest.mark.parametrize(
    "name, tensor",
    [
        ("gptq-v1-desc-act", "scales"),
        ("awq-gemm", "scales"),
        ("awq-w4a16-asym", "weight_scale"),
        ("fp8-dynamic", "weight_scale"),
    ],
)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_scales_are_refused(tmp_path, name, tensor, bad):
    def edit(t: Tensors) -> None:
        t[f"{Q_PROJ}.{tensor}"].view(-1)[0] = bad

    _file_error(_variant(tmp_path, name, edit), Q_PROJ)


# BUG: integer codes stored as floats (and scales stored as integers, g_idx with fractions)
# are cast and loaded: the logits come out different from the checkpoint's with no error.
# Expected: ModelFileError naming the module and the tensor's dtype.
@pytest.mark.parametrize(
    "name, tensor, dtype",
    [
        ("gptq-v1-desc-act", "qweight", torch.float32),
        ("gptq-v1-desc-act", "scales", torch.int32),
        ("awq-gemm", "qweight", torch.float32),
        ("awq-w4a16-asym", "weight_packed", torch.float32),
    ],
)
def test_mistyped_tensors_are_refused(tmp_path, name, tensor, dtype):
    folder = _variant(tmp_path, name, _set(f"{Q_PROJ}.{tensor}", lambda v: v.to(dtype)))
    _file_error(folder, Q_PROJ, tensor)


# BUG: a g_idx of floats with fractions is truncated to groups and loads silently.
def test_fractional_g_idx_is_refused(tmp_path):
    folder = _variant(
        tmp_path, "gptq-v1-desc-act", _set(f"{Q_PROJ}.g_idx", lambda v: v.float() + 0.5)
    )
    _file_error(folder, Q_PROJ, "g_idx")


# BUG: zero points whose shape does not match the scales end in a raw RuntimeError /
# IndexError from torch (GPTQ asym, AWQ, compressed-tensors' unpacked int8 zero points), or
# worse, broadcast silently (compressed-tensors' packed zero points with too few rows).
# Expected: ModelFileError naming the module and the zero-point tensor.
@pytest.mark.parametrize(
    "name, tensor, value",
    [
        ("gptq-v1-asym-8bit", "qzeros", lambda v: v[:, :4]),
        ("gptq-v1-asym-8bit", "qzeros", lambda v: torch.cat([v, v[:1]])),
        ("gptq-v1-asym-8bit", "qzeros", lambda v: v[0]),
        ("gptq-v1-desc-act", "qzeros", lambda v: v[0]),
        ("awq-gemm", "qzeros", lambda v: v[:, :4]),
        ("awq-gemm", "qzeros", lambda v: torch.cat([v, v[:1]])),
        ("awq-gemm", "qzeros", lambda v: v[0]),
        ("awq-w4a16-asym", "weight_zero_point", lambda v: v[:4]),
        ("awq-w4a16-asym", "weight_zero_point", lambda v: torch.zeros(64, 3, dtype=torch.int8)),
    ],
    ids=[
        "gptq-narrow",
        "gptq-extra-group",
        "gptq-1d",
        "gptq-sym-1d",
        "awq-narrow",
        "awq-extra-group",
        "awq-1d",
        "ct-packed-short",
        "ct-int8-groups",
    ],
)
def test_misshaped_zero_points_are_refused(tmp_path, name, tensor, value):
    _file_error(_variant(tmp_path, name, _set(f"{Q_PROJ}.{tensor}", value)), Q_PROJ)


# BUG: compressed-tensors scales whose element count is not a multiple of the output rows
# reach ``scale.reshape(out, -1)``: a raw RuntimeError "shape '[64, -1]' is invalid".
@pytest.mark.parametrize(
    "name, shape",
    [("awq-w4a16-asym", (63, 2)), ("int8-w8a8", (65, 1)), ("fp8-dynamic", (63, 1))],
)
def test_misshaped_compressed_scales_are_refused(tmp_path, name, shape):
    folder = _variant(tmp_path, name, _set(f"{Q_PROJ}.weight_scale", lambda v: torch.ones(shape)))
    _file_error(folder, Q_PROJ)


# BUG: zero-size tensors and a weight_shape with no columns end in ZeroDivisionError
# ("integer modulo by zero") or torch's "min(): Expected reduction dim" RuntimeError.
@pytest.mark.parametrize(
    "name, tensor, value",
    [
        ("gptq-v1-desc-act", "scales", lambda v: v[:0]),
        ("awq-gemm", "scales", lambda v: v[:0]),
        ("awq-w4a16-asym", "weight_scale", lambda v: v.reshape(-1)[:0]),
        ("fp8-dynamic", "weight_scale", lambda v: v.reshape(-1)[:0]),
        ("awq-w4a16-asym", "weight_shape", lambda v: torch.tensor([64, 0])),
        ("awq-w4a16-asym", "weight_shape", lambda v: torch.tensor([64, -64])),
    ],
    ids=["gptq-scales", "awq-scales", "ct-scale", "fp8-scale", "ct-shape-0", "ct-shape-neg"],
)
def test_empty_tensors_are_refused(tmp_path, name, tensor, value):
    _file_error(_variant(tmp_path, name, _set(f"{Q_PROJ}.{tensor}", value)), Q_PROJ)


# BUG: an int8 / FP8 compressed-tensors weight without its weight_scale is taken for a float
# weight: the raw codes load as weights (logits of another model) with no error. Expected:
# ModelFileError naming the module and weight_scale.
@pytest.mark.parametrize("name", ["int8-w8a8", "fp8-dynamic"])
def test_quantized_weight_without_its_scale_is_refused(tmp_path, name):
    folder = _variant(tmp_path, name, lambda t: t.pop(f"{Q_PROJ}.weight_scale"))
    _file_error(folder, Q_PROJ, "weight_scale")


# BUG: int-quantized codes outside int8's range (stored as int32 or float) wrap around in
# ``.to(torch.int8)`` (3 * 100 -> 44) and load silently. Expected: ModelFileError.
@pytest.mark.parametrize("dtype", [torch.int32, torch.float32])
def test_int_quantized_codes_out_of_range_are_refused(tmp_path, dtype):
    folder = _variant(tmp_path, "int8-w8a8", _set(f"{Q_PROJ}.weight", lambda v: v.to(dtype) * 3))
    _file_error(folder, Q_PROJ)


# BUG: a module with both a float ``weight`` and GPTQ ``qweight`` loads silently (one of the
# two is dropped). Expected: ModelFileError naming the module: the checkpoint is ambiguous.
def test_float_and_quantized_weight_for_one_module_is_refused(tmp_path):
    def edit(t: Tensors) -> None:
        t[f"{Q_PROJ}.weight"] = torch.zeros(64, 64, dtype=torch.float16)

    _file_error(_variant(tmp_path, "gptq-v1-desc-act", edit), Q_PROJ)


# BUG: num_bits 2 in the config of a 4-bit pack-quantized checkpoint: weight_packed [64, 8]
# holds 256 2-bit codes, the check only asks ">= 64 * 2 bits", and garbage weights load.
# Expected: ModelFileError (the packed width must be exactly ceil(cols * bits / 32)).
def test_num_bits_that_do_not_match_weight_packed_are_refused(tmp_path):
    folder = _variant(tmp_path, "awq-w4a16-asym", config=_weights(lambda w: w.update(num_bits=2)))
    _file_error(folder, "weight_packed")


# ------------------------------------------------------------- inconsistent configs: BUGs


# BUG: config lies that the decoder does not cross-check end in raw errors: strategy "tensor"
# over per-group scales (RuntimeError from reshape), symmetric true over a checkpoint with
# zero points (the zero points are still read: RuntimeError), type "int" over FP8 weights
# (NotImplementedError "round_vml_cpu" not implemented for 'Float8_e4m3fn').
@pytest.mark.parametrize(
    "name, edit",
    [
        ("awq-w4a16-asym", _weights(lambda w: w.update(strategy="tensor"))),
        ("awq-w4a16-asym", _weights(lambda w: w.update(symmetric=True))),
        ("fp8-dynamic", _weights(lambda w: w.update(type="int"))),
    ],
    ids=["tensor-over-groups", "symmetric-with-zero-points", "int-over-fp8"],
)
def test_config_that_contradicts_the_tensors_is_refused(tmp_path, name, edit):
    _file_error(_variant(tmp_path, name, config=edit))


# BUG: a "re:" target or ignore pattern that is not a valid regular expression raises a raw
# re.error. Expected: ModelFileError naming config.json and the field.
@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda q: q["config_groups"]["group_0"].update(targets=["re:(("]), "targets"),
        (lambda q: q.update(ignore=["re:[["]), "ignore"),
    ],
)
def test_bad_regular_expressions_name_the_field(tmp_path, edit, field):
    _file_error(_variant(tmp_path, "awq-w4a16-asym", config=edit), "config.json", field)


# BUG: quant_method "GPTQ" is refused as unsupported ("'GPTQ' is not supported (gptq, ...
# are)"), while vLLM lowercases quant_method and kvforge itself lowercases AWQ's "version".
def test_quant_method_is_case_insensitive(tmp_path):
    folder = _variant(tmp_path, "gptq-v1-desc-act", config=lambda q: q.update(quant_method="GPTQ"))
    expected = logits(DATA / "gptq-v1-desc-act", PROMPT[:12])
    assert torch.allclose(logits(folder, PROMPT[:12]), expected)


# BUG: a per-channel FP8 checkpoint (one scale per output row) cannot run with two tensor-
# parallel ranks: "a shard of 64 columns splits blocks of 128". A per-row scale is the same on
# both halves of a row, so the row-parallel split is exact (vLLM runs it). Expected: the
# greedy tokens of one process.
def test_per_channel_fp8_runs_tensor_parallel():
    prompts = [{"prompt_token_ids": [5, 9, 11, 23, 40, 7, 8, 12]}]

    def tokens(**options: object) -> list[int]:
        llm = LLM(str(DATA / "fp8-dynamic"), show_progress=False, num_blocks=32, **options)
        try:
            return llm.generate(prompts, GREEDY, use_tqdm=False)[0].outputs[0].token_ids
        finally:
            llm.shutdown()

    assert tokens(tensor_parallel_size=2) == tokens()


# ------------------------------------------------ corrupted tensors and configs: behave right


@pytest.mark.parametrize(
    "tensors, config, expected",
    [
        (_set(f"{Q_PROJ}.g_idx", lambda v: torch.full((64,), 5, dtype=torch.int32)), None, "g_idx"),
        (_set(f"{Q_PROJ}.g_idx", lambda v: -torch.ones(64, dtype=torch.int32)), None, "g_idx"),
        (_set(f"{Q_PROJ}.g_idx", lambda v: v[:63]), None, "g_idx"),
        (_set(f"{Q_PROJ}.g_idx", lambda v: v.reshape(8, 8)), None, "g_idx"),
        (
            _set(f"{Q_PROJ}.g_idx", lambda v: torch.tensor([0] * 40 + [1] * 24)),
            None,
            "unequal",
        ),
        (_set(f"{Q_PROJ}.qweight", lambda v: v[:4]), None, Q_PROJ),
        (_set(f"{Q_PROJ}.qweight", lambda v: v.reshape(-1)), None, Q_PROJ),
        (_set(f"{Q_PROJ}.scales", lambda v: torch.ones(3, 64, dtype=v.dtype)), None, "3 scale"),
        (_set(f"{Q_PROJ}.scales", lambda v: v[:, :32]), None, "scales"),
        (lambda t: t.pop(f"{Q_PROJ}.qzeros"), None, "qzeros missing"),
        (lambda t: t.update({f"{Q_PROJ}.bias": torch.zeros(64)}), None, "bias"),
        (None, lambda q: q.update(bits="4"), "quantization_config.bits"),
        (None, lambda q: q.update(bits=8), "do not match"),  # a lie the shapes catch
        (None, lambda q: q.update(group_size=0), "group_size"),
        (None, lambda q: q.update(group_size=-5), "group_size"),
        (None, lambda q: q.update(group_size=1e9), "group_size"),
        (None, lambda q: q.update(desc_act="true"), "desc_act"),
        (None, lambda q: q.update(modules_to_not_convert="lm_head"), "modules_to_not_convert"),
    ],
)
def test_gptq_corruptions_name_what_is_wrong(tmp_path, tensors, config, expected):
    _file_error(_variant(tmp_path, "gptq-v1-desc-act", tensors, config), expected)


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda q: q.update(ignore="lm_head"), "ignore"),
        (lambda q: q["config_groups"]["group_0"].update(targets=None), "targets"),
        (lambda q: q["config_groups"].update(group_0=[1]), "group_0 must be an object"),
        (_weights(lambda w: w.update(num_bits=0)), "num_bits 0"),
        (_weights(lambda w: w.update(num_bits=9)), "num_bits 9"),
        (_weights(lambda w: w.update(num_bits="4")), "num_bits"),
        (_weights(lambda w: w.update(num_bits=8)), "weight_packed"),
        (_weights(lambda w: w.update(group_size=0)), "group_size"),
        (_weights(lambda w: w.update(strategy="CHANNEL")), "strategy"),
        (_weights(lambda w: w.update(type=None)), "type"),
        (lambda q: q["config_groups"]["group_0"].update(format="int-quantized"), "weight"),
        (lambda q: q["config_groups"]["group_0"].update(targets=["re:.*mlp.*"]), "targets it"),
        (lambda q: q.update(quant_method=None), "quant_method"),
    ],
)
def test_compressed_tensors_config_errors_name_the_field(tmp_path, edit, expected):
    folder = _variant(tmp_path, "awq-w4a16-asym", config=edit)
    with pytest.raises(KVForgeError) as info:
        _load(folder)
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_fp8_weight_of_another_float_type_is_refused(tmp_path):
    folder = _variant(
        tmp_path, "fp8-static", _set(f"{Q_PROJ}.weight", lambda v: v.to(torch.float8_e5m2))
    )
    _file_error(folder, Q_PROJ, "float8_e5m2")


def test_act_order_embedding_is_refused(tmp_path):
    def edit(t: Tensors) -> None:
        w = t.pop("model.embed_tokens.weight").float()
        codes = quantize_rtn_grid(w, Grid(4, 32, True))
        shuffle = torch.randperm(64, generator=torch.Generator().manual_seed(0))
        codes.codes, codes.g_idx = codes.codes[:, shuffle], codes.g_idx[shuffle]
        t.update(gptq_tensors("model.embed_tokens", codes, 4))

    _file_error(_variant(tmp_path, "gptq-v1-desc-act", edit), "embed_tokens", "act-order")


def test_quantized_lm_head_loads_and_matches_its_codes(tmp_path):
    """GPTQModel's lm_head=True: the LM head's qweight decodes to the grid's own weights."""
    grid = Grid(4, 32, True)
    holder: dict[str, torch.Tensor] = {}

    def edit(t: Tensors) -> None:
        codes = quantize_rtn_grid(t.pop("lm_head.weight").float(), grid)
        holder["expected"] = codes.dequantize()
        t.update(gptq_tensors("lm_head", codes, 4))

    folder = _variant(tmp_path, "gptq-v1-desc-act", edit, lambda q: q.update(lm_head=True))
    head = dict(_load(folder, dtype="float32").model.named_parameters())["lm_head.weight"]
    assert torch.allclose(head.float(), holder["expected"], atol=1e-6)
    packed, dequantized = logits(folder, PROMPT), logits(folder, PROMPT, dtype="float32")
    assert (packed - dequantized).abs().max().item() <= PACKED_TOLERANCE


def test_act_order_checkpoint_under_tensor_parallel_fails_in_one_line():
    with pytest.raises(ModelFileError, match="act-order") as info:
        LLM(str(DATA / "gptq-v1-desc-act"), tensor_parallel_size=2, show_progress=False)
    assert "\n" not in str(info.value)


# ------------------------------------------------------------ serving features: behave right


def _adapter(tmp_path: Path, name: str) -> str:
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    hf = json.loads((DATA / name / "config.json").read_text())
    hf.pop("quantization_config")
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf))
    targets = ["q_proj", "v_proj", "down_proj"]
    model = peft.get_peft_model(
        base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    )
    model.save_pretrained(tmp_path / "adapter")
    return str(tmp_path / "adapter")


@pytest.mark.parametrize("name", ["gptq-v1-desc-act", "awq-gemm", "fp8-dynamic"])
def test_lora_on_quantized_checkpoints_matches_the_dequantized_model(tmp_path, name):
    adapter = LoRARequest("a", 1, _adapter(tmp_path, name))
    prompts = [{"prompt_token_ids": [5, 9, 11, 23, 40, 7, 8, 12]}]
    runs = {}
    for dtype in ("auto", "float32"):
        llm = LLM(
            str(DATA / name), enable_lora=True, max_lora_rank=8, num_blocks=32, dtype=dtype,
            show_progress=False,
        )  # fmt: skip
        with_lora = llm.generate(prompts, GREEDY, use_tqdm=False, lora_request=adapter)
        without = llm.generate(prompts, GREEDY, use_tqdm=False)
        runs[dtype] = (with_lora[0].outputs[0].token_ids, without[0].outputs[0].token_ids)
    assert runs["auto"] == runs["float32"]
    assert runs["auto"][0] != runs["auto"][1]  # the adapter changes the output


def test_quantized_draft_for_a_quantized_target_keeps_greedy_tokens():
    prompts = [{"prompt_token_ids": [5, 9, 11, 23, 40, 7, 8, 12]}, {"prompt_token_ids": [3, 4]}]
    target = str(DATA / "gptq-v1-desc-act")

    def tokens(**options: object) -> list[list[int]]:
        llm = LLM(target, num_blocks=64, show_progress=False, **options)
        return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]

    draft = str(DATA / "fp8-dynamic")
    assert tokens(speculative_model=draft, num_speculative_tokens=3) == tokens()


def test_fp8_on_load_with_bfloat16_activations(tmp_path):
    write_checkpoint("llama", tmp_path / "float")
    weights = dict(_load(tmp_path / "float", dtype="float32").model.named_parameters())
    packed = _load(tmp_path / "float", quantization="fp8").model
    methods = [
        (n, m.quant)
        for n, m in packed.named_modules()
        if isinstance(getattr(m, "quant", None), Fp8Method)
    ]
    assert len(methods) == 8  # every linear layer of both decoder layers
    for name, method in methods:
        w = method.codes.float() * method.scales.repeat_interleave(method.group, 1)
        reference = weights[f"{name}.weight"].float()
        # e4m3 steps are 32 in [256, 448]: at most 16/448 of the row's largest magnitude
        error = (w - reference).abs() / reference.abs().amax(-1, keepdim=True)
        assert error.max().item() <= 16 / 448 + 1e-6, name
    fp8 = logits(tmp_path / "float", PROMPT, quantization="fp8")
    bf16 = logits(tmp_path / "float", PROMPT, quantization="fp8", dtype="bfloat16")
    # bf16 activations move these logits (|x| ~ 7.6) by ~0.3, as they do for the float model
    assert torch.isfinite(bf16).all() and (bf16.float() - fp8).abs().max().item() < 0.5
    with pytest.raises(InvalidRequestError, match="already quantized"):
        _load(DATA / "gptq-v1-desc-act", quantization="fp8", dtype="bfloat16")


# --------------------------------------------------------------- kvforge quantize --method


@pytest.fixture(scope="module")
def float_model(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("attack-calibrated")
    write_checkpoint("llama", folder / "float")
    rng = random.Random(0)
    (folder / "calibration.txt").write_text(" ".join(rng.choice(WORDS[5:]) for _ in range(2000)))
    return folder / "float", folder / "calibration.txt"


def _cli(*argv: str) -> tuple[int, str]:
    """``kvforge ARGV``: the exit code and stderr; any exception escaping main fails the test."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, err.getvalue()


# BUG: --chunks -1 and --ctx -5 give no chunks and then a raw KeyError
# ('layers.0.self_attn.qkv_proj'); --ctx 0 a ZeroDivisionError; a calibration file that is not
# UTF-8 a UnicodeDecodeError (only OSError is caught); an OUTPUT that is an existing file a
# FileExistsError from mkdir; --damp -1 / nan a ValueError ("the Hessian is not positive
# definite"), which is no KVForgeError, so main lets the traceback out. Expected: exit code 2
# and one "error: ..." line.
@pytest.mark.parametrize(
    "options",
    [
        ["--chunks", "-1"],
        ["--ctx", "-5"],
        ["--ctx", "0"],
        ["--damp", "-1"],
        ["--damp", "nan"],
        ["BINARY"],
        ["OUTPUT_IS_FILE"],
    ],
    ids=["chunks-neg", "ctx-neg", "ctx-0", "damp-neg", "damp-nan", "not-utf8", "output-file"],
)
def test_bad_quantize_arguments_fail_in_one_line(float_model, tmp_path, options):
    source, calibration = float_model
    output = tmp_path / "out"
    if "BINARY" in options:
        calibration = tmp_path / "binary.txt"
        calibration.write_bytes(bytes(range(256)) * 20)
        options = []
    if "OUTPUT_IS_FILE" in options:
        output.write_text("x")
        options = []
    argv = ["quantize", str(source), str(output), "--method", "gptq"]
    argv += ["--calibration", str(calibration), "--group-size", "32", "--ctx", "64", *options]
    code, err = _cli(*argv)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1


# BUG: --chunks 0 says "the text has 2001 tokens, fewer than one chunk of 64", which is false;
# expected: the error names --chunks (or is refused up front as "chunks must be >= 1").
def test_zero_chunks_names_the_option(float_model, tmp_path):
    source, calibration = float_model
    code, err = _cli(
        "quantize", str(source), str(tmp_path / "o"), "--method", "gptq",
        "--calibration", str(calibration), "--group-size", "32", "--ctx", "64", "--chunks", "0",
    )  # fmt: skip
    assert code == 2 and "chunks" in err


@pytest.mark.parametrize(
    "options, is_valid",
    [
        (["--method", "gptq", "--ctx", "1", "--chunks", "3"], True),
        (["--method", "gptq", "--calibration", "EMPTY"], False),
        (["--method", "gptq", "--calibration", "MISSING"], False),
        (["--method", "rtn", "--group-size", "0"], False),
        (["--method", "rtn", "--group-size", "-2"], False),
        (["--method", "awq", "--sym"], False),
    ],
    ids=["ctx-1-runs", "empty-text", "missing-file", "group-0", "group-neg", "awq-sym"],
)
def test_edge_quantize_arguments(float_model, tmp_path, options, is_valid):
    source, calibration = float_model
    (tmp_path / "empty.txt").write_text("")
    names = {"EMPTY": str(tmp_path / "empty.txt"), "MISSING": str(tmp_path / "missing.txt")}
    options = [names.get(o, o) for o in options]
    if "--calibration" not in options:
        options += ["--calibration", str(calibration)]
    if "--group-size" not in options:
        options += ["--group-size", "32"]
    code, err = _cli("quantize", str(source), str(tmp_path / "out"), *options)
    if is_valid:
        assert code == 0 and (tmp_path / "out" / "config.json").exists()
    else:
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1


@pytest.mark.parametrize(
    "method, options",
    [
        ("gptq", dict(act_order=True)),
        ("gptq", dict(act_order=True, symmetric=False)),
        ("gptq", dict(bits=8, act_order=True)),
        ("gptq", dict(bits=2, act_order=True)),
        ("gptq", dict(group_size=-1, act_order=True)),
        ("rtn", dict(bits=8)),
        ("rtn", dict(bits=8, symmetric=False)),
        ("rtn", dict(bits=2)),
        ("rtn", dict(bits=2, symmetric=False)),
        ("rtn", dict(group_size=16)),
        ("awq", dict(group_size=-1)),
    ],
)
def test_written_checkpoints_run_packed_like_dequantized(float_model, tmp_path, method, options):
    source, calibration = float_model
    options = {"group_size": 32, **options}
    quantize_calibrated(
        str(source), tmp_path / "q", method, calibration.read_text(), ctx=64, max_chunks=3,
        show_progress=False, **options,
    )  # fmt: skip
    packed = logits(tmp_path / "q", PROMPT)
    dequantized = logits(tmp_path / "q", PROMPT, dtype="float32")
    assert (packed - dequantized).abs().max().item() <= PACKED_TOLERANCE
    assert torch.equal(packed.argmax(-1), dequantized.argmax(-1))


def test_rtn_8bit_weights_are_within_half_a_step(float_model, tmp_path):
    source, _ = float_model
    quantize_calibrated(
        str(source), tmp_path / "q", "rtn", "", bits=8, group_size=32, show_progress=False
    )
    ref = dict(_load(source, dtype="float32").model.named_parameters())
    got = dict(_load(tmp_path / "q", dtype="float32").model.named_parameters())
    for name, weight in ref.items():
        if name.endswith("_proj.weight"):
            groups = weight.float().reshape(weight.shape[0], -1, 32)
            step = 2 * groups.abs().amax(-1, keepdim=True) / 255
            error = (got[name].float().reshape_as(groups) - groups).abs()
            # half a step, plus the float16 rounding of the scale over 128 steps
            assert (error <= step * 0.57 + 1e-6).all(), name


def test_requantizing_a_gptq_directory_gives_a_loadable_checkpoint(tmp_path):
    quantize_calibrated(
        str(DATA / "gptq-v1-desc-act"), tmp_path / "again", "rtn", "", bits=8, group_size=32,
        show_progress=False,
    )  # fmt: skip
    # 8-bit codes of the 4-bit weights move the logits of this sensitive tiny model as little
    # as 8-bit codes of its float weights do (~0.4 of ~7.6)
    before = logits(DATA / "gptq-v1-desc-act", PROMPT, dtype="float32")
    after = logits(tmp_path / "again", PROMPT, dtype="float32")
    assert (after - before).abs().max().item() < 0.6


# ----------------------------------------------------------------------- finetune --qat


@pytest.fixture(scope="module")
def qat_data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("attack-qat")
    write_checkpoint("llama", folder / "llama")
    write_checkpoint("qwen2", folder / "qwen2")
    rng = random.Random(0)
    lines = [json.dumps({"text": " ".join(rng.choice(WORDS[5:]) for _ in range(20))})]
    (folder / "train.jsonl").write_text("\n".join(lines * 8))
    return folder


def _qat(folder: Path, name: str, **options: object) -> dict:
    config = dict(
        model=str(folder / "llama"), data=str(folder / "train.jsonl"), output=str(folder / name),
        rank=4, epochs=1, batch_size=4, eval_fraction=0.0, show_progress=False, qat="int4",
        qat_group_size=32,
    )  # fmt: skip
    config.update(options)
    return finetune(FinetuneConfig(**config))  # type: ignore[arg-type]


def test_qat_refusals_are_typed(qat_data):
    with pytest.raises(KVForgeError, match="Llama"):
        _qat(qat_data, "qwen", model=str(qat_data / "qwen2"))
    with pytest.raises(InvalidRequestError, match="group size 0"):
        _qat(qat_data, "g0", qat_group_size=0)
    with pytest.raises(InvalidRequestError, match="float base weights"):
        _qat(qat_data, "packed", model=str(DATA / "gptq-v1-desc-act"), dtype="bfloat16")


@pytest.mark.parametrize("options", [{}, {"qat": "int8"}, {"qat_group_size": -1}])
def test_qat_output_runs_packed_like_dequantized(qat_data, options):
    name = "qat-" + "-".join(f"{k}{v}" for k, v in options.items())
    quantized = Path(_qat(qat_data, name, **options)["quantized"])
    config = json.loads((quantized / "config.json").read_text())["quantization_config"]
    assert config["bits"] == (8 if options.get("qat") == "int8" else 4)
    packed, dequantized = logits(quantized, PROMPT), logits(quantized, PROMPT, dtype="float32")
    assert (packed - dequantized).abs().max().item() <= PACKED_TOLERANCE

"""Hugging Face checkpoints stored quantized by other tools, found by config.json's
``quantization_config`` and read into the common ``Unpacked`` form (or FP8 codes).

Layouts (``W`` is [out, in]; ``q`` the integer codes, ``z`` zero points, ``s`` scales):

- GPTQ (AutoGPTQ / GPTQModel): ``qweight`` int32 [in * bits / 32, out], codes packed along the
  input dimension, code ``i`` of a word at bits ``i * bits``; ``qzeros`` int32
  [groups, out * bits / 32] packed along the output dimension, stored minus one in the original
  (``checkpoint_format`` "gptq") layout; ``scales`` [groups, out]; ``g_idx`` int32 [in], the
  group of each input column (act-order checkpoints visit columns by decreasing Hessian
  diagonal, so their groups are not contiguous). ``W[o, j] = s[g, o] * (q[j, o] - z[g, o])``
  with ``g = g_idx[j]``.
- AWQ (AutoAWQ GEMM): ``qweight`` int32 [in, out / 8] packed along the output dimension in the
  interleaved order 0 2 4 6 1 3 5 7; ``qzeros`` the same over [groups, out / 8]; ``scales``
  [groups, out]; always contiguous groups and zero points.
- compressed-tensors (llm-compressor): ``pack-quantized`` ``weight_packed`` int32 [out, ceil(in *
  bits / 32)], each row a dense little-endian bit stream of codes offset by ``2^(bits-1)``, with
  ``weight_scale`` [out, groups], ``weight_shape``, optional ``weight_zero_point`` (packed along
  the output dimension) and ``weight_g_idx``; ``int-quantized`` / ``naive-quantized`` ``weight``
  int8; ``float-quantized`` ``weight`` float8_e4m3fn with per-tensor, per-channel, per-group or
  per-block scales. Activation quantization (``input_activations``, static ``input_scale``) and
  KV-cache scales are read past: the CPU has no FP8 matmul, so weights run weight-only with float
  activations (int16-quantized in ``quant_gemm``, or 8-bit with ``--quantize-activations``).

Act-order codes whose groups are not contiguous keep their columns sorted by group with the
permutation in ``Unpacked.perm``; the layer gathers its input columns in that order.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from kvforge.errors import ModelFileError, UnsupportedModelError
from kvforge.loader.hf_loader import hf_tensor_name, safetensors_files
from kvforge.quant.formats import Unpacked

logger = logging.getLogger(__name__)

FP8_DTYPES = (torch.float8_e4m3fn,)
# per module: the tensors a quantized linear layer is stored as, by method
_GPTQ_PARTS = ("qweight", "qzeros", "scales", "g_idx")
_CT_PARTS = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx")
# read past: activation and KV-cache scales (see the module docstring)
_DROPPED = ("input_scale", "input_zero_point", "output_scale", "k_scale", "v_scale")
_AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # the nibble position of output column 8k + i


@dataclass
class CTGroup:
    """One compressed-tensors config group: which modules, how their weights are stored."""

    targets: list[str]
    fmt: str
    bits: int
    kind: str  # "int" | "float"
    symmetric: bool
    strategy: str  # "tensor" | "channel" | "group" | "block"
    group_size: int | None


@dataclass
class QuantizedCheckpoint:
    """The parsed ``quantization_config`` of a checkpoint."""

    method: str  # "gptq" | "awq" | "compressed-tensors"
    bits: int = 4
    group_size: int = -1
    symmetric: bool = True
    zeros_minus_one: bool = True  # GPTQ's original layout stores zero points minus one
    ignore: list[str] = field(default_factory=list)
    groups: list[CTGroup] = field(default_factory=list)

    def describe(self) -> str:
        if self.method != "compressed-tensors":
            group = "channel" if self.group_size == -1 else f"group {self.group_size}"
            return f"{self.method} {self.bits}-bit {group}"
        parts = {f"{g.fmt} {g.kind}{g.bits} {g.strategy}" for g in self.groups}
        return f"compressed-tensors {', '.join(sorted(parts))}"


def _field(path: Path, name: str, problem: str) -> ModelFileError:
    return ModelFileError(path / "config.json", f"quantization_config.{name} {problem}")


def _int(config: dict[str, Any], path: Path, name: str, default: int | None = None) -> int:
    value = config.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise _field(path, name, f"must be an integer, got {value!r}")
    return value


def _bool(config: dict[str, Any], path: Path, name: str, default: bool) -> bool:
    value = config.get(name, default)
    if not isinstance(value, bool):  # a string "false" would read as true
        raise _field(path, name, f"must be a boolean, got {value!r}")
    return value


def _names(config: dict[str, Any], path: Path, name: str) -> list[str]:
    """A list of module names or ``re:`` patterns (each pattern must compile)."""
    value = config.get(name) or []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _field(path, name, f"must be a list of module names, got {value!r}")
    for pattern in value:
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as exc:
                raise _field(path, name, f"pattern {pattern!r} does not compile: {exc}") from exc
    return value


def parse_quantization_config(hf: dict[str, Any], path: Path) -> QuantizedCheckpoint | None:
    """The checkpoint's quantization, or None for a float checkpoint; a config kvforge cannot
    load is a one-line :class:`ModelFileError` naming the field."""
    config = hf.get("quantization_config")
    if config is None:
        return None
    if not isinstance(config, dict):
        raise ModelFileError(path / "config.json", "quantization_config must be an object")
    method = config.get("quant_method")
    method = method.lower() if isinstance(method, str) else method
    if method == "gptq":
        return _parse_gptq(config, path)
    if method == "awq":
        return _parse_awq(config, path)
    if method == "compressed-tensors":
        return _parse_compressed_tensors(config, path)
    raise UnsupportedModelError(
        f"{path}: quantization_config.quant_method {method!r} is not supported "
        "(gptq, awq and compressed-tensors are)"
    )


def _parse_gptq(config: dict[str, Any], path: Path) -> QuantizedCheckpoint:
    bits = _int(config, path, "bits")
    if bits not in (2, 4, 8):
        # GPTQ's 3-bit layout runs codes across word boundaries; kvforge reads 2, 4 and 8
        raise _field(path, "bits", f"{bits} cannot be read from GPTQ's qweight layout (2, 4, 8)")
    group = _int(config, path, "group_size", -1)
    if group != -1 and group <= 0:
        raise _field(path, "group_size", f"must be -1 or positive, got {group}")
    fmt = config.get("checkpoint_format", "gptq")
    if fmt not in ("gptq", "gptq_v2"):
        raise _field(path, "checkpoint_format", f"{fmt!r} is not gptq or gptq_v2")
    _bool(config, path, "desc_act", False)
    return QuantizedCheckpoint(
        "gptq",
        bits,
        group,
        _bool(config, path, "sym", True),
        zeros_minus_one=fmt == "gptq",
        ignore=_names(config, path, "modules_to_not_convert"),
    )


def _parse_awq(config: dict[str, Any], path: Path) -> QuantizedCheckpoint:
    bits = _int(config, path, "bits", config.get("w_bit", 4))
    if bits != 4:
        raise _field(path, "bits", f"{bits}: AWQ's GEMM layout holds 4-bit codes only")
    group = _int(config, path, "group_size", config.get("q_group_size", 128))
    if group <= 0 and group != -1:
        raise _field(path, "group_size", f"must be -1 or positive, got {group}")
    version = str(config.get("version", "gemm")).lower()
    if version != "gemm":
        raise _field(path, "version", f"{version!r}: only AWQ's GEMM layout is supported")
    if not _bool(config, path, "zero_point", True):
        raise _field(path, "zero_point", "false: AWQ's GEMM layout always stores zero points")
    return QuantizedCheckpoint(
        "awq", bits, group, False, False, _names(config, path, "modules_to_not_convert")
    )


_CT_FORMATS = ("pack-quantized", "int-quantized", "naive-quantized", "float-quantized", "dense")


def _parse_compressed_tensors(config: dict[str, Any], path: Path) -> QuantizedCheckpoint:
    for name in ("sparsity_config", "transform_config"):
        if config.get(name):
            raise _field(path, name, "is set: sparse and rotated checkpoints are not supported")
    top_format = config.get("format")
    groups_cfg = config.get("config_groups")
    if not isinstance(groups_cfg, dict) or not groups_cfg:
        raise _field(path, "config_groups", "must be a non-empty object")
    groups = []
    for key, group in groups_cfg.items():
        where = f"config_groups.{key}"
        if not isinstance(group, dict):
            raise _field(path, where, "must be an object")
        weights = group.get("weights")
        if not isinstance(weights, dict):
            raise _field(path, f"{where}.weights", "must be an object (weight quantization)")
        fmt = group.get("format") or top_format
        if fmt not in _CT_FORMATS:
            raise _field(path, f"{where}.format", f"{fmt!r} is not one of {', '.join(_CT_FORMATS)}")
        kind = weights.get("type", "int")
        bits = _int(weights, path, "num_bits")
        if kind == "float" and bits != 8:
            raise _field(path, f"{where}.weights.num_bits", f"{bits}: float weights are FP8 only")
        if kind not in ("int", "float"):
            raise _field(path, f"{where}.weights.type", f"{kind!r} is not int or float")
        if kind == "int" and not 1 <= bits <= 8:
            raise _field(path, f"{where}.weights.num_bits", f"{bits} is not in 1..8")
        strategy = weights.get("strategy", "tensor")
        if strategy not in ("tensor", "channel", "group", "block"):
            raise _field(path, f"{where}.weights.strategy", f"{strategy!r} is not supported")
        group_size = weights.get("group_size")
        if strategy == "group" and (not isinstance(group_size, int) or group_size <= 0):
            raise _field(path, f"{where}.weights.group_size", f"{group_size!r} is not positive")
        if not isinstance(group.get("targets"), list):
            raise _field(path, f"{where}.targets", "must be a list of names")
        targets = _names(group, path, "targets")
        groups.append(
            CTGroup(
                targets,
                fmt,
                bits,
                kind,
                _bool(weights, path, "symmetric", True),
                strategy,
                group_size,
            )
        )
    return QuantizedCheckpoint(
        "compressed-tensors", ignore=_names(config, path, "ignore"), groups=groups
    )


def _matches(pattern: str, module: str) -> bool:
    if pattern.startswith("re:"):
        return re.match(pattern[3:], module) is not None
    return pattern in ("Linear", module) or module.endswith("." + pattern)


def _tensor_index(path: Path) -> dict[str, Path]:
    """Every tensor name of the checkpoint -> its shard."""
    index: dict[str, Path] = {}
    for file in safetensors_files(path):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                index[name] = file
    return index


def iter_quantized_weights(
    path: Path,
    scheme: QuantizedCheckpoint,
    fix: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
) -> Iterator[tuple[str, torch.Tensor | Unpacked]]:
    """(name, tensor) like ``iter_hf_weights``, each quantized linear layer's tensors read
    together into one ``<module>.weight`` of codes. Every tensor is checked (dtype, shape,
    finite scales, code ranges): a bad one is a :class:`ModelFileError` naming the module."""
    index = _tensor_index(path)
    parts = _CT_PARTS if scheme.method == "compressed-tensors" else _GPTQ_PARTS
    with ExitStack() as stack:
        handles: dict[Path, Any] = {}

        def get(name: str) -> torch.Tensor:
            file = index[name]
            if file not in handles:
                handles[file] = stack.enter_context(safe_open(str(file), framework="pt"))
            return handles[file].get_tensor(name)

        done: set[str] = set()
        for raw_name in index:
            module, _, suffix = raw_name.rpartition(".")
            if suffix in _DROPPED:
                continue
            quantized = suffix in parts or (
                suffix == "weight" and f"{module}.weight_scale" in index
            )
            if not quantized:
                tensor = get(raw_name)
                codes = not tensor.is_floating_point() or tensor.dtype in FP8_DTYPES
                if codes:  # codes without their scales would load as another model's weights
                    raise ModelFileError(
                        path, f"{raw_name}: {tensor.dtype} values without weight_scale"
                    )
                tensor = tensor.float()
                name = hf_tensor_name(raw_name)
                yield name, (fix(name, tensor) if fix is not None else tensor)
                continue
            if module in done:
                continue
            done.add(module)
            tensors = {
                p: get(f"{module}.{p}") for p in (*parts, "weight") if f"{module}.{p}" in index
            }
            try:
                value = _decode(module, tensors, scheme)
            except ValueError as exc:
                raise ModelFileError(path, f"{module}: {exc}") from exc
            yield hf_tensor_name(f"{module}.weight"), value


def _decode(
    module: str, tensors: dict[str, torch.Tensor], scheme: QuantizedCheckpoint
) -> torch.Tensor | Unpacked:
    for name, tensor in tensors.items():
        if tensor.numel() == 0:
            raise ValueError(f"{name} is empty")
    if scheme.method in ("gptq", "awq"):
        if "weight" in tensors:
            raise ValueError("has both a float weight and qweight: which one is meant?")
        if scheme.method == "gptq":
            return _decode_gptq(tensors, scheme)
        return _decode_awq(tensors)
    group = next((g for g in scheme.groups if any(_matches(t, module) for t in g.targets)), None)
    if group is None or any(_matches(pattern, module) for pattern in scheme.ignore):
        raise ValueError("has quantization tensors but no config group targets it")
    if "weight" in tensors and "weight_packed" in tensors:
        raise ValueError("has both weight and weight_packed: which one is meant?")
    return _decode_compressed(tensors, group)


def _need(tensors: dict[str, torch.Tensor], *names: str) -> list[torch.Tensor]:
    missing = [n for n in names if n not in tensors]
    if missing:
        raise ValueError(f"tensor(s) {', '.join(missing)} missing")
    return [tensors[n] for n in names]


def _packed(name: str, words: torch.Tensor, dims: int = 2) -> torch.Tensor:
    if words.dtype != torch.int32 or words.dim() != dims:
        raise ValueError(
            f"{name} must be a {dims}-D int32 tensor, got {words.dtype} {tuple(words.shape)}"
        )
    return words


def _scale_values(name: str, scale: torch.Tensor) -> torch.Tensor:
    if not scale.is_floating_point() or scale.dtype in FP8_DTYPES:
        raise ValueError(f"{name} must be float, got {scale.dtype}")
    scale = scale.float()
    if not torch.isfinite(scale).all():
        raise ValueError(f"{name} holds non-finite values")
    return scale


def _integers(name: str, values: torch.Tensor) -> torch.Tensor:
    """Integer-valued codes, zero points or group indices (floats must hold whole numbers)."""
    if values.is_floating_point():
        if values.dtype in FP8_DTYPES or not torch.equal(values, values.round()):
            raise ValueError(f"{name} must hold integers, got {values.dtype} values")
    elif values.dtype == torch.bool:
        raise ValueError(f"{name} must hold integers, got booleans")
    return values.to(torch.int64)


def _unpack_words(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Codes packed ``32 / bits`` to an int32 along ``dim`` (code ``i`` at bits ``i * bits``)
    -> int32 codes with that dimension ``32 / bits`` times longer."""
    per_word = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    w = words.to(torch.int32).movedim(dim, -1)
    codes = (w.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    codes = codes.reshape(*w.shape[:-1], w.shape[-1] * per_word)
    return codes.movedim(-1, dim)


def _unpack_stream(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Rows of a dense little-endian bit stream of ``bits``-bit codes -> [rows, count] int32."""
    rows = words.shape[0]
    raw = words.to(torch.int32).contiguous().view(torch.uint8).reshape(rows, -1)
    bit = (raw.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1
    bit = bit.reshape(rows, -1)[:, : count * bits].reshape(rows, count, bits).to(torch.int32)
    return (bit << torch.arange(bits, dtype=torch.int32)).sum(-1, dtype=torch.int32)


def _grouped(
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    g_idx: torch.Tensor | None,
    g_idx_name: str = "g_idx",
) -> Unpacked:
    """``W[o, j] = s[o, g(j)] * (q[o, j] - z[o, g(j)])`` as Unpacked: codes [out, in] (any
    integer range), scales / zeros [out, groups]; contiguous groups unless ``g_idx`` says
    otherwise (then the columns are sorted by group and the permutation kept)."""
    out, cols = codes.shape
    if scales.dim() != 2 or scales.shape[0] != out or scales.shape[1] == 0:
        raise ValueError(f"scales {tuple(scales.shape)} do not match {out} outputs")
    groups = scales.shape[1]
    if cols % groups:
        raise ValueError(f"{groups} scale groups do not divide {cols} input columns")
    if zeros is not None and tuple(zeros.shape) != (out, groups):
        raise ValueError(f"zero points {tuple(zeros.shape)} do not match scales {(out, groups)}")
    size = cols // groups
    perm = None
    if g_idx is not None:
        g_idx = _integers(g_idx_name, g_idx)
        if g_idx.shape != (cols,) or g_idx.min() < 0 or g_idx.max() >= groups:
            raise ValueError(f"{g_idx_name} does not map {cols} columns into {groups} groups")
        if not torch.equal(g_idx, torch.arange(cols) // size):
            perm = torch.argsort(g_idx, stable=True)
            if not torch.equal(
                torch.bincount(g_idx, minlength=groups), torch.full((groups,), size)
            ):
                raise ValueError(f"{g_idx_name} groups are of unequal sizes")
            codes = codes[:, perm]
    low, high = int(codes.min()), int(codes.max())
    if zeros is None:
        if low < -128 or high > 127:
            raise ValueError(f"codes {low}..{high} do not fit 8 bits")
        return Unpacked(codes.to(torch.int8), scales, None, size, perm)
    # w = s * (q - z) = s * q' + m: codes moved to 0.. (4-bit codes to 0..15, the int4
    # kernel's range with zeros), then 8-bit ones back to the signed range int8 holds
    shift = 0 if low >= 0 else 8 if low >= -8 and high <= 7 else 128
    if low + shift < 0 or high + shift > 255:
        raise ValueError(f"codes {low}..{high} do not fit 8 bits")
    codes, zeros = codes + shift, zeros.to(torch.int64) + shift
    if high + shift > 127:
        codes, zeros = codes - 128, zeros - 128
    mins = -scales * zeros.float()
    return Unpacked(codes.to(torch.int8), scales, mins, size, perm)


def _decode_gptq(tensors: dict[str, torch.Tensor], scheme: QuantizedCheckpoint) -> Unpacked:
    qweight, qzeros, scales = _need(tensors, "qweight", "qzeros", "scales")
    bits = scheme.bits
    codes = _unpack_words(_packed("qweight", qweight), bits, 0).T  # [out, in]
    out = codes.shape[0]
    scales = _scale_values("scales", scales)
    if scales.dim() != 2 or scales.shape[1] != out:
        raise ValueError(f"scales {tuple(scales.shape)} do not match {out} outputs")
    if codes.shape[1] % scales.shape[0]:
        raise ValueError(f"{scales.shape[0]} scale groups do not divide {codes.shape[1]} columns")
    qzeros = _packed("qzeros", qzeros)
    if qzeros.shape[0] != scales.shape[0] or qzeros.shape[1] * 32 // bits < out:
        raise ValueError(f"qzeros {tuple(qzeros.shape)} do not match scales {tuple(scales.shape)}")
    if scheme.zeros_minus_one:  # one was taken from the whole word (a zero of 0 borrowed)
        ones = sum(1 << shift for shift in range(0, 32, bits))
        qzeros = (qzeros.to(torch.int64) + ones) & 0xFFFFFFFF
    zeros = _unpack_words(qzeros, bits, 1)[:, :out]
    g_idx = tensors.get("g_idx")
    if scheme.symmetric:
        mid = 1 << (bits - 1)
        if torch.all(zeros == mid):  # symmetric: signed codes, no zero points
            return _grouped(codes - mid, scales.T.contiguous(), None, g_idx)
    return _grouped(codes, scales.T.contiguous(), zeros.T.contiguous(), g_idx)


def _decode_awq(tensors: dict[str, torch.Tensor]) -> Unpacked:
    qweight, qzeros, scales = _need(tensors, "qweight", "qzeros", "scales")
    # undo the interleave: nibble p of a word holds output column 8k + order[p]
    reverse = torch.tensor(_AWQ_ORDER).argsort()

    def columns(name: str, words: torch.Tensor) -> torch.Tensor:
        nibbles = _unpack_words(_packed(name, words), 4, 1)  # [rows, out], in nibble order
        rows = nibbles.shape[0]
        return nibbles.reshape(rows, -1, 8)[:, :, reverse].reshape(rows, -1)

    codes = columns("qweight", qweight).T.contiguous()  # [out, in]
    zeros = columns("qzeros", qzeros).T.contiguous()
    scales = _scale_values("scales", scales)
    if scales.dim() != 2 or scales.shape[1] != codes.shape[0]:
        raise ValueError(f"scales {tuple(scales.shape)} do not match {codes.shape[0]} outputs")
    return _grouped(codes, scales.T.contiguous(), zeros, None)


def _scales_2d(name: str, scale: torch.Tensor, out: int, cols: int, group: CTGroup) -> torch.Tensor:
    """compressed-tensors scales (or zero points) -> [out, groups] float32."""
    scale = scale.float()
    if group.strategy == "tensor":
        if scale.numel() != 1:
            raise ValueError(f"{name} has {scale.numel()} values; strategy tensor means one")
        return scale.reshape(1, 1).expand(out, 1).contiguous()
    if group.strategy == "block":
        if (
            scale.dim() != 2
            or scale.shape[0] == 0
            or -(-out // scale.shape[0]) * (scale.shape[0] - 1) >= out
        ):
            raise ValueError(f"block {name} {tuple(scale.shape)} do not tile {out} rows")
        block_rows = -(-out // scale.shape[0])
        return scale.repeat_interleave(block_rows, 0)[:out].contiguous()
    if scale.dim() not in (1, 2) or scale.shape[0] != out:
        raise ValueError(f"{name} {tuple(scale.shape)} do not match {out} outputs")
    scale = scale.reshape(out, -1)
    if group.strategy == "channel" and scale.shape[1] != 1:
        raise ValueError(f"{name} {tuple(scale.shape)}: strategy channel means one per row")
    return scale


def _decode_compressed(tensors: dict[str, torch.Tensor], group: CTGroup) -> torch.Tensor | Unpacked:
    if group.fmt == "dense":  # stored in float (already rounded): load as is
        return _need(tensors, "weight")[0].float()
    zeros = tensors.get("weight_zero_point")
    if zeros is not None and group.symmetric:
        raise ValueError("has weight_zero_point but its config group is symmetric")
    if zeros is None and not group.symmetric:
        raise ValueError("tensor(s) weight_zero_point missing (the config group is asymmetric)")
    if group.fmt == "pack-quantized":
        packed, scale, shape = _need(tensors, "weight_packed", "weight_scale", "weight_shape")
        if shape.numel() != 2 or shape.is_floating_point():
            raise ValueError(f"weight_shape must be two integers, got {shape.tolist()}")
        out, cols = (int(v) for v in shape.tolist())
        packed = _packed("weight_packed", packed)
        width = -(-cols * group.bits // 32) if cols > 0 else 0
        if out <= 0 or cols <= 0 or packed.shape != (out, width):
            raise ValueError(
                f"weight_packed {tuple(packed.shape)} is not [{out}, {cols}] at "
                f"{group.bits} bits ([{out}, {width}])"
            )
        if group.bits in (1, 2, 4, 8):
            codes = _unpack_words(packed, group.bits, 1)[:, :cols]
        else:
            codes = _unpack_stream(packed, group.bits, cols)
        offset = 1 << (group.bits - 1)  # stored with an offset to the unsigned range
        codes = codes - offset
        if zeros is not None and zeros.dtype == torch.int32 and group.bits < 32:
            # packed along the output dimension
            rows = -(-out * group.bits // 32)
            if zeros.dim() != 2 or zeros.shape[0] != rows:
                raise ValueError(
                    f"weight_zero_point {tuple(zeros.shape)} is not packed [{rows}, groups]"
                )
            zeros = _unpack_words(zeros, group.bits, 0)[:out] - offset
    else:
        weight, scale = _need(tensors, "weight", "weight_scale")
        if weight.dim() != 2:
            raise ValueError(f"weight must be 2-D, got {tuple(weight.shape)}")
        out, cols = weight.shape
        if group.kind == "float":
            if weight.dtype not in FP8_DTYPES:
                raise ValueError(f"float-quantized weight is {weight.dtype}, not float8_e4m3fn")
            scales = _scales_2d(
                "weight_scale", _scale_values("weight_scale", scale), out, cols, group
            )
            if cols % scales.shape[1]:
                raise ValueError(f"{scales.shape[1]} scale groups do not divide {cols} columns")
            return Unpacked(weight, scales, None, cols // scales.shape[1])
        if weight.dtype in FP8_DTYPES:
            raise ValueError("an FP8 weight in an integer (type int) config group")
        codes = _integers("weight", weight)  # naive-quantized codes may sit in floats
        low, high = int(codes.min()), int(codes.max())
        if low < -(1 << (group.bits - 1)) or high >= 1 << (group.bits - 1):
            raise ValueError(f"weight codes {low}..{high} exceed {group.bits} bits")
    scales = _scales_2d("weight_scale", _scale_values("weight_scale", scale), out, cols, group)
    if zeros is not None:
        zeros = _scales_2d(
            "weight_zero_point", _integers("weight_zero_point", zeros), out, cols, group
        )
    return _grouped(codes, scales, zeros, tensors.get("weight_g_idx"), "weight_g_idx")

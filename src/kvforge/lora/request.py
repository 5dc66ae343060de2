"""What a request names to run under an adapter (plain data: it travels in the step output)."""

from __future__ import annotations

from dataclasses import dataclass

from kvforge.errors import InvalidRequestError


@dataclass(frozen=True)
class LoRARequest:
    """An adapter by name, a positive integer id unique per adapter (it keys the prefix cache
    and the slots) and the PEFT directory it loads from; ``scale`` multiplies its update."""

    lora_name: str
    lora_int_id: int
    lora_path: str
    scale: float = 1.0

    def __post_init__(self) -> None:
        if not self.lora_name:
            raise InvalidRequestError("a LoRA adapter needs a name", "lora_request")
        if isinstance(self.lora_int_id, bool) or not isinstance(self.lora_int_id, int):
            raise InvalidRequestError("lora_int_id must be an integer", "lora_request")
        if self.lora_int_id < 1:
            raise InvalidRequestError(
                "lora_int_id must be >= 1 (0 is the base model)", "lora_request"
            )
        if not (isinstance(self.scale, (int, float)) and abs(self.scale) < 1e6):
            raise InvalidRequestError("the LoRA scale must be a finite number", "lora_request")


def parse_lora_module(spec: str, lora_int_id: int, scaled: bool = False) -> LoRARequest:
    """``name=path`` (``--lora-modules``) or ``name=path:scale`` (``--lora-scaled``)."""
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        form = "name=path:scale" if scaled else "name=path"
        raise InvalidRequestError(f"LoRA module {spec!r}: expected {form}", "lora_modules")
    scale = 1.0
    if scaled:
        path, sep, value = path.rpartition(":")
        try:
            scale = float(value) if sep and path else float("nan")
        except ValueError:
            scale = float("nan")
        if scale != scale:  # NaN: missing or malformed
            raise InvalidRequestError(
                f"LoRA module {spec!r}: expected name=path:scale", "lora_modules"
            )
    return LoRARequest(name, lora_int_id, path, scale)

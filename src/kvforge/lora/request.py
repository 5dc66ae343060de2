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

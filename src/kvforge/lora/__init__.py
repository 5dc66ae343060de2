"""LoRA adapters: ``LoRARequest`` (what a request names), PEFT loading (``lora.adapter``) and
the slots that hold loaded adapters for a batch (``lora.manager``)."""

from kvforge.lora.request import LoRARequest

__all__ = ["LoRARequest"]

"""The errors of the LoRA modules (lora, targets, variants, adapters), in one place every one of them can import."""

from __future__ import annotations


class LoRAError(ValueError):
    """A LoRA setting or operation that cannot be done (bad rank, bad target, merging twice, ...)."""


class AdapterMismatchError(LoRAError):
    """An adapter that was made for another base model or does not fit this one's shapes."""


class UnknownVariantError(LoRAError):
    """A variant name that is not registered (its module not imported yet); `.variant` is the name."""

    def __init__(self, variant, message: str):
        super().__init__(message)
        self.variant = variant

"""LoRA variants as plug-ins: each is one LoRALinear subclass in its own file, registered by name.

    LoRAConfig(variant="dora")      selects one;  VARIANTS  lists them;  check_variant(cls)  tests one.

Plain LoRA is lora.LoRALinear itself (registered as "lora"); the others override only what differs.
Writing one: subclass LoRALinear, set `variant` and `parameter_formula` (and state the formula in the
docstring), add tensors in __init__ (nn.Parameter trains, a persistent buffer is saved frozen), override
forward (keep its first line: `if self.merged or not self.enabled: return self.base(x)`) and
delta_weight, and decorate the class with @register_variant.
"""
from ..lora import VARIANTS, LoRALinear, register_variant, variant_class
from .rslora import RSLoRALinear
from .dora import DoRALinear
from .pissa import PiSSALinear
from .vera import VeRALinear
from .lora_fa import LoRAFALinear

BUILTIN_VARIANTS = ("lora", "rslora", "dora", "pissa", "vera", "lora_fa")

__all__ = ["VARIANTS", "BUILTIN_VARIANTS", "LoRALinear", "register_variant", "variant_class", "RSLoRALinear",
           "DoRALinear", "PiSSALinear", "VeRALinear", "LoRAFALinear"]

"""LoRA variants as plug-ins: each is one LoRALinear subclass in its own file, registered by name.

    LoRAConfig(variant="dora")      selects one;  VARIANTS  lists them;  check_variant(cls)  tests one.

Plain LoRA is lora.LoRALinear itself (registered as "lora"); the others override only what differs.
Writing one: subclass LoRALinear, set `variant`, `parameter_formula` (stated in the docstring) and
`parameter_count`, add tensors in __init__ (nn.Parameter trains, a persistent buffer is saved frozen; both
in the base weight's dtype and device), override forward (keep its first line: `if self.merged or not
self.enabled: return self.base(x)`) and delta_weight, and decorate the class with @register_variant.
LoRALinear's docstring lists every hook a variant may set; check_variant runs the contract on it.
"""

from ..lora import VARIANTS, LoRALinear, register_variant, resolve_variant, variant_class
from .contract import check_variant
from .dora import DoRALinear
from .lora_fa import LoRAFALinear
from .pissa import PiSSALinear
from .rslora import RSLoRALinear
from .vera import VeRALinear

__all__ = [
    "VARIANTS",
    "LoRALinear",
    "register_variant",
    "resolve_variant",
    "variant_class",
    "RSLoRALinear",
    "DoRALinear",
    "PiSSALinear",
    "VeRALinear",
    "LoRAFALinear",
    "check_variant",
]

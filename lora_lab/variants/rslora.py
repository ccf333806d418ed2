"""rsLoRA: rank-stabilised scaling alpha / sqrt(r) instead of alpha / r (Kalajdzievski 2023, arXiv:2312.03732).

With alpha / r the update shrinks as r grows, so higher ranks learn slower; alpha / sqrt(r) keeps the
update's scale independent of r. Everything else is plain LoRA.
"""

import math

from ..lora import LoRALinear, register_variant


@register_variant
class RSLoRALinear(LoRALinear):
    """rsLoRA: y = base(x) + (alpha / sqrt(r)) * B(A(dropout(x))).

    Trainable parameters per layer: r*(d+k)   (A and B, as in LoRA)
    """

    variant = "rslora"
    parameter_formula = "r*(d+k)"
    scaling_rule = "alpha/sqrt(r)"
    peft_flags = {"use_rslora": True, "use_dora": False}

    @property
    def scale(self) -> float:
        return self.alpha / math.sqrt(self.r)

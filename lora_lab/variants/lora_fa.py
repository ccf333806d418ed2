"""LoRA-FA: A is frozen after its random init, only B is trained (Zhang et al. 2023, arXiv:2308.03303).

Training B alone halves (or better) the trainable numbers and the optimizer state, and the activation
memory of A's input is not needed for A's gradient. A is a persistent buffer, saved with the adapter.
"""

from ..lora import LoRALinear, register_variant


@register_variant
class LoRAFALinear(LoRALinear):
    """LoRA-FA: y = base(x) + scale * B(A(dropout(x))) with A frozen (random), B trained from zero.

    Trainable parameters per layer: r*d   (B only)
    """

    variant = "lora_fa"
    parameter_formula = "r*d"

    @classmethod
    def parameter_count(cls, d: int, k: int, r: int) -> int:
        return r * d

    def __init__(self, base, r, alpha, dropout=0.0, init="gaussian", **options):
        super().__init__(base, r, alpha, dropout, init, **options)
        frozen_A = self.lora_A.detach()
        del self.lora_A  # a parameter becomes a buffer: no gradient, no optimizer state
        self.register_buffer("lora_A", frozen_A)

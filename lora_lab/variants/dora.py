"""DoRA: weight-decomposed LoRA (Liu et al. 2024, arXiv:2402.09353).

The adapted weight is split into a magnitude m (one number per output row) and a direction:

    W' = m * (W0 + s B A) / ||W0 + s B A||        (row-wise norm, s = alpha / r)

m starts at ||W0|| per row, so W' = W0 at step 0. As in the paper (section 4.3), the norm is treated
as a constant in the backward pass: it is computed without autograd, which saves the d x k gradient
graph. Cost per forward: one d x r x k matmul (W0 + s B A) and a row norm on top of LoRA's two thin
matmuls (small next to the layer's own matmul over a batch of tokens), plus two elementwise passes over
the output and the magnitude's gradient, which are what DoRA's extra step time is made of. The merge is
exact (W' itself); unmerge restores W0 from the copy kept while merged.

Rows of a batch stay independent: the norm depends on the adapter's weights, not on x, so it is one
vector per adapter, the same for every row (rows_independent).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..lora import LoRAError, LoRALinear, register_variant


def row_norm(weight: torch.Tensor) -> torch.Tensor:
    """||w_i|| for each output row i, in fp32: the same function at init and in forward, so m / norm is
    exactly 1 at step 0."""
    return torch.linalg.vector_norm(weight.float(), dim=1)


@register_variant
class DoRALinear(LoRALinear):
    """DoRA: y = (m / ||W0 + s B A||) * (W0 x + s B A x) + bias, the norm per output row and detached.

    Trainable parameters per layer: r*(d+k)+d   (A, B and the magnitude m)
    """

    variant = "dora"
    parameter_formula = "r*(d+k)+d"
    rows_independent = True  # the norm is per adapter (its weights), not per row
    lora_plus_names = ("lora_B", "lora_magnitude")  # 1-D magnitudes join B, as in PEFT's LoRA+ optimizer
    peft_flags = {"use_rslora": False, "use_dora": True}
    peft_names = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "lora_magnitude": "lora_magnitude_vector"}

    @classmethod
    def parameter_count(cls, d: int, k: int, r: int) -> int:
        return r * (d + k) + d

    def __init__(self, base, r, alpha, dropout=0.0, init="gaussian", **options):
        super().__init__(base, r, alpha, dropout, init, **options)
        w = base.weight
        self.lora_magnitude = nn.Parameter(row_norm(w.detach()).to(w.dtype))  # (d,)

    def column_scale(self) -> torch.Tensor:
        """m / ||W0 + s B A|| per output row, with the norm computed outside autograd (the paper's detach)."""
        with torch.no_grad():
            norm = row_norm(self.base.weight + self.scale * (self.lora_B @ self.lora_A))
        return self.lora_magnitude / norm.to(self.lora_magnitude.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or not self.enabled:
            return self.base(x)
        out = self.base(x)
        lora = F.linear(F.linear(self.lora_dropout(x), self.lora_A) * self.scale, self.lora_B)
        g = self.column_scale()  # exactly 1 at step 0, where lora is exactly 0: the output is exactly out
        if self.base.bias is None:
            return g * (out + lora)  # g * (W0 x + s B A x): two passes over the output, one saved for backward
        return out + (g - 1) * (out - self.base.bias) + g * lora  # the bias is not rescaled

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        direction = weight + self.delta_weight()
        return (self.lora_magnitude.detach().float() / row_norm(direction)).unsqueeze(1) * direction

    def unmerged_weight(self, merged: torch.Tensor) -> torch.Tensor:
        # ||W0 + s B A|| is lost in the merged weight (its rows have norm m); the copy kept while merged has it.
        kept = getattr(self, "weight_before_merge", None)
        if kept is None:
            raise LoRAError("DoRA cannot be unmerged without the weight kept at merge time.")
        norm = row_norm(kept.float() + self.delta_weight())
        return merged * (norm / self.lora_magnitude.detach().float()).unsqueeze(1) - self.delta_weight()

"""PiSSA: principal singular values and vectors adaptation (Meng et al. 2024, arXiv:2404.02948).

A and B start from the top-r singular triplets of W (W = U S V^T): with s = alpha / r,

    B0 = U_r sqrt(S_r / s),   A0 = sqrt(S_r / s) V_r^T,   so  s B0 A0 = the best rank-r part of W,

and the frozen weight is the residual W_res = W - s B0 A0. Training then moves the principal part,
which learns faster than LoRA's zero start. The model is unchanged at step 0: W_res + s B0 A0 = W.

lora_lab keeps the residual implicit: base.weight stays the ORIGINAL W, and the layer computes
    W x - s B0 A0 x + s B A x        (B0, A0: frozen buffers, saved with the adapter)
so the base weights are never rewritten: disabling the adapter, swapping adapters and the base digest
see the original model, at the cost of two more thin matmuls and 2r(d+k) stored (not trained) numbers.
For PEFT the adapter is exported as the equivalent plain LoRA on the original W, of rank 2r:
A' = [A; A0], B' = [B, -B0] (PEFT's own PiSSA conversion gives the same).
"""

import torch
import torch.nn.functional as F

from ..lora import LoRALinear, register_variant


@register_variant
class PiSSALinear(LoRALinear):
    """PiSSA: y = W_res x + s B A x with W_res = W - s B0 A0 and A, B initialised to A0, B0 (top-r SVD of W).

    Trainable parameters per layer: r*(d+k)   (A and B; the frozen A0, B0 are buffers)
    """

    variant = "pissa"
    parameter_formula = "r*(d+k)"
    rows_independent = True  # the principal part and the update are applied row by row

    def __init__(self, base, r, alpha, dropout=0.0, init="gaussian", **options):
        super().__init__(base, r, alpha, dropout, init, **options)
        w = base.weight
        A0, B0 = torch.zeros_like(self.lora_A), torch.zeros_like(self.lora_B)
        if not w.is_meta:  # a layer built on "meta" only reports its shapes
            U, S, Vh = torch.linalg.svd(w.detach().float(), full_matrices=False)
            root = torch.sqrt(S[:r] / self.scale)  # split sqrt(S) between A and B, as in the paper
            A0, B0 = (root[:, None] * Vh[:r]).to(w.dtype), (U[:, :r] * root).to(w.dtype)
        with torch.no_grad():
            self.lora_A.copy_(A0)
            self.lora_B.copy_(B0)
        self.register_buffer("pissa_A0", A0.clone())
        self.register_buffer("pissa_B0", B0.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or not self.enabled:
            return self.base(x)
        principal = F.linear(F.linear(x, self.pissa_A0) * self.scale, self.pissa_B0)  # s B0 A0 x, no dropout
        lora = F.linear(F.linear(self.lora_dropout(x), self.lora_A) * self.scale, self.lora_B)
        return self.base(x) - principal + lora

    def delta_weight(self) -> torch.Tensor:
        """s (B A - B0 A0) (fp32): the change from the original W, zero at step 0."""
        f = lambda t: t.detach().float()  # noqa: E731
        return self.scale * (f(self.lora_B) @ f(self.lora_A) - f(self.pissa_B0) @ f(self.pissa_A0))

    def to_peft(self):
        # The same update as a plain LoRA of rank 2r on the original W, scaled alike: alpha' / 2r = alpha / r.
        A = torch.cat([self.lora_A.detach(), self.pissa_A0])
        B = torch.cat([self.lora_B.detach(), -self.pissa_B0], dim=1)
        return 2 * self.r, 2 * self.alpha, {"lora_A.weight": A, "lora_B.weight": B}

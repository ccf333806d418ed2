"""VeRA: vector-based random matrix adaptation (Kopiczko et al. 2024, arXiv:2310.11454).

One frozen random pair A (r x k), B (d x r) is shared by all adapted layers; each layer trains only two
vectors, d (r numbers, init 0.1) and b (d numbers, init 0):

    W' = W + diag(b) B diag(d) A          (no alpha / r: the vectors set the scale)

The pair is regenerated from `vera_seed` (kaiming-uniform, as in the paper), so it is never stored in
the adapter file: the adapter holds only d and b. Layers of the same shape (q/k/v/o here) share one
tensor where they are built (moving the model to another device copies it per layer); a layer of
another shape gets the pair drawn for its shape from the same seed.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..lora import LoRAError, LoRALinear, register_variant

_SHARED: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # (seed, r, d, k) -> (A, B) on the CPU in fp32


def shared_pair(seed: int, r: int, d: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen (A, B) for a d x k layer: a pure function of (seed, r, d, k), cached so layers share it."""
    key = (seed, r, d, k)
    if key not in _SHARED:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + d * 1009 + k)
        bound = lambda fan_in: 1.0 / math.sqrt(fan_in)  # kaiming-uniform(a=sqrt(5)) of nn.Linear  # noqa: E731
        A = (torch.rand(r, k, generator=gen, device="cpu") * 2 - 1) * bound(k)
        B = (torch.rand(d, r, generator=gen, device="cpu") * 2 - 1) * bound(r)
        _SHARED[key] = (A, B)
    return _SHARED[key]


@register_variant
class VeRALinear(LoRALinear):
    """VeRA: y = base(x) + b * B(d * A(dropout(x))) with A, B frozen, shared and regenerated from a seed.

    Trainable parameters per layer: r+d   (the vectors d and b)
    """

    variant = "vera"
    parameter_formula = "r+d"
    rows_independent = True  # b * B(d * A x) row by row
    lora_plus_names = ("vera_b",)  # the output-side vector plays B's part
    options = {"vera_seed": 0, "d_init": 0.1}
    scaling_rule = "none"
    peft_flags = None
    peft_refusal = (
        "PEFT's VeRA draws its shared matrices from its own generator and stores them differently, "
        "so the frozen pair would not match; VeRA adapters stay in lora_lab's format."
    )

    @classmethod
    def parameter_count(cls, d: int, k: int, r: int) -> int:
        return r + d

    @classmethod
    def check_options(cls, options: dict) -> dict:
        full = super().check_options(options)
        if not 0 <= full["vera_seed"] < 2**32:  # the generator's seed is built from it and must fit 64 bits
            raise LoRAError(
                f"Variant 'vera': vera_seed must be a non-negative integer below 2**32, got {full['vera_seed']!r}."
            )
        if not (0 < full["d_init"] < math.inf):
            raise LoRAError(f"Variant 'vera': d_init must be a positive finite number, got {full['d_init']!r}.")
        return full

    def __init__(self, base, r, alpha, dropout=0.0, init="gaussian", vera_seed=0, d_init=0.1):
        super().__init__(base, r, alpha, dropout, init, vera_seed=vera_seed, d_init=d_init)
        del self.lora_A, self.lora_B  # VeRA trains no matrices
        w, (d, k) = base.weight, (base.out_features, base.in_features)
        self.vera_seed = vera_seed
        A, B = shared_pair(vera_seed, r, d, k)
        self.register_buffer("vera_A", A.to(w.device, w.dtype), persistent=False)  # regenerated, never saved
        self.register_buffer("vera_B", B.to(w.device, w.dtype), persistent=False)
        self.vera_d = nn.Parameter(torch.full((r,), float(d_init), device=w.device, dtype=w.dtype))
        self.vera_b = nn.Parameter(torch.zeros(d, device=w.device, dtype=w.dtype))  # zero => ΔW = 0

    @property
    def scale(self) -> float:
        return 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or not self.enabled:
            return self.base(x)
        return self.base(x) + self.vera_b * F.linear(
            F.linear(self.lora_dropout(x), self.vera_A) * self.vera_d, self.vera_B
        )

    def delta_weight(self) -> torch.Tensor:
        """diag(b) B diag(d) A (fp32)."""
        f = lambda t: t.detach().float()  # noqa: E731
        return (f(self.vera_b)[:, None] * f(self.vera_B)) @ (f(self.vera_d)[:, None] * f(self.vera_A))

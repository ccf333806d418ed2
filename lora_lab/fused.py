"""One fast path for LoRA: layers that read the same input (q, k and v) computed together.

LoRALinear.forward is the reference: per adapted matrix a base matmul, two thin matmuls, a scale and an add,
and their backward. On a GPU at this course's widths (d = 384) a training step is bound by how many kernels
it launches, not by matrix work, so three adapted q/k/v layers cost far more than their FLOPs. Here the same
sums run as one matmul for the three bases, one for the three A's and one for the three B's:

    y = x @ [Wq; Wk; Wv]^T + (scale * x @ [Aq; Ak; Av]^T) @ blockdiag(Bq, Bk, Bv)^T     (..., dq + dk + dv)

The block-diagonal B keeps each layer's update its own: layer i's output columns see only its r columns of
the low-rank intermediate. tests/test_fused.py checks values and gradients against the reference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def grouped_linear(x: torch.Tensor, weights, biases, lora_As=None, lora_Bs=None, scale: float = 1.0) -> torch.Tensor:
    """The outputs of several linear layers on the same x, concatenated: (..., k) -> (..., Σd).

    weights: the layers' (d_i, k) matrices; biases: their (d_i,) vectors, or all None. With lora_As (r_i, k)
    and lora_Bs (d_i, r_i), each layer adds scale * B_i A_i x, as LoRALinear.forward does.
    """
    weight = torch.cat(weights)  # (Σd, k)
    bias = None if biases[0] is None else torch.cat(biases)  # (Σd,)
    y = F.linear(x, weight, bias)  # (..., Σd)
    if lora_As is None:
        return y
    h = F.linear(x, torch.cat(lora_As)) * scale  # (..., Σr); scaled while r-wide, as the reference does
    B = torch.block_diag(*lora_Bs)  # (Σd, Σr), zero outside layer i's (d_i, r_i) block
    d = y.size(-1)
    # addmm adds the update into the base output inside the matmul: one kernel instead of a matmul and an add
    out = torch.addmm(y.reshape(-1, d), h.reshape(-1, h.size(-1)), B.t())  # (N, Σd)
    return out.view(y.shape)

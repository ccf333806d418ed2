"""One fast path for LoRA: layers that read the same input (q, k and v) computed together.

LoRALinear.forward is the reference: per adapted matrix a base matmul, two thin matmuls, a scale and an add,
and their backward. On a GPU at this course's widths (d = 384) a training step is bound by how many kernels
it launches, not by matrix work, so three adapted q/k/v layers cost far more than their FLOPs. Here the same
sums run as one matmul for the three bases, one for the three A's and one for the three B's:

    y = x @ [Wq; Wk; Wv]^T + (scale * x @ [Aq; Ak; Av]^T) @ blockdiag(Bq, Bk, Bv)^T     (..., dq + dk + dv)

The block-diagonal B keeps each layer's update its own: layer i's output columns see only its r columns of
the low-rank intermediate. tests/test_fused.py checks values and gradients against the reference.

Which layers may be computed together is decided here too (`can_join`, `lora_together`); the model asks
through LoRALinear.forward_together, and any layer that cannot join runs its own forward.
"""

from __future__ import annotations

import torch
import torch.nn as nn
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


def can_join(layer, reference) -> bool:
    """Whether a LoRA layer computes what the fast path computes: its class runs `reference` (LoRALinear's
    own forward; a variant with its own forward computes something else), it has not opted out
    (`fuse_with_siblings = False`, e.g. set_fast_path), no LoRA dropout runs (one mask per layer), and its base
    is a plain linear, computing x W^T + b from a stored W (a base with its own forward, such as nf4.NF4Linear,
    which dequantizes W on the fly and keeps no full-precision copy, runs itself)."""
    return (
        layer.fuse_with_siblings
        and type(layer).forward is reference
        and type(layer.base).forward is nn.Linear.forward
        and (not layer.training or isinstance(layer.lora_dropout, nn.Identity))
    )


def lora_together(layers, x: torch.Tensor, reference) -> torch.Tensor | None:
    """The outputs of LoRA `layers` on the same x (the model's q, k and v), concatenated (..., Σd): the same
    sums as calling each layer, in three matmuls instead of nine. None where they cannot be computed
    together, and the caller then runs each layer itself: a layer that cannot join (can_join), biases on
    some layers only, unequal scales, or a mix of merged/disabled and active layers. (Module hooks are the
    caller's to check: it is the caller that skips calling the modules.)"""
    if not all(can_join(l, reference) for l in layers) or len({l.base.bias is None for l in layers}) > 1:
        return None
    weights, biases = [l.base.weight for l in layers], [l.base.bias for l in layers]
    active = [not l.merged and l.enabled for l in layers]
    if not any(active):  # merged or disabled: each layer is its base
        return grouped_linear(x, weights, biases)
    if not all(active) or len({l.scale for l in layers}) > 1:
        return None
    return grouped_linear(x, weights, biases, [l.lora_A for l in layers], [l.lora_B for l in layers], layers[0].scale)

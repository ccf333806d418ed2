"""Adapter layers (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP"): the baseline the
LoRA paper compares inference latency with.

A bottleneck adapter is a small residual MLP, h + up(gelu(down(h))), inserted after a sublayer's output.
Houlsby et al. put one after the attention and one after the MLP of every block. Unlike LoRA's update,
the nonlinearity means it can never be folded into the existing weights: it runs as extra, sequential
layers on every forward pass, which is what costs latency at small batch sizes.

    model = add_adapter_layers(gpt, bottleneck=8)   # in place; only the adapters train
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..model import GPT


class BottleneckAdapter(nn.Module):
    """h -> h + up(gelu(down(h))): C -> bottleneck -> C. `up` starts at zero, so the adapter starts as the identity."""

    def __init__(self, width: int, bottleneck: int):
        super().__init__()
        self.down = nn.Linear(width, bottleneck)
        self.up = nn.Linear(bottleneck, width)
        nn.init.zeros_(self.up.weight)  # as LoRA's B = 0: the adapted model starts exactly equal to the base
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(F.gelu(self.down(h)))


class WithAdapter(nn.Module):
    """A sublayer followed by a bottleneck adapter on its output (before the block's residual add)."""

    def __init__(self, sublayer: nn.Module, width: int, bottleneck: int):
        super().__init__()
        self.sublayer = sublayer
        self.adapter = BottleneckAdapter(width, bottleneck)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.sublayer(x))


def adapter_layer_params(n_layer: int, width: int, bottleneck: int) -> int:
    """Trainable numbers of two adapters per block: each has down (C x m + m) and up (m x C + C)."""
    with torch.device("meta"):  # counted on the module itself: shapes only, no memory, no random numbers
        per_adapter = sum(p.numel() for p in BottleneckAdapter(width, bottleneck).parameters())
    return n_layer * 2 * per_adapter


def add_adapter_layers(model: GPT, bottleneck: int) -> GPT:
    """Insert a bottleneck adapter after the attention and after the MLP of every block, in place.

    Freezes every original weight; only the adapters train. Checked before anything is changed: on an error
    the model is exactly as it was.
    """
    if not isinstance(model, GPT):
        raise ValueError(f"add_adapter_layers needs a lora_lab GPT, got {type(model).__name__}.")
    if isinstance(bottleneck, bool) or not isinstance(bottleneck, int) or bottleneck < 1:
        raise ValueError(f"bottleneck must be a positive integer, got {bottleneck!r}.")
    if any(isinstance(block.attn, WithAdapter) or isinstance(block.mlp, WithAdapter) for block in model.blocks):
        raise ValueError("This model already has adapter layers; adding a second set would stack them.")
    width = model.config.n_embd
    reference = next(model.parameters())
    model.requires_grad_(False)
    for block in model.blocks:
        block.attn = WithAdapter(block.attn, width, bottleneck).to(reference.device)
        block.mlp = WithAdapter(block.mlp, width, bottleneck).to(reference.device)
    return model


def adapter_layers(model: nn.Module) -> list[BottleneckAdapter]:
    return [m for m in model.modules() if isinstance(m, BottleneckAdapter)]

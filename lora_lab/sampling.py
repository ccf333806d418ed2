"""Sampling text from a GPT: the one function the CLI, the widgets and the notebooks all use.

`sample_text` encodes the prompt, runs `GPT.generate` in eval mode (dropout off) with its own seeded
torch.Generator on the model's device, and decodes only the new characters. So the same seed gives the
same text for the same model on the same machine, whether the model was in train or eval mode, and the
caller's mode (and the global random state) are left exactly as they were.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .model import eval_mode


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}.")


def sample_text(
    model: nn.Module,
    tokenizer,
    prompt: str = "\n",
    length: int = 200,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
) -> str:
    """Generate `length` characters after `prompt` and return them (without the prompt).

    length may be 0 (returns ""); temperature is a positive finite number; top_k a positive integer
    or None (all characters); seed a 64-bit integer. Raises ValueError naming the argument that is
    wrong, or the prompt character the tokenizer does not know.
    """
    if not isinstance(prompt, str) or not prompt:
        raise ValueError(f"The prompt must be a non-empty string (at least one character), got {prompt!r}.")
    _check_int("length", length, 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or not -(2**63) <= seed < 2**64:
        raise ValueError(f"seed must be an integer in [-2**63, 2**64), got {seed!r}.")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature < math.inf:
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}.")
    if top_k is not None:
        _check_int("top_k", top_k, 1)
    device = next(model.parameters()).device
    idx = torch.tensor([tokenizer.encode(prompt)], dtype=torch.long, device=device)  # (1, len(prompt))
    generator = torch.Generator(device=device).manual_seed(seed)
    with eval_mode(model):
        out = model.generate(idx, length, temperature=temperature, top_k=top_k, generator=generator)
    return tokenizer.decode(out[0, idx.size(1) :].cpu())

"""Which layers LoRA adapts: target patterns, weight tying, and the error messages that explain a miss.

Nothing here changes a model. An adapted layer (any LoRA variant) is recognised by `is_lora_layer`:
a module that wraps a frozen nn.Linear as `.base` and says so with the class flag `wraps_linear = True`.
It counts as its base when targets are resolved, so a config can be checked against an adapted model too.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

import torch.nn as nn

from .errors import LoRAError


def is_lora_layer(module: nn.Module) -> bool:
    return getattr(type(module), "wraps_linear", False) is True


def matches(name: str, pattern: str) -> bool:
    """fnmatch against the full dotted name ("blocks.0.attn.q_proj") or its last component ("q_proj")."""
    return fnmatchcase(name, pattern) or fnmatchcase(name.rpartition(".")[2], pattern)


def named_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Named modules, without the root and without the insides of LoRA layers (their base, dropout)."""
    out, adapted = {}, []
    for name, module in model.named_modules():
        if name and not any(name.startswith(p + ".") for p in adapted):
            out[name] = module
            if is_lora_layer(module):
                adapted.append(name)
    return out


def tied_parameters(model: nn.Module) -> dict[int, list[str]]:
    """id(parameter) -> every name it is registered under, for parameters shared by several modules."""
    seen: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        seen.setdefault(id(p), []).append(name)
    return {i: names for i, names in seen.items() if len(names) > 1}


def parent_of(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent, _, attr = name.rpartition(".")
    return (model.get_submodule(parent) if parent else model), attr


def _linear_summary(modules: dict[str, nn.Module]) -> str:
    names = [n for n, m in modules.items() if isinstance(m, nn.Linear) or is_lora_layer(m)]
    short = list(dict.fromkeys(n.rpartition(".")[2] for n in names))
    return f"{', '.join(short)} (full names like {names[0]!r})" if names else "none"


def target_linears(model: nn.Module, patterns, r: int) -> dict[str, nn.Linear]:
    """Resolve target patterns to {name: nn.Linear} (a LoRA layer counts as its base). Raises, never mutates."""
    modules, tied, chosen = named_modules(model), tied_parameters(model), {}
    for pattern in patterns:
        hits = [n for n in modules if matches(n, pattern)]
        linear = [n for n in hits if isinstance(modules[n], nn.Linear) or is_lora_layer(modules[n])]
        if not linear:
            kinds = ", ".join(f"{n} ({type(modules[n]).__name__})" for n in hits[:6])
            found = f"matches only {kinds}; " if hits else "matches no module; "
            raise LoRAError(
                f"LoRA target {pattern!r} {found}only nn.Linear layers can be targeted. "
                f"Linear layers in this model: {_linear_summary(modules)}."
            )
        for n in linear:
            base = modules[n].base if is_lora_layer(modules[n]) else modules[n]
            if id(base.weight) in tied:
                others = [t for t in tied[id(base.weight)] if not t.startswith(n + ".")]
                raise LoRAError(
                    f"LoRA target {n!r} shares its weight with {others} (weight tying); "
                    "merging ΔW into it would change the embedding too, so it cannot be targeted."
                )
            if r > min(base.out_features, base.in_features):
                raise LoRAError(
                    f"LoRA rank r={r} exceeds min(d, k) = min({base.out_features}, {base.in_features}) "
                    f"for {n!r}; B @ A cannot have rank above that."
                )
            chosen[n] = base
    return chosen


def trainable_parameters(model: nn.Module, patterns, targets) -> dict[str, nn.Parameter]:
    """Resolve `trainable` patterns to {unique parameter name: parameter}. Raises, never mutates."""
    modules, ids = named_modules(model), set()
    for pattern in patterns:
        hits = [n for n in modules if matches(n, pattern)]
        if not hits:
            short = ", ".join(dict.fromkeys(n.rpartition(".")[2] for n in modules))
            raise LoRAError(f"trainable pattern {pattern!r} matches no module; modules in this model: {short}.")
        for n in hits:
            clash = [t for t in targets if t == n or t.startswith(n + ".")]
            if clash:
                raise LoRAError(
                    f"trainable module {n!r} contains LoRA targets {clash[:4]}: a layer is either "
                    "adapted by LoRA or trained in full, not both."
                )
            ids.update(id(p) for p in modules[n].parameters())
    return {name: p for name, p in model.named_parameters() if id(p) in ids}


def select_targets(model: nn.Module, config) -> list[str]:
    """The module names `apply_lora(model, config)` would adapt, without changing the model.

    Raises LoRAError exactly where apply_lora would (a pattern matching no nn.Linear, a rank above
    min(d, k), a tied weight, a bad `trainable` pattern). Works on a model built on the "meta" device,
    so a config can be checked against a preset's shape at no cost.
    """
    if not all(hasattr(config, a) for a in ("targets", "trainable", "r")):
        raise LoRAError(f"select_targets needs a LoRAConfig, got {type(config).__name__}.")
    targets = target_linears(model, config.targets, config.r)
    trainable_parameters(model, config.trainable, targets)
    return list(targets)

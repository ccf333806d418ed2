"""LoRA: low-rank adaptation (Hu et al., 2021), written to be read top to bottom.

A frozen weight W (d x k, d = out_features, k = in_features) is adapted by a low-rank update

    W' = W + (alpha / r) * B @ A,        A: (r x k),  B: (d x r),  r << min(d, k)

Only A and B are trained: r * (d + k) numbers instead of d * k. The sections below are
1. the layer (LoRALinear), 2. choosing targets and freezing (apply_lora), 3. merging ΔW into W,
4. counting parameters. Adapters on disk and hot-swapping them live in adapters.py.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from fnmatch import fnmatchcase

import torch
import torch.nn as nn
import torch.nn.functional as F

INITS = ("gaussian", "kaiming")


class LoRAError(ValueError):
    """A LoRA setting or operation that cannot be done (bad rank, bad target, merging twice, ...)."""


class AdapterMismatchError(LoRAError):
    """An adapter that was made for another base model or does not fit this one's shapes."""


def _check_hyperparameters(r, alpha, dropout, init) -> None:
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise LoRAError(f"LoRA rank r must be a positive integer, got {r!r}.")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (0 < alpha < math.inf):
        raise LoRAError(f"LoRA alpha must be a positive finite number, got {alpha!r}.")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise LoRAError(f"LoRA dropout must be in [0, 1), got {dropout!r}.")
    if init not in INITS:
        raise LoRAError(f"LoRA init must be one of {INITS}, got {init!r}.")


@dataclass(frozen=True)
class LoRAConfig:
    """What to adapt and how. targets / trainable are module-name patterns (fnmatch), matched against the
    full dotted name ("blocks.0.attn.q_proj") or its last component ("q_proj"); "*.mlp.*" also works."""

    r: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    dropout: float = 0.0
    init: str = "gaussian"
    trainable: tuple[str, ...] = ()  # extra modules trained in full (e.g. "ln_f"), saved with the adapter

    def __post_init__(self):
        _check_hyperparameters(self.r, self.alpha, self.dropout, self.init)
        object.__setattr__(self, "alpha", float(self.alpha))
        for name in ("targets", "trainable"):
            value = getattr(self, name)
            value = (value,) if isinstance(value, str) else tuple(value)  # lists from JSON become tuples
            if not all(isinstance(p, str) and p for p in value):
                raise LoRAError(f"LoRAConfig.{name} must be non-empty strings, got {value!r}.")
            object.__setattr__(self, name, value)
        if not self.targets:
            raise LoRAError("LoRAConfig.targets is empty: name at least one nn.Linear module (e.g. 'q_proj').")

    def to_dict(self) -> dict:
        d = asdict(self)
        return {**d, "targets": list(self.targets), "trainable": list(self.trainable)}

    @classmethod
    def from_dict(cls, d: dict) -> "LoRAConfig":
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise LoRAError(f"Unknown LoRAConfig field(s): {sorted(unknown)}.")
        return cls(**d)


# ----------------------------------------------------------------------------------------------
# 1. The layer


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank branch: y = base(x) + scale * B(A(dropout(x))).

    Initialisation. One factor must start at zero so that B @ A = 0 and the adapted model is exactly
    the base model at step 0. B = 0 does that for any A. Training still starts: dL/dB = scale * g (A x)^T
    is non-zero because A is random, while dL/dA = scale * B^T g x^T is zero only until B has moved.
    (Both zero would be a saddle point: neither would ever get a gradient. Both random would start
    from a perturbed model.) So any random A works: "gaussian" (the paper; N(0, 1/k), which keeps each
    component of A x at the scale of a component of x) or "kaiming" (kaiming-uniform, as in loralib and
    PEFT). They differ only in the scale of A, which alpha / r and the learning rate absorb.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, init: str = "gaussian"):
        super().__init__()
        if not isinstance(base, nn.Linear) or isinstance(base, LoRALinear):
            raise LoRAError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}.")
        _check_hyperparameters(r, alpha, dropout, init)
        d, k = base.out_features, base.in_features
        if r > min(d, k):
            raise LoRAError(f"LoRA rank r={r} exceeds min(d, k) = min({d}, {k}); B @ A cannot have rank above that.")
        self.base = base
        self.r, self.alpha, self.init = r, float(alpha), init
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(r, k, device=w.device, dtype=w.dtype))  # (r, k)
        self.lora_B = nn.Parameter(torch.zeros(d, r, device=w.device, dtype=w.dtype))  # (d, r): zero => ΔW = 0
        if init == "gaussian":
            nn.init.normal_(self.lora_A, mean=0.0, std=1.0 / math.sqrt(k))
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # the default init of nn.Linear
        self.merged = False  # True while scale * B @ A is folded into base.weight
        self.enabled = True  # False: behave like the base layer

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., k)
        out = self.base(x)  # (..., d)
        if self.merged or not self.enabled:
            return out
        # Two thin matmuls (..., k) -> (..., r) -> (..., d): the d x k matrix B @ A is never formed, and
        # the frozen base weight gets no weight-gradient matmul (autograd skips it: requires_grad=False).
        # scale multiplies the r-wide intermediate rather than the d-wide output: same math, r/d the work.
        h = F.linear(self.lora_dropout(x), self.lora_A) * self.scale  # (..., r)
        return out + F.linear(h, self.lora_B)  # (..., d)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = scale * B @ A as a (d, k) fp32 matrix: for merging and analysis, never used in training."""
        return self.scale * (self.lora_B.detach().float() @ self.lora_A.detach().float())

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}, merged={self.merged}, enabled={self.enabled}"


# ----------------------------------------------------------------------------------------------
# 2. Targets and freezing


def _matches(name: str, pattern: str) -> bool:
    return fnmatchcase(name, pattern) or fnmatchcase(name.rpartition(".")[2], pattern)


def _modules(model: nn.Module) -> dict[str, nn.Module]:
    """Named modules, without the root and without the insides of LoRA layers (their base, dropout)."""
    out, lora = {}, []
    for name, module in model.named_modules():
        if name and not any(name.startswith(p + ".") for p in lora):
            out[name] = module
            if isinstance(module, LoRALinear):
                lora.append(name)
    return out


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in _modules(model).items() if isinstance(m, LoRALinear)}


def _linear_summary(modules: dict[str, nn.Module]) -> str:
    names = [n for n, m in modules.items() if isinstance(m, nn.Linear | LoRALinear)]
    short = list(dict.fromkeys(n.rpartition(".")[2] for n in names))
    return f"{', '.join(short)} (full names like {names[0]!r})" if names else "none"


def _tied(model: nn.Module) -> dict[int, list[str]]:
    """id(parameter) -> every name it is registered under, for parameters shared by several modules."""
    seen: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        seen.setdefault(id(p), []).append(name)
    return {i: names for i, names in seen.items() if len(names) > 1}


def _select_targets(model: nn.Module, patterns, r: int) -> dict[str, nn.Linear]:
    """Resolve target patterns to {name: nn.Linear} (a LoRA layer counts as its base). Raises, never mutates."""
    modules, tied, chosen = _modules(model), _tied(model), {}
    for pattern in patterns:
        hits = [n for n in modules if _matches(n, pattern)]
        linear = [n for n in hits if isinstance(modules[n], nn.Linear | LoRALinear)]
        if not linear:
            kinds = ", ".join(f"{n} ({type(modules[n]).__name__})" for n in hits[:6])
            found = f"matches only {kinds}; " if hits else "matches no module; "
            raise LoRAError(f"LoRA target {pattern!r} {found}only nn.Linear layers can be targeted. "
                            f"Linear layers in this model: {_linear_summary(modules)}.")
        for n in linear:
            base = modules[n].base if isinstance(modules[n], LoRALinear) else modules[n]
            if id(base.weight) in tied:
                others = [t for t in tied[id(base.weight)] if not t.startswith(n + ".")]
                raise LoRAError(f"LoRA target {n!r} shares its weight with {others} (weight tying); "
                                "merging ΔW into it would change the embedding too, so it cannot be targeted.")
            if r > min(base.out_features, base.in_features):
                raise LoRAError(f"LoRA rank r={r} exceeds min(d, k) = min({base.out_features}, {base.in_features}) "
                                f"for {n!r}; B @ A cannot have rank above that.")
            chosen[n] = base
    return chosen


def _select_trainable(model: nn.Module, config: LoRAConfig, targets) -> dict[str, nn.Parameter]:
    """Resolve config.trainable to {unique parameter name: parameter}. Raises, never mutates."""
    modules, ids = _modules(model), set()
    for pattern in config.trainable:
        hits = [n for n in modules if _matches(n, pattern)]
        if not hits:
            short = ", ".join(dict.fromkeys(n.rpartition(".")[2] for n in modules))
            raise LoRAError(f"trainable pattern {pattern!r} matches no module; modules in this model: {short}.")
        for n in hits:
            clash = [t for t in targets if t == n or t.startswith(n + ".")]
            if clash:
                raise LoRAError(f"trainable module {n!r} contains LoRA targets {clash[:4]}: a layer is either "
                                "adapted by LoRA or trained in full, not both.")
            ids.update(id(p) for p in modules[n].parameters())
    return {name: p for name, p in model.named_parameters() if id(p) in ids}


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent, _, attr = name.rpartition(".")
    return (model.get_submodule(parent) if parent else model), attr


def apply_lora(model: nn.Module, config: LoRAConfig | None = None) -> nn.Module:
    """Wrap every target nn.Linear in a LoRALinear, in place, and freeze all but A, B and `trainable`.

    Everything is validated before the model is touched: on any error the model is exactly as it was.
    """
    config = LoRAConfig() if config is None else config
    if not isinstance(config, LoRAConfig):
        raise LoRAError(f"apply_lora needs a LoRAConfig, got {type(config).__name__}.")
    existing = lora_layers(model)
    if existing:
        raise LoRAError(f"LoRA is already applied to {list(existing)[:4]}{' ...' if len(existing) > 4 else ''}; "
                        "applying it twice would stack adapters. Use load_adapter to replace the LoRA tensors, "
                        "or merge_and_unload first.")
    targets = _select_targets(model, config.targets, config.r)
    trainable = _select_trainable(model, config, targets)
    model.requires_grad_(False)
    for name, linear in targets.items():
        parent, attr = _parent(model, name)
        setattr(parent, attr, LoRALinear(linear, config.r, config.alpha, config.dropout, config.init))
    for p in trainable.values():
        p.requires_grad_(True)
    model.lora_config = config  # remembered for save_adapter / export
    return model


def _require_lora(model: nn.Module) -> dict[str, LoRALinear]:
    layers = lora_layers(model)
    if not layers:
        raise LoRAError("The model has no LoRA layers; call apply_lora(model, LoRAConfig(...)) first.")
    return layers


def set_lora_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch every LoRA branch on or off (off: the model computes exactly the base model)."""
    layers = _require_lora(model)
    if not enabled and any(layer.merged for layer in layers.values()):
        raise LoRAError("Cannot disable LoRA while it is merged into the weights; call unmerge_lora first.")
    for layer in layers.values():
        layer.enabled = bool(enabled)


def select_targets(model: nn.Module, config: LoRAConfig) -> list[str]:
    """The module names `apply_lora(model, config)` would adapt, without changing the model.

    Raises LoRAError exactly where apply_lora would (a pattern matching no nn.Linear, a rank above
    min(d, k), a tied weight, a bad `trainable` pattern). Works on a model built on the "meta" device,
    so a config can be checked against a preset's shape at no cost.
    """
    if not isinstance(config, LoRAConfig):
        raise LoRAError(f"select_targets needs a LoRAConfig, got {type(config).__name__}.")
    targets = _select_targets(model, config.targets, config.r)
    _select_trainable(model, config, targets)
    return list(targets)


# ----------------------------------------------------------------------------------------------
# 3. Merging: W <- W ± scale * B @ A, so inference costs exactly what the base model costs


def _fold(layers: dict[str, LoRALinear], sign: int, action: str) -> None:
    # Compute every new weight first (fp32 math, one rounding back to the weight's dtype), check them
    # all, and only then write: a refused merge leaves every layer as it was.
    new = {n: (l.base.weight.float() + sign * l.delta_weight()).to(l.base.weight.dtype) for n, l in layers.items()}
    bad = [n for n, w in new.items() if not torch.isfinite(w).all()]
    if bad:
        raise LoRAError(f"Refusing to {action}: the result would contain NaN/Inf in {bad}; weights left unchanged.")
    with torch.no_grad():
        for n, layer in layers.items():
            if sign > 0:
                # W + ΔW is rounded to W's dtype (in bf16 to ~3 digits), so W - ΔW would not give W back:
                # keep W itself while merged (a non-persistent buffer: it follows .to(), is never saved).
                layer.register_buffer("weight_before_merge", layer.base.weight.detach().clone(), persistent=False)
                layer.base.weight.copy_(new[n])
            else:
                kept = getattr(layer, "weight_before_merge", None)
                # W comes back exactly if the merged weight is still what merging made of it (it was not
                # edited or trained while merged); otherwise subtracting ΔW is the best there is.
                unchanged = kept is not None and torch.equal(
                    layer.base.weight, (kept.float() + layer.delta_weight()).to(kept.dtype))
                layer.base.weight.copy_(kept if unchanged else new[n])
                layer.weight_before_merge = None
            layer.merged = sign > 0


def merge_lora(model: nn.Module) -> None:
    """Fold ΔW = scale * B @ A into each adapted weight: W <- W + ΔW (fp32 math, rounded once to W's dtype).

    Memory: while merged, each adapted layer keeps a copy of its original W (d * k numbers in W's dtype,
    e.g. 64 KiB for a 128 x 128 fp32 layer) so that unmerge_lora restores W bit for bit in every dtype;
    unmerge_lora and merge_and_unload drop it.
    """
    layers = _require_lora(model)
    merged = [n for n, l in layers.items() if l.merged]
    if merged:
        raise LoRAError(f"LoRA is already merged into {merged[:4]}; merging twice would add ΔW twice.")
    if not all(l.enabled for l in layers.values()):
        raise LoRAError("Cannot merge while LoRA is disabled (set_lora_enabled(model, True) first).")
    _fold(layers, +1, "merge")


def unmerge_lora(model: nn.Module) -> None:
    """Undo merge_lora: W comes back exactly (bit for bit, in fp32, bf16 and fp16) from the copy kept
    while merged. If W was changed while merged (e.g. trained), ΔW is subtracted instead (fp32 math)."""
    layers = _require_lora(model)
    unmerged = [n for n, l in layers.items() if not l.merged]
    if unmerged:
        raise LoRAError(f"LoRA is not merged into {unmerged[:4]}; there is nothing to unmerge.")
    _fold(layers, -1, "unmerge")


def _unwrap(model: nn.Module) -> None:
    """Put each LoRA layer's own base nn.Linear back (same object, same weight tensor)."""
    for name, layer in lora_layers(model).items():
        parent, attr = _parent(model, name)
        setattr(parent, attr, layer.base)
    if "lora_config" in model.__dict__:
        del model.lora_config
    model.requires_grad_(True)  # a plain model again, trainable like a fresh one


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge (if not merged yet) and return the same model as a plain GPT without LoRA modules."""
    layers = _require_lora(model)
    if not all(l.merged for l in layers.values()):
        merge_lora(model)
    for layer in layers.values():
        layer.weight_before_merge = None  # the copy kept for unmerging is not needed any more
    _unwrap(model)
    return model


# ----------------------------------------------------------------------------------------------
# 4. Counting parameters


@dataclass(frozen=True)
class ParameterRow:
    name: str
    d: int  # out_features
    k: int  # in_features
    r: int
    lora_params: int  # r * (d + k): A and B
    full_params: int  # d * k: the matrix a full fine-tune would train


@dataclass(frozen=True)
class ParameterReport:
    rows: tuple[ParameterRow, ...]
    lora_params: int
    total_params: int  # unique parameters (the tied embedding counts once), LoRA included
    trainable_params: int

    @property
    def trainable_fraction(self) -> float:
        return self.trainable_params / self.total_params

    def to_text(self) -> str:
        lines = [f"{'module':<28}{'d':>6}{'k':>6}{'r':>4}{'r(d+k)':>10}{'d*k':>10}"]
        lines += [f"{w.name:<28}{w.d:>6}{w.k:>6}{w.r:>4}{w.lora_params:>10,}{w.full_params:>10,}" for w in self.rows]
        full = sum(w.full_params for w in self.rows)
        lines.append(f"LoRA parameters: {self.lora_params:,} (vs {full:,} in the adapted matrices)")
        lines.append(f"trainable: {self.trainable_params:,} of {self.total_params:,} ({self.trainable_fraction:.3%})")
        return "\n".join(lines)


def parameter_report(model: nn.Module) -> ParameterReport:
    rows = tuple(
        ParameterRow(n, l.base.out_features, l.base.in_features, l.r,
                     l.r * (l.base.out_features + l.base.in_features), l.base.out_features * l.base.in_features)
        for n, l in lora_layers(model).items()
    )
    params = list(model.parameters())  # unique: lm_head.weight is tok_emb.weight
    return ParameterReport(rows, sum(w.lora_params for w in rows), sum(p.numel() for p in params),
                           sum(p.numel() for p in params if p.requires_grad))

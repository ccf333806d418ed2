"""LoRA: low-rank adaptation (Hu et al., 2021), written to be read top to bottom.

A frozen weight W (d x k, d = out_features, k = in_features) is adapted by a low-rank update

    W' = W + (alpha / r) * B @ A,        A: (r x k),  B: (d x r),  r << min(d, k)

Only A and B are trained: r * (d + k) numbers instead of d * k. The sections below are
1. the settings (LoRAConfig), 2. the layer (LoRALinear), 3. apply_lora, 4. merging ΔW into W,
5. counting parameters, 6. the registry of variants. Choosing targets lives in targets.py, the q/k/v fast
path in fused.py, the other variants in variants/, adapters on disk and hot-swapping them in storage/.
"""

from __future__ import annotations

import importlib
import math
import warnings
from dataclasses import asdict, dataclass, field, fields
from importlib.metadata import entry_points

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import AdapterMismatchError, LoRAError, UnknownVariantError  # noqa: F401  (importable from here)
from .fused import lora_together
from .targets import is_lora_layer, named_modules, parent_of, select_targets, target_linears, trainable_parameters  # noqa: F401  (select_targets: importable from here, as before)

INITS = ("gaussian", "kaiming")
# alpha (and so the scale alpha / r) is used as a float32 number: outside this range it turns into inf or 0.
ALPHA_RANGE = (torch.finfo(torch.float32).tiny, torch.finfo(torch.float32).max)


def _check_hyperparameters(r, alpha, dropout, init) -> None:
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise LoRAError(f"LoRA rank r must be a positive integer, got {r!r}.")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (0 < alpha < math.inf):
        raise LoRAError(f"LoRA alpha must be a positive finite number, got {alpha!r}.")
    if not ALPHA_RANGE[0] <= alpha <= ALPHA_RANGE[1]:
        raise LoRAError(
            f"LoRA alpha must be representable in float32, from {ALPHA_RANGE[0]:.3g} to {ALPHA_RANGE[1]:.3g} "
            f"(beyond, the scale alpha / r becomes inf or 0), got {alpha!r}."
        )
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise LoRAError(f"LoRA dropout must be in [0, 1), got {dropout!r}.")
    if init not in INITS:
        raise LoRAError(f"LoRA init must be one of {INITS}, got {init!r}.")


# ----------------------------------------------------------------------------------------------
# 1. Settings


@dataclass(frozen=True)
class LoRAConfig:
    """What to adapt and how. targets / trainable are module-name patterns (fnmatch), matched against the
    full dotted name ("blocks.0.attn.q_proj") or its last component ("q_proj"); "*.mlp.*" also works.
    `variant` names a registered LoRA variant (plain "lora" by default; `VARIANTS` lists them all),
    `options` its own hyperparameters (defaults filled in and validated here)."""

    r: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    dropout: float = 0.0
    init: str = "gaussian"
    trainable: tuple[str, ...] = ()  # extra modules trained in full (e.g. "ln_f"), saved with the adapter
    variant: str = "lora"
    options: dict = field(default_factory=dict, hash=False)

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
        if not isinstance(self.options, dict):
            raise LoRAError(
                f"LoRAConfig.options must be a dict of the variant's hyperparameters, got {self.options!r}."
            )
        object.__setattr__(self, "options", variant_class(self.variant).check_options(self.options))

    @property
    def layer_class(self) -> type:
        return variant_class(self.variant)

    def to_dict(self) -> dict:
        d = asdict(self)
        return {**d, "targets": list(self.targets), "trainable": list(self.trainable), "options": dict(self.options)}

    @classmethod
    def from_dict(cls, d: dict) -> LoRAConfig:
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise LoRAError(f"Unknown LoRAConfig field(s): {sorted(unknown)}.")
        return cls(**d)


# ----------------------------------------------------------------------------------------------
# 2. The layer


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank branch: y = base(x) + scale * B(A(dropout(x))).

    Trainable parameters per layer: r*(d+k)   (scale = alpha / r; Hu et al. 2021, arXiv:2106.09685)

    Initialisation. One factor must start at zero so that B @ A = 0 and the adapted model is exactly
    the base model at step 0. B = 0 does that for any A. Training still starts: dL/dB = scale * g (A x)^T
    is non-zero because A is random, while dL/dA = scale * B^T g x^T is zero only until B has moved.
    (Both zero would be a saddle point: neither would ever get a gradient. Both random would start
    from a perturbed model.) So any random A works: "gaussian" (the paper; N(0, 1/k), which keeps each
    component of A x at the scale of a component of x) or "kaiming" (kaiming-uniform, as in loralib and
    PEFT). They differ only in the scale of A, which alpha / r and the learning rate absorb.

    A variant is a subclass that overrides what differs and is decorated with @register_variant;
    check_variant(cls) runs the contract on it. Every hook it may set, in one place:

    hook                      default here             read by                  change it when
    ------------------------  -----------------------  -----------------------  ---------------------------------
    variant                   "lora"                   registry, LoRAConfig,    always: the variant's own name
                                                       adapter files
    parameter_formula         "r*(d+k)"                the docstring check,     always: the count as text, stated
                                                       check_variant            in the class docstring
    parameter_count(d, k, r)  r*(d+k)                  reports, course counts,  the layer trains other numbers
                              (classmethod)            check_variant            (plain arithmetic, = the formula)
    options, check_options    {}; names and types      LoRAConfig, the CLI      extra hyperparameters (defaults
                              checked, floats finite                            here); range rules: extend the check
    __init__                  A random, B = 0          apply_lora, loading      new tensors: nn.Parameter trains
                                                                                (requires_grad_(False) freezes it,
                                                                                apply_lora keeps that), a buffer is
                                                                                frozen (persistent: saved). Create
                                                                                them with the base weight's dtype
                                                                                and device
    forward                   base(x) + s B A x        the model                the method's output (keep the first
                                                                                lines: merged or disabled -> base)
    scale, scaling_rule       alpha / r, "alpha/r"     forward, adapter files   another scaling (rsLoRA)
    starts_at_base            True                     check_variant            False if step 0 is not the base
    lora_plus_names           ("lora_B",)              LoRA+ (train's           the output-side tensors have other
                                                       make_optimizer)          names; () opts out of LoRA+
    rows_independent          True                     MixedAdapterModel,       see below
                                                       check_variant
    fuse_with_siblings        True                     the q/k/v fast path      False: this layer always runs its
                                                       (fused.py)               own forward (set_fast_path)
    delta_weight              s B A (fp32)             merging, analysis        the update is not s B A
    merged_weight,            W + ΔW, W - ΔW           merge_lora,              a merge that is not additive (DoRA)
    unmerged_weight                                    unmerge_lora
    adapter_tensors           own parameters and       save_adapter, banks      rarely: what an adapter file holds
                              persistent buffers
    peft_flags, peft_names,   LoRA's flags, A and B,   export_peft,             map the tensors to PEFT's keys, or
    peft_refusal, to_peft     ""                       import_peft              refuse (peft_flags = None, and why)
    wraps_linear              True                     targets.is_lora_layer    never

    rows_independent says that the layer's output for one row of x depends on that row alone, so rows of
    one batch may use different adapters (MixedAdapterModel). It is a claim about forward: a subclass that
    writes its own forward starts at False and sets True itself where it holds. (A per-adapter statistic
    is fine: DoRA's norm ||W0 + sBA|| is one vector per adapter, the same for every row.)
    The q/k/v fast path computes only this class's own forward; a variant with its own forward is never
    fused (the rules are in fused.py).
    """

    wraps_linear = True  # how targets.py recognises an adapted layer
    variant = "lora"
    parameter_formula = "r*(d+k)"
    options: dict = {}
    scaling_rule = "alpha/r"
    starts_at_base = True
    lora_plus_names = ("lora_B",)
    rows_independent = True
    peft_flags: dict | None = {"use_rslora": False, "use_dora": False}  # None: cannot be exported to PEFT
    peft_names = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight"}  # our tensor -> PEFT's key suffix
    peft_refusal = ""
    fuse_with_siblings = True

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "forward" in cls.__dict__ and "rows_independent" not in cls.__dict__:
            cls.rows_independent = False  # a new forward makes its own claim (see the docstring)

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, init: str = "gaussian", **options):
        super().__init__()
        if not isinstance(base, nn.Linear) or is_lora_layer(base):
            raise LoRAError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}.")
        _check_hyperparameters(r, alpha, dropout, init)
        self.check_options(options)
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
        self.merged = False  # True while the update is folded into base.weight
        self.enabled = True  # False: behave like the base layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., k) -> (..., d)
        if self.merged or not self.enabled:
            return self.base(x)
        # base(x) + scale * B(A(dropout(x))): two thin matmuls, so the d x k matrix B @ A is never formed and
        # the frozen weight gets no weight-gradient matmul. scale multiplies the r-wide intermediate (r/d the work).
        return self.base(x) + F.linear(F.linear(self.lora_dropout(x), self.lora_A) * self.scale, self.lora_B)

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    @classmethod
    def parameter_count(cls, d: int, k: int, r: int) -> int:
        """The numbers one layer trains on a d x k weight at rank r (the class's parameter_formula)."""
        return r * (d + k)

    @classmethod
    def from_config(cls, base: nn.Linear, config: LoRAConfig) -> LoRALinear:
        return cls(base, config.r, config.alpha, config.dropout, config.init, **config.options)

    @classmethod
    def check_options(cls, options: dict) -> dict:
        """The variant's hyperparameters with defaults filled in; unknown names, wrong types and non-finite
        floats are refused. A variant with range rules overrides this, calls super() and checks the values."""
        unknown = sorted(set(options) - set(cls.options))
        if unknown:
            known = ", ".join(f"{n}={v!r}" for n, v in cls.options.items()) or "none"
            raise LoRAError(f"Variant {cls.variant!r} has no option(s) {unknown}; its options: {known}.")
        full = {**cls.options, **options}
        for name, value in full.items():
            default = cls.options[name]
            wanted = (int, float) if type(default) is float else type(default)
            if isinstance(value, bool) is not isinstance(default, bool) or not isinstance(value, wanted):
                raise LoRAError(
                    f"Variant {cls.variant!r}: option {name} must be a {type(default).__name__}, got {value!r}."
                )
            if isinstance(value, float) and not math.isfinite(value):
                raise LoRAError(f"Variant {cls.variant!r}: option {name} must be a finite number, got {value!r}.")
        return full

    @classmethod
    def forward_together(cls, layers, x: torch.Tensor) -> torch.Tensor | None:
        """The q/k/v fast path (model.project_qkv asks the layers' class): the outputs of `layers` on the same x,
        concatenated (..., Σd), or None where fused.py's rules say they cannot be computed together."""
        return lora_together(layers, x, reference=LoRALinear.forward)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = scale * B @ A as a (d, k) fp32 matrix: for merging and analysis, never used in training."""
        return self.scale * (self.lora_B.detach().float() @ self.lora_A.detach().float())

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight that computes this layer's output alone (fp32 in, fp32 out): W + ΔW for additive variants."""
        return weight + self.delta_weight()

    def unmerged_weight(self, merged: torch.Tensor) -> torch.Tensor:
        """Inverse of merged_weight, used only if the merged weight was changed (e.g. trained) while merged."""
        return merged - self.delta_weight()

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """The layer's own tensors, as saved in an adapter file: parameters and persistent buffers, not the base."""
        return {n: t for n, t in self.state_dict(keep_vars=True).items() if not n.startswith("base.")}

    def to_peft(self) -> tuple[int, float, dict[str, torch.Tensor]]:
        """(PEFT r, PEFT lora_alpha, {PEFT key suffix: tensor}) of this layer."""
        if self.peft_flags is None:
            raise LoRAError(f"Variant {self.variant!r} cannot be exported to PEFT: {self.peft_refusal}")
        tensors = self.adapter_tensors()
        unmapped = sorted(set(tensors) - set(self.peft_names))
        if unmapped:
            raise LoRAError(
                f"Variant {self.variant!r} cannot be exported to PEFT: its tensors {unmapped} have no "
                "place in PEFT's LoRA (map them in peft_names, override to_peft, or set "
                "peft_flags = None)."
            )
        return self.r, self.alpha, {self.peft_names[n]: t for n, t in tensors.items()}

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}, merged={self.merged}, enabled={self.enabled}"


# ----------------------------------------------------------------------------------------------
# 3. Adapting a model: wrap the targets, freeze the rest


def apply_lora(model: nn.Module, config: LoRAConfig | None = None) -> nn.Module:
    """Wrap every target nn.Linear in the config's variant of LoRALinear, in place, and freeze the rest
    except `trainable`. Each new layer keeps the requires_grad flags its variant gave its own tensors, and
    takes the train/eval mode of the Linear it replaces.

    Everything is validated and every new layer is built before the model is touched: on any error the
    model is exactly as it was.
    """
    config = LoRAConfig() if config is None else config
    if not isinstance(config, LoRAConfig):
        raise LoRAError(f"apply_lora needs a LoRAConfig, got {type(config).__name__}.")
    wrapped = next((n for n, m in model.named_modules() if isinstance(m, nn.parallel.DistributedDataParallel)), None)
    if wrapped is not None:
        where = "the model" if wrapped == "" else f"its module {wrapped!r}"
        raise WrappedModelError(
            f"apply_lora: {where} is already wrapped in DistributedDataParallel. DDP registered the parameters "
            "it all-reduces when it was built, so LoRA's new A and B would never be synchronised and the ranks "
            "would silently drift apart. Apply LoRA before wrapping: DistributedDataParallel(apply_lora(model, "
            "config)) (train() does that order for you)."
        )
    existing = lora_layers(model)
    if existing:
        raise LoRAError(
            f"LoRA is already applied to {list(existing)[:4]}{' ...' if len(existing) > 4 else ''}; "
            "applying it twice would stack adapters. Use load_adapter to replace the LoRA tensors, "
            "or merge_and_unload first."
        )
    targets = target_linears(model, config.targets, config.r)
    trainable = trainable_parameters(model, config.trainable, targets)
    layers = {name: config.layer_class.from_config(linear, config) for name, linear in targets.items()}
    model.requires_grad_(False)  # the layers are not in the model yet: only the base is frozen here
    for name, layer in layers.items():
        layer.train(targets[name].training)  # in an eval model, LoRA dropout is off from the start
        parent, attr = parent_of(model, name)
        setattr(parent, attr, layer)
    for p in trainable.values():
        p.requires_grad_(True)
    model.lora_config = config  # remembered for save_adapter / export
    return model


class WrappedModelError(LoRAError):
    """apply_lora on a model already wrapped for data parallelism (DistributedDataParallel): apply LoRA first."""


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in named_modules(model).items() if is_lora_layer(m)}


def require_lora(model: nn.Module) -> dict[str, LoRALinear]:
    layers = lora_layers(model)
    if not layers:
        raise LoRAError("The model has no LoRA layers; call apply_lora(model, LoRAConfig(...)) first.")
    return layers


def own_parameters(layer: LoRALinear) -> dict[str, nn.Parameter]:
    """A LoRA layer's own parameters (everything but its frozen base); those with requires_grad are trained."""
    return {n: p for n, p in layer.named_parameters() if not n.startswith("base.")}


def lora_plus_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters LoRA+ (Hayou et al. 2024, arXiv:2402.12354) trains at a higher learning rate: each
    layer's trainable `lora_plus_names` (its output-side tensors). Empty for a model without LoRA; a layer
    whose names match none of its trainable tensors is refused, naming its variant."""
    out = []
    for name, layer in lora_layers(model).items():
        trained = {n: p for n, p in own_parameters(layer).items() if p.requires_grad}
        fast = [p for n, p in trained.items() if n in layer.lora_plus_names]
        if not fast:
            raise LoRAError(
                f"LoRA+ trains each layer's lora_plus_names faster, but variant {layer.variant!r} names "
                f"{tuple(layer.lora_plus_names)} and its layer {name!r} trains {sorted(trained)}: set "
                "lora_plus_names on the variant to its output-side tensors (or do not use LoRA+ with it)."
            )
        out += fast
    return out


def set_lora_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch every LoRA branch on or off (off: the model computes exactly the base model, for every variant)."""
    layers = require_lora(model)
    if not enabled and any(layer.merged for layer in layers.values()):
        raise LoRAError("Cannot disable LoRA while it is merged into the weights; call unmerge_lora first.")
    for layer in layers.values():
        layer.enabled = bool(enabled)


def set_fast_path(model: nn.Module, enabled: bool) -> None:
    """Let adapted q/k/v layers compute together (fused.py; the default) or make every LoRA layer run its own
    LoRALinear.forward, the reference (to compare speed or check the fast path). The results are equal either way."""
    for layer in require_lora(model).values():
        layer.fuse_with_siblings = bool(enabled)


def unload_lora(model: nn.Module) -> nn.Module:
    """Put each LoRA layer's own base nn.Linear back (same object, same weight tensor), without merging.

    The model is the plain base again, trainable like a fresh one (merged layers are refused: unmerge first)."""
    layers = lora_layers(model)
    if any(l.merged for l in layers.values()):
        raise LoRAError("LoRA is merged into the weights; unmerge_lora first (or use merge_and_unload).")
    _unwrap(model)
    return model


def _unwrap(model: nn.Module) -> None:
    for name, layer in lora_layers(model).items():
        parent, attr = parent_of(model, name)
        setattr(parent, attr, layer.base)
    if "lora_config" in model.__dict__:
        del model.lora_config
    model.requires_grad_(True)


# ----------------------------------------------------------------------------------------------
# 4. Merging: W <- the layer's merged weight (W + ΔW for additive variants), so inference costs what the base costs


def _fold(layers: dict[str, LoRALinear], sign: int, action: str) -> None:
    # Compute every new weight first (fp32 math, one rounding back to the weight's dtype), check them
    # all, and only then write: a refused merge leaves every layer as it was.
    new = {}
    for n, l in layers.items():
        w = l.base.weight.float()
        new[n] = (l.merged_weight(w) if sign > 0 else l.unmerged_weight(w)).to(l.base.weight.dtype)
    bad = [n for n, w in new.items() if not torch.isfinite(w).all()]
    if bad:
        raise LoRAError(f"Refusing to {action}: the result would contain NaN/Inf in {bad}; weights left unchanged.")
    with torch.no_grad():
        for n, layer in layers.items():
            if sign > 0:
                # The merged weight is rounded to W's dtype, so undoing the merge by subtraction would not
                # give W back in bf16: keep W itself while merged (a non-persistent buffer: follows .to(), never saved).
                layer.register_buffer("weight_before_merge", layer.base.weight.detach().clone(), persistent=False)
                layer.base.weight.copy_(new[n])
            else:
                kept = getattr(layer, "weight_before_merge", None)
                # W comes back exactly if the merged weight is still what merging made of it (it was not
                # edited or trained while merged); otherwise the variant's inverse is the best there is.
                unchanged = kept is not None and torch.equal(
                    layer.base.weight, layer.merged_weight(kept.float()).to(kept.dtype)
                )
                layer.base.weight.copy_(kept if unchanged else new[n])
                layer.weight_before_merge = None
            layer.merged = sign > 0


class QuantizedBaseError(LoRAError):
    """An operation that would write into a quantized base weight (nf4.NF4Linear), which cannot be written."""


def is_quantized(module: nn.Module) -> bool:
    """A linear stored quantized: its class names the format in `quantized` and offers `to_linear(dtype)`, a plain
    nn.Linear of its dequantized weight (nf4.NF4Linear does; the spine before nf4.py cannot import it)."""
    return isinstance(getattr(type(module), "quantized", None), str) and callable(getattr(module, "to_linear", None))


def quantized_bases(layers: dict[str, LoRALinear]) -> list[str]:
    """The LoRA layers whose base is stored quantized (is_quantized)."""
    return [n for n, l in layers.items() if is_quantized(l.base)]


def merge_lora(model: nn.Module) -> None:
    """Fold each layer's update into its weight (W <- W + ΔW for additive variants; fp32 math, rounded once).

    Memory: while merged, each adapted layer keeps a copy of its original W (d * k numbers in W's dtype)
    so that unmerge_lora restores W bit for bit in every dtype; unmerge_lora and merge_and_unload drop it.
    A quantized base (QLoRA) holds no weight to write into: refused with QuantizedBaseError (merge_and_unload
    dequantizes it first).
    """
    layers = require_lora(model)
    quantized = quantized_bases(layers)
    if quantized:
        raise QuantizedBaseError(
            f"Cannot merge LoRA in place into {quantized[:4]}: their base is quantized "
            f"({layers[quantized[0]].base.quantized}, QLoRA) and holds 4-bit codes, not a weight that W + ΔW could "
            "be written into. Use merge_and_unload(model, dtype=...), which first dequantizes those bases into "
            "plain nn.Linear layers (the merged model is then no longer 4-bit)."
        )
    merged = [n for n, l in layers.items() if l.merged]
    if merged:
        raise LoRAError(f"LoRA is already merged into {merged[:4]}; merging twice would add ΔW twice.")
    if not all(l.enabled for l in layers.values()):
        raise LoRAError("Cannot merge while LoRA is disabled (set_lora_enabled(model, True) first).")
    _fold(layers, +1, "merge")


def unmerge_lora(model: nn.Module) -> None:
    """Undo merge_lora: W comes back exactly (bit for bit, in fp32, bf16 and fp16) from the copy kept
    while merged. If W was changed while merged (e.g. trained), the variant's inverse is applied (fp32 math)."""
    layers = require_lora(model)
    unmerged = [n for n, l in layers.items() if not l.merged]
    if unmerged:
        raise LoRAError(f"LoRA is not merged into {unmerged[:4]}; there is nothing to unmerge.")
    _fold(layers, -1, "unmerge")


def merge_and_unload(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Merge (if not merged yet) and return the same model as a plain GPT without LoRA modules.

    A quantized base (QLoRA: nf4.NF4Linear) cannot hold W + ΔW: it is first dequantized into a plain nn.Linear
    in `dtype` (default: the dtype it was quantized from), the update is merged into that, and the model's other
    quantized linears are dequantized too, so that the result is one plain model (a checkpoint like any other).
    A warning says that it is no longer 4-bit. `dtype` applies to quantized layers only."""
    layers = require_lora(model)
    quantized = quantized_bases(layers)
    if quantized:
        originals = {n: layers[n].base for n in quantized}
        for n in quantized:
            layers[n].base = originals[n].to_linear(dtype)
        try:
            merge_lora(model)
        except Exception:  # a refused merge leaves the model as it was: the quantized bases go back
            for n, base in originals.items():
                layers[n].base = base
            raise
    if not all(l.merged for l in layers.values()):
        merge_lora(model)
    for layer in layers.values():
        layer.weight_before_merge = None  # the copy kept for unmerging is not needed any more
    _unwrap(model)
    rest = {n: m for n, m in model.named_modules() if is_quantized(m)}  # not adapted, still 4-bit
    for name, module in rest.items():
        parent, attr = parent_of(model, name)
        setattr(parent, attr, module.to_linear(dtype).requires_grad_(True))  # trainable, as _unwrap leaves the rest
    if quantized or rest:
        first = originals[quantized[0]] if quantized else next(iter(rest.values()))
        kind = dtype or first.weight_dtype
        warnings.warn(
            f"merge_and_unload dequantized {len(quantized) + len(rest)} 4-bit layers ({len(quantized)} adapted, "
            f"LoRA merged into them) into {kind} nn.Linear layers: the merged model is no longer 4-bit "
            f"({torch.empty(0, dtype=kind).element_size()} bytes per weight).",
            stacklevel=2,
        )
    return model


# ----------------------------------------------------------------------------------------------
# 5. Counting parameters


@dataclass(frozen=True)
class ParameterRow:
    name: str
    d: int  # out_features
    k: int  # in_features
    r: int
    lora_params: int  # the layer's trainable numbers: r * (d + k) for A and B in plain LoRA
    full_params: int  # d * k: the matrix a full fine-tune would train
    variant: str = "lora"
    formula: str = "r*(d+k)"


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
        lines = [f"{'module':<28}{'d':>6}{'k':>6}{'r':>4}{'trained':>10}{'d*k':>10}"]
        lines += [f"{w.name:<28}{w.d:>6}{w.k:>6}{w.r:>4}{w.lora_params:>10,}{w.full_params:>10,}" for w in self.rows]
        full = sum(w.full_params for w in self.rows)
        variants = sorted({(w.variant, w.formula) for w in self.rows if w.variant != "lora"})
        which = f" ({', '.join(f'{v}: {f} per layer' for v, f in variants)})" if variants else ""
        lines.append(f"LoRA parameters{which}: {self.lora_params:,} (vs {full:,} in the adapted matrices)")
        lines.append(f"trainable: {self.trainable_params:,} of {self.total_params:,} ({self.trainable_fraction:.3%})")
        return "\n".join(lines)


def layer_trainable_count(layer: LoRALinear) -> int:
    """The numbers a layer trains: its own parameters that require grad (not the base, frozen ones or buffers)."""
    return sum(p.numel() for p in own_parameters(layer).values() if p.requires_grad)


def parameter_report(model: nn.Module) -> ParameterReport:
    rows = tuple(
        ParameterRow(
            n,
            l.base.out_features,
            l.base.in_features,
            l.r,
            layer_trainable_count(l),
            l.base.out_features * l.base.in_features,
            l.variant,
            l.parameter_formula,
        )
        for n, l in lora_layers(model).items()
    )
    params = list(model.parameters())  # unique: lm_head.weight is tok_emb.weight
    return ParameterReport(
        rows,
        sum(w.lora_params for w in rows),
        sum(p.numel() for p in params),
        sum(p.numel() for p in params if p.requires_grad),
    )


# ----------------------------------------------------------------------------------------------
# 6. The registry: a variant is a LoRALinear subclass, selectable by its name once registered

VARIANTS: dict[str, type] = {}
ENTRY_POINT_GROUP = "lora_lab.variants"  # where an installed package publishes its variants, by name


def _defined_by(cls: type, attr: str) -> type:
    return next(c for c in cls.__mro__ if attr in c.__dict__)


def register_variant(cls: type) -> type:
    """Class decorator: make a LoRALinear subclass selectable as LoRAConfig(variant=cls.variant).

    Refused: a name that is not an identifier or belongs to a built-in, a docstring that does not state
    parameter_formula, and a new formula whose parameter_count is inherited unchanged. Registering a class
    under its name again replaces it (re-running a notebook cell).
    """
    if not (isinstance(cls, type) and issubclass(cls, LoRALinear)):
        raise LoRAError(f"A variant is a subclass of LoRALinear, got {cls!r}.")
    name = cls.__dict__.get("variant")
    if not isinstance(name, str) or not name.isidentifier():
        raise LoRAError(f"{cls.__name__} must set its own class attribute `variant` to a name like 'my_lora'.")
    old = VARIANTS.get(name)
    if old is not None and old is not cls and old.__module__.startswith("lora_lab."):
        raise LoRAError(f"Variant name {name!r} belongs to the built-in {old.__name__}; pick another name.")
    formula = cls.parameter_formula
    if not isinstance(formula, str) or cls.__doc__ is None or formula not in cls.__doc__:
        raise LoRAError(f"{cls.__name__}'s docstring must state its parameter formula {formula!r}.")
    counted_by = _defined_by(cls, "parameter_count")
    if counted_by is not cls and counted_by.parameter_formula != formula:
        raise LoRAError(
            f"{cls.__name__} states parameter_formula {formula!r} but inherits parameter_count from "
            f"{counted_by.__name__} ({counted_by.parameter_formula!r}); define the classmethod "
            f"parameter_count(cls, d, k, r) returning {formula}."
        )
    try:
        count = cls.parameter_count(8, 6, 2)
    except Exception as err:  # noqa: BLE001 - any mistake in it is the variant's, named here
        raise LoRAError(f"{cls.__name__}.parameter_count(d=8, k=6, r=2) raised {type(err).__name__}: {err}") from None
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise LoRAError(f"{cls.__name__}.parameter_count must return a non-negative int, got {count!r}.")
    VARIANTS[name] = cls
    return cls


def variant_class(name: str) -> type:
    """The registered variant called `name`, or one an installed package publishes under that name in the
    entry-point group "lora_lab.variants" (loaded and registered now). Never imports anything else."""
    if name not in VARIANTS and isinstance(name, str):
        published = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
        if published:
            return _registered(_load_entry_point(published[0]), name)
    if name not in VARIANTS:
        raise UnknownVariantError(
            name,
            f"Unknown LoRA variant {name!r}; registered variants: {sorted(VARIANTS)}. A variant of your own "
            "is registered when the module that defines it is imported (import it first), or when an "
            f"installed package publishes it in the entry-point group {ENTRY_POINT_GROUP!r}.",
        )
    return VARIANTS[name]


def resolve_variant(spec: str) -> type:
    """The variant class a user names (e.g. on the command line), registered if it is not yet:

    "dora"                  a registered name (or one published in the entry-point group "lora_lab.variants")
    "mypkg.lora_xs:LoRAXS"  an import path: the module is imported and the class must subclass LoRALinear
    """
    if not isinstance(spec, str) or not spec.strip():
        raise LoRAError(f"A LoRA variant is a name or an import path 'module:Class', got {spec!r}.")
    if ":" not in spec:
        return variant_class(spec)
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # noqa: BLE001 - an import error of any kind, named with the spec
        raise LoRAError(
            f"LoRA variant {spec!r}: cannot import module {module_name!r} ({type(err).__name__}: {err})."
        ) from err
    if not hasattr(module, attr):
        raise LoRAError(f"LoRA variant {spec!r}: module {module_name!r} has no attribute {attr!r}.")
    return _registered(getattr(module, attr), spec)


def _load_entry_point(ep) -> object:
    try:
        return ep.load()
    except Exception as err:  # noqa: BLE001
        raise LoRAError(
            f"LoRA variant {ep.name!r} (entry point {ep.value!r} in {ENTRY_POINT_GROUP!r}) cannot be loaded: "
            f"{type(err).__name__}: {err}"
        ) from None


def _registered(cls, spec: str) -> type:
    """cls, registered if it is not yet; refused unless it is a variant class (and, by name, that name's)."""
    if not (isinstance(cls, type) and issubclass(cls, LoRALinear)):
        raise LoRAError(f"LoRA variant {spec!r} is {cls!r}, not a subclass of LoRALinear.")
    if ":" not in spec and cls.__dict__.get("variant") != spec:
        raise LoRAError(
            f"LoRA variant {spec!r}: the entry point loads {cls.__name__}, whose variant name is "
            f"{cls.__dict__.get('variant')!r}; publish it under that name."
        )
    if VARIANTS.get(cls.__dict__.get("variant")) is not cls:
        try:
            register_variant(cls)
        except LoRAError as err:
            raise LoRAError(f"LoRA variant {spec!r} cannot be registered: {err}") from None
    return cls


register_variant(LoRALinear)

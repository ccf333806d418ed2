"""The contract every LoRA variant keeps, as a checker a researcher runs on their own variant:

    check_variant(MyVariant)      # prints one line per guarantee: holds / FAILS (and why) / n/a

It builds a tiny GPT (with biases, square and non-square targets), applies the variant and checks, each
output compared in eval and in train mode:
- registration: the name, the formula stated in the docstring, parameter_count defined for it;
- step 0: the output equals the base (where the method says so), and every layer gets a gradient (a layer
  whose trainable tensors all get zero, as with A = B = 0, would never learn);
- disabling gives exactly the base; gradients reach exactly the trainable tensors, and apply_lora kept the
  requires_grad flags the variant chose; the parameter report equals parameter_count;
- bf16 and fp16: every tensor of the layer in the base's dtype, forward and backward finite, close to fp32;
- merge (merged == unmerged outputs, unmerge restores W); save -> load into a fresh base under another
  random state (a random tensor the adapter does not save shows up); an AdapterBank (add, activate, switch,
  disable); a mixed-adapter batch where the class claims rows_independent; LoRA+ on its lora_plus_names;
- bad hyperparameters (each declared option with a value of the wrong type or a non-finite float, a bad
  rank or alpha) refused with LoRAError, and the model untouched by a refused apply_lora;
- PEFT: identical logits through a PEFT round trip, or a clear refusal.
"""

from __future__ import annotations

import copy
import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from ..lora import (
    VARIANTS,
    LoRAConfig,
    LoRAError,
    LoRALinear,
    apply_lora,
    lora_layers,
    lora_plus_parameters,
    merge_lora,
    own_parameters,
    parameter_report,
    register_variant,
    set_lora_enabled,
    unmerge_lora,
)
from ..model import GPT, GPTConfig
from ..storage.adapters import CONFIG_FILE, load_adapter, save_adapter
from ..storage.bank import AdapterBank
from ..storage.mixed import MixedAdapterModel
from ..storage.peft_format import export_peft, import_peft
from ..train import TrainConfig, make_optimizer

CONTRACT_MODEL = GPTConfig(vocab_size=13, block_size=16, n_layer=2, n_head=2, n_embd=32, bias=True)
CONTRACT_TARGETS = ("q_proj", "v_proj", "up_proj", "down_proj")  # square, wide and tall layers
LOW_PRECISION = (torch.bfloat16, torch.float16)


@dataclass
class Guarantee:
    name: str
    holds: bool | None  # None: does not apply to this variant
    detail: str


@dataclass
class ContractReport:
    variant: str
    guarantees: list[Guarantee] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(g.holds is not False for g in self.guarantees)

    @property
    def failures(self) -> list[Guarantee]:
        return [g for g in self.guarantees if g.holds is False]

    def to_text(self) -> str:
        mark = {True: "holds ", False: "FAILS ", None: "n/a   "}
        lines = [f"Contract of LoRA variant {self.variant!r}:"]
        lines += [f"  {mark[g.holds]} {g.name:<24} {g.detail}" for g in self.guarantees]
        verdict = "all guarantees hold" if self.passed else f"{len(self.failures)} guarantee(s) fail"
        lines.append(f"  => {verdict}.")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_text()

    def _repr_pretty_(self, p, cycle):  # IPython shows the readable text, not a dataclass dump
        p.text(self.to_text())


def _base(seed: int) -> GPT:
    torch.manual_seed(seed)
    return GPT(CONTRACT_MODEL).eval()


def _tokens(seed: int, batch: int = 2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, CONTRACT_MODEL.vocab_size, (batch, CONTRACT_MODEL.block_size), generator=gen)


def _in_both_modes(model: nn.Module, run) -> torch.Tensor:
    """run() in eval mode and in train mode (no gradients), stacked; every module's own mode is given back.
    The contract model has no dropout, so the two must agree with the variant's own rules in each mode."""
    modes, outputs = [(m, m.training) for m in model.modules()], []
    try:
        with torch.no_grad():
            for training in (False, True):
                model.train(training)
                outputs.append(run())
        return torch.stack(outputs)
    finally:
        for module, training in modes:
            module.training = training


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(2, B, T, vocab): the logits in eval mode, then in train mode."""
    return _in_both_modes(model, lambda: model(x)[0])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _perturb(model: nn.Module, seed: int) -> None:
    """Move every trainable tensor as a few training steps would, so the update is no longer zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1 * (p.detach().float().abs().mean() + 0.1))


def _adapted(config, seed, moved_by: int | None = None) -> GPT:
    """The contract's base (from `seed`) with the variant applied and its tensors moved (by `moved_by`)."""
    model = apply_lora(_base(seed), config)
    _perturb(model, seed if moved_by is None else moved_by)
    return model


def _snapshot(model: nn.Module):
    return (
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        {k: p.requires_grad for k, p in model.named_parameters()},
        [(n, type(m).__name__, m.training) for n, m in model.named_modules()],
    )


def _same(model: nn.Module, snap) -> bool:
    state, flags, structure = _snapshot(model)
    return (
        (flags, structure) == snap[1:]
        and state.keys() == snap[0].keys()
        and all(torch.equal(state[k], snap[0][k]) for k in state)
    )


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


# Each check returns (holds, detail) or raises; an exception is reported as a failure with its message.


def _check_step0(cls, config, seed, x):
    base = _base(seed)
    model = apply_lora(copy.deepcopy(base), config)
    if not cls.starts_at_base:
        return None, "the method does not start at the base model (starts_at_base = False)"
    err = _rel(_logits(model, x), _logits(base, x))
    return (
        err <= 1e-6,
        f"adapted vs base logits at step 0, eval and train mode: relative difference {err:.1e} (limit 1e-6)",
    )


def _check_learns(cls, config, seed, x):
    model = apply_lora(_base(seed), config)
    model(x, x)[1].backward()
    dead = [
        n
        for n, layer in lora_layers(model).items()
        if not any(p.grad is not None and p.grad.abs().sum() > 0 for p in own_parameters(layer).values())
    ]
    if dead:
        return False, (
            f"at step 0 every trainable tensor of {dead[:3]} gets an all-zero gradient, so it never learns "
            "(both factors at zero, A = B = 0, is a saddle point: start one of them random)"
        )
    return True, "at step 0 each adapted layer gets a non-zero gradient on some trainable tensor"


def _check_disable(cls, config, seed, x):
    base = _base(seed)
    model = _adapted(config, seed)
    adapted = _logits(model, x)
    set_lora_enabled(model, False)
    off = _logits(model, x)
    set_lora_enabled(model, True)
    truth = _logits(base, x)
    for i, mode in enumerate(("eval", "train")):
        if not torch.equal(off[i], truth[i]):
            return (
                False,
                f"disabled model differs from the original base in {mode} mode (relative {_rel(off[i], truth[i]):.1e})",
            )
        if torch.equal(adapted[i], off[i]):
            return False, f"after changing the trainable tensors, the enabled model still equals the base ({mode} mode)"
    return True, "set_lora_enabled(False) gives exactly the original base (eval and train); enabled, outputs change"


def _check_gradients(cls, config, seed, x):
    model = _adapted(config, seed)
    layers = lora_layers(model)
    own = {id(p) for layer in layers.values() for p in own_parameters(layer).values()}
    outside = [n for n, p in _trainable(model).items() if id(p) not in own]
    if outside:
        return False, f"apply_lora left {outside[:3]} trainable outside the variant's layers"
    overridden = []
    for name, layer in layers.items():  # apply_lora must keep the flags the variant's __init__ set
        probe = nn.Linear(layer.base.in_features, layer.base.out_features, bias=layer.base.bias is not None)
        chosen = {n: p.requires_grad for n, p in own_parameters(config.layer_class.from_config(probe, config)).items()}
        overridden += [f"{name}.{n}" for n, p in own_parameters(layer).items() if chosen.get(n) != p.requires_grad]
    if overridden:
        return False, f"requires_grad of {overridden[:3]} differs from what the variant's __init__ chose"
    trainable = _trainable(model)
    if not trainable:
        return False, "the variant has no trainable parameters (nn.Parameter with requires_grad) at all"
    model(x, x)[1].backward()
    missing = [n for n, p in trainable.items() if p.grad is None or not p.grad.abs().sum()]
    leaked = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
    buffers = [f"{n}.{b}" for n, l in layers.items() for b, t in l.named_buffers() if t.requires_grad]
    if missing or leaked or buffers:
        return False, (
            f"no gradient for {missing[:3]}; gradient leaked to {leaked[:3]}; buffers needing grad {buffers[:3]}"
        )
    count = sum(p.numel() for p in trainable.values())
    return True, f"gradients reach exactly the variant's {count:,} trainable numbers (and nothing frozen)"


def _check_report(cls, config, seed, x):
    model = apply_lora(_base(seed), config)
    report = parameter_report(model)
    bad = [
        (r.name, r.lora_params, cls.parameter_count(r.d, r.k, r.r))
        for r in report.rows
        if r.lora_params != cls.parameter_count(r.d, r.k, r.r)
    ]
    if bad:
        return False, (
            f"trainable numbers differ from parameter_count ({cls.parameter_formula}): (layer, real, count) {bad[:2]}"
        )
    real = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if real != report.lora_params:
        return False, f"the report counts {report.lora_params:,} but the model trains {real:,} numbers"
    return True, f"each layer trains parameter_count = {cls.parameter_formula} numbers ({report.lora_params:,} in all)"


def _check_low_precision(cls, config, seed, x):
    reference = _adapted(config, seed)
    want = _logits(reference, x)
    notes = []
    for dtype in LOW_PRECISION:
        name = str(dtype).removeprefix("torch.")
        model = apply_lora(_base(seed).to(dtype), config)
        _perturb(model, seed)
        other = [
            f"{n}.{t} ({v.dtype})"
            for n, layer in lora_layers(model).items()
            for t, v in [*own_parameters(layer).items(), *layer.named_buffers()]
            if v.is_floating_point() and v.dtype != dtype
        ]
        if other:
            return False, (
                f"on a {name} base, {other[:2]} are not {name}: create a variant's tensors with "
                "dtype=base.weight.dtype, device=base.weight.device"
            )
        got = _logits(model, x)
        model(x, x)[1].backward()
        bad = [n for n, p in _trainable(model).items() if p.grad is not None and not torch.isfinite(p.grad).all()]
        if got.dtype != dtype or bad:
            return False, f"in {name}: logits are {got.dtype}; non-finite gradients for {bad[:3]}"
        err = _rel(got, want)
        if not err <= 0.05:
            return False, f"{name} logits differ from fp32 by {err:.1e} (limit 5e-2)"
        notes.append(f"{name} {err:.0e}")
    return True, f"forward and backward run in {' and '.join(notes)} relative to fp32; every tensor in the base dtype"


def _check_merge(cls, config, seed, x):
    model = _adapted(config, seed)
    before = {n: l.base.weight.detach().clone() for n, l in lora_layers(model).items()}
    unmerged = _logits(model, x)
    merge_lora(model)
    merged = _logits(model, x)
    err_out = _rel(merged, unmerged)
    unmerge_lora(model)
    err_w = max(_rel(l.base.weight, before[n]) for n, l in lora_layers(model).items())
    ok = err_out <= 1e-5 and err_w <= 1e-6
    return ok, f"merged vs unmerged logits {err_out:.1e} (limit 1e-5); unmerge restores W to {err_w:.1e} (limit 1e-6)"


def _reloaded(path, seed) -> GPT:
    """load_adapter into a fresh base, under a random state unlike the one the adapter was made under."""
    fresh = _base(seed)
    torch.manual_seed(seed + 7919)
    return load_adapter(fresh, path)


def _check_save_load(cls, config, seed, x):
    model = _adapted(config, seed)
    with tempfile.TemporaryDirectory() as tmp:
        path = save_adapter(model, Path(tmp) / "adapter")
        saved = json.loads((path / CONFIG_FILE).read_text())["lora_config"]
        loaded = _reloaded(path, seed)
    if (saved.get("variant"), saved.get("options")) != (config.variant, config.options):
        return False, f"the config names {saved.get('variant')!r} {saved.get('options')}, not the variant"
    if loaded.lora_config != config:
        return False, f"loaded config {loaded.lora_config} differs from {config}"
    err = _rel(_logits(loaded, x), _logits(model, x))
    return err == 0.0, (
        f"save -> load into a fresh base under another random state: logits differ by {err:.1e} "
        "(a tensor the adapter does not save must be rebuilt the same way); variant and options in the config"
    )


def _check_bank(cls, config, seed, x):
    base = _base(seed)
    model = _adapted(config, seed)
    plain = _adapted(LoRAConfig(r=config.r, targets=config.targets), seed, moved_by=seed + 1)
    bank = AdapterBank(copy.deepcopy(base))
    want = {"variant": _logits(model, x), "plain": _logits(plain, x), None: _logits(base, x)}
    with tempfile.TemporaryDirectory() as tmp:
        bank.add("variant", save_adapter(model, Path(tmp) / "adapter"))
        bank.add("plain", plain)
        for step in ("variant", "plain", "variant", None):
            bank.activate(step) if step else bank.disable()
            got = _logits(bank.model, x)
            if not torch.equal(got, want[step]):
                what = f"activate({step!r})" if step else "disable()"
                return (
                    False,
                    f"after {what} the bank's logits differ from the adapter's own by {_rel(got, want[step]):.1e}",
                )
    return True, "add, activate, switch to plain LoRA and back, disable: each output equals the adapter applied alone"


def _check_mixed(cls, config, seed, x):
    if not cls.rows_independent:
        return None, "the class does not claim rows_independent, so MixedAdapterModel refuses its adapters"
    base = _base(seed)
    model = _adapted(config, seed)
    plain = _adapted(LoRAConfig(r=config.r, targets=config.targets), seed, moved_by=seed + 1)
    mixed = MixedAdapterModel(copy.deepcopy(base))
    rows = _tokens(seed + 2, batch=4)
    names = ["variant", None, "plain", "variant"]
    with tempfile.TemporaryDirectory() as tmp:
        mixed.add("variant", save_adapter(model, Path(tmp) / "adapter"))
        mixed.add("plain", plain)
        together = _in_both_modes(mixed.model, lambda: mixed(rows, names)[0])
    alone = {"variant": model, "plain": plain, None: base}
    worst = 0.0
    for name, model_alone in alone.items():
        idx = [i for i, n in enumerate(names) if n == name]
        worst = max(worst, _rel(together[:, idx], _logits(model_alone, rows[idx])))
    return worst <= 1e-5, (
        f"rows for the variant, plain LoRA and no adapter in one batch: each differs from its adapter run alone "
        f"by at most {worst:.1e} (limit 1e-5)"
    )


def _check_lora_plus(cls, config, seed, x):
    model = _adapted(config, seed)
    ratio, lr = 16.0, 1e-3
    cfg = TrainConfig(learning_rate=lr, weight_decay=0.0, lora_plus_ratio=ratio, fused_optimizer=False)
    if not cls.lora_plus_names:
        try:
            make_optimizer(model, cfg)
        except LoRAError as err:
            return None, f"lora_plus_names is empty: LoRA+ is refused clearly ({str(err)[:60]}...)"
        return False, "lora_plus_names is empty, yet LoRA+ ran"
    fast = {id(p) for p in lora_plus_parameters(model)}  # a LoRAError here names the variant and its names
    opt = make_optimizer(model, cfg)
    scales = {id(p): g.get("lr_scale", 1.0) for g in opt.param_groups for p in g["params"]}
    names = {id(p): n for n, p in _trainable(model).items()}
    wrong = [f"{names[i]} at {s:g}x" for i, s in scales.items() if s != (ratio if i in fast else 1.0)]
    if wrong or scales.keys() != names.keys():
        return False, f"LoRA+ with ratio {ratio:g} puts {wrong[:2]}, or misses some trainable tensors"
    model(x, x)[1].backward()
    opt.step()
    if not all(torch.isfinite(p).all() for p in _trainable(model).values()):
        return False, "a LoRA+ step made a trainable tensor non-finite"
    named = sorted({n.rpartition(".")[2] for i, n in names.items() if i in fast})
    return True, f"LoRA+ trains {named} at {ratio:g}x the learning rate, the rest at 1x; a step runs"


def _bad_values(default):
    """Values of the wrong type for an option with this default (and non-finite ones for a float)."""
    if isinstance(default, bool):
        return ["oops", 1]
    if isinstance(default, float):
        return ["oops", True, math.nan, math.inf, -math.inf]
    if isinstance(default, int):
        return ["oops", 1.5, True]
    return [1] if isinstance(default, str) else ["oops"]


def _check_bad_hyperparameters(cls, config, seed, x):
    tries = {"unknown option": dict(options={"no_such_option": 1}), "rank 0": dict(r=0), "alpha -1": dict(alpha=-1)}
    tries["alpha nan"] = dict(alpha=math.nan)
    for name, default in cls.options.items():
        tries.update({f"{name}={v!r}": dict(options={name: v}) for v in _bad_values(default)})
    for what, change in tries.items():
        try:
            LoRAConfig(**{**config.to_dict(), **change})
        except LoRAError:
            continue
        return False, f"LoRAConfig accepted {what} without a LoRAError (the variant's check_options must refuse it)"
    model = _base(seed)
    snap = _snapshot(model)
    forged = []  # configs that skipped LoRAConfig's check: the layers' own check must refuse them in apply_lora
    for name, default in cls.options.items():
        bad = copy.copy(config)
        object.__setattr__(bad, "options", {**config.options, name: _bad_values(default)[0]})
        forged.append(bad)
    for bad in [LoRAConfig(**{**config.to_dict(), "r": CONTRACT_MODEL.n_embd + 1}), *forged]:
        try:
            apply_lora(model, bad)
        except Exception:  # noqa: BLE001 - any refusal will do here; what matters is the untouched model
            if not _same(model, snap):
                return False, f"a refused apply_lora (options {bad.options}, r={bad.r}) changed the model"
            continue
        return False, f"apply_lora accepted r={bad.r}, options {bad.options}"
    return True, f"refused with LoRAError: {', '.join(tries)}; a refused apply_lora leaves the model untouched"


def _check_peft(cls, config, seed, x):
    model = _adapted(config, seed)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            export_peft(model, Path(tmp) / "peft")
        except LoRAError as err:  # a variant PEFT cannot express may say so; it must say it clearly
            return None, f"no PEFT mapping, refused clearly: {str(err)[:90]}..."
        if cls.peft_flags is None:
            return False, "peft_flags is None but export_peft did not refuse"
        try:
            from peft import PeftModel
        except ImportError:
            return None, "peft is not installed, so the round trip was not run (pip install peft)"
        theirs = PeftModel.from_pretrained(_base(seed), Path(tmp) / "peft").eval()
        err_peft = _rel(_logits(theirs, x), _logits(model, x))
        back = import_peft(_base(seed), Path(tmp) / "peft")
        err_back = _rel(_logits(back, x), _logits(model, x))
    ok = err_peft <= 1e-5 and err_back <= 1e-5
    return ok, (
        f"logits through PEFT differ by {err_peft:.1e}, imported back ({back.lora_config.variant}, "
        f"r={back.lora_config.r}) by {err_back:.1e} (limit 1e-5)"
    )


CHECKS = {
    "output = base at step 0": _check_step0,
    "learns from step 0": _check_learns,
    "disable = original base": _check_disable,
    "gradients": _check_gradients,
    "parameter report": _check_report,
    "bf16 and fp16": _check_low_precision,
    "merge / unmerge": _check_merge,
    "save -> load": _check_save_load,
    "AdapterBank": _check_bank,
    "mixed-adapter batch": _check_mixed,
    "LoRA+": _check_lora_plus,
    "bad hyperparameters": _check_bad_hyperparameters,
    "PEFT round trip": _check_peft,
}


def check_variant(
    variant: type | str,
    options: dict | None = None,
    r: int = 4,
    alpha: float = 8.0,
    seed: int = 0,
    verbose: bool = True,
) -> ContractReport:
    """Run the contract on a variant (a LoRALinear subclass, registered here if it is not yet, or a name).

    Prints the report (verbose=True) and returns it: report.passed, report.failures, report.to_text().
    Never raises for a broken variant: every failure is a FAILS line that says why.
    """
    cls = VARIANTS.get(variant) if isinstance(variant, str) else variant
    report = ContractReport(getattr(cls, "variant", str(variant)))
    try:
        if cls is None or not (isinstance(cls, type) and issubclass(cls, LoRALinear)):
            raise LoRAError(f"{variant!r} is neither a registered variant name nor a LoRALinear subclass.")
        if VARIANTS.get(cls.__dict__.get("variant")) is not cls:
            register_variant(cls)
        config = LoRAConfig(r=r, alpha=alpha, targets=CONTRACT_TARGETS, variant=cls.variant, options=options or {})
        report.guarantees.append(
            Guarantee(
                "registered",
                True,
                f"as {cls.variant!r}; formula {cls.parameter_formula} "
                f"in the docstring; options {config.options or 'none'}",
            )
        )
    except Exception as err:  # noqa: BLE001 - the checker reports, it does not crash
        report.guarantees.append(Guarantee("registered", False, f"{type(err).__name__}: {err}"))
        if verbose:
            print(report.to_text())
        return report
    x = _tokens(seed + 1)
    for name, check in CHECKS.items():
        with torch.random.fork_rng(devices=[]):
            try:
                holds, detail = check(cls, config, seed, x)
            except Exception as err:  # noqa: BLE001
                holds, detail = False, f"raised {type(err).__name__}: {str(err)[:160]}"
        report.guarantees.append(Guarantee(name, holds, detail))
    if verbose:
        print(report.to_text())
    return report

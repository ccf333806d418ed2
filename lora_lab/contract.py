"""The contract every LoRA variant keeps, as a checker a researcher runs on their own variant:

    check_variant(MyVariant)      # prints one line per guarantee: holds / FAILS (and why) / n/a

It builds a tiny GPT (with biases, square and non-square targets), applies the variant and checks:
registration (name, docstring formula), step 0 (output = base, where the method says so), disabling
(exactly the base), gradients (exactly the variant's own parameters get them), the parameter report
(= the formula), merge (merged == unmerged outputs, unmerge restores W to 1e-6 relative), save -> load
(same outputs, the variant and its options named in the config), bad hyperparameters (refused with
LoRAError, model untouched) and PEFT (identical logits through a PEFT round trip, or a clear refusal).
"""
from __future__ import annotations

import copy
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from .adapters import CONFIG_FILE, load_adapter, save_adapter
from .lora import (VARIANTS, LoRAConfig, LoRAError, LoRALinear, apply_lora, formula_value, lora_layers,
                   merge_lora, own_parameters, parameter_report, register_variant, set_lora_enabled, unmerge_lora)
from .model import GPT, GPTConfig
from .peft_interop import export_peft, import_peft

CONTRACT_MODEL = GPTConfig(vocab_size=13, block_size=16, n_layer=2, n_head=2, n_embd=32, bias=True)
CONTRACT_TARGETS = ("q_proj", "v_proj", "up_proj", "down_proj")  # square, wide and tall layers


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


def _tokens(seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, CONTRACT_MODEL.vocab_size, (2, CONTRACT_MODEL.block_size), generator=gen)


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)[0]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _perturb(model: nn.Module, seed: int) -> None:
    """Move every trainable tensor as a few training steps would, so the update is no longer zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1 * (p.detach().abs().mean() + 0.1))


def _snapshot(model: nn.Module):
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            [(n, type(m).__name__) for n, m in model.named_modules()])


def _same(model: nn.Module, snap) -> bool:
    state, structure = _snapshot(model)
    return structure == snap[1] and state.keys() == snap[0].keys() and all(
        torch.equal(state[k], snap[0][k]) for k in state)


# Each check returns (holds, detail) or raises; an exception is reported as a failure with its message.


def _check_step0(cls, config, seed, x):
    base = _base(seed)
    model = apply_lora(copy.deepcopy(base), config)
    if not cls.starts_at_base:
        return None, "the method does not start at the base model (starts_at_base = False)"
    err = _rel(_logits(model, x), _logits(base, x))
    return err <= 1e-6, f"adapted vs base logits at step 0: relative difference {err:.1e} (limit 1e-6)"


def _check_disable(cls, config, seed, x):
    base = _base(seed)
    model = apply_lora(copy.deepcopy(base), config)
    _perturb(model, seed)
    adapted = _logits(model, x)
    set_lora_enabled(model, False)
    off = _logits(model, x)
    set_lora_enabled(model, True)
    if not torch.equal(off, _logits(base, x)):
        return False, f"disabled model differs from the original base (relative {_rel(off, _logits(base, x)):.1e})"
    if torch.equal(adapted, off):
        return False, "after changing the trainable tensors, the enabled model still equals the base"
    return True, "set_lora_enabled(False) gives exactly the original base; enabled, the adapter changes outputs"


def _check_gradients(cls, config, seed, x):
    model = apply_lora(_base(seed), config)
    _perturb(model, seed)
    model(x, x)[1].backward()
    own = {id(p) for layer in lora_layers(model).values() for p in own_parameters(layer).values()}
    wrong_flag = [n for n, p in model.named_parameters() if p.requires_grad != (id(p) in own)]
    if wrong_flag:
        return False, f"requires_grad is wrong for {wrong_flag[:3]} (only the variant's own parameters train)"
    if not own:
        return False, "the variant has no trainable parameters (nn.Parameter) at all"
    missing = [n for n, p in model.named_parameters() if id(p) in own and (p.grad is None or not p.grad.abs().sum())]
    leaked = [n for n, p in model.named_parameters() if id(p) not in own and p.grad is not None]
    buffers = [f"{n}.{b}" for n, l in lora_layers(model).items() for b, t in l.named_buffers() if t.requires_grad]
    if missing or leaked or buffers:
        return False, (f"no gradient for {missing[:3]}; gradient leaked to {leaked[:3]}; "
                       f"buffers needing grad {buffers[:3]}")
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return True, f"gradients reach exactly the variant's {count:,} trainable numbers (and nothing frozen)"


def _check_report(cls, config, seed, x):
    model = apply_lora(_base(seed), config)
    report = parameter_report(model)
    bad = [(r.name, r.lora_params, formula_value(cls.parameter_formula, r.d, r.k, r.r)) for r in report.rows
           if r.lora_params != formula_value(cls.parameter_formula, r.d, r.k, r.r)]
    if bad:
        return False, f"trainable numbers differ from {cls.parameter_formula!r}: (layer, real, formula) {bad[:2]}"
    real = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if real != report.lora_params:
        return False, f"the report counts {report.lora_params:,} but the model trains {real:,} numbers"
    return True, (f"each layer trains {cls.parameter_formula} numbers ({report.lora_params:,} in all), "
                  "as the docstring says")


def _check_merge(cls, config, seed, x):
    model = apply_lora(_base(seed), config)
    _perturb(model, seed)
    before = {n: l.base.weight.detach().clone() for n, l in lora_layers(model).items()}
    unmerged = _logits(model, x)
    merge_lora(model)
    merged = _logits(model, x)
    err_out = _rel(merged, unmerged)
    unmerge_lora(model)
    err_w = max(_rel(l.base.weight, before[n]) for n, l in lora_layers(model).items())
    ok = err_out <= 1e-5 and err_w <= 1e-6
    return ok, f"merged vs unmerged logits {err_out:.1e} (limit 1e-5); unmerge restores W to {err_w:.1e} (limit 1e-6)"


def _check_save_load(cls, config, seed, x):
    model = apply_lora(_base(seed), config)
    _perturb(model, seed)
    with tempfile.TemporaryDirectory() as tmp:
        path = save_adapter(model, Path(tmp) / "adapter")
        saved = json.loads((path / CONFIG_FILE).read_text())["lora_config"]
        loaded = load_adapter(_base(seed), path)
    if (saved.get("variant"), saved.get("options")) != (config.variant, config.options):
        return False, f"the config names {saved.get('variant')!r} {saved.get('options')}, not the variant"
    if loaded.lora_config != config:
        return False, f"loaded config {loaded.lora_config} differs from {config}"
    err = _rel(_logits(loaded, x), _logits(model, x))
    return err == 0.0, f"save -> load into a fresh base: logits differ by {err:.1e}; variant and options in the config"


def _check_bad_hyperparameters(cls, config, seed, x):
    refused = []
    tries = {"unknown option": dict(options={"no_such_option": 1}), "rank 0": dict(r=0), "alpha -1": dict(alpha=-1)}
    tries.update({f"{name}='oops'": dict(options={name: "oops"}) for name in cls.options})
    for what, change in tries.items():
        try:
            LoRAConfig(**{**config.to_dict(), **change})
        except LoRAError:
            refused.append(what)
            continue
        return False, f"LoRAConfig accepted {what} without a LoRAError"
    model = _base(seed)
    snap = _snapshot(model)
    too_big = LoRAConfig(**{**config.to_dict(), "r": CONTRACT_MODEL.n_embd + 1})
    try:
        apply_lora(model, too_big)
    except LoRAError as err:
        if not _same(model, snap):
            return False, "a refused apply_lora (rank too large) changed the model"
        return True, (f"refused with LoRAError: {', '.join(refused)}, rank {too_big.r}; model untouched "
                      f"({str(err)[:40]}...)")
    return False, f"apply_lora accepted rank {too_big.r} above min(d, k)"


def _check_peft(cls, config, seed, x):
    model = apply_lora(_base(seed), config)
    _perturb(model, seed)
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
    return ok, (f"logits through PEFT differ by {err_peft:.1e}, imported back ({back.lora_config.variant}, "
                f"r={back.lora_config.r}) by {err_back:.1e} (limit 1e-5)")


CHECKS = {
    "output = base at step 0": _check_step0, "disable = original base": _check_disable,
    "gradients": _check_gradients, "parameter report": _check_report, "merge / unmerge": _check_merge,
    "save -> load": _check_save_load, "bad hyperparameters": _check_bad_hyperparameters, "PEFT round trip": _check_peft,
}


def check_variant(variant: type | str, options: dict | None = None, r: int = 4, alpha: float = 8.0,
                  seed: int = 0, verbose: bool = True) -> ContractReport:
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
        report.guarantees.append(Guarantee("registered", True, f"as {cls.variant!r}; formula {cls.parameter_formula} "
                                           f"in the docstring; options {config.options or 'none'}"))
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

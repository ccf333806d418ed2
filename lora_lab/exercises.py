"""Self-checks for the notebook exercises.

Each `check_*` function takes the learner's function (or class), runs it on a few cases, compares it with
a reference answer and returns a `CheckReport`: print it to see what is right and what is wrong. A
checker never raises because of the learner's code; an exception becomes a failed check that names it.

    report = check_factorize(my_factorize)
    print(report)          # one line per check, marked OK or FAIL, with what was expected
    assert report.ok
"""
from __future__ import annotations

import math
import traceback
from dataclasses import dataclass, field

import torch

from .model import GPT, GPTConfig
from .widgets import eckart_young_error, transformer_lora_params


@dataclass
class CheckReport:
    title: str
    results: list[tuple[bool, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.results) and all(passed for passed, _ in self.results)

    def __bool__(self) -> bool:
        return self.ok

    def check(self, passed: bool, ok: str, wrong: str | None = None) -> bool:
        """Record one check: `ok` describes a pass, `wrong` (default: `ok`) explains a failure."""
        self.results.append((bool(passed), ok if passed else (wrong or ok)))
        return bool(passed)

    def require(self, passed: bool, wrong: str) -> bool:
        """A precondition (right type, right shape): recorded only when it fails."""
        if not passed:
            self.results.append((False, wrong))
        return bool(passed)

    def __str__(self) -> str:
        failed = sum(not passed for passed, _ in self.results)
        head = (
            f"{self.title}: all {len(self.results)} checks passed."
            if self.ok
            else f"{self.title}: {failed} of {len(self.results)} checks failed."
        )
        return "\n".join([head] + [f"  {'OK  ' if passed else 'FAIL'} {msg}" for passed, msg in self.results])

    __repr__ = __str__


def _call(report: CheckReport, what: str, fn, *args):
    """Run the learner's code; an exception is recorded as a failed check. Returns (ok, value)."""
    try:
        return True, fn(*args)
    except Exception as err:  # the learner's code may raise anything
        where = traceback.extract_tb(err.__traceback__)[-1]
        report.check(False, f"{what} raised {type(err).__name__}: {err} (line {where.lineno})")
        return False, None


# ----------------------------------------------------------------------------------------------------
# Chapter 1


def check_factorize(factorize) -> CheckReport:
    """factorize(W, r) -> (B, A): B is d x r, A is r x k and B @ A is the best rank-r approximation of W."""
    report = CheckReport("factorize(W, r)")
    gen = torch.Generator().manual_seed(0)
    for d, k, r in ((6, 4, 1), (5, 9, 2), (8, 8, 3), (7, 3, 3)):
        W = torch.randn(d, k, generator=gen, dtype=torch.float64)
        case = f"W {d}x{k}, r={r}"
        ok, factors = _call(report, case, factorize, W.clone(), r)
        if not ok:
            continue
        if not report.require(
            isinstance(factors, (tuple, list)) and len(factors) == 2 and all(isinstance(f, torch.Tensor) for f in factors),
            f"{case}: should return a pair of tensors (B, A), got {type(factors).__name__}",
        ):
            continue
        B, A = factors
        if not report.require(
            tuple(B.shape) == (d, r) and tuple(A.shape) == (r, k),
            f"{case}: B has shape {tuple(B.shape)} and A {tuple(A.shape)}; expected B {(d, r)} and A {(r, k)}",
        ):
            continue
        error = float(torch.linalg.matrix_norm(W - B.double() @ A.double()))
        best = eckart_young_error(torch.linalg.svdvals(W), r)
        report.check(
            math.isclose(error, best, rel_tol=1e-5, abs_tol=1e-8),
            f"{case}: error {error:.4f}, the Eckart-Young minimum",
            f"{case}: error {error:.4f}, but the best rank-{r} error is {best:.4f} (keep the r LARGEST singular values)",
        )
    return report


def check_rank_for_energy(rank_for_energy) -> CheckReport:
    """rank_for_energy(S, fraction) -> the smallest r with sum(S[:r]**2) >= fraction * sum(S**2)."""
    report = CheckReport("rank_for_energy(S, fraction)")
    S = torch.tensor([4.0, 2.0, 1.0, 1.0, 0.5], dtype=torch.float64)  # energy 16, 4, 1, 1, 0.25 of 22.25
    energy = (S**2).cumsum(0) / (S**2).sum()
    for fraction in (0.5, 0.72, 0.9, 0.95, 0.99, 1.0):
        expected = int((energy >= fraction - 1e-12).nonzero()[0]) + 1
        ok, got = _call(report, f"fraction={fraction}", rank_for_energy, S.clone(), fraction)
        if ok:
            report.check(got == expected, f"fraction={fraction}: r={expected}", f"fraction={fraction}: got {got!r}, expected r={expected}")
    return report


# ----------------------------------------------------------------------------------------------------
# Chapter 2


def check_gpt_lora_params(gpt_lora_params) -> CheckReport:
    """gpt_lora_params(n_layer, d_model, r, targets) -> LoRA's trainable parameters in a GPT.

    targets name Linear layers of a block: q_proj, k_proj, v_proj, o_proj (d_model x d_model),
    up_proj (4*d_model x d_model) and down_proj (d_model x 4*d_model).
    """
    report = CheckReport("gpt_lora_params(n_layer, d_model, r, targets)")
    cases = [
        (96, 12288, 1, ("q_proj", "v_proj")),
        (12, 768, 8, ("q_proj", "k_proj", "v_proj", "o_proj")),
        (4, 128, 2, ("up_proj",)),
        (6, 384, 4, ("q_proj", "down_proj")),
        (2, 64, 16, ()),
    ]
    for n_layer, d_model, r, targets in cases:
        case = f"{n_layer} layers, d_model {d_model}, r={r}, targets {list(targets)}"
        expected = transformer_lora_params(n_layer, d_model, r, targets)
        ok, got = _call(report, case, gpt_lora_params, n_layer, d_model, r, targets)
        if ok:
            mlp = {"up_proj", "down_proj"} & set(targets)
            hint = " (the MLP matrices are 4*d_model by d_model)" if mlp and got != expected else ""
            report.check(got == expected, f"{case}: {expected:,}", f"{case}: got {got!r}, expected {expected:,}{hint}")
    return report


def check_break_even_rank(break_even_rank) -> CheckReport:
    """break_even_rank(d, k) -> the largest r for which LoRA's r*(d+k) numbers are fewer than d*k."""
    report = CheckReport("break_even_rank(d, k)")
    for d, k in ((4, 4), (12288, 12288), (512, 128), (3, 5), (1, 7)):
        expected = max(r for r in range(0, min(d, k) + 1) if r * (d + k) < d * k)
        ok, got = _call(report, f"d={d}, k={k}", break_even_rank, d, k)
        if ok:
            report.check(got == expected, f"d={d}, k={k}: r={expected}",
                         f"d={d}, k={k}: got {got!r}, expected {expected} (r*(d+k) must be strictly below d*k)")
    return report


# ----------------------------------------------------------------------------------------------------
# Chapter 3


def check_uniform_loss(uniform_loss) -> CheckReport:
    """uniform_loss(vocab_size) -> the cross-entropy (nats) of a model that predicts every character equally."""
    report = CheckReport("uniform_loss(vocab_size)")
    for vocab in (2, 65, 50257):
        logits = torch.zeros(1, vocab)
        expected = float(torch.nn.functional.cross_entropy(logits, torch.tensor([0])))
        ok, got = _call(report, f"vocab_size={vocab}", uniform_loss, vocab)
        if ok:
            report.check(
                isinstance(got, (int, float)) and math.isclose(float(got), expected, rel_tol=1e-6),
                f"vocab_size={vocab}: {expected:.4f} nats",
                f"vocab_size={vocab}: got {got!r}, expected {expected:.4f} nats",
            )
    return report


def check_count_parameters(count_parameters) -> CheckReport:
    """count_parameters(config: GPTConfig) -> the number of parameters of GPT(config), by hand."""
    report = CheckReport("count_parameters(config)")
    configs = [
        GPTConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128),
        GPTConfig(vocab_size=10, block_size=8, n_layer=1, n_head=1, n_embd=16),
        GPTConfig(vocab_size=33, block_size=32, n_layer=3, n_head=2, n_embd=48, bias=True),
    ]
    for config in configs:
        expected = GPT(config).num_parameters()
        case = f"{config.n_layer} layers, n_embd {config.n_embd}, bias={config.bias}"
        ok, got = _call(report, case, count_parameters, config)
        if ok:
            hint = ""
            if got == expected + config.vocab_size * config.n_embd:
                hint = " (lm_head shares its weight with tok_emb: count it once)"
            report.check(got == expected, f"{case}: {expected:,}", f"{case}: got {got!r}, expected {expected:,}{hint}")
    return report

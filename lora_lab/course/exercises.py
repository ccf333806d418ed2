"""Self-checks for the notebook exercises.

Each `check_*` function takes the learner's function (or class), runs it on a few cases, compares it with
a reference answer and returns a `CheckReport`: print it to see what is right and what is wrong. A
checker never raises because of the learner's code; an exception becomes a failed check that names it.

    report = check_factorize(my_factorize)
    print(report)          # one line per check, marked OK or FAIL, with what was expected
    assert report.ok

In the chapters each exercise starts as a stub that raises NotImplementedError; its report then says
"not answered yet" (`report.unanswered`) instead of listing failures. The worked solutions live in
notebooks/solutions.ipynb, which runs every checker on them.
"""

from __future__ import annotations

import copy
import math
import tempfile
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from ..lora import LoRAConfig, LoRALinear, apply_lora, lora_layers, merge_lora
from ..model import GPT, GPTConfig
from ..storage.adapters import save_adapter
from .numerics import SettingResult, eckart_young_error, synthetic_image, tensor_bytes, transformer_lora_params


@dataclass
class CheckReport:
    title: str
    results: list[tuple[bool, str]] = field(default_factory=list)
    not_implemented: int = 0  # failed checks whose cause was the stub's NotImplementedError

    @property
    def ok(self) -> bool:
        return bool(self.results) and all(passed for passed, _ in self.results)

    @property
    def unanswered(self) -> bool:
        """True while the learner's function is still the stub: every check failed with NotImplementedError."""
        return bool(self.results) and self.not_implemented == len(self.results)

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
        if self.unanswered:
            return (
                f"{self.title}: not answered yet. Replace `raise NotImplementedError` with your code and "
                f"re-run the cell (a worked solution is in notebooks/solutions.ipynb)."
            )
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
    if not callable(fn):  # e.g. the result of calling it, passed instead of the function itself
        report.check(
            False,
            f"{what}: expected your function (or class) itself, got a {type(fn).__name__}: "
            f"{fn!r:.60}. Pass it without calling it.",
        )
        return False, None
    try:
        return True, fn(*args)
    except NotImplementedError:  # the chapter's stub, not yet replaced by an answer
        report.check(False, f"{what}: not answered yet (the function raises NotImplementedError)")
        report.not_implemented += 1
        return False, None
    except Exception as err:  # the learner's code may raise anything
        where = traceback.extract_tb(err.__traceback__)[-1]
        report.check(False, f"{what} raised {type(err).__name__}: {err} (line {where.lineno})")
        return False, None


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in module.state_dict().items()}


def _unchanged(module: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    """Whether `module` holds exactly the tensors of `before`. The learner's code may also have added, removed
    or renamed some (merge_and_unload replaces every LoRA layer): that counts as changed, never as an error."""
    after = module.state_dict()
    return after.keys() == before.keys() and all(torch.equal(before[n], t) for n, t in after.items())


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
            isinstance(factors, (tuple, list))
            and len(factors) == 2
            and all(isinstance(f, torch.Tensor) for f in factors),
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
            f"{case}: error {error:.4f}, but the best rank-{r} error is {best:.4f} "
            "(keep the r LARGEST singular values)",
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
            report.check(
                got == expected,
                f"fraction={fraction}: r={expected}",
                f"fraction={fraction}: got {got!r}, expected r={expected}",
            )
    return report


def check_smallest_rank_below(smallest_rank_below) -> CheckReport:
    """smallest_rank_below(W, max_relative_error) -> the smallest r whose truncated SVD W_r has a *measured*
    relative error ||W - W_r||_F / ||W||_F strictly below max_relative_error."""
    report = CheckReport("smallest_rank_below(W, max_relative_error)")
    gen = torch.Generator().manual_seed(2)
    low_rank = torch.randn(30, 3, generator=gen, dtype=torch.float64) @ torch.randn(
        3, 20, generator=gen, dtype=torch.float64
    )
    cases = [
        ("a 32x32 picture", _picture(32), 0.05),
        ("a 32x32 picture", _picture(32), 0.01),
        ("32x32 noise", torch.randn(32, 32, generator=gen, dtype=torch.float64), 0.05),
        (
            "a rank-3 30x20 matrix + small noise",
            low_rank + 1e-3 * torch.randn(30, 20, generator=gen, dtype=torch.float64),
            0.01,
        ),
    ]
    for name, W, limit in cases:
        S = torch.linalg.svdvals(W)
        norm = float(torch.linalg.matrix_norm(W))
        expected = next(r for r in range(len(S) + 1) if eckart_young_error(S, r) / norm < limit)
        case = f"{name}, below {limit:.0%}"
        ok, got = _call(report, case, smallest_rank_below, W.clone(), limit)
        if ok:
            hint = ""
            if got == expected + 1:
                hint = " (one too many: is your comparison strict, and do you start at r = 0?)"
            elif isinstance(got, int) and got < expected:
                hint = " (the error at that rank is still too large: measure ||W - W_r|| / ||W||, not sigma_r)"
            report.check(got == expected, f"{case}: r={expected}", f"{case}: got {got!r}, expected r={expected}{hint}")
    return report


def _picture(n: int) -> torch.Tensor:
    return synthetic_image(n).double()


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


def check_trainable_share(trainable_share) -> CheckReport:
    """trainable_share(model) -> trainable parameters / ALL parameters of the model (frozen + trainable),
    counted from the model itself (each tensor once: the tied embedding is one tensor)."""
    report = CheckReport("trainable_share(model)")
    config = GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16)
    cases = [
        ("LoRA r=2 on q_proj, v_proj", LoRAConfig(r=2, targets=("q_proj", "v_proj"))),
        ("LoRA r=4 on up_proj, down_proj", LoRAConfig(r=4, targets=("up_proj", "down_proj"))),
        ("full fine-tuning (nothing frozen)", None),
    ]
    for name, lora in cases:
        with torch.random.fork_rng():
            model = GPT(config) if lora is None else apply_lora(GPT(config), lora)
        params = list(model.parameters())
        trainable = sum(p.numel() for p in params if p.requires_grad)
        total = sum(p.numel() for p in params)
        expected = trainable / total
        ok, got = _call(report, name, trainable_share, model)
        if not ok:
            continue
        hint = ""
        if (
            total > trainable
            and isinstance(got, (int, float))
            and math.isclose(got, trainable / (total - trainable), rel_tol=1e-9)
        ):
            hint = " (that divides by the frozen base only; divide by every parameter of the adapted model)"
        elif isinstance(got, (int, float)) and math.isclose(got, 100 * expected, rel_tol=1e-9):
            hint = " (return a fraction, not a percentage)"
        report.check(
            isinstance(got, (int, float)) and math.isclose(got, expected, rel_tol=1e-9),
            f"{name}: {trainable:,} / {total:,} = {expected:.2%}",
            f"{name}: got {got!r}, expected {trainable:,} / {total:,} = {expected:.6f}{hint}",
        )
    return report


def check_break_even_rank(break_even_rank) -> CheckReport:
    """break_even_rank(d, k) -> the largest r for which LoRA's r*(d+k) numbers are fewer than d*k."""
    report = CheckReport("break_even_rank(d, k)")
    for d, k in ((4, 4), (12288, 12288), (512, 128), (3, 5), (1, 7)):
        expected = max(r for r in range(0, min(d, k) + 1) if r * (d + k) < d * k)
        ok, got = _call(report, f"d={d}, k={k}", break_even_rank, d, k)
        if ok:
            report.check(
                got == expected,
                f"d={d}, k={k}: r={expected}",
                f"d={d}, k={k}: got {got!r}, expected {expected} (r*(d+k) must be strictly below d*k)",
            )
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
        GPTConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128, positions="learned"),
        GPTConfig(vocab_size=33, block_size=32, n_layer=3, n_head=2, n_embd=48, bias=True, positions="learned"),
    ]
    for config in configs:
        expected = GPT(config).num_parameters()
        case = f"{config.n_layer} layers, n_embd {config.n_embd}, bias={config.bias}, positions={config.positions!r}"
        ok, got = _call(report, case, count_parameters, config)
        if ok:
            hint = ""
            if got == expected + config.vocab_size * config.n_embd:
                hint = " (lm_head shares its weight with tok_emb: count it once)"
            elif abs(got - expected) == config.block_size * config.n_embd:
                hint = " (only positions='learned' has a position table, block_size x n_embd; rotary has none)"
            report.check(got == expected, f"{case}: {expected:,}", f"{case}: got {got!r}, expected {expected:,}{hint}")
    return report


def _reference_whole_text_loss(model: GPT, tokens: torch.Tensor) -> float:
    block = model.config.block_size
    n = (len(tokens) - 1) // block  # windows of block inputs, each with its block next-character targets
    x = tokens[: n * block].view(n, block)
    y = tokens[1 : n * block + 1].view(n, block)
    with torch.no_grad():
        logits, _ = model.eval()(x)
    return float(nn.functional.cross_entropy(logits.double().reshape(-1, logits.size(-1)), y.reshape(-1)))


def check_whole_text_loss(whole_text_loss) -> CheckReport:
    """whole_text_loss(model, tokens) -> the mean cross-entropy (nats per character) over the whole 1-D token
    tensor, cut into consecutive non-overlapping windows of block_size inputs (window i predicts tokens
    i*block_size+1 ... (i+1)*block_size; a tail too short for a full window is dropped), in eval mode."""
    report = CheckReport("whole_text_loss(model, tokens)")
    gen = torch.Generator().manual_seed(3)
    for layers, length in ((1, 65), (2, 100), (2, 33)):
        config = GPTConfig(vocab_size=13, block_size=8, n_layer=layers, n_head=2, n_embd=16, dropout=0.2)
        with torch.random.fork_rng():
            torch.manual_seed(layers)
            model = GPT(config)
        tokens = torch.randint(0, 13, (length,), generator=gen)
        case = f"{layers} layer(s), {length} tokens, block_size 8"
        expected = _reference_whole_text_loss(copy.deepcopy(model), tokens)
        model.train()  # as a learner's model may be: dropout must be off while measuring
        with torch.random.fork_rng():
            ok, got = _call(report, case, whole_text_loss, model, tokens.clone())
        if ok:
            report.check(
                isinstance(got, (int, float, torch.Tensor)) and math.isclose(float(got), expected, rel_tol=1e-4),
                f"{case}: {expected:.4f} nats",
                f"{case}: got {got!r}, expected {expected:.4f} nats (eval mode? every full window, no overlap?)",
            )
    return report


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).double() for t in tensors])


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-30))


def check_train_step(train_step) -> CheckReport:
    """train_step(model, optimizer, x, y) -> float: one optimizer step on the batch (x, y), returning its loss.

    Each case hands over a GPT with dropout, left in eval mode and holding gradients from an earlier backward,
    and a plain SGD optimizer (no momentum), whose update is exactly -lr * gradient. So a right step moves the
    weights along this batch's gradient alone (clipping may shorten the move, never turn it), and the classic
    slips each leave their own trace: the old gradients added in (no zero_grad), the weights unmoved or moved by
    the old gradients (step before backward), a tensor returned instead of a float, dropout left off (no train())."""
    report = CheckReport("train_step(model, optimizer, x, y)")
    gen = torch.Generator().manual_seed(5)
    for layers, lr in ((1, 0.05), (2, 0.1)):
        config = GPTConfig(vocab_size=11, block_size=8, n_layer=layers, n_head=2, n_embd=16, dropout=0.3)
        with torch.random.fork_rng():
            torch.manual_seed(layers)
            model = GPT(config)
        x = torch.randint(0, 11, (4, 8), generator=gen)
        y = torch.randint(0, 11, (4, 8), generator=gen)
        params = list(model.parameters())  # unique: lm_head.weight is tok_emb.weight
        stale = [torch.randn(p.shape, generator=gen) for p in params]
        case = f"{layers} layer(s), SGD lr={lr}"

        reference = copy.deepcopy(model).train()  # this batch's gradient, under the dropout masks of seed 0
        with torch.random.fork_rng():
            torch.manual_seed(0)
            _, loss = reference(x, y)
        loss.backward()
        expected_loss = loss.item()
        grad = _flat(p.grad for p in reference.parameters())
        stale_flat = _flat(stale)
        scale = float(grad.norm() / stale_flat.norm())  # old gradients as large as the new one
        for p, s in zip(params, stale):
            p.grad = s * scale

        before = _flat(params)
        model.eval()  # as an evaluation before the step would leave it
        optimizer = torch.optim.SGD(params, lr=lr)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            ok, got = _call(report, case, train_step, model, optimizer, x, y)
        if not ok:
            continue
        report.check(
            isinstance(got, float),
            f"{case}: returns a Python float",
            f"{case}: returned a {type(got).__name__}, not a Python float: return loss.item() (a tensor keeps its "
            "autograd graph, and a list of them keeps every step's graph alive)",
        )
        report.check(
            model.training and all(m.training for m in model.modules()),
            f"{case}: leaves the model in train mode (dropout on)",
            f"{case}: the model was handed over in eval mode and left there, so dropout was off during the step: "
            "call model.train() first",
        )
        try:
            value = float(got.detach() if isinstance(got, torch.Tensor) else got)
        except Exception:  # anything float() refuses: already reported as not a float
            value = math.nan
        report.check(
            math.isclose(value, expected_loss, rel_tol=1e-4),
            f"{case}: returns the batch's loss before the step ({expected_loss:.4f})",
            f"{case}: returned {got!r:.60}, expected the batch's loss before the step, in train mode "
            f"({expected_loss:.4f})",
        )
        move = _flat(params) - before
        wanted = -grad  # SGD: -lr * gradient (times a clipping factor <= 1)
        if float(move.norm()) == 0.0:
            report.check(
                False,
                "",
                f"{case}: the weights did not move: optimizer.step() must come after loss.backward() (step applies "
                "the gradients that backward has just computed)",
            )
            continue
        along = _cosine(move, wanted)
        factor = float(move.norm() / (lr * grad.norm()))
        hint = ""
        if _cosine(move, -(grad + scale * stale_flat)) > 0.999:
            hint = " (it is the new gradient plus the old one: call optimizer.zero_grad() before backward)"
        elif _cosine(move, -stale_flat) > 0.999:
            hint = " (it is the old gradients: optimizer.step() came before loss.backward())"
        report.check(
            along > 0.999 and factor < 1 + 1e-4,
            f"{case}: the weights move along this batch's gradient only (by {factor:.2f} of lr x gradient)",
            f"{case}: the weights did not move along this batch's gradient (cosine {along:.3f}, length {factor:.2f} "
            f"of lr x gradient){hint}",
        )
    return report


# ----------------------------------------------------------------------------------------------------
# Chapter 4


def _lora_factors(layer):
    for a, b in (("lora_A", "lora_B"), ("A", "B")):
        if isinstance(getattr(layer, a, None), torch.Tensor) and isinstance(getattr(layer, b, None), torch.Tensor):
            return getattr(layer, a), getattr(layer, b)
    return None


def check_lora_layer(lora_class) -> CheckReport:
    """lora_class(base: nn.Linear, r, alpha): frozen base + (alpha / r) * B @ A, compared with LoRALinear."""
    report = CheckReport(f"{getattr(lora_class, '__name__', 'LoRA layer')}(base, r, alpha)")
    gen = torch.Generator().manual_seed(0)
    for k, d, r, alpha, bias in ((32, 16, 4, 8.0, False), (12, 20, 2, 1.0, True)):
        case = f"k={k}, d={d}, r={r}, alpha={alpha}{', with bias' if bias else ''}"
        with torch.random.fork_rng():  # the learner's init must not shift the notebook's random numbers
            torch.manual_seed(0)
            base = nn.Linear(k, d, bias=bias)
            reference_base = copy.deepcopy(base)
            ok, layer = _call(report, case, lora_class, base, r, alpha)
        if not ok:
            continue
        factors = _lora_factors(layer)
        if not report.require(factors is not None, f"{case}: no A/B (or lora_A/lora_B) tensors found on the layer"):
            continue
        A, B = factors
        if not report.require(
            tuple(A.shape) == (r, k) and tuple(B.shape) == (d, r),
            f"{case}: A is {tuple(A.shape)} and B {tuple(B.shape)}; expected A {(r, k)} and B {(d, r)}",
        ):
            continue
        trainable = {id(p) for p in layer.parameters() if p.requires_grad}
        report.check(
            trainable == {id(A), id(B)},
            f"{case}: only A and B are trainable",
            f"{case}: trainable tensors should be exactly A and B (is the base weight frozen? are A, B nn.Parameters?)",
        )
        x = torch.randn(6, k, generator=gen)
        ok, out = _call(report, f"{case}: forward", layer, x)
        if not ok:
            continue
        report.check(
            torch.allclose(out, reference_base(x), atol=1e-6),
            f"{case}: at initialisation it computes exactly the base layer",
            f"{case}: at initialisation the output differs from the base layer's (B should start at zero)",
        )
        # LoRA starts A random and B = 0, so B's gradient (through A x) is nonzero and A's is zero. The output alone
        # cannot tell this from the swapped start (A = 0, B random); the gradients can. A = B = 0 is a saddle point:
        # both gradients are exactly zero, so nothing ever learns.
        ok, grads = _call(
            report,
            f"{case}: gradients at initialisation",
            lambda: torch.autograd.grad(out.square().sum(), (A, B), allow_unused=True),
        )
        if ok:
            moves_a, moves_b = (g is not None and g.abs().sum().item() > 0 for g in grads)
            if moves_a and not moves_b:
                wrong = (
                    f"{case}: at initialisation only A gets a gradient: A starts at zero and B random, the swapped "
                    "init; LoRA starts A random and B at zero"
                )
            else:
                wrong = (
                    f"{case}: at initialisation neither A nor B gets a gradient: with A = 0 and B = 0 (a saddle point) "
                    "LoRA never learns; A should start random"
                )
            report.check(
                moves_b,
                f"{case}: at initialisation B gets a nonzero gradient (A random, B = 0: training can start)",
                wrong,
            )
        with torch.random.fork_rng():
            reference = LoRALinear(reference_base, r, alpha)
        with torch.no_grad():
            A.copy_(torch.randn(r, k, generator=gen))
            B.copy_(torch.randn(d, r, generator=gen))
            reference.lora_A.copy_(A)
            reference.lora_B.copy_(B)
        ok, out = _call(report, f"{case}: forward", layer, x)
        if not ok:
            continue
        expected = reference(x)
        if not report.check(
            torch.allclose(out, expected, atol=1e-5),
            f"{case}: with the same A and B, the same output as lora_lab.LoRALinear",
            f"{case}: with the same A and B the output differs from lora_lab.LoRALinear by "
            f"{(out - expected).abs().max().item():.3g} (is the branch scaled by alpha / r?)",
        ):
            continue
        ok, _ = _call(report, f"{case}: backward", lambda: out.square().sum().backward())
        if not ok:
            continue
        expected.square().sum().backward()
        report.check(
            A.grad is not None
            and B.grad is not None
            and torch.allclose(A.grad, reference.lora_A.grad, atol=1e-4)
            and torch.allclose(B.grad, reference.lora_B.grad, atol=1e-4),
            f"{case}: the same gradients for A and B",
            f"{case}: the gradients of A and B differ from lora_lab.LoRALinear's",
        )
    return report


def check_merged_weight(merged_weight) -> CheckReport:
    """merged_weight(layer: LoRALinear) -> the (d, k) weight of a plain nn.Linear computing the same."""
    report = CheckReport("merged_weight(layer)")
    gen = torch.Generator().manual_seed(0)
    for k, d, r, alpha, bias in ((16, 8, 2, 4.0, False), (10, 24, 4, 16.0, True)):
        case = f"k={k}, d={d}, r={r}, alpha={alpha}"
        with torch.random.fork_rng():
            torch.manual_seed(1)
            layer = LoRALinear(nn.Linear(k, d, bias=bias), r, alpha)
        with torch.no_grad():
            layer.lora_B.copy_(torch.randn(d, r, generator=gen))
        before = _snapshot(layer)
        ok, W = _call(report, case, merged_weight, layer)
        if not ok:
            continue
        if not report.require(
            isinstance(W, torch.Tensor) and tuple(W.shape) == (d, k),
            f"{case}: should return a ({d}, {k}) tensor, got {getattr(W, 'shape', type(W).__name__)}",
        ):
            continue
        x = torch.randn(5, k, generator=gen)
        with torch.no_grad():
            plain = torch.nn.functional.linear(x, W, layer.base.bias)
            report.check(
                torch.allclose(plain, layer(x), atol=1e-5),
                f"{case}: a plain Linear with this weight computes what the LoRA layer computes",
                f"{case}: a plain Linear with this weight differs from the LoRA layer (W0 + (alpha / r) * B @ A?)",
            )
        report.check(
            _unchanged(layer, before),
            f"{case}: the layer itself is left unchanged",
            f"{case}: merged_weight changed the layer's tensors; it should only compute a new one",
        )
    return report


def check_fit_lora(fit_lora) -> CheckReport:
    """fit_lora(base, target, r, steps) -> a lora_lab.LoRALinear around `base`, trained (only A and B) for
    `steps` optimizer steps so that it computes what the nn.Linear `target` computes on random inputs.

    The target differs from the base by a rank-r change, so LoRA can match it: the check measures how close
    the learned update (alpha/r) B A comes to target.weight - base.weight, and that `base` was not changed."""
    report = CheckReport("fit_lora(base, target, r, steps)")
    gen = torch.Generator().manual_seed(4)
    for d, k, r in ((12, 16, 2), (20, 10, 1)):
        base = nn.Linear(k, d, bias=False)
        with torch.no_grad():
            base.weight.copy_(torch.randn(d, k, generator=gen) / math.sqrt(k))
        change = torch.randn(d, r, generator=gen) @ torch.randn(r, k, generator=gen) / math.sqrt(k)
        target = nn.Linear(k, d, bias=False)
        with torch.no_grad():
            target.weight.copy_(base.weight + change)
        before = base.weight.detach().clone()
        case = f"{d}x{k}, a rank-{r} change"
        with torch.random.fork_rng():
            torch.manual_seed(0)
            ok, layer = _call(report, case, fit_lora, base, target, r, 400)
        if not ok:
            continue
        if not report.require(
            isinstance(layer, LoRALinear), f"{case}: return the trained lora_lab.LoRALinear, got {type(layer).__name__}"
        ):
            continue
        report.check(
            torch.equal(layer.base.weight, before) and not layer.base.weight.requires_grad,
            f"{case}: the base weight is frozen and unchanged",
            f"{case}: the base weight changed or is trainable; LoRA trains only A and B",
        )
        learned = layer.scale * (layer.lora_B @ layer.lora_A).detach()
        relative = float(torch.linalg.matrix_norm(learned - change) / torch.linalg.matrix_norm(change))
        report.check(
            relative < 0.05,
            f"{case}: the learned (alpha/r) B A is within 5% of the change",
            f"{case}: the learned (alpha/r) B A is {relative:.0%} off the change "
            "(train longer, or a larger learning rate?)",
        )
    return report


# ----------------------------------------------------------------------------------------------------
# Chapter 5


def check_training_bytes(training_bytes) -> CheckReport:
    """training_bytes(n_frozen, n_trainable) -> fp32 bytes of weights, gradients and AdamW's two moments."""
    report = CheckReport("training_bytes(n_frozen, n_trainable)")
    for n_frozen, n_trainable in ((0, 1000), (800_000, 16_384), (175_000_000_000, 0), (10, 10)):
        expected = 4 * (n_frozen + n_trainable) + 4 * n_trainable + 8 * n_trainable
        case = f"n_frozen={n_frozen:,}, n_trainable={n_trainable:,}"
        ok, got = _call(report, case, training_bytes, n_frozen, n_trainable)
        if not ok:
            continue
        hint = ""
        if got == 4 * (n_frozen + n_trainable) + 4 * (n_frozen + n_trainable) + 8 * (n_frozen + n_trainable):
            hint = " (frozen weights get no gradient and no optimizer state)"
        elif got == 4 * (n_frozen + n_trainable) + 8 * n_trainable:
            hint = " (each trainable weight also has a gradient)"
        report.check(
            got == expected, f"{case}: {expected:,} bytes", f"{case}: got {got!r}, expected {expected:,}{hint}"
        )
    return report


def check_gradient_bytes(gradient_bytes) -> CheckReport:
    """gradient_bytes(model, x, y) -> run one forward and backward pass of the model's loss on (x, y) and return
    the bytes of every .grad that exists afterwards (numel * element_size), each parameter once."""
    report = CheckReport("gradient_bytes(model, x, y)")
    config = GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16)
    gen = torch.Generator().manual_seed(5)
    x = torch.randint(0, 11, (3, 8), generator=gen)
    y = torch.randint(0, 11, (3, 8), generator=gen)
    for name, lora in (
        ("full fine-tuning", None),
        ("LoRA r=2 on q_proj, v_proj", LoRAConfig(r=2, targets=("q_proj", "v_proj"))),
    ):
        with torch.random.fork_rng():
            model = GPT(config) if lora is None else apply_lora(GPT(config), lora)
        trainable = [p for p in model.parameters() if p.requires_grad]
        expected = sum(tensor_bytes(p) for p in trainable)
        everything = sum(tensor_bytes(p) for p in model.parameters())
        ok, got = _call(report, name, gradient_bytes, model, x.clone(), y.clone())
        if not ok:
            continue
        counted = sum(tensor_bytes(p.grad) for p in model.parameters() if p.grad is not None)
        hint = " (frozen weights get no .grad)" if got == everything != expected else ""
        report.check(
            got == expected == counted,
            f"{name}: {expected:,} bytes of gradients, measured after backward",
            f"{name}: got {got!r}; after backward the .grads hold {counted:,} bytes (expected {expected:,}){hint}",
        )
    return report


# ----------------------------------------------------------------------------------------------------
# Chapter 6


def _safetensors_payload(path) -> int:
    """Bytes of tensor data in a .safetensors file: the file minus its 8-byte length and JSON header."""
    raw = Path(path).read_bytes()
    header = int.from_bytes(raw[:8], "little")
    return len(raw) - 8 - header


def check_adapter_payload(adapter_payload) -> CheckReport:
    """adapter_payload(config: GPTConfig, lora: LoRAConfig) -> bytes of tensor data save_adapter writes (fp32)."""
    report = CheckReport("adapter_payload(config, lora)")
    cases = [
        (GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16), LoRAConfig(r=2, targets=("q_proj",))),
        (
            GPTConfig(vocab_size=11, block_size=8, n_layer=3, n_head=2, n_embd=32),
            LoRAConfig(r=4, targets=("q_proj", "k_proj", "v_proj", "o_proj")),
        ),
        (
            GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=1, n_embd=8),
            LoRAConfig(r=1, targets=("up_proj", "down_proj")),
        ),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for i, (config, lora) in enumerate(cases):
            case = f"{config.n_layer} layers, n_embd {config.n_embd}, r={lora.r}, targets {list(lora.targets)}"
            with torch.random.fork_rng():
                model = apply_lora(GPT(config), lora)
            path = save_adapter(model, Path(tmp) / f"adapter{i}")
            expected = _safetensors_payload(path / "adapter_model.safetensors")
            ok, got = _call(report, case, adapter_payload, config, lora)
            if ok:
                report.check(
                    got == expected,
                    f"{case}: {expected:,} bytes, as measured in the saved file",
                    f"{case}: got {got!r}; the saved file holds {expected:,} bytes of tensors",
                )
    return report


def check_merge_difference(merge_difference) -> CheckReport:
    """merge_difference(model, x) -> the largest |logit| difference between the merged and the unmerged model
    on token ids x, measured, leaving the model unmerged and with exactly its weights as before."""
    report = CheckReport("merge_difference(model, x)")
    config = GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16)
    gen = torch.Generator().manual_seed(6)
    x = torch.randint(0, 11, (4, 8), generator=gen)
    for r in (2, 8):
        with torch.random.fork_rng():
            torch.manual_seed(r)
            model = apply_lora(GPT(config), LoRAConfig(r=r, alpha=2 * r, targets=("q_proj", "v_proj", "up_proj")))
            for layer in model.modules():
                if isinstance(layer, LoRALinear):
                    nn.init.normal_(layer.lora_B, std=0.5)  # as after training: a non-zero update to merge
        reference = copy.deepcopy(model).eval()
        with torch.no_grad():
            unmerged = reference(x)[0]
            merge_lora(reference)
            expected = float((reference(x)[0] - unmerged).abs().max())
        state = _snapshot(model)
        case = f"r={r}"
        ok, got = _call(report, case, merge_difference, model, x.clone())
        if not ok:
            continue
        report.check(
            isinstance(got, (int, float, torch.Tensor))
            and math.isclose(float(got), expected, rel_tol=1e-6, abs_tol=1e-12),
            f"{case}: the measured max |merged - unmerged| (float rounding, not a bug)",
            f"{case}: got {got!r}, measured {expected:.3e} (merge_lora, then compare the logits)",
        )
        layers = lora_layers(model)
        if not layers:  # merge_and_unload (or unload_lora) swapped every LoRA layer for a plain Linear
            wrong = (
                f"{case}: the model lost its LoRA layers (merge_and_unload?): merge_lora, measure, then unmerge_lora"
            )
        else:
            wrong = f"{case}: the model was left merged or its weights changed: unmerge_lora after measuring"
        report.check(
            bool(layers) and not any(l.merged for l in layers.values()) and _unchanged(model, state),
            f"{case}: the model is left unmerged, with its weights as before",
            wrong,
        )
    return report


# ----------------------------------------------------------------------------------------------------
# Chapter 7


def check_best_setting(best_setting) -> CheckReport:
    """best_setting(results, budget) -> the result with the lowest target_loss among those whose
    optimizer_bytes <= budget (None if none fits). results: a list of numerics.SettingResult."""
    report = CheckReport("best_setting(results, budget)")

    def point(r, memory, loss):
        return SettingResult(r, ("Wq", "Wv"), memory // 12, memory // 3, memory, loss, 2.0)

    results = [point(1, 1_200, 2.10), point(4, 4_800, 1.95), point(16, 19_200, 1.97), point(None, 9_600_000, 1.90)]
    for budget, expected in (
        (1_000, None),
        (1_200, results[0]),
        (10_000, results[1]),
        (20_000, results[1]),
        (10**9, results[3]),
    ):
        ok, got = _call(report, f"budget {budget:,} bytes", best_setting, list(results), budget)
        if ok:
            want = "None" if expected is None else expected.label
            report.check(
                got == expected,
                f"budget {budget:,} bytes: {want}",
                f"budget {budget:,} bytes: got {getattr(got, 'label', got)!r}, expected {want}",
            )
    return report


def check_update_norm(update_norm) -> CheckReport:
    """update_norm(layer) -> ||(alpha/r) B A||_F, the Frobenius norm of the update a lora_lab.LoRALinear adds
    to its weight (what merging would add)."""
    report = CheckReport("update_norm(layer)")
    gen = torch.Generator().manual_seed(7)
    for r, alpha in ((1, 16.0), (4, 16.0), (8, 4.0)):
        with torch.random.fork_rng():  # the same layers every run, and the learner's random state untouched
            torch.manual_seed(r)
            layer = LoRALinear(nn.Linear(24, 16), r=r, alpha=alpha)
        with torch.no_grad():
            layer.lora_B.copy_(torch.randn(16, r, generator=gen))
        expected = float(torch.linalg.matrix_norm(layer.scale * layer.lora_B.detach() @ layer.lora_A.detach()))
        case = f"r={r}, alpha={alpha:g}"
        ok, got = _call(report, case, update_norm, layer)
        if not ok:
            continue
        hint = ""
        if isinstance(got, (int, float, torch.Tensor)) and math.isclose(
            float(got), expected / layer.scale, rel_tol=1e-5
        ):
            hint = " (the update is scaled by alpha / r)"
        report.check(
            isinstance(got, (int, float, torch.Tensor)) and math.isclose(float(got), expected, rel_tol=1e-5),
            f"{case}: ||dW||_F = {expected:.4f}",
            f"{case}: got {got!r}, expected {expected:.4f}{hint}",
        )
    return report


# ----------------------------------------------------------------------------------------------------
# Chapter 8


def _variant_model(variant: str, seed: int, r: int = 4) -> GPT:
    """A small GPT (with biases) adapted by `variant` on q_proj and up_proj, its trainable tensors moved away from
    their start so that B, b, ... are not zero. The same model every call; the global random state is untouched."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=24, bias=True))
        apply_lora(model, LoRAConfig(r=r, alpha=2.0 * r, targets=("q_proj", "up_proj"), variant=variant))
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.3 * torch.randn_like(p))
    return model


def check_dora_weight(dora_weight) -> CheckReport:
    """dora_weight(W0, A, B, magnitude, scale) -> DoRA's adapted weight m * (W0 + scale B A) / ||W0 + scale B A||,
    the norm taken per output row (W0: d x k, A: r x k, B: d x r, magnitude: d)."""
    report = CheckReport("dora_weight(W0, A, B, magnitude, scale)")
    for seed in (0, 1):
        for name, layer in lora_layers(_variant_model("dora", seed)).items():
            W0 = layer.base.weight.detach().clone()
            A, B, m = (t.detach().clone() for t in (layer.lora_A, layer.lora_B, layer.lora_magnitude))
            expected = layer.merged_weight(W0.float())  # lora_lab's DoRA: what merging writes into W
            case = f"{name} (seed {seed}, d={W0.shape[0]}, k={W0.shape[1]}, r={layer.r})"
            ok, got = _call(report, case, dora_weight, W0.clone(), A.clone(), B.clone(), m.clone(), layer.scale)
            if not ok:
                continue
            if not report.require(
                isinstance(got, torch.Tensor) and got.shape == expected.shape,
                f"{case}: expected a tensor of shape {tuple(expected.shape)}, got "
                f"{getattr(got, 'shape', type(got).__name__)}",
            ):
                continue
            got = got.detach().float()
            direction = W0 + layer.scale * B @ A
            hint = ""
            square = W0.shape[0] == W0.shape[1]
            if square and torch.allclose(got, direction * (m / direction.norm(dim=0))[None, :], atol=1e-5):
                hint = " (that is the norm of each column; DoRA's magnitude is one number per output row)"
            elif torch.allclose(got, m[:, None] * (W0 + B @ A) / (W0 + B @ A).norm(dim=1, keepdim=True), atol=1e-5):
                hint = " (B A is scaled by `scale` before it is added to W0)"
            elif torch.allclose(got, direction, atol=1e-5):
                hint = " (that is W0 + scale B A; DoRA then rescales each row to length m)"
            err = (got - expected).abs().max().item()
            report.check(
                err <= 1e-5,
                f"{case}: matches DoRALinear's merged weight (max difference {err:.1e})",
                f"{case}: differs from DoRALinear's merged weight by up to {err:.3g}{hint}",
            )
    return report


def _reference_frozen_bytes(model: nn.Module) -> int:
    return sum(
        tensor_bytes(t)
        for layer in lora_layers(model).values()
        for t in layer.adapter_tensors().values()
        if not isinstance(t, nn.Parameter)
    )


def check_frozen_adapter_bytes(frozen_adapter_bytes) -> CheckReport:
    """frozen_adapter_bytes(model) -> the bytes an adapter file stores for `model` that are NOT trained: every LoRA
    layer's persistent buffers (LoRA-FA's frozen A, PiSSA's A0 and B0); not the base, not the trainable tensors, and
    not the buffers that are regenerated instead of saved (VeRA's shared pair)."""
    report = CheckReport("frozen_adapter_bytes(model)")
    for variant in ("lora", "lora_fa", "pissa", "vera"):
        model = _variant_model(variant, seed=3)
        expected = _reference_frozen_bytes(model)
        trainable = sum(tensor_bytes(p) for p in model.parameters() if p.requires_grad)
        every_buffer = sum(tensor_bytes(b) for l in lora_layers(model).values() for b in l.buffers())
        ok, got = _call(report, variant, frozen_adapter_bytes, model)
        if not ok:
            continue
        hint = ""
        if got == every_buffer != expected:
            hint = " (VeRA's shared pair is a non-persistent buffer: regenerated from its seed, never saved)"
        elif got == expected + trainable != expected:
            hint = " (that counts the trainable tensors too; only the frozen ones were asked for)"
        elif got == expected // 4:
            hint = " (that is a count of numbers; each fp32 number is 4 bytes)"
        report.check(
            isinstance(got, int) and got == expected,
            f"{variant}: {expected:,} bytes",
            f"{variant}: got {got!r}, expected {expected:,} bytes{hint}",
        )
    return report


# ----------------------------------------------------------------------------------------------------
# Chapter 9


def _mixed_case(seed: int, d: int, k: int, ranks: dict[str, int], rows: list, T: int = 3):
    """(x, weight, adapters, rows) of one mixed batch: random tensors, B non-zero as after training, and a
    different scale per adapter so a forgotten or swapped scale shows."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(len(rows), T, k, generator=gen)
    weight = torch.randn(d, k, generator=gen) / math.sqrt(k)
    adapters = {
        name: (torch.randn(r, k, generator=gen), torch.randn(d, r, generator=gen), 0.5 * (i + 1) / r)
        for i, (name, r) in enumerate(ranks.items())
    }
    return x, weight, adapters, rows


def _close(got: torch.Tensor, expected: torch.Tensor) -> bool:
    return torch.allclose(got, expected, atol=1e-5, rtol=1e-5)


def _mixed_reference(x, weight, adapters, rows, every_adapter=False, unscaled=False) -> torch.Tensor:
    """Row i through its own adapted layer alone, W0 + s B A (the right answer), or a classic wrong one: every
    adapter's branch on every row, or the branch without its scale."""
    out = []
    for i, name in enumerate(rows):
        names = list(adapters) if every_adapter else ([] if name is None else [name])
        w = weight.clone()
        for n in names:
            A, B, scale = adapters[n]
            w = w + (1.0 if unscaled else scale) * B @ A
        out.append(x[i] @ w.T)
    return torch.stack(out)


def check_mixed_lora_linear(mixed_lora_linear) -> CheckReport:
    """mixed_lora_linear(x, weight, adapters, rows) -> one frozen linear layer serving a batch whose rows use
    different adapters: x (N, T, k), weight W0 (d, k), adapters {name: (A (r, k), B (d, r), scale)}, rows a list of
    N adapter names or None. Row i of the (N, T, d) output is x_i W0^T + scale * x_i A^T B^T with row i's own
    adapter, or x_i W0^T alone where rows[i] is None; the inputs are left unchanged."""
    report = CheckReport("mixed_lora_linear(x, weight, adapters, rows)")
    cases = (
        ("2 adapters of ranks 2 and 3, one row on the plain base", 0, 6, 6, {"a": 2, "b": 3}, ["a", None, "b", "a"]),
        ("d != k, an adapter no row uses", 1, 5, 7, {"a": 1, "b": 4, "c": 2}, ["b", None, "b", "a"]),
        ("every row on the plain base", 2, 4, 3, {"a": 2}, [None, None]),
        ("one row", 3, 3, 5, {"a": 2, "b": 2}, ["b"]),
    )
    for case, seed, d, k, ranks, rows in cases:
        x, weight, adapters, rows = _mixed_case(seed, d, k, ranks, rows)
        inputs = [x, weight] + [t for A, B, _ in adapters.values() for t in (A, B)]
        before = [t.clone() for t in inputs]
        # every answer, right and wrong, from the untouched inputs: the learner's code may change them in place
        expected = _mixed_reference(x, weight, adapters, rows)
        every_adapter = _mixed_reference(x, weight, adapters, rows, every_adapter=True)
        unscaled = _mixed_reference(x, weight, adapters, rows, unscaled=True)
        base_out = x @ weight.T
        ok, got = _call(report, case, mixed_lora_linear, x, weight, adapters, list(rows))
        if not ok:
            continue
        if not report.require(
            isinstance(got, torch.Tensor) and tuple(got.shape) == tuple(expected.shape),
            f"{case}: expected a tensor of shape {tuple(expected.shape)}, got "
            f"{tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__}",
        ):
            continue
        got = got.detach().float()
        right = _close(got, expected)
        base_rows_kept = all(_close(got[i], base_out[i]) for i, name in enumerate(rows) if name is None)
        hint = ""
        if not right and not base_rows_kept:
            hint = " (a row whose adapter is None keeps the base output x W0^T alone)"
        if len(adapters) > 1 and _close(got, every_adapter):
            hint = " (every row got every adapter's branch; row i takes only its own adapter, rows[i])"
        elif not right and _close(got, unscaled):
            hint = " (the branch is scaled: scale * x A^T B^T)"
        error = (got - expected).abs().max().item()
        report.check(
            right,
            f"{case}: every row matches its own adapted layer alone",
            f"{case}: differs from each row's own adapted layer by up to {error:.3g}{hint}",
        )
        report.check(
            all(torch.equal(a, b) for a, b in zip(inputs, before)),
            f"{case}: x, the weight and the adapters are left unchanged",
            f"{case}: your function changed its inputs in place",
        )
    return report


# ----------------------------------------------------------------------------------------------------
# Chapter 10


def _top_similarity_answers(a_1: torch.Tensor, a_2: torch.Tensor) -> dict[str, float]:
    """The right answer and the classic wrong ones, so a wrong answer can be named."""
    v_1 = torch.linalg.svd(a_1.double(), full_matrices=False).Vh
    v_2 = torch.linalg.svd(a_2.double(), full_matrices=False).Vh
    cos = float(v_1[0] @ v_2[0])
    rows = a_1[0].double() / a_1[0].double().norm(), a_2[0].double() / a_2[0].double().norm()
    answers = {
        "right": cos**2,
        "unsquared": abs(cos),
        "smallest": float(v_1[-1] @ v_2[-1]) ** 2,
        "first rows": float(rows[0] @ rows[1]) ** 2,
    }
    if a_1.shape == a_2.shape:  # only then can the left-singular vectors (length r) be compared at all
        u_1 = torch.linalg.svd(a_1.double(), full_matrices=False).U
        u_2 = torch.linalg.svd(a_2.double(), full_matrices=False).U
        answers["left"] = float(u_1[:, 0] @ u_2[:, 0]) ** 2
    return answers


def check_top_similarity(top_similarity) -> CheckReport:
    """top_similarity(a_1, a_2) -> phi(1, 1): the squared cosine between the top right-singular vectors of
    A_1 (r_1, k) and A_2 (r_2, k), as experiments.analysis.subspace_similarity(a_1, a_2)[0, 0] computes it."""
    report = CheckReport("top_similarity(a_1, a_2)")
    gen = torch.Generator().manual_seed(10)
    base = torch.randn(6, 24, generator=gen)
    scaled_rows = torch.eye(24)[:3] * torch.tensor([[3.0], [2.0], [1.0]])  # reads inputs 0-2, 0 the most
    narrow, wide = torch.randn(4, 24, generator=gen), torch.randn(12, 24, generator=gen)
    cases = [
        ("r_1 = r_2 = 6, k = 24", base, torch.randn(6, 24, generator=gen)),
        ("r_1 = 4, r_2 = 12, k = 24 (different ranks)", narrow, wide),
        ("A_2 = 3 A_1 (the same directions)", base, 3 * base),
        ("A_1 and A_2 read orthogonal inputs", scaled_rows, torch.eye(24)[3:8]),
    ]
    hints = {
        "unsquared": "that is |cos|: phi(1, 1) is the squared cosine",
        "smallest": "those are the smallest singular directions: the top one is the first row of Vh",
        "first rows": "that compares A's first rows: use the top right-singular vectors (rows of Vh), not rows of A",
        "left": "those are left-singular vectors (A's r outputs): phi compares the inputs A reads, the rows of Vh",
    }
    for case, a_1, a_2 in cases:
        ok, got = _call(report, case, top_similarity, a_1.clone(), a_2.clone())
        if not ok:
            continue
        answers = _top_similarity_answers(a_1, a_2)
        try:
            value = float(got)
        except (TypeError, ValueError):
            report.check(False, f"{case}: expected a number, got {type(got).__name__}")
            continue
        if math.isclose(value, answers["right"], rel_tol=1e-4, abs_tol=1e-6):
            report.check(True, f"{case}: phi(1, 1) = {answers['right']:.4f}")
            continue
        named = [n for n, v in answers.items() if n != "right" and math.isclose(value, v, rel_tol=1e-4, abs_tol=1e-6)]
        why = hints[named[0]] if named else "compare your top right-singular vectors with torch.linalg.svd(a).Vh[0]"
        report.check(False, f"{case}: got {value:.4f}, expected {answers['right']:.4f}: {why}")
    return report


# ----------------------------------------------------------------------------------------------------
# Chapter 12: the memory ledger


def _one_step(model: nn.Module, seed: int):
    """One AdamW step of `model` on a seeded batch: (optimizer, every tensor autograd saved, in order, views and
    repeats included). The gradients stay in place, as they are just before zero_grad."""
    gen = torch.Generator().manual_seed(seed)
    x, y = (torch.randint(0, model.config.vocab_size, (2, model.config.block_size), generator=gen) for _ in "xy")
    saved = []

    def keep(t):
        saved.append(t)
        return t

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        _, loss = model(x, y)
    loss.backward()
    optimizer.step()
    return optimizer, saved


def check_step_total_bytes(step_total_bytes) -> CheckReport:
    """step_total_bytes(model, optimizer, saved) -> the bytes one training step holds: every parameter and buffer
    once (a tied weight is one tensor), every .grad, every tensor in the optimizer's state, and the tensors autograd
    saved for backward (`saved`: a list with views and repeats), each storage once and not the weights themselves."""
    from ..nf4 import quantize_base  # the spine's QLoRA base: its codes and scales are buffers

    report = CheckReport("step_total_bytes(model, optimizer, saved)")
    config = GPTConfig(vocab_size=13, block_size=8, n_layer=2, n_head=2, n_embd=64)
    lora = LoRAConfig(r=2, targets=("q_proj", "v_proj"))
    cases = (
        ("full fine-tuning (tied embedding)", lambda: GPT(config)),
        ("LoRA r=2", lambda: apply_lora(GPT(config), lora)),
        ("QLoRA r=2 (NF4 base)", lambda: apply_lora(quantize_base(GPT(config)), lora)),
    )
    for seed, (name, build) in enumerate(cases):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build()
            optimizer, saved = _one_step(model, seed)
        params, buffers = list(model.parameters()), list(model.buffers())
        held = {t.untyped_storage().data_ptr() for t in params + buffers}
        weights = sum(tensor_bytes(t) for t in params + buffers)
        grads = sum(tensor_bytes(p.grad) for p in params if p.grad is not None)
        state = sum(tensor_bytes(t) for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}
        activations = sum(n for ptr, n in storages.items() if ptr not in held)
        expected = weights + grads + state + activations
        ok, got = _call(report, name, step_total_bytes, model, optimizer, list(saved))
        if not ok:
            continue
        tied = tensor_bytes(model.tok_emb.weight)
        via_state_dict = expected - weights + sum(tensor_bytes(t) for t in model.state_dict().values())
        hint = ""
        if got == expected - state:
            hint = " (the optimizer's state is missing: AdamW keeps two moments per trainable number)"
        elif got in (expected + tied, via_state_dict):
            hint = (
                " (the tied embedding counted twice? state_dict names it twice and leaves out non-persistent"
                " buffers; model.parameters() and model.buffers() list each tensor once)"
            )
        elif got == expected - sum(tensor_bytes(b) for b in buffers):
            hint = " (buffers are missing: the rotary tables, and a QLoRA base's codes and scales)"
        elif got == expected - grads:
            hint = " (the gradients are missing)"
        elif got > expected and got - expected <= sum(tensor_bytes(t) for t in saved):
            hint = (
                " (saved tensors counted more than once, or the weights autograd saved counted again: count each"
                " storage once, leaving out the parameters' and buffers')"
            )
        report.check(
            isinstance(got, int) and got == expected,
            f"{name}: {expected:,} bytes",
            f"{name}: got {got!r}, expected {expected:,} bytes{hint}",
        )
    return report


# ----------------------------------------------------------------------------------------------------
# Chapter 11: forgetting at a matched amount of learning


def _curve(points) -> list[dict]:
    return [{"step": s, "target": t, "source": f} for s, t, f in points]


def check_source_at_target(source_at_target) -> CheckReport:
    """source_at_target(curve, level) -> the source loss where a run's target loss first reaches `level`, linearly
    interpolated between curve points (as experiments.placement_lab.source_at_target computes it); NaN if never."""
    from ..experiments.placement_lab import source_at_target as reference

    report = CheckReport("source_at_target(curve, level)")
    uneven = _curve([(0, 3.0, 1.0), (10, 2.0, 1.4), (40, 1.0, 2.6)])  # steps unevenly spaced
    cases = [
        ("level on a curve point", uneven, 2.0),
        ("level between points (interpolate along the target loss)", uneven, 1.25),
        ("a curve that dips below the level, rises and dips again (the first crossing)",
         _curve([(0, 3.0, 1.0), (10, 1.5, 2.0), (20, 2.5, 1.2), (30, 1.0, 3.0)]), 2.0),
        ("a level the run never reaches", uneven, 0.5),
    ]  # fmt: skip
    for case, curve, level in cases:
        ok, got = _call(report, case, source_at_target, [dict(p) for p in curve], level)
        if not ok:
            continue
        expected = reference(curve, level)
        try:
            value = float(got)
        except (TypeError, ValueError):
            report.check(False, f"{case}: expected a number, got {type(got).__name__}")
            continue
        if math.isnan(expected):
            report.check(math.isnan(value), f"{case}: NaN", f"{case}: got {value:.4f}, expected NaN (never reached)")
            continue
        nearest = min(curve, key=lambda p: abs(p["target"] - level))["source"]
        crossings = [i for i in range(1, len(curve)) if curve[i]["target"] <= level <= curve[i - 1]["target"]]
        last = reference(curve[crossings[-1] - 1 :], level) if crossings else expected  # the last crossing's value
        hint = ""
        if math.isclose(value, expected):
            pass
        elif math.isclose(value, nearest):
            hint = " (that is the nearest point's source loss: interpolate between the two points around the level)"
        elif math.isclose(value, last):
            hint = " (a later crossing: take the first point where the target loss reaches the level)"
        else:
            hint = " (interpolate by the target loss, t = (before - level) / (before - after), not by the step)"
        report.check(
            math.isclose(value, expected, rel_tol=1e-9, abs_tol=1e-9),
            f"{case}: {expected:.4f}",
            f"{case}: got {value:.4f}, expected {expected:.4f}{hint}",
        )
    return report

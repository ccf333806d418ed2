"""A leaderboard of fine-tuning methods — built-ins, full fine-tuning and a variant of one's own — by the sound
protocol: matched budgets, learning rates tuned on validation text, paired seeds, verdicts on a test text.

The rules, in the order `leaderboard` applies them:
1. Methods: "full", a registered variant ("lora", "dora", ...), a name an installed package publishes in the
   entry-point group "lora_lab.variants", or an import path "mypkg.lora_xs:LoRAXS" (lora.resolve_variant).
2. Equal budgets. With `budget=N` each variant's rank is the largest whose trainable count over the targeted
   layers, by the class's own parameter_count(d, k, r), does not exceed N (the closest from below; never above),
   and never above min(d, k) of the layers (then the table says the rank is capped). A method whose rank-1 count
   is already above N is refused. With `rank=R` every variant gets rank R instead (the "equal rank" view).
   Full fine-tuning trains every weight whatever the budget: it is the reference point, not a contestant at N.
3. Learning rates, per method, chosen on the task's VALIDATION text with `selection_seed`, a seed that is not
   among the reported ones. The grid extends itself while its best rate sits at an edge (one factor-2 step at
   a time, at most `max_extensions` steps), and the table shows each chosen rate with its neighbours. Selection
   is given a copy of the task without its test texts, so it cannot read them.
   One knob is chosen with the rate, by the same search run at each of its values (select_setting): the ratio
   of "lora+" (LoRA trained with LoRA+, TrainConfig.lora_plus_ratio) from RATIO_GRID, and LoRA's alpha whenever
   "rslora" or "lora+" is compared with it (tune_alpha="auto"; at a fixed rank rsLoRA is LoRA with alpha * sqrt(r),
   so an untuned LoRA alpha would compare two alphas), from alpha * ALPHA_FACTORS plus alpha * sqrt(r). Cost: a
   knob of K values and a grid of G rates take at most K * (G + max_extensions) selection runs instead of
   G + max_extensions; the sections show each value with its best rate and loss, and the number of runs.
4. Reported numbers: every method is run at its chosen rate with the same `seeds` (>= stats.MIN_SEEDS; the same
   seed gives every method the same batches, and the same LoRA init where the shapes agree) and scored on the
   task's TEST text, which no choice looked at. The base is scored there too.
5. Verdicts: each method against the reference (the first method, or the best) on the paired per-seed test
   losses, stats.paired_difference with a 95% t interval, Holm-adjusted across the table's calls; one computed
   sentence per call.
6. Every run goes through runs.run_once, so it is cached on disk: an interrupted leaderboard continues where it
   stopped, and a second call returns the same numbers at once.
Cost: the whole memory of a training step (frozen and trainable weights, gradients, optimizer state,
activations), counted by memory.memory_ledger on one real step of the method at the runs' batch size and block
size, on the CPU, in fp32: the same counter for every method.
"""

from __future__ import annotations

import copy
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from ..lora import LoRAConfig, apply_lora, resolve_variant
from ..model import GPT
from ..storage.files import claim_output_dir, write_file_atomic, write_json_atomic
from ..targets import target_linears
from ..tasks import Task
from ..tensorboard_logs import check_log_dir, require_tensorboard, run_log_dir
from .defaults import (
    ALPHA,
    DEFAULT_TARGETS,
    EVAL_CHARS,
    FULL_LEARNING_RATES,
    LORA_LEARNING_RATES,
    SELECTION_SEED,
    STEPS,
)
from .estimator import encode_task, one_cpu_thread, task_scores
from .finetune import method_label
from .memory import MemoryLedger, memory_ledger
from .parallel import Prefetcher, RunRequest
from .protocol import protocol_train_config, report_view, selection_view  # noqa: F401 (also leaderboard's API)
from .reports import format_table, new_figure, save_figure, table_csv
from .runs import Run, model_digest, run_once
from .stats import MIN_SEEDS, TooFewSeedsError, t_quantile, verdicts_against

LEADERBOARD_FORMAT = "lora_lab.leaderboard.v1"  # the tag of a folder write_leaderboard writes into
REPORT_SEEDS = (0, 1, 2, 3, 4)  # MIN_SEEDS paired seeds
MAX_EXTENSIONS = 4  # factor-2 steps a grid may grow by at its edges, in all
FULL = "full"
LORA_PLUS = "lora+"  # LoRA trained with LoRA+ (TrainConfig.lora_plus_ratio), the ratio chosen on validation
RATIO_GRID = (2.0, 4.0, 8.0, 16.0)  # LoRA+ ratios tried (the LoRA+ paper suggests about 16)
ALPHA_FACTORS = (0.5, 1.0, 2.0, 4.0)  # LoRA's alpha search: ALPHA times these, plus ALPHA * sqrt(r)
FLOAT32_MAX = torch.finfo(torch.float32).max
COST_NOTE = (
    "memory = the whole training step (weights, gradients, AdamW state, activations) as memory.memory_ledger "
    "counts it for one step at the runs' batch size and block size on the CPU (fp32)"
)


# ----------------------------------------------------------------------------------------------
# Choosing the learning rate on validation text


@dataclass(frozen=True)
class Selection:
    """The learning-rate search of one method: every rate tried and its validation loss, the chosen one."""

    scores: dict[float, float]  # rate -> validation loss (inf for a diverged run), ascending by rate
    chosen: float
    extended: int  # factor-2 steps added at the edges
    at_edge: bool  # the chosen rate is still the lowest or highest tried (the extensions ran out)

    def neighbours(self) -> tuple[float | None, float | None]:
        """The rates tried just below and just above the chosen one (None past an edge)."""
        rates = sorted(self.scores)
        i = rates.index(self.chosen)
        return (rates[i - 1] if i > 0 else None, rates[i + 1] if i + 1 < len(rates) else None)

    def describe(self) -> str:
        """The sweep in one line: each rate with its loss, the chosen one marked, its neighbours and the edges."""
        parts = [f"{lr:g} -> {v:.4f}{' [chosen]' if lr == self.chosen else ''}" for lr, v in self.scores.items()]
        below, above = self.neighbours()
        near = ", ".join(
            f"{side} {lr:g}: {self.scores[lr] - self.scores[self.chosen]:+.4f}"
            for side, lr in (("below", below), ("above", above))
            if lr is not None
        )
        grown = f"; grid extended by {self.extended} factor-2 step(s)" if self.extended else ""
        edge = "; still at the grid's edge after the extensions: widen the grid" if self.at_edge else ""
        return ", ".join(parts) + f" (neighbours vs chosen: {near or 'none'}{grown}{edge})"

    def to_dict(self) -> dict:
        return {
            "scores": {f"{lr:g}": v for lr, v in self.scores.items()},
            "chosen": self.chosen,
            "extended": self.extended,
            "at_edge": self.at_edge,
        }


def check_grid(rates, what: str = "learning-rate grid") -> tuple[float, ...]:
    """A grid (of learning rates, or `what`): positive finite numbers, distinct, returned ascending."""
    try:
        grid = tuple(sorted(float(r) for r in rates))
    except (TypeError, ValueError):
        raise ValueError(f"A {what} is a list of positive numbers, got {rates!r:.80}.") from None
    if not grid or any(isinstance(r, bool) for r in rates) or not all(0 < r < math.inf for r in grid):
        raise ValueError(f"A {what} is a non-empty list of positive finite numbers, got {rates!r:.80}.")
    if len(set(grid)) != len(grid):
        raise ValueError(f"A {what} lists a value twice: {list(grid)}.")
    return grid


def select_learning_rate(score, grid, max_extensions: int = MAX_EXTENSIONS) -> Selection:
    """Try every rate of `grid` with score(lr) -> validation loss (lower is better; NaN/inf count as worst) and
    keep the best. While the best is the lowest (highest) rate tried, try half (twice) that rate, one step at a
    time, at most max_extensions steps in all. A one-rate grid is not extended: it is a choice already made."""
    grid = check_grid(grid)
    if isinstance(max_extensions, bool) or not isinstance(max_extensions, int) or max_extensions < 0:
        raise ValueError(f"max_extensions must be a non-negative integer, got {max_extensions!r}.")

    def measured(lr: float) -> float:
        value = float(score(lr))
        return value if math.isfinite(value) else math.inf

    scores = {lr: measured(lr) for lr in grid}
    extended = 0
    while True:
        best = min(scores, key=lambda lr: (scores[lr], lr))
        if len(scores) < 2 or not math.isfinite(scores[best]):
            break
        low, high = min(scores), max(scores)
        step = best / 2 if best == low else best * 2 if best == high else None
        if step is None or extended >= max_extensions:
            break
        scores[step] = measured(step)
        extended += 1
    if not math.isfinite(scores[best]):
        raise RuntimeError(f"Every learning rate of {sorted(scores)} diverged; try smaller ones.")
    at_edge = len(scores) > 1 and best in (min(scores), max(scores))
    return Selection(dict(sorted(scores.items())), best, extended, at_edge)


KNOB_NAMES = {"alpha": "alpha", "lora_plus_ratio": "LoRA+ ratio"}  # the knobs chosen with the learning rate
KNOB_SECTION = "alpha and LoRA+ ratio (validation)"  # the sections() part that shows their searches


@dataclass(frozen=True)
class KnobSelection:
    """The search of one knob (LoRA's alpha, or LoRA+'s ratio) together with the learning rate: at each value
    of the knob a learning-rate search (select_learning_rate), and the value whose best rate scored lowest."""

    knob: str  # "alpha" or "lora_plus_ratio"
    sweeps: dict[float, Selection]  # knob value -> its learning-rate search, ascending by value
    chosen: float

    @property
    def scores(self) -> dict[float, float]:
        """knob value -> the validation loss at that value's chosen learning rate."""
        return {v: sel.scores[sel.chosen] for v, sel in self.sweeps.items()}

    @property
    def runs(self) -> int:
        """The selection runs the search made: every rate tried at every value."""
        return sum(len(sel.scores) for sel in self.sweeps.values())

    def neighbours(self) -> tuple[float | None, float | None]:
        values = sorted(self.sweeps)
        i = values.index(self.chosen)
        return (values[i - 1] if i > 0 else None, values[i + 1] if i + 1 < len(values) else None)

    def describe(self) -> str:
        """The knob's sweep in one line, as Selection.describe: each value with its best rate and loss."""
        scores = self.scores
        parts = [
            f"{v:g} (lr {sel.chosen:g}) -> {scores[v]:.4f}{' [chosen]' if v == self.chosen else ''}"
            for v, sel in self.sweeps.items()
        ]
        below, above = self.neighbours()
        near = ", ".join(
            f"{side} {v:g}: {scores[v] - scores[self.chosen]:+.4f}"
            for side, v in (("below", below), ("above", above))
            if v is not None
        )
        edge = (
            "; at the grid's edge: widen the grid"
            if len(scores) > 1 and self.chosen in (min(scores), max(scores))
            else ""
        )
        return (
            f"{KNOB_NAMES[self.knob]} " + ", ".join(parts) + f" (neighbours vs chosen: {near or 'none'}{edge}; "
            f"{self.runs} selection runs)"
        )

    def to_dict(self) -> dict:
        return {
            "knob": self.knob,
            "chosen": self.chosen,
            "scores": {f"{v:g}": loss for v, loss in self.scores.items()},
            "sweeps": {f"{v:g}": sel.to_dict() for v, sel in self.sweeps.items()},
            "runs": self.runs,
        }


def select_setting(score, knob: str, values, grid, max_extensions: int = MAX_EXTENSIONS) -> KnobSelection:
    """Choose a knob and the learning rate together: at each of `values`, select_learning_rate with
    score(value, lr) (its grid extends itself at its edges, per value); then the value whose chosen rate scored
    lowest (the lower value on a tie). At most len(values) * (len(grid) + max_extensions) runs."""
    if knob not in KNOB_NAMES:
        raise ValueError(f"knob must be one of {sorted(KNOB_NAMES)}, got {knob!r}.")
    values = check_grid(values, f"{KNOB_NAMES[knob]} grid")
    sweeps = {v: select_learning_rate(lambda lr, v=v: score(v, lr), grid, max_extensions) for v in values}
    chosen = min(values, key=lambda v: (sweeps[v].scores[sweeps[v].chosen], v))
    return KnobSelection(knob, sweeps, chosen)


# ----------------------------------------------------------------------------------------------
# Methods and budgets


def target_shapes(model: torch.nn.Module, targets) -> dict[str, tuple[int, int]]:
    """{layer name: (d, k)} of the nn.Linear layers `targets` selects (d = out_features, k = in_features)."""
    return {n: (lin.out_features, lin.in_features) for n, lin in target_linears(model, tuple(targets), 1).items()}


def trainable_count(variant: type, shapes: dict[str, tuple[int, int]], r: int) -> int:
    """The numbers `variant` trains at rank r over layers of these shapes, by its parameter_count(d, k, r)."""
    return sum(variant.parameter_count(d, k, r) for d, k in shapes.values())


def rank_for_budget(variant: type, shapes: dict[str, tuple[int, int]], budget: int) -> tuple[int, bool]:
    """(rank, capped): the largest rank whose trainable count does not exceed `budget` (the closest from
    below), among 1 .. min(d, k) of the layers; capped is True when even rank min(d, k) stays below the budget.
    Refused (ValueError) when rank 1 already trains more than the budget."""
    if isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0:
        raise ValueError(f"budget must be a positive integer (trainable numbers), got {budget!r}.")
    limit = min(min(s) for s in shapes.values())
    fits = [r for r in range(1, limit + 1) if trainable_count(variant, shapes, r) <= budget]
    if not fits:
        raise ValueError(
            f"A budget of {budget:,} trainable numbers is below what {variant.variant!r} trains at rank 1 "
            f"({trainable_count(variant, shapes, 1):,} over {len(shapes)} layers); give a larger --budget."
        )
    best = max(fits, key=lambda r: (trainable_count(variant, shapes, r), -r))  # the most numbers within budget
    return best, best == limit and trainable_count(variant, shapes, best) < budget


@dataclass(frozen=True)
class Contestant:
    """One row of the leaderboard: how the user named it, its LoRA config (None: full FT) and its grid."""

    spec: str
    lora: LoRAConfig | None
    grid: tuple[float, ...]
    capped: bool = False  # the budget allowed a higher rank than the layers do
    counted: int | None = None  # the trainable count by the variant's parameter_count (None: full FT)
    lora_plus_ratio: float | None = None  # LoRA+: B learns at this many times A's rate (None: off)
    knob: str | None = None  # "alpha" or "lora_plus_ratio": chosen on validation with the rate (None: none)
    knob_values: tuple[float, ...] = ()  # the values the knob search tries

    @property
    def label(self) -> str:
        return f"LoRA+ r={self.lora.r}" if self.spec == LORA_PLUS else method_label(self.lora)

    def at(self, value: float) -> Contestant:
        """This contestant with its knob set to `value` (LoRA's alpha, or LoRA+'s ratio)."""
        if self.knob == "alpha":
            return replace(self, lora=replace(self.lora, alpha=value))
        if self.knob == "lora_plus_ratio":
            return replace(self, lora_plus_ratio=value)
        raise ValueError(f"{self.label} has no knob to set.")

    def train_overrides(self) -> dict:
        return {} if self.lora_plus_ratio is None else {"lora_plus_ratio": self.lora_plus_ratio}


def alpha_values(alpha: float, r: int, grid=None) -> tuple[float, ...]:
    """The alphas LoRA's alpha search tries at rank r: `grid` (default alpha * ALPHA_FACTORS), always with
    alpha itself and alpha * sqrt(r), the LoRA that is rsLoRA at this rank (alpha * sqrt(r) / r = alpha / sqrt(r))."""
    given = check_grid(grid, "alpha grid") if grid is not None else tuple(alpha * f for f in ALPHA_FACTORS)
    return tuple(sorted({*given, alpha, alpha * math.sqrt(r)}))


def contestants(
    model: GPT,
    methods,
    *,
    budget: int | None = None,
    rank: int | None = None,
    targets=DEFAULT_TARGETS,
    alpha: float = ALPHA,
    learning_rates: dict | None = None,
    tune_alpha="auto",
    alpha_grid=None,
    ratio_grid=None,
) -> list[Contestant]:
    """The leaderboard's methods, resolved and sized: each variant at its budget-matched rank (or `rank`), each
    with its learning-rate grid (learning_rates[spec], else the defaults for LoRA-style or full fine-tuning).
    "lora+" is LoRA trained with LoRA+, its ratio chosen from `ratio_grid` (default RATIO_GRID). Plain "lora"
    gets its alpha chosen (alpha_values(alpha, r, alpha_grid)) when tune_alpha is True, or with "auto" when
    "rslora" or "lora+" is among the methods or an alpha_grid is given: comparing those with one untuned alpha of
    LoRA would compare two alphas. Every spec, rank and grid is checked here, before anything is trained."""
    if isinstance(methods, str) or not methods:
        raise ValueError(f"methods must be a non-empty list of names (e.g. ['lora', 'dora', 'full']), got {methods!r}.")
    methods = [m.strip() if isinstance(m, str) else m for m in methods]
    if not all(isinstance(m, str) and m for m in methods):
        raise ValueError(f"methods must be names or import paths (str), got {methods!r}.")
    if len(set(methods)) != len(methods):
        raise ValueError(f"A method is named twice in {methods}.")
    if (budget is None) == (rank is None):
        raise ValueError("Give either budget (matched trainable numbers) or rank (equal rank), not both or neither.")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0):
        raise ValueError(f"rank must be a positive integer, got {rank!r}.")
    learning_rates = dict(learning_rates or {})
    unknown = sorted(set(learning_rates) - set(methods))
    if unknown:
        raise ValueError(f"learning_rates names {unknown}, which are not among the methods {methods}.")
    if not (isinstance(tune_alpha, bool) or tune_alpha == "auto"):
        raise ValueError(f"tune_alpha must be 'auto', True or False, got {tune_alpha!r}.")
    if tune_alpha is True and "lora" not in methods:
        raise ValueError(f"Tuning alpha tunes plain 'lora', which is not among the methods {methods}.")
    if alpha_grid is not None and "lora" not in methods:
        raise ValueError(f"An alpha grid tunes plain 'lora', which is not among the methods {methods}.")
    if tune_alpha == "auto":
        tune_alpha = "lora" in methods and (bool({"rslora", LORA_PLUS} & set(methods)) or alpha_grid is not None)
    if alpha_grid is not None and not tune_alpha:
        raise ValueError("An alpha grid was given with tune_alpha=False: LoRA's alpha would not be tuned.")
    if ratio_grid is not None and LORA_PLUS not in methods:
        raise ValueError(f"A LoRA+ ratio grid was given, but {LORA_PLUS!r} is not among the methods {methods}.")
    ratios = check_grid(RATIO_GRID if ratio_grid is None else ratio_grid, "LoRA+ ratio grid")
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    shapes = target_shapes(model, targets)
    out = []
    for spec in methods:
        if spec == FULL:
            out.append(Contestant(spec, None, check_grid(learning_rates.get(spec, FULL_LEARNING_RATES))))
            continue
        variant = resolve_variant("lora" if spec == LORA_PLUS else spec)
        capped = False
        r = rank
        if budget is not None:
            r, capped = rank_for_budget(variant, shapes, budget)
        config = LoRAConfig(r=r, alpha=alpha, targets=targets, variant=variant.variant)
        target_linears(model, targets, r)  # a rank above min(d, k) is refused here, naming the layer
        grid = check_grid(learning_rates.get(spec, LORA_LEARNING_RATES))
        contestant = Contestant(spec, config, grid, capped, trainable_count(variant, shapes, r))
        if spec == LORA_PLUS:
            if max(grid) * max(ratios) > FLOAT32_MAX:
                raise ValueError(
                    f"LoRA+ ratio {max(ratios):g} x the learning rate {max(grid):g} (B's rate) is beyond float32."
                )
            contestant = replace(contestant, knob="lora_plus_ratio", knob_values=ratios)
        elif spec == "lora" and tune_alpha:
            contestant = replace(contestant, knob="alpha", knob_values=alpha_values(alpha, r, alpha_grid))
        out.append(contestant)
    labels = [c.label for c in out]
    if len(set(labels)) != len(labels):
        raise ValueError(f"Two methods resolve to the same method: {labels}.")
    return out


def training_memory(base_model: GPT, contestant: Contestant, cfg, seed: int = 0):
    """memory.memory_ledger of one training step of `contestant` on a CPU copy of the base, at cfg's batch size
    and the model's block size, fp32 (the count is exact and the same counter for every method)."""
    with torch.random.fork_rng(devices=[]):  # the copy's LoRA init draws leave the caller's random stream alone
        torch.manual_seed(seed)
        model = copy.deepcopy(base_model).cpu()
        if contestant.lora is None:
            model.requires_grad_(True)
        else:
            apply_lora(model, contestant.lora)
        return memory_ledger(
            model, cfg.batch_size, base_model.config.block_size, train_config=replace(cfg, device="cpu"), seed=seed
        )


# ----------------------------------------------------------------------------------------------
# The leaderboard


@dataclass
class Standing:
    contestant: Contestant
    selection: Selection
    runs: list[Run]  # one per reported seed at the chosen rate, scored on the test texts
    memory: MemoryLedger  # of one training step (see training_memory)
    knob: KnobSelection | None = None  # the alpha or LoRA+ ratio search (selection: at its chosen value)

    def values(self, key: str = "target") -> list[float]:
        return [r.final[key] for r in self.runs]

    @property
    def trainable(self) -> int:
        return self.runs[0].trainable_params


@dataclass
class Leaderboard:
    task: str
    base: dict[str, float]  # the base on the test texts
    standings: list[Standing]  # in the order the methods were given
    reference: str  # the label every verdict compares with
    seeds: tuple[int, ...]
    selection_seed: int
    steps: int
    eval_chars: int | None
    budget: int | None
    rank: int | None
    confidence: float
    verdicts: list  # stats.Verdict, one per method other than the reference
    seconds: float
    record: dict = field(default_factory=dict)  # the reproducibility record

    def ranked(self) -> list[Standing]:
        """The standings by mean test loss, best first."""
        return sorted(self.standings, key=lambda s: statistics.fmean(s.values()))

    def rows(self) -> list[dict]:
        by_name = {v.name: v for v in self.verdicts}
        level = t_quantile(1 - (1 - self.confidence) / 2, len(self.seeds) - 1)
        rows = []
        for place, s in enumerate(self.ranked(), 1):
            vals = s.values()
            mean, sd = statistics.fmean(vals), statistics.stdev(vals)
            half = level * sd / math.sqrt(len(vals))
            verdict = by_name.get(s.contestant.label)
            rows.append(
                {
                    "place": place,
                    "method": s.contestant.label,
                    "spec": s.contestant.spec,
                    "rank": "-" if s.contestant.lora is None else s.contestant.lora.r,
                    "rank_capped": s.contestant.capped,
                    "trainable": s.trainable,
                    "alpha": None if s.contestant.lora is None else s.contestant.lora.alpha,
                    "lora_plus_ratio": s.contestant.lora_plus_ratio,
                    "tuned": None if s.knob is None else s.knob.knob,
                    "memory_bytes": s.memory.total,
                    "activation_bytes": s.memory.activations,
                    "lr": s.selection.chosen,
                    "test_loss": mean,
                    "test_loss_sd": sd,
                    "test_loss_ci_low": mean - half,
                    "test_loss_ci_high": mean + half,
                    "test_accuracy": statistics.fmean(s.values("target_accuracy")),
                    "test_source_loss": statistics.fmean(s.values("source")),
                    "vs_reference": None if verdict is None else verdict.diff.mean,
                    "vs_ci_low": None if verdict is None else verdict.diff.low,
                    "vs_ci_high": None if verdict is None else verdict.diff.high,
                    "holm_p": None if verdict is None else verdict.adjusted_p,
                    "real": None if verdict is None else verdict.real,
                }
            )
        return rows

    def table(self) -> str:
        shown = []
        tuned = any(s.knob is not None for s in self.standings)  # the column only where a knob was chosen
        for r in self.rows():
            knob = {}
            if tuned:
                value = r["alpha"] if r["tuned"] == "alpha" else r["lora_plus_ratio"]
                knob = {"chosen (val)": "-" if r["tuned"] is None else f"{KNOB_NAMES[r['tuned']]} {value:g}"}
            shown.append(
                {
                    "#": r["place"],
                    "method": r["method"] + (" (ref)" if r["method"] == self.reference else ""),
                    "rank": f"{r['rank']}{' (max)' if r['rank_capped'] else ''}",
                    "trainable": f"{r['trainable']:,}",
                    "memory": f"{r['memory_bytes'] / 2**20:.2f} MiB",
                    **knob,
                    "lr": f"{r['lr']:g}",
                    "test loss": f"{r['test_loss']:.4f} ± {r['test_loss_sd']:.4f}",
                    "test acc": f"{r['test_accuracy']:.4f}",
                    "test source loss": f"{r['test_source_loss']:.4f}",
                    "vs ref (95% CI)": "-"
                    if r["vs_reference"] is None
                    else f"{r['vs_reference']:+.4f} ({r['vs_ci_low']:+.4f} to {r['vs_ci_high']:+.4f})",
                    "Holm p": "-" if r["holm_p"] is None else f"{r['holm_p']:.2g}",
                }
            )
        base = (
            f"base on the test text: loss {self.base['target']:.4f}, accuracy {self.base['target_accuracy']:.4f}, "
            f"source loss {self.base['source']:.4f}"
        )
        return format_table(shown) + "\n\n" + base

    def sections(self) -> dict[str, list[str]]:
        """The text of the leaderboard in parts: head, table, learning rates, verdicts, notes."""
        size = f"a matched budget of {self.budget:,} trainable numbers" if self.budget else f"rank {self.rank}"
        scored = "all the characters" if self.eval_chars is None else f"the first {self.eval_chars:,} characters"
        tuned = [KNOB_NAMES[k] for k in KNOB_NAMES if any(s.knob and s.knob.knob == k for s in self.standings)]
        knobs = f" (with {' and '.join(tuned)}, chosen together)" if tuned else ""
        head = (
            f"Leaderboard on {self.task}: {self.steps} steps at {size}; the learning rate of each method{knobs} "
            f"chosen on the validation text with seed {self.selection_seed}; reported: the test text ({scored}), "
            f"mean ± sd over the paired seeds {list(self.seeds)}. Verdicts vs {self.reference} on the paired test "
            f"losses, {self.confidence:.0%} t intervals, Holm-adjusted across the table's {len(self.verdicts)} call(s)."
        )
        rule = (
            "Rank rule: the largest rank whose trainable count (the variant's parameter_count over the targeted "
            "layers) does not exceed the budget; (max) marks a rank capped at min(d, k) of the layers."
            if self.budget
            else "Equal rank: every variant at the same rank, so the trainable counts differ."
        )
        sweeps = [
            f"{s.contestant.label}: {s.selection.describe()}"
            + (f" (at {KNOB_NAMES[s.knob.knob]} {s.knob.chosen:g})" if s.knob else "")
            for s in self.standings
        ]
        knobs = [f"{s.contestant.label}: {s.knob.describe()}" for s in self.standings if s.knob]
        real = [v for v in self.verdicts if v.real]
        summary = (
            f"Real differences ({len(real)} of {len(self.verdicts)}): "
            + (
                ", ".join(f"{v.name} {'lower' if v.diff.mean < 0 else 'higher'} than {v.reference}" for v in real)
                if real
                else "none"
            )
            + "."
        )
        notes = [COST_NOTE + "."]
        for s in self.standings:  # a variant whose own count disagrees with what its layers train is named
            c = s.contestant
            if c.counted is not None and c.counted != s.trainable:
                notes.append(
                    f"{c.label} trains {s.trainable:,} numbers but its parameter_count gives {c.counted:,}: the "
                    "rank was matched by the latter; fix the variant's parameter_count."
                )
        knob_section = {KNOB_SECTION: knobs} if knobs else {}
        return {
            "head": [head, rule],
            "table": [self.table()],
            "learning rates (validation)": sweeps,
            **knob_section,
            "verdicts": [*[v.sentence for v in self.verdicts], summary],
            "notes": notes,
        }

    def to_text(self) -> str:
        parts = self.sections()
        lines = [*parts["head"], "", *parts["table"], "", "Learning rates (validation):"]
        lines += parts["learning rates (validation)"]
        if KNOB_SECTION in parts:
            lines += ["", KNOB_SECTION[0].upper() + KNOB_SECTION[1:] + ":", *parts[KNOB_SECTION]]
        lines += ["", "Verdicts:", *parts["verdicts"], "", *parts["notes"]]
        return "\n".join(lines) + "\n"

    def to_markdown(self) -> str:
        parts = self.sections()
        bullets = lambda items: [f"- {line}" for line in items]  # noqa: E731
        lines = [f"# Leaderboard: {self.task}", "", *parts["head"][:1], "", *parts["head"][1:], "", *parts["table"]]
        lines += ["", "## Learning rates (validation)", "", *bullets(parts["learning rates (validation)"])]
        if KNOB_SECTION in parts:
            lines += ["", f"## {KNOB_SECTION[0].upper() + KNOB_SECTION[1:]}", "", *bullets(parts[KNOB_SECTION])]
        lines += ["", "## Verdicts", "", *bullets(parts["verdicts"]), "", "## Notes", "", *bullets(parts["notes"])]
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict:
        return {
            "task": self.task,
            "base": self.base,
            "reference": self.reference,
            "seeds": list(self.seeds),
            "selection_seed": self.selection_seed,
            "steps": self.steps,
            "eval_chars": self.eval_chars,
            "budget": self.budget,
            "rank": self.rank,
            "confidence": self.confidence,
            "rows": self.rows(),
            "methods": [
                {
                    "label": s.contestant.label,
                    "spec": s.contestant.spec,
                    "lora": s.contestant.lora.to_dict() if s.contestant.lora else None,
                    "grid": list(s.contestant.grid),
                    "selection": s.selection.to_dict(),
                    "tuned": None if s.knob is None else s.knob.to_dict(),
                    "runs": [r.to_dict() for r in s.runs],
                    "memory": s.memory.as_dict(),
                }
                for s in self.standings
            ],
            "verdicts": [v.to_dict() for v in self.verdicts],
            "cost": COST_NOTE,
            "seconds": self.seconds,
        }


def check_seeds(seeds, selection_seed: int) -> tuple[int, ...]:
    seeds = tuple(seeds)
    if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds) or len(set(seeds)) != len(
        seeds
    ):
        raise ValueError(f"seeds must be distinct non-negative integers, got {seeds!r}.")
    if len(seeds) < MIN_SEEDS:
        raise TooFewSeedsError(
            f"{len(seeds)} seed(s) give no verdict: a leaderboard needs at least MIN_SEEDS = {MIN_SEEDS} paired seeds."
        )
    if isinstance(selection_seed, bool) or not isinstance(selection_seed, int) or selection_seed < 0:
        raise ValueError(f"selection_seed must be a non-negative integer, got {selection_seed!r}.")
    if selection_seed in seeds:
        raise ValueError(
            f"selection_seed {selection_seed} is one of the reported seeds {list(seeds)}: the rate would be chosen "
            "on a run the table then reports. Pick a seed outside them."
        )
    return seeds


def machine() -> dict:
    """The CPU and GPU names, the platform and the thread count: where a leaderboard's runs were made."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "gpu": gpu, "platform": platform.platform()}


def versions() -> dict:
    try:
        lora_lab = version("lora-lab")
    except PackageNotFoundError:
        lora_lab = None
    return {"lora_lab": lora_lab, "torch": torch.__version__, "python": sys.version.split()[0]}


def leaderboard(
    base_model: GPT,
    task: Task,
    tokenizer,
    methods,
    *,
    budget: int | None = None,
    rank: int | None = None,
    seeds=REPORT_SEEDS,
    selection_seed: int = SELECTION_SEED,
    learning_rates: dict | None = None,
    tune_alpha="auto",
    alpha_grid=None,
    ratio_grid=None,
    max_extensions: int = MAX_EXTENSIONS,
    steps: int = STEPS,
    eval_chars: int | None = EVAL_CHARS,
    targets=DEFAULT_TARGETS,
    alpha: float = ALPHA,
    reference: str = "first",
    confidence: float = 0.95,
    cache: str | os.PathLike | None | bool = None,
    train_overrides: dict | None = None,
    curve_points: int = 2,
    command: str | None = None,
    log=None,
    log_dir: str | os.PathLike | None = None,
    workers: int = 1,
) -> Leaderboard:
    """Rank `methods` on `task` by the rules in the module docstring; see write_leaderboard for the files.

    methods: names ("full", "lora", "dora", ...) or import paths ("mypkg.lora_xs:LoRAXS"); budget or rank;
    learning_rates: {method: grid} replacing the default grid of a method; tune_alpha, alpha_grid, ratio_grid:
    LoRA's alpha and LoRA+'s ratio searches (see contestants; rule 3); reference: "first" or "best";
    cache: as runs.run_once (False: no cache); command: recorded as how the leaderboard was asked for;
    log_dir: TensorBoard logs of every run, <log_dir>/<task>:test/<method>/seed=<n> for the reported runs (so
    TensorBoard overlays the table's seeds) and <task>/<method>/lr=<rate>/seed=<selection seed> for the search;
    workers > 1 (with the run cache on, no log_dir): every starting grid's runs, then every reported run, are first
    trained side by side (parallel.Prefetcher); the numbers are those of workers=1."""
    if reference not in ("first", "best"):
        raise ValueError(f"reference must be 'first' or 'best', got {reference!r}.")
    seeds = check_seeds(seeds, selection_seed)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
        raise ValueError(f"steps must be a positive integer, got {steps!r}.")
    if "log_dir" in (train_overrides or {}):
        raise ValueError("Pass leaderboard(log_dir=...), not a train_overrides log_dir: each run gets its own folder.")
    if "lora_plus_ratio" in (train_overrides or {}) and LORA_PLUS in list(methods):
        raise ValueError(f"The {LORA_PLUS!r} method chooses its own ratio (ratio_grid); drop train_overrides' one.")
    if log_dir is not None:
        check_log_dir(log_dir)
        require_tensorboard()  # a missing extra is named before anything trains
    field_ = contestants(
        base_model,
        methods,
        budget=budget,
        rank=rank,
        targets=targets,
        alpha=alpha,
        learning_rates=learning_rates,
        tune_alpha=tune_alpha,
        alpha_grid=alpha_grid,
        ratio_grid=ratio_grid,
    )
    tested = report_view(task)  # a task without a test text is refused before any training
    chooser = selection_view(task)
    say = log or (lambda line: None)
    t0 = time.perf_counter()
    digest = model_digest(base_model) if cache is not False else None
    wall = []

    def run(c: Contestant, view: Task, lr: float, seed: int, split: str) -> Run:
        cfg = protocol_train_config(c.lora is None, lr, seed, steps, **(train_overrides or {}), **c.train_overrides())
        if log_dir is not None:  # not part of a run's cache key: a cached run stays cached
            cfg = replace(cfg, log_dir=run_log_dir(log_dir, view.name, c.label, seed, lr if split != "test" else None))
        result = run_once(
            base_model,
            view,
            tokenizer,
            c.lora,
            cfg,
            label=c.label,
            eval_chars=eval_chars,
            points=curve_points,
            cache=cache,
            base_digest=digest,
        )
        wall.append(
            {
                "method": c.label,
                "split": split,
                "learning_rate": lr,
                **({c.knob: c.lora.alpha if c.knob == "alpha" else c.lora_plus_ratio} if c.knob else {}),
                "seed": seed,
                "seconds": result.seconds,
                "from_cache": result.from_cache,
                "train_config": cfg.to_dict(),
            }
        )
        knob = f" alpha={c.lora.alpha:g}" if c.knob == "alpha" else f" ratio={c.lora_plus_ratio:g}" if c.knob else ""
        say(
            f"{c.label}{knob} lr={lr:g} seed={seed} ({split}): loss {result.final['target']:.4f}"
            f"{' (cached)' if result.from_cache else f' ({result.seconds:.1f} s)'}"
        )
        return result

    def validation_loss(c: Contestant, lr: float) -> float:
        return run(c, chooser, lr, selection_seed, "validation").final["target"]

    def request(c: Contestant, view: Task, lr: float, seed: int) -> RunRequest:
        cfg = protocol_train_config(c.lora is None, lr, seed, steps, **(train_overrides or {}), **c.train_overrides())
        return RunRequest(view, c.lora, cfg, c.label, eval_chars, curve_points)

    pool = Prefetcher(base_model, tokenizer, cache=cache, workers=workers if log_dir is None else 1, base_digest=digest)
    first_tries = [c.at(v) if c.knob else c for c in field_ for v in (c.knob_values if c.knob else [None])]
    with pool:  # every starting grid's runs side by side; a grid's extensions train in turn
        pool.train([request(c, chooser, lr, selection_seed) for c in first_tries for lr in c.grid])

        # Phase 1, every method: choose the rate (and the knob, alpha or LoRA+ ratio, with it) on the validation
        # text. Phase 2: the test text. In this order, so that no choice can depend on a test number.
        knobs, settled, selections = [], [], []
        for c in field_:
            if c.knob is None:
                knobs.append(None)
                settled.append(c)
                selections.append(select_learning_rate(lambda lr, c=c: validation_loss(c, lr), c.grid, max_extensions))
                continue
            search = select_setting(
                lambda v, lr, c=c: validation_loss(c.at(v), lr), c.knob, c.knob_values, c.grid, max_extensions
            )
            knobs.append(search)
            settled.append(c.at(search.chosen))
            selections.append(search.sweeps[search.chosen])
        field_ = settled
        pool.train([request(c, tested, sel.chosen, seed) for c, sel in zip(field_, selections) for seed in seeds])
    with one_cpu_thread("cpu"):
        base = task_scores(base_model, encode_task(tested, tokenizer), eval_chars)
    standings = [
        Standing(
            c,
            sel,
            [run(c, tested, sel.chosen, seed, "test") for seed in seeds],
            training_memory(
                base_model, c, protocol_train_config(c.lora is None, sel.chosen, seeds[0], steps, **c.train_overrides())
            ),
            knob,
        )
        for c, sel, knob in zip(field_, selections, knobs)
    ]
    diverged = [s.contestant.label for s in standings if any(r.diverged for r in s.runs)]
    if diverged:
        raise RuntimeError(f"{diverged} diverged at the chosen rate on some seed; give those methods smaller rates.")
    ref = standings[0] if reference == "first" else min(standings, key=lambda s: statistics.fmean(s.values()))
    found = verdicts_against({s.contestant.label: s.values() for s in standings}, ref.contestant.label, confidence)
    seconds = time.perf_counter() - t0
    record = {
        "command": command
        or (
            f"leaderboard(methods={list(methods)!r}, task={task.name!r}, budget={budget!r}, rank={rank!r}, "
            f"seeds={list(seeds)!r}, selection_seed={selection_seed!r}, steps={steps!r}, eval_chars={eval_chars!r})"
        ),
        "versions": versions(),
        "machine": machine(),
        "base_digest": digest or model_digest(base_model),
        "base_config": base_model.config.to_dict(),
        "task": task.name,
        "seeds": list(seeds),
        "selection_seed": selection_seed,
        "configs": {
            c.label: {
                "spec": c.spec,
                "lora": c.lora.to_dict() if c.lora else None,
                "grid": list(c.grid),
                "train": protocol_train_config(
                    c.lora is None, sel.chosen, seeds[0], steps, **(train_overrides or {}), **c.train_overrides()
                ).to_dict(),
                "tuned": None if knob is None else knob.to_dict(),
            }
            for c, sel, knob in zip(field_, selections, knobs)
        },
        "runs": wall,
        "seconds": seconds,
    }
    return Leaderboard(
        task.name,
        base,
        standings,
        ref.contestant.label,
        seeds,
        selection_seed,
        steps,
        eval_chars,
        budget,
        rank,
        confidence,
        found,
        seconds,
        record,
    )


# ----------------------------------------------------------------------------------------------
# Files


def check_leaderboard_output(out_dir: str | os.PathLike) -> Path:
    """Claim `out_dir` for write_leaderboard (files.claim_output_dir): missing, empty or an earlier leaderboard's."""
    return claim_output_dir(out_dir, LEADERBOARD_FORMAT, "write_leaderboard")


CSV_COLUMNS = [
    "place", "method", "spec", "rank", "rank_capped", "trainable", "alpha", "lora_plus_ratio", "tuned",
    "memory_bytes", "activation_bytes", "lr",
    "test_loss", "test_loss_sd", "test_loss_ci_low", "test_loss_ci_high", "test_accuracy", "test_source_loss",
    "vs_reference", "vs_ci_low", "vs_ci_high", "holm_p", "real",
]  # fmt: skip


def quality_figure(board: Leaderboard):
    """Test loss (mean with its 95% t interval over the seeds) against the whole training memory of each method
    (see COST_NOTE), the base as a dashed line."""
    fig, (ax,) = new_figure(7, 4.5)
    for i, row in enumerate(board.rows()):
        x = row["memory_bytes"] / 2**20
        err = [[row["test_loss"] - row["test_loss_ci_low"]], [row["test_loss_ci_high"] - row["test_loss"]]]
        ax.errorbar([x], [row["test_loss"]], yerr=err, fmt="o", color=f"C{i}", capsize=4)
        ax.annotate(row["method"], (x, row["test_loss"]), xytext=(6, 4), textcoords="offset points")
    ax.axhline(board.base["target"], color="k", ls="--", lw=1, label="base")
    ax.margins(x=0.2)  # room for the labels of the outermost points
    ax.set_xlabel("whole training memory of one step (MiB: weights, gradients, AdamW state, activations)")
    ax.set_ylabel("test loss (nats / char), mean and 95% CI")
    ax.set_title(f"{board.task}: quality against training memory, {len(board.seeds)} paired seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def write_leaderboard(board: Leaderboard, out_dir: str | os.PathLike) -> dict[str, Path]:
    """leaderboard.md (the text as Markdown), .csv (the table), .json (every number), quality_vs_memory.png and
    reproducibility.json (command, configs, seeds, versions, machine, wall time per run)."""
    out = check_leaderboard_output(out_dir)
    return {
        "md": write_file_atomic(out / "leaderboard.md", board.to_markdown()),
        "csv": write_file_atomic(out / "leaderboard.csv", table_csv(board.rows(), CSV_COLUMNS)),
        "json": write_json_atomic(out / "leaderboard.json", board.to_dict()),
        "png": save_figure(quality_figure(board), out / "quality_vs_memory.png"),
        "record": write_json_atomic(out / "reproducibility.json", board.record),
    }

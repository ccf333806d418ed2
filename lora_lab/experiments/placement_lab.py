"""Where, how much and how fast to learn: the LoRA paper's rank and placement tables, and their successors' learning
rate, capacity and forgetting findings, rerun on lora_lab's own fine-tunes (chapter 11).

Every number comes from one protocol (`run_arms`): each arm (a LoRA config, or full fine-tuning) has its learning
rate chosen on the task's validation text with a selection seed that is never reported (the grid grows at its
edges, leaderboard.select_learning_rate); the reported seeds then run at that rate and are scored on the test text,
which no choice looked at. Arms run with the same seeds are paired, so each verdict is on per-seed differences
(stats.paired_difference, 95% t interval, Holm-adjusted across the calls one table makes). Runs go through the run
cache (runs.run_once); arms that two sections share are trained once; `workers` trains independent runs side by side
(parallel.Prefetcher) without changing a number.

Each section's `*_findings` sets the papers' finding beside ours, with a verdict computed from the measurements
(reproduced / partly / not reproduced) and the rule that gave it. `write_placement_lab` writes the tables as CSV and
the figures as PNG.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
from dataclasses import dataclass, replace

from ..lora import LoRAConfig, resolve_variant
from ..model import GPT
from ..tasks import Task
from .defaults import ALPHA, EVAL_CHARS, SELECTION_SEED
from .leaderboard import (
    MAX_EXTENSIONS,
    REPORT_SEEDS,
    Selection,
    check_grid,
    check_seeds,
    select_learning_rate,
    target_shapes,
    trainable_count,
)
from .parallel import Prefetcher, RunRequest, missing_runs
from .protocol import protocol_train_config, report_view, selection_view
from .reports import new_figure, verdict_word, write_tables_and_figures
from .runs import Run, model_digest, run_once
from .stats import holm_adjust, is_real, paired_difference, t_quantile, verdict_sentence, verdicts_against

PLACEMENT_LAB_FORMAT = "lora_lab.placement_lab.v1"
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("up_proj", "down_proj")
SHORT = {"q_proj": "Wq", "k_proj": "Wk", "v_proj": "Wv", "o_proj": "Wo", "up_proj": "W_up", "down_proj": "W_down"}
FULL_LABEL = "full FT"
# Starting grids (factor 2 apart; each grows at its edges): the lab's arms share them, so a loss at one rate can be
# read across arms.
LAB_LORA_GRID = (4e-3, 8e-3, 1.6e-2)
LAB_RSLORA_GRID = (2e-3, 4e-3, 8e-3)  # its scale alpha / sqrt r is above LoRA's alpha / r at every r > 1
LAB_FULL_GRID = (1.25e-4, 2.5e-4, 5e-4)
SHARED_RATE = 8e-3  # in both scalings' starting grids: the rate at which they are compared across ranks
# The paper's numbers (Hu et al. 2021, GPT-3 175B, WikiSQL validation accuracy in %).
PAPER_TABLE_6_WQ_WV = {1: 73.4, 2: 73.3, 4: 73.7, 8: 73.8, 64: 73.5}
PAPER_TABLE_5 = {"Wq": 70.4, "Wk": 70.0, "Wv": 73.0, "Wo": 73.2, "Wq,Wk": 71.4, "Wq,Wv": 73.7, "Wq,Wk,Wv,Wo": 73.7}


# ----------------------------------------------------------------------------------------------
# Arms and the protocol


@dataclass(frozen=True)
class Arm:
    """One row of a study: a label, a LoRA config (None: full fine-tuning), its starting learning-rate grid, and
    the training steps when they differ from the lab's (the capacity section trains longer)."""

    label: str
    lora: LoRAConfig | None
    grid: tuple[float, ...]
    steps: int | None = None


@dataclass
class ArmResult:
    arm: Arm
    selection: Selection
    runs: list[Run]  # one per reported seed at the chosen rate, on the test text (empty for a selection-only arm)

    def values(self, key: str = "target") -> list[float]:
        return [r.final[key] for r in self.runs]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values())

    @property
    def half_width(self) -> float:
        """Half the 95% t interval of the mean test loss over the seeds."""
        vals = self.values()
        return t_quantile(0.975, len(vals) - 1) * statistics.stdev(vals) / math.sqrt(len(vals))


def targets_label(targets) -> str:
    """("q_proj", "v_proj") -> "Wq,Wv"; a layer-qualified pattern keeps its layer ("blocks.0.attn.q_proj")."""
    return ",".join(SHORT.get(t, t) for t in targets)


def lora_arm(targets, r: int, grid=LAB_LORA_GRID, *, variant: str = "lora", alpha: float = ALPHA,
             label: str | None = None, steps: int | None = None) -> Arm:  # fmt: skip
    """LoRA (or a variant) at rank r on `targets`, labelled "Wq,Wv r=4" unless told."""
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    config = LoRAConfig(r=r, alpha=alpha, targets=targets, variant=variant)
    prefix = "" if variant == "lora" else f"{variant} "
    return Arm(label or f"{prefix}{targets_label(targets)} r={r}", config, check_grid(grid), steps)


def full_arm(grid=LAB_FULL_GRID, steps: int | None = None, label: str = FULL_LABEL) -> Arm:
    return Arm(label, None, check_grid(grid), steps)


class _NotCached(Exception):
    def __init__(self, request: RunRequest):
        self.request = request


def run_arms(
    base_model: GPT,
    task: Task,
    tokenizer,
    arms: list[Arm],
    *,
    steps: int,
    seeds=REPORT_SEEDS,
    selection_seed: int = SELECTION_SEED,
    report: bool = True,
    eval_chars: int | None = EVAL_CHARS,
    points: int = 5,
    max_extensions: int = MAX_EXTENSIONS,
    cache=None,
    workers: int | None = None,
    device: str = "cpu",
    log=None,
    pool: Prefetcher | None = None,
) -> dict[str, ArmResult]:
    """Every arm by the module's protocol: its rate chosen on the validation text with `selection_seed`, then (if
    `report`) every seed at that rate on the test text. Returns {label: ArmResult} in the order given.

    With the run cache on (cache is not False), the runs of each round (every arm's starting grid, then each grid's
    next edge step, then every reported seed) are trained side by side by a parallel.Prefetcher with `workers`
    processes before they are read back (`pool`: a Prefetcher of the caller's, kept open across calls); the numbers
    are those of a one-process run."""
    labels = [a.label for a in arms]
    if not arms or len(set(labels)) != len(labels):
        raise ValueError(f"arms must be a non-empty list with distinct labels, got {labels}.")
    seeds = check_seeds(seeds, selection_seed) if report else ()
    if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
        raise ValueError(f"steps must be a positive integer, got {steps!r}.")
    tested = report_view(task) if report else None  # a task without a test text is refused before any training
    chooser = selection_view(task)
    digest = model_digest(base_model)
    say = log or (lambda line: None)

    def request(arm: Arm, view: Task, lr: float, seed: int, curve_points: int) -> RunRequest:
        cfg = protocol_train_config(arm.lora is None, lr, seed, arm.steps or steps, device=device)
        return RunRequest(view, arm.lora, cfg, arm.label, eval_chars, curve_points)

    def read(req: RunRequest, defer: bool) -> Run:
        if defer and missing_runs([req], digest, cache):
            raise _NotCached(req)
        return run_once(base_model, req.task, tokenizer, req.lora, req.cfg, label=req.label,
                        eval_chars=req.eval_chars, points=req.points, cache=cache, base_digest=digest)  # fmt: skip

    own = pool is None
    pool = pool or Prefetcher(base_model, tokenizer, cache=cache, workers=workers, base_digest=digest)
    with contextlib.nullcontext(pool) if not own else pool:
        defer = pool.train([request(a, chooser, lr, selection_seed, 2) for a in arms for lr in a.grid]) > 0
        selections: dict[str, Selection] = {}
        while len(selections) < len(arms):  # one pass: every open arm's next rate
            wanted = []
            for arm in arms:
                if arm.label in selections:
                    continue
                score = lambda lr, arm=arm: read(request(arm, chooser, lr, selection_seed, 2), defer).final["target"]  # noqa: E731
                try:
                    selections[arm.label] = select_learning_rate(score, arm.grid, max_extensions)
                except _NotCached as pending:
                    wanted.append(pending.request)
                    continue
                say(f"{arm.label}: {selections[arm.label].describe()}")
            defer = bool(wanted) and pool.train(wanted) > 0  # else the next pass trains in turn
        reported = {a.label: [] for a in arms}
        if report:
            jobs = {a.label: [request(a, tested, selections[a.label].chosen, s, points) for s in seeds] for a in arms}
            pool.train([j for js in jobs.values() for j in js])
            reported = {label: [read(j, False) for j in js] for label, js in jobs.items()}
    diverged = [label for label, runs in reported.items() if any(r.diverged for r in runs)]
    if diverged:
        raise RuntimeError(f"{diverged} diverged at the chosen rate on some seed; give those arms smaller rates.")
    return {a.label: ArmResult(a, selections[a.label], reported[a.label]) for a in arms}


def paired_calls(results: dict[str, ArmResult], pairs: list[tuple[str, str]], key: str = "target") -> list[dict]:
    """One row per (a, b): mean(a - b) over the paired seeds with its 95% t interval, the Holm-adjusted p across
    these calls, whether the call is real, and the computed sentence (lower is better for a loss)."""
    diffs = [paired_difference(results[a].values(key), results[b].values(key)) for a, b in pairs]
    adjusted = holm_adjust([d.p_value for d in diffs]) if diffs else []
    return [
        {
            "a": a,
            "b": b,
            "a - b": d.mean,
            "ci low": d.low,
            "ci high": d.high,
            "holm p": p,
            "real": is_real(d, p),
            "sentence": verdict_sentence(a, b, d, p),
        }
        for (a, b), d, p in zip(pairs, diffs, adjusted)
    ]


def mean_rows(results: dict[str, ArmResult]) -> list[dict]:
    """Per arm: trainable numbers, chosen rate, mean test loss with its 95% t interval, test accuracy, source loss."""
    rows = []
    for label, res in results.items():
        rows.append({
            "arm": label,
            "trainable": res.runs[0].trainable_params,
            "lr": res.selection.chosen,
            "test loss": res.mean,
            "95% CI": f"{res.mean - res.half_width:.4f} to {res.mean + res.half_width:.4f}",
            "test accuracy": statistics.fmean(res.values("target_accuracy")),
            "source loss": statistics.fmean(res.values("source")),
        })  # fmt: skip
    return rows


# ----------------------------------------------------------------------------------------------
# Section 1: rank (the paper's Table 6)


def rank_arms(target_sets, ranks, grid=LAB_LORA_GRID) -> list[Arm]:
    return [lora_arm(t, r, grid) for t in target_sets for r in ranks]


def rank_rows(results: dict[str, ArmResult], target_sets, ranks) -> list[dict]:
    """One row per target set: the mean test loss at each rank, the best rank, and the paired call of the lowest
    rank against the best one (Holm across the table's rows)."""
    rows, pairs = [], []
    for targets in target_sets:
        name = targets_label(targets)
        means = {r: results[f"{name} r={r}"].mean for r in ranks}
        best = min(means, key=means.get)
        rows.append({"targets": name, **{f"r={r}": means[r] for r in ranks}, "best r": best})
        pairs.append((f"{name} r={min(ranks)}", f"{name} r={best}"))
    calls = paired_calls(results, [p for p in pairs if p[0] != p[1]])
    by_pair = {(c["a"], c["b"]): c for c in calls}
    for row, pair in zip(rows, pairs):
        call = by_pair.get(pair)
        row[f"r={min(ranks)} - best"] = 0.0 if call is None else call["a - b"]
        row["real"] = False if call is None else call["real"]
        row["call"] = f"r = {min(ranks)} is the best rank" if call is None else call["sentence"]
    return rows


def gap_share(loss: float, best: float, base: float) -> float:
    """How much of the base's gap to `best` a loss closes: 1 at best, 0 at the base."""
    return (base - loss) / (base - best) if base != best else 1.0


def rank_findings(rows: list[dict], ranks, base_loss: float, full_loss: float) -> dict:
    """Table 6's finding, "flat from r = 1", on the rank table: the lowest rank closes (nearly) all of the best
    rank's gap."""
    low = f"r={min(ranks)}"
    shares = {r["targets"]: gap_share(r[low], r[f"r={r['best r']}"], base_loss) for r in rows}
    worst = min(shares, key=shares.get)
    flat = all(s >= 0.95 or not r["real"] for s, r in zip(shares.values(), rows))
    nearly = all(s >= 0.8 for s in shares.values())
    full_gap = min(gap_share(r[f"r={r['best r']}"], full_loss, base_loss) for r in rows)
    return {
        "finding": "quality is flat in r from r = 1 (Table 6, Wq,Wv on WikiSQL: "
        + " / ".join(f"{v:g}" for v in PAPER_TABLE_6_WQ_WV.values())
        + " at r = " + ", ".join(map(str, PAPER_TABLE_6_WQ_WV)) + ")",
        "ours": f"r = {min(ranks)} closes {shares[worst]:.0%} of the best rank's gap to the base ({worst}); the best "
        f"LoRA closes {full_gap:.0%} of full fine-tuning's",
        "rule": f"reproduced if r = {min(ranks)} closes >= 95% of the best rank's gap or is not detectably worse "
        "(Holm), partly if >= 80%",
        "verdict": verdict_word(flat, nearly),
        "why": "the task's new directions fit in a rank-1 update"
        if flat
        else "here the update uses more than one direction: a higher rank learns more in the same steps, on a model "
        "whose width leaves r = 1 a far larger share of each matrix than on GPT-3",
    }  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Section 2: placement at a fixed budget (the paper's Table 5), the MLP and depth


def half_targets(model: GPT, part: str, types=ATTENTION) -> tuple[str, ...]:
    """The full names of `types` in the first or the second half of the blocks ("front" or "back")."""
    n = model.config.n_layer
    if n < 2 or part not in ("front", "back"):
        raise ValueError(f"half_targets needs at least 2 layers and part 'front' or 'back', got {n}, {part!r}.")
    layers = range(n // 2) if part == "front" else range(n - n // 2, n)
    return tuple(f"blocks.{i}.attn.{t}" for i in layers for t in types)


def per_rank_count(model: GPT, targets) -> int:
    """The numbers plain LoRA trains on `targets` per unit of rank."""
    return trainable_count(resolve_variant("lora"), target_shapes(model, targets), 1)


def matched_rank(model: GPT, targets, budget: int) -> int:
    """The rank at which plain LoRA on `targets` trains exactly `budget` numbers; ValueError if none does."""
    per_rank = per_rank_count(model, targets)
    if budget % per_rank:
        raise ValueError(
            f"No rank trains exactly {budget:,} numbers on {targets_label(targets)} ({per_rank:,} per rank); pick a "
            "budget that is a multiple of it."
        )
    return budget // per_rank


TABLE5_SETS = (
    ("q_proj",),
    ("k_proj",),
    ("v_proj",),
    ("o_proj",),
    ("q_proj", "k_proj"),
    ("q_proj", "v_proj"),
    ATTENTION,
)


def placement_sets(model: GPT, types=None) -> list[tuple[str, ...]]:
    """Table 5's target sets (`types` keeps only those, and all four), the MLP's two matrices, and all four attention
    matrices of the front and of the back half of the blocks."""
    sets = [s for s in TABLE5_SETS if types is None or s in {tuple(t) for t in types} or s == ATTENTION]
    return [*sets, MLP, half_targets(model, "front"), half_targets(model, "back")]


def placement_budget(model: GPT, budget_rank: int = 8, types=None) -> int:
    """The smallest budget of at least Wq's count at `budget_rank` at which every placement set has an exact rank
    (a multiple of each set's count per rank), so no arm trains a number more or less than another."""
    step = math.lcm(*(per_rank_count(model, s) for s in placement_sets(model, types)))
    least = budget_rank * per_rank_count(model, ("q_proj",))
    return step * math.ceil(least / step)


def placement_arms(model: GPT, budget: int, grid=LAB_LORA_GRID, types=None) -> list[Arm]:
    """Every placement set at the rank that trains exactly `budget` numbers (see placement_sets)."""
    halves = {half_targets(model, part): part for part in ("front", "back")}
    arms = []
    for targets in placement_sets(model, types):
        r = matched_rank(model, targets, budget)
        label = f"{halves[targets]} half Wq,Wk,Wv,Wo r={r}" if targets in halves else None
        arms.append(lora_arm(targets, r, grid, label=label))
    return arms


def placement_rows(results: dict[str, ArmResult], arms: list[Arm]) -> list[dict]:
    rows = mean_rows({a.label: results[a.label] for a in arms})
    for row, arm in zip(rows, arms):
        row["r"] = arm.lora.r
        row["paper (WikiSQL %)"] = PAPER_TABLE_5.get(arm.label.rsplit(" r=", 1)[0])
    return rows


def placement_findings(results: dict[str, ArmResult], arms: list[Arm]) -> tuple[list[dict], list[dict]]:
    """The three placement findings and the paired calls behind them (Holm across all of them)."""
    by_targets = {a.lora.targets: a.label for a in arms}
    single = [label for t, label in by_targets.items() if t in TABLE5_SETS and len(t) == 1]
    spread = [label for t, label in by_targets.items() if t in TABLE5_SETS and len(t) > 1]
    best_spread = min(spread, key=lambda label: results[label].mean)
    front, back = arms[-2].label, arms[-1].label
    mlp_label, attention = by_targets[MLP], by_targets[ATTENTION]
    pairs = [(best_spread, s) for s in single] + [(mlp_label, attention), (back, front)]
    calls = paired_calls(results, pairs)
    beats = [c for c in calls[: len(single)] if c["real"] and c["a - b"] < 0]
    mlp_call, depth_call = calls[len(single)], calls[len(single) + 1]
    findings = [
        {
            "finding": "at a fixed budget, several matrix types at a low rank beat one type at a higher rank (Table 5: "
            "Wq,Wv 73.7 and all four 73.7 against Wq 70.4, Wk 70.0)",
            "ours": f"{best_spread} is detectably better than {len(beats)} of {len(single)} single types",
            "rule": "reproduced if better than every single type (Holm), partly if better than some",
            "verdict": verdict_word(len(beats) == len(single), bool(beats)),
            "why": "spreading the rank over matrices adapts more of the computation for the same numbers"
            if beats
            else "at this budget one matrix type already has a high rank relative to its width, so spreading adds "
            "little that a single type lacks",
        },
        {
            "finding": "the MLP beats attention-only at matched parameters (LoRA Without Regret, 2025)",
            "ours": mlp_call["sentence"],
            "rule": "reproduced if the MLP's test loss is detectably lower (Holm)",
            "verdict": verdict_word(mlp_call["real"] and mlp_call["a - b"] < 0, False),
            "why": "the MLP holds most of a block's weights and computation"
            if mlp_call["real"] and mlp_call["a - b"] < 0
            else "the echo task needs attention to fetch the word just written: a change of where the model looks, "
            "which the MLP cannot make",
        },
        {
            "finding": "the closer the adapted parameters are to the output, the better (the summary lora_lab was made "
            "from)",
            "ours": depth_call["sentence"],
            "rule": "reproduced if the back half is detectably better than the front half at the same budget (Holm)",
            "verdict": verdict_word(depth_call["real"] and depth_call["a - b"] < 0, False),
            "why": "the late blocks read the context the task needs; the early ones build features every task shares"
            if depth_call["real"] and depth_call["a - b"] < 0
            else "where a task's new computation belongs depends on the task, not on a rule about depth",
        },
    ]
    return findings, calls


# ----------------------------------------------------------------------------------------------
# Section 3: learning rates


def rate_ratio(lora: Selection, full: Selection) -> float:
    return lora.chosen / full.chosen


def scaling_arms(targets, ranks, lora_grid=LAB_LORA_GRID, rslora_grid=LAB_RSLORA_GRID) -> list[Arm]:
    """LoRA (alpha / r) and rsLoRA (alpha / sqrt r) at each rank: selection-only arms. Both starting grids hold
    SHARED_RATE, so the two scalings can be read at one rate across ranks."""
    lora = [lora_arm(targets, r, lora_grid) for r in ranks]
    return lora + [lora_arm(targets, r, rslora_grid, variant="rslora") for r in ranks]


def scaling_rows(results: dict[str, ArmResult], targets, ranks, rate: float) -> list[dict]:
    """Per rank: each scaling's chosen rate and its validation loss at one shared `rate`."""
    name = targets_label(targets)
    rows = []
    for r in ranks:
        lora, rs = results[f"{name} r={r}"].selection, results[f"rslora {name} r={r}"].selection
        rows.append({
            "r": r,
            "LoRA best lr": lora.chosen,
            "rsLoRA best lr": rs.chosen,
            f"LoRA loss at lr={rate:g}": lora.scores.get(rate),
            f"rsLoRA loss at lr={rate:g}": rs.scores.get(rate),
        })  # fmt: skip
    return rows


def spread_steps(rates) -> float:
    """How far apart chosen rates are, in factor-2 steps (log2 of the largest over the smallest)."""
    return math.log2(max(rates) / min(rates))


def rate_findings(ratio: float, rows: list[dict], rate: float, longer: tuple[str, float] | None = None) -> list[dict]:
    """The rate ratio's and the scalings' findings; `longer` = (what, LoRA-over-full ratio) of other runs (the
    capacity section's longer ones), shown beside the lab's."""
    lora_spread = spread_steps([r["LoRA best lr"] for r in rows])
    rs_spread = spread_steps([r["rsLoRA best lr"] for r in rows])
    at = [(r[f"LoRA loss at lr={rate:g}"], r[f"rsLoRA loss at lr={rate:g}"]) for r in rows]
    shared = all(a is not None and b is not None for a, b in at)
    lora_drift = at[-1][0] - at[0][0] if shared else math.nan
    rs_drift = at[-1][1] - at[0][1] if shared else math.nan
    ranks = f"r = {rows[0]['r']} to {rows[-1]['r']}"
    return [
        {
            "finding": "LoRA's best learning rate is about 10x full fine-tuning's (LoRA Without Regret, 2025)",
            "ours": f"{ratio:g}x (both chosen on the validation text from factor-2 grids)"
            + (f"; {longer[1]:g}x for {longer[0]}" if longer else ""),
            "rule": "reproduced if 5x to 20x, partly if 2.5x to 40x",
            "verdict": verdict_word(5 <= ratio <= 20, 2.5 <= ratio <= 40),
            "why": "LoRA's B starts at zero and its update is scaled by alpha / r: it needs larger steps to move"
            if 2.5 <= ratio <= 40
            else "the ratio depends on the training length: full fine-tuning's best rate on a few dozen steps is far "
            "below a long run's, while LoRA's stays high",
        },
        {
            "finding": "under rsLoRA's alpha / sqrt r the best rate stays put as r grows; under alpha / r it moves, "
            "and at one rate a high rank learns less (Kalajdzievski 2023)",
            "ours": f"{ranks}: the best rate moves {lora_spread:g} factor-2 steps under alpha / r, {rs_spread:g} under "
            f"alpha / sqrt r; at lr = {rate:g} the validation loss changes by {lora_drift:+.4f} (alpha / r) and "
            f"{rs_drift:+.4f} (alpha / sqrt r)",
            "rule": "reproduced if rsLoRA's best rate moves less and, at the one rate, high rank costs LoRA more than "
            "rsLoRA; partly if one of the two",
            "verdict": verdict_word(
                rs_spread < lora_spread and lora_drift > rs_drift, rs_spread < lora_spread or lora_drift > rs_drift
            ),  # fmt: skip
            "why": "with Adam each step moves B by about the rate, so Delta W's size scales like the rate times "
            "alpha / r times sqrt r: alpha / sqrt r cancels the rank, alpha / r leaves 1 / sqrt r"
            + (
                ""
                if rs_spread < lora_spread and lora_drift > rs_drift
                else "; in these short runs the larger scale of alpha / sqrt r at high rank overshoots at the shared "
                "rate instead"
            ),
        },
    ]


# ----------------------------------------------------------------------------------------------
# Section 4: capacity against data


def capacity_arms(targets, r: int, steps_list, lora_grid=LAB_LORA_GRID, full_grid=LAB_FULL_GRID) -> list[Arm]:
    """LoRA at rank r and full fine-tuning at each training length (more steps = more training text seen)."""
    arms = []
    for s in steps_list:
        arms.append(lora_arm(targets, r, lora_grid, steps=s, label=f"{targets_label(targets)} r={r} @{s}"))
        arms.append(full_arm(full_grid, steps=s, label=f"{FULL_LABEL} @{s}"))
    return arms


def capacity_rows(results: dict[str, ArmResult], targets, r: int, steps_list, batch_chars: int) -> list[dict]:
    lora = f"{targets_label(targets)} r={r}"
    calls = paired_calls(results, [(f"{lora} @{s}", f"{FULL_LABEL} @{s}") for s in steps_list])
    return [
        {
            "steps": s,
            "training characters seen": s * batch_chars,
            f"{lora} loss": results[f"{lora} @{s}"].mean,
            "full FT loss": results[f"{FULL_LABEL} @{s}"].mean,
            "LoRA - full": c["a - b"],
            "ci low": c["ci low"],
            "ci high": c["ci high"],
            "holm p": c["holm p"],
            "real": c["real"],
        }
        for s, c in zip(steps_list, calls)
    ]


def capacity_findings(rows: list[dict], label: str) -> dict:
    first, last = rows[0], rows[-1]
    grows = last["LoRA - full"] > first["LoRA - full"]
    behind = last["real"] and last["LoRA - full"] > 0
    return {
        "finding": "LoRA at a small rank tracks full fine-tuning until the task needs more capacity (more data), then "
        "falls behind (LoRA Without Regret, 2025; Biderman et al. 2024)",
        "ours": f"{label} minus full FT: {first['LoRA - full']:+.4f} after {first['steps']} steps, "
        f"{last['LoRA - full']:+.4f} after {last['steps']} steps",
        "rule": "reproduced if the gap grows with data and LoRA is detectably behind at the most data (Holm), "
        "partly if the gap grows",
        "verdict": verdict_word(grows and behind, grows),
        "why": "with more data full fine-tuning's capacity counts, a rank-1 update's does not"
        if grows
        else "over these lengths the small rank is not yet what limits LoRA",
    }


# ----------------------------------------------------------------------------------------------
# Section 5: learning against forgetting


def source_at_target(curve: list[dict], level: float) -> float:
    """The source loss where the run's target loss first reaches `level`, linearly between curve points; NaN if it
    never does (the run's step 0, the base, when the base is already there)."""
    if curve[0]["target"] <= level:
        return curve[0]["source"]
    for before, after in zip(curve, curve[1:]):
        if after["target"] <= level <= before["target"]:
            span = before["target"] - after["target"]
            t = 0.0 if span == 0 else (before["target"] - level) / span
            return before["source"] + t * (after["source"] - before["source"])
    return math.nan


def forgetting_rows(
    results: dict[str, ArmResult], labels: list[str], reference: str = FULL_LABEL
) -> tuple[float, list[dict]]:
    """Source loss at a matched target loss: the level every run of these arms reaches (the worst final target loss
    among them), each run's source loss where it first gets there, and each arm against `reference` per seed."""
    level = max(v for label in labels for v in results[label].values())
    at = {label: [source_at_target(r.curve, level) for r in results[label].runs] for label in labels}
    rows = [{"arm": reference, "source loss at matched target": statistics.fmean(at[reference]), "minus full FT": 0.0,
             "ci low": None, "ci high": None, "holm p": None, "real": None}]  # fmt: skip
    for v in verdicts_against({label: at[label] for label in labels}, reference):  # Holm across these calls
        rows.append({"arm": v.name, "source loss at matched target": statistics.fmean(at[v.name]),
                     "minus full FT": v.diff.mean, "ci low": v.diff.low, "ci high": v.diff.high,
                     "holm p": v.adjusted_p, "real": v.real})  # fmt: skip
    return level, rows


def forgetting_findings(level: float, rows: list[dict]) -> dict:
    lora = [r for r in rows if r["real"] is not None]
    less = [r for r in lora if r["real"] and r["minus full FT"] < 0]
    more = [r for r in lora if r["real"] and r["minus full FT"] > 0]
    return {
        "finding": "LoRA forgets less than full fine-tuning for the same learning (Biderman et al. 2024, "
        "learn-vs-forget curves)",
        "ours": f"at target loss {level:.4f}: {len(less)} of {len(lora)} LoRA arms forget detectably less, {len(more)} "
        "detectably more",
        "rule": "reproduced if every LoRA arm forgets detectably less (Holm), partly if some does",
        "verdict": verdict_word(len(less) == len(lora), bool(less)),
        "why": "a low-rank update changes fewer directions of the pretrained weights"
        if less
        else "at a matched loss this early in training, LoRA's large rate moves the adapted matrices as far as full "
        "fine-tuning's small rate moves all of them",
    }


def learn_forget_figure(results: dict[str, ArmResult], labels: list[str], level: float):
    """Source loss (forgetting) against target loss (learning) along training, the mean over seeds per arm, each
    seed's path faint; the matched target level dashed."""
    fig, (ax,) = new_figure(7, 4.5)
    for i, label in enumerate(labels):
        runs = results[label].runs
        for run in runs:
            ax.plot([p["target"] for p in run.curve], [p["source"] for p in run.curve], color=f"C{i}", alpha=0.2, lw=1)
        points = len(runs[0].curve)
        mean_t = [statistics.fmean(r.curve[j]["target"] for r in runs) for j in range(points)]
        mean_s = [statistics.fmean(r.curve[j]["source"] for r in runs) for j in range(points)]
        ax.plot(mean_t, mean_s, "o-", color=f"C{i}", label=label)
    ax.axvline(level, color="k", ls="--", lw=1, label="matched target loss")
    ax.invert_xaxis()  # learning goes to the right
    ax.set_xlabel("target (test) loss, nats / char: learning ->")
    ax.set_ylabel("source (test) loss, nats / char: forgetting ^")
    ax.set_title(f"Learning against forgetting, {len(results[labels[0]].runs)} paired seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


# ----------------------------------------------------------------------------------------------
# Figures and files


def differences_figure(calls: list[dict], title: str):
    """Each paired call: mean difference a - b with its 95% interval; red where the Holm-adjusted call is real."""
    fig, (ax,) = new_figure(8, 0.45 * len(calls) + 1.4)
    for i, c in enumerate(calls):
        err = [[c["a - b"] - c["ci low"]], [c["ci high"] - c["a - b"]]]
        ax.errorbar([c["a - b"]], [i], xerr=err, fmt="o", capsize=4, color="C3" if c["real"] else "C0")
    ax.axvline(0.0, color="k", lw=1)
    ax.set_yticks(range(len(calls)), [f"{c['a']} - {c['b']}" for c in calls])
    ax.set_xlabel("test loss difference (nats / char), 95% CI; red: real after Holm")
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="x")
    return fig


def rank_figure(results: dict[str, ArmResult], target_sets, ranks, base_loss: float, full_loss: float):
    """Test loss against rank per target set (mean and 95% interval over the seeds), the base and full fine-tuning
    as lines."""
    fig, (ax,) = new_figure(7, 4.2)
    for i, targets in enumerate(target_sets):
        name = targets_label(targets)
        res = [results[f"{name} r={r}"] for r in ranks]
        ax.errorbar(
            ranks,
            [x.mean for x in res],
            yerr=[x.half_width for x in res],
            fmt="o-",
            capsize=4,
            color=f"C{i}",
            label=f"LoRA on {name}",
        )
    ax.axhline(full_loss, color="k", lw=1, label="full fine-tuning")
    ax.axhline(base_loss, color="k", ls="--", lw=1, label="base")
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(ranks), [str(r) for r in ranks])
    ax.set_xlabel("rank r")
    ax.set_ylabel("test loss (nats / char), mean and 95% CI")
    ax.set_title("How much rank? (the paper's Table 6)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def rate_figure(results: dict[str, ArmResult], targets, ranks):
    """Validation loss against learning rate per rank, alpha / r and alpha / sqrt r side by side."""
    name = targets_label(targets)
    fig, axes = new_figure(10, 3.8, ncols=2)
    for ax, (prefix, title) in zip(axes, (("", "LoRA, alpha / r"), ("rslora ", "rsLoRA, alpha / sqrt r"))):
        for i, r in enumerate(ranks):
            sel = results[f"{prefix}{name} r={r}"].selection
            ax.plot(list(sel.scores), list(sel.scores.values()), "o-", color=f"C{i}", label=f"r = {r}")
            ax.plot([sel.chosen], [sel.scores[sel.chosen]], "*", ms=14, color=f"C{i}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("learning rate")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("validation loss (selection seed); star: chosen")
    return fig


def check_placement_lab_output(out_dir: str | os.PathLike):
    """Claim `out_dir` for the placement lab (files.claim_output_dir): missing, empty or an earlier lab's folder."""
    from ..storage.files import claim_output_dir

    return claim_output_dir(out_dir, PLACEMENT_LAB_FORMAT)


def write_placement_lab(tables: dict[str, list[dict]], figures: dict[str, object], out_dir: str | os.PathLike) -> dict:
    """Each table as <name>.csv and each figure as <name>.png; returns the paths by file name."""
    return write_tables_and_figures(tables, figures, out_dir, PLACEMENT_LAB_FORMAT)


# ----------------------------------------------------------------------------------------------
# The whole lab


@dataclass(frozen=True)
class LabPlan:
    """What the lab trains: the rank table's target sets and ranks; the placement budget (Wq at `budget_rank`,
    rounded up to where every set has an exact rank) and the single types and pairs of Table 5 it keeps (None: all);
    the ranks of the scaling comparison; the capacity section's rank and training lengths."""

    steps: int = 30
    rank_targets: tuple = (("q_proj", "v_proj"),)
    ranks: tuple = (1, 8, 64)
    budget_rank: int = 8
    table5_types: tuple | None = (("q_proj",),)
    scaling_ranks: tuple = (8, 64)
    capacity_rank: int = 1
    capacity_steps: tuple = (30, 60)
    seeds: tuple = REPORT_SEEDS

    def scaled(self, steps: int) -> LabPlan:
        """The same plan at `steps` per fine-tune (the capacity lengths scaled alike)."""
        factor = steps / self.steps
        return replace(self, steps=steps, capacity_steps=tuple(round(s * factor) for s in self.capacity_steps))


FULL_PLAN = LabPlan(
    steps=200,
    rank_targets=(("q_proj",), ("q_proj", "v_proj"), ATTENTION),
    ranks=(1, 2, 4, 8, 64),
    table5_types=None,
    scaling_ranks=(2, 8, 32, 128),
    capacity_steps=(200, 800),
)


@dataclass
class PlacementLab:
    results: dict[str, ArmResult]
    base: dict[str, float]  # the base on the test texts
    budget: int  # the placement section's trainable numbers per arm
    matched_level: float  # the target loss at which forgetting is compared
    tables: dict[str, list[dict]]
    figures: dict[str, object]
    findings: list[dict]


def run_placement_lab(base_model: GPT, task: Task, tokenizer, plan: LabPlan = LabPlan(), *, eval_chars=1_024,
                      cache=None, workers=None, device="cpu", log=None) -> PlacementLab:  # fmt: skip
    """Chapter 11 in one call: every section's arms by run_arms (an arm two sections share is trained once), the
    tables, figures and findings. The rank and capacity arms keep 4 curve points (the learning-vs-forgetting
    curves); the placement arms 2."""
    from .estimator import encode_task, one_cpu_thread, task_scores

    pool = Prefetcher(base_model, tokenizer, cache=cache, workers=workers)  # one pool of workers for every section
    opts = dict(
        seeds=plan.seeds, eval_chars=eval_chars, cache=cache, workers=workers, device=device, log=log, pool=pool
    )
    sweep_targets = plan.rank_targets[-1]  # the scaling and capacity sections use the last rank target set
    name = targets_label(sweep_targets)
    curved = [full_arm(), *rank_arms(plan.rank_targets, plan.ranks),
              *capacity_arms(sweep_targets, plan.capacity_rank, plan.capacity_steps)]  # fmt: skip
    curved = list({a.label: a for a in curved}.values())
    budget = placement_budget(base_model, plan.budget_rank, plan.table5_types)
    placed = placement_arms(base_model, budget, types=plan.table5_types)
    with pool:
        results = run_arms(base_model, task, tokenizer, curved, steps=plan.steps, points=4, **opts)
        results.update(run_arms(base_model, task, tokenizer, placed, steps=plan.steps, points=2, **opts))
        scaling = [a for a in scaling_arms(sweep_targets, plan.scaling_ranks) if a.label not in results]
        if scaling:
            results.update(run_arms(base_model, task, tokenizer, scaling, steps=plan.steps, report=False, **opts))
    with one_cpu_thread("cpu"):
        base = task_scores(base_model, encode_task(report_view(task), tokenizer), eval_chars)
    full_loss = results[FULL_LABEL].mean

    rank_table = rank_rows(results, plan.rank_targets, plan.ranks)
    place_findings, place_calls = placement_findings(results, placed)
    lora_reference = results[f"{name} r={8 if 8 in plan.ranks else plan.ranks[-1]}"]
    ratio = rate_ratio(lora_reference.selection, results[FULL_LABEL].selection)
    longest = max(plan.capacity_steps)
    longer = (f"{name} r={plan.capacity_rank} at {longest} steps",
              rate_ratio(results[f"{name} r={plan.capacity_rank} @{longest}"].selection,
                         results[f"{FULL_LABEL} @{longest}"].selection))  # fmt: skip
    scaling_table = scaling_rows(results, sweep_targets, plan.scaling_ranks, SHARED_RATE)
    batch_chars = protocol_train_config(False, 1e-3).batch_size * base_model.config.block_size
    capacity_table = capacity_rows(results, sweep_targets, plan.capacity_rank, plan.capacity_steps, batch_chars)
    forget_labels = [FULL_LABEL] + [f"{name} r={r}" for r in plan.ranks]
    level, forgetting_table = forgetting_rows(results, forget_labels)
    findings = [
        rank_findings(rank_table, plan.ranks, base["target"], full_loss),
        *place_findings,
        *rate_findings(ratio, scaling_table, SHARED_RATE, longer),
        capacity_findings(capacity_table, f"{name} r={plan.capacity_rank}"),
        forgetting_findings(level, forgetting_table),
    ]
    tables = {
        "rank": rank_table,
        "placement": placement_rows(results, placed),
        "placement_calls": place_calls,
        "learning_rates": scaling_table,
        "capacity": capacity_table,
        "forgetting": forgetting_table,
        "findings": findings,
    }
    figures = {
        "rank": rank_figure(results, plan.rank_targets, plan.ranks, base["target"], full_loss),
        "placement": differences_figure(place_calls, f"Placement at {budget:,} trainable numbers: paired differences"),
        "learning_rates": rate_figure(results, sweep_targets, plan.scaling_ranks),
        "learn_vs_forget": learn_forget_figure(results, forget_labels, level),
    }
    return PlacementLab(results, base, budget, level, tables, figures, findings)

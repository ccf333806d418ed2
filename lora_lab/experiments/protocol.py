"""A fair comparison of fine-tuning methods: the rule every table of lora_lab follows.

The rules, in the order `compare` applies them:
1. One estimator (estimator.split_scores): curve points and table numbers are the same function of the same
   weights, so the step-0 point of a LoRA run *is* the base (B = 0), and the last point *is* the table's number.
2. A learning-rate sweep per method, on the VALIDATION text. Each method tries its own grid with the selection
   seed (SELECTION_SEED, never a reported seed) and keeps the rate with the lowest final target loss; a one-rate
   grid is a choice already made and runs no sweep. Selection is given the task without its test texts.
3. Seeds, on the TEST text. The chosen rate is then run with every seed and scored on the task's test texts,
   which no choice looked at (a task without a test split is reported on its validation text, and the table
   says so). Tables give mean ± std (sample std, n-1) over seeds, next to a base row (the base is
   deterministic: no spread). Every method gets the same seeds, and a seed gives every method the same data
   order, so the results pair up seed by seed.
4. Verdicts (Comparison.verdicts, stats.py's rule): the per-seed differences to a reference (the base or a
   method), a 95% t interval, p-values Holm-adjusted across the calls of one table, a sentence per call.
   A verdict needs at least stats.MIN_SEEDS paired seeds; with fewer, it is refused (TooFewSeedsError).
5. A cache (runs.run_once): every run's numbers are kept on disk, so a second call returns them at once.
Every run is one finetune.finetune; the comparisons the chapters run with this rule are in studies.py.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path

from ..lora import LoRAConfig
from ..model import GPT
from ..storage.files import claim_output_dir, write_file_atomic, write_json_atomic
from ..tasks import Task
from ..tensorboard_logs import check_log_dir, require_tensorboard, run_log_dir
from ..train import TrainConfig
from .defaults import (
    CURVE_POINTS,
    DEFAULT_TARGETS,
    EVAL_CHARS,
    FULL_LEARNING_RATES,
    LORA_LEARNING_RATES,
    SEEDS,
    SELECTION_SEED,
    STEPS,
    default_lora_config,
    finetune_config,
)
from .estimator import encode_task, one_cpu_thread, task_scores
from .finetune import method_label
from .parallel import Prefetcher, RunRequest
from .reports import format_table, plot_comparison
from .runs import Run, model_digest, run_once
from .stats import MIN_SEEDS, Verdict, format_p, verdicts_against

COMPARE_OUTPUT_FORMAT = "lora_lab.compare.v1"  # the tag of a folder write_comparison writes into


def protocol_train_config(
    full: bool, learning_rate: float, seed: int = 0, steps: int = STEPS, **overrides
) -> TrainConfig:
    """The training config of one protocol run: defaults.finetune_config (the one recipe) on the CPU."""
    return finetune_config(
        full, **{"learning_rate": learning_rate, "seed": seed, "max_iters": steps, "device": "cpu", **overrides}
    )


# ----------------------------------------------------------------------------------------------
# The task's views: selection never holds the test texts; reports score the test texts


def selection_view(task: Task) -> Task:
    """The task without its test texts: what learning-rate selection is given."""
    return replace(task, test=None, source_test=None)


def report_view(task: Task) -> Task:
    """The task scored on its test texts: the same training text, with test and source_test in the places
    the estimator scores (validation, source_validation). Training is the same: scoring draws no random numbers."""
    if task.test is None:
        raise ValueError(
            f"Task {task.name!r} has no test text, so its numbers could only be reported on the text its "
            "learning rates were chosen on; use a task with a test split (shout or rot13 from tiny-shakespeare)."
        )
    return Task(
        name=f"{task.name}:test",
        description=task.description,
        train=task.train,
        validation=task.test,
        source_validation=task.source_test,
        metric=task.metric,
    )


@dataclass(frozen=True)
class Method:
    """A fine-tuning method: LoRA with `lora`, or full fine-tuning (lora=None), and its learning-rate grid.
    The label defaults to finetune.method_label(lora): "LoRA r=8", "dora r=8", "full FT"."""

    lora: LoRAConfig | None
    learning_rates: tuple[float, ...]
    label: str = ""

    def __post_init__(self):
        rates = tuple(self.learning_rates)
        if not rates or any(
            isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r < math.inf for r in rates
        ):
            raise ValueError(
                f"learning_rates must be a non-empty list of positive numbers, got {self.learning_rates!r}."
            )
        object.__setattr__(self, "learning_rates", rates)
        if not self.label:
            object.__setattr__(self, "label", method_label(self.lora))


def lora_method(
    r: int = 8,
    targets=DEFAULT_TARGETS,
    learning_rates=LORA_LEARNING_RATES,
    alpha: float | None = None,
    label: str = "",
) -> Method:
    """LoRA at rank r on `targets` (alpha None: defaults.ALPHA), trying each of learning_rates."""
    return Method(default_lora_config(r, targets, alpha), tuple(learning_rates), label)


def full_method(learning_rates=FULL_LEARNING_RATES) -> Method:
    """Full fine-tuning, trying each of learning_rates."""
    return Method(None, tuple(learning_rates))


def mean_spread(values: list[float]) -> tuple[float, float]:
    """(mean, sample std with n-1; 0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


@dataclass
class MethodResult:
    method: Method
    chosen_lr: float
    sweep: dict[float, float]  # learning rate -> final target loss on the first seed
    runs: list[Run]  # one per seed at chosen_lr

    def values(self, key: str) -> list[float]:
        return [r.final[key] for r in self.runs]

    def run_seeds(self) -> list[int]:
        return [r.seed for r in self.runs]


@dataclass
class Comparison:
    task: Task
    base: dict[str, float]  # task_scores of the base
    results: list[MethodResult]
    seeds: tuple[int, ...]
    steps: int
    seconds: float = 0.0
    eval_chars: int | None = EVAL_CHARS  # characters scored per text (None: all of it)
    selection_seed: int = SELECTION_SEED  # the rates were chosen with it, on the validation text
    reported_on: str = "test"  # the split the table's numbers come from ("validation" for a task without a test)

    METRICS = (("target", "target loss"), ("target_accuracy", "target accuracy"), ("source", "source loss"))

    def result(self, label: str) -> MethodResult:
        for res in self.results:
            if res.method.label == label:
                return res
        raise KeyError(f"No method {label!r} in this comparison; it has {[r.method.label for r in self.results]}.")

    def rows(self) -> list[dict]:
        """The table: a base row, then one row per method with mean ± std over seeds."""
        rows = [
            {
                "method": "base",
                "lr": "-",
                "trainable": "0",
                **{name: f"{self.base[key]:.4f}" for key, name in self.METRICS},
            }
        ]
        for res in self.results:
            row = {
                "method": res.method.label,
                "lr": f"{res.chosen_lr:g}",
                "trainable": f"{res.runs[0].trainable_params:,}",
            }
            for key, name in self.METRICS:
                mean, std = mean_spread(res.values(key))
                row[name] = f"{mean:.4f} ± {std:.4f}"
            rows.append(row)
        return rows

    def verdicts(self, key: str = "target", reference: str = "base", confidence: float = 0.95) -> list[Verdict]:
        """Every method (but the reference) against `reference` (a method's label, or "base") on metric `key`:
        stats.verdicts_against over the per-seed values, paired by seed, Holm-adjusted across these calls.

        The base is deterministic, so against it each seed's value is compared with the one base value.
        Refused with ValueError when the methods' runs do not have the same seeds (nothing to pair), and with
        stats.TooFewSeedsError below stats.MIN_SEEDS seeds."""
        labels = [res.method.label for res in self.results]
        if reference != "base" and reference not in labels:
            raise ValueError(f"reference {reference!r} is neither 'base' nor a method of this comparison: {labels}.")
        seeds = {res.method.label: res.run_seeds() for res in self.results}
        unpaired = [label for label, s in seeds.items() if s != list(self.seeds)]
        if unpaired:
            raise ValueError(
                f"paired verdicts need every method run with the same seeds {list(self.seeds)}, but "
                + ", ".join(f"{label!r} has {seeds[label]}" for label in unpaired)
                + ": rerun those methods with the comparison's seeds."
            )
        values = {label: res.values(key) for label, res in zip(labels, self.results)}
        if reference == "base":
            values = {"base": [self.base[key]] * len(self.seeds), **values}
        return verdicts_against(values, reference, confidence)

    def verdict_lines(self, reference: str | None = None) -> list[str]:
        """Per metric, the verdicts against the base, then against `reference` (default: the first method): a
        table of the paired differences and their intervals, then one sentence per call."""
        if len(self.seeds) < MIN_SEEDS:
            return [
                f"({len(self.seeds)} seed(s): no verdicts. A verdict needs at least {MIN_SEEDS} paired seeds; "
                f"run compare with seeds=range({MIN_SEEDS}) or more.)"
            ]
        references = ["base"]
        if len(self.results) > 1:
            references.append(reference or self.results[0].method.label)
        lines = []
        for key, name in self.METRICS:
            found = [v for ref in references for v in self.verdicts(key, ref)]
            lines += ["", f"{name}:", format_table(verdict_rows(found)), *(v.sentence for v in found)]
        return lines

    def to_text(self) -> str:
        scored = "all the characters" if self.eval_chars is None else f"the first {self.eval_chars:,} characters"
        caveat = "" if self.reported_on == "test" else " (this task has no test split: chosen on the text reported)"
        swept = [res for res in self.results if res.sweep]
        chosen = (
            f"lr = the rate chosen from each method's grid on the validation text with seed {self.selection_seed} "
            f"(lowest target loss){caveat}"
            + ("" if len(swept) == len(self.results) else "; a one-rate grid's rate is given, not chosen")
            if swept
            else "lr = the one rate each method was given (no selection)"
        )
        head = (
            f"Task {self.task.name}: {self.steps} steps, seeds {list(self.seeds)}; exact loss on {scored} "
            f"of each {self.reported_on} text; mean ± std (n-1) over seeds; {chosen}."
        )
        sweeps = [
            f"lr sweep {res.method.label} (validation): "
            + ", ".join(f"{lr:g} -> {v:.4f}" for lr, v in res.sweep.items())
            + (
                " (best at the grid's edge: widen the grid)"
                if len(res.sweep) > 1 and res.chosen_lr in (min(res.sweep), max(res.sweep))
                else ""
            )
            for res in self.results
            if res.sweep
        ]
        rule = (
            "Verdicts: per-seed differences (method - reference, paired by seed), a 95% t interval, "
            "p-values Holm-adjusted across each metric's calls against one reference."
        )
        return "\n".join([head, "", format_table(self.rows()), "", *sweeps, "", rule, *self.verdict_lines()]) + "\n"


def verdict_rows(verdicts: list[Verdict]) -> list[dict]:
    """Rows for format_table: each call's paired difference (method - reference), its interval and Holm p."""
    return [
        {
            "method": v.name,
            "vs": v.reference,
            "difference": f"{v.diff.mean:+.4f}",
            f"{v.diff.confidence:.0%} CI": f"{v.diff.low:+.4f} to {v.diff.high:+.4f}",
            "Holm p": format_p(v.adjusted_p),
            "call": "real" if v.real else "not detectable",
        }
        for v in verdicts
    ]


def compare(
    base_model: GPT,
    task: Task,
    tokenizer,
    methods: list[Method],
    *,
    seeds=SEEDS,
    steps: int = STEPS,
    eval_chars: int | None = EVAL_CHARS,
    cache: str | os.PathLike | None | bool = None,
    train_overrides: dict | None = None,
    curve_points: int = CURVE_POINTS,
    log=None,
    log_dir: str | os.PathLike | None = None,
    workers: int = 1,
    selection_seed: int = SELECTION_SEED,
) -> Comparison:
    """The protocol: per method, sweep its learning rates on the validation text with `selection_seed`, then run
    every seed at the best rate on the test text (the module docstring's rules).

    workers > 1 (with the run cache on, no log_dir): the sweep's runs, then the seeds' runs, are first trained side
    by side (parallel.Prefetcher), `workers` at a time; the numbers are those of workers=1.

    log_dir: TensorBoard logs of every run, under tensorboard_logs.run_log_dir (<log_dir>/<task>/<method>/seed=<n>,
    with lr=<rate>/ before seed= for a method that tries several rates), so TensorBoard overlays them; cached runs
    are written from their record (runs.log_cached_run)."""
    seeds = tuple(seeds)
    if len(seeds) < 1 or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct integers ({MIN_SEEDS} or more for a verdict), got {seeds!r}.")
    if selection_seed in seeds:
        raise ValueError(
            f"selection_seed {selection_seed} is one of the reported seeds {list(seeds)}: the rate would be chosen "
            "on a run the table then reports. Pick a seed outside them."
        )
    reported_on = "test" if task.test is not None else "validation"
    chooser = selection_view(task)
    tested = report_view(task) if reported_on == "test" else task
    if not methods or not all(isinstance(m, Method) for m in methods):
        raise ValueError("methods must be a non-empty list of protocol.Method (see lora_method, full_method).")
    labels = [m.label for m in methods]
    if len(set(labels)) != len(labels):
        raise ValueError(f"Two methods share a label: {labels}; give each a distinct label.")
    if "log_dir" in (train_overrides or {}):
        raise ValueError("Pass compare(log_dir=...), not a train_overrides log_dir: each run gets its own folder.")
    if log_dir is not None:
        check_log_dir(log_dir)
        require_tensorboard()
    say = log or (lambda line: None)
    t0 = time.perf_counter()
    digest = model_digest(base_model) if cache is not False else None
    with one_cpu_thread("cpu"):  # the base row is scored like every curve point, on the reported text
        base = task_scores(base_model, encode_task(tested, tokenizer), eval_chars)

    def config(method: Method, lr: float, seed: int):
        return protocol_train_config(method.lora is None, lr, seed, steps, **(train_overrides or {}))

    def run(method: Method, view: Task, lr: float, seed: int) -> Run:
        cfg = config(method, lr, seed)
        if log_dir is not None:  # not part of the run's cache key: a cached run stays cached
            several = len(method.learning_rates) > 1
            cfg = replace(cfg, log_dir=run_log_dir(log_dir, task.name, method.label, seed, lr if several else None))
        result = run_once(base_model, view, tokenizer, method.lora, cfg, label=method.label, eval_chars=eval_chars,
                          points=curve_points, cache=cache, base_digest=digest)  # fmt: skip
        say(
            f"{method.label} lr={lr:g} seed={seed} ({view.name}): target {result.final['target']:.4f}"
            f"{' (cached)' if result.from_cache else f' ({result.seconds:.1f} s)'}"
        )
        return result

    def request(method: Method, view: Task, lr: float, seed: int) -> RunRequest:
        return RunRequest(view, method.lora, config(method, lr, seed), method.label, eval_chars, curve_points)

    swept = [m for m in methods if len(m.learning_rates) > 1]
    side_by_side = workers if log_dir is None else 1  # a prefetched run would log no per-step events
    with Prefetcher(base_model, tokenizer, cache=cache, workers=side_by_side, base_digest=digest) as pool:
        pool.train([request(m, chooser, lr, selection_seed) for m in swept for lr in m.learning_rates])
        sweeps, bests = {}, {}
        for method in methods:
            if method not in swept:
                sweeps[method.label], bests[method.label] = {}, method.learning_rates[0]
                continue
            sweep = {lr: run(method, chooser, lr, selection_seed).final["target"] for lr in method.learning_rates}
            finite = {lr: v for lr, v in sweep.items() if math.isfinite(v)}
            if not finite:
                raise RuntimeError(f"{method.label}: every learning rate of {list(sweep)} diverged; try smaller ones.")
            sweeps[method.label], bests[method.label] = sweep, min(finite, key=finite.get)
        pool.train([request(m, tested, bests[m.label], seed) for m in methods for seed in seeds])
        results = []
        for method in methods:
            runs = [run(method, tested, bests[method.label], seed) for seed in seeds]
            results.append(MethodResult(method, bests[method.label], sweeps[method.label], runs))
    seconds = time.perf_counter() - t0
    return Comparison(task, base, results, seeds, steps, seconds, eval_chars, selection_seed, reported_on)


def check_compare_output(out_dir: str | os.PathLike) -> Path:
    """Claim `out_dir` for write_comparison (files.claim_output_dir): missing, empty or an earlier comparison's."""
    return claim_output_dir(out_dir, COMPARE_OUTPUT_FORMAT, "write_comparison")


def write_comparison(comparison: Comparison, out_dir: str | os.PathLike) -> dict[str, Path]:
    """comparison.md (the table, sweeps and verdicts), comparison.json (every run) and curves.png."""
    out = check_compare_output(out_dir)
    record = {
        "task": comparison.task.name,
        "steps": comparison.steps,
        "seeds": list(comparison.seeds),
        "selection_seed": comparison.selection_seed,
        "reported_on": comparison.reported_on,
        "eval_chars": comparison.eval_chars,
        "base": comparison.base,
        "methods": [
            {
                "label": r.method.label,
                "lora": r.method.lora.to_dict() if r.method.lora else None,
                "chosen_lr": r.chosen_lr,
                "sweep": {f"{lr:g}": v for lr, v in r.sweep.items()},
                "runs": [run.to_dict() for run in r.runs],
            }
            for r in comparison.results
        ],
    }
    return {
        "md": write_file_atomic(out / "comparison.md", comparison.to_text()),
        "json": write_json_atomic(out / "comparison.json", record),
        "png": plot_comparison(comparison, out / "curves.png"),
    }

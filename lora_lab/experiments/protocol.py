"""A fair comparison of fine-tuning methods: the rule every table of lora_lab follows.

The rules, in the order `compare` applies them:
1. One estimator (estimator.split_scores): curve points and table numbers are the same function of the same
   weights, so the step-0 point of a LoRA run *is* the base (B = 0), and the last point *is* the table's number.
2. A learning-rate sweep per method. Each method tries its own grid on the first seed and keeps the rate
   with the lowest final target loss; the chosen rate is reported. (It is chosen on the target validation
   text the table reports, so the table is slightly optimistic for every method alike.)
3. Seeds. The chosen rate is then run with every seed (>= 3), and tables give mean ± std (sample std, n-1)
   over seeds, next to a base row (the base is deterministic: no spread).
4. A noise line. A difference is called above noise when the two seed ranges (min..max) do not overlap
   (for the base: when its value lies outside the method's range); otherwise it is within noise.
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
    STEPS,
    default_lora_config,
    finetune_config,
)
from .estimator import encode_task, one_cpu_thread, task_scores
from .finetune import method_label
from .reports import format_table, plot_comparison
from .runs import Run, model_digest, run_once

COMPARE_OUTPUT_FORMAT = "lora_lab.compare.v1"  # the tag of a folder write_comparison writes into


def protocol_train_config(
    full: bool, learning_rate: float, seed: int = 0, steps: int = STEPS, **overrides
) -> TrainConfig:
    """The training config of one protocol run: defaults.finetune_config (the one recipe) on the CPU."""
    return finetune_config(
        full, **{"learning_rate": learning_rate, "seed": seed, "max_iters": steps, "device": "cpu", **overrides}
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


def above_noise(a: list[float], b: list[float]) -> bool:
    """True when the two sets of seed results do not overlap (max of one below min of the other)."""
    return max(a) < min(b) or max(b) < min(a)


@dataclass
class MethodResult:
    method: Method
    chosen_lr: float
    sweep: dict[float, float]  # learning rate -> final target loss on the first seed
    runs: list[Run]  # one per seed at chosen_lr

    def values(self, key: str) -> list[float]:
        return [r.final[key] for r in self.runs]


@dataclass
class Comparison:
    task: Task
    base: dict[str, float]  # task_scores of the base
    results: list[MethodResult]
    seeds: tuple[int, ...]
    steps: int
    seconds: float = 0.0
    eval_chars: int | None = EVAL_CHARS  # characters scored per validation text (None: all of it)

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

    def noise_lines(self) -> list[str]:
        """Which differences are above seed noise (non-overlapping seed ranges), one line per comparison."""
        if len(self.seeds) < 2:
            return ["(one seed: no spread to judge noise by; protocol.compare with 3 seeds gives one)"]
        lines = []
        for key, name in self.METRICS:
            for res in self.results:
                vals, b = res.values(key), self.base[key]
                verdict = "above noise" if above_noise(vals, [b]) else "within noise"
                lines.append(f"{name}: {res.method.label} vs base: {statistics.fmean(vals) - b:+.4f} ({verdict})")
            for i, a in enumerate(self.results):
                for other in self.results[i + 1 :]:
                    va, vb = a.values(key), other.values(key)
                    verdict = "above noise" if above_noise(va, vb) else "within noise"
                    lines.append(
                        f"{name}: {a.method.label} vs {other.method.label}: "
                        f"{statistics.fmean(va) - statistics.fmean(vb):+.4f} ({verdict})"
                    )
        return lines

    def to_text(self) -> str:
        scored = "all the characters" if self.eval_chars is None else f"the first {self.eval_chars:,} characters"
        head = (
            f"Task {self.task.name}: {self.steps} steps, seeds {list(self.seeds)}; exact loss on {scored} "
            "of each validation text; mean ± std (n-1) over seeds; lr = the rate "
            "chosen from each method's grid on the first seed (lowest target loss)."
        )
        sweeps = [
            f"lr sweep {res.method.label}: "
            + ", ".join(f"{lr:g} -> {v:.4f}" for lr, v in res.sweep.items())
            + (
                " (best at the grid's edge: widen the grid)"
                if len(res.sweep) > 1 and res.chosen_lr in (min(res.sweep), max(res.sweep))
                else ""
            )
            for res in self.results
        ]
        noise = "Noise: a difference is above noise when the seed ranges (min..max) do not overlap."
        return "\n".join([head, "", format_table(self.rows()), "", *sweeps, "", noise, *self.noise_lines()]) + "\n"


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
) -> Comparison:
    """The protocol: per method, sweep its learning rates on seeds[0], then run every seed at the best rate.

    log_dir: TensorBoard logs of every run, under tensorboard_logs.run_log_dir (<log_dir>/<task>/<method>/seed=<n>,
    with lr=<rate>/ before seed= for a method that tries several rates), so TensorBoard overlays them; cached runs
    are written from their record (runs.log_cached_run)."""
    seeds = tuple(seeds)
    if len(seeds) < 1 or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct integers (3 or more for a spread), got {seeds!r}.")
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
    with one_cpu_thread("cpu"):  # the base row is scored like every curve point
        base = task_scores(base_model, encode_task(task, tokenizer), eval_chars)
    results = []
    for method in methods:

        def run(lr, seed):
            cfg = protocol_train_config(method.lora is None, lr, seed, steps, **(train_overrides or {}))
            if log_dir is not None:  # not part of the run's cache key: a cached run stays cached
                several = len(method.learning_rates) > 1
                cfg = replace(cfg, log_dir=run_log_dir(log_dir, task.name, method.label, seed, lr if several else None))
            result = run_once(
                base_model,
                task,
                tokenizer,
                method.lora,
                cfg,
                label=method.label,
                eval_chars=eval_chars,
                points=curve_points,
                cache=cache,
                base_digest=digest,
            )
            say(
                f"{method.label} lr={lr:g} seed={seed}: target {result.final['target']:.4f}"
                f"{' (cached)' if result.from_cache else f' ({result.seconds:.1f} s)'}"
            )
            return result

        first = {lr: run(lr, seeds[0]) for lr in method.learning_rates}
        sweep = {lr: r.final["target"] for lr, r in first.items()}
        finite = {lr: v for lr, v in sweep.items() if math.isfinite(v)}
        if not finite:
            raise RuntimeError(f"{method.label}: every learning rate of {list(sweep)} diverged; try smaller ones.")
        best = min(finite, key=finite.get)
        runs = [first[best]] + [run(best, seed) for seed in seeds[1:]]
        results.append(MethodResult(method, best, sweep, runs))
    return Comparison(task, base, results, seeds, steps, time.perf_counter() - t0, eval_chars)


def check_compare_output(out_dir: str | os.PathLike) -> Path:
    """Claim `out_dir` for write_comparison (files.claim_output_dir): missing, empty or an earlier comparison's."""
    return claim_output_dir(out_dir, COMPARE_OUTPUT_FORMAT)


def write_comparison(comparison: Comparison, out_dir: str | os.PathLike) -> dict[str, Path]:
    """comparison.md (the table, sweeps and noise lines), comparison.json (every run) and curves.png."""
    out = check_compare_output(out_dir)
    record = {
        "task": comparison.task.name,
        "steps": comparison.steps,
        "seeds": list(comparison.seeds),
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

"""The studies the chapters and the CLI run: each is fine-tunes of the one pipeline, or the protocol on named methods.

- `rank_sweep`: one LoRA fine-tune per rank (one seed, one rate), written as sweep.csv and sweep.png;
- `compare_methods`: base, LoRA and full fine-tuning side by side, one seed each, as a protocol Comparison;
- `lora_vs_full`, `norm_by_rank`, `attention_vs_mlp`: protocol.compare on the methods chapter 04 compares (each
  passes `workers` on: runs trained side by side), and `lr_ratio`, `delta_norm_rows`, `equal_budget_ranks` to read them.
"""

from __future__ import annotations

import os
import statistics
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..data import CharTokenizer
from ..lora import LoRAConfig, select_targets
from ..model import GPT
from ..storage.adapters import save_adapter
from ..storage.files import claim_output_dir, folder_bytes, write_file_atomic
from ..tasks import Task
from ..tensorboard_logs import check_log_dir, require_tensorboard, run_log_dir
from ..train import TrainConfig
from .defaults import (
    ALPHA,
    CURVE_POINTS,
    DEFAULT_TARGETS,
    EVAL_CHARS,
    FULL_LEARNING_RATE,
    FULL_LEARNING_RATES,
    LORA_LEARNING_RATE,
    LORA_LEARNING_RATES,
    SEEDS,
    STEPS,
    default_lora_config,
    finetune_config,
)
from .finetune import DEFAULT_LORA, delta_norms, finetune, method_label
from .protocol import Comparison, Method, MethodResult, compare, full_method, lora_method, mean_spread
from .reports import format_table, plot_sweep, table_csv
from .runs import Run

SWEEP_OUTPUT_FORMAT = "lora_lab.sweep.v1"  # the tag of a folder rank_sweep writes sweep.csv and sweep.png into


def adapter_bytes(model: GPT) -> int:
    """Bytes on disk of the model's LoRA adapter, as `save_adapter` writes it."""
    with tempfile.TemporaryDirectory() as tmp:
        save_adapter(model, Path(tmp) / "adapter")
        return folder_bytes(Path(tmp) / "adapter")


# ----------------------------------------------------------------------------------------------
# Rank sweep


@dataclass
class Sweep:
    task: str
    rows: list[dict]  # one per rank
    base_losses: dict[str, float]
    files: dict[str, Path]  # "csv", "png" -> where they were written (empty without out_dir)
    variant: str = "lora"  # the LoRA variant every rank trained

    COLUMNS = [
        "rank",
        "alpha",
        "targets",
        "trainable_params",
        "adapter_bytes",
        "target_loss",
        "source_loss",
        "train_seconds",
    ]

    def to_text(self) -> str:
        base = f"base: target {self.base_losses['target']:.4f}, source {self.base_losses['source']:.4f}"
        of = "" if self.variant == "lora" else f" of {self.variant}"
        return f"Rank sweep{of} on {self.task} ({base})\n" + format_table(
            self.rows, self.COLUMNS, {"train_seconds": ".1f"}
        )


def check_sweep_output(out_dir: str | os.PathLike) -> Path:
    """Claim `out_dir` for a rank sweep (files.claim_output_dir): missing, empty or an earlier sweep's folder.

    Anything else (a file, a folder of other files) raises files.OutputExistsError and is left untouched."""
    return claim_output_dir(out_dir, SWEEP_OUTPUT_FORMAT)


def sweep_configs(
    ranks, targets=DEFAULT_TARGETS, alpha: float | None = None, variant: str = "lora", options: dict | None = None
) -> list[LoRAConfig]:
    """The LoRAConfig of each rank of a sweep (alpha None: defaults.ALPHA at every rank); a bad value raises here."""
    ranks = list(ranks)
    if not ranks or any(not isinstance(r, int) or isinstance(r, bool) or r <= 0 for r in ranks):
        raise ValueError(f"ranks must be a non-empty list of positive integers, got {ranks!r}.")
    return [
        replace(default_lora_config(r, targets, alpha), variant=variant, options=dict(options or {})) for r in ranks
    ]


def rank_sweep(
    base_model: GPT,
    task: Task,
    tokenizer: CharTokenizer,
    ranks: tuple[int, ...] | list[int] = (1, 2, 4, 8, 16),
    targets: tuple[str, ...] | list[str] = DEFAULT_TARGETS,
    alpha: float | None = None,
    train_config: TrainConfig | None = None,
    out_dir: str | os.PathLike | None = None,
    progress: bool = True,
    *,
    variant: str = "lora",
    options: dict | None = None,
    log_dir: str | os.PathLike | None = None,
    **eval_options,
) -> Sweep:
    """LoRA (or `variant`, with its `options`) fine-tuned once per rank; with out_dir, write sweep.csv and sweep.png.

    out_dir must be missing, empty, or an earlier sweep's folder (it is claimed with
    files.claim_output_dir before any training); a folder of other files is refused untouched.

    alpha None is lora_lab's rule, 16 at every rank (defaults.ALPHA), so the r=8 row is the default fine-tune.
    A fixed alpha makes scale = alpha / r shrink as r grows, and the learned update shrinks with it
    (norm_by_rank), so one rate is not equally fair to every rank. One seed, one rate: protocol.compare
    sweeps rates and seeds.

    log_dir: a TensorBoard log per rank, in tensorboard_logs.run_log_dir(log_dir, task, "LoRA r=<r>", seed).
    """
    configs = sweep_configs(ranks, targets, alpha, variant, options)
    for cfg in configs:  # checked without touching the base: a rank too large for a target fails before training
        select_targets(base_model, cfg)
    if log_dir is not None:
        check_log_dir(log_dir)
        require_tensorboard()  # a missing extra is named before anything trains or any folder is claimed
        train_config = train_config or finetune_config()
    out = None if out_dir is None else check_sweep_output(out_dir)  # refuses a user's folder
    rows, base_losses = [], None
    for cfg in configs:
        run_config = train_config
        if log_dir is not None:
            where = run_log_dir(log_dir, task.name, method_label(cfg), train_config.seed)
            run_config = replace(train_config, log_dir=where)
        res = finetune(base_model, task, tokenizer, cfg, run_config, progress, **eval_options)
        base_losses = res.base_losses
        rows.append(
            {
                "rank": cfg.r,
                "alpha": cfg.alpha,
                "targets": list(cfg.targets),
                "trainable_params": res.trainable_params,
                "adapter_bytes": adapter_bytes(res.model),
                "target_loss": res.losses["target"],
                "source_loss": res.losses["source"],
                "train_seconds": res.history.seconds,
            }
        )
    sweep = Sweep(task.name, rows, base_losses, {}, variant)
    if out is not None:
        sweep.files["csv"] = write_file_atomic(out / "sweep.csv", table_csv(rows, Sweep.COLUMNS))
        sweep.files["png"] = plot_sweep(sweep, out / "sweep.png")
    return sweep


# ----------------------------------------------------------------------------------------------
# Base vs LoRA vs full fine-tuning, one seed


def compare_methods(
    base_model: GPT,
    task: Task,
    tokenizer: CharTokenizer,
    lora: LoRAConfig = DEFAULT_LORA,
    lora_train_config: TrainConfig | None = None,
    full_train_config: TrainConfig | None = None,
    progress: bool = True,
    **eval_options,
) -> Comparison:
    """Base, LoRA and full fine-tuning on one task, one seed each, at the given configs: a protocol Comparison
    (its table and sweeps; one seed: no verdicts). eval_options (eval_chars, curve_points) go to `finetune`.
    For a fair comparison (a learning-rate sweep per method, paired seeds, verdicts) use protocol.compare."""
    results = []
    for config, train_config in ((lora, lora_train_config), (None, full_train_config)):
        res = finetune(base_model, task, tokenizer, config, train_config, progress, **eval_options)
        lr, seed = res.train_config.learning_rate, res.train_config.seed
        run = Run(
            res.label,
            lr,
            seed,
            res.curve,
            delta_norms(res.model.cpu(), base_model),
            res.trainable_params,
            res.history.seconds,
        )
        results.append(MethodResult(Method(config, (lr,)), lr, {lr: run.final["target"]}, [run]))
    first = results[0].runs[0]
    steps = first.curve[-1]["step"]
    return Comparison(
        task,
        {k: v for k, v in first.curve[0].items() if k != "step"},
        results,
        (first.seed,),
        steps,
        eval_chars=eval_options.get("eval_chars", EVAL_CHARS),
    )


# ----------------------------------------------------------------------------------------------
# What chapter 04 measures with the protocol


def lora_vs_full(
    base_model: GPT,
    task: Task,
    tokenizer,
    *,
    r: int = 8,
    sweep: bool = False,
    seeds=SEEDS,
    steps: int = STEPS,
    cache=None,
    device: str = "cpu",
    log=None,
    lora_rates=None,
    full_rates=None,
    eval_chars: int | None = EVAL_CHARS,
    curve_points: int = CURVE_POINTS,
    log_dir: str | os.PathLike | None = None,
    workers: int = 1,
) -> Comparison:
    """Base vs LoRA (r, alpha 16, attention) vs full fine-tuning. sweep=False runs each method at the rate the
    protocol chose (LORA_LEARNING_RATE, FULL_LEARNING_RATE): 6 runs. sweep=True sweeps both grids: 14 runs.
    lora_rates / full_rates: a grid of one's own for that method (overrides `sweep` for it)."""
    if lora_rates is None:
        lora_rates = LORA_LEARNING_RATES if sweep else (LORA_LEARNING_RATE,)
    if full_rates is None:
        full_rates = FULL_LEARNING_RATES if sweep else (FULL_LEARNING_RATE,)
    return compare(
        base_model,
        task,
        tokenizer,
        [lora_method(r, learning_rates=lora_rates), full_method(full_rates)],
        seeds=seeds,
        steps=steps,
        cache=cache,
        train_overrides={"device": device},
        log=log,
        eval_chars=eval_chars,
        curve_points=curve_points,
        log_dir=log_dir,  # TensorBoard: <log_dir>/<task>/<method>/seed=<n>
        workers=workers,
    )


def norm_by_rank(
    base_model: GPT,
    task: Task,
    tokenizer,
    ranks=(1, 4, 16),
    *,
    alpha=ALPHA,
    learning_rate: float = LORA_LEARNING_RATE,
    seeds=SEEDS,
    steps: int = STEPS,
    cache=None,
    log=None,
    eval_chars: int | None = EVAL_CHARS,
    curve_points: int = 2,
    device: str = "cpu",
    workers: int = 1,
) -> Comparison:
    """One LoRA run per rank and seed at one learning rate, to read ‖ΔW‖_F against r (delta_norm_rows).
    alpha: a number for every rank (default 16: scale alpha / r, lora_lab's and the LoRA paper's rule), or a
    function of r (e.g. `lambda r: 2 * r` for a constant scale, `lambda r: 4 * r ** 0.5` for rsLoRA's)."""
    methods = [
        lora_method(r, learning_rates=[learning_rate], alpha=alpha(r) if callable(alpha) else alpha) for r in ranks
    ]
    return compare(
        base_model,
        task,
        tokenizer,
        methods,
        seeds=seeds,
        steps=steps,
        cache=cache,
        curve_points=curve_points,
        eval_chars=eval_chars,
        log=log,
        train_overrides={"device": device},
        workers=workers,
    )


def attention_vs_mlp(
    base_model: GPT,
    task: Task,
    tokenizer,
    attention_rank: int = 5,
    *,
    learning_rate: float = LORA_LEARNING_RATE,
    seeds=SEEDS,
    steps: int = STEPS,
    cache=None,
    log=None,
    eval_chars: int | None = EVAL_CHARS,
    curve_points: int = 2,
    device: str = "cpu",
    workers: int = 1,
) -> Comparison:
    """LoRA on the attention projections only vs on the MLP only, at an equal parameter budget
    (equal_budget_ranks), each at `learning_rate`."""
    attn_r, mlp_r = equal_budget_ranks(base_model, attention_rank)
    methods = [
        lora_method(attn_r, learning_rates=[learning_rate], label=f"attention r={attn_r}"),
        lora_method(mlp_r, targets=("up_proj", "down_proj"), learning_rates=[learning_rate], label=f"MLP r={mlp_r}"),
    ]
    return compare(
        base_model,
        task,
        tokenizer,
        methods,
        seeds=seeds,
        steps=steps,
        cache=cache,
        curve_points=curve_points,
        eval_chars=eval_chars,
        log=log,
        train_overrides={"device": device},
        workers=workers,
    )


def lr_ratio(comparison: Comparison, lora_label: str, full_label: str = "full FT") -> float:
    """LoRA's chosen learning rate over full fine-tuning's ("LoRA Without Regret" reports about 10)."""
    return comparison.result(lora_label).chosen_lr / comparison.result(full_label).chosen_lr


def delta_norm_rows(comparison: Comparison) -> list[dict]:
    """Per method: ‖ΔW‖_F averaged over its adapted matrices, mean ± std over seeds (for ‖ΔW‖ vs r)."""
    rows = []
    for res in comparison.results:
        per_seed = [statistics.fmean(r.delta_norms.values()) for r in res.runs]
        mean, std = mean_spread(per_seed)
        lora = res.method.lora
        rows.append(
            {
                "method": res.method.label,
                "r": lora.r if lora else None,
                "alpha": lora.alpha if lora else None,
                "lr": res.chosen_lr,
                "delta_norm": mean,
                "delta_norm_std": std,
            }
        )
    return rows


def equal_budget_ranks(
    model: GPT, attention_rank: int, attention=DEFAULT_TARGETS, mlp=("up_proj", "down_proj")
) -> tuple[int, int]:
    """(attention rank, MLP rank) whose LoRA adapters have the same number of parameters (as near as integers
    allow): r (d + k) summed over each group's matrices."""

    def per_rank(names):
        return sum(
            m.in_features + m.out_features
            for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in names
        )

    budget = attention_rank * per_rank(attention)
    return attention_rank, max(1, round(budget / per_rank(mlp)))

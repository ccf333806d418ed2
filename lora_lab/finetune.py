"""Fine-tune the pretrained base on a task, with LoRA or fully, and measure what it gained and forgot.

Every fine-tune starts from a deep copy of the base, so the base is never changed. Two numbers tell
the story, both measured with the protocol's one estimator (`protocol.task_scores`: the exact loss of
the first protocol.EVAL_CHARS characters of each validation text), for the curve and for the table alike:
- target loss: validation loss on the task's own text (lower = adapted),
- source loss: validation loss on the pretraining domain (higher than the base's = forgetting).
The curve's step-0 point is the base itself, and its last point is the final loss.

`compare_methods` puts base, LoRA and full fine-tuning side by side for one seed; `protocol.compare` is the
fair version (a learning-rate sweep per method, 3 seeds, a noise line). `rank_sweep` fine-tunes once per
LoRA rank and writes a CSV table and a PNG plot. The defaults (FINETUNE_DEFAULTS) are the protocol's
choice, recorded in benchmarks/RESULTS_protocol.md; alpha is 16 at every rank (protocol.ALPHA).
"""
from __future__ import annotations

import copy
import csv
import io
import math
import os
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .checkpoint import save_checkpoint
from .data import CharTokenizer
from .files import claim_output_dir, folder_bytes, write_file_atomic
from .adapters import save_adapter
from .lora import LoRAConfig, LoRAError, apply_lora, select_targets, set_lora_enabled
from .model import GPT, GPTConfig
from .protocol import (
    CURVE_POINTS, EVAL_CHARS, FULL_LEARNING_RATE, LORA_LEARNING_RATE, STEPS, default_alpha, format_table,
    new_figure, protocol_train_config, save_figure, task_scores, train_with_curve,
)
from .tasks import Task
from .train import TrainConfig, TrainResult, pick_device

# Fine-tuning defaults: the learning rates protocol.compare chose on the default task (rot13) for LoRA
# r=8, alpha=16 on DEFAULT_TARGETS and for full fine-tuning, STEPS steps (benchmarks/RESULTS_protocol.md).
# Seed 0 is the protocol's first seed, so the default fine-tune is one of the protocol's runs.
DEFAULT_TASK = "rot13"
DEFAULT_RANK = 8
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
FINETUNE_DEFAULTS: dict[str, TrainConfig] = {
    "lora": protocol_train_config(False, LORA_LEARNING_RATE, seed=0, steps=STEPS, device="auto"),
    "full": protocol_train_config(True, FULL_LEARNING_RATE, seed=0, steps=STEPS, device="auto"),
}
SWEEP_OUTPUT_FORMAT = "lora_lab.sweep.v1"  # the tag of a folder rank_sweep writes sweep.csv and sweep.png into


def finetune_config(full: bool = False, **overrides) -> TrainConfig:
    """The default fine-tuning TrainConfig (LoRA or full), with fields overridden by keyword.

    Changing max_iters alone also rescales the warmup (10% of the steps at most); changing learning_rate
    alone also sets min_lr to a tenth of it, as the protocol's schedule does.
    """
    base = FINETUNE_DEFAULTS["full" if full else "lora"]
    steps = overrides.get("max_iters", base.max_iters)
    if isinstance(steps, int) and steps > 0:
        overrides.setdefault("warmup_iters", min(base.warmup_iters, steps // 10))
    lr = overrides.get("learning_rate")
    if isinstance(lr, (int, float)) and not isinstance(lr, bool) and lr > 0:
        overrides.setdefault("min_lr", lr / 10)
    return replace(base, **overrides)


def default_lora_config(r: int = DEFAULT_RANK, targets=DEFAULT_TARGETS, alpha: float | None = None) -> LoRAConfig:
    """The LoRAConfig lora_lab uses when none is given: alpha = 16 (protocol.default_alpha) on DEFAULT_TARGETS."""
    return LoRAConfig(r=r, alpha=default_alpha(r) if alpha is None else alpha, targets=tuple(targets))


def check_lora_config(config: LoRAConfig, model_config: GPTConfig) -> list[str]:
    """The modules `config` would adapt in a GPT of `model_config`; raises LoRAError where apply_lora would.

    The GPT is built on the "meta" device (shapes only, no memory, no random numbers), so a config can be
    checked against a preset's shape before any base model is loaded or trained.
    """
    if not isinstance(model_config, GPTConfig):
        raise TypeError(f"model_config must be a GPTConfig, got {type(model_config).__name__}.")
    with torch.device("meta"):
        shape_only = GPT(model_config)
    return select_targets(shape_only, config)


def encode_task(task: Task, tokenizer: CharTokenizer) -> dict[str, torch.Tensor]:
    """The task's texts as token tensors: train, target (validation) and source (validation)."""
    return {
        "train": torch.tensor(tokenizer.encode(task.train), dtype=torch.long),  # (n_train,)
        "target": torch.tensor(tokenizer.encode(task.validation), dtype=torch.long),  # (n_target,)
        "source": torch.tensor(tokenizer.encode(task.source_validation), dtype=torch.long),  # (n_source,)
    }


def task_losses(model: torch.nn.Module, data: dict[str, torch.Tensor], eval_chars: int | None = EVAL_CHARS,
                device: torch.device | str = "cpu") -> dict[str, float]:
    """{"target", "source"} validation losses by the protocol's estimator (exact, on fixed text)."""
    scores = task_scores(model, data, eval_chars, device)
    return {"target": scores["target"], "source": scores["source"]}


class DivergedError(RuntimeError):
    """A fine-tune whose loss or weights became NaN/Inf: there is nothing worth saving."""


@dataclass
class FinetuneResult:
    model: GPT  # the fine-tuned copy (LoRA layers still separate, not merged)
    task: str
    method: str  # "lora" or "full"
    lora: LoRAConfig | None  # None for full fine-tuning
    train_config: TrainConfig
    history: TrainResult
    losses: dict[str, float]  # {"target", "source"} after fine-tuning
    base_losses: dict[str, float]  # the base model on the same batches
    trainable_params: int
    total_params: int  # of the fine-tuned model (base + adapter for LoRA)
    curve: list[dict] = field(default_factory=list)  # [{"step", "target", "target_accuracy", "source"}]

    @property
    def target_accuracy(self) -> float | None:
        """Next-character accuracy on the target validation text after fine-tuning (the curve's last point)."""
        return self.curve[-1]["target_accuracy"] if self.curve else None

    @property
    def label(self) -> str:
        if self.lora is None:
            return "full FT"
        return f"LoRA r={self.lora.r}" if self.lora.variant == "lora" else f"{self.lora.variant} r={self.lora.r}"

    @property
    def diverged(self) -> bool:
        """True if training blew up: a non-finite final loss or a NaN/Inf trainable weight (nothing to save)."""
        if not all(math.isfinite(v) for v in self.losses.values()):
            return True
        return any(not torch.isfinite(p).all() for p in self.model.parameters() if p.requires_grad)

    def require_finite(self) -> "FinetuneResult":
        """Raise DivergedError (saying what to change) if the run diverged; else return self."""
        if self.diverged:
            losses = ", ".join(f"{k} {v:.4g}" for k, v in self.losses.items())
            raise DivergedError(
                f"{self.label} on {self.task} diverged (final losses: {losses}; learning rate "
                f"{self.train_config.learning_rate:g}): the weights hold NaN or Inf, so nothing was saved. "
                "Try a smaller learning rate.")
        return self

    def summary(self) -> dict:
        """Plain numbers, ready for JSON."""
        return {
            "task": self.task,
            "method": self.method,
            "lora": self.lora.to_dict() if self.lora is not None else None,
            "trainable_params": self.trainable_params,
            "total_params": self.total_params,
            "target_loss": self.losses["target"],
            "source_loss": self.losses["source"],
            "base_target_loss": self.base_losses["target"],
            "base_source_loss": self.base_losses["source"],
            "target_accuracy": self.target_accuracy,
            "base_target_accuracy": self.curve[0]["target_accuracy"] if self.curve else None,
            "learning_rate": self.train_config.learning_rate,
            "seed": self.train_config.seed,
            "train_seconds": self.history.seconds,
        }


def finetune(
    base_model: GPT,
    task: Task,
    tokenizer: CharTokenizer,
    lora: LoRAConfig | None = default_lora_config(),
    train_config: TrainConfig | None = None,
    progress: bool = True,
    *,
    eval_chars: int | None = EVAL_CHARS,
    curve_points: int = CURVE_POINTS,
    base_losses: dict[str, float] | None = None,
    desc: str | None = None,
    on_point=None,
) -> FinetuneResult:
    """Fine-tune a copy of `base_model` on `task.train`: LoRA with `lora`, or every weight if lora is None.

    train_config defaults to `finetune_config(full=lora is None)`. The curve is measured at curve_points
    evenly spaced steps with protocol.task_scores on the first eval_chars characters (None: all); its
    step-0 point is the base. base_losses is accepted for older callers and not used: the base is always
    the curve's own step-0 point, measured by the same estimator. on_point(step, max_iters) is called after
    each curve point is measured (RankDashboard's progress bar uses it).
    """
    if not isinstance(base_model, GPT):
        raise TypeError(f"base_model must be a lora_lab GPT, got {type(base_model).__name__}.")
    if not isinstance(task, Task):
        raise TypeError(f"task must be a lora_lab.tasks.Task (see tasks.make_task), got {type(task).__name__}.")
    if not isinstance(getattr(tokenizer, "vocab_size", None), int):
        raise TypeError(f"tokenizer must be a CharTokenizer (with encode and vocab_size), got {type(tokenizer).__name__}.")
    if lora is not None and not isinstance(lora, LoRAConfig):
        raise LoRAError(f"lora must be a LoRAConfig (or None for full fine-tuning), got {type(lora).__name__}.")
    if train_config is not None and not isinstance(train_config, TrainConfig):
        raise TypeError(f"train_config must be a TrainConfig (see finetune_config), got {type(train_config).__name__}.")
    if eval_chars is not None and (isinstance(eval_chars, bool) or not isinstance(eval_chars, int) or eval_chars <= 0):
        raise ValueError(f"eval_chars must be a positive integer (or None for the whole text), got {eval_chars!r}.")
    if isinstance(curve_points, bool) or not isinstance(curve_points, int) or curve_points < 2:
        raise ValueError(f"curve_points must be an integer >= 2 (step 0 and the last step), got {curve_points!r}.")
    if tokenizer.vocab_size != base_model.config.vocab_size:
        raise ValueError(
            f"The tokenizer has {tokenizer.vocab_size} characters but the model's vocab_size is "
            f"{base_model.config.vocab_size}: use the tokenizer the base was pretrained with."
        )
    full = lora is None
    cfg = train_config or finetune_config(full=full)
    device = pick_device(cfg.device)  # fails early on a device that is not there
    data = encode_task(task, tokenizer)
    block = base_model.config.block_size
    short = {name: len(t) for name, t in data.items() if len(t) <= block}
    if short:  # batches are windows of block_size + 1 characters
        raise ValueError(f"Task {task.name!r}: text(s) {short} (characters) are too short for the model's "
                         f"block_size={block}; each needs more than {block} characters.")

    model = copy.deepcopy(base_model).to(device)  # the base itself is never touched
    torch.manual_seed(cfg.seed)  # LoRA's A matrices are drawn from the global RNG
    if full:
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        apply_lora(model, lora)  # a bad target or rank fails here, before any measuring or training
    base_scores = None
    if not full and lora.variant != "lora":
        # A variant's step 0 need not be the base bit for bit (PiSSA computes W x - s B0 A0 x + s B A x): score
        # the base itself, with the adapters off, which for every variant is exactly the original weights.
        set_lora_enabled(model, False)
        base_scores = task_scores(model, data, eval_chars, device)
        set_lora_enabled(model, True)
    trainable = model.num_parameters(trainable_only=True)
    label = "full fine-tuning" if full else f"{'LoRA' if lora.variant == 'lora' else lora.variant} r={lora.r}"
    # Step 0 of the curve is the untrained copy, which computes exactly the base (B = 0 adds exact zeros).
    trained = train_with_curve(model, data, cfg, eval_chars, curve_points, progress, desc or f"{label} on {task.name}",
                               on_point)
    curve = trained.curve
    history = TrainResult(losses=trained.step_losses, seconds=trained.seconds,
                          tokens=cfg.max_iters * cfg.batch_size * base_model.config.block_size,
                          evals=[{"iter": p["step"], "train": None, "val": p["target"], "lr": None} for p in curve])
    return FinetuneResult(
        model=model,
        task=task.name,
        method="full" if full else "lora",
        lora=lora,
        train_config=cfg,
        history=history,
        losses={"target": curve[-1]["target"], "source": curve[-1]["source"]},
        base_losses={k: (base_scores or curve[0])[k] for k in ("target", "source")},
        trainable_params=trainable,
        total_params=model.num_parameters(),
        curve=curve,
    )


# ----------------------------------------------------------------------------------------------
# Sizes on disk


def adapter_bytes(model: GPT) -> int:
    """Bytes on disk of the model's LoRA adapter, as `save_adapter` writes it."""
    with tempfile.TemporaryDirectory() as tmp:
        save_adapter(model, Path(tmp) / "adapter")
        return folder_bytes(Path(tmp) / "adapter")


def checkpoint_bytes(model: GPT) -> int:
    """Bytes on disk of a full checkpoint of a plain GPT, as `save_checkpoint` writes it."""
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(model, Path(tmp) / "checkpoint")
        return folder_bytes(Path(tmp) / "checkpoint")


# ----------------------------------------------------------------------------------------------
# Tables and plots


def loss_rows(results: list[FinetuneResult], total_params: int) -> list[dict]:
    """Rows for format_table: the base, then each fine-tune (trainable parameters, target and source loss)."""
    first = results[0]
    rows = [{"model": "base", "lr": None, "trainable": "0", "trainable_%": "0",
             "target_loss": first.base_losses["target"], "source_loss": first.base_losses["source"],
             "target_acc": first.curve[0]["target_accuracy"] if first.curve else None, "train_s": None}]
    for res in results:
        rows.append({"model": res.label, "lr": f"{res.train_config.learning_rate:g}",
                     "trainable": f"{res.trainable_params:,}",
                     "trainable_%": f"{100.0 * res.trainable_params / total_params:.2f}",
                     "target_loss": res.losses["target"], "source_loss": res.losses["source"],
                     "target_acc": res.target_accuracy, "train_s": f"{res.history.seconds:.1f}"})
    return rows


def table_csv(rows: list[dict], columns: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({c: ",".join(map(str, v)) if isinstance(v, (list, tuple)) else v for c, v in r.items()})
    return buf.getvalue()


def _smooth(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_loss_curves(results: list[FinetuneResult], path: str | os.PathLike, title: str | None = None) -> Path:
    """loss_curves_figure, saved as a PNG."""
    return save_figure(loss_curves_figure(results, title), path)


def loss_curves_figure(results: list[FinetuneResult], title: str | None = None):
    """Target loss (left) and source loss (right: forgetting) of each fine-tune against step, with the base
    as a dashed line. Every point is the table's estimator: step 0 is the base, the last point is the final
    loss in the table (loss_rows). The smoothed training loss is drawn faintly on the left."""
    fig, axes = new_figure(11, 4.2, ncols=2)
    task = results[0].task if results else ""
    panels = ((axes[0], "target", "target loss (the task)"), (axes[1], "source", "source loss (forgetting)"))
    for ax, key, name in panels:
        for i, res in enumerate(results):
            color = f"C{i}"
            if key == "target" and res.history.losses:
                steps = len(res.history.losses)
                ax.plot(range(steps), _smooth(res.history.losses, max(1, steps // 30)), color=color, alpha=0.3,
                        lw=0.8, label=f"{res.label}: training batches (smoothed)")
            ax.plot([p["step"] for p in res.curve], [p[key] for p in res.curve], "o-", color=color,
                    label=f"{res.label} (lr {res.train_config.learning_rate:g})")
        if results:
            ax.axhline(results[0].base_losses[key], color="k", ls="--", lw=1, label="base")
        ax.set_xlabel("fine-tuning step")
        ax.set_ylabel("cross-entropy (nats / char)")
        ax.set_title(f"{task}: {name}")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return fig


# ----------------------------------------------------------------------------------------------
# Base vs LoRA vs full fine-tuning


@dataclass
class Comparison:
    task: str
    rows: list[dict]  # one per method: base, LoRA, full FT
    results: dict[str, FinetuneResult] = field(default_factory=dict)  # "lora", "full"

    COLUMNS = ["method", "trainable_params", "trainable_pct", "target_loss", "source_loss", "train_seconds"]

    def to_text(self) -> str:
        table = format_table(self.rows, self.COLUMNS, {"trainable_pct": ".2f", "train_seconds": ".1f"})
        return f"Task {self.task}: validation losses on fixed batches\n" + table


def compare_methods(
    base_model: GPT,
    task: Task,
    tokenizer: CharTokenizer,
    lora: LoRAConfig = default_lora_config(),
    lora_train_config: TrainConfig | None = None,
    full_train_config: TrainConfig | None = None,
    progress: bool = True,
    **eval_options,
) -> Comparison:
    """Base, LoRA and full fine-tuning on one task, one seed: target loss, source loss and trainable parameters.

    eval_options (eval_chars, curve_points) go to `finetune`. For a fair comparison (a learning-rate sweep
    per method, 3 seeds, a noise line) use protocol.compare.
    """
    lora_res = finetune(base_model, task, tokenizer, lora, lora_train_config, progress, **eval_options)
    full_res = finetune(
        base_model, task, tokenizer, None, full_train_config, progress, **eval_options,
    )
    total = base_model.num_parameters()
    rows = [
        {"method": "base", "trainable_params": 0, "trainable_pct": 0.0, "target_loss": lora_res.base_losses["target"],
         "source_loss": lora_res.base_losses["source"], "train_seconds": None},
    ]
    for res in (lora_res, full_res):
        rows.append({
            "method": res.label,
            "trainable_params": res.trainable_params,
            "trainable_pct": 100.0 * res.trainable_params / total,
            "target_loss": res.losses["target"],
            "source_loss": res.losses["source"],
            "train_seconds": res.history.seconds,
        })
    return Comparison(task.name, rows, {"lora": lora_res, "full": full_res})


# ----------------------------------------------------------------------------------------------
# Rank sweep


@dataclass
class Sweep:
    task: str
    rows: list[dict]  # one per rank
    base_losses: dict[str, float]
    files: dict[str, Path]  # "csv", "png" -> where they were written (empty without out_dir)

    COLUMNS = ["rank", "alpha", "targets", "trainable_params", "adapter_bytes", "target_loss", "source_loss",
               "train_seconds"]

    def to_text(self) -> str:
        base = f"base: target {self.base_losses['target']:.4f}, source {self.base_losses['source']:.4f}"
        return f"Rank sweep on {self.task} ({base})\n" + format_table(self.rows, self.COLUMNS, {"train_seconds": ".1f"})


def check_sweep_output(out_dir: str | os.PathLike) -> Path:
    """Claim `out_dir` for a rank sweep (files.claim_output_dir): missing, empty or an earlier sweep's folder.

    Anything else (a file, a folder of other files) raises files.OutputExistsError and is left untouched."""
    return claim_output_dir(out_dir, SWEEP_OUTPUT_FORMAT)


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
    **eval_options,
) -> Sweep:
    """LoRA fine-tune once per rank; with out_dir, write sweep.csv and sweep.png there.

    out_dir must be missing, empty, or an earlier sweep's folder (it is claimed with
    files.claim_output_dir before any training); a folder of other files is refused untouched.

    alpha None is lora_lab's rule, 16 at every rank (protocol.default_alpha), so the r=8 row is the default
    fine-tune. A fixed alpha makes scale = alpha / r shrink as r grows, and the learned update shrinks with
    it: at one learning rate ‖ΔW‖_F falls from 9.1 (r=1) to 4.4 (r=16) on rot13
    (benchmarks/RESULTS_protocol.md), so one rate is not equally fair to every rank. One seed, one rate:
    protocol.compare sweeps rates and seeds.
    """
    ranks = list(ranks)
    if not ranks or any(not isinstance(r, int) or isinstance(r, bool) or r <= 0 for r in ranks):
        raise ValueError(f"ranks must be a non-empty list of positive integers, got {ranks!r}.")
    targets = (targets,) if isinstance(targets, str) else tuple(targets)  # "q_proj" is one name, not six letters
    configs = [LoRAConfig(r=r, alpha=default_alpha(r) if alpha is None else alpha, targets=targets) for r in ranks]
    for cfg in configs:  # checked without touching the base: a rank too large for a target fails before training
        select_targets(base_model, cfg)
    out = None if out_dir is None else check_sweep_output(out_dir)  # refuses a user's folder
    rows, base_losses = [], None
    for cfg in configs:
        res = finetune(base_model, task, tokenizer, cfg, train_config, progress, base_losses=base_losses,
                       **eval_options)
        base_losses = res.base_losses
        rows.append({
            "rank": cfg.r,
            "alpha": cfg.alpha,
            "targets": list(cfg.targets),
            "trainable_params": res.trainable_params,
            "adapter_bytes": adapter_bytes(res.model),
            "target_loss": res.losses["target"],
            "source_loss": res.losses["source"],
            "train_seconds": res.history.seconds,
        })
    sweep = Sweep(task.name, rows, base_losses, {})
    if out is not None:
        sweep.files["csv"] = write_file_atomic(out / "sweep.csv", table_csv(rows, Sweep.COLUMNS))
        sweep.files["png"] = plot_sweep(sweep, out / "sweep.png")
    return sweep


def plot_sweep(sweep: Sweep, path: str | os.PathLike) -> Path:
    """Losses vs rank (left) and adapter size vs rank (right), as a PNG."""
    fig, (ax_loss, ax_size) = new_figure(10, 4, ncols=2)
    ranks = [r["rank"] for r in sweep.rows]
    for key, color in (("target", "C0"), ("source", "C1")):
        ax_loss.plot(ranks, [r[f"{key}_loss"] for r in sweep.rows], "o-", color=color, label=f"LoRA: {key}")
        ax_loss.axhline(sweep.base_losses[key], color=color, ls="--", lw=1, label=f"base: {key}")
    ax_size.plot(ranks, [r["adapter_bytes"] / 1024 for r in sweep.rows], "o-", color="C2")
    ax_size.set_yscale("log", base=2)  # bytes grow ~linearly in r: a straight line on log-log axes
    for ax in (ax_loss, ax_size):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ranks, [str(r) for r in ranks])
        ax.set_xlabel("LoRA rank r")
        ax.grid(alpha=0.3)
    ax_loss.set_ylabel("validation loss (nats / char)")
    ax_loss.set_title(f"{sweep.task}: adaptation (target) and forgetting (source)")
    ax_loss.legend(fontsize=8)
    ax_size.set_ylabel("adapter size on disk (KiB)")
    ax_size.set_title("adapter size")
    return save_figure(fig, path)

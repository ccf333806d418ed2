"""The one fine-tuning pipeline: a copy of the base, LoRA (any variant) or every weight, trained with its curve.

Every fine-tune in lora_lab runs through `finetune`: the protocol's cached runs, the studies, the dashboard,
the tour and the CLI. It copies the base (the base is never changed), seeds the global RNG with the config's
seed (LoRA's A matrices are drawn from it), freezes or adapts, and trains with train.train, scoring the model
at evenly spaced steps with the one estimator (estimator.task_scores):
- target loss: validation loss on the task's own text (lower = adapted),
- source loss: validation loss on the pretraining domain (higher than the base's = forgetting).
The curve's step-0 point is the base itself, and its last point is the final loss.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch

from ..data import CharTokenizer
from ..devices import pick_device
from ..lora import LoRAConfig, LoRAError, apply_lora, lora_layers, select_targets, set_lora_enabled
from ..model import GPT, GPTConfig
from ..tasks import Task
from ..train import TrainConfig, TrainResult, train
from .defaults import CURVE_POINTS, EVAL_CHARS, default_lora_config, finetune_config
from .estimator import curve_steps, encode_task, one_cpu_thread, task_scores

DEFAULT_LORA = default_lora_config()  # r=8, alpha=16 on the attention projections (a frozen dataclass: safe to share)


def method_label(lora: LoRAConfig | None) -> str:
    """The one name of a fine-tuning method in tables and plots: "full FT", "LoRA r=8", or the variant, "dora r=8"."""
    if lora is None:
        return "full FT"
    return f"{'LoRA' if lora.variant == 'lora' else lora.variant} r={lora.r}"


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
    base_scores: dict[str, float]  # {"target", "target_accuracy", "source"} of the base, by the same estimator
    trainable_params: int
    total_params: int  # of the fine-tuned model (base + adapter for LoRA)
    curve: list[dict] = field(default_factory=list)  # [{"step", "target", "target_accuracy", "source"}]

    @property
    def base_losses(self) -> dict[str, float]:
        """{"target", "source"} of the base model."""
        return {k: self.base_scores[k] for k in ("target", "source")}

    @property
    def target_accuracy(self) -> float | None:
        """Next-character accuracy on the target validation text after fine-tuning (the curve's last point)."""
        return self.curve[-1]["target_accuracy"] if self.curve else None

    @property
    def label(self) -> str:
        return method_label(self.lora)

    @property
    def diverged(self) -> bool:
        """True if training blew up: a non-finite final loss or a NaN/Inf trainable weight (nothing to save)."""
        if not all(math.isfinite(v) for v in self.losses.values()):
            return True
        return any(not torch.isfinite(p).all() for p in self.model.parameters() if p.requires_grad)

    def require_finite(self) -> FinetuneResult:
        """Raise DivergedError (saying what to change) if the run diverged; else return self."""
        if self.diverged:
            losses = ", ".join(f"{k} {v:.4g}" for k, v in self.losses.items())
            raise DivergedError(
                f"{self.label} on {self.task} diverged (final losses: {losses}; learning rate "
                f"{self.train_config.learning_rate:g}): the weights hold NaN or Inf, so nothing was saved. "
                "Try a smaller learning rate."
            )
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
            "base_target_loss": self.base_scores["target"],
            "base_source_loss": self.base_scores["source"],
            "target_accuracy": self.target_accuracy,
            "base_target_accuracy": self.base_scores["target_accuracy"],
            "learning_rate": self.train_config.learning_rate,
            "seed": self.train_config.seed,
            "train_seconds": self.history.seconds,
        }


@dataclass
class TrainedCurve:
    curve: list[dict]  # [{"step", "target", "target_accuracy", "source"}] by task_scores
    step_losses: list[float]  # the training loss of every step
    seconds: float  # wall time of the training steps (scoring excluded)


def train_with_curve(
    model: GPT,
    data: dict[str, torch.Tensor],
    cfg: TrainConfig,
    eval_chars: int | None = EVAL_CHARS,
    points: int = CURVE_POINTS,
    progress: bool = False,
    desc: str = "fine-tuning",
    on_point=None,
) -> TrainedCurve:
    """Train `model` in place with train.train (same seeds, batches, schedule, clipping; data-parallel under
    torchrun), scoring it with task_scores at curve_steps instead of train's sampled estimate.
    on_point(step, max_iters), if given, is called after each curve point (a widget's progress bar uses it)."""
    if cfg.compile or cfg.keep_best or cfg.activation_checkpointing:
        raise ValueError(
            "Fine-tunes train eagerly and keep their last weights: set compile, keep_best and "
            "activation_checkpointing to False in the TrainConfig."
        )

    steps = iter(curve_steps(cfg.max_iters, points))

    def score(m: GPT) -> dict:
        scores = task_scores(m, data, eval_chars, next(m.parameters()).device)
        if on_point is not None:
            on_point(next(steps), cfg.max_iters)
        return scores

    with one_cpu_thread(cfg.device):
        result = train(
            model, data["train"], None, cfg, progress, desc, score=score, score_steps=curve_steps(cfg.max_iters, points)
        )
    curve = [{"step": e["iter"], **{k: v for k, v in e.items() if k not in ("iter", "lr")}} for e in result.evals]
    return TrainedCurve(curve, result.losses, result.seconds)


def _check_arguments(base_model, task, tokenizer, lora, train_config, eval_chars, curve_points) -> None:
    if not isinstance(base_model, GPT):
        raise TypeError(f"base_model must be a lora_lab GPT, got {type(base_model).__name__}.")
    if not isinstance(task, Task):
        raise TypeError(f"task must be a lora_lab.tasks.Task (see tasks.make_task), got {type(task).__name__}.")
    if not isinstance(getattr(tokenizer, "vocab_size", None), int):
        raise TypeError(
            f"tokenizer must be a CharTokenizer (with encode and vocab_size), got {type(tokenizer).__name__}."
        )
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


def finetune(
    base_model: GPT,
    task: Task,
    tokenizer: CharTokenizer,
    lora: LoRAConfig | None = DEFAULT_LORA,
    train_config: TrainConfig | None = None,
    progress: bool = True,
    *,
    eval_chars: int | None = EVAL_CHARS,
    curve_points: int = CURVE_POINTS,
    desc: str | None = None,
    on_point=None,
    score_base: bool = True,
) -> FinetuneResult:
    """Fine-tune a copy of `base_model` on `task.train`: LoRA with `lora`, or every weight if lora is None.

    train_config defaults to `finetune_config(full=lora is None)`. The curve is measured at curve_points
    evenly spaced steps with estimator.task_scores on the first eval_chars characters (None: all); its
    step-0 point is the base. A variant's step 0 need not be the base bit for bit (PiSSA computes
    W x - s B0 A0 x + s B A x), so for a variant the base is scored itself, with the adapters off; score_base=False
    skips that (the protocol scores the base once per comparison) and takes step 0 as the base.
    on_point(step, max_iters) is called after each curve point is measured (RankDashboard's progress bar uses it).
    """
    _check_arguments(base_model, task, tokenizer, lora, train_config, eval_chars, curve_points)
    full = lora is None
    cfg = train_config or finetune_config(full=full)
    device = pick_device(cfg.device)  # fails early on a device that is not there
    data = encode_task(task, tokenizer)
    block = base_model.config.block_size
    short = {name: len(t) for name, t in data.items() if len(t) <= block}
    if short:  # batches are windows of block_size + 1 characters
        raise ValueError(
            f"Task {task.name!r}: text(s) {short} (characters) are too short for the model's "
            f"block_size={block}; each needs more than {block} characters."
        )

    model = copy.deepcopy(base_model).to(device)  # the base itself is never touched
    torch.manual_seed(cfg.seed)  # LoRA's A matrices are drawn from the global RNG
    if full:
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        apply_lora(model, lora)  # a bad target or rank fails here, before any measuring or training
    base_scores = None
    if score_base and not full and lora.variant != "lora":
        set_lora_enabled(model, False)  # with the adapters off, every variant computes exactly the original weights
        base_scores = task_scores(model, data, eval_chars, device)
        set_lora_enabled(model, True)
    trainable = model.num_parameters(trainable_only=True)
    label = method_label(lora)
    # Step 0 of the curve is the untrained copy, which computes exactly the base (B = 0 adds exact zeros).
    trained = train_with_curve(
        model, data, cfg, eval_chars, curve_points, progress, desc or f"{label} on {task.name}", on_point
    )
    curve = trained.curve
    history = TrainResult(
        losses=trained.step_losses,
        seconds=trained.seconds,
        tokens=cfg.max_iters * cfg.batch_size * block,
        evals=[{"iter": p["step"], "train": None, "val": p["target"], "lr": None} for p in curve],
    )
    return FinetuneResult(
        model=model,
        task=task.name,
        method="full" if full else "lora",
        lora=lora,
        train_config=cfg,
        history=history,
        losses={"target": curve[-1]["target"], "source": curve[-1]["source"]},
        base_scores=base_scores or {k: v for k, v in curve[0].items() if k != "step"},
        trainable_params=trainable,
        total_params=model.num_parameters(),
        curve=curve,
    )


def delta_norms(model: GPT, base_model: GPT) -> dict[str, float]:
    """‖ΔW‖_F per adapted (LoRA: the layer's delta_weight) or changed (full FT: W - W0) weight matrix."""
    layers = lora_layers(model)
    if layers:
        return {name: layer.delta_weight().norm().item() for name, layer in layers.items()}
    base = dict(base_model.named_parameters())
    return {
        name: (p - base[name]).norm().item()
        for name, p in model.named_parameters()
        if p.dim() == 2 and name in base and "emb" not in name and "lm_head" not in name
    }

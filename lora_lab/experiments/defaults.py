"""The settings lora_lab uses when you do not say: rates, steps, alpha, targets, and the one training recipe.

They were chosen by running the protocol (benchmarks/bench_protocol.py; the run is recorded in
benchmarks/RESULTS_protocol.md), so the default fine-tune is one of the protocol's runs: LoRA r=8 on the
attention projections, alpha 16, the learning rate the protocol chose for each method on rot13, seed 0.

Alpha follows one rule everywhere: ALPHA = 16 at every rank (LoRAConfig's default, the LoRA paper's and PEFT's
convention). It is not neutral across ranks: the scale alpha / r shrinks as r grows, and the learned ‖ΔW‖_F with
it (studies.norm_by_rank), so a fair rank comparison sweeps the learning rate per rank.
"""

from __future__ import annotations

from ..lora import LoRAConfig
from ..train import TrainConfig

DEFAULT_TASK = "rot13"
DEFAULT_RANK = 8
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
ALPHA = 16.0
STEPS = 200
BATCH_SIZE = 12
SEEDS = (0, 1, 2, 3, 4)  # the protocol's paired seeds, stats.MIN_SEEDS of them; the default fine-tune is seed 0
SELECTION_SEED = 1000  # learning rates are chosen with this seed, never one of the reported ones
LORA_LEARNING_RATES = (2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2)  # factor-2 grids around each method's best
FULL_LEARNING_RATES = (2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3)
LORA_LEARNING_RATE = 8e-3  # chosen from LORA_LEARNING_RATES for LoRA r=8 on rot13
FULL_LEARNING_RATE = 1e-3  # chosen from FULL_LEARNING_RATES for full fine-tuning on rot13
EVAL_CHARS = 8_192  # characters scored exactly per validation text, for every curve point and table
CURVE_POINTS = 5  # evaluations per fine-tune, evenly spaced from step 0 to the last step


def finetune_config(full: bool = False, **overrides) -> TrainConfig:
    """The training recipe of every fine-tune (LoRA, or full with full=True), with fields overridden by keyword.

    The recipe: STEPS steps of BATCH_SIZE sequences at the method's chosen rate, a warmup of 10% of the steps,
    cosine decay to a tenth of the rate, no weight decay for LoRA (its update starts at zero and has nothing to
    decay towards), 0.1 for full fine-tuning. Overriding max_iters also sets the warmup to 10% of it, and
    overriding learning_rate also sets min_lr to a tenth of it, unless those are overridden too.
    """
    settings = dict(
        max_iters=STEPS,
        batch_size=BATCH_SIZE,
        learning_rate=FULL_LEARNING_RATE if full else LORA_LEARNING_RATE,
        weight_decay=0.1 if full else 0.0,
        seed=0,
        device="auto",
    )
    settings.update(overrides)
    steps, lr = settings["max_iters"], settings["learning_rate"]
    if isinstance(steps, int) and not isinstance(steps, bool) and steps > 0:
        settings.setdefault("warmup_iters", steps // 10)
    if isinstance(lr, (int, float)) and not isinstance(lr, bool) and lr > 0:
        settings.setdefault("min_lr", lr / 10)
    return TrainConfig(**settings)  # TrainConfig refuses a bad value, naming the field


FINETUNE_DEFAULTS: dict[str, TrainConfig] = {"lora": finetune_config(), "full": finetune_config(full=True)}


def default_lora_config(r: int = DEFAULT_RANK, targets=DEFAULT_TARGETS, alpha: float | None = None) -> LoRAConfig:
    """The LoRAConfig lora_lab uses when none is given: rank r, alpha ALPHA (16, whatever r) on DEFAULT_TARGETS."""
    targets = (targets,) if isinstance(targets, str) else tuple(targets)  # "q_proj" is one name, not six letters
    return LoRAConfig(r=r, alpha=ALPHA if alpha is None else alpha, targets=targets)

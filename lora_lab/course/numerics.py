"""The numbers the chapters compute and the widgets display: low-rank approximation, parameter counts, training
memory and their formatting. A library module: plain functions and dataclasses, no ipywidgets, no plots.

- Chapter 1: `synthetic_image`, `low_rank_approximation`, `eckart_young_error`, `LowRank` (one SVD, any rank).
- Chapter 2: `lora_params` (one matrix, from the variant's own `parameter_count`), `block_linears` (the shapes of
  one GPT block, read from a model built on the meta device), `lora_parameter_count` and `transformer_lora_params`
  (a whole GPT), `base_parameter_count`, `matrix_counts` and `model_counts` (what the two counters show).
- Chapter 5: `count_training_memory` (one real AdamW step, counted tensor by tensor by experiments.memory's
  ledger, the one counter every chapter uses), `cuda_peak_training_memory`.
- Chapter 7: `SettingResult` (one point of the rank dashboard), `setting_costs` and `setting_memory` (the ledger of
  one training step of the setting: its whole memory).
- Formatting: `format_count`, `format_bytes`, `storage_comparison`.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, fields, replace
from functools import lru_cache

import torch
import torch.nn as nn

from ..devices import autocast_for
from ..experiments.memory import MemoryLedger, memory_ledger
from ..experiments.pretrained import PRESETS
from ..lora import LoRAConfig, apply_lora, variant_class
from ..model import GPT, GPTConfig
from ..storage.adapters import expected_shapes
from ..train import TrainConfig, make_optimizer

FP32_BYTES = 4

# ----------------------------------------------------------------------------------------------------
# Formatting


def _decimal(n: float, units, spacer: str, plain: str) -> str:
    for unit, size in units:
        if abs(n) >= size:
            return f"{n / size:.1f}{spacer}{unit}"
    return f"{n:g}{plain}"


def format_count(n: float) -> str:
    """4718592 -> '4.7M'; 174_600_000_000 -> '174.6B' (decimal units, as papers quote them)."""
    return _decimal(n, (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)), "", "")


def format_bytes(n: float) -> str:
    """Decimal units (1 GB = 1e9 bytes), as the LoRA paper's '350GB -> 35MB' uses."""
    return _decimal(n, (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)), " ", " B")


def storage_comparison(stored: int, full: int) -> str:
    """How `stored` numbers compare with `full`: "8.0x fewer", "1.06x more" or "as many" (never "0.9x fewer")."""
    if stored < full:  # two decimals near 1, where "1.0x fewer" would hide the difference
        return f"{full / stored:.2f}x fewer" if full < 2 * stored else f"{full / stored:.1f}x fewer"
    if stored > full:
        return f"{stored / full:.2f}x more"
    return "as many"


# ----------------------------------------------------------------------------------------------------
# Chapter 1: low-rank approximation


def synthetic_image(n: int = 96) -> torch.Tensor:
    """A deterministic grey-scale picture (n x n, values in [0, 1]): sky, sun, hills and a chequered flag.

    Smooth parts are nearly low-rank; the sun's round edge and the flag need more ranks, which makes the
    rank slider's effect easy to see.
    """
    y = torch.linspace(0, 1, n).unsqueeze(1)  # (n, 1), top to bottom
    x = torch.linspace(0, 1, n).unsqueeze(0)  # (1, n), left to right
    img = 0.35 + 0.45 * y.expand(n, n)  # sky: lighter toward the horizon
    sun = ((x - 0.7) ** 2 + (y - 0.28) ** 2).sqrt() < 0.13
    img = torch.where(sun, torch.ones_like(img), img)
    hills = y > 0.62 + 0.08 * torch.sin(2 * math.pi * 1.5 * x) + 0.04 * torch.sin(2 * math.pi * 4 * x)
    img = torch.where(hills, 0.15 + 0.1 * x.expand(n, n), img)
    flag = (x > 0.12) & (x < 0.32) & (y > 0.18) & (y < 0.34)
    squares = ((x * n // 4 + y * n // 4) % 2).bool()
    img = torch.where(flag & squares, torch.zeros_like(img), img)
    img = torch.where(flag & ~squares, torch.full_like(img, 0.9), img)
    pole = (x > 0.115) & (x < 0.13) & (y > 0.18) & (y < 0.7)
    return torch.where(pole, torch.full_like(img, 0.05), img)


def _require_matrix(matrix) -> None:
    if matrix.dim() != 2:
        raise ValueError(f"Expected a 2-D matrix, got shape {tuple(matrix.shape)}.")


def _truncate(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, r: int) -> torch.Tensor:
    return (U[:, :r] * S[:r]) @ Vh[:r]  # (d, r) scaled by sigma, then (r, k)


def low_rank_approximation(matrix: torch.Tensor, r: int) -> torch.Tensor:
    """The best rank-r approximation of `matrix` (Eckart-Young): keep the r largest singular values."""
    _require_matrix(matrix)
    if not 0 <= r <= min(matrix.shape):
        raise ValueError(f"Rank r={r} must be between 0 and min(d, k) = {min(matrix.shape)}.")
    return _truncate(*torch.linalg.svd(matrix, full_matrices=False), r)


def eckart_young_error(singular_values: torch.Tensor, r: int) -> float:
    """The smallest possible Frobenius error of a rank-r approximation: sqrt(sum of the dropped sigma^2)."""
    return float(singular_values[r:].double().pow(2).sum().sqrt())


@dataclass(frozen=True)
class Truncation:
    """A matrix at rank r: its `approximation`, the measured `error` (Frobenius norm of the difference), the
    `predicted_error` (from the singular values alone), `relative_error`, `stored_numbers` (r * (d + k): the two
    factors) and `compression` (d * k / stored_numbers; below 1 once r > dk/(d+k))."""

    r: int
    approximation: torch.Tensor
    error: float
    predicted_error: float
    relative_error: float
    stored_numbers: int
    compression: float


class LowRank:
    """One SVD of a matrix, truncated at any rank without being recomputed: `LowRank(W).at(r)` is a `Truncation`.

    The SVD is taken in float64, so that the measured error and the one predicted from the singular values agree
    up to rounding."""

    def __init__(self, matrix: torch.Tensor):
        if not isinstance(matrix, torch.Tensor):
            raise ValueError(f"matrix must be a 2-D torch.Tensor, got {type(matrix).__name__}.")
        _require_matrix(matrix)
        self.matrix = matrix.detach().double().cpu()
        self.U, self.S, self.Vh = torch.linalg.svd(self.matrix, full_matrices=False)
        self.norm = float(torch.linalg.matrix_norm(self.matrix))

    def at(self, r: int) -> Truncation:
        d, k = self.matrix.shape
        approximation = _truncate(self.U, self.S, self.Vh, r)
        error = float(torch.linalg.matrix_norm(self.matrix - approximation))
        stored = r * (d + k)
        return Truncation(
            r, approximation, error, eckart_young_error(self.S, r), error / self.norm, stored, d * k / stored
        )


# ----------------------------------------------------------------------------------------------------
# Chapter 2: parameter counts

# The paper's names for the Linear layers of a block.
PAPER_NAMES = {"q_proj": "Wq", "k_proj": "Wk", "v_proj": "Wv", "o_proj": "Wo", "up_proj": "W_up", "down_proj": "W_down"}

# Models the counter can start from: lora_lab's presets and two published configurations (GPT-2 small; GPT-3
# 175B as in Brown et al. 2020, Table 2.1). Every count below is read from GPT(config), never typed by hand.
MODEL_CONFIGS = {
    "lora_lab tiny": PRESETS["tiny"][0],
    "lora_lab small": PRESETS["small"][0],
    "GPT-2 small": GPTConfig(
        vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768, bias=True, positions="learned"
    ),
    "GPT-3 175B": GPTConfig(
        vocab_size=50257, block_size=2048, n_layer=96, n_head=96, n_embd=12288, bias=True, positions="learned"
    ),
}


def _one_block(config: GPTConfig) -> tuple[tuple[tuple[str, int, int], ...], int, int]:
    """(Linear layers of a block as (short name, d, k), parameters of one block, parameters of a 1-block GPT)."""
    # Every block of GPT(config) is built from the same config, so one block tells the shapes of all of them.
    return _one_block_model(replace(config, n_layer=1))


@lru_cache(maxsize=64)
def _one_block_model(config: GPTConfig) -> tuple[tuple[tuple[str, int, int], ...], int, int]:
    # The meta device holds shapes only: no memory and no random numbers, even at GPT-3's width.
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        model = GPT(config)
    block = model.blocks[0]
    linears = tuple(
        (name.rpartition(".")[2], m.out_features, m.in_features)
        for name, m in block.named_modules()
        if isinstance(m, nn.Linear)
    )
    return linears, sum(p.numel() for p in block.parameters()), model.num_parameters()


def block_linears(config: GPTConfig | None = None) -> dict[str, tuple[int, int]]:
    """{name: (d, k)} (out, in) of every Linear layer LoRA can target in one block of GPT(config)."""
    return {name: (d, k) for name, d, k in _one_block(config or GPTConfig())[0]}


def base_parameter_count(config: GPTConfig) -> int:
    """All parameters of GPT(config), counted on a model built on the meta device (the tied head once)."""
    _, per_block, one_block_model = _one_block(config)
    return one_block_model + (config.n_layer - 1) * per_block


def lora_params(d: int, k: int, r: int, variant: str = "lora") -> int:
    """Trainable numbers a LoRA variant adds to one d x k matrix: r(d+k) for LoRA (B is d x r, A is r x k).
    Asked of the variant class itself (`parameter_count`), never re-typed here."""
    return variant_class(variant).parameter_count(d, k, r)


def lora_parameter_count(config: GPTConfig, r: int, targets, variant: str = "lora") -> int:
    """LoRA's trainable parameters in GPT(config) with rank r on the named Linear layers of every block."""
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    shapes = block_linears(config)
    unknown = sorted(set(targets) - set(shapes))
    if unknown:
        raise ValueError(f"Unknown target(s) {unknown}; choose from {list(shapes)}.")
    return config.n_layer * sum(lora_params(*shapes[t], r, variant) for t in targets)


def transformer_lora_params(n_layer: int, d_model: int, r: int, targets, variant: str = "lora") -> int:
    """LoRA parameters for a lora_lab GPT of this depth and width, with rank r on the named Linear layers per block."""
    # Only the block's Linear shapes matter: one head and a learned position table keep every width valid.
    config = GPTConfig(vocab_size=1, block_size=1, n_layer=n_layer, n_head=1, n_embd=d_model, positions="learned")
    return lora_parameter_count(config, r, targets, variant)


@dataclass(frozen=True)
class MatrixCounts:
    """One d x k matrix at rank r: `full_params` (d*k), `lora_params` (r*(d+k)), `ratio` (full / lora),
    `break_even_rank` (dk/(d+k), where the two counts would be equal) and `last_saving_rank` (the largest whole r
    with r(d+k) < dk; from `last_saving_rank + 1` on LoRA stores as many numbers or more)."""

    full_params: int
    lora_params: int
    ratio: float
    break_even_rank: float
    last_saving_rank: int


def matrix_counts(d: int, k: int, r: int) -> MatrixCounts:
    full, lora = d * k, lora_params(d, k, r)
    # Past r = d*k/(d+k) the "low-rank" update has more numbers than the matrix itself.
    return MatrixCounts(full, lora, full / lora, d * k / (d + k), (d * k - 1) // (d + k))


@dataclass(frozen=True)
class ModelCounts:
    """A whole GPT with LoRA: `base_params` (all weights), `lora_params`, `fraction` (lora / base: the base's weights
    are the denominator, unlike `parameter_report`'s trainable_fraction, which divides by base + LoRA), and
    `full_checkpoint_bytes` and `adapter_bytes` at the given bytes per parameter."""

    base_params: int
    lora_params: int
    fraction: float
    full_checkpoint_bytes: int
    adapter_bytes: int


def model_counts(config: GPTConfig, r: int, targets, bytes_per_param: int) -> ModelCounts:
    base, lora = base_parameter_count(config), lora_parameter_count(config, r, targets)
    return ModelCounts(base, lora, lora / base, base * bytes_per_param, lora * bytes_per_param)


# ----------------------------------------------------------------------------------------------------
# Chapter 5: training memory, counted from the tensors themselves


@dataclass(frozen=True)
class TrainingMemory:
    """Bytes one training step keeps alive, counted tensor by tensor (not a process-level measurement).

    activations: tensors autograd saved for the backward pass (parameters excluded, shared storage counted
    once); gradients: the .grad of every trainable parameter; optimizer: every tensor in the optimizer state;
    buffers: the model's tensors that are not parameters (rotary tables). The memory ledger's kinds, in the
    names chapter 5 uses (experiments.memory.MemoryLedger has the rest).
    """

    frozen_weights: int
    trainable_weights: int
    activations: int
    gradients: int
    optimizer: int
    buffers: int = 0

    @property
    def total(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self))

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)} | {"total": self.total}


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def count_training_memory(
    model: GPT, x: torch.Tensor, y: torch.Tensor, train_config: TrainConfig | None = None
) -> TrainingMemory:
    """Run one real AdamW step of `model` on (x, y) and count the bytes of what it allocated: the memory
    ledger (experiments.memory.memory_ledger) in chapter 5's five rows.

    The step changes the model (it trains it), so pass a copy if the model matters afterwards.
    """
    ledger = memory_ledger(model, int(x.shape[0]), int(x.shape[1]), batch=(x, y), train_config=train_config)
    return TrainingMemory(
        frozen_weights=ledger.frozen_weights,
        trainable_weights=ledger.trainable_weights,
        activations=ledger.activations,
        gradients=ledger.gradients,
        optimizer=ledger.optimizer_state,
        buffers=ledger.buffers,
    )


def cuda_peak_training_memory(
    model: GPT, x: torch.Tensor, y: torch.Tensor, train_config: TrainConfig | None = None, steps: int = 2
) -> int:
    """Peak bytes torch.cuda.max_memory_allocated reports over `steps` AdamW steps (bf16 autocast as in training).

    The model and batch must already be on the GPU; the peak includes the model's weights.
    """
    if x.device.type != "cuda":
        raise ValueError("cuda_peak_training_memory needs the model and the batch on a CUDA device.")
    cfg = train_config or TrainConfig()
    device = x.device
    model.train()
    optimizer = make_optimizer(model, cfg)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    for _ in range(steps):  # the first step allocates AdamW's state; the second runs with it in place
        with autocast_for(device, cfg.bf16):
            _, loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)


# ----------------------------------------------------------------------------------------------------
# Chapter 7: settings of the rank dashboard

# The matrices a LoRA setting can adapt, by the paper's names.
TARGET_GROUPS = {
    "Wq": ("q_proj",),
    "Wk": ("k_proj",),
    "Wv": ("v_proj",),
    "Wo": ("o_proj",),
    "MLP": ("up_proj", "down_proj"),
}


@dataclass(frozen=True)
class SettingResult:
    """One point of the dashboard: a LoRA setting (or full fine-tuning, r=None) and what it cost and reached."""

    r: int | None
    groups: tuple[str, ...]
    trainable_params: int
    adapter_bytes: int  # fp32 tensors the setting saves: A and B (the whole model for full fine-tuning)
    optimizer_bytes: int  # what training adds per trainable weight: its gradient and AdamW's two moments
    target_loss: float
    source_loss: float
    variant: str = "lora"
    step_bytes: int = 0  # the whole memory of one training step (setting_memory's ledger total); 0: not counted

    @property
    def label(self) -> str:
        if self.r is None:
            return "full FT"
        return f"{'' if self.variant == 'lora' else self.variant + ' '}r={self.r} {'+'.join(self.groups)}"


def setting_costs(config: GPTConfig, lora: LoRAConfig | None) -> tuple[int, int, int]:
    """(trainable numbers, fp32 bytes the setting saves, fp32 bytes of gradients + AdamW's two moments) of GPT(config)
    fine-tuned with `lora`, or fully (lora=None: every weight trains and the whole model is saved)."""
    if lora is None:
        trainable = base_parameter_count(config)
        stored = trainable
    else:
        trainable = lora_parameter_count(config, lora.r, lora.targets, lora.variant)
        # what the adapter file holds: the trainable tensors plus a variant's saved frozen ones
        with torch.device("meta"):
            shapes = expected_shapes(GPT(config), lora)
        stored = sum(math.prod(shape) for shape in shapes.values())
    return trainable, stored * FP32_BYTES, trainable * 3 * FP32_BYTES


def setting_memory(base_model: GPT, lora: LoRAConfig | None, batch_size: int, seq_len: int) -> MemoryLedger:
    """The memory ledger of one AdamW step of the setting (full fine-tuning for lora=None) at this batch size and
    sequence length: frozen and trainable weights, gradients, optimizer state and activations, all of it.

    Counted on a CPU copy of `base_model` (the model itself is not changed); the count is the same on any machine."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # apply_lora draws A: the count does not depend on it, the caller's stream stays put
        model = copy.deepcopy(base_model).cpu()
        model = model.requires_grad_(True) if lora is None else apply_lora(model, lora)
    return memory_ledger(model, batch_size, seq_len)

"""A readable training loop: AdamW, linear warmup + cosine decay, gradient clipping, periodic
train/val loss estimates and a tqdm bar. Trains whatever parameters have requires_grad=True, so the
same loop pretrains the GPT, fully fine-tunes it, or trains only LoRA's A and B.
"""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from .data import get_batch

DEVICES = ("auto", "cpu", "cuda", "mps")


def pick_device(device: str | None = "auto") -> torch.device:
    """'auto' picks cuda, then mps, then cpu. Asking for a device that is not there is an error."""
    device = device or "auto"
    kind = str(device).split(":")[0]
    if kind not in DEVICES:
        raise ValueError(f"Unknown device {device!r}; choose one of {', '.join(DEVICES)} (e.g. 'cuda:1').")
    if kind == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError("Device 'cuda' was requested but torch sees no CUDA GPU.")
    if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError("Device 'mps' was requested but this machine has no usable MPS backend.")
    return torch.device(device)


def autocast_for(device: torch.device, use_bf16: bool = True):
    """bf16 autocast on CUDA GPUs that support it; plain fp32 elsewhere."""
    if use_bf16 and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return nullcontext()


@dataclass
class TrainConfig:
    max_iters: int = 2000
    batch_size: int = 12
    learning_rate: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    lr_decay_iters: int | None = None  # None: decay over max_iters
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # 0 disables clipping
    eval_interval: int = 250
    eval_iters: int = 20
    seed: int = 1337
    device: str = "auto"
    bf16: bool = True  # bf16 autocast, used on CUDA only

    def __post_init__(self):
        for name in ("max_iters", "batch_size", "eval_interval", "eval_iters"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"TrainConfig.{name} must be a positive integer, got {value!r}.")
        if self.warmup_iters < 0:
            raise ValueError(f"TrainConfig.warmup_iters must be >= 0, got {self.warmup_iters}.")
        if not self.learning_rate > 0 or self.min_lr < 0:
            raise ValueError("TrainConfig.learning_rate must be > 0 and min_lr >= 0.")
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError("TrainConfig.grad_clip and weight_decay must be >= 0.")
        if str(self.device).split(":")[0] not in DEVICES:
            raise ValueError(f"Unknown device {self.device!r}; choose one of {', '.join(DEVICES)}.")

    def to_dict(self) -> dict:
        return asdict(self)


def learning_rate_at(it: int, cfg: TrainConfig) -> float:
    """Linear warmup to learning_rate, then cosine decay to min_lr at lr_decay_iters."""
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it >= decay_iters:
        return cfg.min_lr
    progress = (it - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over trainable parameters; matrices get weight decay, vectors (biases, norms) do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("The model has no trainable parameters (every requires_grad is False).")
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2)
    )


@torch.no_grad()
def estimate_loss(
    model: torch.nn.Module,
    splits: dict[str, torch.Tensor],
    batch_size: int,
    eval_iters: int,
    seed: int = 0,
    device: torch.device | str = "cpu",
    use_bf16: bool = True,
) -> dict[str, float]:
    """Mean loss over eval_iters seeded batches per split; the same seed gives the same batches."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    block_size = model.config.block_size
    out = {}
    for name, data in splits.items():
        gen = torch.Generator().manual_seed(seed)
        total = 0.0
        for _ in range(eval_iters):
            x, y = get_batch(data, batch_size, block_size, gen)
            with autocast_for(device, use_bf16):
                _, loss = model(x.to(device), y.to(device))
            total += loss.item()
        out[name] = total / eval_iters
    model.train(was_training)
    return out


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)  # training loss at every step
    evals: list[dict] = field(default_factory=list)  # {"iter", "train", "val", "lr"} at each evaluation
    seconds: float = 0.0  # wall time of the training steps, evaluations excluded
    tokens: int = 0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else float("nan")

    @property
    def final(self) -> dict:
        return self.evals[-1] if self.evals else {}

    def to_dict(self) -> dict:
        return {"losses": self.losses, "evals": self.evals, "seconds": self.seconds, "tokens": self.tokens}


def train(
    model: torch.nn.Module,
    train_data: torch.Tensor,
    val_data: torch.Tensor | None,
    cfg: TrainConfig,
    progress: bool = True,
    desc: str = "training",
) -> TrainResult:
    """Train `model` in place on 1-D token tensors and return the loss history.

    On CPU the same cfg.seed gives bit-identical results: batches come from a seeded generator and
    dropout from the seeded global RNG.
    """
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    batch_gen = torch.Generator().manual_seed(cfg.seed)
    model.to(device).train()
    optimizer = make_optimizer(model, cfg)
    trainable = [p for g in optimizer.param_groups for p in g["params"]]
    block_size = model.config.block_size
    eval_splits = {"train": train_data} if val_data is None else {"train": train_data, "val": val_data}
    result = TrainResult()

    def evaluate(it: int, lr: float):
        est = estimate_loss(model, eval_splits, cfg.batch_size, cfg.eval_iters, cfg.seed + 1, device, cfg.bf16)
        result.evals.append({"iter": it, "train": est["train"], "val": est.get("val"), "lr": lr})

    bar = tqdm(range(cfg.max_iters), desc=desc, disable=not progress, leave=True, mininterval=0.5)
    for it in bar:
        lr = learning_rate_at(it, cfg)
        if it % cfg.eval_interval == 0:
            evaluate(it, lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        t0 = time.perf_counter()
        x, y = get_batch(train_data, cfg.batch_size, block_size, batch_gen)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast_for(device, cfg.bf16):
            _, loss = model(x, y)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = loss.item()  # also waits for the GPU, so the timing below is honest
        result.seconds += time.perf_counter() - t0
        result.tokens += x.numel()
        result.losses.append(loss_value)
        if progress and (it % 10 == 0 or it == cfg.max_iters - 1):
            bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.1e}")
    evaluate(cfg.max_iters, learning_rate_at(cfg.max_iters, cfg))
    model.eval()
    return result

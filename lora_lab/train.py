"""A readable training loop: AdamW, linear warmup + cosine decay, gradient clipping, periodic
train/val loss estimates and a tqdm bar. Trains whatever parameters have requires_grad=True, so the
same loop pretrains the GPT, fully fine-tunes it, or trains only LoRA's A and B.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from .data import get_batch
from .devices import DEVICES, autocast_for, fast_fp32_matmuls, pick_device
from .distributed import (
    data_parallel,
    data_parallel_model,
    effective_batch_note,
    from_main,
    mean_over_ranks,
    rank_device,
    rank_seed,
    say,
)
from .graphs import WholeStepGraph, graph_problem, make_capturable, set_learning_rate
from .lora import lora_plus_parameters
from .tensorboard_logs import check_log_dir, open_run_log, require_tensorboard


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


MAX_SEED = 2**63 - 1  # torch takes 64-bit seeds; training adds the process rank and 1 to it
FLOAT32_RANGE = (torch.finfo(torch.float32).tiny, torch.finfo(torch.float32).max)  # positive normal float32 numbers


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
    bf16: bool = True  # bf16 autocast on CUDA, and on CPUs with native bf16 matmuls (see autocast_for)
    # Speed switches: none of them changes what is trained for, only how fast and in how much memory.
    # torch.compile the model. Off by default: compiling takes ~30-60 s, and at the H100 figures for the
    # 10.65M model (20.3 -> 14.5 ms/step) that pays back only after ~5000 steps; bench_gpu.py measures both.
    compile: bool = False
    # CUDA only: capture the whole step (forward, backward, clipping, AdamW) as one CUDA graph and replay it, so a
    # step launches once instead of once per kernel (lora_lab.graphs). Warm-up: 3 eager steps and one capture
    # (about one more step's time) per train() call. Elsewhere it trains eagerly and says why in result.notes.
    cuda_graphs: bool = False
    fused_optimizer: bool | None = None  # one-kernel AdamW; None: wherever torch supports it (CUDA; CPU from 2.4)
    activation_checkpointing: bool = False  # recompute each block in backward: less memory, ~30% more compute
    log_interval: int = 10  # read the loss from the device every this many steps (each read waits for it)
    keep_best: bool = False  # end with the weights of the best validation evaluation, not the last step's
    # LoRA+ (Hayou et al. 2024): B (each variant's lora_plus_names) learns at this many times A's rate; None: off
    lora_plus_ratio: float | None = None
    # TensorBoard: write this run's loss, learning rate, gradient norm and evaluations into this folder (see
    # lora_lab.tensorboard_logs; needs the tensorboard extra). Where a run logs is not what it trains: to_dict
    # leaves it out, so it never enters a cache key.
    log_dir: str | os.PathLike | None = None

    def __post_init__(self):
        for name in ("max_iters", "batch_size", "eval_interval", "eval_iters", "log_interval"):
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                raise ValueError(f"TrainConfig.{name} must be a positive integer, got {value!r}.")
        if not _is_int(self.warmup_iters) or self.warmup_iters < 0:
            raise ValueError(f"TrainConfig.warmup_iters must be an integer >= 0, got {self.warmup_iters!r}.")
        if self.lr_decay_iters is not None and (not _is_int(self.lr_decay_iters) or self.lr_decay_iters <= 0):
            raise ValueError(
                f"TrainConfig.lr_decay_iters must be a positive integer or None, got {self.lr_decay_iters!r}."
            )
        if not _is_int(self.seed) or not 0 <= self.seed <= MAX_SEED:  # torch seeds are 64-bit; ranks add to it
            raise ValueError(f"TrainConfig.seed must be an integer from 0 to 2**63 - 1, got {self.seed!r}.")
        if not _is_finite_number(self.learning_rate) or self.learning_rate <= 0:
            raise ValueError(f"TrainConfig.learning_rate must be a finite number > 0, got {self.learning_rate!r}.")
        if not FLOAT32_RANGE[0] <= self.learning_rate <= FLOAT32_RANGE[1]:  # the optimizer steps in float32
            raise ValueError(
                f"TrainConfig.learning_rate must be representable in float32, from {FLOAT32_RANGE[0]:.3g} to "
                f"{FLOAT32_RANGE[1]:.3g}, got {self.learning_rate!r}."
            )
        if not _is_finite_number(self.min_lr) or self.min_lr < 0:
            raise ValueError(f"TrainConfig.min_lr must be a finite number >= 0, got {self.min_lr!r}.")
        if self.min_lr > self.learning_rate:
            raise ValueError(
                f"TrainConfig.min_lr={self.min_lr!r} is above learning_rate={self.learning_rate!r}: the schedule "
                "decays from learning_rate down to min_lr."
            )
        for name in ("grad_clip", "weight_decay"):
            value = getattr(self, name)
            if not _is_finite_number(value) or value < 0:
                raise ValueError(f"TrainConfig.{name} must be a finite number >= 0, got {value!r}.")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not _is_finite_number(value) or not 0 <= value < 1:
                raise ValueError(f"TrainConfig.{name} must be in [0, 1), got {value!r}.")
        for name in ("bf16", "compile", "cuda_graphs", "activation_checkpointing", "keep_best"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"TrainConfig.{name} must be True or False, got {getattr(self, name)!r}.")
        if not (self.fused_optimizer is None or isinstance(self.fused_optimizer, bool)):
            raise ValueError(
                f"TrainConfig.fused_optimizer must be True, False or None (automatic), got {self.fused_optimizer!r}."
            )
        if self.lora_plus_ratio is not None and (
            not _is_finite_number(self.lora_plus_ratio) or self.lora_plus_ratio <= 0
        ):
            raise ValueError(
                f"TrainConfig.lora_plus_ratio must be None (off) or a finite number > 0 (LoRA+ "
                f"suggests 16), got {self.lora_plus_ratio!r}."
            )
        if self.lora_plus_ratio is not None and not self.learning_rate * self.lora_plus_ratio <= FLOAT32_RANGE[1]:
            raise ValueError(
                f"TrainConfig.lora_plus_ratio {self.lora_plus_ratio!r} times learning_rate {self.learning_rate!r} "
                f"(B's learning rate) is beyond float32's {FLOAT32_RANGE[1]:.3g}."
            )
        if not isinstance(self.device, str) or self.device.split(":")[0] not in DEVICES:
            raise ValueError(f"Unknown device {self.device!r}; choose one of {', '.join(DEVICES)}.")
        if self.log_dir is not None:
            check_log_dir(self.log_dir)
            require_tensorboard()  # a missing extra is named now, before anything trains

    def to_dict(self) -> dict:
        # what is trained, not where it logs; cuda_graphs only when on, so that keys made before it existed still hold
        return {k: v for k, v in asdict(self).items() if k != "log_dir" and (k != "cuda_graphs" or v)}


def learning_rate_at(it: int, cfg: TrainConfig) -> float:
    """Linear warmup to learning_rate, then cosine decay to min_lr at lr_decay_iters."""
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it >= decay_iters:
        return cfg.min_lr
    progress = (it - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


class LoRAPlusAdamW(torch.optim.AdamW):
    """AdamW whose parameter groups carry an `lr_scale`: each step uses group["lr"] * lr_scale. Any training
    loop may set group["lr"] to the schedule's rate for every group; LoRA+'s ratio for B still holds."""

    def step(self, closure=None):
        scheduled = [g["lr"] for g in self.param_groups]
        for g in self.param_groups:
            g["lr"] = g["lr"] * g.get("lr_scale", 1.0)
        try:
            return super().step(closure)
        finally:
            for g, lr in zip(self.param_groups, scheduled):
                g["lr"] = lr


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over trainable parameters; matrices get weight decay, vectors (biases, norms) do not.

    With cfg.lora_plus_ratio (LoRA+), each LoRA layer's B (its variant's `lora_plus_names`) gets its own groups
    with lr_scale = the ratio, applied at every step by LoRAPlusAdamW.

    fused_optimizer=None uses torch's fused AdamW wherever it runs (one kernel for all parameters instead of a
    dozen per tensor: 4x less optimizer time on this project's CPU, see benchmarks/RESULTS_pretrain.md)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("The model has no trainable parameters (every requires_grad is False).")
    fast = {id(p) for p in lora_plus_parameters(model)} if cfg.lora_plus_ratio is not None else set()
    if cfg.lora_plus_ratio is not None and not fast:
        raise ValueError(
            "TrainConfig.lora_plus_ratio is set, but the model has no LoRA B tensors to speed up "
            "(LoRA+ needs apply_lora first)."
        )
    groups = [  # lr_scale: the schedule's learning rate is multiplied by it (LoRA+: B's groups)
        {"params": [p for p in params if p.dim() >= 2 and id(p) not in fast], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2 and id(p) not in fast], "weight_decay": 0.0},
        {"params": [p for p in params if p.dim() >= 2 and id(p) in fast], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2 and id(p) in fast], "weight_decay": 0.0},
    ]
    for g in groups[2:]:
        g["lr_scale"] = cfg.lora_plus_ratio
    groups = [g for g in groups if g["params"]]
    kwargs = dict(lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2))
    adamw = torch.optim.AdamW if cfg.lora_plus_ratio is None else LoRAPlusAdamW
    if cfg.fused_optimizer is False:
        return adamw(groups, **kwargs)
    try:
        return adamw(groups, **kwargs, fused=True)
    except (RuntimeError, TypeError) as err:  # this torch has no fused AdamW for these tensors' device or dtype
        if cfg.fused_optimizer:
            raise ValueError(
                f"TrainConfig.fused_optimizer=True, but this torch cannot fuse AdamW here: {err}"
            ) from None
        return adamw(groups, **kwargs)


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
        losses = []
        for _ in range(eval_iters):
            x, y = get_batch(data, batch_size, block_size, gen)
            with autocast_for(device, use_bf16):
                _, loss = model(x.to(device), y.to(device))
            losses.append(loss.float())
        out[name] = torch.stack(losses).mean().item()  # one wait for the device per split, not one per batch
    model.train(was_training)
    return out


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)  # training loss at every step
    evals: list[dict] = field(default_factory=list)  # {"iter", "train", "val", "lr"} at each evaluation
    seconds: float = 0.0  # wall time of the training steps, evaluations excluded
    tokens: int = 0
    best_iter: int | None = None  # keep_best: the step whose weights the model ends with (None: the last)
    notes: list[str] = field(default_factory=list)  # e.g. why torch.compile was not used
    gradient_bytes_per_step: float | None = None  # data-parallel runs: bytes each rank all-reduced per step

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else float("nan")

    @property
    def final(self) -> dict:
        """The evaluation of the weights the model ends with: the best one under keep_best, else the last."""
        if self.best_iter is not None:
            return next(e for e in self.evals if e["iter"] == self.best_iter)
        return self.evals[-1] if self.evals else {}

    def to_dict(self) -> dict:
        return {
            "losses": self.losses,
            "evals": self.evals,
            "seconds": self.seconds,
            "tokens": self.tokens,
            "best_iter": self.best_iter,
            "notes": self.notes,
        }


class BatchSampler:
    """get_batch's seeded windows, cut on the device: the token tensor moves to the device once, and each
    step sends only batch_size start offsets (pinned, asynchronously on CUDA), so sampling never waits for
    the GPU. The same generator gives the same batches as get_batch.

    Given a list of N generators, each draws batch_size/N rows in turn: one process then builds exactly the
    global batch of N data-parallel ranks (rank r's rows from its own generator)."""

    def __init__(
        self,
        data: torch.Tensor,
        batch_size: int,
        block_size: int,
        generator: torch.Generator | list[torch.Generator],
        device: torch.device,
    ):
        if len(data) <= block_size:
            raise ValueError(f"Need more than block_size={block_size} tokens, the data has {len(data)}.")
        self.generators = [generator] if isinstance(generator, torch.Generator) else list(generator)
        if batch_size % len(self.generators):
            raise ValueError(f"batch_size={batch_size} does not split evenly over {len(self.generators)} generators.")
        self.data = data.to(device)
        self.offsets = torch.arange(block_size + 1, device=device)  # x and y in one gather
        self.batch_size, self.block_size, self.device = batch_size, block_size, device

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor]:
        share = self.batch_size // len(self.generators)
        ix = torch.cat(
            [torch.randint(len(self.data) - self.block_size, (share,), generator=g) for g in self.generators]
        )
        if self.device.type == "cuda":
            ix = ix.pin_memory().to(self.device, non_blocking=True)
        window = self.data[ix[:, None] + self.offsets]  # (B, T + 1)
        return window[:, :-1], window[:, 1:]


def compiled_or_eager(model: torch.nn.Module, wanted: bool, notes: list[str]):
    """torch.compile(model) when wanted, else the model itself. Compilation itself happens at the first
    call; train() falls back to eager there if it fails."""
    if not wanted:
        return model
    if not hasattr(torch, "compile"):
        notes.append(f"torch.compile is not in torch {torch.__version__}; trained eagerly.")
        return model
    return torch.compile(model)


def train(
    model: torch.nn.Module,
    train_data: torch.Tensor,
    val_data: torch.Tensor | None,
    cfg: TrainConfig,
    progress: bool = True,
    desc: str = "training",
    *,
    emulate_ranks: int = 1,
    score: Callable[[torch.nn.Module], dict] | None = None,
    score_steps: Iterable[int] | None = None,
) -> TrainResult:
    """Train `model` in place on 1-D token tensors and return the loss history.

    On CPU the same cfg.seed gives bit-identical results: batches come from a seeded generator and
    dropout from the seeded global RNG. The loss is read from the device every cfg.log_interval steps (each
    read makes the CPU wait for the GPU); every step's loss is still recorded. With cfg.keep_best the model
    ends with the weights of its best validation evaluation, and result.best_iter says which step that was.

    Under torchrun (see lora_lab.distributed) the model is wrapped in DDP after its trainable set is final
    (apply LoRA first); rank r samples cfg.batch_size rows per step from seed + r, so the effective batch is
    cfg.batch_size x world size; losses are averaged over ranks, only rank 0 evaluates and shows progress.
    `emulate_ranks=N` makes one process draw each batch as N such ranks would (cfg.batch_size/N rows each),
    reproducing their global batch exactly.

    `score(model) -> dict` replaces the sampled loss estimate at each evaluation, at `score_steps` (0 to
    max_iters) instead of every eval_interval: how lora_lab.protocol draws its curves with its own estimator
    while training through this one loop (under torchrun every rank scores its identical replica).
    """
    if not _is_int(emulate_ranks) or emulate_ranks <= 0 or cfg.batch_size % emulate_ranks:
        raise ValueError(
            f"emulate_ranks must be a positive integer dividing batch_size={cfg.batch_size}, got {emulate_ranks!r}."
        )
    if score is not None and (cfg.keep_best or score_steps is None):
        raise ValueError(
            "train(score=...) needs score_steps, and keep_best picks by the built-in estimate: "
            "pass score_steps and set keep_best=False."
        )
    if cfg.keep_best and val_data is None:
        raise ValueError("TrainConfig.keep_best needs validation data to pick the best weights; val_data is None.")
    if cfg.activation_checkpointing and not hasattr(model, "activation_checkpointing"):
        raise ValueError(f"TrainConfig.activation_checkpointing: {type(model).__name__} has no such switch (GPT has).")
    run = data_parallel()  # None: a single process, trained exactly as without torchrun
    if run is not None and emulate_ranks != 1:
        raise ValueError("emulate_ranks is for a single process; under torchrun each rank samples its own rows.")
    rank = run.rank if run else 0
    progress = progress and (run is None or run.is_main)
    device = rank_device(pick_device(cfg.device), run)
    torch.manual_seed(rank_seed(cfg.seed, rank))
    batch_gens = [torch.Generator().manual_seed(rank_seed(cfg.seed, rank + r)) for r in range(emulate_ranks)]
    next_batch = BatchSampler(train_data, cfg.batch_size, model.config.block_size, batch_gens, device)
    model.to(device).train()
    optimizer = make_optimizer(model, cfg)
    trainable = [p for g in optimizer.param_groups for p in g["params"]]
    eval_splits = {"train": train_data} if val_data is None else {"train": train_data, "val": val_data}
    result = TrainResult()
    # trained: what each step calls (DDP around model under torchrun, else model itself)
    trained, traffic = data_parallel_model(model, run, device, next_batch.data[: model.config.block_size + 1][None])
    if run is not None:
        result.notes.append(effective_batch_note(cfg.batch_size, run))
    forward = compiled_or_eager(trained, cfg.compile, result.notes)
    best_val, best_weights = math.inf, None
    pending: list[torch.Tensor] = []  # losses still on the device, read in one go every log_interval steps
    pending_norms: list[torch.Tensor] = []  # with a TensorBoard log: each step's gradient norm, read with them
    tb_log = None  # opened just before the first step (rank 0 only), closed after the last

    eval_steps = (
        set(range(0, cfg.max_iters, cfg.eval_interval)) | {cfg.max_iters}
        if score is None
        else {int(s) for s in score_steps}
    )

    def evaluate(it: int, lr: float):
        nonlocal best_val, best_weights
        if it not in eval_steps:
            return
        if score is not None:
            result.evals.append({"iter": it, **score(model), "lr": lr})  # every rank: identical replicas
            if tb_log is not None:
                tb_log.evaluation(it, result.evals[-1])
            model.train()
            return
        if run is None:
            est = estimate_loss(model, eval_splits, cfg.batch_size, cfg.eval_iters, cfg.seed + 1, device, cfg.bf16)
        else:  # rank 0 evaluates batches of the effective size; every rank gets the numbers (keep_best agrees)
            est = (
                estimate_loss(
                    model, eval_splits, cfg.batch_size * run.world_size, cfg.eval_iters, cfg.seed + 1, device, cfg.bf16
                )
                if run.is_main
                else {}
            )
            numbers = from_main(
                torch.tensor([est.get("train", 0.0), est.get("val", math.nan)], dtype=torch.float64), run
            ).tolist()
            est = {"train": numbers[0], **({} if val_data is None else {"val": numbers[1]})}
        result.evals.append({"iter": it, "train": est["train"], "val": est.get("val"), "lr": lr})
        if tb_log is not None:
            tb_log.evaluation(it, result.evals[-1])
        if cfg.keep_best and est["val"] < best_val:  # a copy of the trainable weights only: small for LoRA
            best_val, result.best_iter = est["val"], it
            best_weights = [p.detach().clone() for p in trainable]

    def read_losses(t0: float) -> float:
        """Wait for the device, move the pending losses into result.losses (and the log); returns the time now."""
        first = len(result.losses)
        if pending:
            result.losses.extend(mean_over_ranks(torch.stack(pending), run).tolist())
            pending.clear()
        elif device.type == "cuda":
            torch.cuda.synchronize(device)
        now = time.perf_counter()
        result.seconds += now - t0
        if tb_log is None or not pending_norms:
            return now
        norms = torch.stack(pending_norms).tolist()  # computed before the losses just waited for: ready
        pending_norms.clear()
        steps = range(first, len(result.losses))
        tb_log.steps(first, result.losses[first:], [learning_rate_at(i, cfg) for i in steps], norms)
        return time.perf_counter()  # the time spent logging is not training time

    def step(x: torch.Tensor, y: torch.Tensor, run) -> torch.Tensor:
        with autocast_for(device, cfg.bf16):
            _, loss = run(x, y)
        loss.backward()
        norm = None
        if cfg.grad_clip:  # the norm before clipping: clip_grad_norm_ computes it anyway
            norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
        elif tb_log is not None:  # no clipping: computed only for the log (after DDP's all-reduce: same on every rank)
            norms = [torch.linalg.vector_norm(p.grad) for p in trainable if p.grad is not None]
            norm = torch.linalg.vector_norm(torch.stack(norms)) if norms else loss.new_zeros(())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if tb_log is not None:
            pending_norms.append(norm.detach())
        return loss.detach()

    def run_steps():
        nonlocal forward
        graphed = None  # cfg.cuda_graphs: the whole step captured once, then replayed (lora_lab.graphs)
        if cfg.cuda_graphs:
            problem = graph_problem(device, run is not None, cfg.activation_checkpointing, tb_log is not None)
            if problem:
                result.notes.append(problem)
            else:
                make_capturable(optimizer, device)
                graphed = WholeStepGraph(lambda x, y: step(x, y, forward), optimizer, result.notes)
        t0 = time.perf_counter()
        for it in bar:
            lr = learning_rate_at(it, cfg)
            if it in eval_steps:
                read_losses(t0)
                evaluate(it, lr)
                t0 = time.perf_counter()
            set_learning_rate(optimizer, lr)  # in place where a captured step reads it from a tensor
            x, y = next_batch()
            if forward is not trained and it == 0:
                try:  # torch.compile compiles here, at the first call; a failure falls back to eager
                    loss = step(x, y, forward)
                except Exception as err:  # noqa: BLE001 (dynamo/inductor raise many kinds; eager re-raises real ones)
                    optimizer.zero_grad(set_to_none=True)
                    result.notes.append(f"torch.compile failed ({type(err).__name__}); trained eagerly.")
                    forward = trained
                    loss = step(x, y, forward)
            else:
                loss = step(x, y, forward) if graphed is None else graphed(x, y)
            pending.append(loss)
            result.tokens += x.numel() * (run.world_size if run else 1)
            if (it + 1) % cfg.log_interval == 0 or it == cfg.max_iters - 1:
                t0 = read_losses(t0)
                if progress:
                    bar.set_postfix(loss=f"{result.losses[-1]:.3f}", lr=f"{lr:.1e}")
        read_losses(t0)
        evaluate(cfg.max_iters, learning_rate_at(cfg.max_iters, cfg))
        if graphed is not None:
            graphed.release()

    bar = tqdm(range(cfg.max_iters), desc=desc, disable=not progress, leave=True, mininterval=0.5)
    if cfg.activation_checkpointing:
        model.activation_checkpointing = True
    try:
        tb_log = open_run_log(cfg.log_dir)  # None without log_dir, and on every rank but 0
        with fast_fp32_matmuls(device):
            run_steps()
    finally:
        if tb_log is not None:
            tb_log.close()
        if cfg.activation_checkpointing:
            model.activation_checkpointing = False
    if run is not None:
        traffic.steps = cfg.max_iters
        result.gradient_bytes_per_step = traffic.bytes_per_step
    for note in result.notes:
        say(f"note: {note}")
    if best_weights is not None and result.best_iter != cfg.max_iters:
        with torch.no_grad():
            for p, best in zip(trainable, best_weights):
                p.copy_(best)
    model.eval()
    return result

"""Where a training step's memory goes: one ledger for full fine-tuning, LoRA, QLoRA and every variant.

`memory_ledger` runs one real training step (forward, backward, optimizer step) and counts, tensor by tensor:

- frozen weights: parameters that do not train, and a quantized base's codes and scales;
- buffers: every other tensor the model holds that is not a parameter (rotary position tables);
- trainable weights, their gradients, and the optimizer's state as the optimizer itself holds it after the step;
- activations: every tensor autograd saved for the backward pass, seen through `saved_tensors_hooks`, each
  storage counted once, parameters and buffers left out (they are counted above already).

Beside the count it gives the textbook prediction (16 bytes per trainable fp32 number: weight, gradient and
AdamW's two moments; 4 per frozen fp32 number) and, on a CUDA device, the measured peak
(`torch.cuda.max_memory_allocated`). On the meta device the step runs on shapes alone, so the ledger is exact for
any size, GPT-3's included, without allocating anything (attention there takes PyTorch's math path, which keeps
the T x T attention probabilities; a fused CPU or GPU kernel keeps less, so at long sequences the meta count of
activations is an upper bound).

    ledger = memory_ledger(model, batch_size=8, seq_len=64)     # the step trains `model`: pass a copy
    ledger.total, ledger.as_dict()

`memory_regime` sweeps batch x sequence length, width and activation checkpointing and returns LoRA/full and
QLoRA/full ratios of the whole step's memory; `gpt3_memory` puts GPT-3 175B through the per-parameter formula.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, fields, replace

import torch
import torch.nn as nn

from ..devices import autocast_for
from ..lora import LoRAConfig, apply_lora, lora_layers
from ..model import GPT, GPTConfig
from ..train import TrainConfig, make_optimizer

FP32_BYTES = 4
# The textbook count for a trainable fp32 number under AdamW: weight 4 + gradient 4 + two moments 4 + 4.
ADAMW_TRAINABLE_BYTES = 16

# QLoRA's storage of a frozen weight (Dettmers et al. 2023): 4-bit codes, one 8-bit scale per block of 64 and,
# for those, one fp32 scale per block of 256 (double quantization). Used only where no real quantized model
# is given (the meta-device sweep); lora_lab.nf4 measures it on real tensors.
NF4_BLOCK, NF4_SCALE_BLOCK = 64, 256
NF4_BITS_PER_PARAMETER = 4 + 8 / NF4_BLOCK + 32 / (NF4_BLOCK * NF4_SCALE_BLOCK)

KINDS = ("frozen_weights", "trainable_weights", "gradients", "optimizer_state", "activations", "buffers")


@dataclass(frozen=True)
class MemoryLedger:
    """Bytes one training step keeps alive, by kind (counted, not a process measurement).

    frozen_weights holds the frozen parameters and the buffers of quantized layers (their codes and scales);
    `buffers` every other non-parameter tensor of the model. optimizer_state is every
    tensor in the optimizer's state, AdamW's step counters (`optimizer_counters`) included. activations are the
    tensors autograd saved for backward, all alive together between the forward and the backward pass.
    `measured_peak` is CUDA's max_memory_allocated over the step, less what was allocated outside the model
    before it (None off CUDA).

    `total` is the sum of the kinds. They are not all alive at one instant (backward frees activations as it
    makes gradients), so in steady training, where the optimizer state lives throughout, the peak lies between
    weights + state + the larger of activations and gradients, and `total` plus the step's short-lived
    temporaries (which the ledger does not count; the CUDA peak includes them)."""

    method: str
    batch_size: int
    seq_len: int
    checkpointing: bool
    device: str
    frozen_weights: int
    trainable_weights: int
    gradients: int
    optimizer_state: int
    activations: int
    buffers: int
    optimizer_counters: int
    trainable_numbers: int
    frozen_numbers: int  # frozen *parameter* numbers (buffers not included)
    quantized_numbers: int  # weights a quantized base stores in buffers (NF4: 4-bit codes and scales)
    measured_peak: int | None = None

    @property
    def total(self) -> int:
        return sum(getattr(self, k) for k in KINDS)

    @property
    def weights_and_state(self) -> int:
        """Everything but the activations: what does not grow with batch x sequence length."""
        return self.total - self.activations

    @property
    def predicted_weights_and_state(self) -> int:
        """The tensor-count prediction: 16 bytes per trainable number, 4 per frozen parameter number (fp32), and
        NF4's bits per parameter (paper's layout) for each quantized weight."""
        nf4 = self.quantized_numbers * NF4_BITS_PER_PARAMETER / 8
        return predicted_bytes(self.trainable_numbers, self.frozen_numbers) + round(nf4)

    @property
    def predicted_difference(self) -> int:
        """counted - predicted for weights and state: exactly the buffers + step counters for an fp32 AdamW model
        (for a quantized base within a few bytes per layer more: NF4's per-layer mean and partial scale groups)."""
        return self.weights_and_state - self.predicted_weights_and_state

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)} | {
            "total": self.total,
            "predicted_weights_and_state": self.predicted_weights_and_state,
        }


def predicted_bytes(
    trainable: int, frozen: int, trainable_bytes: float = ADAMW_TRAINABLE_BYTES, frozen_bytes: float = FP32_BYTES
) -> int:
    """Weights + gradients + optimizer state from the parameter counts alone (activations left out)."""
    return round(trainable * trainable_bytes + frozen * frozen_bytes)


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _storage_key(t: torch.Tensor):
    storage = t.untyped_storage()
    if t.device.type == "meta":
        # Meta tensors have no data (every data_ptr is 0); the storage object's own address tells them apart.
        return ("meta", storage._cdata)
    return (t.device.type, t.device.index, storage.data_ptr())


def _infer_method(model: nn.Module, trainable: int, total: int) -> str:
    layers = lora_layers(model)
    if not layers:
        return "full" if trainable == total else "partial"
    variant = next(iter(layers.values())).variant
    return f"q{variant}" if any(getattr(m, "quantized", None) for m in model.modules()) else variant


def memory_ledger(
    model: nn.Module,
    batch_size: int,
    seq_len: int,
    *,
    method: str | None = None,
    train_config: TrainConfig | None = None,
    optimizer: Callable[[nn.Module], torch.optim.Optimizer] | None = None,
    checkpointing: bool = False,
    device: str | torch.device | None = None,
    bf16: bool = False,
    batch: tuple[torch.Tensor, torch.Tensor] | None = None,
    seed: int = 0,
) -> MemoryLedger:
    """Run one real training step of `model` (a lora_lab GPT, or any model called as `model(x, y) -> (_, loss)`)
    and count its memory by kind. The step trains the model: pass a copy if its weights matter afterwards.

    The batch is `batch` if given, else `batch_size` x `seq_len` seeded random token ids (memory does not depend
    on their values). The optimizer is `optimizer(model)` if given, else lora_lab's AdamW (`make_optimizer` with
    `train_config`, LoRA+ included). `device` defaults to where the model's parameters are; the model is not moved.
    `bf16` runs the forward under train()'s autocast (autocast's bf16 weight copies are then activations)."""
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"memory_ledger: {name} must be a positive integer, got {value!r}.")
    params = list(model.parameters())  # unique: a tied weight is listed once
    if not params:
        raise ValueError("memory_ledger: the model has no parameters.")
    model_device = params[0].device
    device = torch.device(device) if device is not None else model_device
    if device.type != model_device.type:
        raise ValueError(f"memory_ledger: the model is on {model_device}, not on {device}; move it first.")
    if checkpointing and not hasattr(model, "activation_checkpointing"):
        raise ValueError(f"memory_ledger: {type(model).__name__} has no activation_checkpointing switch (GPT has).")
    trainable = [p for p in params if p.requires_grad]
    if not trainable:
        raise ValueError("memory_ledger: the model has no trainable parameters (every requires_grad is False).")
    if batch is None:
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        if vocab is None:
            raise ValueError("memory_ledger: give `batch=(x, y)` for a model without config.vocab_size.")
        block = getattr(model.config, "block_size", seq_len)
        if seq_len > block:
            raise ValueError(f"memory_ledger: seq_len {seq_len} exceeds the model's block_size {block}.")
        g = torch.Generator().manual_seed(seed)
        x = torch.randint(0, vocab, (batch_size, seq_len), generator=g)
        y = torch.randint(0, vocab, (batch_size, seq_len), generator=g)
        x, y = x.to(device), y.to(device)
    else:
        x, y = batch
        batch_size, seq_len = int(x.shape[0]), int(x.shape[-1])

    buffers = {_storage_key(b): b for b in model.buffers()}
    # A quantized layer's buffers are its weight (lora_lab.nf4's NF4Linear says quantized = "nf4").
    quantized = {_storage_key(b) for m in model.modules() if getattr(m, "quantized", None) for b in m.buffers()}
    held = {_storage_key(p) for p in params} | set(buffers)  # counted as weights or buffers, never as activations
    saved: dict = {}  # storage key -> bytes

    def pack(t: torch.Tensor):
        key = _storage_key(t)
        if key not in held:
            saved[key] = t.untyped_storage().nbytes()
        return t

    cfg = train_config or TrainConfig()
    if device.type == "meta":  # torch's fused AdamW has no meta kernel; the state it allocates is the same
        cfg = replace(cfg, fused_optimizer=False)
    make = optimizer or (lambda m: make_optimizer(m, cfg))
    was_training = model.training
    was_checkpointing = getattr(model, "activation_checkpointing", None)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        own = sum(tensor_bytes(p) for p in params) + sum(tensor_bytes(b) for b in buffers.values())
        outside = torch.cuda.memory_allocated(device) - own  # whatever else this process holds on the GPU
        torch.cuda.reset_peak_memory_stats(device)
    try:
        model.train()
        if was_checkpointing is not None:
            model.activation_checkpointing = checkpointing
        opt = make(model)
        with torch.random.fork_rng(devices=[] if not cuda else [device]):  # dropout's draws leave the caller's stream
            torch.manual_seed(seed)
            with autocast_for(device, bf16) if bf16 else contextlib.nullcontext():
                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    _, loss = model(x, y)
            activations = sum(saved.values())  # all alive now: the peak of saved tensors, before backward frees them
            loss.backward()
        grads = sum(tensor_bytes(p.grad) for p in trainable if p.grad is not None)
        opt.step()
        state = [(k, t) for s in opt.state.values() for k, t in s.items() if isinstance(t, torch.Tensor)]
        peak = None
        if cuda:
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device) - outside
        optimizer_state = sum(tensor_bytes(t) for _, t in state)
        counters = sum(tensor_bytes(t) for k, t in state if k == "step")
        opt.zero_grad(set_to_none=True)
    finally:
        model.train(was_training)
        if was_checkpointing is not None:
            model.activation_checkpointing = was_checkpointing
    n_trainable = sum(p.numel() for p in trainable)
    return MemoryLedger(
        method=method or _infer_method(model, n_trainable, sum(p.numel() for p in params)),
        batch_size=batch_size,
        seq_len=seq_len,
        checkpointing=checkpointing,
        device=str(device),
        frozen_weights=sum(tensor_bytes(p) for p in params if not p.requires_grad)
        + sum(tensor_bytes(b) for k, b in buffers.items() if k in quantized),
        trainable_weights=sum(tensor_bytes(p) for p in trainable),
        gradients=grads,
        optimizer_state=optimizer_state,
        activations=activations,
        buffers=sum(tensor_bytes(b) for k, b in buffers.items() if k not in quantized),
        optimizer_counters=counters,
        trainable_numbers=n_trainable,
        frozen_numbers=sum(p.numel() for p in params if not p.requires_grad),
        quantized_numbers=sum(
            m.in_features * m.out_features for m in model.modules() if getattr(m, "quantized", None) == "nf4"
        ),
        measured_peak=peak,
    )


# ----------------------------------------------------------------------------------------------------
# The regime: when do weights and optimizer state dominate?


def quantizable_numbers(model: nn.Module) -> int:
    """Numbers in the frozen Linear weights QLoRA stores in 4 bits: every nn.Linear weight that does not train,
    except one tied to an embedding (QLoRA keeps embeddings in 16 bits; GPT's output layer is its embedding)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    weights = {
        id(m.weight): m.weight.numel()
        for m in model.modules()
        if isinstance(m, nn.Linear) and not m.weight.requires_grad and id(m.weight) not in embeddings
    }
    return sum(weights.values())


def as_qlora(lora: MemoryLedger, model: nn.Module, bits_per_parameter: float = NF4_BITS_PER_PARAMETER) -> MemoryLedger:
    """The LoRA step's ledger with its frozen Linear weights (`quantizable_numbers`) stored at `bits_per_parameter`.

    For shapes-only models (the meta device), where a real quantized base cannot be built: everything else
    (activations, the adapter's weights, gradients and state) is the LoRA ledger's own count. A real QLoRA model
    (a quantized base with LoRA on top) goes through memory_ledger itself."""
    numbers = quantizable_numbers(model)
    if numbers == 0:
        raise ValueError("as_qlora: the model has no frozen Linear weights to quantize.")
    stored = round(numbers * bits_per_parameter / 8)
    return replace(
        lora,
        method="q" + lora.method,
        frozen_weights=lora.frozen_weights - numbers * FP32_BYTES + stored,
        frozen_numbers=lora.frozen_numbers - numbers,
        quantized_numbers=lora.quantized_numbers + numbers,
    )


@dataclass(frozen=True)
class RegimeRow:
    n_embd: int
    n_layer: int
    batch_size: int
    seq_len: int
    checkpointing: bool
    full: MemoryLedger
    lora: MemoryLedger
    qlora: MemoryLedger

    @property
    def lora_over_full(self) -> float:
        return self.lora.total / self.full.total

    @property
    def qlora_over_full(self) -> float:
        return self.qlora.total / self.full.total

    @property
    def activation_share(self) -> float:
        """The share of full fine-tuning's memory that is activations."""
        return self.full.activations / self.full.total

    def as_dict(self) -> dict:
        return {
            "n_embd": self.n_embd,
            "n_layer": self.n_layer,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "checkpointing": self.checkpointing,
            "full_total": self.full.total,
            "lora_total": self.lora.total,
            "qlora_total": self.qlora.total,
            "activation_share": self.activation_share,
            "lora_over_full": self.lora_over_full,
            "qlora_over_full": self.qlora_over_full,
        }


def regime_config(n_embd: int, n_layer: int = 2, vocab_size: int = 65, block_size: int = 1024) -> GPTConfig:
    """A lora_lab GPT of this width (64-wide heads, as GPT-2 and GPT-3 use), for the sweep."""
    if n_embd % 64:
        raise ValueError(f"regime_config: n_embd must be a multiple of 64 (64-wide heads), got {n_embd}.")
    return GPTConfig(
        vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_embd // 64, n_embd=n_embd, dropout=0.0
    )


def memory_regime(
    widths=(128, 512, 2048),
    shapes=((1, 64), (8, 256), (32, 1024)),
    checkpointing=(False, True),
    *,
    n_layer: int = 2,
    lora: LoRAConfig | None = None,
    device: str = "meta",
    vocab_size: int = 65,
) -> list[RegimeRow]:
    """Full, LoRA and QLoRA ledgers for every width x (batch_size, seq_len) x checkpointing, on the meta device by
    default (exact counts, no memory, any width). QLoRA is the LoRA ledger with its frozen base weights at NF4's
    bits per parameter (`as_qlora`). LoRA defaults to the paper's r=4 on W_q, W_v.

    On the meta device attention runs PyTorch's math path, which keeps the batch x heads x T x T attention
    probabilities for backward; fused kernels (flash attention on CPUs and GPUs) keep only the output and one
    number per row, so at long sequences the meta count of activations is an upper bound of a fused kernel's."""
    lora = lora or LoRAConfig(r=4, alpha=8.0, targets=("q_proj", "v_proj"))
    rows = []
    for width in widths:
        config = regime_config(width, n_layer, vocab_size, max(t for _, t in shapes))
        for batch_size, seq_len in shapes:
            for ckpt in checkpointing:
                ledgers = {}
                for method in ("full", "lora"):
                    with torch.random.fork_rng(devices=[]), torch.device(device):
                        torch.manual_seed(0)
                        model = GPT(config)
                        if method == "lora":
                            model = apply_lora(model, lora)
                    ledgers[method] = memory_ledger(
                        model,
                        batch_size,
                        seq_len,
                        checkpointing=ckpt,
                    )
                    if method == "lora":
                        ledgers["qlora"] = as_qlora(ledgers["lora"], model)
                rows.append(RegimeRow(width, n_layer, batch_size, seq_len, ckpt, **ledgers))
    return rows


def decimal_bytes(n: float) -> str:
    """Decimal units (1 GB = 1e9 bytes), as the LoRA paper writes 1.2 TB and 350 GB."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:g} B"


def format_regime(rows: list[RegimeRow]) -> str:
    """The regime rows as a Markdown table."""
    head = ["width", "batch x seq", "ckpt", "full", "LoRA", "QLoRA", "activations of full", "LoRA/full", "QLoRA/full"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            str(r.n_embd),
            f"{r.batch_size} x {r.seq_len}",
            "yes" if r.checkpointing else "no",
            decimal_bytes(r.full.total),
            decimal_bytes(r.lora.total),
            decimal_bytes(r.qlora.total),
            f"{r.activation_share:.0%}",
            f"{r.lora_over_full:.2f}",
            f"{r.qlora_over_full:.3f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# GPT-3 175B through the same formula

# Brown et al. 2020, Table 2.1; the LoRA paper's setting: r=4 on W_q and W_v.
GPT3_CONFIG = GPTConfig(
    vocab_size=50257, block_size=2048, n_layer=96, n_head=96, n_embd=12288, bias=True, positions="learned"
)
# The LoRA paper (Hu et al. 2021, section 4.2) reports these two figures; they are quoted, not computed.
PAPER_FULL_BYTES, PAPER_LORA_BYTES = 1.2e12, 350e9

# Bytes per number under three accountings: (frozen weight, trainable weight + gradient + optimizer state).
ACCOUNTINGS = {
    "fp32 weights, fp32 AdamW (this ledger)": (4, 16),
    "fp16 weights and gradients, fp32 master + AdamW moments": (2, 2 + 2 + 4 + 8),
    "fp16 weights, gradients and AdamW moments": (2, 2 + 2 + 2 + 2),
}


@dataclass(frozen=True)
class GPT3Row:
    accounting: str
    frozen_bytes: int
    trainable_bytes: int
    full: int
    lora: int

    @property
    def ratio(self) -> float:
        return self.full / self.lora


def gpt3_memory(r: int = 4, targets=("q_proj", "v_proj")) -> tuple[int, int, list[GPT3Row]]:
    """(GPT-3's parameter count, LoRA's trainable count, one row per accounting of ACCOUNTINGS) — weights,
    gradients and optimizer state only, activations left out (the paper does not give its batch). The counts
    are read from GPT(GPT3_CONFIG) and apply_lora built on the meta device."""
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        model = GPT(GPT3_CONFIG)
        n_params = model.num_parameters()
        model = apply_lora(model, LoRAConfig(r=r, alpha=2.0 * r, targets=tuple(targets)))
        n_lora = model.num_parameters(trainable_only=True)
    rows = [
        GPT3Row(
            name,
            frozen,
            trained,
            predicted_bytes(n_params, 0, trained, frozen),
            predicted_bytes(n_lora, n_params, trained, frozen),
        )
        for name, (frozen, trained) in ACCOUNTINGS.items()
    ]
    return n_params, n_lora, rows

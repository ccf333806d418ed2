"""Data-parallel training with torch.distributed (DDP) under torchrun.

`torchrun --nproc_per_node N script.py` starts N copies of a script and tells each its RANK and WORLD_SIZE.
train() calls `data_parallel()` to join them into one process group (gloo for CPU tensors, NCCL for CUDA
ones), then each rank samples its own batches (seed + rank), DDP averages the gradients after every
backward, and only rank 0 prints, evaluates and writes files. A single process (no torchrun) gets None and
trains exactly as before.

DDP all-reduces only parameters with requires_grad=True, so LoRA (applied and frozen *before* wrapping)
sends r(d+k) numbers per adapted matrix instead of d*k: `GradientTraffic` counts the bytes. `ddp_order_drift`
measures what the other order does (DDP first, then LoRA): nothing is all-reduced and the ranks drift apart.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import tempfile
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from .lora import LoRAConfig, apply_lora, lora_layers
from .model import GPT, GPTConfig
from .targets import parent_of, target_linears


@dataclass(frozen=True)
class DataParallel:
    """Where this process sits in a data-parallel run."""

    rank: int  # 0 .. world_size - 1, across all nodes
    world_size: int
    local_rank: int  # the rank on this node: which GPU this process uses

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def backends() -> str:
    """gloo for CPU tensors, and NCCL for CUDA ones where this torch has it and a GPU is there."""
    if torch.cuda.is_available() and dist.is_nccl_available():
        return "cpu:gloo,cuda:nccl"  # one process group for both kinds of tensors
    return "gloo"


def launched_by_torchrun() -> bool:
    """True when torchrun (or any launcher setting WORLD_SIZE > 1 and RANK) started this process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def data_parallel() -> DataParallel | None:
    """This process's place in a data-parallel run, joining the process group if torchrun started us and
    nobody has yet. None for a single process (and for an initialized group of one: nothing to share)."""
    if not dist.is_available():
        return None
    if not dist.is_initialized():
        if not launched_by_torchrun():
            return None
        dist.init_process_group(backends())  # reads MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE from torchrun
        atexit.register(dist.destroy_process_group)  # we joined it, so we leave it when the script ends
    if dist.get_world_size() == 1:
        return None
    local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    return DataParallel(dist.get_rank(), dist.get_world_size(), local_rank)


def is_main_process() -> bool:
    """True on rank 0 of a data-parallel run and in a single process: the one process that prints and writes.
    Before the process group is joined, torchrun's RANK says it."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def say(text: str = "") -> None:
    """print(), on rank 0 only: N processes would otherwise print every line N times."""
    if is_main_process():
        print(text, flush=True)


def rank_device(device: torch.device, run: DataParallel | None) -> torch.device:
    """Each rank on a node uses its own GPU: a bare 'cuda' becomes cuda:LOCAL_RANK."""
    if run is None or device.type != "cuda" or device.index is not None:
        return device
    torch.cuda.set_device(run.local_rank)
    return torch.device("cuda", run.local_rank)


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank `rank`'s batches and dropout: rank 0 keeps `seed`, so one process is unchanged."""
    return seed + rank


def effective_batch_note(batch_size: int, run: DataParallel) -> str:
    return (
        f"data-parallel over {run.world_size} processes: batch {batch_size} per rank x {run.world_size} = "
        f"effective batch {batch_size * run.world_size} per step"
    )


def require_all_trainable_used(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """One forward/backward on (x, y) without DDP; a trainable tensor that gets no gradient is named.

    DDP waits for a gradient of every trainable tensor, and one that never reaches the loss only shows up
    at the next step as "Expected to have finished reduction in the prior iteration". The check restores
    the RNG (dropout) and leaves no gradients behind, so training continues exactly as without it."""
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        _, loss = model(x, y)
        loss.backward()
    unused = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    model.zero_grad(set_to_none=True)
    if unused:
        raise ValueError(
            f"Data-parallel training: {len(unused)} trainable tensor(s) never reach the loss, so DDP would wait "
            f"for their gradients forever: {', '.join(unused)}. Freeze them (requires_grad=False) before "
            "training, or use them in forward()."
        )


class GradientTraffic:
    """A DDP communication hook that counts the bytes of every gradient bucket it all-reduces, then
    all-reduces it exactly as DDP's default does. bytes_per_step = what one rank sends into each step's
    all-reduce (the payload; ring all-reduce moves about 2(N-1)/N times this over the wire)."""

    def __init__(self):
        self.bytes = 0
        self.steps = 0

    def attach(self, ddp_model: DistributedDataParallel) -> None:
        ddp_model.register_comm_hook(self, GradientTraffic.count_and_allreduce)

    @staticmethod
    def count_and_allreduce(state: GradientTraffic, bucket):
        gradients = bucket.buffer()
        state.bytes += gradients.numel() * gradients.element_size()
        return default_hooks.allreduce_hook(None, bucket)  # None: the default process group

    @property
    def bytes_per_step(self) -> float:
        return self.bytes / self.steps if self.steps else float("nan")


def wrap_for_data_parallel(
    model: torch.nn.Module, run: DataParallel, device: torch.device, traffic: GradientTraffic
) -> DistributedDataParallel:
    """DDP around a model whose trainable set is final (LoRA applied and frozen first: DDP registers the
    tensors it syncs when it is built). Every rank starts from rank 0's weights (DDP broadcasts them)."""
    device_ids = [device.index] if device.type == "cuda" else None
    ddp_model = DistributedDataParallel(model, device_ids=device_ids)
    traffic.attach(ddp_model)
    return ddp_model


def data_parallel_model(
    model: torch.nn.Module, run: DataParallel | None, device: torch.device, first_window: torch.Tensor
) -> tuple[torch.nn.Module, GradientTraffic]:
    """(what each training step calls, its traffic counter): DDP around `model` in a data-parallel run, after
    checking on first_window (1, T + 1) that every trainable tensor reaches the loss; `model` itself otherwise.
    Any training loop can use it: train() does, and so can a loop of its own."""
    traffic = GradientTraffic()
    if run is None:
        return model, traffic
    require_all_trainable_used(model, first_window[:, :-1], first_window[:, 1:])
    return wrap_for_data_parallel(model, run, device, traffic), traffic


def mean_over_ranks(values: torch.Tensor, run: DataParallel | None) -> torch.Tensor:
    """The mean of `values` over all ranks (each rank's loss is over its own rows); unchanged for one process."""
    if run is None:
        return values
    values = values.detach().float().clone()
    dist.all_reduce(values)
    return values / run.world_size


def from_main(values: torch.Tensor, run: DataParallel | None) -> torch.Tensor:
    """Rank 0's `values` on every rank (e.g. the evaluation only rank 0 ran)."""
    if run is not None:
        dist.broadcast(values, src=0)
    return values


# ----------------------------------------------------------------------------------------------
# Why the order matters: LoRA, then DDP (and what the other order silently does)

ORDERS = ("apply_lora, then DDP", "DDP, then LoRA layers")


@dataclass(frozen=True)
class OrderDrift:
    """One order of wrapping, trained for a few steps on every rank: how far the ranks' LoRA tensors ended apart."""

    order: str  # one of ORDERS
    steps: int
    trainable_bytes: int  # 4 bytes per trainable (LoRA) number: what DDP should all-reduce each step
    bytes_per_step: float  # what it did all-reduce (counted by GradientTraffic)
    start_gap: float  # max |t_rank0 - t_rank| over every LoRA A and B before the first step
    max_a_gap: float  # the same after the last step, over the A tensors
    max_b_gap: float  # ... and over the B tensors


def _lora_by_hand(model: torch.nn.Module, config: LoRAConfig) -> None:
    """The core of apply_lora (wrap the targets, freeze the base) without its refusal of a DDP-wrapped model: only
    to show what that refusal prevents."""
    targets = target_linears(model, config.targets, config.r)
    layers = {name: config.layer_class.from_config(linear, config) for name, linear in targets.items()}
    model.requires_grad_(False)
    for name, layer in layers.items():
        parent, attr = parent_of(model, name)
        setattr(parent, attr, layer)


def _lora_tensors(model: torch.nn.Module, kind: str) -> torch.Tensor:
    """Every LoRA layer's `kind` ("lora_A" or "lora_B") flattened into one vector, in the model's layer order."""
    return torch.cat([getattr(layer, kind).detach().flatten() for layer in lora_layers(model).values()])


def _gap_to_rank0(vector: torch.Tensor) -> float:
    """max |vector_rank0 - vector_rank| over all ranks (the same answer on every rank)."""
    gathered = [torch.empty_like(vector) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, vector)
    return max((g - gathered[0]).abs().max().item() for g in gathered)


def _order_worker(
    rank: int, world: int, port: int, model_config: dict, lora_config: dict, steps: int, lr: float, out: str
) -> None:
    """One rank: for each order, the same seeded model and LoRA init as every other rank, `steps` AdamW steps on
    this rank's own batches (seed + rank) through DDP, then the gaps to rank 0 (rank 0 writes them as JSON)."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        config, lora = GPTConfig.from_dict(model_config), LoRAConfig.from_dict(lora_config)
        rows = []
        for order in ORDERS:
            torch.manual_seed(0)  # every rank builds the same base and the same A, B: any gap comes from training
            model = GPT(config)
            if order == ORDERS[0]:
                ddp_model = DistributedDataParallel(apply_lora(model, lora))
            else:
                ddp_model = DistributedDataParallel(model)  # registers the base, all trainable at this point
                _lora_by_hand(model, lora)
            traffic = GradientTraffic()
            traffic.attach(ddp_model)
            start_gap = max(_gap_to_rank0(_lora_tensors(model, kind)) for kind in ("lora_A", "lora_B"))
            trainable = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(trainable, lr=lr)
            batches = torch.Generator().manual_seed(rank_seed(0, rank))
            for _ in range(steps):
                window = torch.randint(0, config.vocab_size, (2, config.block_size + 1), generator=batches)
                _, loss = ddp_model(window[:, :-1], window[:, 1:])
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                traffic.steps += 1
            gaps = {kind: _gap_to_rank0(_lora_tensors(model, kind)) for kind in ("lora_A", "lora_B")}
            rows.append(
                OrderDrift(
                    order=order,
                    steps=steps,
                    trainable_bytes=sum(4 * p.numel() for p in trainable),
                    bytes_per_step=traffic.bytes_per_step,
                    start_gap=start_gap,
                    max_a_gap=gaps["lora_A"],
                    max_b_gap=gaps["lora_B"],
                )
            )
        if rank == 0:
            with open(out, "w") as f:
                json.dump([asdict(row) for row in rows], f)
        dist.barrier()  # leave together: a rank tearing down gloo while its peer still talks can abort the peer
    finally:
        dist.destroy_process_group()


def ddp_order_drift(
    model_config: GPTConfig, lora_config: LoRAConfig, ranks: int = 2, steps: int = 3, lr: float = 1e-2
) -> list[OrderDrift]:
    """Start `ranks` CPU processes (gloo, 127.0.0.1) that each train the same seeded model with LoRA under DDP
    for `steps` steps, once per order in ORDERS, and return how far apart the ranks' A and B ended.

    The right order (apply_lora, then DDP) all-reduces every LoRA gradient, so the ranks stay identical. The
    wrong one is done by hand, since apply_lora refuses it: DDP built around the plain model registered only the
    base, which LoRA then freezes, so nothing at all is all-reduced and every rank trains its own adapter."""
    if ranks < 2:
        raise ValueError(f"ddp_order_drift needs at least 2 ranks to compare, got ranks={ranks}.")
    if steps < 1:
        raise ValueError(f"ddp_order_drift needs at least 1 training step, got steps={steps}.")
    with socket.socket() as s:  # a free port for the processes to meet on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "order.json")
        args = (ranks, port, model_config.to_dict(), lora_config.to_dict(), steps, lr, out)
        try:
            mp.start_processes(_order_worker, args=args, nprocs=ranks, start_method="spawn")
        except mp.ProcessExitedException:
            # gloo can abort a rank while the group is torn down ("terminate called without an active exception").
            # Rank 0 writes the result after the last collective that computes it, so a file that is there is whole
            # (json.load below fails loudly otherwise); an abort before that leaves no file, and the error is raised.
            if not os.path.isfile(out):
                raise
        with open(out) as f:
            return [OrderDrift(**row) for row in json.load(f)]

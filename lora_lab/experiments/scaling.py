"""Measurements for scaling out (chapter 09, benchmarks/bench_scale.py): the gradient bytes DDP all-reduces
per step, full training vs LoRA, and the throughput of one mixed-adapter batch vs one pass per adapter vs
swapping adapters on one base.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import socket
import statistics
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..lora import LoRAConfig, apply_lora, lora_layers
from ..model import GPT, GPTConfig
from ..storage.bank import AdapterBank
from ..storage.mixed import MixedAdapterModel
from ..train import TrainConfig, train


@dataclass
class TrafficRow:
    method: str  # "full" or "LoRA r=..."
    trainable: int  # trainable parameters
    bytes_per_step: float  # what each rank sent into all-reduce per step (counted by GradientTraffic)
    predicted_bytes: int  # 4 bytes per fp32 trainable parameter


def lora_matrix_fraction(r: int, d: int, k: int) -> float:
    """r(d+k)/(dk): the share of one d x k matrix's gradient LoRA sends (its A and B instead of W)."""
    return r * (d + k) / (d * k)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _traffic_worker(
    rank: int, world: int, port: int, model_config: dict, lora_configs: list, steps: int, batch_size: int, out: str
) -> None:
    """One rank: train a fresh GPT for `steps` steps per method and record DDP's gradient bytes (rank 0 writes)."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        config = GPTConfig.from_dict(model_config)
        data = torch.randint(0, config.vocab_size, (config.block_size * 8,), generator=torch.Generator().manual_seed(0))
        rows = []
        for lora in lora_configs:
            torch.manual_seed(0)
            model = GPT(config)
            if lora is not None:
                apply_lora(model, LoRAConfig.from_dict(lora))
            cfg = TrainConfig(
                max_iters=steps,
                batch_size=batch_size,
                eval_interval=steps,
                eval_iters=1,
                warmup_iters=0,
                device="cpu",
                bf16=False,
            )
            with contextlib.redirect_stdout(io.StringIO()):  # rank 0's notes: the caller prints the table
                res = train(model, data, None, cfg, progress=False)
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            name = "full" if lora is None else f"LoRA r={lora['r']} on {'+'.join(lora['targets'])}"
            rows.append(
                {
                    "method": name,
                    "trainable": trainable,
                    "bytes_per_step": res.gradient_bytes_per_step,
                    "predicted_bytes": 4 * trainable,
                }
            )
        if rank == 0:
            with open(out, "w") as f:
                json.dump(rows, f)
        # Leave together: a rank that tears its gloo connections down while its peer still holds them open can
        # abort the peer ("terminate called without an active exception", seen once in chapter 09).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def gradient_traffic(
    model_config: GPTConfig, lora_configs: list[LoRAConfig | None], ranks: int = 2, steps: int = 2, batch_size: int = 1
) -> list[TrafficRow]:
    """Start `ranks` CPU processes (gloo, 127.0.0.1) that train `model_config` with each LoRA config (None:
    full training) through train() under DDP, and return the bytes each rank all-reduced per step."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "traffic.json")
        args = (
            ranks,
            _free_port(),
            model_config.to_dict(),
            [c if c is None else c.to_dict() for c in lora_configs],
            steps,
            batch_size,
            out,
        )
        mp.start_processes(_traffic_worker, args=args, nprocs=ranks, start_method="spawn")
        with open(out) as f:
            return [TrafficRow(**row) for row in json.load(f)]


@dataclass
class ServingRow:
    how: str
    passes: int  # forward passes per batch
    tokens_per_second: float


def _median_seconds(runs: dict, repeats: int, clock) -> dict[str, float]:
    """Median seconds of each run, over `repeats` rounds in which the runs take turns (a busy machine slows
    them alike), after one warm-up round."""
    times = {name: [] for name in runs}
    for round_ in range(repeats + 1):
        for name, run in runs.items():
            t0 = clock()
            run()
            if round_:
                times[name].append(clock() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


@torch.no_grad()
def mixed_batch_throughput(
    base: GPT, adapters: dict[str, GPT], rows_per_adapter: int = 2, repeats: int = 5, seq_len: int | None = None
) -> list[ServingRow]:
    """Tokens/s of serving one batch where each adapter owns `rows_per_adapter` rows, three ways:
    one mixed batch (MixedAdapterModel), one pass per adapter through its own adapted model (preloaded,
    unmerged), and one pass per adapter on a single base that swaps adapters (AdapterBank.activate)."""
    base.eval()
    names = list(adapters)
    T = seq_len or base.config.block_size
    device = next(base.parameters()).device
    idx = torch.randint(
        0, base.config.vocab_size, (len(names) * rows_per_adapter, T), generator=torch.Generator().manual_seed(0)
    ).to(device)
    row_names = [n for n in names for _ in range(rows_per_adapter)]
    groups = {n: idx[i * rows_per_adapter : (i + 1) * rows_per_adapter] for i, n in enumerate(names)}
    mixed = MixedAdapterModel(base)
    for n, model in adapters.items():
        mixed.add(n, model)
    swapping_base = copy.deepcopy(base)
    bank = AdapterBank(swapping_base)
    for n, model in adapters.items():
        bank.add(n, model)

    def swap_and_run():
        for n, rows in groups.items():
            bank.activate(n)
            swapping_base(rows)

    runs = {
        "one mixed batch": lambda: mixed(idx, row_names),
        "one pass per adapter": lambda: [adapters[n].eval()(rows) for n, rows in groups.items()],
        "swap adapters on one base": swap_and_run,
    }
    passes = {"one mixed batch": 1, "one pass per adapter": len(names), "swap adapters on one base": len(names)}
    # On the CPU the clock is this process's CPU time, which other processes barely disturb (at 1 thread).
    cuda = idx.device.type == "cuda"
    clock = (lambda: (torch.cuda.synchronize(), time.perf_counter())[1]) if cuda else time.process_time
    seconds = _median_seconds(runs, repeats, clock)
    return [ServingRow(how, passes[how], idx.numel() / seconds[how]) for how in runs]


def adapted_copies(base: GPT, config: LoRAConfig, count: int, seed: int = 0) -> dict[str, GPT]:
    """`count` adapted copies of base with random (as if trained) adapter tensors: stand-ins for real adapters
    in throughput measurements, where only shapes matter."""
    out = {}
    for i in range(count):
        torch.manual_seed(seed + i)
        model = apply_lora(copy.deepcopy(base), config)
        with torch.no_grad():
            for layer in lora_layers(model).values():
                for p in layer.parameters():
                    if p.requires_grad:
                        p.normal_(0, 0.02)
        out[f"adapter{i}"] = model.eval()
    return out

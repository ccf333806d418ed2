"""LoRA variants: training step time and gradient + optimizer memory, each relative to plain LoRA.

    python benchmarks/bench_variants.py --threads 1          # the 10.65M config (6 layers, 384 dims, block 256)
    python benchmarks/bench_variants.py --quick              # tiny sizes: a smoke run in seconds

Every variant is applied at the same rank and targets to copies of one base. Timings are medians over
interleaved rounds (the variants take turns in each round), so a busy machine slows them alike; on CPU
the clock is the process's CPU time (time.process_time), which other processes barely disturb at
--threads 1. Memory is measured on the real tensors after one step: every .grad, then AdamW's state.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time
from datetime import datetime, timezone

import torch

from lora_lab import GPT, VARIANTS, GPTConfig, LoRAConfig, TrainConfig, apply_lora
from lora_lab.train import make_optimizer

FULL = GPTConfig(vocab_size=65, block_size=256, n_layer=6, n_head=6, n_embd=384, dropout=0.0)  # 10.65M
QUICK = GPTConfig(vocab_size=65, block_size=32, n_layer=2, n_head=2, n_embd=64, dropout=0.0)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def setups(base: GPT, rank: int, variants) -> dict:
    """name -> (model, optimizer, step function), one per variant, all from the same base."""
    out = {}
    for name in variants:
        torch.manual_seed(0)
        model = apply_lora(copy.deepcopy(base), LoRAConfig(r=rank, alpha=2.0 * rank, targets=TARGETS, variant=name))
        model.train()
        opt = make_optimizer(model, TrainConfig(fused_optimizer=False))  # one optimizer kind for all
        out[name] = (model, opt)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny model and few rounds: a smoke run")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (every variant once per round)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated registered names")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    config = QUICK if args.quick else FULL
    rounds = 2 if args.quick else args.rounds
    names = [n for n in args.variants.split(",") if n]
    if "lora" not in names:
        names.insert(0, "lora")
    torch.manual_seed(0)
    base = GPT(config)
    x = torch.randint(0, config.vocab_size, (args.batch, config.block_size), generator=torch.Generator().manual_seed(1))
    runs = setups(base, args.rank, names)

    def step(model, opt):
        _, loss = model(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    memory = {}
    for name, (model, opt) in runs.items():  # one untimed warm-up step each, and the memory after it
        _, loss = model(x, x)
        loss.backward()
        grads = nbytes(p.grad for p in model.parameters() if p.grad is not None)
        opt.step()
        state = nbytes(t for s in opt.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0)
        opt.zero_grad(set_to_none=True)
        memory[name] = grads + state
    times = {name: [] for name in runs}
    for _ in range(rounds):
        for name, (model, opt) in runs.items():
            t0 = time.process_time()
            step(model, opt)
            times[name].append(time.process_time() - t0)

    print(
        f"# bench_variants  {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC  torch {torch.__version__}  "
        f"{platform.processor() or platform.machine()}  threads {args.threads}"
    )
    print(
        f"model: {config.n_layer} layers x {config.n_embd} dims, block {config.block_size}, "
        f"{base.num_parameters():,} params; batch {args.batch}; rank {args.rank} on {','.join(TARGETS)}; "
        f"{rounds} interleaved rounds, CPU process time"
    )
    ref_t, ref_m = statistics.median(times["lora"]), memory["lora"]
    print(
        f"{'variant':<9}{'trainable':>11}{'ms/step':>10}{'vs lora':>9}{'min..max ms':>16}"
        f"{'grad+opt KiB':>14}{'vs lora':>9}"
    )
    for name, (model, _) in runs.items():
        med = statistics.median(times[name])
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        spread = f"{min(times[name]) * 1e3:.0f}..{max(times[name]) * 1e3:.0f}"
        print(
            f"{name:<9}{trainable:>11,}{med * 1e3:>10.1f}{med / ref_t:>8.2f}x{spread:>16}"
            f"{memory[name] / 1024:>14.1f}{memory[name] / ref_m:>8.2f}x"
        )


if __name__ == "__main__":
    main()

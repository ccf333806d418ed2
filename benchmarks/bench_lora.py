"""LoRA benchmarks: training step, forward latency, adapter size / swap time, gradient + optimizer memory.

    python benchmarks/bench_lora.py            # the 10.65M config (6 layers, 6 heads, 384 dims, block 256)
    python benchmarks/bench_lora.py --quick    # tiny sizes, a few iterations: a smoke run in seconds

Runs on CPU; uses CUDA when it is available (or pass --device). Timings are medians over interleaved
rounds (variants take turns), so a busy machine slows every variant alike. On CPU the clock is the
process's CPU time (time.process_time), which other processes on a shared machine barely disturb;
use it with --threads 1 (with more threads it adds up every thread's time, waiting included).
Pass --clock wall for wall time. On CUDA the clock is always wall time.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from lora_lab import (
    GPT,
    AdapterBank,
    GPTConfig,
    LoRAConfig,
    TrainConfig,
    apply_lora,
    load_checkpoint,
    lora_layers,
    merge_lora,
    parameter_report,
    pick_device,
    save_adapter,
    save_checkpoint,
    set_fast_path,
)
from lora_lab.devices import autocast_for
from lora_lab.storage.peft_format import require_peft
from lora_lab.train import make_optimizer

FULL = GPTConfig(vocab_size=65, block_size=256, n_layer=6, n_head=6, n_embd=384, dropout=0.0)
QUICK = GPTConfig(vocab_size=65, block_size=32, n_layer=2, n_head=2, n_embd=64, dropout=0.0)
LORA = LoRAConfig(r=8, alpha=16.0, targets=("q_proj", "k_proj", "v_proj", "o_proj"))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


CLOCK = time.perf_counter  # set in main()


def timed_rounds(fns: dict, rounds: int, device) -> dict[str, float]:
    """Median seconds per call of each fn; the fns take turns in every round."""
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            sync(device)
            t0 = CLOCK()
            fn()
            sync(device)
            times[name].append(CLOCK() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def with_random_B(model, seed=0):
    """LoRA starts with B = 0; give B values, as after training, so the LoRA branch does real work."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.02)
    return model


def without_fast_path(model):
    set_fast_path(model, False)  # each adapted layer runs LoRALinear.forward alone
    return model


def peft_model(base, lora: LoRAConfig):
    peft = require_peft()
    config = peft.LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, target_modules=list(lora.targets), lora_dropout=lora.dropout
    )
    return peft.get_peft_model(copy.deepcopy(base), config)


# ----------------------------------------------------------------------------------------------


def bench_training(base, device, batch, rounds):
    print(f"\n## Training step (batch {batch} x {base.config.block_size} tokens, AdamW, forward+backward+step)")
    # The floor: every weight frozen and no LoRA branch, but gradients still flow back through every layer
    # (the token embedding, tied to the 65-wide head, is trainable), which is what LoRA would cost if its A/B
    # branch were free.
    floor = copy.deepcopy(base).requires_grad_(False)
    floor.tok_emb.weight.requires_grad_(True)
    models = {
        "full fine-tune": copy.deepcopy(base),
        "lora_lab LoRA": apply_lora(copy.deepcopy(base), LORA),
        "LoRA, reference layers": without_fast_path(apply_lora(copy.deepcopy(base), LORA)),
        "PEFT LoRA": peft_model(base, LORA),
        "floor (no A/B)": floor,
    }
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, base.config.vocab_size, (batch, base.config.block_size), generator=gen).to(device)
    steps, memory = {}, {}
    for name, model in models.items():
        model.to(device).train()
        opt = make_optimizer(model, TrainConfig())

        def step(model=model, opt=opt):
            with autocast_for(device):
                _, loss = model(x, x)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        steps[name] = step
        # memory, measured on the real tensors after one step: .grad before zero_grad, then optimizer.state
        with autocast_for(device):
            _, loss = model(x, x)
        loss.backward()
        grads = nbytes(p.grad for p in model.parameters() if p.grad is not None)
        opt.step()
        state = nbytes(v for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
        opt.zero_grad(set_to_none=True)
        memory[name] = (grads, state)
    # count the FLOPs autograd really runs: frozen weights (requires_grad=False) get no weight-gradient matmul
    flops = {}
    for name, model in models.items():
        with FlopCounterMode(display=False) as counter:
            with autocast_for(device):
                _, loss = model(x, x)
            loss.backward()
        flops[name] = counter.get_total_flops()
        model.zero_grad(set_to_none=True)
    timed_rounds(steps, 1, device)  # warm-up
    med = timed_rounds(steps, rounds, device)
    full, ours, peft = med["full fine-tune"], med["lora_lab LoRA"], med["PEFT LoRA"]
    for name, t in med.items():
        g, s = memory[name]
        print(
            f"  {name:<22} {t * 1000:9.1f} ms/step   fwd+bwd {flops[name] / 1e9:7.2f} GFLOP   "
            f"grads {g / 2**20:8.3f} MiB   optimizer state {s / 2**20:8.3f} MiB"
        )
    flop_ratio = flops["lora_lab LoRA"] / flops["full fine-tune"]
    floor = med["floor (no A/B)"]
    print(
        f"  LoRA / full step time:      {ours / full:.3f}x   (FLOP ratio {flop_ratio:.3f}; "
        f"floor / full {floor / full:.3f}x)"
    )
    # The CPU guard: no frozen-weight method beats the floor, so LoRA is judged against it, not against full.
    guard = (ours / full) / (floor / full)
    print(
        f"  (LoRA / full) / (floor / full): {guard:.3f}   "
        f"(guard: within 4% of the floor, <= 1.040: {'met' if guard <= 1.04 else 'NOT met'})"
    )
    print(f"  lora_lab / PEFT step time:  {ours / peft:.3f}x")
    print(
        f"  LoRA reference layers / full: {med['LoRA, reference layers'] / full:.3f}x   "
        f"(the q/k/v fast path saves {(med['LoRA, reference layers'] - ours) * 1000:.1f} ms/step)"
    )
    g_full, s_full = memory["full fine-tune"]
    g_lora, s_lora = memory["lora_lab LoRA"]
    print(
        f"  gradient memory LoRA / full: {g_lora / g_full:.4f}x   optimizer state LoRA / full: {s_lora / s_full:.4f}x"
    )


def bench_forward(base, device, rounds, gen_tokens):
    print("\n## Forward latency (no grad, eval mode)")
    unmerged = with_random_B(apply_lora(copy.deepcopy(base), LORA)).to(device).eval()
    merged = copy.deepcopy(unmerged)
    merge_lora(merged)
    models = {
        "base": base.to(device).eval(),
        "LoRA unmerged": unmerged,
        "LoRA merged": merged,
        "unmerged, reference layers": without_fast_path(copy.deepcopy(unmerged)),
    }
    T = base.config.block_size
    x32 = torch.randint(0, base.config.vocab_size, (32, T), generator=torch.Generator().manual_seed(1)).to(device)
    start = torch.zeros(1, 1, dtype=torch.long, device=device)

    def evaluate(model):
        with torch.no_grad(), autocast_for(device):
            model(x32)

    def generate(model):
        model.generate(start, gen_tokens, top_k=10, generator=None)

    ev = timed_rounds({n: (lambda m=m: evaluate(m)) for n, m in models.items()}, rounds, device)
    ge = timed_rounds({n: (lambda m=m: generate(m)) for n, m in models.items()}, rounds, device)
    for n in models:
        print(
            f"  {n:<26} batch-32 eval {ev[n] * 1000:9.1f} ms   "
            f"batch-1 generation {ge[n] / gen_tokens * 1000:7.2f} ms/token"
        )
    for n in ("LoRA merged", "LoRA unmerged", "unmerged, reference layers"):
        print(f"  {n} / base: eval {ev[n] / ev['base']:.3f}x, generation {ge[n] / ge['base']:.3f}x")
    with torch.no_grad():
        diff = (merged(x32[:4])[0] - unmerged(x32[:4])[0]).abs().max().item()
    print(f"  max |merged - unmerged| logit difference: {diff:.2e}")


def bench_adapters(base, device, rounds):
    print("\n## Adapter files and hot-swap")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = base.cpu()
        a = with_random_B(apply_lora(copy.deepcopy(base), LORA), seed=1)
        b = with_random_B(apply_lora(copy.deepcopy(base), LoRAConfig(r=4, targets=("up_proj", "down_proj"))), seed=2)
        save_adapter(a, tmp / "a")
        save_checkpoint(base, tmp / "base")
        adapter_bytes = (tmp / "a" / "adapter_model.safetensors").stat().st_size
        ckpt_bytes = (tmp / "base" / "model.safetensors").stat().st_size
        formula = parameter_report(a).lora_params * 4
        print(
            f"  adapter (r={LORA.r}, q/k/v/o) {adapter_bytes:,} B (Σ r(d+k)·4 = {formula:,} B)   "
            f"full checkpoint {ckpt_bytes:,} B   ratio {adapter_bytes / ckpt_bytes:.4f}"
        )

        model = copy.deepcopy(base).to(device)
        bank = AdapterBank(model)
        bank.add("a", a)
        bank.add("b", b)
        names = iter(["a", "b"] * (rounds + 1))
        swap = timed_rounds({"swap": lambda: bank.activate(next(names))}, 2 * rounds, device)["swap"]
        reload = timed_rounds({"reload": lambda: load_checkpoint(tmp / "base", device=device)}, rounds, device)
        reload = reload["reload"]
        print(
            f"  AdapterBank.activate {swap * 1000:8.2f} ms   full checkpoint reload {reload * 1000:8.2f} ms   "
            f"ratio {swap / reload:.3f}x"
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few iterations (a smoke run)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, ...")
    parser.add_argument("--batch", type=int, default=8, help="training batch size")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per measurement")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1 with --clock cpu)")
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu", help="CPU-device clock (see above)")
    args = parser.parse_args()
    global CLOCK
    device = pick_device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    CLOCK = time.process_time if device.type == "cpu" and args.clock == "cpu" else time.perf_counter
    if args.threads or CLOCK is time.process_time:
        torch.set_num_threads(args.threads or 1)  # CPU time is only meaningful with one thread
    config = QUICK if args.quick else FULL
    rounds = args.rounds or (2 if args.quick else 5)
    torch.manual_seed(0)
    base = GPT(config)
    report = parameter_report(apply_lora(copy.deepcopy(base), LORA))
    print(
        f"# bench_lora: {'quick' if args.quick else 'full'} on {device} ({torch.get_num_threads()} CPU threads), "
        f"torch {torch.__version__}, clock: {CLOCK.__name__}"
    )
    print(
        f"GPT {config.n_layer} layers, {config.n_head} heads, {config.n_embd} dims, block {config.block_size}: "
        f"{base.num_parameters() / 1e6:.2f}M parameters; LoRA r={LORA.r} on {', '.join(LORA.targets)}: "
        f"{report.lora_params:,} trainable ({report.trainable_fraction:.3%})"
    )
    bench_training(base, device, 4 if args.quick else args.batch, rounds)
    bench_forward(base, device, rounds, 8 if args.quick else 32)
    bench_adapters(base, device, rounds)


if __name__ == "__main__":
    main()

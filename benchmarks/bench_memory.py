"""Where a training step's memory goes: the memory ledger's regime table, the course's models, GPT-3's formula.

    python benchmarks/bench_memory.py            # the full tables (a few minutes on 2 CPU cores)
    python benchmarks/bench_memory.py --quick    # small sizes: a smoke run

Every figure is counted by lora_lab.experiments.memory.memory_ledger on one real training step (forward,
backward, AdamW): exact and the same on every machine. The regime sweep runs on the meta device (shapes only, so
any width costs nothing); the course's models run a real step on the CPU, QLoRA with a real NF4 base. On a CUDA
machine the last section also measures torch.cuda.max_memory_allocated beside the count; elsewhere it prints the
command to run there.
"""

from __future__ import annotations

import argparse
import copy
import platform
from dataclasses import replace
from datetime import datetime, timezone

import torch

from lora_lab import GPT, GPTConfig, LoRAConfig, apply_lora
from lora_lab.experiments import memory
from lora_lab.experiments.pretrained import PRESETS
from lora_lab.nf4 import quantize_base

LORA = LoRAConfig(r=4, alpha=8.0, targets=("q_proj", "v_proj"))  # the paper's GPT-3 setting
COURSE = {
    "tiny preset (4 x 128)": (PRESETS["tiny"][0], PRESETS["tiny"][1].batch_size),
    "10.65M (6 x 384)": (PRESETS["small"][0], 8),  # batch 8, not the preset's 64: a real CPU step stays small
}
QUICK = {"quick (2 x 64)": (GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=64), 4)}


def mb(n: float) -> str:
    return memory.decimal_bytes(n)


def course_ledgers(config: GPTConfig, batch_size: int, device: str, checkpointing: bool):
    """Full, LoRA and QLoRA (a real NF4 base) ledgers of one step of GPT(config) at its block size."""
    config = replace(config, vocab_size=65, dropout=0.0)
    torch.manual_seed(0)
    base = GPT(config)
    models = {
        "full": copy.deepcopy(base),
        "LoRA": apply_lora(copy.deepcopy(base), LORA),
        "QLoRA": apply_lora(quantize_base(copy.deepcopy(base)), LORA),
    }
    return {
        name: memory.memory_ledger(m.to(device), batch_size, config.block_size, checkpointing=checkpointing)
        for name, m in models.items()
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    print(
        f"# bench_memory  {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC  torch {torch.__version__}  "
        f"{platform.processor() or platform.machine()}  {torch.cuda.get_device_name() if cuda else 'no GPU'}\n"
    )

    widths, shapes = ((128, 256), ((1, 32), (8, 128))) if args.quick else ((128, 512, 2048, 8192), None)
    rows = memory.memory_regime(widths, shapes) if shapes else memory.memory_regime(widths)
    print("## The regime: LoRA/full and QLoRA/full of the whole step (meta device, 2 layers, LoRA r=4 on Wq, Wv)\n")
    print(memory.format_regime(rows))
    best = min(rows, key=lambda r: r.lora_over_full)
    worst = max(rows, key=lambda r: r.lora_over_full)
    print(
        f"\nLargest saving: width {best.n_embd}, {best.batch_size} x {best.seq_len}, checkpointing "
        f"{best.checkpointing}: LoRA needs {best.lora_over_full:.2f} of full ({1 / best.lora_over_full:.1f}x less), "
        f"QLoRA {best.qlora_over_full:.3f} ({1 / best.qlora_over_full:.1f}x less); activations are "
        f"{best.activation_share:.0%} of full fine-tuning's memory."
    )
    print(
        f"Smallest: width {worst.n_embd}, {worst.batch_size} x {worst.seq_len}, checkpointing {worst.checkpointing}: "
        f"LoRA {worst.lora_over_full:.2f} of full ({1 / worst.lora_over_full:.2f}x less); activations "
        f"{worst.activation_share:.0%}.\n"
    )

    print("## The course's models: one real CPU step, fp32, each model's block size\n")
    print("| model | batch x seq | ckpt | method | frozen | trainable | gradients | AdamW | activations | buffers "
          "| total | vs full |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for label, (config, batch) in (QUICK if args.quick else COURSE).items():
        for ckpt in (False, True):
            ledgers = course_ledgers(config, batch, "cpu", ckpt)
            full = ledgers["full"].total
            for name, led in ledgers.items():
                cells = [
                    label,
                    f"{batch} x {config.block_size}",
                    "yes" if ckpt else "no",
                    name,
                    *(mb(getattr(led, k)) for k in memory.KINDS[:4]),
                    mb(led.activations),
                    mb(led.buffers),
                    mb(led.total),
                    f"{led.total / full:.2f}",
                ]
                print("| " + " | ".join(cells) + " |")

    n, n_lora, gpt3 = memory.gpt3_memory()
    print(
        f"\n## GPT-3 175B through the same formula: {n:,} parameters, LoRA r=4 on Wq, Wv trains {n_lora:,}\n"
        "\nWeights, gradients and optimizer state only (the paper gives no batch, so no activations).\n"
    )
    print("| accounting | frozen B/param | trainable B/param | full | LoRA | full/LoRA |")
    print("|---|---|---|---|---|---|")
    for r in gpt3:
        print(
            f"| {r.accounting} | {r.frozen_bytes} | {r.trainable_bytes} | {mb(r.full)} | {mb(r.lora)} | {r.ratio:.1f} |"
        )
    print(
        f"| the paper (Hu et al. 2021) | | | {mb(memory.PAPER_FULL_BYTES)} | {mb(memory.PAPER_LORA_BYTES)} | "
        f"{memory.PAPER_FULL_BYTES / memory.PAPER_LORA_BYTES:.1f} |"
    )
    print(
        f"\nThe paper's figures per parameter: full {memory.PAPER_FULL_BYTES / n:.2f} bytes, LoRA "
        f"{memory.PAPER_LORA_BYTES / n:.2f} bytes (fp16 weights alone are 2)."
    )

    print("\n## Measured on a GPU (torch.cuda.max_memory_allocated beside the count)\n")
    if not cuda:
        print("unmeasured: no GPU lent. On a CUDA machine run: `python benchmarks/bench_memory.py`")
        return
    print("| model | ckpt | method | counted total | measured peak | peak / counted |")
    print("|---|---|---|---|---|---|")
    for label, (config, batch) in (QUICK if args.quick else COURSE).items():
        for ckpt in (False, True):
            for name, led in course_ledgers(config, batch, "cuda", ckpt).items():
                print(
                    f"| {label} | {'yes' if ckpt else 'no'} | {name} | {mb(led.total)} | {mb(led.measured_peak)} "
                    f"| {led.measured_peak / led.total:.2f} |"
                )


if __name__ == "__main__":
    main()

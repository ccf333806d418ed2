"""Scaling out: DDP gradient traffic (full vs LoRA) and mixed-adapter batches vs separate passes vs swapping.

    python benchmarks/bench_scale.py            # the 10.65M config for traffic (2 gloo CPU processes), tiny for serving
    python benchmarks/bench_scale.py --quick    # small sizes: a smoke run

Traffic is counted by a DDP communication hook (lora_lab.distributed.GradientTraffic) inside train() under
DDP with 2 CPU processes; it is exact (bytes of every gradient bucket), so a few steps suffice. Serving
throughput is the median of --repeats timed forward passes (1 thread, no grad) after a warm-up.
"""

from __future__ import annotations

import argparse
import platform
from datetime import datetime, timezone

import torch

from lora_lab import GPT, GPTConfig, LoRAConfig
from lora_lab.experiments.scaling import adapted_copies, gradient_traffic, lora_matrix_fraction, mixed_batch_throughput

SMALL = GPTConfig(vocab_size=65, block_size=256, n_layer=6, n_head=6, n_embd=384, dropout=0.0)  # 10.65M
TINY = GPTConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128, dropout=0.0)  # the tiny preset
QUICK = GPTConfig(vocab_size=65, block_size=32, n_layer=2, n_head=2, n_embd=64, dropout=0.0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--ranks", default="1,4,8,16", help="LoRA ranks for the traffic table (q_proj, v_proj)")
    p.add_argument("--adapters", default="2,4,8", help="numbers of adapters in one batch")
    p.add_argument("--rows", default="1,4", help="rows per adapter")
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    torch.set_num_threads(1)
    traffic_config, serve_config = (QUICK, QUICK) if args.quick else (SMALL, TINY)
    ranks = [int(r) for r in args.ranks.split(",")]
    print(
        f"# bench_scale  {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC  torch {torch.__version__}  "
        f"{platform.processor() or platform.machine()}  1 thread per process\n"
    )

    print(
        f"## DDP gradient traffic per step and rank, {traffic_config.n_layer} layers x {traffic_config.n_embd} "
        "dims, 2 CPU processes (gloo)\n"
    )
    configs = [None] + [LoRAConfig(r=r, alpha=2 * r, targets=("q_proj", "v_proj")) for r in ranks]
    rows = gradient_traffic(traffic_config, configs)
    full = rows[0].bytes_per_step
    d = traffic_config.n_embd
    adapted_matrices = 2 * traffic_config.n_layer * d * d  # q_proj and v_proj: d x d each, per layer
    print(
        "| method | trainable | all-reduced bytes/step | 4 x trainable | vs full | vs full of the adapted "
        "matrices | r(d+k)/(dk) |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row, config in zip(rows, configs):
        per_matrix = "1" if config is None else f"{lora_matrix_fraction(config.r, d, d):.4f}"
        vs_matrices = "-" if config is None else f"{row.bytes_per_step / (4 * adapted_matrices):.4f}"
        print(
            f"| {row.method} | {row.trainable:,} | {row.bytes_per_step:,.0f} | {row.predicted_bytes:,} | "
            f"{row.bytes_per_step / full:.5f} | {vs_matrices} | {per_matrix} |"
        )

    print(
        f"\n## One batch, many adapters: {serve_config.n_layer} layers x {serve_config.n_embd} dims, "
        f"sequence {serve_config.block_size}, LoRA r=8 on q_proj+v_proj, tokens/s (higher is better)\n"
    )
    torch.manual_seed(0)
    base = GPT(serve_config).eval()
    print("| adapters | rows each | one mixed batch | one pass per adapter | swap adapters on one base |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for n in [int(a) for a in args.adapters.split(",")]:
        adapters = adapted_copies(base, LoRAConfig(r=8, alpha=16, targets=("q_proj", "v_proj")), n)
        for rows_each in [int(r) for r in args.rows.split(",")]:
            result = mixed_batch_throughput(base, adapters, rows_each, args.repeats)
            print(f"| {n} | {rows_each} | " + " | ".join(f"{r.tokens_per_second:,.0f}" for r in result) + " |")


if __name__ == "__main__":
    main()

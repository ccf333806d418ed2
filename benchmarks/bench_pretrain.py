"""Pretraining benchmark: nanoGPT's published CPU shakespeare-char config on lora_lab's GPT.

Trains the same budget twice: with lora_lab's default rotary positions ("rope") and with nanoGPT's
learned position table ("learned", nanoGPT's model exactly). Prints training throughput (tokens/s,
ms/iter, evaluations excluded) and the final losses: over 200 seeded batches as nanoGPT estimates them,
and exactly, over every character of the split. nanoGPT publishes validation loss 1.88 for this budget;
it ran at ~45 ms/iter (~17k tokens/s) on this project's 2-core machines.

    LORA_LAB_DATA=../shared/data/tiny_shakespeare python benchmarks/bench_pretrain.py
    python benchmarks/bench_pretrain.py --iters 200 --positions rope     # a quick look
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from lora_lab import GPT, CharDataset, GPTConfig, TrainConfig, estimate_loss, train


@torch.no_grad()
def whole_split_loss(model: GPT, data: torch.Tensor, batch_size: int = 64) -> float:
    """Mean loss over every character of `data`, cut into back-to-back block_size windows: the exact
    value that random-window estimates (estimate_loss) approach, since both see every context length
    0..block_size-1 equally often."""
    model.eval()
    block = model.config.block_size
    n = (len(data) - 1) // block
    x, y = data[: n * block].view(n, block), data[1 : n * block + 1].view(n, block)  # (n, block) each
    total = 0.0
    for i in range(0, n, batch_size):
        _, loss = model(x[i : i + batch_size], y[i : i + batch_size])
        total += loss.item() * x[i : i + batch_size].numel()
    return total / (n * block)


def run(positions: str, data: CharDataset, args: argparse.Namespace) -> None:
    config = GPTConfig(
        vocab_size=data.tokenizer.vocab_size,
        block_size=64,
        n_layer=4,
        n_head=4,
        n_embd=128,
        dropout=0.0,
        positions=positions,
    )
    train_config = TrainConfig(
        max_iters=args.iters,
        batch_size=12,
        learning_rate=1e-3,
        min_lr=1e-4,
        warmup_iters=100,
        lr_decay_iters=args.iters,
        eval_interval=max(args.iters // 4, 1),
        eval_iters=20,
        seed=args.seed,
        device=args.device,
        bf16=not args.fp32,
    )
    torch.manual_seed(args.seed)
    model = GPT(config)
    start = time.perf_counter()
    result = train(model, data.splits["train"], data.splits["validation"], train_config, progress=False)
    wall = time.perf_counter() - start
    # nanoGPT validates on the last 10% of input.txt, which is this dataset's validation + test splits.
    splits = {
        "train": data.splits["train"],
        "val": data.splits["validation"],
        "nanogpt_val": torch.cat([data.splits["validation"], data.splits["test"]]),
    }
    sampled = estimate_loss(
        model,
        splits,
        batch_size=12,
        eval_iters=args.final_eval_iters,
        seed=0,
        device=next(model.parameters()).device,
        use_bf16=not args.fp32,
    )
    model.cpu()
    exact = {name: whole_split_loss(model, split) for name, split in splits.items() if name != "train"}
    print(f"\n== positions={positions}: {model.num_parameters():,} parameters, config {config}")
    print(
        f"throughput: {result.tokens_per_second:,.0f} tokens/s, {1000 * result.seconds / args.iters:.1f} ms/iter "
        f"(training steps only; wall time with evaluations {wall:.1f} s)"
    )
    for ev in result.evals:
        print(f"  iter {ev['iter']:5d}: train {ev['train']:.4f}  val {ev['val']:.4f}  (20 batches)")
    print(
        f"final loss, {args.final_eval_iters} batches: train {sampled['train']:.4f}  val {sampled['val']:.4f}  "
        f"nanoGPT's val (last 10%) {sampled['nanogpt_val']:.4f}"
    )
    print(f"final loss, every character: val {exact['val']:.4f}  nanoGPT's val (last 10%) {exact['nanogpt_val']:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=2000, help="training iterations (nanoGPT: 2000)")
    parser.add_argument(
        "--positions",
        nargs="+",
        default=["rope", "learned"],
        choices=["rope", "learned"],
        help="position encodings to train, one run each (default: both)",
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument(
        "--fp32",
        action="store_true",
        help="no bf16 autocast (lora_lab's default uses it on CUDA and on CPUs with native bf16)",
    )
    parser.add_argument("--final-eval-iters", type=int, default=200, help="batches per split for the sampled losses")
    parser.add_argument("--data", default=None, help="dataset location (default: $LORA_LAB_DATA, then the hub)")
    args = parser.parse_args()

    data = CharDataset.load(args.data)
    print(
        f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}, device {args.device}"
    )
    print(f"iters: {args.iters}, tokens/iter: {12 * 64}, seed {args.seed}")
    for positions in args.positions:
        run(positions, data, args)


if __name__ == "__main__":
    main()

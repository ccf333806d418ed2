"""Pretraining benchmark: nanoGPT's published CPU shakespeare-char config on lora_lab's GPT.

Prints training throughput (tokens/s, ms/iter, evaluations excluded) and the final train/validation
losses. nanoGPT publishes validation loss 1.88 for this budget; it ran at ~45 ms/iter (~17k tokens/s)
on this project's 2-core machines.

    LORA_LAB_DATA=../shared/data/tiny_shakespeare python benchmarks/bench_pretrain.py
    python benchmarks/bench_pretrain.py --iters 200        # a quick look
"""
from __future__ import annotations

import argparse
import platform
import time

import torch

from lora_lab import CharDataset, GPT, GPTConfig, TrainConfig, estimate_loss, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=2000, help="training iterations (nanoGPT: 2000)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--final-eval-iters", type=int, default=200, help="batches per split for the final losses")
    parser.add_argument("--data", default=None, help="dataset location (default: $LORA_LAB_DATA, then the hub)")
    args = parser.parse_args()

    data = CharDataset.load(args.data)
    config = GPTConfig(vocab_size=data.tokenizer.vocab_size, block_size=64, n_layer=4, n_head=4, n_embd=128, dropout=0.0)
    train_config = TrainConfig(
        max_iters=args.iters, batch_size=12, learning_rate=1e-3, min_lr=1e-4, warmup_iters=100,
        lr_decay_iters=args.iters, eval_interval=max(args.iters // 4, 1), eval_iters=20, seed=args.seed,
        device=args.device,
    )
    torch.manual_seed(args.seed)
    model = GPT(config)
    start = time.perf_counter()
    result = train(model, data.splits["train"], data.splits["validation"], train_config, progress=False)
    wall = time.perf_counter() - start
    # nanoGPT validates on the last 10% of input.txt, which is this dataset's validation + test splits.
    nanogpt_val = torch.cat([data.splits["validation"], data.splits["test"]])
    final = estimate_loss(
        model,
        {"train": data.splits["train"], "val": data.splits["validation"], "nanogpt_val": nanogpt_val},
        batch_size=12, eval_iters=args.final_eval_iters, seed=0, device=next(model.parameters()).device,
    )
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, device {train_config.device}")
    print(f"model: {model.num_parameters():,} parameters, config {config}")
    print(f"iters: {args.iters}, tokens/iter: {12 * 64}")
    print(f"throughput: {result.tokens_per_second:,.0f} tokens/s, {1000 * result.seconds / args.iters:.1f} ms/iter "
          f"(training steps only; wall time with evaluations {wall:.1f} s)")
    for ev in result.evals:
        print(f"  iter {ev['iter']:5d}: train {ev['train']:.4f}  val {ev['val']:.4f}  (20 batches)")
    print(f"final loss over {args.final_eval_iters} batches: train {final['train']:.4f}  val {final['val']:.4f}  "
          f"nanoGPT's val (last 10%: validation + test) {final['nanogpt_val']:.4f}")


if __name__ == "__main__":
    main()

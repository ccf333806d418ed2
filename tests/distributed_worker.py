"""Run by tests/test_distributed.py under `torchrun --nproc_per_node 2`: trains a tiny GPT fully and with LoRA
through the ordinary train(), which joins torchrun's process group by itself, and writes what each rank ended
with to OUT/rank{r}.safetensors and OUT/rank{r}.json (the test's own files; train() writes none)."""

import json
import os
import sys

import torch
from safetensors.torch import save_file

from lora_lab import GPT, GPTConfig, LoRAConfig, TrainConfig, apply_lora, train

torch.set_num_threads(1)
CONFIG = GPTConfig(vocab_size=13, block_size=16, n_layer=2, n_head=2, n_embd=32)
PER_RANK = dict(
    max_iters=12,
    batch_size=4,
    eval_interval=6,
    eval_iters=2,
    warmup_iters=2,
    device="cpu",
    learning_rate=3e-3,
    min_lr=3e-4,
    seed=5,
    bf16=False,
)  # fp32: bf16 rounding would hide the check


def token_data(n=3000, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, CONFIG.vocab_size, (n,), generator=gen)


def fresh(lora: bool):
    torch.manual_seed(0)
    model = GPT(CONFIG)
    return apply_lora(model, LoRAConfig(r=2, alpha=4, targets=("q_proj", "v_proj"))) if lora else model


def main(out: str) -> None:
    rank = int(os.environ["RANK"])
    record, weights = {}, {}
    for kind in ("full", "lora"):
        model = fresh(kind == "lora")
        res = train(model, token_data(), token_data(seed=1), TrainConfig(**PER_RANK), progress=False)
        record[kind] = {
            "losses": res.losses,
            "evals": res.evals,
            "notes": res.notes,
            "tokens": res.tokens,
            "gradient_bytes_per_step": res.gradient_bytes_per_step,
        }
        weights.update({f"{kind}.{n}": p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad})
    model = fresh(lora=True)
    model.stray = torch.nn.Parameter(torch.zeros(3))  # trainable, never used by forward()
    try:
        train(model, token_data(), None, TrainConfig(**PER_RANK), progress=False)
        record["unused_error"] = None
    except ValueError as err:
        record["unused_error"] = str(err)
    save_file(weights, os.path.join(out, f"rank{rank}.safetensors"))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    main(sys.argv[1])

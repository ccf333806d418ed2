"""The headline task's gaps: how much of the base -> full fine-tuning gap each method closes on `echo` (and on
rot13 for contrast), with paired seeds, learning rates chosen on the validation text and numbers on the test text.

    LORA_LAB_DATA=... python benchmarks/bench_headline.py [--steps 150] [--seeds 5] [--tasks echo,rot13]

Methods: embedding only (the tied token embedding trained, everything else frozen), LoRA r=8 on attention
(q/k/v/o), LoRA r=8 on the MLP, LoRA r=8 on attention + the embedding, and full fine-tuning. Each method's rate
is chosen from a factor-2 grid on the validation text with a selection seed that is not reported; then each runs
with the reported seeds (the same seed gives every method the same batches) and is scored on the test text.
Prints a Markdown table and, per task, each method's share of the gap with a paired 95% t-interval.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time

import torch

import lora_lab
from lora_lab import LoRAConfig, apply_lora, tasks
from lora_lab.experiments.defaults import finetune_config
from lora_lab.experiments.estimator import encode_task, task_scores
from lora_lab.experiments.finetune import train_with_curve
from lora_lab.experiments.stats import holm_adjust, paired_difference

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
METHODS = {
    "embedding only": (None, (4e-3, 8e-3, 1.6e-2, 3.2e-2)),
    "LoRA attention r=8": (LoRAConfig(r=8, alpha=16, targets=ATTENTION), (4e-3, 8e-3, 1.6e-2, 3.2e-2)),
    "LoRA MLP r=8": (LoRAConfig(r=8, alpha=16, targets=("up_proj", "down_proj")), (4e-3, 8e-3, 1.6e-2, 3.2e-2)),
    "LoRA attention + embedding": (
        LoRAConfig(r=8, alpha=16, targets=ATTENTION, trainable=("tok_emb",)),
        (4e-3, 8e-3, 1.6e-2),
    ),
    "full FT": ("full", (5e-4, 1e-3, 2e-3, 4e-3)),
}
SELECTION_SEED = 1000


def prepared(base, method):
    model = copy.deepcopy(base).cpu()
    if method == "full":
        model.requires_grad_(True)
    elif method is None:
        model.requires_grad_(False)
        model.tok_emb.weight.requires_grad_(True)  # tied: the output head trains with it
    else:
        apply_lora(model, method)
    return model


def run(base, task_data, method, lr, seed, steps, eval_chars):
    full = method == "full"
    cfg = finetune_config(full=full, max_iters=steps, learning_rate=lr, seed=seed, device="cpu")
    torch.manual_seed(seed)
    model = prepared(base, method)
    trained = train_with_curve(model, task_data, cfg, eval_chars, points=2)
    return model, trained.curve[-1]["target"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--tasks", default="echo,rot13")
    ap.add_argument("--eval-chars", type=int, default=4096)
    ap.add_argument("--json", default=None, help="also write the raw numbers here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    base = lora_lab.pretrained_base("tiny", progress=False)
    tokenizer = base.dataset.tokenizer
    raw = {
        "command": "python benchmarks/bench_headline.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "tasks": {},
    }
    t0 = time.time()
    for name in args.tasks.split(","):
        task = tasks.make_task(name, base.texts)
        if task.test is None:
            raise SystemExit(f"task {name} has no test text")
        selection = encode_task(task, tokenizer)  # train + validation texts only
        test = {**selection, "target": torch.tensor(tokenizer.encode(task.test)),
                "source": torch.tensor(tokenizer.encode(task.source_test))}  # fmt: skip
        base_test = task_scores(base.model, test, args.eval_chars)["target"]
        results = {}
        for label, (method, grid) in METHODS.items():
            scores = {lr: run(base.model, selection, method, lr, SELECTION_SEED, args.steps, args.eval_chars)[1]
                      for lr in grid}  # fmt: skip
            lr = min(scores, key=scores.get)
            values = []
            for seed in range(args.seeds):
                model, _ = run(base.model, selection, method, lr, seed, args.steps, args.eval_chars)
                values.append(task_scores(model.eval(), test, args.eval_chars)["target"])
            results[label] = {"lr": lr, "grid": scores, "test": values}
            print(f"{name} {label}: lr {lr:g} (validation {scores}), test {[round(v, 4) for v in values]}",
                  flush=True)  # fmt: skip
        full_values = results["full FT"]["test"]
        gap = [base_test - f for f in full_values]
        rows = []
        diffs = {label: paired_difference(r["test"], full_values) for label, r in results.items() if label != "full FT"}
        adjusted = dict(zip(diffs, holm_adjust([d.p_value for d in diffs.values()])))
        print(f"\n### {name}: base test loss {base_test:.4f}; {args.steps} steps, {args.seeds} paired seeds\n")
        print(
            "| method | lr | test loss (mean) | share of the base-full gap closed | minus full FT (95% CI) | Holm p |"
        )
        print("| --- | ---: | ---: | ---: | --- | ---: |")
        for label, r in results.items():
            mean = sum(r["test"]) / len(r["test"])
            share = sum((base_test - v) / g for v, g in zip(r["test"], gap)) / len(gap)
            d = diffs.get(label)
            ci = f"{d.mean:+.4f} ({d.low:+.4f} to {d.high:+.4f})" if d else "-"
            p = f"{adjusted[label]:.3g}" if d else "-"
            print(f"| {label} | {r['lr']:g} | {mean:.4f} | {share:.0%} | {ci} | {p} |")
            rows.append({"method": label, "share": share, **r})
        raw["tasks"][name] = {"base_test": base_test, "methods": rows}
    raw["seconds"] = time.time() - t0
    print(f"\n{raw['seconds']:.0f} s; {raw['command']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(raw, f, indent=1)


if __name__ == "__main__":
    main()

"""Run lora_lab's comparison protocol on the tiny base and print its tables (benchmarks/RESULTS_protocol.md).

    python benchmarks/bench_protocol.py                    # rot13 and shout, the rank and target studies
    python benchmarks/bench_protocol.py --tasks rot13 --skip-studies
    python benchmarks/bench_protocol.py --tasks ''                 # only the studies, at LORA_LEARNING_RATE

For each task: base, LoRA (r=8, alpha=16, q,k,v,o) and full fine-tuning, each with its learning-rate grid
swept on seed 0 and the chosen rate run on the paired seeds 0-4, with verdicts (95% t intervals, Holm) on the
per-seed differences (see lora_lab/experiments/protocol.py). Then, on rot13:
‖ΔW‖_F vs r with alpha fixed at 16 (scale alpha/r) and with alpha = 2r, and attention-only vs MLP-only
LoRA at an equal parameter budget. Every run is cached under the model cache, so a rerun prints at once.
The wall time of each block is printed (CPU, 1 thread per run, --workers runs side by side).
"""

from __future__ import annotations

import argparse
import time

import torch

from lora_lab import pretrained_base, tasks
from lora_lab.experiments import defaults, estimator, reports, studies
from lora_lab.experiments.parallel import default_workers


def timed(title: str, fn):
    t0 = time.perf_counter()
    out = fn()
    print(f"\n[{title}: {time.perf_counter() - t0:.0f} s wall]")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="rot13,shout", help="tasks for lora_vs_full(sweep=True); '' for none")
    parser.add_argument("--steps", type=int, default=defaults.STEPS)
    parser.add_argument("--skip-studies", action="store_true")
    parser.add_argument("--workers", type=int, default=default_workers(), help="runs trained side by side")
    args = parser.parse_args()
    torch.set_num_threads(1)
    base = pretrained_base("tiny", device="cpu", progress=False)
    tok = base.dataset.tokenizer
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread; base {base.path.name}")
    for name in tasks.TASKS:
        task = tasks.make_task(name, base.texts)
        t0 = time.perf_counter()
        s = estimator.task_scores(base.model, estimator.encode_task(task, tok))
        print(
            f"base on {name}: target {s['target']:.4f} (accuracy {s['target_accuracy']:.4f}), source "
            f"{s['source']:.4f}, gap target - source {s['target'] - s['source']:+.4f} nats "
            f"(scored in {time.perf_counter() - t0:.1f} s)"
        )

    lora_label = "LoRA r=8"
    rot13_lora_lr = defaults.LORA_LEARNING_RATE
    for name in filter(None, args.tasks.split(",")):
        task = tasks.make_task(name, base.texts)
        comp = timed(
            f"studies.lora_vs_full(sweep=True) on {name}",
            lambda: studies.lora_vs_full(
                base.model, task, tok, sweep=True, steps=args.steps, log=print, workers=args.workers
            ),
        )
        print("\n" + comp.to_text())
        print(f"LoRA's chosen lr / full FT's: {studies.lr_ratio(comp, lora_label):g}")
        if name == "rot13":
            rot13_lora_lr = comp.result(lora_label).chosen_lr

    if args.skip_studies:
        return
    task = tasks.make_task("rot13", base.texts)
    for rule, alpha in (("alpha = 16 (fixed, scale 16/r)", 16.0), ("alpha = 2r (scale 2)", lambda r: 2.0 * r)):
        comp = timed(
            f"studies.norm_by_rank, {rule}",
            lambda: studies.norm_by_rank(
                base.model,
                task,
                tok,
                alpha=alpha,
                learning_rate=rot13_lora_lr,
                steps=args.steps,
                log=print,
                workers=args.workers,
            ),
        )
        print(f"\n‖ΔW‖_F vs r, {rule}, lr {rot13_lora_lr:g} (mean over the 16 adapted matrices; mean ± std over seeds)")
        print(reports.format_table(studies.delta_norm_rows(comp)))
        print(comp.to_text())

    comp = timed(
        "studies.attention_vs_mlp",
        lambda: studies.attention_vs_mlp(
            base.model, task, tok, learning_rate=rot13_lora_lr, steps=args.steps, log=print, workers=args.workers
        ),
    )
    print("\n" + comp.to_text())


if __name__ == "__main__":
    main()

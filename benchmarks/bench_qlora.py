"""QLoRA on the cached tiny base: bits per weight, the base's own loss after 4-bit quantization, and QLoRA vs
16-bit LoRA vs full fine-tuning over paired seeds.

    LORA_LAB_DATA=... python benchmarks/bench_qlora.py                  # 5 seeds x 3 methods, 100 steps each
    LORA_LAB_DATA=... python benchmarks/bench_qlora.py --seeds 0 --steps 20    # a smoke run (no interval)
    LORA_LAB_DATA=... python benchmarks/bench_qlora.py --seeds ''               # sections 1 and 2 only

1. Bits per weight of the quantized layers (the attention and MLP linears: nf4.quantize_base's default), with
   and without double quantization, counted from the stored tensors.
2. The base's validation loss (the whole source-domain validation text, exact: estimator.split_scores) in fp32,
   in NF4 with and without double quantization, and with a plain symmetric 4-bit integer absmax quantizer on the
   same blocks of 64 (codes -7..7, fp32 absmax: 4.5 bits per weight, as NF4 without double quantization) - the
   QLoRA paper's comparison of data types. Also the weights' relative reconstruction error.
3. QLoRA (NF4 base + LoRA r=8 on q,k,v,o) vs 16-bit LoRA (same config, fp32 base) vs full fine-tuning on the
   headline task, each through experiments.finetune with the chosen defaults (experiments.defaults) except the
   number of steps; seeds paired (seed i draws the same A matrices and the same batches for every method). The
   difference QLoRA - LoRA (and QLoRA - full) in final target loss gets a 95% t-interval (experiments.stats).
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import subprocess
import time

import torch
import torch.nn as nn

from lora_lab import pretrained_base, tasks
from lora_lab.experiments.defaults import DEFAULT_TASK, EVAL_CHARS, default_lora_config, finetune_config
from lora_lab.experiments.estimator import split_scores
from lora_lab.experiments.finetune import finetune
from lora_lab.experiments.stats import MIN_SEEDS, paired_difference
from lora_lab.nf4 import (
    DEFAULT_TARGETS,
    bits_per_parameter,
    dequantize_nf4,
    nf4_layers,
    quantize_base,
    quantize_nf4,
    unpack_codes,
)
from lora_lab.targets import target_linears

INT4_MAX = 7  # symmetric 4-bit integers: -7..7 (15 of the 16 codes, so that 0 is exact, as in NF4)


def int4_absmax(w: torch.Tensor, block_size: int = 64) -> torch.Tensor:
    """The plain baseline: each block of 64 scaled by its absmax to [-1, 1] and rounded to 15 evenly spaced levels."""
    blocks = w.detach().float().reshape(-1, block_size)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    return (torch.round(blocks / safe * INT4_MAX) / INT4_MAX * absmax).view(w.shape).to(w.dtype)


def with_weights(model: nn.Module, make) -> nn.Module:
    """A copy of `model` whose quantize_base targets hold make(W) instead of W (still plain nn.Linear layers)."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for linear in target_linears(model, DEFAULT_TARGETS, 1).values():
            linear.weight.copy_(make(linear.weight))
    return model


def relative_error(model: nn.Module, make) -> float:
    """||make(W) - W||_F / ||W||_F over all quantized layers together."""
    num = den = 0.0
    for linear in target_linears(model, DEFAULT_TARGETS, 1).values():
        w = linear.weight.detach().float()
        num += (make(w) - w).pow(2).sum().item()
        den += w.pow(2).sum().item()
    return (num / den) ** 0.5


def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated paired seeds (at least 5 for an interval)")
    p.add_argument("--steps", type=int, default=100, help="fine-tuning steps per run")
    p.add_argument("--task", default=DEFAULT_TASK)
    p.add_argument("--eval-chars", type=int, default=EVAL_CHARS, help="characters scored for the fine-tune tables")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",") if s]
    torch.set_num_threads(1)  # finetune runs at one CPU thread anyway; the base scores too, so they repeat
    print(f"machine: {machine()}, torch {torch.__version__}, 1 thread")
    start = time.time()

    base = pretrained_base("tiny", progress=False)
    model = base.model.eval()
    c = model.config
    print(f"base: tiny preset, {c.n_layer} layers x {c.n_embd} dims, {model.num_parameters():,} parameters")

    # 1. Bits per weight
    print("\n## 1. Bits per weight of the quantized layers (attention + MLP linears)")
    print("| storage | bits per weight | bytes of these layers |")
    print("| --- | --- | --- |")
    linears = target_linears(model, DEFAULT_TARGETS, 1)
    numel = sum(lin.weight.numel() for lin in linears.values())
    print(f"| fp32 | 32 | {numel * 4:,} |")
    for dq in (False, True):
        qs = [quantize_nf4(lin.weight, double_quant=dq) for lin in linears.values()]
        bits = sum(bits_per_parameter(q) * q.numel for q in qs) / numel
        print(f"| NF4{' + double quant' if dq else ''} | {bits:.4f} | {round(bits * numel / 8):,} |")
    big = quantize_nf4(torch.randn(1024, 1024))  # a width at which the one mean no longer shows
    print(f"(NF4 + double quant of a 1024 x 1024 weight: {bits_per_parameter(big):.4f} bits per weight)")

    # Agreement with the field's implementations, on the same weights (where they are installed)
    print("\nagreement on these weights (4-bit codes; bitsandbytes without double quant, torchao with):")
    ours = torch.cat([unpack_codes(quantize_nf4(lin.weight, double_quant=False).codes) for lin in linears.values()])
    try:
        import bitsandbytes.functional as bnbf

        packed = [
            bnbf.quantize_4bit(lin.weight.detach(), blocksize=64, quant_type="nf4")[0] for lin in linears.values()
        ]
        theirs = torch.cat([unpack_codes(t.flatten()) for t in packed])
        print(
            f"  bitsandbytes quantize_4bit: {(ours != theirs).sum().item()} of {ours.numel():,} codes differ (its "
            "table and ours differ in the last fp32 digits, <= 2e-7: those weights lie that close to a midpoint)"
        )
    except ImportError:
        print("  bitsandbytes: not installed")
    try:
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

        theirs = torch.cat([unpack_codes(to_nf4(lin.weight.detach()).quantized_data) for lin in linears.values()])
        print(
            f"  torchao to_nf4: {(ours != theirs).sum().item()} of {ours.numel():,} codes differ (its codebook "
            "is ours rounded to 4 decimals: those weights lie within 5e-5 of a midpoint between two codes)"
        )
    except ImportError:
        print("  torchao: not installed")

    # 2. The base's own loss after quantization
    print(f"\n## 2. The base's validation loss (all {len(base.dataset.splits['validation']) - 1:,} characters, exact)")
    print("| base weights | bits per weight | validation loss | accuracy | relative weight error |")
    print("| --- | --- | --- | --- | --- |")
    nf4 = lambda dq: lambda w: dequantize_nf4(quantize_nf4(w, double_quant=dq), w.dtype)  # noqa: E731
    rows = [
        ("fp32", 32, None),
        ("NF4 + double quant", None, nf4(True)),
        ("NF4", 4.5, nf4(False)),
        ("int4 absmax (same blocks)", 4.5, int4_absmax),
    ]
    val = base.dataset.splits["validation"]
    for name, bits, make in rows:
        if name == "NF4 + double quant":  # the real thing: NF4Linear layers, dequantized in forward
            scored = quantize_base(copy.deepcopy(model))
            layers = nf4_layers(scored).values()
            bits = sum(l.bits_per_parameter() * l.in_features * l.out_features for l in layers) / numel
        else:
            scored = model if make is None else with_weights(model, make)
        s = split_scores(scored, val, None)
        err = 0.0 if make is None else relative_error(model, make)
        print(f"| {name} | {bits:.3f} | {s['loss']:.4f} | {s['accuracy']:.4f} | {err:.4f} |")

    # Where each quantizer loses: the error by a weight's size within its block (|w| / block absmax)
    print("\nrelative weight error by |w| / block absmax (NF4 spends its codes near 0, int4 evenly):")
    print("| \\|w\\| / absmax | share of weights | NF4 error | int4 absmax error |")
    print("| --- | --- | --- | --- |")
    weights = [lin.weight.detach().float() for lin in linears.values()]
    w = torch.cat([t.flatten() for t in weights])
    size = torch.cat(
        [(t.reshape(-1, 64).abs() / t.reshape(-1, 64).abs().amax(1, keepdim=True)).flatten() for t in weights]
    )
    errors = {
        name: torch.cat([make(t).flatten() for t in weights]) - w
        for name, make in (("nf4", nf4(True)), ("int4", int4_absmax))
    }
    for lo, hi in ((0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0)):
        sel = (size >= lo) & ((size < hi) if hi < 1 else (size <= hi))
        rel = {k: (e[sel].pow(2).sum() / w[sel].pow(2).sum()).sqrt().item() for k, e in errors.items()}
        print(f"| {lo:.2f}-{hi:.2f} | {sel.float().mean().item():.3f} | {rel['nf4']:.4f} | {rel['int4']:.4f} |")
    excess_kurtosis = ((w - w.mean()) ** 4).mean() / w.var() ** 2 - 3
    print(f"(excess kurtosis of these weights: {excess_kurtosis.item():.2f}; 0 for a normal distribution)")

    # 3. QLoRA vs LoRA vs full fine-tuning
    if not seeds:
        print(f"\n(no seeds: no fine-tuning)\ntotal wall time: {time.time() - start:.0f} s")
        return
    task = tasks.make_task(args.task, base.texts)
    lora = default_lora_config()
    qbase = quantize_base(copy.deepcopy(model))
    methods = {"QLoRA": (qbase, lora), "LoRA": (model, lora), "full FT": (model, None)}
    print(f"\n## 3. {args.task}: QLoRA vs 16-bit LoRA vs full fine-tuning ({args.steps} steps, seeds {seeds})")
    print(f"LoRA config: r={lora.r}, alpha={lora.alpha:g}, targets {','.join(lora.targets)}; QLoRA: the same on the")
    print("NF4 base (double quant, blocks of 64, every attention and MLP linear quantized)")
    results: dict[str, list] = {m: [] for m in methods}
    for seed in seeds:
        for name, (start_model, config) in methods.items():
            cfg = finetune_config(full=config is None, max_iters=args.steps, seed=seed, device="cpu")
            res = finetune(
                start_model, task, base.dataset.tokenizer, config, cfg, progress=False, eval_chars=args.eval_chars
            )
            results[name].append(res)
            print(
                f"  seed {seed} {name:8s} target {res.losses['target']:.4f} (base {res.base_scores['target']:.4f}) "
                f"source {res.losses['source']:.4f}  {res.history.seconds:.1f}s"
            )
    print(
        "\n| method | base target loss | target loss (mean ± sd) | target accuracy | source loss | trained params "
        "| train s (median) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, runs in results.items():
        target = [r.losses["target"] for r in runs]
        sd = statistics.stdev(target) if len(target) > 1 else 0.0
        acc = statistics.fmean(r.target_accuracy for r in runs)
        src = statistics.fmean(r.losses["source"] for r in runs)
        print(
            f"| {name} | {runs[0].base_scores['target']:.4f} | {statistics.fmean(target):.4f} ± {sd:.4f} | "
            f"{acc:.4f} | {src:.4f} | {runs[0].trainable_params:,} | "
            f"{statistics.median(r.history.seconds for r in runs):.1f} |"
        )
    if len(seeds) >= MIN_SEEDS:
        print("\n| paired difference (final target loss) | mean | 95% t-interval | p |")
        print("| --- | --- | --- | --- |")
        q = [r.losses["target"] for r in results["QLoRA"]]
        for other in ("LoRA", "full FT"):
            d = paired_difference(q, [r.losses["target"] for r in results[other]])
            print(f"| QLoRA - {other} | {d.mean:+.4f} | [{d.low:+.4f}, {d.high:+.4f}] | {d.p_value:.3g} |")
    else:
        print(f"\n(fewer than {MIN_SEEDS} seeds: no interval)")
    print(f"\ntotal wall time: {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()

"""The LoRA / full crossover, side by side in one run, beside the model that predicts it.

Sections (--sections, comma-separated, in this order; the JSON results file is rewritten after each one):

  profile  one clean training step at the first width (full, LoRA r=8 q/k/v/o, LoRA with reference layers, the
           all-frozen floor): kernels, kernel time and GEMM time from torch.profiler on CUDA (operators on a CPU),
           and eager ms/step. On CUDA this is the input of a re-fit of the step-time model on this very GPU.
  model    the width sweep counted exactly (lora_lab.experiments.crossover: FLOPs, operators) and the model's
           predicted ms/step and LoRA / full ratios: with the H100 fit, and with the re-fit where profile ran.
  sweep    measured ms/step of full training and LoRA through lora_lab.train at every width: eager, CUDA graphs
           (TrainConfig.cuda_graphs) and, with --compiled, torch.compile'd; the LoRA / full ratios.
  nanogpt  nanoGPT (its model.py and recipe) vs lora_lab at the first width: eager vs eager, compiled vs compiled
           (--compiled), and lora_lab with CUDA graphs vs nanoGPT eager: tokens/s ratios.
  forward  the unmerged LoRA eval forward vs the base and the merged model, at every width.

Every lora_lab training figure is a difference of two train() calls of warm and warm + n steps, which leaves
out the warm-up (the CUDA-graph capture, torch.compile's compilation) and the evaluations; variants take turns
window by window, and each figure is the median of the windows.

GPU (the whole sweep; see benchmarks/RESULTS_gpu.md for the wheelhouse steps on a machine without an index):

    python benchmarks/bench_crossover.py --nanogpt ../shared/anchors/nanogpt --out crossover_gpu.json

CPU smoke run (tiny widths; tests the script itself, under 2 minutes; torch.compile is left out):

    python benchmarks/bench_crossover.py --smoke --nanogpt ../shared/anchors/nanogpt --out crossover_smoke.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from lora_lab import GPT, TrainConfig, apply_lora, lora_layers, merge_lora, set_fast_path
from lora_lab import train as lora_lab_train
from lora_lab.devices import autocast_for, pick_device
from lora_lab.experiments.costs import OperatorCount
from lora_lab.experiments.crossover import (
    BATCH_SIZE,
    BLOCK_SIZE,
    LORA_QKVO,
    WIDTHS,
    build,
    crossover_table,
    crossover_width,
    fit_step_time_model,
    h100_model,
    sweep_config,
)
from lora_lab.graphs import WARMUP_STEPS
from lora_lab.train import make_optimizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gpu import NanoGPTRun, load_nanogpt  # noqa: E402  (nanoGPT run as its train.py runs it)

RESULTS: dict = {}
GEMM_WORDS = ("gemm", "nvjet", "cutlass", "sm90_xmma")  # kernel names of matmuls (as bench_gpu.py)


def log(msg: str) -> None:
    print(msg, flush=True)


def save(out: Path | None) -> None:
    if out is not None:  # whole file each time (temp + rename): a run cut short leaves valid JSON
        tmp = out.with_suffix(out.suffix + ".tmp")
        tmp.write_text(json.dumps(RESULTS, indent=2))
        os.replace(tmp, out)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TrainRun:
    """lora_lab.train on one model with one set of switches; window(n) is the ms/step of n steps after warm ones."""

    def __init__(self, model, tokens, batch: int, device, warm: int, **switches):
        self.model, self.tokens, self.warm = model, tokens, warm
        self.cfg = TrainConfig(batch_size=batch, device=str(device), eval_iters=1, warmup_iters=0, **switches)
        self.seed, self.notes = 0, []

    def seconds(self, steps: int) -> float:
        if torch.cuda.is_available():  # start each call from an empty cache: eager blocks and a graph's pool
            torch.cuda.empty_cache()  # would otherwise both be held at the widest widths
        self.seed += 1
        cfg = replace(self.cfg, max_iters=steps, eval_interval=steps, seed=self.seed)
        result = lora_lab_train(self.model, self.tokens, None, cfg, progress=False)
        self.notes = result.notes
        return result.seconds

    def window(self, n: int) -> float:
        return 1000 * (self.seconds(self.warm + n) - self.seconds(self.warm)) / n


def side_by_side(runs: dict, steps: int, windows: int, device) -> dict:
    """Median ms/step of each run over `windows` rounds in which the runs take turns."""
    times = {name: [] for name in runs}
    for w in range(windows):
        for name, run in runs.items():
            if isinstance(run, TrainRun):
                times[name].append(run.window(steps))
            else:  # a callable that runs n steps (nanoGPT)
                sync(device)
                t0 = time.perf_counter()
                run(steps)
                sync(device)
                times[name].append(1000 * (time.perf_counter() - t0) / steps)
        log(f"    window {w + 1}/{windows}: " + ", ".join(f"{n} {t[-1]:.2f}" for n, t in times.items()))
    return {n: {"ms_per_step": round(statistics.median(t), 3), "min": round(min(t), 3), "max": round(max(t), 3)}
            for n, t in times.items()}  # fmt: skip


def random_tokens(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 65, (n,), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------


def section_profile(args, device) -> None:
    """One clean step (train()'s: autocast, backward, clipping, fused AdamW; no sampling, no evaluation)."""
    config = sweep_config(args.widths[0], args.block, dropout=args.dropout)
    log(f"\n## Profile of one training step at width {config.n_embd} ({config.n_layer} layers), batch {args.batch}")
    x = torch.randint(0, 65, (args.batch, config.block_size), device=device)
    kernels, eager = {}, {}
    methods = {"full": ("full", True), "LoRA": ("LoRA", True), "LoRA, reference layers": ("LoRA", False),
               "floor (all frozen but the embedding)": ("floor", True)}  # fmt: skip
    for name, (method, fast) in methods.items():
        torch.manual_seed(0)
        model = build(config, method, LORA_QKVO, fast).to(device).train()
        optimizer = make_optimizer(model, TrainConfig())
        trainable = [p for p in model.parameters() if p.requires_grad]

        def steps(n):
            for _ in range(n):
                with autocast_for(device):
                    _, loss = model(x, x)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(trainable, 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

        steps(3)  # warm-up: allocator, cuBLAS handles, AdamW state
        sync(device)
        t0 = time.perf_counter()
        steps(args.steps)
        sync(device)
        eager[f"lora_lab {name}"] = {"ms_per_step": round(1000 * (time.perf_counter() - t0) / args.steps, 3)}
        if device.type == "cuda":
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                steps(5)
            events = [e for e in prof.events() if e.device_type.name == "CUDA"]
            gemm = [e for e in events if any(w in e.name.lower() for w in GEMM_WORDS)]
            kernels[name] = {
                "kernels_per_step": round(len(events) / 5),
                "kernel_ms_per_step": round(sum(e.device_time for e in events) / 5000, 3),
                "gemm_ms_per_step": round(sum(e.device_time for e in gemm) / 5000, 3),
            }
        else:
            with OperatorCount() as ops:
                steps(1)
            kernels[name] = {"operators_per_step": ops.count}
        log(f"  {name}: {kernels[name]}, {eager[f'lora_lab {name}']['ms_per_step']} ms/step eager")
    size = [config.n_layer, config.n_head, config.n_embd, config.block_size, args.batch, config.dropout]
    RESULTS["profile"] = {
        "machine": {**RESULTS["machine"], "size (layers, heads, dims, block, batch, dropout)": size},
        "kernels": kernels,
        "throughput_eager": eager,
    }


def section_model(args) -> None:
    log(f"\n## The model: widths {args.widths}, {args.batch} x {args.block} tokens per step, LoRA r=8 q/k/v/o")
    fits = {}
    try:
        fits["H100 fit"], checks = h100_model()
        RESULTS["h100_fit"] = {"parameters": fits["H100 fit"].to_dict(), "checks": checks}
    except FileNotFoundError as err:
        log(f"  no H100 fit: {err}")
    if "kernels_per_step" in RESULTS.get("profile", {}).get("kernels", {}).get("full", {}):
        fits["this GPU"], checks = fit_step_time_model(RESULTS["profile"], evals_per_profiled_step=0.0)
        RESULTS["this_gpu_fit"] = {"parameters": fits["this GPU"].to_dict(), "checks": checks}
    out = {}
    for name, model in fits.items():
        rows = crossover_table(args.widths, args.batch, args.block, model=model, dropout=args.dropout)
        out[name] = {
            "rows": rows,
            "eager crossover width (LoRA = full)": crossover_width(rows, "eager_ratio"),
            "graphed crossover width (LoRA = full)": crossover_width(rows, "graphed_ratio"),
            "width where eager LoRA / full <= 0.80": crossover_width(rows, "eager_ratio", 0.8),
            "width where unmerged forward / base <= 1.15": crossover_width(rows, "forward_ratio", 1.15),
        }
        log(f"  {name}: {model.source}")
        for r in rows:
            log(f"    d={r['width']:>5} L={r['n_layer']:>2}: FLOP ratio {r['flop_ratio']:.3f}, ops {r['full_ops']} -> "
                f"{r['lora_ops']}, LoRA/full eager {r['eager_ratio']:.3f}, graphed {r['graphed_ratio']:.3f}, "
                f"unmerged forward/base {r['forward_ratio']:.3f} ({r['bound']}-bound)")  # fmt: skip
        log(f"    crossover (eager, graphed): {out[name]['eager crossover width (LoRA = full)']}, "
            f"{out[name]['graphed crossover width (LoRA = full)']}")  # fmt: skip
    RESULTS["model"] = out


def section_sweep(args, device) -> None:
    log(f"\n## Measured: full vs LoRA through lora_lab.train, eager / CUDA graphs{' / compiled' * args.compiled}")
    tokens, res = random_tokens(200_000), {}
    RESULTS["sweep"] = res  # filled width by width and saved after each, so a run cut short keeps what it measured
    for width in args.widths:
        config = sweep_config(width, args.block, dropout=args.dropout)
        log(f"  width {width} ({config.n_layer} layers, {config.n_head} heads)")
        torch.manual_seed(0)
        full = GPT(config)
        lora = apply_lora(copy.deepcopy(full), LORA_QKVO)
        warm = WARMUP_STEPS + 2
        runs = {}
        for kind, switches in (("eager", {}), ("graphs", {"cuda_graphs": True}), ("compiled", {"compile": True})):
            if kind == "compiled" and not args.compiled:
                continue
            runs[f"full {kind}"] = TrainRun(full, tokens, args.batch, device, warm, **switches)
            runs[f"LoRA {kind}"] = TrainRun(lora, tokens, args.batch, device, warm, **switches)
        try:
            row = side_by_side(runs, args.steps, args.windows, device)
        except torch.cuda.OutOfMemoryError as err:  # the widest widths may not fit: say so and go on
            res[str(width)] = {"error": f"out of memory: {str(err).splitlines()[0]}"}
            log(f"    {res[str(width)]['error']}")
            del full, lora, runs
            torch.cuda.empty_cache()
            save(args.out)
            continue
        for kind in ("eager", "graphs", "compiled"):
            if f"full {kind}" in row:
                row[f"LoRA / full, {kind}"] = round(
                    row[f"LoRA {kind}"]["ms_per_step"] / row[f"full {kind}"]["ms_per_step"], 3
                )
        row["notes"] = {n: r.notes for n, r in runs.items() if r.notes}
        res[str(width)] = row
        log("    ratios: " + ", ".join(f"{k}: {v}" for k, v in row.items() if k.startswith("LoRA /")))
        del full, lora, runs
        if device.type == "cuda":
            torch.cuda.empty_cache()
        save(args.out)
    for kind in ("eager", "graphs", "compiled"):
        key = f"LoRA / full, {kind}"
        rows = [{"width": w, "ratio": res[str(w)][key]} for w in args.widths if key in res.get(str(w), {})]
        if rows:
            res[f"measured crossover width, {kind}"] = crossover_width(rows, "ratio")


def section_nanogpt(args, device) -> None:
    config = sweep_config(args.widths[0], args.block, dropout=args.dropout)
    log(f"\n## nanoGPT vs lora_lab at width {config.n_embd}, batch {args.batch} x {config.block_size}")
    ng = load_nanogpt(args.nanogpt)
    bins = args.nanogpt / "data" / "shakespeare_char"
    tokens = torch.from_numpy(np.fromfile(bins / "train.bin", dtype=np.uint16).astype(np.int64))
    size = (config.n_layer, config.n_head, config.n_embd, config.block_size, args.batch, config.dropout)
    torch.manual_seed(0)
    base = GPT(config)
    warm = WARMUP_STEPS + 2
    runs = {
        "nanoGPT eager": NanoGPTRun(ng, size, bins, device, compiled=False).steps,
        "lora_lab eager": TrainRun(copy.deepcopy(base), tokens, args.batch, device, warm),
        "lora_lab CUDA graphs": TrainRun(copy.deepcopy(base), tokens, args.batch, device, warm, cuda_graphs=True),
    }
    if args.compiled:
        runs["nanoGPT compiled"] = NanoGPTRun(ng, size, bins, device, compiled=True).steps
        runs["lora_lab compiled"] = TrainRun(copy.deepcopy(base), tokens, args.batch, device, warm, compile=True)
        runs["nanoGPT compiled"](warm)  # its compilation, outside the timed windows
    runs["nanoGPT eager"](3)
    res = side_by_side(runs, args.steps, args.windows, device)
    tps = {n: 1000 * args.batch * config.block_size / r["ms_per_step"] for n, r in res.items()}
    res["lora_lab / nanoGPT tokens/s, eager"] = round(tps["lora_lab eager"] / tps["nanoGPT eager"], 3)
    res["lora_lab CUDA graphs / nanoGPT eager tokens/s"] = round(tps["lora_lab CUDA graphs"] / tps["nanoGPT eager"], 3)
    if args.compiled:
        res["lora_lab / nanoGPT tokens/s, compiled"] = round(tps["lora_lab compiled"] / tps["nanoGPT compiled"], 3)
    res["notes"] = {n: r.notes for n, r in runs.items() if isinstance(r, TrainRun) and r.notes}
    RESULTS["nanogpt"] = res
    for k, v in res.items():
        log(f"  {k}: {v}")


@torch.no_grad()
def section_forward(args, device) -> None:
    log(f"\n## Eval forward (no grad), batch {args.batch} x {args.block}: unmerged LoRA vs base vs merged")
    res = {}
    for width in args.widths:
        config = sweep_config(width, args.block, dropout=args.dropout)
        torch.manual_seed(0)
        base = GPT(config).to(device).eval()
        lora = apply_lora(copy.deepcopy(base), LORA_QKVO)
        for layer in lora_layers(lora).values():  # B starts at zero: give it values, as after training
            layer.lora_B.normal_(0, 0.02)
        reference = copy.deepcopy(lora)
        set_fast_path(reference, False)
        merged = copy.deepcopy(lora)
        merge_lora(merged)
        x = torch.randint(0, 65, (args.batch, config.block_size), device=device)
        models = {"base": base, "LoRA unmerged": lora.eval(), "unmerged, reference layers": reference.eval(),
                  "LoRA merged": merged.eval()}  # fmt: skip

        def forwards(model):
            def run(n):
                for _ in range(n):
                    with autocast_for(device):
                        model(x)

            return run

        for run in models.values():
            forwards(run)(2)  # warm-up
        row = side_by_side({n: forwards(m) for n, m in models.items()}, args.steps, args.windows, device)
        for n in ("LoRA unmerged", "unmerged, reference layers", "LoRA merged"):
            row[f"{n} / base"] = round(row[n]["ms_per_step"] / row["base"]["ms_per_step"], 3)
        res[str(width)] = row
        log(f"  width {width}: " + ", ".join(f"{k} {v}" for k, v in row.items() if k.endswith("/ base")))
        del base, lora, reference, merged, models
    RESULTS["forward"] = res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--nanogpt", type=Path, required=True, help="the nanoGPT anchor (model.py, data/shakespeare_char)"
    )
    parser.add_argument("--out", type=Path, default=None, help="results file (JSON), rewritten after each section")
    parser.add_argument("--device", default="auto", help="auto (cuda, else cpu), cuda or cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny widths on the CPU: tests the script itself")
    parser.add_argument("--sections", default="profile,model,sweep,nanogpt,forward")
    parser.add_argument("--widths", default=None, help=f"comma-separated (default {','.join(map(str, WIDTHS))})")
    parser.add_argument("--batch", type=int, default=None, help=f"rows per step (default {BATCH_SIZE})")
    parser.add_argument("--block", type=int, default=None, help=f"tokens per row (default {BLOCK_SIZE})")
    parser.add_argument("--dropout", type=float, default=0.2)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per window (default 10; smoke 6)")
    parser.add_argument("--windows", type=int, default=None, help="windows per variant (default 3; smoke 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1 with --smoke)")
    parser.add_argument("--compiled", action="store_true", help="also torch.compile (about 25 s per model on an H100)")
    args = parser.parse_args()
    device = torch.device("cpu") if args.smoke else pick_device(args.device)
    if args.threads or args.smoke:  # one thread: a shared CPU's other jobs then slow the run far less
        torch.set_num_threads(args.threads or 1)
    args.widths = (
        [int(w) for w in args.widths.split(",")] if args.widths else ([64, 128] if args.smoke else list(WIDTHS))
    )
    args.batch = args.batch or (2 if args.smoke else BATCH_SIZE)
    args.block = args.block or (16 if args.smoke else BLOCK_SIZE)
    args.steps = args.steps or (6 if args.smoke else 10)
    args.windows = args.windows or (2 if args.smoke else 3)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    RESULTS["machine"] = {
        "device": name,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "widths": args.widths,
        "batch": args.batch,
        "block": args.block,
        "steps/window": args.steps,
        "windows": args.windows,
        "smoke": args.smoke,
    }
    log(f"# bench_crossover on {name}, torch {torch.__version__}: {RESULTS['machine']}")
    started = time.perf_counter()
    for section in args.sections.split(","):
        t0 = time.perf_counter()
        if section == "profile":
            section_profile(args, device)
        elif section == "model":
            section_model(args)
        elif section == "sweep":
            section_sweep(args, device)
        elif section == "nanogpt":
            section_nanogpt(args, device)
        elif section == "forward":
            section_forward(args, device)
        else:
            raise SystemExit(f"Unknown section {section!r}: choose from profile, model, sweep, nanogpt, forward.")
        RESULTS.setdefault("section_seconds", {})[section] = round(time.perf_counter() - t0, 1)
        save(args.out)
        log(f"  ({section}: {time.perf_counter() - t0:.1f} s, {time.perf_counter() - started:.1f} s in all)")


if __name__ == "__main__":
    main()

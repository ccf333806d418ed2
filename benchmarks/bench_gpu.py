"""Training speed side by side: the nanoGPT anchor vs lora_lab, full training vs LoRA, and memory.

One run measures, in one process, with the variants taking turns window by window (so a busy or warming
machine slows all of them alike), the median ms/step and tokens/s of timed windows after warm-up:

  1. nanoGPT (its model.py and its training recipe: fused AdamW, pinned batches, loss read every 10 steps)
     vs lora_lab.train (full training), eager and torch.compile'd;
  2. LoRA r=8 on q/k/v/o vs full training, eager and compiled (both through lora_lab.train), with and without
     the q/k/v fast path (lora_lab.fused; "reference layers" runs each LoRALinear.forward on its own);
  3. the unmerged LoRA forward vs the base forward (eval, no grad), with and without the fast path;
  4. peak CUDA memory of full vs LoRA training, with and without activation checkpointing, next to what
     the tensor count predicts (grads + AdamW's two moments of the weights LoRA freezes);
  5. the `small` preset's pretraining: time to validation loss 1.47, and best vs last validation loss.

GPU (the 10.65M config: 6 layers, 6 heads, 384 dims, block 256, batch 64, dropout 0.2, bf16 autocast):

    python benchmarks/bench_gpu.py --nanogpt ../shared/anchors/nanogpt --data ../shared/data/tiny_shakespeare \\
        --out benchmarks/gpu_results.json

CPU (nanoGPT's baby config: 4 layers, 4 heads, 128 dims, block 64, batch 12; sections 1 and 5 only):

    python benchmarks/bench_gpu.py --device cpu --nanogpt ../shared/anchors/nanogpt --out cpu.json

Operators per step of the GPU-size model, counted on a CPU (about one kernel each on a GPU):

    python benchmarks/bench_gpu.py --device cpu --size gpu --batch 2 --sections kernels --nanogpt ...

--smoke runs every section at toy sizes on the CPU, to test the script itself: about a minute, plus a few
more for torch.compile's C++ builds in the "compiled" section.
The results file (JSON) is rewritten after every section, so a run cut short still leaves its figures.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from lora_lab import (
    GPT,
    PRESETS,
    CharDataset,
    CharTokenizer,
    GPTConfig,
    LoRAConfig,
    TrainConfig,
    apply_lora,
    set_fast_path,
    tasks,
)
from lora_lab import train as lora_lab_train
from lora_lab.devices import autocast_for, pick_device
from lora_lab.experiments.costs import OperatorCount

LORA = LoRAConfig(r=8, alpha=16.0, targets=("q_proj", "k_proj", "v_proj", "o_proj"))
SIZES = {  # name: (n_layer, n_head, n_embd, block_size, batch_size, dropout)
    "gpu": (6, 6, 384, 256, 64, 0.2),
    "cpu": (4, 4, 128, 64, 12, 0.0),
    "smoke": (2, 2, 64, 32, 4, 0.0),
}
RESULTS: dict = {}


def log(msg: str) -> None:
    print(msg, flush=True)


def save(out: Path | None) -> None:
    if out is not None:  # written whole each time (temp file + rename), so a cut-short run leaves valid JSON
        tmp = out.with_suffix(out.suffix + ".tmp")
        tmp.write_text(json.dumps(RESULTS, indent=2))
        os.replace(tmp, out)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def summary(ms: list[float], tokens_per_step: int, warmup_ms: float | None = None, steps: int = 0) -> dict:
    med = statistics.median(ms)
    out = {
        "ms_per_step": round(med, 3),
        "min": round(min(ms), 3),
        "max": round(max(ms), 3),
        "tokens_per_s": round(tokens_per_step / med * 1000),
        "windows": len(ms),
    }
    if warmup_ms is not None:  # the warm-up window's extra time: torch.compile's compilation, where compiled
        out["warmup_extra_s"] = round((warmup_ms - med) * steps / 1000, 1)
    return out


# ----------------------------------------------------------------------------------------------
# nanoGPT: its model.py imported by path, trained the way its train.py trains


def load_nanogpt(path: Path):
    spec = importlib.util.spec_from_file_location("nanogpt_model", path / "model.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["nanogpt_model"] = module  # its dataclasses look themselves up here
    spec.loader.exec_module(module)
    return module


class NanoGPTRun:
    """nanoGPT's train.py loop: memmapped uint16 batches (pinned, non_blocking on CUDA, the next batch
    fetched while the GPU works), its get_lr schedule, bf16 autocast on CUDA only, clipping at 1.0, its
    configure_optimizers (fused AdamW on CUDA), and the loss read every log_interval=10 steps."""

    def __init__(self, ng, size, data_dir: Path, device: torch.device, compiled: bool, seed: int = 1337):
        n_layer, n_head, n_embd, block, self.batch, dropout = size
        torch.manual_seed(seed)
        self.model = ng.GPT(
            ng.GPTConfig(
                block_size=block,
                vocab_size=65,
                n_layer=n_layer,
                n_head=n_head,
                n_embd=n_embd,
                dropout=dropout,
                bias=False,
            )
        ).to(device)
        self.optimizer = self.model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), device.type)
        self.forward = torch.compile(self.model) if compiled else self.model
        self.block, self.device, self.data_dir, self.it = block, device, data_dir, 0
        self.ctx = nullcontext() if device.type == "cpu" else torch.autocast(device.type, dtype=torch.bfloat16)
        self.next = self.batch_of("train")

    def batch_of(self, split: str):
        data = np.memmap(self.data_dir / f"{split}.bin", dtype=np.uint16, mode="r")
        ix = torch.randint(len(data) - self.block, (self.batch,))
        x = torch.stack([torch.from_numpy(data[i : i + self.block].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1 : i + 1 + self.block].astype(np.int64)) for i in ix])
        if self.device.type == "cuda":
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device), y.to(self.device)

    def lr(self, it: int, max_iters: int) -> float:
        if it < 100:
            return 1e-3 * (it + 1) / 101
        ratio = min(1.0, (it - 100) / max(1, max_iters - 100))
        return 1e-4 + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (1e-3 - 1e-4)

    def steps(self, n: int, max_iters: int = 5000) -> None:
        self.model.train()
        for _ in range(n):
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr(self.it, max_iters)
            x, y = self.next
            with self.ctx:
                _, loss = self.forward(x, y)
            self.next = self.batch_of("train")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.it % 10 == 0:
                loss.item()
            self.it += 1

    @torch.no_grad()
    def val_loss(self, iters: int = 200) -> float:
        self.model.eval()
        total = 0.0
        for _ in range(iters):
            x, y = self.batch_of("val")
            with self.ctx:
                total += self.model(x, y)[1].item()
        return total / iters


class LoraLabRun:
    """lora_lab.train itself, called once per window (evaluations fall outside result.seconds)."""

    def __init__(self, model: GPT, train_tokens, val_tokens, batch: int, compiled: bool, device, **train_kwargs):
        self.model, self.train_tokens, self.val_tokens = model, train_tokens, val_tokens
        self.cfg = TrainConfig(
            batch_size=batch, compile=compiled, device=str(device), eval_iters=1, warmup_iters=0, **train_kwargs
        )
        self.seed, self.notes = 0, []

    def window(self, n: int) -> float:
        """Train n steps; returns ms/step of the training steps alone (with --clock cpu: the process time of
        the whole call, its two one-batch evaluations included, which only counts against lora_lab)."""
        self.seed += 1  # fresh batches every window
        cfg = replace(self.cfg, max_iters=n, eval_interval=n, seed=self.seed)
        t0 = time.process_time()
        result = lora_lab_train(self.model, self.train_tokens, None, cfg, progress=False)
        self.notes = result.notes
        return 1000 * ((time.process_time() - t0) if CLOCK is time.process_time else result.seconds) / n


CLOCK = time.perf_counter  # --clock cpu: time.process_time, which other processes on a shared CPU barely disturb


def timed_window(fn, n: int, device) -> float:
    sync(device)
    t0 = CLOCK()
    fn(n)
    sync(device)
    return 1000 * (CLOCK() - t0) / n


def side_by_side(runs: dict, steps: int, windows: int, device, tokens_per_step: int, warmup_windows: int = 1) -> dict:
    """Every run takes turns, window by window; the first warm-up window(s) (compilation included) are dropped."""
    times = {name: [] for name in runs}
    warmup = {name: 0.0 for name in runs}
    for w in range(warmup_windows + windows):
        this_window = {}
        for name, run in runs.items():
            ms = run.window(steps) if isinstance(run, LoraLabRun) else timed_window(run.steps, steps, device)
            this_window[name] = ms
            if w >= warmup_windows:
                times[name].append(ms)
            else:
                warmup[name] += ms
        log(
            f"  window {w + 1}/{warmup_windows + windows}{' (warm-up)' if w < warmup_windows else ''}: "
            + ", ".join(f"{name} {ms:.2f} ms/step" for name, ms in this_window.items())
        )
    return {name: summary(ts, tokens_per_step, warmup[name], steps) for name, ts in times.items()}


# ----------------------------------------------------------------------------------------------


def section_throughput(args, ng, size, device, train_tokens, compiled: bool) -> None:
    n_layer, n_head, n_embd, block, batch, dropout = size
    kind = "compiled" if compiled else "eager"
    log(f"\n## nanoGPT vs lora_lab, full training vs LoRA r={LORA.r} q/k/v/o, {kind}")
    config = GPTConfig(vocab_size=65, block_size=block, n_layer=n_layer, n_head=n_head, n_embd=n_embd, dropout=dropout)
    torch.manual_seed(0)
    base = GPT(config)
    runs = {
        "nanoGPT": NanoGPTRun(ng, size, args.nanogpt / "data" / "shakespeare_char", device, compiled),
        "lora_lab full": LoraLabRun(copy.deepcopy(base), train_tokens, None, batch, compiled, device),
    }
    if device.type != "cpu" or args.smoke:
        runs["lora_lab LoRA"] = LoraLabRun(
            apply_lora(copy.deepcopy(base), LORA), train_tokens, None, batch, compiled, device
        )
        if not compiled:  # the same LoRA without the q/k/v fast path (lora_lab.fused)
            runs["lora_lab LoRA, reference layers"] = LoraLabRun(
                reference_lora(apply_lora(copy.deepcopy(base), LORA)), train_tokens, None, batch, compiled, device
            )
    if hasattr(base, "check_token_ids") and not compiled:  # what GPT.forward's id check costs (it reads min/max)
        unchecked = copy.deepcopy(base)
        unchecked.check_token_ids = lambda *a, **k: None
        runs["lora_lab full, no id check"] = LoraLabRun(unchecked, train_tokens, None, batch, compiled, device)
    if args.levers and not compiled:  # each of train()'s speed levers switched off, one at a time
        levers = {"AdamW not fused": dict(fused_optimizer=False), "loss read every step": dict(log_interval=1)}
        if device.type == "cpu":
            levers["fp32 (no bf16 autocast)"] = dict(bf16=False)
        for lever, kwargs in levers.items():
            runs[f"lora_lab full, {lever}"] = LoraLabRun(
                copy.deepcopy(base), train_tokens, None, batch, compiled, device, **kwargs
            )
    res = side_by_side(runs, args.steps, args.windows, device, batch * block)
    res["lora_lab / nanoGPT tokens/s"] = round(res["lora_lab full"]["tokens_per_s"] / res["nanoGPT"]["tokens_per_s"], 3)
    if "lora_lab LoRA" in res:
        res["LoRA / full step time"] = round(
            res["lora_lab LoRA"]["ms_per_step"] / res["lora_lab full"]["ms_per_step"], 3
        )
    if "lora_lab LoRA, reference layers" in res:
        res["LoRA reference / full step time"] = round(
            res["lora_lab LoRA, reference layers"]["ms_per_step"] / res["lora_lab full"]["ms_per_step"], 3
        )
    notes = {n: r.notes for n, r in runs.items() if isinstance(r, LoraLabRun) and r.notes}
    if notes:
        res["notes"] = notes
    RESULTS[f"throughput_{kind}"] = res
    for name, value in res.items():
        log(f"  {name}: {value}")


@torch.no_grad()
def section_forward(args, size, device) -> None:
    n_layer, n_head, n_embd, block, batch, _ = size
    log(f"\n## Forward latency, batch {batch} x {block}, eval, no grad (unmerged LoRA vs base)")
    torch.manual_seed(0)
    base = GPT(GPTConfig(vocab_size=65, block_size=block, n_layer=n_layer, n_head=n_head, n_embd=n_embd)).to(device)
    lora = apply_lora(copy.deepcopy(base), LORA).to(device)
    for p in lora.parameters():  # B starts at zero; give it values, as after training
        if p.requires_grad:
            p.normal_(0, 0.02)
    reference = reference_lora(copy.deepcopy(lora))
    base.eval(), lora.eval(), reference.eval()
    x = torch.randint(0, 65, (batch, block), device=device)

    def forwards(model):
        def run(n):
            for _ in range(n):
                with autocast_for(device):
                    model(x)

        return run

    fns = {
        "base": forwards(base),
        "LoRA unmerged": forwards(lora),
        "LoRA unmerged, reference layers": forwards(reference),
    }
    times = {name: [] for name in fns}
    for w in range(1 + args.windows):
        for name, fn in fns.items():
            ms = timed_window(fn, args.steps, device)
            if w:
                times[name].append(ms)
    res = {name: summary(ts, batch * block) for name, ts in times.items()}
    res["unmerged / base"] = round(res["LoRA unmerged"]["ms_per_step"] / res["base"]["ms_per_step"], 3)
    res["unmerged reference / base"] = round(
        res["LoRA unmerged, reference layers"]["ms_per_step"] / res["base"]["ms_per_step"], 3
    )
    RESULTS["forward"] = res
    for name, value in res.items():
        log(f"  {name}: {value}")


def section_memory(args, size, device, train_tokens) -> None:
    n_layer, n_head, n_embd, block, batch, dropout = size
    log("\n## Peak CUDA memory of training (weights + grads + AdamW state + activations)")
    config = GPTConfig(vocab_size=65, block_size=block, n_layer=n_layer, n_head=n_head, n_embd=n_embd, dropout=dropout)
    res = {}
    for method in ("full", "LoRA"):
        for ckpt in (False, True):
            torch.manual_seed(0)
            model = GPT(config)
            if method == "LoRA":
                model = apply_lora(model, LORA)
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            cfg = TrainConfig(
                max_iters=3,
                batch_size=batch,
                eval_interval=3,
                eval_iters=1,
                warmup_iters=0,
                activation_checkpointing=ckpt,
                compile=False,
                device=str(device),
            )
            lora_lab_train(model, train_tokens, None, cfg, progress=False)
            peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
            name = f"{method}, activation checkpointing {'on' if ckpt else 'off'}"
            res[name] = {"peak_MiB": None if peak is None else round(peak / 2**20, 1), "trainable": trainable}
            del model
    full_trainable = res["full, activation checkpointing off"]["trainable"]
    lora_trainable = res["LoRA, activation checkpointing off"]["trainable"]
    # fp32 .grad + AdamW's exp_avg and exp_avg_sq: 12 bytes for every weight that LoRA freezes
    res["predicted full - LoRA (MiB)"] = round(12 * (full_trainable - lora_trainable) / 2**20, 1)
    if device.type == "cuda":
        for ckpt in ("off", "on"):
            f = res[f"full, activation checkpointing {ckpt}"]["peak_MiB"]
            l = res[f"LoRA, activation checkpointing {ckpt}"]["peak_MiB"]
            res[f"measured full - LoRA, checkpointing {ckpt} (MiB)"] = round(f - l, 1)
            res[f"LoRA / full, checkpointing {ckpt}"] = round(l / f, 3)
    RESULTS["memory"] = res
    for name, value in res.items():
        log(f"  {name}: {value}")


def reference_lora(model: GPT) -> GPT:
    """LoRA without its q/k/v fast path: every adapted layer runs LoRALinear.forward on its own."""
    set_fast_path(model, False)
    return model


def section_kernels(args, ng, size, device, train_tokens) -> None:
    """What one eager training step launches, nanoGPT vs lora_lab, full vs LoRA: kernel count and summed
    kernel time. In the small-model regime a step costs about (kernels x launch time), so this shows what
    LoRA's branch adds. On a CPU it counts aten operators (each is about one kernel on a GPU)."""
    from torch.profiler import ProfilerActivity, profile

    n_layer, n_head, n_embd, block, batch, dropout = size
    log("\n## Kernels per eager training step (torch.profiler), nanoGPT, full, LoRA (fast path and reference)")
    config = GPTConfig(vocab_size=65, block_size=block, n_layer=n_layer, n_head=n_head, n_embd=n_embd, dropout=dropout)
    res = {}
    for method in ("nanoGPT", "full", "LoRA", "LoRA, reference layers", "floor (all frozen but the embedding)"):
        torch.manual_seed(0)
        model = GPT(config)
        if method.startswith("LoRA"):
            model = apply_lora(model, LORA)
            if "reference" in method:
                reference_lora(model)
        elif method.startswith("floor"):
            model.requires_grad_(False).tok_emb.weight.requires_grad_(True)
        if method == "nanoGPT":
            run = NanoGPTRun(ng, size, args.nanogpt / "data" / "shakespeare_char", device, compiled=False)
            window = run.steps
        else:
            window = LoraLabRun(model, train_tokens, None, batch, False, device).window
        window(3)  # warm-up: allocator, cuBLAS handles, fused-AdamW state
        if device.type == "cuda":
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                window(5)
            events = [e for e in prof.events() if e.device_type.name == "CUDA"]
            res[method] = {
                "kernels_per_step": round(len(events) / 5),
                "kernel_ms_per_step": round(sum(e.device_time for e in events) / 5000, 3),
                "gemm_ms_per_step": round(
                    sum(
                        e.device_time
                        for e in events
                        if any(word in e.name.lower() for word in ("gemm", "nvjet", "cutlass", "sm90_xmma"))
                    )
                    / 5000,
                    3,
                ),
            }
        else:  # no kernels on a CPU: count the operators that would launch one
            with OperatorCount() as ops:
                window(5)
            res[method] = {"operators_per_step": round(ops.count / 5)}
        log(f"  {method}: {res[method]}")
    if device.type == "cpu":  # the unmerged forward's operators (eval, no grad): what the forward-latency goal pays
        torch.manual_seed(0)
        base = GPT(config).eval()
        x = torch.randint(0, 65, (batch, block))
        for method, model in (
            ("forward: base", base),
            ("forward: LoRA unmerged", apply_lora(copy.deepcopy(base), LORA)),
            ("forward: LoRA unmerged, reference layers", reference_lora(apply_lora(copy.deepcopy(base), LORA))),
        ):
            with torch.no_grad(), autocast_for(device), OperatorCount() as ops:
                model(x)
            res[method] = {"operators": ops.count}
            log(f"  {method}: {res[method]}")
    RESULTS["kernels"] = res


def source_dataset(args) -> CharDataset:
    """The pretraining text exactly as pretrained_base builds it. Without `datasets` installed, read
    input.txt and cut it 90/5/5 by characters, which is the cut the hub dataset (and data.py) makes."""
    try:
        from lora_lab import load_splits

        texts = load_splits(args.data)
    except ImportError:
        path = Path(args.data or os.environ.get("LORA_LAB_DATA", ""))
        text = (path / "input.txt" if path.is_dir() else path).read_text()
        a, b = int(len(text) * 0.9), int(len(text) * 0.95)
        texts = {"train": text[:a], "validation": text[a:b], "test": text[b:]}
    tokenizer = CharTokenizer.from_text("".join(texts.values()))
    return CharDataset.from_texts(tasks.source_domain(texts), tokenizer)


def section_pretrain(args, device) -> None:
    preset = "tiny" if args.smoke else ("tiny" if device.type == "cpu" else "small")
    model_config, train_config = PRESETS[preset]
    target = args.target_val
    if args.smoke:
        model_config = replace(model_config, n_layer=1, n_embd=32, n_head=2, block_size=32)
        train_config = replace(train_config, max_iters=60, eval_interval=20, eval_iters=2)
    log(f"\n## Pretraining the '{preset}' preset ({train_config.max_iters} steps, keep_best): time to val {target}")
    data = source_dataset(args)
    model_config = replace(model_config, vocab_size=data.tokenizer.vocab_size)
    torch.manual_seed(train_config.seed)
    model = GPT(model_config)
    cfg = replace(train_config, device=str(device))
    start = time.perf_counter()
    result = lora_lab_train(model, data.splits["train"], data.splits["validation"], cfg, progress=False)
    wall = time.perf_counter() - start
    per_step = result.seconds / cfg.max_iters
    reached = next((e["iter"] for e in result.evals if e["val"] is not None and e["val"] <= target), None)
    res = {
        "preset": preset,
        "steps": cfg.max_iters,
        "train_seconds": round(result.seconds, 1),
        "wall_seconds": round(wall, 1),
        "ms_per_step": round(1000 * per_step, 2),
        "first_eval_at_or_below_target": reached,
        "seconds_to_target": None if reached is None else round(reached * per_step, 1),
        "best_iter": result.best_iter,
        "best_val": round(result.final["val"], 4),
        "last_val": round(result.evals[-1]["val"], 4),
        "evals": [{"iter": e["iter"], "val": round(e["val"], 4)} for e in result.evals],
        "notes": result.notes,
    }
    RESULTS["pretrain"] = res
    for name, value in res.items():
        if name != "evals":
            log(f"  {name}: {value}")


def section_cpu_quality(args, ng, size, device, train_tokens, val_tokens) -> None:
    """Both recipes for nanoGPT's published budget (2000 steps), validated on nanoGPT's val.bin."""
    n_layer, n_head, n_embd, block, batch, dropout = size
    iters = args.quality_iters
    log(f"\n## Validation loss after {iters} steps, both on nanoGPT's train.bin / val.bin")
    nano = NanoGPTRun(ng, size, args.nanogpt / "data" / "shakespeare_char", device, compiled=False)
    t0 = time.perf_counter()
    nano.steps(iters, max_iters=iters)
    nano_s = time.perf_counter() - t0
    torch.manual_seed(1337)
    model = GPT(
        GPTConfig(vocab_size=65, block_size=block, n_layer=n_layer, n_head=n_head, n_embd=n_embd, dropout=dropout)
    )
    cfg = TrainConfig(
        max_iters=iters, batch_size=batch, eval_interval=iters, eval_iters=args.eval_batches, device=str(device)
    )
    result = lora_lab_train(model, train_tokens, val_tokens, cfg, progress=False)
    res = {
        "nanoGPT val": round(nano.val_loss(args.eval_batches), 4),
        "nanoGPT ms/step": round(1000 * nano_s / iters, 2),
        "lora_lab val": round(result.final["val"], 4),
        "lora_lab ms/step": round(1000 * result.seconds / iters, 2),
        "eval batches": args.eval_batches,
    }
    RESULTS["cpu_quality"] = res
    for name, value in res.items():
        log(f"  {name}: {value}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--nanogpt", type=Path, required=True, help="the nanoGPT anchor (model.py, data/shakespeare_char)"
    )
    parser.add_argument("--data", default=None, help="tiny-shakespeare for the preset run (default: $LORA_LAB_DATA)")
    parser.add_argument("--out", type=Path, default=None, help="results file (JSON), rewritten after each section")
    parser.add_argument("--device", default="auto", help="auto (cuda, else cpu), cuda or cpu")
    parser.add_argument("--smoke", action="store_true", help="every section at toy sizes on the CPU")
    parser.add_argument("--steps", type=int, default=None, help="steps per timed window")
    parser.add_argument("--windows", type=int, default=None, help="timed windows per variant (after one warm-up)")
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds (default 360 on a GPU, none on a CPU): "
        "a section that would start too late to finish inside it is skipped",
    )
    parser.add_argument(
        "--sections",
        default="eager,forward,memory,kernels,compiled,pretrain",
        help="comma-separated: eager, compiled, kernels, memory, forward, pretrain, quality (CPU)",
    )
    parser.add_argument("--quality-iters", type=int, default=2000, help="steps of the CPU quality run")
    parser.add_argument("--eval-batches", type=int, default=200, help="batches for the CPU quality run's val loss")
    parser.add_argument("--target-val", type=float, default=1.47, help="validation loss to time the preset to")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--size",
        choices=sorted(SIZES),
        default=None,
        help="model and batch sizes (default: gpu on a GPU, cpu on a CPU, smoke with --smoke)",
    )
    parser.add_argument(
        "--batch",
        type=int,
        default=None,
        help="batch size instead of the size's own (e.g. to "
        "count a GPU-size step's kernels on a CPU, where the count does not depend on the batch)",
    )
    parser.add_argument(
        "--no-levers",
        dest="levers",
        action="store_false",
        help="skip the eager variants that switch train()'s speed levers off one at a time",
    )
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="cpu: time CPU runs by process time, with one thread (for a shared, busy machine)",
    )
    args = parser.parse_args()
    global CLOCK
    if args.clock == "cpu":
        CLOCK = time.process_time
        args.threads = 1  # process time adds up every thread's time, spinning included: one thread only
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu") if args.smoke else pick_device(args.device)
    size = SIZES[args.size or ("smoke" if args.smoke else ("cpu" if device.type == "cpu" else "gpu"))]
    if args.batch:
        size = size[:4] + (args.batch,) + size[5:]
    args.steps = args.steps or (3 if args.smoke else (30 if device.type == "cpu" else 20))
    args.windows = args.windows or (2 if args.smoke else 5)
    if args.smoke:
        args.quality_iters, args.eval_batches = 20, 4
    sections = args.sections.split(",")
    if args.budget is None and device.type == "cuda":
        args.budget = 360.0
    ng = load_nanogpt(args.nanogpt)
    bins = args.nanogpt / "data" / "shakespeare_char"
    train_tokens = torch.from_numpy(np.fromfile(bins / "train.bin", dtype=np.uint16).astype(np.int64))
    val_tokens = torch.from_numpy(np.fromfile(bins / "val.bin", dtype=np.uint16).astype(np.int64))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    RESULTS["machine"] = {
        "device": name,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "size (layers, heads, dims, block, batch, dropout)": size,
        "steps/window": args.steps,
        "windows": args.windows,
        "smoke": args.smoke,
        "clock": args.clock,
    }
    log(f"# bench_gpu on {name}, torch {torch.__version__}: {RESULTS['machine']}")
    started = time.perf_counter()
    needs = {"pretrain": 150, "compiled": 150, "quality": 120}  # rough seconds per section on an H100
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as nanoGPT's train.py sets it (lora_lab.train does too)
        torch.backends.cudnn.allow_tf32 = True
    for section in sections:
        t0 = time.perf_counter()
        if args.budget and t0 - started + needs.get(section, 30) > args.budget:
            log(f"\n## {section}: skipped, {t0 - started:.0f} s of the {args.budget:.0f} s budget are gone")
            RESULTS.setdefault("skipped", []).append(section)
            save(args.out)
            continue
        if section == "eager":
            section_throughput(args, ng, size, device, train_tokens, compiled=False)
        elif section == "compiled":
            section_throughput(args, ng, size, device, train_tokens, compiled=True)
        elif section == "kernels":
            section_kernels(args, ng, size, device, train_tokens)
        elif section == "memory":
            section_memory(args, size, device, train_tokens)
        elif section == "forward":
            section_forward(args, size, device)
        elif section == "pretrain":
            section_pretrain(args, device)
        elif section == "quality":
            section_cpu_quality(args, ng, size, device, train_tokens, val_tokens)
        else:
            raise SystemExit(f"Unknown section {section!r}.")
        RESULTS.setdefault("section_seconds", {})[section] = round(time.perf_counter() - t0, 1)
        save(args.out)
        log(f"  ({section}: {time.perf_counter() - t0:.1f} s, {time.perf_counter() - started:.1f} s in all)")


if __name__ == "__main__":
    main()

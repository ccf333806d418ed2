"""A fair comparison of fine-tuning methods: what every table and curve of lora_lab is measured with.

The rules, in the order `compare` applies them:
1. One estimator. `split_scores` is the exact loss over a fixed text (the first `eval_chars` characters of a
   split, every character predicted once from up to block_size characters of context, fp32), plus the
   next-character accuracy from the same logits. Curve points and table numbers are the same function of
   the same weights, so the step-0 point of a LoRA run *is* the base (B = 0), and the last point *is* the
   table's number.
2. A learning-rate sweep per method. Each method tries its own grid on the first seed and keeps the rate
   with the lowest final target loss; the chosen rate is reported. (It is chosen on the target validation
   text the table reports, so the table is slightly optimistic for every method alike.)
3. Seeds. The chosen rate is then run with every seed (>= 3), and tables give mean ± std (sample std, n-1)
   over seeds, next to a base row (the base is deterministic: no spread).
4. A noise line. A difference is called above noise when the two seed ranges (min..max) do not overlap
   (for the base: when its value lies outside the method's range); otherwise it is within noise.
5. A cache. Every run's numbers (curve, final scores, per-layer ‖ΔW‖_F) are stored as JSON under
   <model cache>/protocol-runs/, keyed by everything that determines the run (base weights, task texts,
   method, LoRA config, training config, evaluation), so a second call returns identical numbers at once
   and any change of those inputs misses.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import math
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .files import CorruptFileError, claim_output_dir, read_json, write_file_atomic, write_json_atomic
from .lora import LoRAConfig, apply_lora, lora_layers
from .model import GPT
from .pretrained import cache_dir
from .tasks import Task
from .train import TrainConfig, pick_device, train

PROTOCOL_VERSION = 3  # bump when a change makes cached runs incomparable (2: one CPU thread; 3: q/k/v fast path)
RUNS_FORMAT = "lora_lab.protocol_runs.v1"
EVAL_CHARS = 8_192  # characters scored per split: ~0.3 s per split for the tiny preset on one busy CPU core
CURVE_POINTS = 5  # evaluations per run, evenly spaced from step 0 to the last step
SEEDS = (0, 1, 2)

# The defaults below were chosen by running this protocol (benchmarks/bench_protocol.py; the run is
# recorded in benchmarks/RESULTS_protocol.md). Alpha follows one rule everywhere: ALPHA = 16 at every rank
# (LoRAConfig's default, the LoRA paper's and PEFT's convention). At one learning rate it matched or beat
# alpha = 2 r at r = 1, 4 and 16. It is not neutral across ranks: the scale alpha / r shrinks as r grows, and
# the learned ‖ΔW‖_F with it (norm_by_rank), so a fair rank comparison sweeps the learning rate per rank.
ALPHA = 16.0
STEPS = 200
LORA_LEARNING_RATES = (2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2)  # factor-2 grids around each method's best
FULL_LEARNING_RATES = (2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3)
LORA_LEARNING_RATE = 8e-3  # chosen from LORA_LEARNING_RATES for LoRA r=8 on rot13 (finetune's default)
FULL_LEARNING_RATE = 1e-3  # chosen from FULL_LEARNING_RATES for full fine-tuning on rot13


def default_alpha(r: int) -> float:
    """The alpha lora_lab uses when none is given, for rank r: ALPHA (16) at every rank."""
    return ALPHA


def protocol_train_config(full: bool, learning_rate: float, seed: int = 0, steps: int = STEPS,
                          **overrides) -> TrainConfig:
    """The training config of one protocol run: warmup 10% of the steps, cosine to learning_rate / 10, no
    weight decay for LoRA (its update starts at zero and has nothing to decay towards), 0.1 for full FT."""
    settings = dict(max_iters=steps, batch_size=12, learning_rate=learning_rate, min_lr=learning_rate / 10,
                    warmup_iters=steps // 10, weight_decay=0.1 if full else 0.0, seed=seed, device="cpu")
    return TrainConfig(**{**settings, **overrides})


# ----------------------------------------------------------------------------------------------
# 1. The estimator


@torch.no_grad()
def split_scores(model: GPT, tokens: torch.Tensor, eval_chars: int | None = EVAL_CHARS,
                 device: torch.device | str = "cpu") -> dict[str, float]:
    """{"loss", "accuracy"} of `model` on the first eval_chars + 1 tokens (all of them for None).

    The text is cut into consecutive windows of block_size characters; every character after the first is
    predicted exactly once, so this is the exact mean cross-entropy of that text, not a sample of it."""
    if eval_chars is not None:
        tokens = tokens[: eval_chars + 1]
    if len(tokens) < 2:
        raise ValueError(f"Need at least 2 tokens to score a text, got {len(tokens)}.")
    device = torch.device(device)
    block = model.config.block_size
    full = (len(tokens) - 1) // block
    pieces = []
    if full:
        pieces.append((tokens[: full * block].view(full, block), tokens[1: full * block + 1].view(full, block)))
    if (len(tokens) - 1) % block:
        pieces.append((tokens[full * block: -1][None], tokens[full * block + 1:][None]))
    was_training = model.training
    model.eval()
    total, correct, count = 0.0, 0, 0
    for x, y in pieces:
        for start in range(0, len(x), 128):  # 128 windows per forward: bounded memory
            xb, yb = x[start: start + 128].to(device), y[start: start + 128].to(device)
            logits, _ = model(xb)  # (b, T, vocab), fp32: no autocast, so the score is exact and repeatable
            logits = logits.float().flatten(0, 1)
            total += F.cross_entropy(logits, yb.flatten(), reduction="sum").item()
            correct += (logits.argmax(-1) == yb.flatten()).sum().item()
            count += yb.numel()
    model.train(was_training)
    return {"loss": total / count, "accuracy": correct / count}


def task_scores(model: GPT, data: dict[str, torch.Tensor], eval_chars: int | None = EVAL_CHARS,
                device: torch.device | str = "cpu") -> dict[str, float]:
    """target loss/accuracy and source loss (forgetting) with `split_scores`."""
    target = split_scores(model, data["target"], eval_chars, device)
    source = split_scores(model, data["source"], eval_chars, device)
    return {"target": target["loss"], "target_accuracy": target["accuracy"], "source": source["loss"]}


def encode(task: Task, tokenizer) -> dict[str, torch.Tensor]:
    return {
        "train": torch.tensor(tokenizer.encode(task.train), dtype=torch.long),
        "target": torch.tensor(tokenizer.encode(task.validation), dtype=torch.long),
        "source": torch.tensor(tokenizer.encode(task.source_validation), dtype=torch.long),
    }


# ----------------------------------------------------------------------------------------------
# 2. One run: train with the curve measured by the same estimator


def delta_norms(model: GPT, base_model: GPT) -> dict[str, float]:
    """‖ΔW‖_F per adapted (LoRA: (alpha/r) B A) or changed (full FT: W - W0) weight matrix."""
    layers = lora_layers(model)
    if layers:
        return {name: layer.delta_weight().norm().item() for name, layer in layers.items()}
    base = dict(base_model.named_parameters())
    return {name: (p - base[name]).norm().item() for name, p in model.named_parameters()
            if p.dim() == 2 and name in base and "emb" not in name and "lm_head" not in name}


def curve_steps(steps: int, points: int = CURVE_POINTS) -> list[int]:
    """`points` evenly spaced steps from 0 to `steps` (both included)."""
    return sorted({round(i * steps / (max(points, 2) - 1)) for i in range(max(points, 2))})


@dataclass
class TrainedCurve:
    curve: list[dict]  # [{"step", "target", "target_accuracy", "source"}] by task_scores
    step_losses: list[float]  # the training loss of every step
    seconds: float  # wall time of the training steps (scoring excluded)


@contextlib.contextmanager
def one_cpu_thread(device):
    """Run the block with one torch thread on a CPU. Why: CPU results depend on the thread count (full
    fine-tuning's losses differ in the 4th decimal between 1 and 2 threads), and the run cache must hold the
    same numbers whichever machine computed them. One thread is also the robust choice on a shared CPU."""
    threads = torch.get_num_threads()
    if pick_device(device).type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def train_with_curve(model: GPT, data: dict[str, torch.Tensor], cfg: TrainConfig, eval_chars: int | None = EVAL_CHARS,
                     points: int = CURVE_POINTS, progress: bool = False, desc: str = "fine-tuning",
                     on_point=None) -> TrainedCurve:
    """Train `model` in place with train.train (same seeds, batches, schedule, clipping; data-parallel under
    torchrun), scoring it with task_scores at curve_steps instead of train's sampled estimate.
    on_point(step, max_iters), if given, is called after each curve point (a widget's progress bar uses it)."""
    if cfg.compile or cfg.keep_best or cfg.activation_checkpointing:
        raise ValueError("Protocol runs train eagerly and keep their last weights: set compile, keep_best and "
                         "activation_checkpointing to False in the TrainConfig.")

    steps = iter(curve_steps(cfg.max_iters, points))

    def score(m: GPT) -> dict:
        scores = task_scores(m, data, eval_chars, next(m.parameters()).device)
        if on_point is not None:
            on_point(next(steps), cfg.max_iters)
        return scores

    with one_cpu_thread(cfg.device):
        result = train(model, data["train"], None, cfg, progress, desc, score=score,
                       score_steps=curve_steps(cfg.max_iters, points))
    curve = [{"step": e["iter"], **{k: v for k, v in e.items() if k not in ("iter", "lr")}} for e in result.evals]
    return TrainedCurve(curve, result.losses, result.seconds)


@dataclass
class Run:
    method: str  # the method's label, e.g. "LoRA r=8" or "full FT"
    learning_rate: float
    seed: int
    curve: list[dict]  # [{"step", "target", "target_accuracy", "source"}]; the last point is `final`
    delta_norms: dict[str, float]
    trainable_params: int
    seconds: float  # training + scoring wall time when it ran (a cache hit keeps the original time)
    from_cache: bool = False

    @property
    def final(self) -> dict:
        return self.curve[-1]

    @property
    def diverged(self) -> bool:
        return not all(math.isfinite(v) for v in (self.final["target"], self.final["source"]))

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "from_cache"}


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def model_digest(model: GPT) -> str:
    """sha256 of the model's config and weights: a cache key part that changes whenever the base does."""
    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def run_key(base_digest: str, task: Task, lora: LoRAConfig | None, cfg: TrainConfig, eval_chars, points) -> str:
    """Everything that determines a run's numbers. Of the device only its kind counts ("cuda:1" and "cuda"
    compute alike; a GPU trains under bf16 autocast and so gives other numbers than the CPU)."""
    texts = {k: hashlib.sha256(getattr(task, k).encode()).hexdigest()
             for k in ("train", "validation", "source_validation")}
    return _digest({"version": PROTOCOL_VERSION, "base": base_digest, "task": [task.name, texts],
                    "lora": lora.to_dict() if lora is not None else None,
                    "train": {k: v for k, v in cfg.to_dict().items() if k != "device"},
                    "device": pick_device(cfg.device).type,
                    "eval": {"chars": eval_chars, "points": points}})[:24]


def runs_dir(cache: str | os.PathLike | None = None) -> Path:
    """The folder cached runs live in: <model cache>/protocol-runs (see pretrained.cache_dir)."""
    return cache_dir(cache) / "protocol-runs"


def run_once(base_model: GPT, task: Task, tokenizer, lora: LoRAConfig | None, cfg: TrainConfig, *,
             label: str | None = None, eval_chars: int | None = EVAL_CHARS, points: int = CURVE_POINTS,
             cache: str | os.PathLike | None | bool = None, base_digest: str | None = None) -> Run:
    """One fine-tune of a copy of `base_model` (LoRA with `lora`, every weight if None), cached on disk.

    cache=False runs without the cache; None uses runs_dir(); a path uses that model cache folder."""
    label = label or (f"LoRA r={lora.r}" if lora is not None else "full FT")
    key = None
    if cache is not False:
        key = run_key(base_digest or model_digest(base_model), task, lora, cfg, eval_chars, points)
        path = runs_dir(None if cache is None else cache) / f"{key}.json"
        if path.is_file():
            try:
                return Run(**{**read_json(path), "method": label}, from_cache=True)
            except (CorruptFileError, TypeError) as err:
                raise CorruptFileError(f"The cached run {path} is damaged ({err}); delete that file to run it "
                                       "again.") from None
    data = encode(task, tokenizer)
    t0 = time.perf_counter()
    model = copy.deepcopy(base_model)
    torch.manual_seed(cfg.seed)  # LoRA's A matrices come from the global RNG
    if lora is None:
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        apply_lora(model, lora)
    trainable = model.num_parameters(trainable_only=True)
    curve = train_with_curve(model, data, cfg, eval_chars, points).curve
    run = Run(label, cfg.learning_rate, cfg.seed, curve, delta_norms(model.cpu(), base_model), trainable,
              time.perf_counter() - t0)
    if key is not None and not run.diverged:
        folder = claim_output_dir(runs_dir(None if cache is None else cache), RUNS_FORMAT)
        write_json_atomic(folder / f"{key}.json", run.to_dict())
    return run


# ----------------------------------------------------------------------------------------------
# 3. Methods, seeds, the learning-rate sweep


@dataclass(frozen=True)
class Method:
    """A fine-tuning method: LoRA with `lora`, or full fine-tuning (lora=None), and its learning-rate grid."""
    lora: LoRAConfig | None
    learning_rates: tuple[float, ...]
    label: str = ""

    def __post_init__(self):
        rates = tuple(self.learning_rates)
        if not rates or any(isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r < math.inf
                            for r in rates):
            raise ValueError(f"learning_rates must be a non-empty list of positive numbers, "
                             f"got {self.learning_rates!r}.")
        object.__setattr__(self, "learning_rates", rates)
        if not self.label:
            object.__setattr__(self, "label", f"LoRA r={self.lora.r}" if self.lora is not None else "full FT")


def lora_method(r: int = 8, targets=("q_proj", "k_proj", "v_proj", "o_proj"), learning_rates=LORA_LEARNING_RATES,
                alpha: float | None = None, label: str = "") -> Method:
    return Method(LoRAConfig(r=r, alpha=default_alpha(r) if alpha is None else alpha, targets=tuple(targets)),
                  tuple(learning_rates), label)


def full_method(learning_rates=FULL_LEARNING_RATES) -> Method:
    return Method(None, tuple(learning_rates))


def mean_spread(values: list[float]) -> tuple[float, float]:
    """(mean, sample std with n-1; 0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def above_noise(a: list[float], b: list[float]) -> bool:
    """True when the two sets of seed results do not overlap (max of one below min of the other)."""
    return max(a) < min(b) or max(b) < min(a)


@dataclass
class MethodResult:
    method: Method
    chosen_lr: float
    sweep: dict[float, float]  # learning rate -> final target loss on the first seed
    runs: list[Run]  # one per seed at chosen_lr

    def values(self, key: str) -> list[float]:
        return [r.final[key] for r in self.runs]


@dataclass
class Comparison:
    task: Task
    base: dict[str, float]  # task_scores of the base
    results: list[MethodResult]
    seeds: tuple[int, ...]
    steps: int
    seconds: float = 0.0
    eval_chars: int | None = EVAL_CHARS  # characters scored per validation text (None: all of it)

    METRICS = (("target", "target loss"), ("target_accuracy", "target accuracy"), ("source", "source loss"))

    def result(self, label: str) -> MethodResult:
        for res in self.results:
            if res.method.label == label:
                return res
        raise KeyError(f"No method {label!r} in this comparison; it has {[r.method.label for r in self.results]}.")

    def rows(self) -> list[dict]:
        """The table: a base row, then one row per method with mean ± std over seeds."""
        rows = [{"method": "base", "lr": "-", "trainable": "0",
                 **{name: f"{self.base[key]:.4f}" for key, name in self.METRICS}}]
        for res in self.results:
            row = {"method": res.method.label, "lr": f"{res.chosen_lr:g}",
                   "trainable": f"{res.runs[0].trainable_params:,}"}
            for key, name in self.METRICS:
                mean, std = mean_spread(res.values(key))
                row[name] = f"{mean:.4f} ± {std:.4f}"
            rows.append(row)
        return rows

    def noise_lines(self) -> list[str]:
        """Which differences are above seed noise (non-overlapping seed ranges), one line per comparison."""
        lines = []
        for key, name in self.METRICS:
            for res in self.results:
                vals, b = res.values(key), self.base[key]
                verdict = "above noise" if above_noise(vals, [b]) else "within noise"
                lines.append(f"{name}: {res.method.label} vs base: {statistics.fmean(vals) - b:+.4f} ({verdict})")
            for i, a in enumerate(self.results):
                for other in self.results[i + 1:]:
                    va, vb = a.values(key), other.values(key)
                    verdict = "above noise" if above_noise(va, vb) else "within noise"
                    lines.append(f"{name}: {a.method.label} vs {other.method.label}: "
                                 f"{statistics.fmean(va) - statistics.fmean(vb):+.4f} ({verdict})")
        return lines

    def to_text(self) -> str:
        scored = "all the characters" if self.eval_chars is None else f"the first {self.eval_chars:,} characters"
        head = (f"Task {self.task.name}: {self.steps} steps, seeds {list(self.seeds)}; exact loss on {scored} "
                "of each validation text; mean ± std (n-1) over seeds; lr = the rate "
                "chosen from each method's grid on the first seed (lowest target loss).")
        sweeps = [f"lr sweep {res.method.label}: " + ", ".join(f"{lr:g} -> {v:.4f}" for lr, v in res.sweep.items())
                  + (" (best at the grid's edge: widen the grid)" if len(res.sweep) > 1 and res.chosen_lr in
                     (min(res.sweep), max(res.sweep)) else "") for res in self.results]
        noise = "Noise: a difference is above noise when the seed ranges (min..max) do not overlap."
        return "\n".join([head, "", format_table(self.rows()), "", *sweeps, "", noise, *self.noise_lines()]) + "\n"


def compare(base_model: GPT, task: Task, tokenizer, methods: list[Method], *, seeds=SEEDS, steps: int = STEPS,
            eval_chars: int | None = EVAL_CHARS, cache: str | os.PathLike | None | bool = None,
            train_overrides: dict | None = None, curve_points: int = CURVE_POINTS, log=None) -> Comparison:
    """The protocol: per method, sweep its learning rates on seeds[0], then run every seed at the best rate."""
    seeds = tuple(seeds)
    if len(seeds) < 1 or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct integers (3 or more for a spread), got {seeds!r}.")
    if not methods or not all(isinstance(m, Method) for m in methods):
        raise ValueError("methods must be a non-empty list of protocol.Method (see lora_method, full_method).")
    labels = [m.label for m in methods]
    if len(set(labels)) != len(labels):
        raise ValueError(f"Two methods share a label: {labels}; give each a distinct label.")
    say = log or (lambda line: None)
    t0 = time.perf_counter()
    digest = model_digest(base_model) if cache is not False else None
    with one_cpu_thread("cpu"):  # the base row is scored like every curve point
        base = task_scores(base_model, encode(task, tokenizer), eval_chars)
    results = []
    for method in methods:
        def run(lr, seed):
            cfg = protocol_train_config(method.lora is None, lr, seed, steps, **(train_overrides or {}))
            result = run_once(base_model, task, tokenizer, method.lora, cfg, label=method.label,
                              eval_chars=eval_chars, points=curve_points, cache=cache, base_digest=digest)
            say(f"{method.label} lr={lr:g} seed={seed}: target {result.final['target']:.4f}"
                f"{' (cached)' if result.from_cache else f' ({result.seconds:.1f} s)'}")
            return result
        first = {lr: run(lr, seeds[0]) for lr in method.learning_rates}
        sweep = {lr: r.final["target"] for lr, r in first.items()}
        finite = {lr: v for lr, v in sweep.items() if math.isfinite(v)}
        if not finite:
            raise RuntimeError(f"{method.label}: every learning rate of {list(sweep)} diverged; try smaller ones.")
        best = min(finite, key=finite.get)
        runs = [first[best]] + [run(best, seed) for seed in seeds[1:]]
        results.append(MethodResult(method, best, sweep, runs))
    return Comparison(task, base, results, seeds, steps, time.perf_counter() - t0, eval_chars)


# ----------------------------------------------------------------------------------------------
# 4. What the chapters measure with it


def lora_vs_full(base_model: GPT, task: Task, tokenizer, *, r: int = 8, sweep: bool = False, seeds=SEEDS,
                 steps: int = STEPS, cache=None, device: str = "cpu", log=None, lora_rates=None, full_rates=None,
                 eval_chars: int | None = EVAL_CHARS, curve_points: int = CURVE_POINTS) -> Comparison:
    """Base vs LoRA (r, alpha 16, attention) vs full fine-tuning. sweep=False runs each method at the rate the
    protocol chose (LORA_LEARNING_RATE, FULL_LEARNING_RATE): 6 runs. sweep=True sweeps both grids: 14 runs.
    lora_rates / full_rates: a grid of one's own for that method (overrides `sweep` for it)."""
    if lora_rates is None:
        lora_rates = LORA_LEARNING_RATES if sweep else (LORA_LEARNING_RATE,)
    if full_rates is None:
        full_rates = FULL_LEARNING_RATES if sweep else (FULL_LEARNING_RATE,)
    return compare(base_model, task, tokenizer, [lora_method(r, learning_rates=lora_rates), full_method(full_rates)],
                   seeds=seeds, steps=steps, cache=cache, train_overrides={"device": device}, log=log,
                   eval_chars=eval_chars, curve_points=curve_points)


def norm_by_rank(base_model: GPT, task: Task, tokenizer, ranks=(1, 4, 16), *, alpha=ALPHA,
                 learning_rate: float = LORA_LEARNING_RATE, seeds=SEEDS, steps: int = STEPS, cache=None,
                 log=None, eval_chars: int | None = EVAL_CHARS, curve_points: int = 2,
                 device: str = "cpu") -> Comparison:
    """One LoRA run per rank and seed at one learning rate, to read ‖ΔW‖_F against r (delta_norm_rows).
    alpha: a number for every rank (default 16: scale alpha / r, lora_lab's and the LoRA paper's rule), or a
    function of r (e.g. `lambda r: 2 * r` for a constant scale, `lambda r: 4 * r ** 0.5` for rsLoRA's)."""
    methods = [lora_method(r, learning_rates=[learning_rate], alpha=alpha(r) if callable(alpha) else alpha)
               for r in ranks]
    return compare(base_model, task, tokenizer, methods, seeds=seeds, steps=steps, cache=cache,
                   curve_points=curve_points, eval_chars=eval_chars, log=log, train_overrides={"device": device})


def attention_vs_mlp(base_model: GPT, task: Task, tokenizer, attention_rank: int = 5, *,
                     learning_rate: float = LORA_LEARNING_RATE, seeds=SEEDS, steps: int = STEPS, cache=None,
                     log=None, eval_chars: int | None = EVAL_CHARS, curve_points: int = 2,
                     device: str = "cpu") -> Comparison:
    """LoRA on the attention projections only vs on the MLP only, at an equal parameter budget
    (equal_budget_ranks), each at `learning_rate`."""
    attn_r, mlp_r = equal_budget_ranks(base_model, attention_rank)
    methods = [lora_method(attn_r, learning_rates=[learning_rate], label=f"attention r={attn_r}"),
               lora_method(mlp_r, targets=("up_proj", "down_proj"), learning_rates=[learning_rate],
                           label=f"MLP r={mlp_r}")]
    return compare(base_model, task, tokenizer, methods, seeds=seeds, steps=steps, cache=cache,
                   curve_points=curve_points, eval_chars=eval_chars, log=log, train_overrides={"device": device})


def lr_ratio(comparison: Comparison, lora_label: str, full_label: str = "full FT") -> float:
    """LoRA's chosen learning rate over full fine-tuning's ("LoRA Without Regret" reports about 10)."""
    return comparison.result(lora_label).chosen_lr / comparison.result(full_label).chosen_lr


def delta_norm_rows(comparison: Comparison) -> list[dict]:
    """Per method: ‖ΔW‖_F averaged over its adapted matrices, mean ± std over seeds (for ‖ΔW‖ vs r)."""
    rows = []
    for res in comparison.results:
        per_seed = [statistics.fmean(r.delta_norms.values()) for r in res.runs]
        mean, std = mean_spread(per_seed)
        lora = res.method.lora
        rows.append({"method": res.method.label, "r": lora.r if lora else None, "alpha": lora.alpha if lora else None,
                     "lr": res.chosen_lr, "delta_norm": mean, "delta_norm_std": std})
    return rows


def equal_budget_ranks(model: GPT, attention_rank: int, attention=("q_proj", "k_proj", "v_proj", "o_proj"),
                       mlp=("up_proj", "down_proj")) -> tuple[int, int]:
    """(attention rank, MLP rank) whose LoRA adapters have the same number of parameters (as near as integers
    allow): r (d + k) summed over each group's matrices."""
    def per_rank(names):
        return sum(m.in_features + m.out_features for n, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in names)
    budget = attention_rank * per_rank(attention)
    return attention_rank, max(1, round(budget / per_rank(mlp)))


# ----------------------------------------------------------------------------------------------
# Tables and plots (shared with finetune)


def format_table(rows: list[dict], columns: list[str] | None = None, formats: dict[str, str] | None = None) -> str:
    """A markdown table (also readable as plain text). Floats get 4 decimals unless `formats` names a
    format spec for their column; whole floats (an alpha of 16.0) print as integers."""
    if columns is None:
        columns = list(rows[0]) if rows else []
    formats = formats or {}

    def cell(v, column: str) -> str:
        if isinstance(v, float) and column in formats:
            return format(v, formats[column])
        if isinstance(v, float):
            return f"{v:g}" if v.is_integer() else f"{v:.4f}"
        if isinstance(v, (list, tuple)):
            return ",".join(map(str, v))
        return "-" if v is None else str(v)

    body = [[cell(r.get(c), c) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(b[i]) for b in body]) for i, c in enumerate(columns)]
    line = lambda cells: "| " + " | ".join(s.ljust(w) for s, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(b) for b in body])


def new_figure(width: float, height: float, ncols: int = 1):
    # The object-oriented API: no pyplot, so no GUI backend and no global figure state.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def save_figure(fig, path: str | os.PathLike) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return write_file_atomic(path, buf.getvalue())


def plot_comparison(comparison: Comparison, path: str | os.PathLike) -> Path:
    """comparison_figure saved as a PNG at `path`."""
    return save_figure(comparison_figure(comparison), path)


def comparison_figure(comparison: Comparison):
    """Target loss (left) and source loss (right, forgetting) against step: each method's seed mean with its
    min..max band, and the base as a dashed line. Points are the table's estimator, so step 0 of LoRA sits on
    the base line and the last points are the table's means."""
    fig, axes = new_figure(11, 4.2, ncols=2)
    for ax, (key, name) in zip(axes, (("target", "target loss (the task)"), ("source", "source loss (forgetting)"))):
        for i, res in enumerate(comparison.results):
            steps = [p["step"] for p in res.runs[0].curve]
            per_step = list(zip(*[[p[key] for p in r.curve] for r in res.runs]))
            ax.plot(steps, [statistics.fmean(v) for v in per_step], "o-", color=f"C{i}",
                    label=f"{res.method.label} (lr {res.chosen_lr:g})")
            ax.fill_between(steps, [min(v) for v in per_step], [max(v) for v in per_step], color=f"C{i}", alpha=0.2)
        ax.axhline(comparison.base[key], color="k", ls="--", lw=1, label="base")
        ax.set_xlabel("fine-tuning step")
        ax.set_ylabel("cross-entropy (nats / char)")
        ax.set_title(f"{comparison.task.name}: {name}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return fig


COMPARE_OUTPUT_FORMAT = "lora_lab.compare.v1"  # the tag of a folder write_comparison writes into


def check_compare_output(out_dir: str | os.PathLike) -> Path:
    """Claim `out_dir` for write_comparison (files.claim_output_dir): missing, empty or an earlier comparison's."""
    return claim_output_dir(out_dir, COMPARE_OUTPUT_FORMAT)


def write_comparison(comparison: Comparison, out_dir: str | os.PathLike) -> dict[str, Path]:
    """comparison.md (the table, sweeps and noise lines), comparison.json (every run) and curves.png."""
    out = check_compare_output(out_dir)
    record = {"task": comparison.task.name, "steps": comparison.steps, "seeds": list(comparison.seeds),
              "eval_chars": comparison.eval_chars, "base": comparison.base,
              "methods": [{"label": r.method.label, "lora": r.method.lora.to_dict() if r.method.lora else None,
                           "chosen_lr": r.chosen_lr, "sweep": {f"{lr:g}": v for lr, v in r.sweep.items()},
                           "runs": [run.to_dict() for run in r.runs]} for r in comparison.results]}
    return {"md": write_file_atomic(out / "comparison.md", comparison.to_text()),
            "json": write_json_atomic(out / "comparison.json", record),
            "png": plot_comparison(comparison, out / "curves.png")}

"""Where LoRA starts to win on a GPU: the width at which its skipped weight-gradient matmuls outweigh the small
kernels its A/B branch adds. Counted exactly on any machine, then turned into step times by a small model.

What is counted (exact, the same on every machine):
- matmul FLOPs and the matmul list of one forward + backward, at the real width, on the meta device (shapes
  only, no memory, no arithmetic). Attention's T x T products are counted apart (the math path's bmm's).
- operators of one whole training step (forward, backward, clipping, AdamW, as lora_lab.train runs it, under
  bf16 autocast), counted by costs.OperatorCount on a CPU stand-in of the same depth but a narrow width:
  the count depends only on the structure (layers, targets, dropout, fast path), not on width, heads, sequence
  length or a batch above one (tests/test_crossover.py checks it against the real model).

The step-time model (StepTimeModel; every parameter fitted from a measured GPU run, fit_step_time_model):
- host, eager:   t_host = host_fixed_s + operators x launch_s          (Python, dispatch and launch per operator)
- device:        t_dev  = sum over matmuls of max(FLOPs / gemm_flops_per_s, gemm_min_s)
                        + (other kernels) x kernel_min_s + activation work x elementwise_s
  (activation work: layers x tokens x width x passes, 3 for a training step and 1 for a forward)
  (a roofline per matmul, with a floor for thin ones; the other kernels cost a minimum each plus
  bandwidth-bound work that grows with the activations, attention at a fixed block size included)
- eager step = max(t_host, t_dev): the host launches ahead of the GPU, so the slower side sets the pace;
- CUDA-graph step = t_dev: a replay launches the whole step at once (TrainConfig.cuda_graphs).

    rows = crossover_table()                     # the width sweep, full vs LoRA r=8 on q/k/v/o
    print(format_table(rows, CROSSOVER_COLUMNS))
    plot_crossover(rows, path="crossover.png")
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode  # the documented __torch_dispatch__ hook

from ..lora import LoRAConfig, apply_lora, set_fast_path
from ..model import GPT, GPTConfig
from ..train import TrainConfig, make_optimizer
from .costs import OperatorCount
from .reports import new_figure, save_figure

WIDTHS = (384, 768, 1024, 1536, 2048)
HEAD_SIZE = 64  # channels per head, as in GPT-2 and the course's 10.65M model
CHANNELS_PER_LAYER = 64  # n_layer = width / 64: the aspect ratio of the 10.65M model (384/6) and GPT-2 small (768/12)
BATCH_SIZE, BLOCK_SIZE = 64, 256  # the GPU run's 16,384 tokens per step, held fixed across the sweep
DROPOUT = 0.2  # the GPU run's, so that the sweep's first width is the model measured there
LORA_QKVO = LoRAConfig(r=8, alpha=16.0, targets=("q_proj", "k_proj", "v_proj", "o_proj"))
MATMULS = ("mm", "addmm")  # the linear layers' matmuls; bmm on the meta device is attention's math path
H100_RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_results_h100.json"


def sweep_config(width: int, block_size: int = BLOCK_SIZE, vocab_size: int = 65, dropout: float = DROPOUT) -> GPTConfig:
    """The sweep's model at `width`: heads of HEAD_SIZE channels and one layer per CHANNELS_PER_LAYER channels
    (n_head = n_layer = width / 64), so depth grows with width as in the GPT-2 family's small end."""
    if not isinstance(width, int) or isinstance(width, bool) or width < HEAD_SIZE or width % HEAD_SIZE:
        raise ValueError(f"The sweep's widths are positive multiples of {HEAD_SIZE}, got {width!r}.")
    return GPTConfig(
        vocab_size=vocab_size,
        block_size=block_size,
        n_layer=max(1, width // CHANNELS_PER_LAYER),
        n_head=width // HEAD_SIZE,
        n_embd=width,
        dropout=dropout,
    )


# ----------------------------------------------------------------------------------------------
# Counting


class MatmulList(TorchDispatchMode):
    """Records the FLOPs of every linear-layer matmul (mm, addmm: 2 m k n each) and sums attention's bmm's."""

    def __init__(self):
        super().__init__()
        self.matmuls: list[int] = []
        self.attention_flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name in MATMULS:
            a, b = args[-2], args[-1]  # addmm(bias, a, b): the last two are the factors
            self.matmuls.append(2 * a.shape[0] * a.shape[1] * b.shape[1])
        elif name == "bmm":
            a, b = args
            self.attention_flops += 2 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]
        return func(*args, **(kwargs or {}))


@dataclass(frozen=True)
class StepCount:
    """One training step (or one eval forward, training=False) of one model, counted."""

    method: str  # "full", "LoRA", "floor" (every weight frozen but the embedding, no A/B branch)
    width: int
    n_layer: int
    tokens: int  # tokens per step (batch x block)
    training: bool  # a whole training step; False: one eval forward without gradients
    parameters: int
    trainable: int
    matmuls: tuple[int, ...]  # FLOPs of each linear-layer matmul, forward (+ backward), sorted
    attention_flops: int  # attention's T x T products (unmasked, as the math path runs them)
    operators: int  # operators run (training: forward, backward, clipping, AdamW), as OperatorCount sees them

    @property
    def matmul_flops(self) -> int:
        return sum(self.matmuls)

    @property
    def flops(self) -> int:
        return self.matmul_flops + self.attention_flops

    @property
    def activation_work(self) -> int:
        """layers x tokens x channels x passes (forward 1; forward + backward 3, the usual 1 : 2 rule): what the
        bandwidth-bound kernels' time grows with."""
        return self.n_layer * self.tokens * self.width * (3 if self.training else 1)


def build(config: GPTConfig, method: str, lora: LoRAConfig, fast_path: bool = True) -> GPT:
    """The model one method trains: full (as built), LoRA (apply_lora), or the floor (all frozen but the token
    embedding, so gradients still reach every layer: what LoRA would cost if its branch were free)."""
    model = GPT(config)
    if method == "LoRA":
        apply_lora(model, lora)
        set_fast_path(model, fast_path)
    elif method == "floor":
        model.requires_grad_(False).tok_emb.weight.requires_grad_(True)
    elif method != "full":
        raise ValueError(f"method must be 'full', 'LoRA' or 'floor', got {method!r}.")
    return model


def direct_matmul_count(
    config: GPTConfig, batch_size: int, method: str, lora: LoRAConfig, fast_path: bool = True, training: bool = True
) -> tuple[Counter, int, int, int]:
    """count_matmuls at the full depth, in one go: (Counter of matmul FLOPs, attention, parameters, trainable)."""
    with torch.device("meta"):
        # train mode even for the eval forward: the matmuls are the same, and an eval forward would check the
        # token ids' range, which a meta tensor cannot answer
        model = build(config, method, lora, fast_path).train()
        x = torch.zeros(batch_size, config.block_size, dtype=torch.long)
    with MatmulList() as counted, torch.set_grad_enabled(training):
        _, loss = model(x, x)
        if training:
            loss.backward()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return Counter(counted.matmuls), counted.attention_flops, model.num_parameters(), trainable


def count_matmuls(
    config: GPTConfig, batch_size: int, method: str, lora: LoRAConfig = LORA_QKVO, fast_path=True, training=True
) -> tuple[tuple[int, ...], int, int, int]:
    """(the FLOPs of each matmul, sorted; attention FLOPs; parameters; trainable parameters) of one forward +
    backward (training=False: one eval forward without gradients) at the real shapes, on the meta device.

    Counted on models of one and two layers of the real width: every block after the first runs the same
    matmuls (the first may skip input gradients), so n_layer layers run those of one layer plus n_layer - 1
    times the second's (tested against direct counts); a 2048-wide, 32-layer sweep point then counts in seconds."""
    one = direct_matmul_count(replace(config, n_layer=1), batch_size, method, lora, fast_path, training)
    if config.n_layer == 1:
        matmuls, attention, parameters, trainable = one
    else:
        two = direct_matmul_count(replace(config, n_layer=2), batch_size, method, lora, fast_path, training)
        block = two[0] - one[0]  # the second block's matmuls (Counter difference)
        if one[0] + block != two[0]:
            raise RuntimeError("A second block that runs fewer matmuls than the first: the per-block rule fails.")
        extra = config.n_layer - 1
        matmuls = one[0] + Counter({f: n * extra for f, n in block.items()})
        attention, parameters, trainable = (a + extra * (b - a) for a, b in zip(one[1:], two[1:]))
    return tuple(sorted(matmuls.elements())), attention, parameters, trainable


def stand_in(config: GPTConfig, lora: LoRAConfig, n_layer: int) -> GPTConfig:
    """A narrow model of the same structure: `n_layer` layers, the same targets and dropout, two heads, 8
    positions (the operators do not depend on width, heads, length or a batch above one: tests/test_crossover.py)."""
    width = 2 * max(8, lora.r)  # wide enough for the rank; two heads of an even size for the rotary tables
    return replace(config, n_embd=width, n_head=2, block_size=min(8, config.block_size), n_layer=n_layer)


def direct_operator_count(
    config: GPTConfig, method: str, lora: LoRAConfig, fast_path: bool = True, training: bool = True, batch_size: int = 2
) -> int:
    """The operators of one step (or eval forward) of `config` itself, counted by running it on the CPU."""
    with torch.random.fork_rng(devices=[]):  # the caller's random stream is left where it was
        torch.manual_seed(0)
        model = build(config, method, lora, fast_path).train(training)
        gen = torch.Generator().manual_seed(0)
        x = torch.randint(0, config.vocab_size, (batch_size, config.block_size), generator=gen)
        if not training:
            with OperatorCount() as ops, torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                model(x)
            return ops.count
        optimizer = make_optimizer(model, TrainConfig())
        trainable = [p for p in model.parameters() if p.requires_grad]
        for _ in range(2):  # count the second step: the first also creates AdamW's state
            with OperatorCount() as ops:  # train()'s step: autocast, backward, clipping, AdamW
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    _, loss = model(x, x)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(trainable, 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        return ops.count


def count_operators(
    config: GPTConfig, method: str, lora: LoRAConfig = LORA_QKVO, fast_path: bool = True, training: bool = True
) -> int:
    """Operators of one steady-state training step (training=False: one eval forward), under bf16 autocast as
    on a GPU, counted on CPU stand-ins of one and two layers: every block runs the same operators, so the
    count at n_layer is count(1) + (n_layer - 1) x (count(2) - count(1)) exactly (tested against direct counts)."""
    # batch 2: with a batch of one some reshapes find their input contiguous and skip a copy that any larger
    # batch needs (a GPU run's batch is larger)
    one = direct_operator_count(stand_in(config, lora, 1), method, lora, fast_path, training, batch_size=2)
    if config.n_layer == 1:
        return one
    two = direct_operator_count(stand_in(config, lora, 2), method, lora, fast_path, training, batch_size=2)
    return one + (config.n_layer - 1) * (two - one)


def count_step(
    config: GPTConfig,
    batch_size: int,
    method: str,
    lora: LoRAConfig = LORA_QKVO,
    fast_path: bool = True,
    training: bool = True,
) -> StepCount:
    """Count one training step (training=False: one eval forward) of `method` ("full", "LoRA", "floor") on
    `config` at batch_size x block_size tokens."""
    matmuls, attention, parameters, trainable = count_matmuls(config, batch_size, method, lora, fast_path, training)
    return StepCount(
        method=method,
        width=config.n_embd,
        n_layer=config.n_layer,
        tokens=batch_size * config.block_size,
        training=training,
        parameters=parameters,
        trainable=trainable,
        matmuls=matmuls,
        attention_flops=attention,
        operators=count_operators(config, method, lora, fast_path, training),
    )


def linear_flops(config: GPTConfig, batch_size: int, method: str = "full", lora: LoRAConfig = LORA_QKVO) -> int:
    """The matmul FLOPs of one training step by formula (reference LoRA layers, no fast path), to check the count.

    full: 6 N T, N = the linear layers' weights (12 d^2 per block, and the tied V x d head). LoRA skips every
    frozen weight's gradient (2 T d k each) and, in the first block, the input gradients of q, k, v (their
    input, the embedding, needs none); it adds per adapted d x k layer 2 T r (d + k) for the forward, the same
    for B's two gradients and A's weight gradient, and for A's input gradient outside block 0's q/k/v."""
    C, V, L, T = config.n_embd, config.vocab_size, config.n_layer, batch_size * config.block_size
    weights = L * 12 * C * C + V * C
    if method == "full":
        return 6 * weights * T
    if method != "LoRA" or set(lora.targets) != {"q_proj", "k_proj", "v_proj", "o_proj"} or lora.dropout:
        raise ValueError("linear_flops knows full training and LoRA on exactly q/k/v/o without dropout.")
    r = lora.r
    frozen = 4 * weights * T - 3 * 2 * T * C * C  # forward + input gradients; block 0's q/k/v need no input grad
    branch = 4 * L * 3 * (2 * T * r * 2 * C) - 3 * 2 * T * r * C  # (forward, B's grads, A's grads) x 2 T r (d+k)
    return frozen + branch


# ----------------------------------------------------------------------------------------------
# The time model


@dataclass(frozen=True)
class StepTimeModel:
    launch_s: float  # host seconds per operator in an eager step
    host_fixed_s: float  # host seconds per eager training step that do not grow with the operators
    gemm_flops_per_s: float  # matmul throughput of a large matmul
    gemm_min_s: float  # the least a matmul kernel takes, however thin
    kernel_min_s: float  # the least any other kernel takes
    elementwise_s: float  # device seconds per unit of StepCount.activation_work (bandwidth-bound kernels)
    source: str = ""  # where the parameters come from

    def gemm_s(self, count: StepCount) -> float:
        return sum(max(f / self.gemm_flops_per_s, self.gemm_min_s) for f in count.matmuls)

    def device_s(self, count: StepCount) -> float:
        others = max(0, count.operators - len(count.matmuls))
        return self.gemm_s(count) + others * self.kernel_min_s + count.activation_work * self.elementwise_s

    def host_s(self, count: StepCount) -> float:
        return (self.host_fixed_s if count.training else 0.0) + count.operators * self.launch_s

    def eager_s(self, count: StepCount) -> float:
        """The host launches ahead of the GPU, so the slower of the two sets the pace."""
        return max(self.host_s(count), self.device_s(count))

    def graphed_s(self, count: StepCount) -> float:
        """A CUDA-graph replay launches the whole step at once: only the device's time is left."""
        return self.device_s(count)

    def to_dict(self) -> dict:
        return asdict(self)


def _gemm_sum(terms, p: float, g: float) -> float:
    return sum(w * max(f / p, g) for f, w in terms)


def _solve_gemm(full, lora, full_s: float, lora_s: float) -> tuple[float, float]:
    """(throughput P, minimum g) with sum of weight x max(f/P, g) over (f, weight) terms equal to both runs'
    measured GEMM time. For a given g, full's time fixes P (its sum falls as P grows); then LoRA's many thin
    matmuls fix g (its sum, at full's P, grows with g). Both by bisection."""

    def throughput(g: float) -> float:
        lo, hi = 1e9, 1e17
        for _ in range(80):
            mid = math.sqrt(lo * hi)
            lo, hi = (mid, hi) if _gemm_sum(full, mid, g) > full_s else (lo, mid)
        return math.sqrt(lo * hi)

    def gap(g: float) -> float:
        return _gemm_sum(lora, throughput(g), g) - lora_s

    lo, hi = 0.0, full_s / sum(w for _, w in full)  # above this g, full's matmuls alone would take longer
    if gap(lo) >= 0:  # a plain roofline already gives LoRA's matmuls their measured time: no minimum needed
        return throughput(0.0), 0.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if gap(mid) < 0 else (lo, mid)
    return throughput(lo), lo


def fit_step_time_model(results: dict, evals_per_profiled_step: float = 2 / 5) -> tuple[StepTimeModel, dict]:
    """Fit a StepTimeModel to a bench_gpu.py results file: its eager ms/step and its kernels profile (kernels,
    kernel time, GEMM time) of full training and LoRA at one size. Returns the model and its checks: the floor
    run's kernel and GEMM time, predicted vs measured (the floor is not used in the fit).

    bench_gpu's kernels section profiles lora_lab.train over 5 steps, which evaluates one batch at the first
    and the last: the profile holds 2/5 of an eval forward per step (`evals_per_profiled_step`), counted here
    and modelled alongside. The parameters:
    - gemm_flops_per_s, gemm_min_s: both runs' GEMM times from their matmul lists (_solve_gemm);
    - kernel_min_s: the extra non-GEMM kernel time per extra kernel, LoRA over full (same activations);
      elementwise_s: the rest of full's non-GEMM kernel time, per unit of activation work;
    - launch_s, host_fixed_s: the line through both runs' (operators per step, eager ms/step)."""
    n_layer, n_head, n_embd, block, batch, dropout = results["machine"][
        "size (layers, heads, dims, block, batch, dropout)"
    ]
    config = GPTConfig(vocab_size=65, block_size=block, n_layer=n_layer, n_head=n_head, n_embd=n_embd, dropout=dropout)
    kernels, eager, e = results["kernels"], results["throughput_eager"], evals_per_profiled_step
    # "LoRA" is the fast path where the run also profiled reference layers; a run from before it has only those
    fast = "LoRA, reference layers" in kernels
    measured = {
        "full": kernels["full"],
        "LoRA": kernels["LoRA"],
        "floor": kernels["floor (all frozen but the embedding)"],
    }
    step = {m: count_step(config, batch, m, LORA_QKVO, fast) for m in measured}
    forward = {m: count_step(config, batch, m, LORA_QKVO, fast, training=False) for m in measured}
    terms = {m: [(f, 1.0) for f in step[m].matmuls] + [(f, e) for f in forward[m].matmuls] for m in measured}
    gemm = {m: measured[m]["gemm_ms_per_step"] / 1e3 for m in measured}
    flops_per_s, gemm_min = _solve_gemm(terms["full"], terms["LoRA"], gemm["full"], gemm["LoRA"])
    kernel_count = {m: measured[m]["kernels_per_step"] for m in measured}
    others = {m: kernel_count[m] - sum(w for _, w in terms[m]) for m in measured}
    rest = {m: measured[m]["kernel_ms_per_step"] / 1e3 - gemm[m] for m in measured}
    work = {m: step[m].activation_work + e * forward[m].activation_work for m in measured}
    kernel_min = (rest["LoRA"] - rest["full"]) / (others["LoRA"] - others["full"])
    elementwise = (rest["full"] - others["full"] * kernel_min) / work["full"]
    # the training step's own kernels: the profile's, less its share of eval forwards (their operators)
    own = {m: kernel_count[m] - e * forward[m].operators for m in measured}
    full_eager = eager["lora_lab full"]["ms_per_step"] / 1e3
    launch = (eager["lora_lab LoRA"]["ms_per_step"] / 1e3 - full_eager) / (own["LoRA"] - own["full"])
    model = StepTimeModel(
        launch_s=launch,
        host_fixed_s=full_eager - launch * own["full"],
        gemm_flops_per_s=flops_per_s,
        gemm_min_s=gemm_min,
        kernel_min_s=kernel_min,
        elementwise_s=elementwise,
        source=f"fitted to {results['machine']['device']}, torch {results['machine']['torch']}, "
        f"{results['machine']['date']}",
    )
    floor_gemm = _gemm_sum(terms["floor"], flops_per_s, gemm_min)
    floor_kernel = floor_gemm + others["floor"] * kernel_min + work["floor"] * elementwise
    checks = {
        "floor kernel ms: predicted": round(1e3 * floor_kernel, 3),
        "floor kernel ms: measured": measured["floor"]["kernel_ms_per_step"],
        "floor GEMM ms: predicted": round(1e3 * floor_gemm, 3),
        "floor GEMM ms: measured": measured["floor"]["gemm_ms_per_step"],
        "CPU-counted operators per step (full, LoRA, floor)": [step[m].operators for m in measured],
        "GPU kernels per step, evaluations taken out (full, LoRA, floor)": [round(own[m]) for m in measured],
    }
    return model, checks


def h100_model(path: str | Path = H100_RESULTS) -> tuple[StepTimeModel, dict]:
    """The model fitted to the project's H100 run (benchmarks/gpu_results_h100.json in a source checkout)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"No GPU results at {path}: pass the JSON that benchmarks/bench_gpu.py wrote "
            "(fit_step_time_model(json.load(...))) or a StepTimeModel of your own."
        )
    return fit_step_time_model(json.loads(path.read_text()))


# ----------------------------------------------------------------------------------------------
# The sweep


CROSSOVER_COLUMNS = [
    "width", "n_layer", "params_M", "flop_ratio", "full_ops", "lora_ops", "full_eager_ms", "lora_eager_ms",
    "eager_ratio", "full_graphed_ms", "lora_graphed_ms", "graphed_ratio", "forward_ratio", "bound",
]  # fmt: skip


def crossover_table(
    widths=WIDTHS,
    batch_size: int = BATCH_SIZE,
    block_size: int = BLOCK_SIZE,
    lora: LoRAConfig = LORA_QKVO,
    model: StepTimeModel | None = None,
    fast_path: bool = True,
    dropout: float = DROPOUT,
) -> list[dict]:
    """One row per width (sweep_config): the counts of full training and LoRA, the model's step times and the
    LoRA / full ratios, eager and CUDA-graphed, and the unmerged LoRA eval forward / the base's (eager).
    `model` defaults to the H100 fit (h100_model). Rows are plain dicts: format_table, CSV, plot_crossover."""
    model = model or h100_model()[0]
    rows = []
    for width in widths:
        config = sweep_config(width, block_size, dropout=dropout)
        full, ours = (count_step(config, batch_size, m, lora, fast_path) for m in ("full", "LoRA"))
        base_fwd, lora_fwd = (count_step(config, batch_size, m, lora, fast_path, False) for m in ("full", "LoRA"))
        rows.append(
            {
                "width": width,
                "n_layer": config.n_layer,
                "n_head": config.n_head,
                "params_M": full.parameters / 1e6,
                "full_GFLOP": full.flops / 1e9,
                "lora_GFLOP": ours.flops / 1e9,
                "flop_ratio": ours.flops / full.flops,
                "matmul_flop_ratio": ours.matmul_flops / full.matmul_flops,
                "full_ops": full.operators,
                "lora_ops": ours.operators,
                "full_eager_ms": 1e3 * model.eager_s(full),
                "lora_eager_ms": 1e3 * model.eager_s(ours),
                "eager_ratio": model.eager_s(ours) / model.eager_s(full),
                "full_graphed_ms": 1e3 * model.graphed_s(full),
                "lora_graphed_ms": 1e3 * model.graphed_s(ours),
                "graphed_ratio": model.graphed_s(ours) / model.graphed_s(full),
                "forward_ratio": model.eager_s(lora_fwd) / model.eager_s(base_fwd),
                "bound": "host" if model.host_s(full) > model.device_s(full) else "device",
            }
        )
    return rows


def crossover_width(rows: list[dict], ratio: str = "eager_ratio", at: float = 1.0) -> float | None:
    """The width at which `ratio` first falls to `at` or below (1.0: LoRA as fast as full; 0.8: the issue's
    goal), interpolated linearly in log width between the sweep widths around it; None if it never does."""
    if rows and rows[0][ratio] <= at:
        return float(rows[0]["width"])
    for a, b in zip(rows, rows[1:]):
        if a[ratio] > at >= b[ratio]:
            t = (a[ratio] - at) / (a[ratio] - b[ratio])
            return math.exp(math.log(a["width"]) + t * (math.log(b["width"]) - math.log(a["width"])))
    return None


def measured_ratios(results: dict) -> dict[str, dict[int, float]]:
    """{"eager": {width: LoRA / full}, "graphs": ..., "compiled": ...} from the sweep section of a
    benchmarks/bench_crossover.py results file (as json.load gives it): the measured points for plot_crossover."""
    if "sweep" not in results:
        raise ValueError("These results have no 'sweep' section: run bench_crossover.py with --sections ...,sweep.")
    out: dict[str, dict[int, float]] = {}
    for width, row in results["sweep"].items():
        if not width.isdigit():  # the section's summary entries ("measured crossover width, eager")
            continue
        for key, ratio in row.items():
            if key.startswith("LoRA / full, "):
                out.setdefault(key.removeprefix("LoRA / full, "), {})[int(width)] = ratio
    return out


def plot_crossover(rows: list[dict], measured: dict | None = None, path=None, title: str | None = None):
    """LoRA / full step time against width: the model eager and CUDA-graphed (and the FLOP ratio, the limit
    where matmuls are all), with `measured` ({label: {width: ratio}}) drawn as points. Returns the figure."""
    fig, (ax,) = new_figure(6.4, 3.8)
    widths = [r["width"] for r in rows]
    ax.plot(widths, [r["eager_ratio"] for r in rows], "o-", label="model, eager")
    ax.plot(widths, [r["graphed_ratio"] for r in rows], "s--", label="model, CUDA graphs")
    ax.plot(widths, [r["flop_ratio"] for r in rows], ":", color="gray", label="FLOP ratio")
    for label, points in (measured or {}).items():
        ws = sorted(points)
        ax.plot(ws, [points[w] for w in ws], "x", markersize=9, label=f"measured: {label}")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(widths, [str(w) for w in widths])
    ax.set_xlabel("width d (n_layer = n_head = d / 64, 16,384 tokens per step)")
    ax.set_ylabel("LoRA / full step time")
    ax.set_title(title or "Where LoRA (r=8, q/k/v/o) gets cheaper than full fine-tuning")
    ax.legend(fontsize=8)
    if path is not None:
        save_figure(fig, path)
    return fig

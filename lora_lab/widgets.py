"""Interactive widgets for the notebook course, plus the small numeric helpers they display.

Every widget is a small class:
- `.widget` is the ipywidgets container a notebook displays (or just leave the object as a cell's last
  expression: it shows the widget, and its plain-text form is a one-line summary);
- the input controls are attributes (`explorer.rank`, `counter.d`, ...): set `.value` from code exactly as
  a slider would;
- observers recompute plain Python attributes (`explorer.error`, `counter.lora_params`, ...) and then
  redraw. So the logic is tested in plain pytest by setting `.value` and reading the attributes.

Plots use matplotlib's object API (`Figure`, not pyplot, so nothing is shown twice) and are placed in an
`ipywidgets.Output` by setting its `outputs` state. That travels as widget state, not as cell output, so a
notebook cell prints the same text whether or not a front end is attached (which is what nbval compares).
"""
from __future__ import annotations

import base64
import html
import io
import math
import time
from dataclasses import dataclass, fields, replace

import ipywidgets as W
import torch
from matplotlib.figure import Figure

from .finetune import finetune, finetune_config
from .adapters import expected_shapes
from .lora import VARIANTS, LoRAConfig, formula_value, variant_class
from .model import GPT, GPTConfig, count_parameters_formula
from .pretrained import PRESETS
from .sampling import sample_text  # re-exported: the notebooks call widgets.sample_text
from .train import TrainConfig, autocast_for, make_optimizer

# ----------------------------------------------------------------------------------------------------
# Formatting and drawing helpers


def format_count(n: float) -> str:
    """4718592 -> '4.7M'; 174_600_000_000 -> '174.6B' (decimal units, as papers quote them)."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:g}"


def format_bytes(n: float) -> str:
    """Decimal units (1 GB = 1e9 bytes), as the LoRA paper's '350GB -> 35MB' uses."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:g} B"


def storage_comparison(stored: int, full: int) -> str:
    """How `stored` numbers compare with `full`: "8.0x fewer", "1.06x more" or "as many" (never "0.9x fewer")."""
    if stored < full:  # two decimals near 1, where "1.0x fewer" would hide the difference
        return f"{full / stored:.2f}x fewer" if full < 2 * stored else f"{full / stored:.1f}x fewer"
    if stored > full:
        return f"{stored / full:.2f}x more"
    return "as many"


def show_figure(out: W.Output, fig: Figure, description: str = "figure") -> None:
    """Replace what `out` shows with `fig`, rendered to PNG (as widget state, not as a cell output)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    png = base64.b64encode(buf.getvalue()).decode("ascii")
    out.outputs = (
        {"output_type": "display_data", "data": {"image/png": png, "text/plain": f"<{description}>"}, "metadata": {}},
    )


def _slider_value(name: str, value, low: int, high: int) -> int:
    """A starting value for a slider: ipywidgets would silently clamp one outside [low, high], so refuse it."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer from {low} to {high} (the slider's range), got {value!r}.")
    return value


def _prompt_and_seed(prompt, seed) -> None:
    if not isinstance(prompt, str) or not prompt:
        raise ValueError(f"prompt must be a non-empty string, got {prompt!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}.")


class _Widget:
    """Shared display behaviour: a widget front end, a one-line plain-text summary."""

    widget: W.Widget

    def summary(self) -> str:
        raise NotImplementedError

    def __repr__(self) -> str:
        return self.summary()

    def _repr_mimebundle_(self, **kwargs):
        bundle = self.widget._repr_mimebundle_(**kwargs) or {}
        bundle["text/plain"] = self.summary()  # the widget's own repr holds model ids; this is stable
        return bundle


# ----------------------------------------------------------------------------------------------------
# Chapter 1: low-rank approximation


def synthetic_image(n: int = 96) -> torch.Tensor:
    """A deterministic grey-scale picture (n x n, values in [0, 1]): sky, sun, hills and a chequered flag.

    Smooth parts are nearly low-rank; the sun's round edge and the flag need more ranks, which makes the
    rank slider's effect easy to see.
    """
    y = torch.linspace(0, 1, n).unsqueeze(1)  # (n, 1), top to bottom
    x = torch.linspace(0, 1, n).unsqueeze(0)  # (1, n), left to right
    img = 0.35 + 0.45 * y.expand(n, n)  # sky: lighter toward the horizon
    sun = ((x - 0.7) ** 2 + (y - 0.28) ** 2).sqrt() < 0.13
    img = torch.where(sun, torch.ones_like(img), img)
    hills = y > 0.62 + 0.08 * torch.sin(2 * math.pi * 1.5 * x) + 0.04 * torch.sin(2 * math.pi * 4 * x)
    img = torch.where(hills, 0.15 + 0.1 * x.expand(n, n), img)
    flag = (x > 0.12) & (x < 0.32) & (y > 0.18) & (y < 0.34)
    squares = ((x * n // 4 + y * n // 4) % 2).bool()
    img = torch.where(flag & squares, torch.zeros_like(img), img)
    img = torch.where(flag & ~squares, torch.full_like(img, 0.9), img)
    pole = (x > 0.115) & (x < 0.13) & (y > 0.18) & (y < 0.7)
    return torch.where(pole, torch.full_like(img, 0.05), img)


def low_rank_approximation(matrix: torch.Tensor, r: int) -> torch.Tensor:
    """The best rank-r approximation of `matrix` (Eckart-Young): keep the r largest singular values."""
    if matrix.dim() != 2:
        raise ValueError(f"Expected a 2-D matrix, got shape {tuple(matrix.shape)}.")
    if not 0 <= r <= min(matrix.shape):
        raise ValueError(f"Rank r={r} must be between 0 and min(d, k) = {min(matrix.shape)}.")
    U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
    return (U[:, :r] * S[:r]) @ Vh[:r]


def eckart_young_error(singular_values: torch.Tensor, r: int) -> float:
    """The smallest possible Frobenius error of a rank-r approximation: sqrt(sum of the dropped sigma^2)."""
    return float(singular_values[r:].double().pow(2).sum().sqrt())


class LowRankExplorer(_Widget):
    """Slide the rank r; see the rank-r reconstruction of a matrix, its error and what it costs to store.

    Computed on every change: `r`, `approximation` (d x k), `error` (measured Frobenius norm of the
    difference), `predicted_error` (from the singular values alone), `relative_error`, `stored_numbers`
    (r * (d + k): the two factors) and `compression` (d * k / stored_numbers; below 1 once
    r > dk/(d+k), where the two factors store more numbers than the matrix itself).
    """

    def __init__(self, matrix: torch.Tensor, r: int = 4, name: str = "matrix", as_image: bool = True):
        if not isinstance(matrix, torch.Tensor):
            raise ValueError(f"matrix must be a 2-D torch.Tensor, got {type(matrix).__name__}.")
        if matrix.dim() != 2:
            raise ValueError(f"Expected a 2-D matrix, got shape {tuple(matrix.shape)}.")
        _slider_value("r", r, 1, min(matrix.shape))
        self.matrix = matrix.detach().double().cpu()  # float64: the error check is exact to ~1e-12
        self.name = name
        self.as_image = as_image
        self.U, self.S, self.Vh = torch.linalg.svd(self.matrix, full_matrices=False)
        d, k = self.matrix.shape
        self.rank = W.IntSlider(value=r, min=1, max=min(d, k), description="rank r", continuous_update=False)
        self.numbers = W.HTML()
        self.plot = W.Output()
        self.widget = W.VBox([self.rank, self.numbers, self.plot])
        self.rank.observe(self._update, names="value")
        self._update()

    def _update(self, change=None) -> None:
        r = self.r = self.rank.value
        d, k = self.matrix.shape
        self.approximation = (self.U[:, :r] * self.S[:r]) @ self.Vh[:r]  # (d, k)
        self.error = float(torch.linalg.matrix_norm(self.matrix - self.approximation))
        self.predicted_error = eckart_young_error(self.S, r)
        self.relative_error = self.error / float(torch.linalg.matrix_norm(self.matrix))
        self.stored_numbers = r * (d + k)
        self.compression = d * k / self.stored_numbers
        self.numbers.value = (
            f"rank {r}: error {self.error:.4f} (predicted from the singular values: {self.predicted_error:.4f}), "
            f"relative error {self.relative_error:.1%}; stores {self.stored_numbers:,} numbers instead of "
            f"{d * k:,} ({storage_comparison(self.stored_numbers, d * k)})"
        )
        self._draw()

    def _draw(self) -> None:
        fig = Figure(figsize=(9, 3.2))
        left, right = fig.subplots(1, 2)
        shown = self.approximation.float().numpy()
        if self.as_image:
            left.imshow(shown.clip(0, 1), cmap="gray", vmin=0, vmax=1)
        else:
            left.imshow(shown, cmap="RdBu_r")
        left.set_title(f"{self.name} at rank {self.r}")
        left.axis("off")
        index = list(range(1, len(self.S) + 1))
        # A rank-deficient matrix has singular values that are zero in exact arithmetic but ~1e-16 * sigma_1
        # in float64 (rounding); the floor keeps exact zeros on the log axis, so the plot bottoms out at 1e-12.
        sigma = self.S.clamp_min(self.S[0] * 1e-12).tolist()
        right.semilogy(index, sigma, ".-", color="0.6", label="dropped")
        right.semilogy(index[: self.r], sigma[: self.r], "o", color="C0", label="kept")
        right.axvline(self.r + 0.5, color="C3", linestyle="--")
        right.set_xlabel("index i")
        right.set_ylabel("singular value sigma_i")
        right.set_title("singular values")
        right.legend()
        fig.tight_layout()
        show_figure(self.plot, fig, f"{self.name} at rank {self.r}")

    def summary(self) -> str:
        d, k = self.matrix.shape
        return f"LowRankExplorer({self.name}: {d}x{k}, rank {self.r}, relative error {self.relative_error:.1%})"


# ----------------------------------------------------------------------------------------------------
# Chapter 2: parameter counts

# The Linear layers of lora_lab's GPT block that LoRA can target, with their (out, in) = (d, k) shape
# as multiples of the model width C: attention is C x C, the MLP goes C -> 4C -> C.
LINEAR_SHAPES = {
    "q_proj": (1, 1),
    "k_proj": (1, 1),
    "v_proj": (1, 1),
    "o_proj": (1, 1),
    "up_proj": (4, 1),
    "down_proj": (1, 4),
}
# The paper's names for them.
PAPER_NAMES = {"q_proj": "Wq", "k_proj": "Wk", "v_proj": "Wv", "o_proj": "Wo", "up_proj": "W_up", "down_proj": "W_down"}


def lora_params(d: int, k: int, r: int, variant: str = "lora") -> int:
    """Trainable numbers a LoRA variant adds to one d x k matrix: r(d+k) for LoRA (B is d x r, A is r x k).
    Read from the variant's own parameter formula, never re-typed here."""
    return formula_value(variant_class(variant).parameter_formula, d, k, r)


def transformer_lora_params(n_layer: int, d_model: int, r: int, targets, variant: str = "lora") -> int:
    """LoRA parameters for a GPT of this depth and width, with rank r on the named Linear layers per block."""
    unknown = set(targets) - set(LINEAR_SHAPES)
    if unknown:
        raise ValueError(f"Unknown target(s) {sorted(unknown)}; choose from {list(LINEAR_SHAPES)}.")
    per_block = sum(lora_params(a * d_model, b * d_model, r, variant)
                    for a, b in (LINEAR_SHAPES[t] for t in targets))
    return n_layer * per_block


class LoRAShapeCounter(_Widget):
    """d, k and r in; out: `full_params` (d*k), `lora_params` (r*(d+k)), `ratio` (full / lora),
    `break_even_rank` (dk/(d+k), where the two counts would be equal) and `last_saving_rank` (the largest
    whole r with r(d+k) < dk; from `last_saving_rank + 1` on LoRA stores as many numbers or more)."""

    def __init__(self, d: int = 1024, k: int = 1024, r: int = 8):
        _slider_value("d", d, 16, 16384), _slider_value("k", k, 16, 16384), _slider_value("r", r, 1, 256)
        self.d = W.IntSlider(value=d, min=16, max=16384, step=16, description="d (out)")
        self.k = W.IntSlider(value=k, min=16, max=16384, step=16, description="k (in)")
        self.r = W.IntSlider(value=r, min=1, max=256, description="rank r")
        self.numbers = W.HTML()
        self.widget = W.VBox([self.d, self.k, self.r, self.numbers])
        for control in (self.d, self.k, self.r):
            control.observe(self._update, names="value")
        self._update()

    def _update(self, change=None) -> None:
        d, k, r = self.d.value, self.k.value, self.r.value
        self.full_params = d * k
        self.lora_params = lora_params(d, k, r)
        self.ratio = self.full_params / self.lora_params
        # Past r = d*k/(d+k) the "low-rank" update has more numbers than the matrix itself.
        self.break_even_rank = d * k / (d + k)
        self.last_saving_rank = (d * k - 1) // (d + k)
        self.numbers.value = (
            f"full update: {self.full_params:,} numbers; LoRA: {self.lora_params:,} "
            f"({storage_comparison(self.lora_params, self.full_params)}). LoRA saves up to "
            f"r = {self.last_saving_rank}; from r = {self.last_saving_rank + 1} on it stores as many numbers or more."
        )

    def summary(self) -> str:
        return (
            f"LoRAShapeCounter(d={self.d.value}, k={self.k.value}, r={self.r.value}: "
            f"{self.lora_params:,} vs {self.full_params:,}, {storage_comparison(self.lora_params, self.full_params)})"
        )


# Models the counter can start from; its sliders then override n_layer and n_embd.
MODEL_SHAPES = {
    "lora_lab tiny": PRESETS["tiny"][0],
    "lora_lab small": PRESETS["small"][0],
    "GPT-2 small": GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768, bias=True,
                             positions="learned"),
    "GPT-3 175B": GPTConfig(vocab_size=50257, block_size=2048, n_layer=96, n_head=96, n_embd=12288, bias=True,
                            positions="learned"),
}


class ModelLoRACounter(_Widget):
    """A whole GPT: shape, rank and targets in; trainable parameters and checkpoint sizes out.

    Computed: `base_params` (all weights of the GPT), `lora_params`, `fraction` (lora / base: the base's
    weights are the denominator, unlike `parameter_report`'s trainable_fraction, which divides by base + LoRA),
    `full_checkpoint_bytes` and `adapter_bytes` (both at `bytes_per_param`: 2 for fp16, as the paper's
    350 GB; lora_lab itself saves fp32, 4).
    """

    def __init__(self, model: str = "GPT-3 175B", r: int = 4, targets=("q_proj", "v_proj"), bytes_per_param: int = 2):
        if model not in MODEL_SHAPES:
            raise ValueError(f"Unknown model {model!r}; choose one of {list(MODEL_SHAPES)}.")
        _slider_value("r", r, 1, 64)
        targets = (targets,) if isinstance(targets, str) else tuple(targets)
        unknown = sorted(set(targets) - set(LINEAR_SHAPES))
        if unknown:
            raise ValueError(f"Unknown target(s) {unknown}; choose from {list(LINEAR_SHAPES)}.")
        if isinstance(bytes_per_param, bool) or not isinstance(bytes_per_param, int) or bytes_per_param <= 0:
            raise ValueError(f"bytes_per_param must be a positive integer (2 for fp16), got {bytes_per_param!r}.")
        self.bytes_per_param = bytes_per_param
        self.model = W.Dropdown(options=list(MODEL_SHAPES), value=model, description="model")
        shape = MODEL_SHAPES[model]
        self.n_layer = W.IntSlider(value=shape.n_layer, min=1, max=128, description="layers")
        self.d_model = W.IntSlider(value=shape.n_embd, min=16, max=16384, step=16, description="d_model")
        self.r = W.IntSlider(value=r, min=1, max=64, description="rank r")
        self.targets = W.SelectMultiple(
            options=[(f"{PAPER_NAMES[t]} ({t})", t) for t in LINEAR_SHAPES], value=tuple(targets),
            description="targets", rows=len(LINEAR_SHAPES),
        )
        self.numbers = W.HTML()
        self.widget = W.VBox([self.model, self.n_layer, self.d_model, self.r, self.targets, self.numbers])
        self.model.observe(self._pick_model, names="value")
        for control in (self.n_layer, self.d_model, self.r, self.targets):
            control.observe(self._update, names="value")
        self._update()

    def _pick_model(self, change=None) -> None:
        shape = MODEL_SHAPES[self.model.value]
        with self.n_layer.hold_trait_notifications(), self.d_model.hold_trait_notifications():
            self.n_layer.value, self.d_model.value = shape.n_layer, shape.n_embd
        self._update()

    def _update(self, change=None) -> None:
        # n_head does not change any parameter count, so 1 head keeps every width valid.
        config = replace(MODEL_SHAPES[self.model.value], n_layer=self.n_layer.value, n_embd=self.d_model.value, n_head=1)
        self.base_params = count_parameters_formula(config)
        self.lora_params = transformer_lora_params(self.n_layer.value, self.d_model.value, self.r.value, self.targets.value)
        self.fraction = self.lora_params / self.base_params
        self.full_checkpoint_bytes = self.base_params * self.bytes_per_param
        self.adapter_bytes = self.lora_params * self.bytes_per_param
        names = ", ".join(PAPER_NAMES[t] for t in self.targets.value) or "nothing"
        self.numbers.value = (
            f"{format_count(self.base_params)} weights; LoRA r={self.r.value} on {names}: "
            f"{format_count(self.lora_params)} trainable ({self.fraction:.4%} of the base's weights). Checkpoint "
            f"{format_bytes(self.full_checkpoint_bytes)} vs adapter {format_bytes(self.adapter_bytes)} at "
            f"{self.bytes_per_param} bytes per weight{ {2: ' (fp16)', 4: ' (fp32)'}.get(self.bytes_per_param, '')}."
        )

    def summary(self) -> str:
        return (
            f"ModelLoRACounter({self.model.value}-shaped: {self.n_layer.value} layers, d_model {self.d_model.value}, "
            f"r={self.r.value}: {format_count(self.lora_params)} trainable of {format_count(self.base_params)})"
        )


# ----------------------------------------------------------------------------------------------------
# Chapter 3: the GPT


def plot_history(histories: dict[str, dict], title: str = "loss", ax=None) -> Figure | None:
    """Training loss (thin) and evaluated validation loss (dots) of TrainResult.to_dict()s, by name."""
    fig = None
    if ax is None:
        fig = Figure(figsize=(7, 3.5))
        ax = fig.subplots()
    for i, (name, h) in enumerate(histories.items()):
        color = f"C{i}"
        ax.plot(h["losses"], color=color, alpha=0.35, linewidth=0.8)
        evals = [e for e in h["evals"] if e.get("val") is not None]
        ax.plot([e["iter"] for e in evals], [e["val"] for e in evals], "o-", color=color, label=f"{name} (validation)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / char)")
    ax.set_title(title)
    ax.legend()
    return fig


class SampleExplorer(_Widget):
    """Prompt, temperature, top-k, seed and length in; `text` (the seeded sample) out."""

    def __init__(self, model: GPT, tokenizer, prompt: str = "ROMEO:\n", length: int = 200, seed: int = 0):
        _prompt_and_seed(prompt, seed), _slider_value("length", length, 10, 1000)
        self.model, self.tokenizer = model, tokenizer
        self.prompt = W.Text(value=prompt, description="prompt")
        self.temperature = W.FloatSlider(value=1.0, min=0.1, max=2.0, step=0.05, description="temperature",
                                         continuous_update=False)
        self.top_k = W.IntSlider(value=0, min=0, max=tokenizer.vocab_size, description="top-k (0=off)",
                                 continuous_update=False)
        self.seed = W.IntText(value=seed, description="seed")
        self.length = W.IntSlider(value=length, min=10, max=1000, step=10, description="length",
                                  continuous_update=False)
        self.output = W.Textarea(layout=W.Layout(width="100%", height="14em"), disabled=True)
        self.error = ""
        self.widget = W.VBox([self.prompt, self.temperature, self.top_k, self.seed, self.length, self.output])
        for control in (self.prompt, self.temperature, self.top_k, self.seed, self.length):
            control.observe(self._update, names="value")
        self._update()

    def _update(self, change=None) -> None:
        try:
            self.text = sample_text(self.model, self.tokenizer, self.prompt.value, self.length.value,
                                    self.temperature.value, self.top_k.value or None, self.seed.value)
            self.error = ""
            self.output.value = self.prompt.value + self.text
        except ValueError as err:  # e.g. a prompt character the tokenizer does not know
            self.text, self.error = "", str(err)
            self.output.value = f"[{err}]"

    def summary(self) -> str:
        return (
            f"SampleExplorer(temperature {self.temperature.value:g}, top-k {self.top_k.value or 'off'}, "
            f"seed {self.seed.value}, {len(self.text)} characters)"
        )


# ----------------------------------------------------------------------------------------------------
# Chapter 4: base vs LoRA vs full fine-tuning


class SampleComparer(_Widget):
    """Several models, one prompt and seed: `texts` maps each model's name to its seeded sample."""

    def __init__(self, models: dict[str, GPT], tokenizer, prompt: str = "ROMEO:\n", length: int = 200, seed: int = 0):
        if not isinstance(models, dict) or not models:
            raise ValueError("SampleComparer needs a dict of at least one name -> model.")
        _prompt_and_seed(prompt, seed), _slider_value("length", length, 10, 600)
        self.models, self.tokenizer = dict(models), tokenizer
        self.prompt = W.Text(value=prompt, description="prompt")
        self.seed = W.IntText(value=seed, description="seed")
        self.temperature = W.FloatSlider(value=0.8, min=0.1, max=2.0, step=0.05, description="temperature",
                                         continuous_update=False)
        self.length = W.IntSlider(value=length, min=10, max=600, step=10, description="length",
                                  continuous_update=False)
        self.table = W.HTML()
        self.error = ""
        self.widget = W.VBox([self.prompt, self.seed, self.temperature, self.length, self.table])
        for control in (self.prompt, self.seed, self.temperature, self.length):
            control.observe(self._update, names="value")
        self._update()

    def _update(self, change=None) -> None:
        try:
            self.texts = {
                name: sample_text(model, self.tokenizer, self.prompt.value, self.length.value,
                                  self.temperature.value, None, self.seed.value)
                for name, model in self.models.items()
            }
            self.error = ""
        except ValueError as err:
            self.texts, self.error = {}, str(err)
            self.table.value = f"<b>{html.escape(self.error)}</b>"
            return
        columns = "".join(
            f"<td style='vertical-align:top'><b>{html.escape(name)}</b><pre>{html.escape(self.prompt.value + text)}</pre></td>"
            for name, text in self.texts.items()
        )
        self.table.value = f"<table><tr>{columns}</tr></table>"

    def summary(self) -> str:
        return f"SampleComparer({', '.join(self.models)}; seed {self.seed.value}, temperature {self.temperature.value:g})"


# ----------------------------------------------------------------------------------------------------
# Chapter 5: training memory, counted from the tensors themselves


@dataclass(frozen=True)
class TrainingMemory:
    """Bytes one training step keeps alive, counted tensor by tensor (not a process-level measurement).

    activations: tensors autograd saved for the backward pass (parameters excluded, shared storage counted
    once); gradients: the .grad of every trainable parameter; optimizer: every tensor in the optimizer state.
    """

    frozen_weights: int
    trainable_weights: int
    activations: int
    gradients: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.frozen_weights + self.trainable_weights + self.activations + self.gradients + self.optimizer

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)} | {"total": self.total}


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def count_training_memory(model: GPT, x: torch.Tensor, y: torch.Tensor, train_config: TrainConfig | None = None) -> TrainingMemory:
    """Run one real AdamW step of `model` on (x, y) and count the bytes of what it allocated.

    The step changes the model (it trains it), so pass a copy if the model matters afterwards.
    """
    cfg = train_config or TrainConfig()
    params = list(model.parameters())  # unique: a tied weight is listed once
    param_storages = {p.untyped_storage().data_ptr() for p in params}
    saved: dict[int, int] = {}  # storage address -> bytes

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_storages:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    model.train()
    optimizer = make_optimizer(model, cfg)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, loss = model(x, y)
    loss.backward()
    optimizer.step()
    trainable = [p for p in params if p.requires_grad]
    state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    memory = TrainingMemory(
        frozen_weights=sum(_nbytes(p) for p in params if not p.requires_grad),
        trainable_weights=sum(_nbytes(p) for p in trainable),
        activations=sum(saved.values()),
        gradients=sum(_nbytes(p.grad) for p in trainable if p.grad is not None),
        optimizer=sum(_nbytes(t) for t in state),
    )
    optimizer.zero_grad(set_to_none=True)
    return memory


def cuda_peak_training_memory(model: GPT, x: torch.Tensor, y: torch.Tensor, train_config: TrainConfig | None = None,
                              steps: int = 2) -> int:
    """Peak bytes torch.cuda.max_memory_allocated reports over `steps` AdamW steps (bf16 autocast as in training).

    The model and batch must already be on the GPU; the peak includes the model's weights.
    """
    if x.device.type != "cuda":
        raise ValueError("cuda_peak_training_memory needs the model and the batch on a CUDA device.")
    cfg = train_config or TrainConfig()
    device = x.device
    model.train()
    optimizer = make_optimizer(model, cfg)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    for _ in range(steps):  # the first step allocates AdamW's state; the second runs with it in place
        with autocast_for(device, cfg.bf16):
            _, loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)


# ----------------------------------------------------------------------------------------------------
# Chapter 6: one base, many adapters


class AdapterSwitcher(_Widget):
    """Pick an adapter of an AdapterBank (or none); `text` is the seeded sample of the resulting model."""

    BASE = "(base model, no adapter)"

    def __init__(self, bank, tokenizer, prompt: str = "ROMEO:\n", length: int = 200, seed: int = 0):
        _prompt_and_seed(prompt, seed), _slider_value("length", length, 10, 600)
        self.bank, self.tokenizer = bank, tokenizer
        self.adapter = W.Dropdown(options=[self.BASE] + bank.names, value=bank.active or self.BASE,
                                  description="adapter")
        self.prompt = W.Text(value=prompt, description="prompt")
        self.seed = W.IntText(value=seed, description="seed")
        self.length = W.IntSlider(value=length, min=10, max=600, step=10, description="length",
                                  continuous_update=False)
        self.output = W.Textarea(layout=W.Layout(width="100%", height="14em"), disabled=True)
        self.error = ""
        self.widget = W.VBox([self.adapter, self.prompt, self.seed, self.length, self.output])
        self.adapter.observe(self._switch, names="value")
        for control in (self.prompt, self.seed, self.length):
            control.observe(self._update, names="value")
        self._update()

    def _switch(self, change=None) -> None:
        if self.adapter.value == self.BASE:
            self.bank.disable()
        else:
            self.bank.activate(self.adapter.value)
        self._update()

    def _update(self, change=None) -> None:
        self.active = self.bank.active
        try:
            self.text = sample_text(self.bank.model, self.tokenizer, self.prompt.value, self.length.value,
                                    seed=self.seed.value)
            self.error = ""
            self.output.value = self.prompt.value + self.text
        except ValueError as err:
            self.text, self.error = "", str(err)
            self.output.value = f"[{err}]"

    def summary(self) -> str:
        return f"AdapterSwitcher({len(self.bank.names)} adapters; active: {self.active or 'none'})"


# ----------------------------------------------------------------------------------------------------
# Chapter 7: the rank explorer dashboard

# The matrices a LoRA setting can adapt, by the paper's names.
TARGET_GROUPS = {"Wq": ("q_proj",), "Wk": ("k_proj",), "Wv": ("v_proj",), "Wo": ("o_proj",),
                 "MLP": ("up_proj", "down_proj")}
FP32_BYTES = 4


@dataclass(frozen=True)
class SettingResult:
    """One point of the dashboard: a LoRA setting (or full fine-tuning, r=None) and what it cost and reached."""

    r: int | None
    groups: tuple[str, ...]
    trainable_params: int
    adapter_bytes: int  # fp32 tensors the setting saves: A and B (the whole model for full fine-tuning)
    optimizer_bytes: int  # what training adds per trainable weight: its gradient and AdamW's two moments
    target_loss: float
    source_loss: float
    variant: str = "lora"

    @property
    def label(self) -> str:
        if self.r is None:
            return "full FT"
        return f"{'' if self.variant == 'lora' else self.variant + ' '}r={self.r} {'+'.join(self.groups)}"


class RankDashboard(_Widget):
    """Rank, target matrices and LoRA variant in; trainable parameters, adapter size, optimizer memory and quality out.

    Quality is the target-domain validation loss after a short fine-tune (finetune's estimator,
    protocol.task_scores), computed once per setting and cached, so moving a control back to a setting already
    seen is instant (`from_cache` tells which). While an uncached setting trains, a status line names it and a
    progress bar advances at each measured point of its curve. "Training memory" counts what training adds for the trainable weights:
    their fp32 gradients and AdamW's two moments (12 bytes each); the frozen weights (the same for every
    setting) and the activations are not counted.
    `evaluate(lora_config_or_None) -> {"target": loss, "source": loss}` does the fine-tuning; by default it
    is `finetune.finetune` without a progress bar: LoRA with `train_config`, full fine-tuning (the reference
    point, `include_full`) with `full_train_config`, by default the full fine-tuning defaults at the same
    number of steps, batch size and device (full fine-tuning needs a smaller learning rate than LoRA).
    """

    def __init__(self, base_model: GPT, task=None, tokenizer=None, train_config: TrainConfig | None = None,
                 ranks=(1, 2, 4, 8, 16), r: int = 4, groups=("Wq", "Wv"), alpha: float = 16.0,
                 evaluate=None, include_full: bool = True, full_train_config: TrainConfig | None = None,
                 variant: str = "lora"):
        ranks = sorted(set(ranks))
        if not ranks or any(isinstance(x, bool) or not isinstance(x, int) or x <= 0 for x in ranks):
            raise ValueError(f"ranks must be positive integers, got {ranks!r}.")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < math.inf:
            raise ValueError(f"alpha must be a positive finite number, got {alpha!r}.")
        if r not in ranks:
            raise ValueError(f"The starting rank r={r} is not one of the ranks {ranks}.")
        unknown = set(groups) - set(TARGET_GROUPS)
        if unknown:
            raise ValueError(f"Unknown target group(s) {sorted(unknown)}; choose from {list(TARGET_GROUPS)}.")
        if variant not in VARIANTS:
            raise ValueError(f"Unknown LoRA variant {variant!r}; registered: {sorted(VARIANTS)}.")
        if evaluate is None and (task is None or tokenizer is None):
            raise ValueError("RankDashboard needs a task and a tokenizer to fine-tune (or an evaluate function).")
        self.base_model, self.task, self.tokenizer = base_model, task, tokenizer
        self.train_config = train_config
        if full_train_config is None and train_config is not None:
            same = ("max_iters", "batch_size", "eval_interval", "eval_iters", "seed", "device", "bf16")
            full_train_config = finetune_config(full=True, **{k: getattr(train_config, k) for k in same})
        self.full_train_config = full_train_config
        # alpha stays fixed while r changes (the LoRA paper's and lora_lab's rule). That does NOT make one
        # learning rate fair to every rank: at one rate the learned ‖ΔW‖_F shrinks as r grows (9.1 at r=1,
        # 4.4 at r=16 on rot13; protocol.norm_by_rank, benchmarks/RESULTS_protocol.md). The dashboard shows
        # one rate per rank for speed; protocol.compare sweeps the rate per rank for a fair comparison.
        self.alpha = float(alpha)
        self._evaluate = evaluate or self._finetune
        self.results: dict[tuple, SettingResult] = {}
        self.fine_tunes = 0  # how many times evaluate ran (cache misses)
        self.from_cache = False
        self.error = ""
        self.base_params = base_model.num_parameters()
        self.rank = W.SelectionSlider(options=ranks, value=r, description="rank r", continuous_update=False)
        self.targets = W.SelectMultiple(options=list(TARGET_GROUPS), value=tuple(groups), description="targets",
                                        rows=len(TARGET_GROUPS))
        self.variant = W.Dropdown(options=list(VARIANTS), value=variant, description="variant")
        self.numbers = W.HTML()
        self.status = W.Label()  # what is training now, or where the shown numbers came from
        self.progress = W.FloatProgress(value=0.0, min=0.0, max=1.0, description="training")  # steps done / total
        self.plot = W.Output()
        self.widget = W.VBox([W.HBox([self.rank, self.targets, self.variant]), self.numbers, self.status,
                              self.progress, self.plot])
        if include_full:
            self.full = self._result(None, ())
        else:
            self.full = None
        self.rank.observe(self._update, names="value")
        self.targets.observe(self._update, names="value")
        self.variant.observe(self._update, names="value")
        self._update()

    # --- computing one setting -------------------------------------------------------------------

    def lora_config(self, r: int, groups, variant: str | None = None) -> LoRAConfig:
        targets = tuple(t for g in TARGET_GROUPS if g in groups for t in TARGET_GROUPS[g])
        return LoRAConfig(r=r, alpha=self.alpha, targets=targets, variant=variant or self.variant.value)

    def _finetune(self, lora: LoRAConfig | None) -> dict[str, float]:
        cfg = self.train_config if lora is not None else self.full_train_config
        self.progress.value = 0.0
        res = finetune(self.base_model, self.task, self.tokenizer, lora, cfg, progress=False,
                       on_point=self._show_progress)
        self.base_losses = dict(res.base_losses)
        return res.losses

    def _show_progress(self, step: int, steps: int) -> None:
        self.progress.value = step / max(steps, 1)

    def _result(self, r: int | None, groups, variant: str | None = None) -> SettingResult:
        groups = tuple(g for g in TARGET_GROUPS if g in groups)  # canonical order: the cache key
        variant = None if r is None else (variant or self.variant.value)
        key = (r, groups) if variant in (None, "lora") else (r, groups, variant)
        self.from_cache = key in self.results
        if not self.from_cache:
            config = None if r is None else self.lora_config(r, groups, variant)
            name = "full fine-tuning" if r is None else SettingResult(r, groups, 0, 0, 0, 0.0, 0.0, variant).label
            steps = getattr(self.train_config if r is not None else self.full_train_config, "max_iters", None)
            self.status.value = f"fine-tuning {name}{f' ({steps} steps)' if steps else ''}: not in the cache yet..."
            t0 = time.perf_counter()
            losses = self._evaluate(config)
            self.status.value = f"{name}: fine-tuned in {time.perf_counter() - t0:.1f} s, now cached"
            if r is None:
                trainable = self.base_params
                stored = trainable * FP32_BYTES
            else:
                cfg = self.base_model.config
                trainable = transformer_lora_params(cfg.n_layer, cfg.n_embd, r, config.targets, variant)
                # what the adapter file holds: the trainable tensors plus a variant's saved frozen ones
                with torch.device("meta"):
                    shapes = expected_shapes(GPT(cfg), config)
                stored = sum(math.prod(shape) for shape in shapes.values()) * FP32_BYTES
            self.results[key] = SettingResult(r, groups, trainable, stored, trainable * 3 * FP32_BYTES,
                                              float(losses["target"]), float(losses["source"]), variant or "lora")
            self.fine_tunes += 1
        return self.results[key]

    def compute_all(self, settings) -> None:
        """Fill the cache for (r, groups) or (r, groups, variant) settings, e.g. to draw the whole trade-off."""
        for setting in settings:
            self._result(*setting)
        self._draw()

    # --- the widget ------------------------------------------------------------------------------

    def _update(self, change=None) -> None:
        if not self.targets.value:
            self.error = "Choose at least one target matrix."
            self.numbers.value = f"<b>{self.error}</b>"
            return
        self.error = ""
        self.current = self._result(self.rank.value, self.targets.value, self.variant.value)
        c = self.current
        if self.from_cache:
            self.status.value = f"{c.label}: from the cache (no new fine-tune)"
        self.numbers.value = (
            f"<b>{c.label}</b>: {c.trainable_params:,} trainable parameters "
            f"({c.trainable_params / self.base_params:.2%} of the base); adapter {format_bytes(c.adapter_bytes)}; "
            f"training memory {format_bytes(c.optimizer_bytes)} (gradients + AdamW moments of the trainable "
            f"weights); target loss {c.target_loss:.3f}, "
            f"source loss {c.source_loss:.3f}" + (" (cached)" if self.from_cache else "")
        )
        self._draw()

    def _draw(self) -> None:
        show_figure(self.plot, self.figure(), "quality vs memory")

    def figure(self) -> Figure:
        """Target loss against training memory for every setting computed so far; the current one ringed.

        Each setting has its own marker, named in the legend beside the axes: labels written next to the points
        overlapped wherever two settings cost about the same memory."""
        fig = Figure(figsize=(9, 4), layout="constrained")
        ax = fig.subplots()
        points = sorted((res for res in self.results.values() if res.r is not None),
                        key=lambda p: (p.optimizer_bytes, p.label))
        for i, p in enumerate(points):
            ax.scatter([p.optimizer_bytes], [p.target_loss], color=f"C{i % 10}", marker="os^Dv<>P*X"[i // 10 % 10],
                       label=p.label)
        if self.full is not None:
            ax.scatter([self.full.optimizer_bytes], [self.full.target_loss], marker="s", color="k",
                       label="full fine-tuning")
        if getattr(self, "base_losses", None):
            ax.axhline(self.base_losses["target"], color="k", linestyle="--", linewidth=1, label="base model")
        current = getattr(self, "current", None)
        if current is not None and not self.error:
            ax.scatter([current.optimizer_bytes], [current.target_loss], s=250, facecolors="none",
                       edgecolors="C3", linewidths=2, label="current choice")
        ax.set_xscale("log")
        ax.set_xlabel("training memory: gradients + AdamW moments of the trainable weights\n"
                      "(bytes, log scale; frozen weights and activations not counted)")
        ax.set_ylabel("target validation loss (lower is better)")
        ax.set_title(f"quality vs training memory{f' on {self.task.name}' if self.task is not None else ''}")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)
        return fig

    def table(self) -> str:
        """Every setting computed so far, sorted by memory, as aligned text."""
        rows = sorted(self.results.values(), key=lambda p: (p.optimizer_bytes, p.label))
        lines = [f"{'setting':<22}{'trainable':>11}{'adapter':>11}{'grad+Adam':>11}{'target':>8}{'source':>8}"]
        for p in rows:
            lines.append(f"{p.label:<22}{p.trainable_params:>11,}{format_bytes(p.adapter_bytes):>11}"
                         f"{format_bytes(p.optimizer_bytes):>11}{p.target_loss:>8.3f}{p.source_loss:>8.3f}")
        return "\n".join(lines)

    def summary(self) -> str:
        current = getattr(self, "current", None)
        return f"RankDashboard({len(self.results)} settings computed; current: {current.label if current else 'none'})"

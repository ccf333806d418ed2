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
import io
import math
from dataclasses import replace

import ipywidgets as W
import torch
from matplotlib.figure import Figure

from .model import GPT, GPTConfig, count_parameters_formula

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


def show_figure(out: W.Output, fig: Figure, description: str = "figure") -> None:
    """Replace what `out` shows with `fig`, rendered to PNG (as widget state, not as a cell output)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    png = base64.b64encode(buf.getvalue()).decode("ascii")
    out.outputs = (
        {"output_type": "display_data", "data": {"image/png": png, "text/plain": f"<{description}>"}, "metadata": {}},
    )


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
    (r * (d + k): the two factors) and `compression` (d * k / stored_numbers).
    """

    def __init__(self, matrix: torch.Tensor, r: int = 4, name: str = "matrix", as_image: bool = True):
        if matrix.dim() != 2:
            raise ValueError(f"Expected a 2-D matrix, got shape {tuple(matrix.shape)}.")
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
            f"{d * k:,} ({self.compression:.1f}x fewer)"
        )
        self._draw()

    def _draw(self) -> None:
        fig = Figure(figsize=(9, 3.2))
        left, right = fig.subplots(1, 2)
        shown = self.approximation.float()
        if self.as_image:
            left.imshow(shown.clamp(0, 1), cmap="gray", vmin=0, vmax=1)
        else:
            left.imshow(shown, cmap="RdBu_r")
        left.set_title(f"{self.name} at rank {self.r}")
        left.axis("off")
        index = torch.arange(1, len(self.S) + 1)
        sigma = self.S.clamp_min(self.S[0] * 1e-12)  # exact zeros cannot go on a log axis
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


def lora_params(d: int, k: int, r: int) -> int:
    """Trainable numbers LoRA adds to one d x k matrix: B is d x r, A is r x k."""
    return r * (d + k)


def transformer_lora_params(n_layer: int, d_model: int, r: int, targets) -> int:
    """LoRA parameters for a GPT of this depth and width, with rank r on the named Linear layers per block."""
    unknown = set(targets) - set(LINEAR_SHAPES)
    if unknown:
        raise ValueError(f"Unknown target(s) {sorted(unknown)}; choose from {list(LINEAR_SHAPES)}.")
    per_block = sum(lora_params(a * d_model, b * d_model, r) for a, b in (LINEAR_SHAPES[t] for t in targets))
    return n_layer * per_block


class LoRAShapeCounter(_Widget):
    """d, k and r in; out: `full_params` (d*k), `lora_params` (r*(d+k)) and `ratio` (full / lora)."""

    def __init__(self, d: int = 1024, k: int = 1024, r: int = 8):
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
        self.numbers.value = (
            f"full update: {self.full_params:,} numbers; LoRA: {self.lora_params:,} "
            f"({self.ratio:,.1f}x fewer). LoRA stops saving anything at r = {self.break_even_rank:.0f}."
        )

    def summary(self) -> str:
        return (
            f"LoRAShapeCounter(d={self.d.value}, k={self.k.value}, r={self.r.value}: "
            f"{self.lora_params:,} vs {self.full_params:,}, {self.ratio:.1f}x fewer)"
        )


# Model shapes the counter can start from: (n_layer, d_model, vocab_size, block_size, bias).
MODEL_SHAPES = {
    "lora_lab tiny": (4, 128, 65, 64, False),
    "lora_lab small": (6, 384, 65, 256, False),
    "GPT-2 small": (12, 768, 50257, 1024, True),
    "GPT-3 175B": (96, 12288, 50257, 2048, True),
}


def model_config_for(n_layer: int, d_model: int, vocab_size: int, block_size: int, bias: bool) -> GPTConfig:
    # n_head does not change any parameter count, so 1 head keeps every width valid.
    return GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_head=1, n_embd=d_model, bias=bias)


class ModelLoRACounter(_Widget):
    """A whole GPT: shape, rank and targets in; trainable parameters and checkpoint sizes out.

    Computed: `base_params` (all weights of the GPT), `lora_params`, `fraction` (lora / base),
    `full_checkpoint_bytes` and `adapter_bytes` (both at `bytes_per_param`, 2 for fp16).
    """

    def __init__(self, model: str = "GPT-3 175B", r: int = 4, targets=("q_proj", "v_proj"), bytes_per_param: int = 2):
        self.bytes_per_param = bytes_per_param
        self.model = W.Dropdown(options=list(MODEL_SHAPES), value=model, description="model")
        n_layer, d_model, *_ = MODEL_SHAPES[model]
        self.n_layer = W.IntSlider(value=n_layer, min=1, max=128, description="layers")
        self.d_model = W.IntSlider(value=d_model, min=16, max=16384, step=16, description="d_model")
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
        n_layer, d_model, *_ = MODEL_SHAPES[self.model.value]
        with self.n_layer.hold_trait_notifications(), self.d_model.hold_trait_notifications():
            self.n_layer.value, self.d_model.value = n_layer, d_model
        self._update()

    def _update(self, change=None) -> None:
        _, _, vocab_size, block_size, bias = MODEL_SHAPES[self.model.value]
        config = model_config_for(self.n_layer.value, self.d_model.value, vocab_size, block_size, bias)
        self.base_params = count_parameters_formula(config)
        self.lora_params = transformer_lora_params(self.n_layer.value, self.d_model.value, self.r.value, self.targets.value)
        self.fraction = self.lora_params / self.base_params
        self.full_checkpoint_bytes = self.base_params * self.bytes_per_param
        self.adapter_bytes = self.lora_params * self.bytes_per_param
        names = ", ".join(PAPER_NAMES[t] for t in self.targets.value) or "nothing"
        self.numbers.value = (
            f"{format_count(self.base_params)} weights; LoRA r={self.r.value} on {names}: "
            f"{format_count(self.lora_params)} trainable ({self.fraction:.4%}). Checkpoint "
            f"{format_bytes(self.full_checkpoint_bytes)} vs adapter {format_bytes(self.adapter_bytes)}."
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


def sample_text(model: GPT, tokenizer, prompt: str = "\n", length: int = 200, temperature: float = 1.0,
                top_k: int | None = None, seed: int = 0) -> str:
    """Generate `length` characters after `prompt`; the same seed gives the same text (on one machine)."""
    if not prompt:
        raise ValueError("The prompt needs at least one character.")
    device = next(model.parameters()).device
    idx = torch.tensor([tokenizer.encode(prompt)], dtype=torch.long, device=device)  # (1, T)
    gen = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    out = model.generate(idx, length, temperature=temperature, top_k=top_k, generator=gen)
    model.train(was_training)
    return tokenizer.decode(out[0, idx.shape[1]:].cpu())


class SampleExplorer(_Widget):
    """Prompt, temperature, top-k, seed and length in; `text` (the seeded sample) out."""

    def __init__(self, model: GPT, tokenizer, prompt: str = "ROMEO:\n", length: int = 200, seed: int = 0):
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

"""Interactive widgets for the notebook course: controls, observers and plots of what `numerics` computes.

Every widget is a small class:
- `.widget` is the ipywidgets container a notebook displays (or just leave the object as a cell's last
  expression: it shows the widget, and its plain-text form is a one-line summary);
- the input controls are attributes (`explorer.rank`, `counter.d`, ...): set `.value` from code exactly as
  a slider would;
- observers recompute plain Python attributes (`explorer.error`, `counter.lora_params`, ...) and then
  redraw. So the logic is tested in plain pytest by setting `.value` and reading the attributes.

The numbers themselves (low-rank errors, parameter counts, training memory, byte formatting) live in
`lora_lab.course.numerics`, which does not need ipywidgets.

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
from dataclasses import replace

import ipywidgets as W
import torch
from matplotlib.figure import Figure

from ..experiments.finetune import finetune, finetune_config
from ..lora import VARIANTS, LoRAConfig
from ..model import GPT
from ..sampling import sample_text  # re-exported: the notebooks call widgets.sample_text
from ..train import TrainConfig
from .numerics import (
    MODEL_CONFIGS,
    PAPER_NAMES,
    TARGET_GROUPS,
    LowRank,
    SettingResult,
    block_linears,
    format_bytes,
    format_count,
    matrix_counts,
    model_counts,
    setting_costs,
    setting_memory,
    storage_comparison,
)

# ----------------------------------------------------------------------------------------------------
# Drawing and validation helpers


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


class LowRankExplorer(_Widget):
    """Slide the rank r; see the rank-r reconstruction of a matrix, its error and what it costs to store.

    Computed on every change (see `numerics.Truncation`): `r`, `approximation` (d x k), `error` (measured
    Frobenius norm of the difference), `predicted_error` (from the singular values alone), `relative_error`,
    `stored_numbers` (r * (d + k): the two factors) and `compression` (d * k / stored_numbers; below 1 once
    r > dk/(d+k), where the two factors store more numbers than the matrix itself).
    """

    def __init__(self, matrix: torch.Tensor, r: int = 4, name: str = "matrix", as_image: bool = True):
        self.low_rank = LowRank(matrix)
        _slider_value("r", r, 1, min(matrix.shape))
        self.matrix, self.S = self.low_rank.matrix, self.low_rank.S
        self.name = name
        self.as_image = as_image
        d, k = self.matrix.shape
        self.rank = W.IntSlider(value=r, min=1, max=min(d, k), description="rank r", continuous_update=False)
        self.numbers = W.HTML()
        self.plot = W.Output()
        self.widget = W.VBox([self.rank, self.numbers, self.plot])
        self.rank.observe(self._update, names="value")
        self._update()

    def _update(self, change=None) -> None:
        t = self.low_rank.at(self.rank.value)
        self.r, self.approximation, self.error = t.r, t.approximation, t.error
        self.predicted_error, self.relative_error = t.predicted_error, t.relative_error
        self.stored_numbers, self.compression = t.stored_numbers, t.compression
        full = self.matrix.shape[0] * self.matrix.shape[1]
        self.numbers.value = (
            f"rank {t.r}: error {t.error:.4f} (predicted from the singular values: {t.predicted_error:.4f}), "
            f"relative error {t.relative_error:.1%}; stores {t.stored_numbers:,} numbers instead of "
            f"{full:,} ({storage_comparison(t.stored_numbers, full)})"
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


class LoRAShapeCounter(_Widget):
    """d, k and r in; out (see `numerics.MatrixCounts`): `full_params` (d*k), `lora_params` (r*(d+k)), `ratio`
    (full / lora), `break_even_rank` (dk/(d+k), where the two counts would be equal) and `last_saving_rank` (the
    largest whole r with r(d+k) < dk; from `last_saving_rank + 1` on LoRA stores as many numbers or more)."""

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
        c = matrix_counts(self.d.value, self.k.value, self.r.value)
        self.full_params, self.lora_params, self.ratio = c.full_params, c.lora_params, c.ratio
        self.break_even_rank, self.last_saving_rank = c.break_even_rank, c.last_saving_rank
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


class ModelLoRACounter(_Widget):
    """A whole GPT: shape, rank and targets in; trainable parameters and checkpoint sizes out.

    Computed (see `numerics.ModelCounts`): `base_params` (all weights of the GPT), `lora_params`, `fraction`
    (lora / base: the base's weights are the denominator, unlike `parameter_report`'s trainable_fraction, which
    divides by base + LoRA), `full_checkpoint_bytes` and `adapter_bytes` (both at `bytes_per_param`: 2 for fp16,
    as the paper's 350 GB; lora_lab itself saves fp32, 4). The model choices are `numerics.MODEL_CONFIGS`; the
    sliders then override n_layer and n_embd.
    """

    def __init__(self, model: str = "GPT-3 175B", r: int = 4, targets=("q_proj", "v_proj"), bytes_per_param: int = 2):
        if model not in MODEL_CONFIGS:
            raise ValueError(f"Unknown model {model!r}; choose one of {list(MODEL_CONFIGS)}.")
        _slider_value("r", r, 1, 64)
        targets = (targets,) if isinstance(targets, str) else tuple(targets)
        linears = list(block_linears(MODEL_CONFIGS[model]))
        unknown = sorted(set(targets) - set(linears))
        if unknown:
            raise ValueError(f"Unknown target(s) {unknown}; choose from {linears}.")
        if isinstance(bytes_per_param, bool) or not isinstance(bytes_per_param, int) or bytes_per_param <= 0:
            raise ValueError(f"bytes_per_param must be a positive integer (2 for fp16), got {bytes_per_param!r}.")
        self.bytes_per_param = bytes_per_param
        self.model = W.Dropdown(options=list(MODEL_CONFIGS), value=model, description="model")
        shape = MODEL_CONFIGS[model]
        self.n_layer = W.IntSlider(value=shape.n_layer, min=1, max=128, description="layers")
        self.d_model = W.IntSlider(value=shape.n_embd, min=16, max=16384, step=16, description="d_model")
        self.r = W.IntSlider(value=r, min=1, max=64, description="rank r")
        self.targets = W.SelectMultiple(
            options=[(f"{PAPER_NAMES.get(t, t)} ({t})", t) for t in linears],
            value=tuple(targets),
            description="targets",
            rows=len(linears),
        )
        self.numbers = W.HTML()
        self.widget = W.VBox([self.model, self.n_layer, self.d_model, self.r, self.targets, self.numbers])
        self.model.observe(self._pick_model, names="value")
        for control in (self.n_layer, self.d_model, self.r, self.targets):
            control.observe(self._update, names="value")
        self._update()

    def _pick_model(self, change=None) -> None:
        shape = MODEL_CONFIGS[self.model.value]
        with self.n_layer.hold_trait_notifications(), self.d_model.hold_trait_notifications():
            self.n_layer.value, self.d_model.value = shape.n_layer, shape.n_embd
        self._update()

    def _update(self, change=None) -> None:
        # n_head does not change any parameter count, so 1 head keeps every width valid.
        config = replace(
            MODEL_CONFIGS[self.model.value], n_layer=self.n_layer.value, n_embd=self.d_model.value, n_head=1
        )
        c = model_counts(config, self.r.value, self.targets.value, self.bytes_per_param)
        self.base_params, self.lora_params, self.fraction = c.base_params, c.lora_params, c.fraction
        self.full_checkpoint_bytes, self.adapter_bytes = c.full_checkpoint_bytes, c.adapter_bytes
        names = ", ".join(PAPER_NAMES.get(t, t) for t in self.targets.value) or "nothing"
        self.numbers.value = (
            f"{format_count(self.base_params)} weights; LoRA r={self.r.value} on {names}: "
            f"{format_count(self.lora_params)} trainable ({self.fraction:.4%} of the base's weights). Checkpoint "
            f"{format_bytes(self.full_checkpoint_bytes)} vs adapter {format_bytes(self.adapter_bytes)} at "
            f"{self.bytes_per_param} bytes per weight{ {2: ' (fp16)', 4: ' (fp32)'}.get(self.bytes_per_param, '') }."
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
        self.temperature = W.FloatSlider(
            value=1.0, min=0.1, max=2.0, step=0.05, description="temperature", continuous_update=False
        )
        self.top_k = W.IntSlider(
            value=0, min=0, max=tokenizer.vocab_size, description="top-k (0=off)", continuous_update=False
        )
        self.seed = W.IntText(value=seed, description="seed")
        self.length = W.IntSlider(
            value=length, min=10, max=1000, step=10, description="length", continuous_update=False
        )
        self.output = W.Textarea(layout=W.Layout(width="100%", height="14em"), disabled=True)
        self.error = ""
        self.widget = W.VBox([self.prompt, self.temperature, self.top_k, self.seed, self.length, self.output])
        for control in (self.prompt, self.temperature, self.top_k, self.seed, self.length):
            control.observe(self._update, names="value")
        self._update()

    def _update(self, change=None) -> None:
        try:
            self.text = sample_text(
                self.model,
                self.tokenizer,
                self.prompt.value,
                self.length.value,
                self.temperature.value,
                self.top_k.value or None,
                self.seed.value,
            )
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
        self.temperature = W.FloatSlider(
            value=0.8, min=0.1, max=2.0, step=0.05, description="temperature", continuous_update=False
        )
        self.length = W.IntSlider(value=length, min=10, max=600, step=10, description="length", continuous_update=False)
        self.table = W.HTML()
        self.error = ""
        self.widget = W.VBox([self.prompt, self.seed, self.temperature, self.length, self.table])
        for control in (self.prompt, self.seed, self.temperature, self.length):
            control.observe(self._update, names="value")
        self._update()

    def _update(self, change=None) -> None:
        try:
            self.texts = {
                name: sample_text(
                    model,
                    self.tokenizer,
                    self.prompt.value,
                    self.length.value,
                    self.temperature.value,
                    None,
                    self.seed.value,
                )
                for name, model in self.models.items()
            }
            self.error = ""
        except ValueError as err:
            self.texts, self.error = {}, str(err)
            self.table.value = f"<b>{html.escape(self.error)}</b>"
            return
        columns = "".join(
            f"<td style='vertical-align:top'><b>{html.escape(name)}</b>"
            f"<pre>{html.escape(self.prompt.value + text)}</pre></td>"
            for name, text in self.texts.items()
        )
        self.table.value = f"<table><tr>{columns}</tr></table>"

    def summary(self) -> str:
        return (
            f"SampleComparer({', '.join(self.models)}; seed {self.seed.value}, temperature {self.temperature.value:g})"
        )


# ----------------------------------------------------------------------------------------------------
# Chapter 6: one base, many adapters


class AdapterSwitcher(_Widget):
    """Pick an adapter of an AdapterBank (or none); `text` is the seeded sample of the resulting model."""

    BASE = "(base model, no adapter)"

    def __init__(self, bank, tokenizer, prompt: str = "ROMEO:\n", length: int = 200, seed: int = 0):
        _prompt_and_seed(prompt, seed), _slider_value("length", length, 10, 600)
        self.bank, self.tokenizer = bank, tokenizer
        self.adapter = W.Dropdown(
            options=[self.BASE] + bank.names, value=bank.active or self.BASE, description="adapter"
        )
        self.prompt = W.Text(value=prompt, description="prompt")
        self.seed = W.IntText(value=seed, description="seed")
        self.length = W.IntSlider(value=length, min=10, max=600, step=10, description="length", continuous_update=False)
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
            self.text = sample_text(
                self.bank.model, self.tokenizer, self.prompt.value, self.length.value, seed=self.seed.value
            )
            self.error = ""
            self.output.value = self.prompt.value + self.text
        except ValueError as err:
            self.text, self.error = "", str(err)
            self.output.value = f"[{err}]"

    def summary(self) -> str:
        return f"AdapterSwitcher({len(self.bank.names)} adapters; active: {self.active or 'none'})"


# ----------------------------------------------------------------------------------------------------
# Chapter 7: the rank explorer dashboard


class RankDashboard(_Widget):
    """Rank, target matrices and LoRA variant in; trainable parameters, adapter size, optimizer memory and quality out.

    Quality is the target-domain validation loss after a short fine-tune (finetune's estimator,
    estimator.task_scores), computed once per setting and cached, so moving a control back to a setting already
    seen is instant (`from_cache` tells which). While an uncached setting trains, a status line names it and a
    progress bar advances at each measured point of its curve. "Step memory" is the whole memory of one training
    step of the setting, from the memory ledger (numerics.setting_memory: frozen and trainable weights, gradients,
    AdamW state and saved activations at the training batch size and the model's block size); the part that
    grows with the trainable weights alone (fp32 gradients and AdamW's two moments, 12 bytes each) is shown
    beside it as `optimizer_bytes`.
    `evaluate(lora_config_or_None) -> {"target": loss, "source": loss}` does the fine-tuning; by default it
    is `finetune.finetune` without a progress bar: LoRA with `train_config`, full fine-tuning (the reference
    point, `include_full`) with `full_train_config`, by default the full fine-tuning defaults at the same
    number of steps, batch size and device (full fine-tuning needs a smaller learning rate than LoRA).
    """

    def __init__(
        self,
        base_model: GPT,
        task=None,
        tokenizer=None,
        train_config: TrainConfig | None = None,
        ranks=(1, 2, 4, 8, 16),
        r: int = 4,
        groups=("Wq", "Wv"),
        alpha: float = 16.0,
        evaluate=None,
        include_full: bool = True,
        full_train_config: TrainConfig | None = None,
        variant: str = "lora",
    ):
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
        # learning rate fair to every rank: at one rate the learned ‖ΔW‖_F shrinks as r grows (protocol.norm_by_rank,
        # benchmarks/RESULTS_protocol.md). The dashboard shows one rate per rank for speed; protocol.compare sweeps
        # the rate per rank for a fair comparison.
        self.alpha = float(alpha)
        self._evaluate = evaluate or self._finetune
        self.results: dict[tuple, SettingResult] = {}
        self.fine_tunes = 0  # how many times evaluate ran (cache misses)
        self.from_cache = False
        self.error = ""
        self.base_params = base_model.num_parameters()
        self.rank = W.SelectionSlider(options=ranks, value=r, description="rank r", continuous_update=False)
        self.targets = W.SelectMultiple(
            options=list(TARGET_GROUPS), value=tuple(groups), description="targets", rows=len(TARGET_GROUPS)
        )
        self.variant = W.Dropdown(options=list(VARIANTS), value=variant, description="variant")
        self.numbers = W.HTML()
        self.status = W.Label()  # what is training now, or where the shown numbers came from
        self.progress = W.FloatProgress(value=0.0, min=0.0, max=1.0, description="training")  # steps done / total
        self.plot = W.Output()
        self.widget = W.VBox(
            [W.HBox([self.rank, self.targets, self.variant]), self.numbers, self.status, self.progress, self.plot]
        )
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
        res = finetune(
            self.base_model, self.task, self.tokenizer, lora, cfg, progress=False, on_point=self._show_progress
        )
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
            trainable, stored, training = setting_costs(self.base_model.config, config)
            batch_size = getattr(self.train_config, "batch_size", None) or TrainConfig().batch_size
            step = setting_memory(self.base_model, config, batch_size, self.base_model.config.block_size)
            self.results[key] = SettingResult(
                r,
                groups,
                trainable,
                stored,
                training,
                float(losses["target"]),
                float(losses["source"]),
                variant or "lora",
                step.total,
            )
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
            f"step memory {format_bytes(c.step_bytes)} (the whole training step, of which gradients + AdamW "
            f"moments {format_bytes(c.optimizer_bytes)}); target loss {c.target_loss:.3f}, "
            f"source loss {c.source_loss:.3f}" + (" (cached)" if self.from_cache else "")
        )
        self._draw()

    def _draw(self) -> None:
        show_figure(self.plot, self.figure(), "quality vs memory")

    def figure(self) -> Figure:
        """Target loss against the whole memory of a training step for every setting so far; the current one ringed.

        Each setting has its own marker, named in the legend beside the axes: labels written next to the points
        overlapped wherever two settings cost about the same memory."""
        fig = Figure(figsize=(9, 4), layout="constrained")
        ax = fig.subplots()
        points = sorted(
            (res for res in self.results.values() if res.r is not None), key=lambda p: (p.step_bytes, p.label)
        )
        for i, p in enumerate(points):
            ax.scatter(
                [p.step_bytes],
                [p.target_loss],
                color=f"C{i % 10}",
                marker="os^Dv<>P*X"[i // 10 % 10],
                label=p.label,
            )
        if self.full is not None:
            ax.scatter([self.full.step_bytes], [self.full.target_loss], marker="s", color="k", label="full fine-tuning")
        if getattr(self, "base_losses", None):
            ax.axhline(self.base_losses["target"], color="k", linestyle="--", linewidth=1, label="base model")
        current = getattr(self, "current", None)
        if current is not None and not self.error:
            ax.scatter(
                [current.step_bytes],
                [current.target_loss],
                s=250,
                facecolors="none",
                edgecolors="C3",
                linewidths=2,
                label="current choice",
            )
        ax.set_xscale("log")
        ax.set_xlabel(
            "memory of one training step: weights, gradients, AdamW state and activations\n"
            "(bytes, log scale; the memory ledger)"
        )
        ax.set_ylabel("target validation loss (lower is better)")
        ax.set_title(f"quality vs step memory{f' on {self.task.name}' if self.task is not None else ''}")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)
        return fig

    def table(self) -> str:
        """Every setting computed so far, sorted by memory, as aligned text."""
        rows = sorted(self.results.values(), key=lambda p: (p.step_bytes, p.label))
        head = f"{'setting':<22}{'trainable':>11}{'adapter':>11}{'grad+Adam':>11}{'step':>11}{'target':>8}{'source':>8}"
        lines = [head]
        for p in rows:
            lines.append(
                f"{p.label:<22}{p.trainable_params:>11,}{format_bytes(p.adapter_bytes):>11}"
                f"{format_bytes(p.optimizer_bytes):>11}{format_bytes(p.step_bytes):>11}"
                f"{p.target_loss:>8.3f}{p.source_loss:>8.3f}"
            )
        return "\n".join(lines)

    def summary(self) -> str:
        current = getattr(self, "current", None)
        return f"RankDashboard({len(self.results)} settings computed; current: {current.label if current else 'none'})"

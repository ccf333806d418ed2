"""Tables, CSV and figures of fine-tunes, comparisons and sweeps: how lora_lab shows what it measured.

The functions read the result objects by their fields (a FinetuneResult, a protocol Comparison, a studies
Sweep) and compute nothing new: every number drawn or printed is one the estimator already gave.
Figures use matplotlib's object-oriented API (no pyplot), so no GUI backend and no global figure state.
"""

from __future__ import annotations

import csv
import io
import os
import statistics
from pathlib import Path

from ..storage.files import check_output_path, claim_output_dir, write_file_atomic


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


def table_csv(rows: list[dict], columns: list[str]) -> str:
    """The rows as CSV text with a header; list cells are joined with commas."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({c: ",".join(map(str, v)) if isinstance(v, (list, tuple)) else v for c, v in r.items()})
    return buf.getvalue()


def new_figure(width: float, height: float, ncols: int = 1):
    """(figure, [axes]) of one row of `ncols` panels."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Write the figure as a PNG, atomically."""
    path = check_output_path(path, "save_figure")  # named as save_figure's before the figure is rendered
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return write_file_atomic(path, buf.getvalue())


def write_tables_and_figures(tables: dict[str, list[dict]], figures: dict, out_dir, format_tag: str) -> dict:
    """Each table as <name>.csv and each figure as <name>.png in a lora_lab output folder tagged `format_tag`
    (files.claim_output_dir: missing, empty or one this writer made before); returns the paths by file name."""
    out = claim_output_dir(out_dir, format_tag)
    written = {}
    for name, rows in tables.items():
        columns = list(dict.fromkeys(c for r in rows for c in r))
        written[f"{name}.csv"] = write_file_atomic(out / f"{name}.csv", table_csv(rows, columns))
    for name, fig in figures.items():
        written[f"{name}.png"] = save_figure(fig, out / f"{name}.png")
    return written


def verdict_word(full: bool, partly: bool) -> str:
    """A finding's verdict from its two rules: "reproduced", "partly" or "not reproduced"."""
    return "reproduced" if full else ("partly" if partly else "not reproduced")


# ----------------------------------------------------------------------------------------------
# Fine-tunes (finetune.FinetuneResult)


def loss_rows(results: list, total_params: int) -> list[dict]:
    """Rows for format_table: the base, then each fine-tune (trainable parameters, target and source loss)."""
    first = results[0]
    rows = [
        {
            "model": "base",
            "lr": None,
            "trainable": "0",
            "trainable_%": "0",
            "target_loss": first.base_losses["target"],
            "source_loss": first.base_losses["source"],
            "target_acc": first.curve[0]["target_accuracy"] if first.curve else None,
            "train_s": None,
        }
    ]
    for res in results:
        rows.append(
            {
                "model": res.label,
                "lr": f"{res.train_config.learning_rate:g}",
                "trainable": f"{res.trainable_params:,}",
                "trainable_%": f"{100.0 * res.trainable_params / total_params:.2f}",
                "target_loss": res.losses["target"],
                "source_loss": res.losses["source"],
                "target_acc": res.target_accuracy,
                "train_s": f"{res.history.seconds:.1f}",
            }
        )
    return rows


def smooth(values: list[float], window: int) -> list[float]:
    """Running mean over the last `window` values (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def loss_curves_figure(results: list, title: str | None = None):
    """Target loss (left) and source loss (right: forgetting) of each fine-tune against step, with the base
    as a dashed line. Every point is the table's estimator: step 0 is the base, the last point is the final
    loss in the table (loss_rows). The smoothed training loss is drawn faintly on the left."""
    fig, axes = new_figure(11, 4.2, ncols=2)
    task = results[0].task if results else ""
    panels = ((axes[0], "target", "target loss (the task)"), (axes[1], "source", "source loss (forgetting)"))
    for ax, key, name in panels:
        for i, res in enumerate(results):
            color = f"C{i}"
            if key == "target" and res.history.losses:
                steps = len(res.history.losses)
                ax.plot(
                    range(steps),
                    smooth(res.history.losses, max(1, steps // 30)),
                    color=color,
                    alpha=0.3,
                    lw=0.8,
                    label=f"{res.label}: training batches (smoothed)",
                )
            ax.plot(
                [p["step"] for p in res.curve],
                [p[key] for p in res.curve],
                "o-",
                color=color,
                label=f"{res.label} (lr {res.train_config.learning_rate:g})",
            )
        if results:
            ax.axhline(results[0].base_losses[key], color="k", ls="--", lw=1, label="base")
        ax.set_xlabel("fine-tuning step")
        ax.set_ylabel("cross-entropy (nats / char)")
        ax.set_title(f"{task}: {name}")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return fig


def plot_loss_curves(results: list, path: str | os.PathLike, title: str | None = None) -> Path:
    """loss_curves_figure, saved as a PNG."""
    return save_figure(loss_curves_figure(results, title), path)


# ----------------------------------------------------------------------------------------------
# Comparisons (protocol.Comparison)


def comparison_figure(comparison):
    """Target loss (left) and source loss (right, forgetting) against step: each method's seed mean with its
    min..max band, and the base as a dashed line. Points are the table's estimator, so step 0 of LoRA sits on
    the base line and the last points are the table's means."""
    fig, axes = new_figure(11, 4.2, ncols=2)
    for ax, (key, name) in zip(axes, (("target", "target loss (the task)"), ("source", "source loss (forgetting)"))):
        for i, res in enumerate(comparison.results):
            steps = [p["step"] for p in res.runs[0].curve]
            per_step = list(zip(*[[p[key] for p in r.curve] for r in res.runs]))
            ax.plot(
                steps,
                [statistics.fmean(v) for v in per_step],
                "o-",
                color=f"C{i}",
                label=f"{res.method.label} (lr {res.chosen_lr:g})",
            )
            ax.fill_between(steps, [min(v) for v in per_step], [max(v) for v in per_step], color=f"C{i}", alpha=0.2)
        ax.axhline(comparison.base[key], color="k", ls="--", lw=1, label="base")
        ax.set_xlabel("fine-tuning step")
        ax.set_ylabel("cross-entropy (nats / char)")
        ax.set_title(f"{comparison.task.name}: {name}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return fig


def plot_comparison(comparison, path: str | os.PathLike) -> Path:
    """comparison_figure saved as a PNG at `path`."""
    return save_figure(comparison_figure(comparison), path)


# ----------------------------------------------------------------------------------------------
# Rank sweeps (studies.Sweep)


def plot_sweep(sweep, path: str | os.PathLike) -> Path:
    """Losses vs rank (left) and adapter size vs rank (right), as a PNG."""
    fig, (ax_loss, ax_size) = new_figure(10, 4, ncols=2)
    ranks = [r["rank"] for r in sweep.rows]
    method = "LoRA" if sweep.variant == "lora" else sweep.variant
    for key, color in (("target", "C0"), ("source", "C1")):
        ax_loss.plot(ranks, [r[f"{key}_loss"] for r in sweep.rows], "o-", color=color, label=f"{method}: {key}")
        ax_loss.axhline(sweep.base_losses[key], color=color, ls="--", lw=1, label=f"base: {key}")
    ax_size.plot(ranks, [r["adapter_bytes"] / 1024 for r in sweep.rows], "o-", color="C2")
    ax_size.set_yscale("log", base=2)  # bytes grow ~linearly in r: a straight line on log-log axes
    for ax in (ax_loss, ax_size):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ranks, [str(r) for r in ranks])
        ax.set_xlabel(f"{method} rank r")
        ax.grid(alpha=0.3)
    ax_loss.set_ylabel("validation loss (nats / char)")
    ax_loss.set_title(f"{sweep.task}: adaptation (target) and forgetting (source)")
    ax_loss.legend(fontsize=8)
    ax_size.set_ylabel("adapter size on disk (KiB)")
    ax_size.set_title("adapter size")
    return save_figure(fig, path)

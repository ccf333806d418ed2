"""The `lora-lab` command: pretrain, sample, fine-tune, compare, merge, sweep, the guided `tour`, and `course`.

This module parses arguments and prints; the work is done by the library (finetune, studies, tour, ...).
Every subcommand explains its options with --help; an option a subcommand accepts is used, or refused where it
cannot apply (`finetune --full --rank 4`). `--variant` takes a built-in, a name an installed package publishes in
the entry-point group "lora_lab.variants", or an import path of one's own (`mypkg.lora_xs:LoRAXS`), whose options
then become flags too. Exit codes:
  0  done;
  1  the run itself failed: a fine-tune diverged (NaN/Inf; nothing is saved), or the merged model does
     not compute what base + adapter computes;
  2  bad input: a bad argument (a rank of 0, a seed beyond 64 bits, an unknown task, device or variant, a
     missing adapter folder), an --out path holding something lora_lab did not write (`.`, `~`, a folder of
     your files) or one that cannot be written (under a file, read-only), a --cache that is a file, or a file
     or dataset that cannot be read (corrupt, another base, no data, any OS error). One line on stderr, and
     nothing is trained and no file is touched before the arguments and the output paths have been checked;
  130 interrupted (Ctrl-C).
Data and cache: --data / --cache, else $LORA_LAB_DATA / $LORA_LAB_CACHE (see data.py, pretrained.py).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import shlex
import sys
from dataclasses import replace
from pathlib import Path

import torch

from . import tasks
from .course.nbgrader import build_nbgrader_course, check_nbgrader_output, teaching_table
from .course.tour import check_tour_output, max_logit_gap, run_tour
from .data import CharTokenizer, DataUnavailableError
from .devices import pick_device
from .distributed import is_main_process, say
from .experiments.defaults import (
    ALPHA,
    DEFAULT_RANK,
    DEFAULT_TARGETS,
    DEFAULT_TASK,
    EVAL_CHARS,
    FULL_LEARNING_RATES,
    LORA_LEARNING_RATES,
    STEPS,
    default_lora_config,
    finetune_config,
)
from .experiments.finetune import DivergedError, check_lora_config, finetune, method_label
from .experiments.leaderboard import (
    ALPHA_FACTORS,
    LORA_PLUS,
    MAX_EXTENSIONS,
    RATIO_GRID,
    REPORT_SEEDS,
    SELECTION_SEED,
    check_leaderboard_output,
    check_seeds,
    contestants,
    leaderboard,
    write_leaderboard,
)
from .experiments.paper_lab import check_paper_lab_output, run_paper_lab, write_paper_lab
from .experiments.parallel import default_workers
from .experiments.placement_lab import (
    FULL_PLAN,
    LabPlan,
    check_placement_lab_output,
    run_placement_lab,
    write_placement_lab,
)
from .experiments.pretrained import (
    PRESETS,
    Pretrained,
    base_provenance,
    cache_dir,
    load_adapted,
    pretrain_config,
    pretrained_base,
)
from .experiments.protocol import check_compare_output, write_comparison
from .experiments.reports import format_table, loss_rows
from .experiments.stats import MIN_SEEDS
from .experiments.studies import check_sweep_output, lora_vs_full, rank_sweep, sweep_configs
from .lora import VARIANTS, LoRAConfig, LoRAError, merge_and_unload, resolve_variant
from .model import GPT
from .nf4 import nf4_layers, quantize_base
from .sampling import sample_text
from .storage.adapters import CONFIG_FILE as ADAPTER_CONFIG
from .storage.adapters import save_adapter
from .storage.checkpoint import CONFIG_FILE, load_checkpoint, save_checkpoint
from .storage.files import CorruptFileError, bundle_exists, folder_bytes
from .storage.outputs import check_adapter_target, check_checkpoint_target, claimed_output
from .tensorboard_logs import require_tensorboard, run_log_dir

PROG = "lora-lab"
MAX_SEED = 2**63 - 1  # torch takes 64-bit seeds; training adds the process rank and 1 to it
# The numeric options' bounds: generous, but no value the parser accepts fails later (a hang allocating a billion
# sequences, a MemoryError from a million threads, an alpha that overflows float32). Each --help states its own.
MAX_STEPS = 10**6  # training steps of one run
MAX_EVAL_CHARS = 10**8  # tiny-shakespeare has about 1.1 million characters: more means all of them
MAX_CHARS = 10**6  # characters `sample` generates
MAX_TOKENS_PER_STEP = 2**18  # --batch-size x the preset's block size: 16 times the small preset's own step
MAX_ALPHA = 1e6  # LoRA alpha: past this the scale alpha / r overflows float32 on ordinary activations
TEMPERATURES = (1e-6, 1e6)  # below: greedy already (and logits / T overflow near 1e-38); above: uniform already
MAX_REPORT_SEEDS = 1_000  # --seeds: one fine-tune per seed and method
MAX_BUDGET = 2**31  # --budget: trainable numbers; far above any preset's whole model
MAX_TOP_K = 10**6  # --top-k: any k from the vocabulary's size up already means all characters
MAX_GRID_EXTENSIONS = 32  # --max-extensions: each doubles or halves a rate, 2**32 keeps it well inside float32
FLOAT32_MAX, FLOAT32_TINY = torch.finfo(torch.float32).max, torch.finfo(torch.float32).tiny
MAX_THREADS = os.cpu_count() or 1  # more torch threads than CPUs only slow it down


class UsageError(Exception):
    """A bad command line: reported in one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    # argparse prints the whole usage and calls sys.exit; the CLI wants one line and a return code.
    def error(self, message: str):
        raise UsageError(f"{self.prog}: error: {message}")


# ----------------------------------------------------------------------------------------------
# Argument types: each fails with a message that names the problem.


def _int_in(low: int, high: int | None = None):
    """An argument type: an integer from `low` to `high` (None: no upper bound); the message states the range."""
    wanted = (
        f"an integer from {low:,} to {high:,}"
        if high is not None
        else "a positive integer"
        if low == 1
        else f"an integer from {low:,} up"
    )

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}")
        return value

    return parse


_positive_int = _int_in(1)  # a rank or a step count: the layers or the preset bound it, and say so themselves


def _float_in(low: float, high: float):
    """An argument type: a number from `low` to `high` (so finite, and a float32 number when they are)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = None
        if value is None or not low <= value <= high:  # NaN fails too
            raise argparse.ArgumentTypeError(f"must be a number from {low:.3g} to {high:.3g}, got {text!r}")
        return value

    return parse


_learning_rate = _float_in(FLOAT32_TINY, FLOAT32_MAX)  # the optimizer steps in float32
_steps = _int_in(1, MAX_STEPS)
_eval_chars = _int_in(1, MAX_EVAL_CHARS)


def _option_type(default):
    """The argument type of a variant option: that of its default (an int option takes no 0.5)."""
    if isinstance(default, bool):

        def boolean(text: str) -> bool:
            if text.lower() not in ("true", "false", "1", "0"):
                raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
            return text.lower() in ("true", "1")

        return boolean
    if isinstance(default, float):  # a variant's float option: finite and a float32 number (either sign)

        def number(text: str) -> float:
            try:
                value = float(text)
            except ValueError:
                value = math.nan
            if not abs(value) <= FLOAT32_MAX:
                raise argparse.ArgumentTypeError(
                    f"must be a finite number within float32's +-{FLOAT32_MAX:.3g}, got {text!r}"
                )
            return value

        return number
    return type(default)


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer from 0 to 2**63 - 1, got {text!r}") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be an integer from 0 to 2**63 - 1, got {text!r}")
    return value


def _variant(text: str) -> str:
    """A variant's registered name, from a name, an entry point or an import path "module:Class"."""
    try:
        return resolve_variant(text).variant
    except LoRAError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _method_list(text: str) -> tuple[str, ...]:
    """Leaderboard methods: "full", or a variant by name, entry point or import path (imported and checked now)."""
    methods = tuple(part.strip() for part in text.split(",") if part.strip())
    if not methods:
        raise argparse.ArgumentTypeError(f"needs at least one method, got {text!r}")
    for spec in methods:
        if spec not in ("full", LORA_PLUS):
            try:
                resolve_variant(spec)
            except LoRAError as err:
                raise argparse.ArgumentTypeError(str(err)) from None
    return methods


def _grid(text: str) -> tuple[str, tuple[float, ...]]:
    """METHOD=R1,R2,...: one method's learning-rate grid."""
    method, sep, rates = text.partition("=")
    if not sep or not method.strip() or not rates.strip():
        raise argparse.ArgumentTypeError(f"expected METHOD=R1,R2,... (e.g. vera=0.01,0.02), got {text!r}")
    return method.strip(), tuple(_learning_rate(r.strip()) for r in rates.split(","))


def _number_list(item):
    """An argument type: comma-separated numbers, each parsed (and range-checked) by `item`."""

    def parse(text: str) -> tuple[float, ...]:
        parts = [part.strip() for part in text.split(",")]
        if not all(parts):
            raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}")
        values = tuple(item(part) for part in parts)
        if len(set(values)) != len(values):
            raise argparse.ArgumentTypeError(f"lists a value twice: {text!r}")
        return values

    return parse


def _rank_list(text: str) -> list[int]:
    return [_positive_int(part.strip()) for part in text.split(",")]


def _name_list(text: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"needs at least one module name, got {text!r}")
    return names


def _device(text: str) -> str:
    try:
        pick_device(text)  # unknown names and missing GPUs fail here, before any work
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def _out_path(text: str) -> Path:
    return Path(text).expanduser()  # "~/runs/x" works even when the shell did not expand it


def _adapter_dir(text: str) -> Path:
    path = Path(text).expanduser()
    if not bundle_exists(path):  # also while a write without renameat2 has the adapter moved aside for a moment
        raise argparse.ArgumentTypeError(f"adapter folder {text!r} does not exist")
    if not bundle_exists(path, ADAPTER_CONFIG):
        raise argparse.ArgumentTypeError(f"{text!r} is not a LoRA adapter folder (it has no {ADAPTER_CONFIG})")
    return path


def _checkpoint_dir(text: str) -> Path:
    path = Path(text).expanduser()
    if not bundle_exists(path, CONFIG_FILE):
        raise argparse.ArgumentTypeError(f"checkpoint folder {text!r} does not exist or has no {CONFIG_FILE}")
    return path


# ----------------------------------------------------------------------------------------------
# The parser

VARIANT_TO_LOAD = (
    "the --adapter's LoRA variant when it is your own: its import path (mypkg.lora_xs:LoRAXS) or entry-point "
    "name, imported before the adapter is loaded (the built-ins need nothing)"
)


def _common_options() -> argparse.ArgumentParser:
    p = _Parser(add_help=False)
    g = p.add_argument_group("base model and data")
    g.add_argument(
        "--data",
        metavar="PATH",
        help="tiny-shakespeare: a folder in the hub's parquet layout or its input.txt "
        "(default: $LORA_LAB_DATA, else the Hugging Face hub)",
    )
    g.add_argument(
        "--cache",
        metavar="DIR",
        help="folder of cached pretrained base models (default: $LORA_LAB_CACHE, else ~/.cache/lora_lab)",
    )
    g.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="tiny",
        help="size of the base GPT: tiny (meant for a CPU; pretrained once, then cached) or small (10.6M parameters, "
        "meant for a GPU) (default: tiny)",
    )
    g.add_argument(
        "--pretrain-iters",
        type=_positive_int,
        metavar="N",
        help="pretrain the base for N steps instead of the preset's: a quick, rough base for tests "
        "and demos (cached separately); at most the preset's own steps",
    )
    g.add_argument(
        "--device",
        type=_device,
        default="auto",
        help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps (default: auto)",
    )
    g.add_argument(
        "--threads",
        type=_int_in(1, MAX_THREADS),
        metavar="N",
        help="CPU threads for torch, 1 to this machine's CPU count, "
        f"{MAX_THREADS} (default: torch's choice); 1 is often fastest for the tiny preset on a busy or 2-core machine",
    )
    g.add_argument("--quiet", action="store_true", help="hide progress bars")
    return p


def _finetune_options(default_task: str = DEFAULT_TASK, sweep: bool = False) -> argparse.ArgumentParser:
    lora, full = finetune_config(), finetune_config(full=True)
    p = _Parser(add_help=False)
    g = p.add_argument_group("fine-tuning")
    g.add_argument(
        "--task",
        choices=sorted(tasks.TASKS),
        default=default_task,
        help="rot13: the pretraining text in ROT13 (a new alphabet, scored by loss and next-character "
        "accuracy); shout: the pretraining text in upper case; romeo_juliet: Romeo and Juliet's "
        f"speeches, held out of pretraining (barely new to the base) (default: {default_task})",
    )
    if not sweep:
        g.add_argument("--rank", "-r", type=_positive_int, help=f"LoRA rank r (default: {DEFAULT_RANK})")
    g.add_argument(
        "--alpha",
        type=_float_in(FLOAT32_TINY, MAX_ALPHA),
        help=f"LoRA alpha; the update is scaled by alpha / r (default: 16 for every rank; at most {MAX_ALPHA:g})",
    )
    g.add_argument(
        "--targets",
        type=_name_list,
        metavar="NAMES",
        help="comma-separated module patterns that get LoRA, e.g. q_proj,v_proj or '*.mlp.*' "
        f"(default: {','.join(DEFAULT_TARGETS)})",
    )
    g.add_argument(
        "--variant",
        type=_variant,
        metavar="VARIANT",
        help="LoRA variant: lora, rslora (alpha/sqrt(r)), dora (magnitude + direction), pissa (SVD init), "
        "vera (shared frozen pair, trained vectors), lora_fa (A frozen), a name an installed package publishes "
        "in the entry-point group lora_lab.variants, or your own as an import path, e.g. mypkg.lora_xs:LoRAXS "
        "(default: lora)",
    )
    g.add_argument(
        "--lora-plus",
        type=_float_in(FLOAT32_TINY, FLOAT32_MAX),
        nargs="?",
        const=16.0,
        metavar="RATIO",
        help="LoRA+: train B at RATIO x the learning rate of A, a float32 number (default when given: 16)",
    )
    g.add_argument(
        "--steps",
        type=_steps,
        default=lora.max_iters,
        help=f"fine-tuning steps, 1 to {MAX_STEPS:,} (default: {lora.max_iters})",
    )
    g.add_argument(
        "--lr",
        type=_learning_rate,
        help=f"peak learning rate, a float32 number (default: {lora.learning_rate:g} for LoRA, "
        f"{full.learning_rate:g} for full fine-tuning)",
    )
    g.add_argument(
        "--batch-size",
        type=_int_in(1, MAX_TOKENS_PER_STEP),
        default=lora.batch_size,
        help=f"sequences per step, at most {MAX_TOKENS_PER_STEP:,} characters in all: {MAX_TOKENS_PER_STEP:,} / the "
        f"preset's block size (default: {lora.batch_size})",
    )
    g.add_argument(
        "--seed", type=_seed, default=lora.seed, help=f"training seed, 0 to 2**63 - 1 (default: {lora.seed})"
    )
    g.add_argument(
        "--eval-chars",
        type=_eval_chars,
        default=EVAL_CHARS,
        help=f"validation characters scored exactly, for the loss curve and the table alike, 1 to {MAX_EVAL_CHARS:,} "
        f"(default: {EVAL_CHARS})",
    )
    # Each variant's own hyperparameters become options (--vera-seed, ...), read from the registry (a variant of
    # the user's own is in it once main has imported it). A name lora-lab already uses cannot be one of them.
    taken = {s for parser in (p, _common_options()) for a in parser._actions for s in a.option_strings}
    taken |= {"--full", "--qlora", "--out", "--ranks", "--no-full"}  # the subcommands' own
    added = set()
    for cls in VARIANTS.values():
        for name, default in cls.options.items():
            flag = f"--{name.replace('_', '-')}"
            if flag in taken and name not in added:
                raise UsageError(
                    f"{PROG}: error: variant {cls.variant!r} has an option {name!r}, but {flag} is lora-lab's own; "
                    "rename the option (e.g. with the variant's name in front, as vera_seed)"
                )
            if name not in added:
                added.add(name)
                g.add_argument(
                    flag,
                    dest=f"variant_{name}",
                    metavar="VALUE",
                    type=_option_type(default),
                    help=f"{cls.variant} option {name} (default: {default!r})",
                )
    return p


def _tensorboard_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tensorboard",
        type=_out_path,
        metavar="DIR",
        help="write TensorBoard logs (loss, learning rate, gradient norm, evaluations) under DIR, one folder per run "
        "(<task>/<method>/seed=<n>); view them with `tensorboard --logdir DIR`; needs the tensorboard extra: "
        "pip install 'lora-lab[tensorboard]'",
    )


def _lab_options(p: argparse.ArgumentParser, what: str, folder: str, eval_chars: int) -> None:
    """The options the paper labs share: the task, the characters scored, the output folder."""
    p.add_argument("--task", choices=sorted(tasks.TASKS), default="echo", help="the task (default: echo)")
    p.add_argument(
        "--eval-chars",
        type=_eval_chars,
        default=eval_chars,
        help=f"characters scored per text, 1 to {MAX_EVAL_CHARS:,} (default: {eval_chars})",
    )
    p.add_argument(
        "--out",
        type=_out_path,
        default=_out_path(folder),
        metavar="DIR",
        help=f"folder for the CSV tables and PNG figures: new, empty, or an earlier {what}'s (default: {folder})",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Learn LoRA on a from-scratch character-level GPT trained on tiny-shakespeare. "
        "Start with `lora-lab tour`.",
        epilog="exit codes: 0 done; 1 the run failed (a fine-tune diverged, so nothing was saved, or a merge "
        "check failed); 2 bad arguments or input (nothing was trained or written); 130 interrupted",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = _common_options()

    p = sub.add_parser(
        "pretrain",
        parents=[common],
        help="train (or load the cached) base GPT",
        description="Pretrain the base GPT on the source domain, or load it from the cache; "
        "print where it is cached and its losses.",
    )
    p.add_argument("--retrain", action="store_true", help="train again even if a cached model exists")
    _tensorboard_option(p)
    p.set_defaults(run=cmd_pretrain)

    p = sub.add_parser(
        "sample",
        parents=[common],
        help="generate text from the base, an adapter or a checkpoint",
        description="Generate text from the base GPT, from the base with a LoRA adapter, or from "
        "a saved checkpoint (e.g. a merged one).",
    )
    p.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    p.add_argument(
        "--chars",
        "-n",
        type=_int_in(1, MAX_CHARS),
        default=300,
        help=f"characters to generate, 1 to {MAX_CHARS:,} (default: 300)",
    )
    p.add_argument(
        "--temperature",
        type=_float_in(*TEMPERATURES),
        default=0.8,
        help=f"sampling temperature, {TEMPERATURES[0]:g} to {TEMPERATURES[1]:g}; lower is more conservative "
        "(default: 0.8)",
    )
    p.add_argument(
        "--top-k",
        type=_int_in(1, MAX_TOP_K),
        help="sample only among the k likeliest characters; any k from the vocabulary's size up means all, "
        f"1 to {MAX_TOP_K:,} (default: all)",
    )
    p.add_argument("--seed", type=_seed, default=0, help="sampling seed, 0 to 2**63 - 1 (default: 0)")
    source = p.add_mutually_exclusive_group()
    source.add_argument(
        "--adapter", type=_adapter_dir, metavar="DIR", help="LoRA adapter folder (from `finetune`) to apply to its base"
    )
    source.add_argument(
        "--checkpoint",
        type=_checkpoint_dir,
        metavar="DIR",
        help="full checkpoint folder (from `merge` or `finetune --full`) to sample from",
    )
    p.add_argument(
        "--allow-other-base",
        action="store_true",
        help="load the --adapter even if the base weights differ from those it was trained on "
        "(same architecture only; by default such an adapter is refused)",
    )
    p.add_argument("--allow-unverified", action="store_true", help=ALLOW_UNVERIFIED)
    p.add_argument("--variant", type=_variant, metavar="VARIANT", help=VARIANT_TO_LOAD)
    p.set_defaults(run=cmd_sample)

    p = sub.add_parser(
        "finetune",
        parents=[common, _finetune_options()],
        help="fine-tune the base on a task",
        description="Fine-tune the base GPT on a task with LoRA (or every weight with --full), "
        "print base vs fine-tuned losses and save the adapter (or checkpoint).",
    )
    p.add_argument(
        "--full",
        action="store_true",
        help="full fine-tuning: train every weight and save a full checkpoint instead of an adapter",
    )
    p.add_argument(
        "--qlora",
        action="store_true",
        help="QLoRA: quantize the base's attention and MLP linears to 4-bit NF4 (lora_lab.nf4.quantize_base), "
        "then train LoRA on top; the adapter is bound to the quantized base",
    )
    p.add_argument(
        "--out",
        type=_out_path,
        metavar="DIR",
        help="where to save the adapter / checkpoint: a new or empty folder, or one this command "
        "wrote before (default: runs/<task>-lora-r<rank> or runs/<task>-full)",
    )
    _tensorboard_option(p)
    p.set_defaults(run=cmd_finetune)

    p = sub.add_parser(
        "compare",
        parents=[common],
        help="base vs LoRA vs full fine-tuning (the protocol), or a leaderboard of any methods (--methods)",
        description="The fair comparison (lora_lab.protocol): base, LoRA (alpha = 16) and full "
        "fine-tuning, each at its chosen learning rate (or --sweep: each method's "
        "grid), 5 paired seeds, mean ± std and the paired-seed verdicts (95% t intervals, Holm). Runs are cached. "
        "With --methods (lora,dora,vera,full,mypkg.lora_xs:LoRAXS) it runs the leaderboard instead "
        "(lora_lab.experiments.leaderboard): every method at a matched --budget of trainable numbers (or an equal "
        "--rank), its learning rate chosen on the validation text by a grid that extends at its edges, 5 paired "
        "seeds reported on the test text, paired 95% intervals and Holm-adjusted verdicts; it prints which "
        "differences are real and writes leaderboard.md/.csv/.json, a quality-vs-memory plot and a "
        "reproducibility record. Runs are cached: an interrupted leaderboard continues where it stopped.",
    )
    p.add_argument(
        "--task", choices=sorted(tasks.TASKS), default=DEFAULT_TASK, help=f"the task (default: {DEFAULT_TASK})"
    )
    p.add_argument(
        "--rank",
        "-r",
        type=_positive_int,
        help=f"LoRA rank (default: {DEFAULT_RANK}); with --methods: every variant at this rank (the equal-rank view)",
    )
    p.add_argument("--sweep", action="store_true", help="sweep each method's learning-rate grid first (14 runs, not 6)")
    p.add_argument(
        "--steps", type=_steps, default=STEPS, help=f"fine-tuning steps, 1 to {MAX_STEPS:,} (default: {STEPS})"
    )
    p.add_argument(
        "--eval-chars",
        type=_eval_chars,
        default=EVAL_CHARS,
        help=f"characters scored exactly per text, for the curves and the table alike, 1 to {MAX_EVAL_CHARS:,} "
        f"(default: {EVAL_CHARS})",
    )
    g = p.add_argument_group("leaderboard (with --methods)")
    g.add_argument(
        "--methods",
        type=_method_list,
        metavar="M1,M2,...",
        help="the methods to rank, the first one the reference of every verdict: full, a built-in variant "
        f"({', '.join(sorted(VARIANTS))}), a name published in the entry-point group lora_lab.variants, or an "
        "import path such as mypkg.lora_xs:LoRAXS; lora+ is LoRA trained with LoRA+, its ratio chosen on "
        "validation (--ratio-grid)",
    )
    g.add_argument(
        "--budget",
        type=_int_in(1, MAX_BUDGET),
        metavar="N",
        help="matched budget: each variant at the largest rank whose trainable count does not exceed N, 1 to 2**31 "
        "(full fine-tuning trains every weight whatever N)",
    )
    g.add_argument(
        "--seeds",
        type=_int_in(1, MAX_REPORT_SEEDS),
        metavar="N",
        help=f"paired seeds 0..N-1 reported per method, {MIN_SEEDS} to {MAX_REPORT_SEEDS:,} "
        f"(default: {len(REPORT_SEEDS)})",
    )
    g.add_argument(
        "--selection-seed",
        type=_seed,
        metavar="S",
        help=f"the seed learning rates are chosen with, not one of the reported seeds (default: {SELECTION_SEED})",
    )
    g.add_argument(
        "--grid",
        type=_grid,
        action="append",
        metavar="METHOD=R1,R2,...",
        help="a learning-rate grid of one method, e.g. vera=0.01,0.02 (repeatable; default: "
        f"{','.join(f'{r:g}' for r in LORA_LEARNING_RATES)} for variants, "
        f"{','.join(f'{r:g}' for r in FULL_LEARNING_RATES)} for full)",
    )
    g.add_argument(
        "--alpha-grid",
        type=_number_list(_float_in(FLOAT32_TINY, MAX_ALPHA)),
        metavar="A1,A2,...",
        help="the alphas LoRA's alpha is chosen from (with each one's learning rate) on validation, each up to "
        f"{MAX_ALPHA:g}; {ALPHA:g} and {ALPHA:g}*sqrt(r) (rsLoRA's scale) are always added. LoRA's alpha is tuned "
        f"whenever rslora or {LORA_PLUS} is among --methods, or with this option (default: "
        f"{','.join(f'{f * ALPHA:g}' for f in ALPHA_FACTORS)} plus {ALPHA:g}*sqrt(r))",
    )
    g.add_argument(
        "--ratio-grid",
        type=_number_list(_float_in(FLOAT32_TINY, FLOAT32_MAX)),
        metavar="R1,R2,...",
        help=f"the LoRA+ ratios (B's learning rate / A's) {LORA_PLUS} chooses from on validation "
        f"(default: {','.join(f'{r:g}' for r in RATIO_GRID)})",
    )
    g.add_argument(
        "--max-extensions",
        type=_int_in(0, MAX_GRID_EXTENSIONS),
        metavar="N",
        help=f"factor-2 steps a grid may grow by while its best rate is at an edge, 0 to {MAX_GRID_EXTENSIONS} "
        f"(default: {MAX_EXTENSIONS})",
    )
    g.add_argument(
        "--reference",
        choices=("first", "best"),
        help="what every verdict compares with: the first of --methods or the best (default: first)",
    )
    p.add_argument(
        "--out",
        type=_out_path,
        metavar="DIR",
        help="output folder: new, empty, or an earlier comparison's (default: runs/compare; with --methods: an "
        "earlier leaderboard's, default runs/leaderboard)",
    )
    _tensorboard_option(p)
    p.set_defaults(run=cmd_compare)

    p = sub.add_parser(
        "merge",
        parents=[common],
        help="merge an adapter into a full checkpoint",
        description="Fold a LoRA adapter into its base's weights (W + alpha/r * B A) and save a "
        "plain GPT checkpoint that needs no LoRA code to run.",
    )
    p.add_argument("--adapter", type=_adapter_dir, required=True, metavar="DIR", help="LoRA adapter folder")
    p.add_argument(
        "--out",
        type=_out_path,
        required=True,
        metavar="DIR",
        help="folder for the merged checkpoint: a new or empty folder, or an earlier checkpoint",
    )
    p.add_argument(
        "--allow-other-base",
        action="store_true",
        help="merge the adapter even if the base weights differ from those it was trained on",
    )
    p.add_argument("--allow-unverified", action="store_true", help=ALLOW_UNVERIFIED)
    p.add_argument("--variant", type=_variant, metavar="VARIANT", help=VARIANT_TO_LOAD)
    p.set_defaults(run=cmd_merge)

    p = sub.add_parser(
        "sweep",
        parents=[common, _finetune_options(sweep=True)],
        help="fine-tune once per LoRA rank; write a table and a plot",
        description="Fine-tune with each LoRA rank; write sweep.csv and sweep.png (target loss, "
        "source loss, trainable parameters, adapter bytes per rank).",
    )
    p.add_argument(
        "--ranks",
        type=_rank_list,
        default=[1, 2, 4, 8, 16],
        metavar="R1,R2,...",
        help="comma-separated ranks (default: 1,2,4,8,16)",
    )
    p.add_argument(
        "--out",
        type=_out_path,
        default=_out_path("runs/sweep"),
        metavar="DIR",
        help="folder for sweep.csv and sweep.png: new, empty, or an earlier sweep's (default: runs/sweep)",
    )
    _tensorboard_option(p)
    p.set_defaults(run=cmd_sweep)

    p = sub.add_parser(
        "tour",
        parents=[common, _finetune_options()],
        help="the whole story in a few minutes: pretrain, LoRA, merge, report",
        description="Pretrain (or load) the base GPT, fine-tune it with LoRA (and fully, to "
        "compare), merge the adapter, and report parameters, losses, file sizes and "
        "a merged == unmerged check; save the adapter, the merged checkpoint, the "
        "report and a loss-curve plot.",
    )
    p.add_argument("--no-full", action="store_true", help="skip the full fine-tuning comparison (faster)")
    p.add_argument(
        "--out",
        type=_out_path,
        default=_out_path("runs/tour"),
        metavar="DIR",
        help="output folder: new, empty, or an earlier tour's (default: runs/tour)",
    )
    p.set_defaults(run=cmd_tour)

    p = sub.add_parser(
        "paper-lab",
        parents=[common],
        help="chapter 10's analyses of the update (spectrum, subspace similarity, Table 7, intruders)",
        description="Fine-tune the base in several ways (full; LoRA at r = 1, 4, 8 and a high rank; a second seed; "
        "rsLoRA) and rerun the LoRA paper's section 7 analyses on the updates: CSV tables, PNG figures and "
        "the findings, each reproduced / partly / not reproduced with the reason.",
    )
    p.add_argument(
        "--steps", type=_steps, default=120, help=f"fine-tuning steps per run, 1 to {MAX_STEPS:,} (default: 120)"
    )
    p.add_argument(
        "--high-rank", type=_positive_int, default=64, help="the high rank compared with r = 8 (default: 64)"
    )
    _lab_options(p, "paper lab", "runs/paper_lab", eval_chars=4_096)
    p.set_defaults(run=cmd_paper_lab)

    p = sub.add_parser(
        "placement-lab",
        parents=[common],
        help="chapter 11: rank, placement at a fixed budget, learning rates, capacity, learning vs forgetting",
        description="Rerun the LoRA paper's Tables 5 and 6 and their successors' findings (MLP vs attention, depth, "
        "LoRA's learning rate vs full fine-tuning's, alpha / r vs alpha / sqrt r, capacity vs data, learning vs "
        "forgetting) with tuned rates, paired seeds and a test split: CSV tables, PNG figures and the findings, each "
        "reproduced / partly / not reproduced by its stated rule.",
    )
    p.add_argument(
        "--plan",
        choices=("quick", "full"),
        default="quick",
        help="quick: chapter 11's default subset (Wq,Wv at ranks 1-64; Table 5's Wq and all four, the MLP, depth); "
        "full: every target set and rank of the paper's tables (default: quick)",
    )
    p.add_argument("--steps", type=_steps, default=None, help="fine-tuning steps per run (default: the plan's)")
    p.add_argument(
        "--workers",
        type=_int_in(1, default_workers()),
        default=default_workers(),
        help=f"runs trained side by side, one core each (default: {default_workers()}, this machine's cores)",
    )
    _lab_options(p, "placement lab", "runs/placement_lab", eval_chars=1_024)
    p.set_defaults(run=cmd_placement_lab)

    course = sub.add_parser(
        "course",
        help="teaching tools: nbgrader assignments generated from the chapters",
        description="Teaching with lora_lab: build an nbgrader course from the chapters, or print the chapters' table.",
    )
    course_sub = course.add_subparsers(
        dest="course_command",
        required=True,
        metavar="COMMAND",
        help="nbgrader: build the course folder; table: print the chapters' table",
    )
    chapter_options = _Parser(add_help=False)
    chapter_options.add_argument(
        "--notebooks",
        type=_out_path,
        metavar="DIR",
        help="the folder with the chapter notebooks and solutions.ipynb (default: notebooks/ next to the package)",
    )
    chapter_options.add_argument(
        "--chapters",
        nargs="+",
        metavar="CHAPTER",
        help="chapters by number or name, e.g. 01 02_parameter_counts (default: every chapter with exercises)",
    )
    p = course_sub.add_parser(
        "nbgrader",
        parents=[chapter_options],
        help="build an nbgrader course folder (one assignment per chapter)",
        description="Build an nbgrader course folder from the chapters and solutions.ipynb: solution cells with "
        "the worked solutions, a graded test cell per exercise that runs lora_lab's checker, the rest locked, and "
        "nbgrader_config.py. Then: cd OUT && nbgrader generate_assignment 01_low_rank.",
    )
    p.add_argument("out", type=_out_path, metavar="OUT", help="the course folder: new, empty, or an earlier course's")
    p.set_defaults(run=cmd_course_nbgrader, threads=None)
    p = course_sub.add_parser(
        "table",
        parents=[chapter_options],
        help="print the chapters' times, prerequisites and objectives (the README's table)",
        description="Print, as a Markdown table, what each chapter says about itself: its measured time, "
        "prerequisites and objectives.",
    )
    p.set_defaults(run=cmd_course_table, threads=None)
    return parser


# ----------------------------------------------------------------------------------------------
# Shared steps


def _say(text: str = "") -> None:
    say(text)  # under torchrun, rank 0 only


def _usage(message: str) -> UsageError:
    return UsageError(f"{PROG}: error: {message}")


def _writable_folder(path: Path, option: str) -> None:
    """Refuse (exit 2, before any work) a path that cannot become a folder: under a file, or on a read-only or
    forbidden filesystem. An existing path is left to the command's own check (it refuses files of yours)."""
    probe = path if path.exists() else next((p for p in path.parents if p.exists()), Path("."))
    if not probe.is_dir():
        raise _usage(f"{option}: {path} cannot be a folder: {probe} is a file")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise _usage(f"{option}: cannot write under {probe} (a read-only filesystem or no permission)")


def _checked_out(check, path: Path) -> Path:
    """Run an output check (outputs.check_*), naming --out in the error: exit 2 before any work. A new path is
    first checked to be writable (a claim creates the folder); an existing one is the check's to refuse first."""
    existed = path.exists()
    if not existed:
        _writable_folder(path, "--out")
    try:
        out = check(path)
    except ValueError as err:
        raise _usage(f"--out: {err}") from None
    if existed:
        _writable_folder(path, "--out")
    return out


def _checked_cache(args) -> None:
    """The base-model cache folder must be a folder that can be written (a first run trains and saves there)."""
    _writable_folder(cache_dir(args.cache), "--cache")


def _claimed(path: Path, claim):
    """outputs.claimed_output, with --out checked first: exit 2 before any work."""
    return claimed_output(path, lambda p: _checked_out(claim, p))


def _checked_tensorboard(args) -> Path | None:
    """--tensorboard DIR: a folder that can be written, and the tensorboard package there (exit 2 before any work).
    A folder that holds files already is fine: event files get names of their own and nothing is removed."""
    if args.tensorboard is None:
        return None
    _writable_folder(args.tensorboard, "--tensorboard")
    try:
        require_tensorboard()
    except ImportError as err:
        raise _usage(f"--tensorboard: {err}") from None
    return args.tensorboard


def _load_base(args, retrain: bool = False, log_dir: Path | None = None) -> Pretrained:
    _checked_cache(args)
    iters = args.pretrain_iters
    train_config = pretrain_config(args.preset, iters) if iters else None
    if log_dir is not None:  # pretrain --tensorboard: the base's own training (or its recorded history)
        label = args.preset if iters is None else f"{args.preset} {iters} steps"
        config = pretrain_config(args.preset, iters)  # the preset's own when iters is None
        train_config = replace(config, log_dir=run_log_dir(log_dir, "pretrain", label, config.seed))
    return pretrained_base(
        args.preset,
        train_config=train_config,
        data_source=args.data,
        cache=args.cache,
        device=args.device,
        progress=not args.quiet,
        retrain=retrain,
    )


ALLOW_UNVERIFIED = (
    "load an adapter whose config has no checksums or no base-weights digest (from lora_lab 0.1, or edited), or a "
    "checkpoint (--checkpoint, or the adapter's recorded base) whose config has no checksum: what cannot be "
    "checked is named, and loaded anyway"
)


def _adapted_model(args, adapter: Path):
    """(model with the adapter applied, tokenizer, the adapter's base record)."""
    _checked_cache(args)
    return load_adapted(
        adapter,
        preset=args.preset,
        pretrain_iters=args.pretrain_iters,
        data_source=args.data,
        cache=args.cache,
        device=args.device,
        progress=not args.quiet,
        allow_other_base=args.allow_other_base,
        allow_unverified=args.allow_unverified,
    )


def _describe_base(base: Pretrained) -> str:
    c = base.model.config
    how = "loaded from cache" if base.from_cache else "trained and cached"
    return (
        f"base GPT: {c.n_layer} layers x {c.n_embd} dims, {base.model.num_parameters():,} parameters "
        f"({how} at {base.path})"
    )


def _variant_options(args) -> dict:
    return {k[len("variant_") :]: v for k, v in vars(args).items() if k.startswith("variant_") and v is not None}


def _lora_only_given(args) -> list[str]:
    """The LoRA options given on the command line (for --full, which trains no LoRA)."""
    names = ["rank", "alpha", "targets", "variant", "lora_plus"] + [f"variant_{k}" for k in _variant_options(args)]
    given = [n for n in names if getattr(args, n, None) is not None]
    return ["--" + n.removeprefix("variant_").replace("_", "-") for n in given]


def _train_config(args, full: bool):
    overrides = dict(max_iters=args.steps, batch_size=args.batch_size, seed=args.seed, device=args.device)
    if args.lora_plus is not None and not full:
        overrides["lora_plus_ratio"] = args.lora_plus
    if args.lr is not None:
        overrides["learning_rate"] = args.lr  # min_lr follows it: the one recipe, defaults.finetune_config
    return finetune_config(full=full, **overrides)


def _targets(args) -> tuple[str, ...]:
    return tuple(args.targets or DEFAULT_TARGETS)


def _lora_config(args, rank: int | None = None) -> LoRAConfig:
    config = replace(
        default_lora_config(rank or args.rank or DEFAULT_RANK, _targets(args), args.alpha),
        variant=args.variant or "lora",
        options=_variant_options(args),
    )  # replace() validates: an option the variant lacks, or a bad value, is refused here
    check_lora_config(config, PRESETS[args.preset][0])  # a bad target or rank fails now, not after pretraining
    return config


def _check_ranges(args) -> None:
    """The bounds that depend on the preset or on another option, checked right after parsing (exit 2, before
    any work): the characters of one step, quick-pretraining steps, B's learning rate under LoRA+, a rank."""
    preset = getattr(args, "preset", None)
    if preset is None:
        return
    model_config, train_config = PRESETS[preset]
    if getattr(args, "batch_size", None) is not None:
        most = MAX_TOKENS_PER_STEP // model_config.block_size
        if args.batch_size > most:
            raise _usage(
                f"--batch-size: at most {most:,} sequences of the {preset} preset's {model_config.block_size} "
                f"characters ({MAX_TOKENS_PER_STEP:,} characters per step), got {args.batch_size:,}"
            )
    if args.pretrain_iters is not None and args.pretrain_iters > train_config.max_iters:
        raise _usage(
            f"--pretrain-iters: a quick base of 1 to {train_config.max_iters:,} steps (the {preset} preset's own), "
            f"got {args.pretrain_iters:,}"
        )
    if getattr(args, "lora_plus", None) is not None:
        rates = [args.lr] if args.lr is not None else [finetune_config().learning_rate]
        if any(rate * args.lora_plus > FLOAT32_MAX for rate in rates):
            raise _usage(
                f"--lora-plus: {args.lora_plus:g} x the learning rate {rates[0]:g} (B's rate) is beyond float32's "
                f"{FLOAT32_MAX:.3g}"
            )
    if args.command == "compare" and args.rank is not None and args.methods is None:
        try:  # the protocol's LoRA at this rank, before the base is loaded
            check_lora_config(default_lora_config(args.rank, DEFAULT_TARGETS), model_config)
        except LoRAError as err:
            raise _usage(f"--rank: {err}") from None


def _refuse_unused(args, *names: str, why: str) -> None:
    given = [n for n in names if getattr(args, n.lstrip("-").replace("-", "_"), None) not in (None, False)]
    if given:
        raise _usage(f"{', '.join(given)} {'does' if len(given) == 1 else 'do'} not apply {why}")


# ----------------------------------------------------------------------------------------------
# Subcommands


def _say_where_logs_are(log_dir: Path | None) -> None:
    if log_dir is not None:
        _say(f"TensorBoard logs under {log_dir}: view them with  tensorboard --logdir {log_dir}")


def cmd_pretrain(args) -> int:
    log_dir = _checked_tensorboard(args)
    base = _load_base(args, retrain=args.retrain, log_dir=log_dir)
    _say(_describe_base(base))
    _say_where_logs_are(log_dir)
    final = (base.history.get("evals") or [{}])[-1]
    if final:
        _say(
            f"pretraining losses after {final['iter']} steps: train {final['train']:.4f}, validation {final['val']:.4f}"
        )
    return 0


def cmd_sample(args) -> int:
    if not args.prompt:
        raise UsageError(f"{PROG} sample: error: --prompt must not be empty")
    if args.adapter is None:
        _refuse_unused(args, "--allow-other-base", "--variant", why="without --adapter")
    if args.adapter is None and args.checkpoint is None:
        _refuse_unused(args, "--allow-unverified", why="without --adapter or --checkpoint")
    if args.checkpoint is not None:
        model, meta = load_checkpoint(args.checkpoint, allow_unverified=args.allow_unverified)
        if meta.get("vocab"):
            tokenizer = CharTokenizer(meta["vocab"])
        else:
            tokenizer = _load_base(args).dataset.tokenizer
            if tokenizer.vocab_size != model.config.vocab_size:
                raise UsageError(
                    f"{PROG} sample: error: checkpoint {args.checkpoint} does not fit this data's vocabulary"
                )
    elif args.adapter is not None:
        model, tokenizer, _ = _adapted_model(args, args.adapter)
    else:
        base = _load_base(args)
        model, tokenizer = base.model, base.dataset.tokenizer
    model.to(pick_device(args.device))
    text = sample_text(model, tokenizer, args.prompt, args.chars, args.temperature, args.top_k, args.seed)
    _say(args.prompt + text)
    return 0


def cmd_finetune(args) -> int:
    if args.full and args.qlora:
        raise _usage("--qlora and --full: QLoRA trains LoRA on a frozen 4-bit base; --full trains every weight")
    if args.full and _lora_only_given(args):
        raise _usage(f"{', '.join(_lora_only_given(args))}: LoRA option(s); --full trains every weight, no LoRA")
    log_dir = _checked_tensorboard(args)
    rank = args.rank or DEFAULT_RANK
    method = "qlora" if args.qlora else "lora"
    out = args.out or Path("runs") / (f"{args.task}-full" if args.full else f"{args.task}-{method}-r{rank}")
    _checked_out(check_checkpoint_target if args.full else check_adapter_target, out)
    lora = None if args.full else _lora_config(args)  # validates before the base is loaded
    train_config = _train_config(args, args.full)
    if log_dir is not None:  # the protocol's layout: <DIR>/<task>/<method>/seed=<n>
        where = run_log_dir(log_dir, args.task, method_label(lora), train_config.seed)
        train_config = replace(train_config, log_dir=where)
    base = _load_base(args)
    _say(_describe_base(base))
    params = base.model.num_parameters()  # counted before quantizing: NF4 weights are buffers, not parameters
    if args.qlora:
        quantize_base(base.model)
        layers = nf4_layers(base.model).values()
        numel = sum(l.in_features * l.out_features for l in layers)
        bits = sum(l.bits_per_parameter() * l.in_features * l.out_features for l in layers) / numel
        _say(f"QLoRA: {len(layers)} linear layers quantized to NF4 ({bits:.3f} bits per weight); LoRA trains on top")
    task = tasks.make_task(args.task, base.texts)
    res = finetune(
        base.model,
        task,
        base.dataset.tokenizer,
        lora,
        train_config,
        progress=not args.quiet,
        eval_chars=args.eval_chars,
    )
    _say(format_table(loss_rows([res], params)))
    _say_where_logs_are(log_dir)
    res.require_finite()  # a diverged run saves nothing and exits 1
    record = {"base": base_provenance(base, args.preset, args.pretrain_iters), "task": task.name}
    if not is_main_process():  # under torchrun every rank holds the same weights; rank 0 writes them
        return 0
    if args.full:
        save_checkpoint(res.model.cpu(), out, metadata={**record, "vocab": record["base"]["vocab"], **res.summary()})
    else:
        save_adapter(res.model, out, metadata=record)
    what = "checkpoint" if args.full else "adapter"
    _say(f"saved the {what} to {out} ({folder_bytes(out):,} bytes)")
    return 0


LEADERBOARD_ONLY = (
    "--budget", "--seeds", "--selection-seed", "--grid", "--alpha-grid", "--ratio-grid", "--max-extensions",
    "--reference",
)  # fmt: skip


def cmd_compare(args) -> int:
    if args.methods is not None:
        return cmd_leaderboard(args)
    _refuse_unused(args, *LEADERBOARD_ONLY, why="without --methods (they are the leaderboard's)")
    log_dir = _checked_tensorboard(args)
    with _claimed(args.out or Path("runs/compare"), check_compare_output) as out:
        base = _load_base(args)
        _say(_describe_base(base))
        task = tasks.make_task(args.task, base.texts)
        comp = lora_vs_full(
            base.model,
            task,
            base.dataset.tokenizer,
            r=args.rank or DEFAULT_RANK,
            sweep=args.sweep,
            steps=args.steps,
            cache=args.cache,
            device=args.device,
            log=None if args.quiet else _say,
            log_dir=log_dir,
            eval_chars=args.eval_chars,
        )
        files = write_comparison(comp, out)
    _say(comp.to_text())
    _say(f"wrote {files['md']}, {files['json']} and {files['png']}")
    _say_where_logs_are(log_dir)
    return 0


def cmd_leaderboard(args) -> int:
    """compare --methods: the leaderboard (experiments.leaderboard). Everything is checked before any work."""
    _refuse_unused(args, "--sweep", why="with --methods: the leaderboard always searches each method's grid")
    if args.budget is not None and args.rank is not None:
        raise _usage("--budget and --rank exclude each other: a matched budget, or every variant at one rank")
    if args.budget is None and args.rank is None:
        raise _usage("--methods needs --budget N (a matched budget of trainable numbers) or --rank R (equal rank)")
    seeds = tuple(range(args.seeds or len(REPORT_SEEDS)))
    selection_seed = SELECTION_SEED if args.selection_seed is None else args.selection_seed
    grids = dict(args.grid or [])
    if len(grids) != len(args.grid or []):
        raise _usage("--grid names a method twice")
    try:
        check_seeds(seeds, selection_seed)
        with torch.device("meta"):  # the preset's shapes only: methods, ranks and grids fail now, not after pretraining
            shape_only = GPT(PRESETS[args.preset][0])
        contestants(
            shape_only,
            args.methods,
            budget=args.budget,
            rank=args.rank,
            learning_rates=grids,
            alpha_grid=args.alpha_grid,
            ratio_grid=args.ratio_grid,
        )
    except ValueError as err:  # LoRAError and TooFewSeedsError are ValueErrors too
        raise _usage(str(err)) from None
    log_dir = _checked_tensorboard(args)
    with _claimed(args.out or Path("runs/leaderboard"), check_leaderboard_output) as out:
        base = _load_base(args)
        _say(_describe_base(base))
        task = tasks.make_task(args.task, base.texts)
        board = leaderboard(
            base.model,
            task,
            base.dataset.tokenizer,
            args.methods,
            budget=args.budget,
            rank=args.rank,
            seeds=seeds,
            selection_seed=selection_seed,
            learning_rates=grids,
            alpha_grid=args.alpha_grid,
            ratio_grid=args.ratio_grid,
            max_extensions=MAX_EXTENSIONS if args.max_extensions is None else args.max_extensions,
            steps=args.steps,
            eval_chars=args.eval_chars,
            reference=args.reference or "first",
            cache=args.cache,
            train_overrides={"device": args.device},
            command=shlex.join([PROG, *getattr(args, "argv", [])]),
            log=None if args.quiet else _say,
            log_dir=log_dir,
        )
        files = write_leaderboard(board, out)
    _say(board.to_text())
    _say(f"wrote {', '.join(str(f) for f in files.values())}")
    _say_where_logs_are(log_dir)
    return 0


def cmd_merge(args) -> int:
    out = _checked_out(check_checkpoint_target, args.out)
    model, tokenizer, record = _adapted_model(args, args.adapter)
    merged = merge_and_unload(copy.deepcopy(model))
    gap = max_logit_gap(model, merged)
    meta = {"base": record, "merged_from": str(args.adapter.resolve()), "vocab": "".join(tokenizer.chars)}
    save_checkpoint(merged, out, metadata=meta)
    _say(
        f"merged {args.adapter} into {out} ({folder_bytes(out):,} bytes; adapter: {folder_bytes(args.adapter):,} bytes)"
    )
    _say(f"max |logits(merged) - logits(base + adapter)| = {gap:.2e}")
    return 0


def cmd_sweep(args) -> int:
    variant, options = args.variant or "lora", _variant_options(args)
    # every config is built and checked before the base is loaded or trained
    for config in sweep_configs(args.ranks, _targets(args), args.alpha, variant, options):
        check_lora_config(config, PRESETS[args.preset][0])
    log_dir = _checked_tensorboard(args)
    with _claimed(args.out, check_sweep_output) as out:
        base = _load_base(args)
        _say(_describe_base(base))
        task = tasks.make_task(args.task, base.texts)
        sweep = rank_sweep(
            base.model,
            task,
            base.dataset.tokenizer,
            args.ranks,
            _targets(args),
            args.alpha,
            _train_config(args, full=False),
            out,
            progress=not args.quiet,
            variant=variant,
            options=options,
            eval_chars=args.eval_chars,
            log_dir=log_dir,
        )
    _say(sweep.to_text())
    _say(f"wrote {sweep.files['csv']} and {sweep.files['png']}")
    _say_where_logs_are(log_dir)
    return 0


def cmd_paper_lab(args) -> int:
    width = PRESETS[args.preset][0].n_embd  # checked before the base is loaded or trained
    if not 8 < args.high_rank <= width:
        raise _usage(f"--high-rank: must be above 8 and at most the {args.preset} preset's width {width}")
    with _claimed(args.out, check_paper_lab_output) as out:
        base = _load_base(args)
        _say(_describe_base(base))
        task = tasks.make_task(args.task, base.texts)
        lab = run_paper_lab(base.model, task, base.dataset.tokenizer, args.steps, args.high_rank, args.eval_chars,
                            str(pick_device(args.device)), progress=not args.quiet)  # fmt: skip
        written = write_paper_lab(lab.tables, lab.figures, out)
    _say(format_table(lab.findings, ["finding", "verdict", "why"]))
    _say(f"wrote {len(written)} files to {out}")
    return 0


def cmd_placement_lab(args) -> int:
    plan = {"quick": LabPlan(), "full": FULL_PLAN}[args.plan]
    plan = plan.scaled(args.steps) if args.steps else plan
    with _claimed(args.out, check_placement_lab_output) as out:
        base = _load_base(args)
        _say(_describe_base(base))
        task = tasks.make_task(args.task, base.texts)
        device = str(pick_device(args.device))
        lab = run_placement_lab(base.model, task, base.dataset.tokenizer, plan, eval_chars=args.eval_chars,
                                cache=args.cache, workers=args.workers, device=device,
                                log=None if args.quiet else _say)  # fmt: skip
        written = write_placement_lab(lab.tables, lab.figures, out)
    _say(format_table(lab.findings, ["finding", "ours", "verdict"]))
    _say(f"wrote {len(written)} files to {out}")
    return 0


def cmd_course_nbgrader(args) -> int:
    with _claimed(args.out, check_nbgrader_output) as out:
        course = build_nbgrader_course(out, args.chapters, notebooks=args.notebooks)
    names = sorted(p.name for p in (course / "source").iterdir() if p.is_dir())
    _say(f"nbgrader course in {course}: {len(names)} assignments ({', '.join(names)}); see {course / 'README.md'}")
    _say(f"next: cd {course} && nbgrader generate_assignment {names[0]}")
    return 0


def cmd_course_table(args) -> int:
    _say(teaching_table(args.chapters, args.notebooks))
    return 0


def cmd_tour(args) -> int:
    lora = _lora_config(args)
    with _claimed(args.out, check_tour_output) as out:
        _say("== 1. The base GPT: pretrained on Shakespeare minus Romeo and Juliet (cached after the first run)")
        base = _load_base(args)
        _say(_describe_base(base))
        report = run_tour(
            base,
            args.task,
            lora,
            _train_config(args, full=False),
            _train_config(args, full=True),
            out,
            compare_full=not args.no_full,
            eval_chars=args.eval_chars,
            progress=not args.quiet,
            metadata={"base": base_provenance(base, args.preset, args.pretrain_iters), "task": args.task},
            log=_say,
        )
    _say(f"\n== 5. Report (also in {out / 'report.md'} and report.json)\n")
    _say(report.to_text())
    return 0 if report.merge_ok else 1


# ----------------------------------------------------------------------------------------------


def _import_variant(argv: list[str]) -> None:
    """Import the --variant named on the command line before the parser is built, so that a variant of the
    user's own registers and its options (--my-option) exist. A bad name is left to the parser to report."""
    for i, arg in enumerate(argv):
        spec = argv[i + 1] if arg == "--variant" and i + 1 < len(argv) else arg.partition("=")[2]
        if (arg == "--variant" or arg.startswith("--variant=")) and spec:
            try:
                resolve_variant(spec)
            except LoRAError:
                pass


def _os_error(err: OSError) -> str:
    where = f": {err.filename}" if err.filename else ""
    return f"{err.strerror or err}{where}"


def main(argv: list[str] | None = None) -> int:
    """Run the lora-lab command line; return the exit code (0 ok, 1 failed run, 2 bad arguments or input)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        _import_variant(argv)
        args = build_parser().parse_args(argv)
        args.argv = argv  # the command line as given, for the records that say how a result was made
        _check_ranges(args)
        if args.threads:
            torch.set_num_threads(args.threads)
        return args.run(args)
    except SystemExit as done:  # --help, or argparse's own exit
        return done.code if isinstance(done.code, int) else 0
    except UsageError as err:
        print(err, file=sys.stderr)
        return 2
    except DivergedError as err:  # the run failed, the input was fine
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1
    except (ValueError, CorruptFileError, DataUnavailableError) as err:
        # Bad input that only shows once read: unknown characters in a prompt, a corrupt or mismatched file.
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a missing file, a full disk, a read-only folder: named in one line
        print(f"{PROG}: error: {_os_error(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

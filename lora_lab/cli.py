"""The `lora-lab` command: pretrain, sample, fine-tune, compare, merge, sweep, and the guided `tour`.

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
import os
import sys
from dataclasses import replace
from pathlib import Path

import torch

from . import tasks
from .course.tour import check_tour_output, max_logit_gap, run_tour
from .data import CharTokenizer, DataUnavailableError
from .devices import pick_device
from .distributed import is_main_process, say
from .experiments.defaults import (
    DEFAULT_RANK,
    DEFAULT_TARGETS,
    DEFAULT_TASK,
    EVAL_CHARS,
    STEPS,
    default_lora_config,
    finetune_config,
)
from .experiments.finetune import DivergedError, check_lora_config, finetune
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
from .experiments.studies import check_sweep_output, lora_vs_full, rank_sweep, sweep_configs
from .lora import VARIANTS, LoRAConfig, LoRAError, merge_and_unload, resolve_variant
from .sampling import sample_text
from .storage.adapters import CONFIG_FILE as ADAPTER_CONFIG
from .storage.adapters import save_adapter
from .storage.checkpoint import CONFIG_FILE, load_checkpoint, save_checkpoint
from .storage.files import CorruptFileError, folder_bytes
from .storage.outputs import check_adapter_target, check_checkpoint_target, claimed_output

PROG = "lora-lab"
MAX_SEED = 2**63 - 1  # torch takes 64-bit seeds; training adds the process rank and 1 to it


class UsageError(Exception):
    """A bad command line: reported in one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    # argparse prints the whole usage and calls sys.exit; the CLI wants one line and a return code.
    def error(self, message: str):
        raise UsageError(f"{self.prog}: error: {message}")


# ----------------------------------------------------------------------------------------------
# Argument types: each fails with a message that names the problem.


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def _option_type(default):
    """The argument type of a variant option: that of its default (an int option takes no 0.5)."""
    if isinstance(default, bool):

        def boolean(text: str) -> bool:
            if text.lower() not in ("true", "false", "1", "0"):
                raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
            return text.lower() in ("true", "1")

        return boolean
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
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"adapter folder {text!r} does not exist")
    if not (path / ADAPTER_CONFIG).is_file():
        raise argparse.ArgumentTypeError(f"{text!r} is not a LoRA adapter folder (it has no {ADAPTER_CONFIG})")
    return path


def _checkpoint_dir(text: str) -> Path:
    path = Path(text).expanduser()
    if not (path / CONFIG_FILE).is_file():
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
        "and demos (cached separately)",
    )
    g.add_argument(
        "--device",
        type=_device,
        default="auto",
        help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps (default: auto)",
    )
    g.add_argument(
        "--threads",
        type=_positive_int,
        metavar="N",
        help="CPU threads for torch (default: torch's choice); 1 is often fastest for the tiny "
        "preset on a busy or 2-core machine",
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
        type=_positive_float,
        help="LoRA alpha; the update is scaled by alpha / r (default: 16 for every rank)",
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
        type=_positive_float,
        nargs="?",
        const=16.0,
        metavar="RATIO",
        help="LoRA+: train B at RATIO x the learning rate of A (default when given: 16)",
    )
    g.add_argument(
        "--steps", type=_positive_int, default=lora.max_iters, help=f"fine-tuning steps (default: {lora.max_iters})"
    )
    g.add_argument(
        "--lr",
        type=_positive_float,
        help=f"peak learning rate (default: {lora.learning_rate:g} for LoRA, "
        f"{full.learning_rate:g} for full fine-tuning)",
    )
    g.add_argument(
        "--batch-size",
        type=_positive_int,
        default=lora.batch_size,
        help=f"sequences per step (default: {lora.batch_size})",
    )
    g.add_argument(
        "--seed", type=_seed, default=lora.seed, help=f"training seed, 0 to 2**63 - 1 (default: {lora.seed})"
    )
    g.add_argument(
        "--eval-chars",
        type=_positive_int,
        default=EVAL_CHARS,
        help=f"validation characters scored exactly, for the loss curve and the table alike (default: {EVAL_CHARS})",
    )
    # Each variant's own hyperparameters become options (--vera-seed, ...), read from the registry (a variant of
    # the user's own is in it once main has imported it). A name lora-lab already uses cannot be one of them.
    taken = {s for parser in (p, _common_options()) for a in parser._actions for s in a.option_strings}
    taken |= {"--full", "--out", "--ranks", "--no-full"}  # the subcommands' own
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
    p.set_defaults(run=cmd_pretrain)

    p = sub.add_parser(
        "sample",
        parents=[common],
        help="generate text from the base, an adapter or a checkpoint",
        description="Generate text from the base GPT, from the base with a LoRA adapter, or from "
        "a saved checkpoint (e.g. a merged one).",
    )
    p.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    p.add_argument("--chars", "-n", type=_positive_int, default=300, help="characters to generate (default: 300)")
    p.add_argument(
        "--temperature",
        type=_positive_float,
        default=0.8,
        help="sampling temperature; lower is more conservative (default: 0.8)",
    )
    p.add_argument("--top-k", type=_positive_int, help="sample only among the k likeliest characters (default: all)")
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
        "--out",
        type=_out_path,
        metavar="DIR",
        help="where to save the adapter / checkpoint: a new or empty folder, or one this command "
        "wrote before (default: runs/<task>-lora-r<rank> or runs/<task>-full)",
    )
    p.set_defaults(run=cmd_finetune)

    p = sub.add_parser(
        "compare",
        parents=[common],
        help="base vs LoRA vs full fine-tuning, 3 seeds (the protocol)",
        description="The fair comparison (lora_lab.protocol): base, LoRA (alpha = 16) and full "
        "fine-tuning, each at its chosen learning rate (or --sweep: each method's "
        "grid), 3 seeds, mean ± std and a noise line. Runs are cached.",
    )
    p.add_argument(
        "--task", choices=sorted(tasks.TASKS), default=DEFAULT_TASK, help=f"the task (default: {DEFAULT_TASK})"
    )
    p.add_argument(
        "--rank", "-r", type=_positive_int, default=DEFAULT_RANK, help=f"LoRA rank (default: {DEFAULT_RANK})"
    )
    p.add_argument("--sweep", action="store_true", help="sweep each method's learning-rate grid first (14 runs, not 6)")
    p.add_argument("--steps", type=_positive_int, default=STEPS, help=f"fine-tuning steps (default: {STEPS})")
    p.add_argument(
        "--out",
        type=_out_path,
        default=_out_path("runs/compare"),
        metavar="DIR",
        help="output folder: new, empty, or an earlier comparison's (default: runs/compare)",
    )
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


def _load_base(args, retrain: bool = False) -> Pretrained:
    _checked_cache(args)
    iters = args.pretrain_iters
    return pretrained_base(
        args.preset,
        train_config=pretrain_config(args.preset, iters) if iters else None,
        data_source=args.data,
        cache=args.cache,
        device=args.device,
        progress=not args.quiet,
        retrain=retrain,
    )


ALLOW_UNVERIFIED = (
    "load an adapter whose config has no checksums or no base-weights digest (from lora_lab 0.1, or edited): "
    "what cannot be checked is named, and loaded anyway"
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


def _refuse_unused(args, *names: str, why: str) -> None:
    given = [n for n in names if getattr(args, n.lstrip("-").replace("-", "_"), None) not in (None, False)]
    if given:
        raise _usage(f"{', '.join(given)} {'does' if len(given) == 1 else 'do'} not apply {why}")


# ----------------------------------------------------------------------------------------------
# Subcommands


def cmd_pretrain(args) -> int:
    base = _load_base(args, retrain=args.retrain)
    _say(_describe_base(base))
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
        _refuse_unused(args, "--allow-other-base", "--allow-unverified", "--variant", why="without --adapter")
    if args.checkpoint is not None:
        model, meta = load_checkpoint(args.checkpoint)
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
    if args.full and _lora_only_given(args):
        raise _usage(f"{', '.join(_lora_only_given(args))}: LoRA option(s); --full trains every weight, no LoRA")
    rank = args.rank or DEFAULT_RANK
    out = args.out or Path("runs") / (f"{args.task}-full" if args.full else f"{args.task}-lora-r{rank}")
    _checked_out(check_checkpoint_target if args.full else check_adapter_target, out)
    lora = None if args.full else _lora_config(args)  # validates before the base is loaded
    train_config = _train_config(args, args.full)
    base = _load_base(args)
    _say(_describe_base(base))
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
    _say(format_table(loss_rows([res], base.model.num_parameters())))
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


def cmd_compare(args) -> int:
    with _claimed(args.out, check_compare_output) as out:
        base = _load_base(args)
        _say(_describe_base(base))
        task = tasks.make_task(args.task, base.texts)
        comp = lora_vs_full(
            base.model,
            task,
            base.dataset.tokenizer,
            r=args.rank,
            sweep=args.sweep,
            steps=args.steps,
            cache=args.cache,
            device=args.device,
            log=None if args.quiet else _say,
        )
        files = write_comparison(comp, out)
    _say(comp.to_text())
    _say(f"wrote {files['md']}, {files['json']} and {files['png']}")
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
        )
    _say(sweep.to_text())
    _say(f"wrote {sweep.files['csv']} and {sweep.files['png']}")
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

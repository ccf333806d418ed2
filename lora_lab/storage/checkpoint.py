"""GPT checkpoints: a folder with model.safetensors (weights) and config.json (GPTConfig + metadata)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..lora import LoRAError, lora_layers
from ..model import GPT, GPTConfig
from .files import CHECKSUMS_KEY, CorruptFileError, check_output_path, nonfinite_names, read_bundle, write_bundle

CHECKPOINT_FORMAT = "lora_lab.gpt.v1"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
# lm_head.weight is the same tensor as tok_emb.weight; safetensors refuses shared tensors, so it is not saved.
_TIED = "lm_head.weight"


class CheckpointMismatchError(ValueError):
    """A checkpoint that does not fit the model or config it is loaded into."""


class UnverifiedCheckpointError(CheckpointMismatchError):
    """A checkpoint whose config records no checksum of its weights (from before checksums existed, or edited)."""


def save_checkpoint(
    model: GPT, path: str | os.PathLike, metadata: dict | None = None, *, replace_damaged: bool = False
) -> Path:
    """Atomically write model weights and config to the folder `path` (with a sha256 of the weights).

    Refused, with nothing written: a model that still has LoRA layers, non-finite weights, and a `path`
    holding anything but a lora_lab checkpoint (see files.write_bundle). replace_damaged: also replace a
    folder holding only checkpoint files whose config is unreadable (the model cache repairs itself so).
    """
    path = check_output_path(path, "save_checkpoint")  # an empty path is named before any work
    layers = lora_layers(model)
    if layers:
        raise LoRAError(
            f"The model still has LoRA layers ({list(layers)[:3]}...); a checkpoint holds a plain GPT. "
            "Call merge_and_unload(model) first, or save_adapter(model, path) to keep only the adapter."
        )
    state = {k: v for k, v in model.state_dict().items() if k != _TIED}
    bad = nonfinite_names(state)
    if bad:
        raise ValueError(
            f"Refusing to save a checkpoint to {path}: weights {bad[:5]} contain NaN or Inf "
            "(training diverged?). Nothing was written."
        )
    config = {"format": CHECKPOINT_FORMAT, "gpt_config": model.config.to_dict(), "metadata": metadata or {}}
    return write_bundle(
        path,
        {WEIGHTS_FILE: state, CONFIG_FILE: config},
        config_file=CONFIG_FILE,
        format_tag=CHECKPOINT_FORMAT,
        accept_damaged=replace_damaged,
    )


_TABLES_FREE = 2**24  # numbers of rebuilt tables (64 MB in float32) any config may ask for, whatever it stores


def _check_sizes(path: Path, config: GPTConfig, state: dict) -> None:
    """Refuse a config that the stored weights cannot be, before any module is built. Building even on the meta
    device takes time per layer (a config claiming a million layers would hang there), and the rotary tables
    are rebuilt from block_size, never stored: they may be no larger than the weights or _TABLES_FREE."""
    stored = {k.split(".")[1] for k in state if k.startswith("blocks.") and k.count(".") > 1}
    if config.n_layer > len(stored):  # fewer: cheap to build, and the shape comparison names every extra weight
        raise CheckpointMismatchError(
            f"Checkpoint {path} weights do not fit GPT({config}): the config has n_layer={config.n_layer}, the "
            f"weights hold {len(stored)} blocks."
        )
    if config.positions == "rope":
        tables = 2 * config.n_layer * config.block_size * (config.n_embd // config.n_head)  # cos2, sin2 per layer
        weights = sum(t.numel() for t in state.values())
        if tables > max(weights, _TABLES_FREE):
            raise CheckpointMismatchError(
                f"Checkpoint {path}: its config's block_size {config.block_size} asks for {tables:,} numbers of "
                f"rotary tables (rebuilt, never stored), more than its {weights:,} stored weights and more than "
                f"{_TABLES_FREE:,}; refused before anything is allocated."
            )


def load_checkpoint(
    path: str | os.PathLike,
    expected_config: GPTConfig | None = None,
    device: str | torch.device = "cpu",
    allow_unverified: bool = False,
) -> tuple[GPT, dict]:
    """Load a GPT (in eval mode) and its metadata, verifying the weights' checksum.

    With expected_config, refuse a checkpoint of another architecture. A checkpoint whose config records no
    checksum (written before checksums existed, or with them deleted) is *unverified*: refused unless
    allow_unverified=True (CLI: --allow-unverified), as for adapters; deleting a field never switches a check off.
    """
    if os.fspath(path) == "":  # Path("") is the working directory, which the caller never meant
        raise ValueError("load_checkpoint: the path is empty (''); name the checkpoint folder to read.")
    path = Path(path)
    saved, tensor_files = read_bundle(path, config_file=CONFIG_FILE, tensor_files=[WEIGHTS_FILE])
    if saved.get("format") != CHECKPOINT_FORMAT or "gpt_config" not in saved:
        raise CorruptFileError(f"{path / CONFIG_FILE} is not a lora_lab GPT checkpoint config.")
    if CHECKSUMS_KEY not in saved and not allow_unverified:  # read_bundle has checked any that are there
        raise UnverifiedCheckpointError(
            f"Checkpoint {path} is unverified: its {CONFIG_FILE} records no {CHECKSUMS_KEY!r} (so changes to "
            f"{WEIGHTS_FILE} go unnoticed). Checkpoints saved before lora_lab recorded checksums look like this, "
            "and so does one whose checksums were deleted. Pass allow_unverified=True (CLI: --allow-unverified) to "
            "load it without that check."
        )
    try:
        config = GPTConfig.from_dict(saved["gpt_config"])
    except (TypeError, ValueError) as err:
        raise CorruptFileError(f"{path / CONFIG_FILE} holds an invalid GPTConfig: {err}") from None
    if expected_config is not None:
        diff = {
            k: (v, getattr(config, k))
            for k, v in expected_config.to_dict().items()
            if k != "dropout" and getattr(config, k) != v
        }
        if diff:
            detail = ", ".join(f"{k}: expected {a}, checkpoint has {b}" for k, (a, b) in diff.items())
            raise CheckpointMismatchError(f"Checkpoint {path} does not match the config ({detail}).")
        config = expected_config
    state = tensor_files[WEIGHTS_FILE]
    _check_sizes(path, config, state)
    try:
        with torch.device("meta"):  # the shapes the config promises, before any memory is asked for (no RNG use)
            skeleton = GPT(config)
    except (RuntimeError, OverflowError) as err:  # sizes too large to describe even without memory
        raise CheckpointMismatchError(f"Checkpoint {path}: GPT({config}) cannot be built: {err}") from None
    expected = {k: v.shape for k, v in skeleton.state_dict().items() if k != _TIED}
    got = {k: v.shape for k, v in state.items()}
    if expected != got:
        missing = sorted(set(expected) - set(got))
        extra = sorted(set(got) - set(expected))
        wrong = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
        raise CheckpointMismatchError(
            f"Checkpoint {path} weights do not fit GPT({config}): missing {missing[:5]}, unexpected {extra[:5]}, "
            f"wrong shape {wrong[:5]}."
        )
    model = GPT(config)
    model.load_state_dict(state, strict=False)  # strict=False only because the tied head is not stored
    # eval(): sampling and evaluation must never run with dropout on; train() is the caller's choice.
    return model.to(device).eval(), saved.get("metadata", {})

"""Can an output path be written? Checked before any loading or training, and without touching anything.

The writers (save_adapter, save_checkpoint, files.claim_output_dir) refuse a path that holds something
lora_lab did not write; these checks ask the same question up front, so a command that would be refused
at the end fails in its first second instead, with the same message (files.OutputExistsError).
"""
from __future__ import annotations

import os
from pathlib import Path

from .adapters import ADAPTER_FORMAT, CONFIG_FILE as ADAPTER_CONFIG, LEGACY_FILES, WEIGHTS_FILE as ADAPTER_WEIGHTS
from .checkpoint import CHECKPOINT_FORMAT, CONFIG_FILE as CHECKPOINT_CONFIG, WEIGHTS_FILE as CHECKPOINT_WEIGHTS
from .files import check_bundle_target


def check_adapter_target(path: str | os.PathLike) -> Path:
    """Raise OutputExistsError unless save_adapter may write the folder `path` (missing, empty or an adapter)."""
    return check_bundle_target(path, config_file=ADAPTER_CONFIG, format_tag=ADAPTER_FORMAT,
                               files=[ADAPTER_WEIGHTS, ADAPTER_CONFIG], legacy_files=LEGACY_FILES)


def check_checkpoint_target(path: str | os.PathLike) -> Path:
    """Raise OutputExistsError unless save_checkpoint may write the folder `path` (missing, empty or a checkpoint)."""
    return check_bundle_target(path, config_file=CHECKPOINT_CONFIG, format_tag=CHECKPOINT_FORMAT,
                               files=[CHECKPOINT_WEIGHTS, CHECKPOINT_CONFIG])

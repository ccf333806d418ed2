"""Can an output path be written? Checked before any loading or training, and without touching anything.

The writers (save_adapter, save_checkpoint, files.claim_output_dir) refuse a path that holds something
lora_lab did not write; these checks ask the same question up front, so a command that would be refused
at the end fails in its first second instead, with the same message (files.OutputExistsError).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .adapters import ADAPTER_FORMAT, LEGACY_FILES
from .adapters import CONFIG_FILE as ADAPTER_CONFIG
from .adapters import WEIGHTS_FILE as ADAPTER_WEIGHTS
from .checkpoint import CHECKPOINT_FORMAT
from .checkpoint import CONFIG_FILE as CHECKPOINT_CONFIG
from .checkpoint import WEIGHTS_FILE as CHECKPOINT_WEIGHTS
from .files import OUTPUT_MARKER, check_bundle_target


def check_adapter_target(path: str | os.PathLike) -> Path:
    """Raise OutputExistsError unless save_adapter may write the folder `path` (missing, empty or an adapter)."""
    return check_bundle_target(
        path,
        config_file=ADAPTER_CONFIG,
        format_tag=ADAPTER_FORMAT,
        files=[ADAPTER_WEIGHTS, ADAPTER_CONFIG],
        legacy_files=LEGACY_FILES,
    )


def check_checkpoint_target(path: str | os.PathLike) -> Path:
    """Raise OutputExistsError unless save_checkpoint may write the folder `path` (missing, empty or a checkpoint)."""
    return check_bundle_target(
        path, config_file=CHECKPOINT_CONFIG, format_tag=CHECKPOINT_FORMAT, files=[CHECKPOINT_WEIGHTS, CHECKPOINT_CONFIG]
    )


@contextmanager
def claimed_output(path: str | os.PathLike, claim: Callable[[Path], Path]) -> Iterator[Path]:
    """Claim an output folder with `claim` (e.g. files.claim_output_dir with a format tag) for the block; if the
    block fails and the folder was new and still holds only the marker, take the claim back: nothing is left."""
    path = Path(path)
    new = not path.exists()
    out = claim(path)
    try:
        yield out
    except BaseException:
        if new and out.is_dir() and [p.name for p in out.iterdir()] == [OUTPUT_MARKER]:
            shutil.rmtree(out)
        raise

"""TensorBoard logs of training runs: what train() writes when TrainConfig.log_dir is set.

One run, one folder, one or more event files (torch.utils.tensorboard.SummaryWriter names each uniquely, so a
folder that already holds files, ours or not, is only ever added to). The tags:
- train/loss, train/lr, train/grad_norm at every step (0 .. max_iters - 1): the step's training loss (the mean
  over ranks under torchrun), the schedule's learning rate (A's rate under LoRA+), and the gradient norm before
  clipping (the one clip_grad_norm_ computes anyway; without clipping it is computed only while logging);
- eval/<name> at every evaluation: each number train() records in TrainResult.evals ("train", "val" for its own
  estimate; "target", "target_accuracy", "source" for the protocol's curve), under the same name.
TensorBoard keeps scalars as float32: an event holds the recorded number rounded to float32, nothing else.

Under torchrun only rank 0 writes (distributed.is_main_process). Runs of the protocol go under
run_log_dir(root, task, method, seed[, lr]), so `tensorboard --logdir root` overlays them. tensorboard is an
optional extra: require_tensorboard() names it when it is missing.
"""

from __future__ import annotations

import os
from pathlib import Path

from .distributed import is_main_process

EXTRA = "pip install 'lora-lab[tensorboard]'"
EVENT_FILE_PREFIX = "events.out.tfevents."  # how tensorboard names its event files
_UNSAFE_IN_A_FOLDER_NAME = '/\\:*?"<>|'


def require_tensorboard():
    """torch.utils.tensorboard.SummaryWriter, or an ImportError that says how to install the extra."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ImportError(
            f"TensorBoard logging needs the optional package 'tensorboard': {EXTRA} (or pip install tensorboard)."
        ) from None
    return SummaryWriter


def check_log_dir(log_dir) -> Path:
    """log_dir as a Path; a value that cannot name a folder, or a path that is a file, raises ValueError."""
    if isinstance(log_dir, bool) or not isinstance(log_dir, (str, os.PathLike)) or not os.fspath(log_dir):
        raise ValueError(f"log_dir must be a folder path (str or Path) or None, got {log_dir!r}.")
    path = Path(log_dir).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"log_dir {path} is a file; TensorBoard logs need a folder.")
    return path


def _folder_name(text: str) -> str:
    return "".join("_" if c in _UNSAFE_IN_A_FOLDER_NAME else c for c in str(text)).strip() or "_"


def run_log_dir(root, task: str, method: str, seed: int, learning_rate: float | None = None) -> Path:
    """<root>/<task>/<method>/seed=<seed>, or .../<method>/lr=<rate>/seed=<seed> when several rates are tried:
    the folder of one protocol run. A "/" in a label becomes "_" (a label is one folder, not a path)."""
    path = check_log_dir(root) / _folder_name(task) / _folder_name(method)
    if learning_rate is not None:
        path = path / f"lr={learning_rate:g}"
    return path / f"seed={seed}"


def has_events(log_dir) -> bool:
    """True if the folder holds a TensorBoard event file already."""
    path = Path(log_dir).expanduser()
    return path.is_dir() and any(p.name.startswith(EVENT_FILE_PREFIX) for p in path.iterdir())


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class RunLog:
    """The event file of one run. Opened by open_run_log (None off rank 0), closed by close()."""

    def __init__(self, log_dir):
        writer_class = require_tensorboard()
        self.path = check_log_dir(log_dir)
        self.writer = writer_class(log_dir=str(self.path))

    def steps(self, first: int, losses, learning_rates, grad_norms=None) -> None:
        """train/loss, train/lr (and train/grad_norm) of the steps first, first + 1, ..."""
        for i, (loss, lr) in enumerate(zip(losses, learning_rates)):
            self.writer.add_scalar("train/loss", loss, first + i)
            self.writer.add_scalar("train/lr", lr, first + i)
        for i, norm in enumerate(grad_norms or []):
            self.writer.add_scalar("train/grad_norm", norm, first + i)

    def evaluation(self, step: int, scores: dict) -> None:
        """eval/<name> of every number in `scores` (the step's own key "iter"/"step" and "lr" are not scores)."""
        for name, value in scores.items():
            if name not in ("iter", "step", "lr") and _number(value):
                self.writer.add_scalar(f"eval/{name}", value, step)

    def note(self, text: str) -> None:
        """A line in TensorBoard's Text tab: why something is missing from this run's charts."""
        self.writer.add_text("notes", text, 0)

    def close(self) -> None:
        self.writer.close()  # flushes


def open_run_log(log_dir) -> RunLog | None:
    """A RunLog writing into log_dir, or None: no log_dir, or not the process that writes (rank != 0)."""
    if log_dir is None or not is_main_process():
        return None
    return RunLog(log_dir)


def log_recorded_run(log_dir, learning_rates, evals: list[dict], losses=None, why: str = "") -> bool:
    """Write a run that is not trained again (a cache hit) from what was recorded of it: its learning rates per
    step, its evaluations (dicts with "iter" or "step") and, where kept, its per-step losses. Written only if the
    folder has no event file yet (the run logged itself when it trained, or an earlier call logged it), and
    only on rank 0; `why` goes to the Text tab (what the record lacks). Returns True if it wrote."""
    if log_dir is None or not is_main_process() or has_events(log_dir):
        return False
    log = RunLog(log_dir)
    try:
        if losses:
            log.steps(0, losses, learning_rates)
        else:
            for step, lr in enumerate(learning_rates):
                log.writer.add_scalar("train/lr", lr, step)
        for point in evals:
            log.evaluation(point.get("iter", point.get("step")), point)
        if why:
            log.note(why)
    finally:
        log.close()
    return True

"""The one estimator every curve point and table number of lora_lab is measured with.

`split_scores` is the exact loss over a fixed text (the first `eval_chars` characters of a split, every
character predicted once from up to block_size characters of context, fp32), plus the next-character accuracy
from the same logits. Curve points and table numbers are the same function of the same weights, so the step-0
point of a LoRA run *is* the base (B = 0), and the last point *is* the table's number.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F

from ..data import CharTokenizer
from ..devices import pick_device
from ..model import GPT
from ..tasks import Task
from .defaults import CURVE_POINTS, EVAL_CHARS


@functools.lru_cache(maxsize=8)
def _encoded(vocab: tuple[str, ...], text: str) -> torch.Tensor:
    # A sweep fine-tunes on one training text a hundred times; encoding it is a large share of a short run.
    return torch.tensor(CharTokenizer(list(vocab)).encode(text), dtype=torch.long)


def encode_task(task: Task, tokenizer) -> dict[str, torch.Tensor]:
    """The task's texts as token tensors: train, target (validation) and source (validation). A character
    tokenizer's encodings are remembered for the last few texts, so each tensor is a copy of a shared one."""
    if isinstance(tokenizer, CharTokenizer):
        encode = lambda text: _encoded(tuple(tokenizer.chars), text).clone()  # noqa: E731
    else:
        encode = lambda text: torch.tensor(tokenizer.encode(text), dtype=torch.long)  # noqa: E731
    return {
        "train": encode(task.train),  # (n_train,)
        "target": encode(task.validation),  # (n_target,)
        "source": encode(task.source_validation),  # (n_source,)
    }


@torch.no_grad()
def split_scores(
    model: GPT, tokens: torch.Tensor, eval_chars: int | None = EVAL_CHARS, device: torch.device | str = "cpu"
) -> dict[str, float]:
    """{"loss", "accuracy"} of `model` on the first eval_chars + 1 tokens (all of them for None).

    The text is cut into consecutive windows of block_size characters; every character after the first is
    predicted exactly once, so this is the exact mean cross-entropy of that text, not a sample of it."""
    if eval_chars is not None:
        tokens = tokens[: eval_chars + 1]
    if len(tokens) < 2:
        raise ValueError(f"Need at least 2 tokens to score a text, got {len(tokens)}.")
    device = torch.device(device)
    block = model.config.block_size
    full = (len(tokens) - 1) // block
    pieces = []
    if full:
        pieces.append((tokens[: full * block].view(full, block), tokens[1 : full * block + 1].view(full, block)))
    if (len(tokens) - 1) % block:
        pieces.append((tokens[full * block : -1][None], tokens[full * block + 1 :][None]))
    was_training = model.training
    model.eval()
    total, correct, count = 0.0, 0, 0
    for x, y in pieces:
        for start in range(0, len(x), 128):  # 128 windows per forward: bounded memory
            xb, yb = x[start : start + 128].to(device), y[start : start + 128].to(device)
            logits, _ = model(xb)  # (b, T, vocab), fp32: no autocast, so the score is exact and repeatable
            logits = logits.float().flatten(0, 1)
            total += F.cross_entropy(logits, yb.flatten(), reduction="sum").item()
            correct += (logits.argmax(-1) == yb.flatten()).sum().item()
            count += yb.numel()
    model.train(was_training)
    return {"loss": total / count, "accuracy": correct / count}


def task_scores(
    model: GPT, data: dict[str, torch.Tensor], eval_chars: int | None = EVAL_CHARS, device: torch.device | str = "cpu"
) -> dict[str, float]:
    """Target loss and accuracy (the task) and source loss (forgetting), each by `split_scores`."""
    target = split_scores(model, data["target"], eval_chars, device)
    source = split_scores(model, data["source"], eval_chars, device)
    return {"target": target["loss"], "target_accuracy": target["accuracy"], "source": source["loss"]}


def curve_steps(steps: int, points: int = CURVE_POINTS) -> list[int]:
    """`points` evenly spaced steps from 0 to `steps` (both included)."""
    return sorted({round(i * steps / (max(points, 2) - 1)) for i in range(max(points, 2))})


@contextlib.contextmanager
def one_cpu_thread(device):
    """Run the block with one torch thread on a CPU. Why: CPU results depend on the thread count (full
    fine-tuning's losses differ in the 4th decimal between 1 and 2 threads), and the run cache must hold the
    same numbers whichever machine computed them. One thread is also the robust choice on a shared CPU."""
    threads = torch.get_num_threads()
    if pick_device(device).type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)

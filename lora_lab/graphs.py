"""The whole training step as one CUDA graph: forward, backward, clipping and AdamW, replayed with one launch.

At this course's widths an eager GPU step is bound by launching kernels (hundreds per step, each a few
microseconds of Python and driver work), not by the GPU's arithmetic. A CUDA graph records every kernel of
one step once and then replays them all from a single launch. What that needs, and what WholeStepGraph does:

- fixed inputs: each step's batch is copied into the same two buffers the graph was recorded with;
- fixed memory: the gradients, activations and AdamW's work live in the graph's own memory pool, and the
  optimizer keeps its step counters on the GPU (capturable=True) and reads its learning rate from a tensor,
  which train() updates in place every step (a Python float would be baked into the graph);
- a warm-up: the first WARMUP_STEPS steps run eagerly on a side stream (cuBLAS, autograd and AdamW set
  themselves up there; they are real training steps), then one step is captured, which records its kernels
  without running them, and replayed. The cost is that capture: about one eager step, once per train() call.

Random numbers (dropout) stay correct: PyTorch's CUDA generator advances its offset on every replay.
Where a graph cannot be used (no CUDA, data-parallel training, activation checkpointing, or a capture that
fails), train() steps eagerly and says why in TrainResult.notes.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

WARMUP_STEPS = 3  # eager steps before the capture (PyTorch's CUDA-graph notes use a few)


def graph_problem(device: torch.device, data_parallel: bool, activation_checkpointing: bool, per_step_python: bool):
    """Why the step cannot be captured here (a sentence for TrainResult.notes), or None if it can."""
    if device.type != "cuda":
        return f"cuda_graphs needs a CUDA device; this run is on {device.type}: trained without graphs."
    if not hasattr(torch.cuda, "CUDAGraph"):
        return f"torch {torch.__version__} has no CUDA graphs: trained without them."
    if data_parallel:
        return "cuda_graphs is not combined with data-parallel training (DDP's all-reduce): trained without graphs."
    if activation_checkpointing:
        return "cuda_graphs is not combined with activation checkpointing (it saves RNG state): trained without graphs."
    if per_step_python:
        return "cuda_graphs is off while log_dir logs every step's gradient norm (a replay runs no Python)."
    return None


def make_capturable(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Step counters on the GPU and the learning rate as a GPU tensor, for every parameter group: what a
    recorded optimizer step needs. Call before the optimizer's first step (its state is created there)."""
    for group in optimizer.param_groups:
        group["capturable"] = True
        group["lr"] = torch.tensor(float(group["lr"]), device=device)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group's rate to lr: in place where it is a tensor (a recorded step reads that tensor)."""
    for group in optimizer.param_groups:
        if torch.is_tensor(group["lr"]):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


class WholeStepGraph:
    """Calls step(x, y) -> loss eagerly WARMUP_STEPS times (on a side stream), then captures one call as a CUDA
    graph and from then on replays it, with x and y copied into its input buffers. Each call returns the
    step's loss as a new tensor. If the capture fails the step falls back to eager, once, with a note."""

    def __init__(self, step: Callable, optimizer: torch.optim.Optimizer, notes: list[str], warmup: int = WARMUP_STEPS):
        self.step, self.optimizer, self.notes, self.warmup = step, optimizer, notes, warmup
        self.calls, self.graph, self.failed, self.side = 0, None, False, None
        self.capture_seconds: float | None = None

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.graph is not None:
            self.static_x.copy_(x)
            self.static_y.copy_(y)
            self.graph.replay()
            return self.static_loss.clone()
        if self.failed:
            return self.step(x, y)
        if self.calls <= self.warmup:
            self.side = self.side or torch.cuda.Stream()
            self.side.wait_stream(torch.cuda.current_stream())  # the batch was cut on the default stream
            with torch.cuda.stream(self.side):
                loss = self.step(x, y)
            torch.cuda.current_stream().wait_stream(self.side)
            return loss
        return self.capture(x, y)

    def capture(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        self.static_x, self.static_y = x.clone(), y.clone()
        self.optimizer.zero_grad(set_to_none=True)  # the recorded backward creates the gradients in the graph's pool
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self.static_loss = self.step(self.static_x, self.static_y)
        except Exception as err:  # noqa: BLE001 (capture raises many kinds; the eager step re-raises real errors)
            self.failed = True
            self.optimizer.zero_grad(set_to_none=True)
            self.notes.append(f"CUDA graph capture failed ({type(err).__name__}: {err}); trained without graphs.")
            return self.step(x, y)
        self.graph = graph
        graph.replay()  # capturing recorded this step without running it
        torch.cuda.synchronize()
        self.capture_seconds = time.perf_counter() - t0
        self.notes.append(
            f"CUDA graph: the whole step captured after {self.warmup} eager warm-up steps; the capture and its "
            f"first replay took {self.capture_seconds:.2f} s."
        )
        return self.static_loss.clone()

    def release(self) -> None:
        """Drop the graph and its memory pool; the parameters keep their trained values."""
        if self.graph is None and not self.failed:
            self.notes.append(
                f"cuda_graphs: the run ended within its {self.warmup} eager warm-up steps; nothing was captured."
            )
        self.graph = None
        self.static_x = self.static_y = self.static_loss = None
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                p.grad = None

"""What one training step costs in work, counted rather than timed: matrix FLOPs and operators.

A step's time is roughly max(FLOPs / matmul speed, operators x per-operator overhead). Large models sit in the
first regime, where LoRA's skipped weight gradients (a third of a frozen layer's FLOPs) make it cheaper. Small
models on a GPU, and tiny ones on a CPU, sit in the second: there every operator costs a launch (a few
microseconds of Python and dispatch, and a GPU kernel launch) whatever its size, and LoRA's A/B branch adds
operators. Both counts are exact and the same on every machine, so chapter 05 and the benchmarks can print them.

    cost = step_cost(model, x, y)        # one forward + backward, the way train() runs it (autocast included)
    cost.flops, cost.operators
    optimizer_step_cost(model, x, y, lambda ps: torch.optim.AdamW(ps))   # the step that follows: elements written
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode  # the documented __torch_dispatch__ hook
from torch.utils.flop_counter import FlopCounterMode

from ..devices import autocast_for

# Operators that only allocate without initialising: no kernel runs for them.
ALLOCATING_ONLY = ("empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided")


class OperatorCount(TorchDispatchMode):
    """Counts the operators that reach the kernels (below autograd and autocast, so a cast counts, and the
    backward's operators count): on a GPU each launches about one kernel. Views (a new shape for the same
    memory) and bare allocations launch nothing and are not counted."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        returns = func._schema.returns
        is_view = bool(returns) and returns[0].alias_info is not None and not returns[0].alias_info.is_write
        name = func.__name__.split(".")[0]
        if not is_view and name != "_unsafe_view" and name not in ALLOCATING_ONLY:
            self.count += 1
        return func(*args, **(kwargs or {}))


@dataclass(frozen=True)
class StepCost:
    flops: int  # matrix FLOPs of the forward and backward pass (torch's FLOP counter: matmuls and attention)
    operators: int  # operators run, forward and backward


def step_cost(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device | None = None, bf16: bool = True
) -> StepCost:
    """Count one forward + backward of `model` on (x, y) as lora_lab.train runs it (autocast_for(device, bf16)).

    The optimizer step is left out: it is one fused operator per group on a GPU and its cost depends on the
    optimizer, not on the model. Gradients the pass creates are removed again, so the model is as it was."""
    device = torch.device(device) if device is not None else x.device
    had_grad = {p: p.grad for p in model.parameters()}
    try:  # fork_rng: dropout's random draws here leave the caller's random stream where it was
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            with FlopCounterMode(display=False) as flops, OperatorCount() as ops:
                with autocast_for(device, bf16):
                    _, loss = model(x, y)
                loss.backward()
    finally:
        for p, grad in had_grad.items():
            p.grad = grad
    return StepCost(flops=flops.get_total_flops(), operators=ops.count)


class ElementCount(OperatorCount):
    """OperatorCount that also adds up the elements each counted operator writes: the work of elementwise
    steps (an optimizer's update), which a FLOP counter of matmuls leaves out."""

    def __init__(self):
        super().__init__()
        self.elements = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        before = self.count
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if self.count > before:
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.elements += t.numel()
        return out


@dataclass(frozen=True)
class OptimizerStepCost:
    elements: int  # elements written by the step's operators (about a dozen per trainable number for AdamW)
    operators: int  # operators the step runs
    trainable: int  # trainable numbers it updates


def optimizer_step_cost(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, make_optimizer) -> OptimizerStepCost:
    """Count the optimizer's step that follows one forward + backward (what step_cost leaves out), on a copy
    of the model: `make_optimizer(parameters)` builds it (for example lambda ps: torch.optim.AdamW(ps, lr=1e-3)).
    The first step also creates the optimizer's state; the step counted is the second, the steady one."""
    model = copy.deepcopy(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params)
    with torch.random.fork_rng(devices=[]):
        for step in range(2):
            optimizer.zero_grad(set_to_none=True)
            _, loss = model(x, y)
            loss.backward()
            if step == 1:
                with ElementCount() as counted:
                    optimizer.step()
            else:
                optimizer.step()
    return OptimizerStepCost(counted.elements, counted.count, sum(p.numel() for p in params))

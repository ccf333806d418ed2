"""Where tensors run: picking a device, bf16 autocast where the hardware has it, TF32 on CUDA."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch

DEVICES = ("auto", "cpu", "cuda", "mps")


def pick_device(device: str | None = "auto") -> torch.device:
    """'auto' picks cuda, then mps, then cpu. Asking for a device that is not there is an error."""
    device = device or "auto"
    kind = str(device).split(":")[0]
    if kind not in DEVICES:
        raise ValueError(f"Unknown device {device!r}; choose one of {', '.join(DEVICES)} (e.g. 'cuda:1').")
    if kind == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError("Device 'cuda' was requested but torch sees no CUDA GPU.")
    if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError("Device 'mps' was requested but this machine has no usable MPS backend.")
    return torch.device(device)


def cpu_has_native_bf16() -> bool:
    """True on CPUs whose matmuls run natively in bf16 (AVX512-BF16 or AMX), where bf16 autocast is ~2x faster."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without oneDNN, or an older one without the query
        return False


def autocast_for(device: torch.device, use_bf16: bool = True):
    """bf16 autocast on CUDA GPUs that support it and on CPUs with native bf16 matmuls; plain fp32 elsewhere."""
    device = torch.device(device)
    if use_bf16 and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    if use_bf16 and device.type == "cpu" and cpu_has_native_bf16():
        return torch.autocast(device_type="cpu", dtype=torch.bfloat16)
    return nullcontext()


@contextmanager
def fast_fp32_matmuls(device: torch.device):
    """TF32 for the fp32 matmuls left on CUDA (bf16 autocast covers most); restores the previous setting."""
    if device.type != "cuda":
        yield
        return
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)

"""The one way lora_lab fingerprints things: sha256 of canonical JSON, of text, or of named tensors.

Cache keys, base-model records and adapter bindings all use these three, so "the same" means one thing.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping

import torch


def json_digest(obj, length: int | None = None) -> str:
    """Hex sha256 of `obj` as canonical JSON (sorted keys), optionally cut to `length` characters."""
    digest = hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()
    return digest if length is None else digest[:length]


def text_digest(text: str) -> str:
    """Hex sha256 of a text's UTF-8 bytes."""
    return hashlib.sha256(text.encode()).hexdigest()


def tensors_digest(tensors: Mapping[str, torch.Tensor], exclude: Iterable[str] = ()) -> str:
    """ "sha256:<hex>" over named tensors in sorted name order, each as its name, shape and fp32 bytes.

    Values go through fp32 on the CPU, so the digest does not depend on the device, and a tensor stored in
    bf16 digests like its fp32 upcast. Names in `exclude` are left out.
    """
    h = hashlib.sha256()
    for name in sorted(set(tensors) - set(exclude)):
        t = tensors[name].detach().to("cpu", torch.float32).contiguous()
        h.update(f"{name}:{tuple(t.shape)};".encode())
        h.update(t.numpy().tobytes())
    return "sha256:" + h.hexdigest()

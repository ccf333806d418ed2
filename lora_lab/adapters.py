"""LoRA adapters as files and as swappable parts of one loaded base model.

An adapter is only what LoRA trained: A and B for each adapted layer (plus any `trainable` weights),
saved as adapter_model.safetensors next to adapter_config.json, which names the base model it fits.
AdapterBank keeps several adapters for one base and swaps them without reloading the base.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn

from .files import CorruptFileError, read_json, read_tensors, write_bundle
from .lora import (AdapterMismatchError, LoRAConfig, LoRAError, _require_lora, _select_targets, _select_trainable,
                   _unwrap, apply_lora, lora_layers)

ADAPTER_FORMAT = "lora_lab.adapter.v1"
WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"


# ----------------------------------------------------------------------------------------------
# Adapters on disk: only A, B (and `trainable` weights) plus a config naming the base they fit


def _adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    tensors = {}
    for n, layer in _require_lora(model).items():
        tensors[f"{n}.lora_A"], tensors[f"{n}.lora_B"] = layer.lora_A, layer.lora_B
    config = model.lora_config
    tensors.update(_select_trainable(model, config, lora_layers(model)))
    return tensors


def save_adapter(model: nn.Module, path: str | os.PathLike) -> Path:
    """Atomically write the folder `path`: adapter_model.safetensors + adapter_config.json."""
    layers = _require_lora(model)
    tensors = _adapter_tensors(model)
    meta = {
        "format": ADAPTER_FORMAT,
        "lora_config": model.lora_config.to_dict(),
        "scaling": "alpha/r",
        "base_fingerprint": model.config.fingerprint(),
        "base_config": model.config.to_dict(),
        "modules": [
            {"name": n, "d": l.base.out_features, "k": l.base.in_features, "r": l.r,
             "lora_A": [l.r, l.base.in_features], "lora_B": [l.base.out_features, l.r]}
            for n, l in layers.items()
        ],
        "trainable_params": {n: list(t.shape) for n, t in tensors.items() if not n.endswith((".lora_A", ".lora_B"))},
    }
    return write_bundle(path, {WEIGHTS_FILE: tensors, CONFIG_FILE: meta})


def _expected_shapes(model: nn.Module, config: LoRAConfig) -> dict[str, tuple[int, ...]]:
    targets = _select_targets(model, config.targets, config.r)
    shapes = {}
    for n, lin in targets.items():
        shapes[f"{n}.lora_A"] = (config.r, lin.in_features)
        shapes[f"{n}.lora_B"] = (lin.out_features, config.r)
    shapes.update({n: tuple(p.shape) for n, p in _select_trainable(model, config, targets).items()})
    return shapes


def _check_tensors(tensors: dict, shapes: dict, source: str) -> None:
    missing, extra = sorted(set(shapes) - set(tensors)), sorted(set(tensors) - set(shapes))
    if missing or extra:
        raise CorruptFileError(f"{source}: missing tensors {missing[:4]}, unexpected tensors {extra[:4]}.")
    for n, t in tensors.items():
        if not t.is_floating_point():
            raise CorruptFileError(f"{source}: tensor {n} has dtype {t.dtype}; LoRA tensors must be floating point.")
        if tuple(t.shape) != shapes[n]:
            raise AdapterMismatchError(f"{source}: tensor {n} has shape {tuple(t.shape)}, "
                                       f"this model needs {shapes[n]}.")
        if not torch.isfinite(t).all():
            raise CorruptFileError(f"{source}: tensor {n} contains NaN or Inf.")


def _install(model: nn.Module, config: LoRAConfig, tensors: dict, source: str) -> nn.Module:
    """Validate, then put the adapter (config + tensors) into the model: apply it to a plain model, or
    replace the tensors of an adapted one whose targets agree. The model is untouched on any error."""
    layers = lora_layers(model)
    if any(l.merged for l in layers.values()):
        raise LoRAError("The model's LoRA is merged; call unmerge_lora before loading another adapter.")
    shapes = _expected_shapes(model, config)
    if layers:
        theirs = sorted(n[: -len(".lora_A")] for n in shapes if n.endswith(".lora_A"))
        mine = model.lora_config
        if theirs != sorted(layers) or config.r != mine.r:
            raise AdapterMismatchError(f"{source} adapts {theirs[:4]} at r={config.r}, but the model is adapted at "
                                       f"{sorted(layers)[:4]} with r={mine.r}: targets and rank must agree.")
        if set(_select_trainable(model, config, layers)) != set(_select_trainable(model, mine, layers)):
            raise AdapterMismatchError(f"{source} trains modules {config.trainable}, the model {mine.trainable}.")
    _check_tensors(tensors, shapes, source)
    if not layers:
        cuda = sorted({p.device.index or 0 for p in model.parameters() if p.is_cuda})
        with torch.random.fork_rng(devices=cuda):  # loading must not consume random numbers
            apply_lora(model, config)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for layer in lora_layers(model).values():  # an adapted model takes the adapter's alpha and dropout
            layer.alpha = float(config.alpha)
            layer.lora_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        for n, t in tensors.items():
            params[n].copy_(t)  # cast to the model's dtype and device
    model.lora_config = config
    return model


def _base_mismatch(fingerprint, saved_config: dict, model: nn.Module, source: str) -> None:
    if fingerprint == model.config.fingerprint():
        return
    mine = model.config.to_dict()
    diff = ", ".join(f"{k}: adapter {v}, model {mine.get(k)}" for k, v in saved_config.items()
                     if k != "dropout" and mine.get(k) != v)
    raise AdapterMismatchError(f"{source} was made for another base model (fingerprint {fingerprint}, this model "
                               f"{model.config.fingerprint()}; {diff or 'config differs'}).")


def _read_adapter(path: str | os.PathLike, model: nn.Module) -> tuple[LoRAConfig, dict]:
    path = Path(path)
    meta = read_json(path / CONFIG_FILE)
    if meta.get("format") != ADAPTER_FORMAT:
        raise CorruptFileError(f"{path / CONFIG_FILE} is not a lora_lab adapter config "
                               f"(format {meta.get('format')!r}).")
    try:
        config = LoRAConfig.from_dict(meta["lora_config"])
        fingerprint, saved_config, scaling = meta["base_fingerprint"], dict(meta["base_config"]), meta["scaling"]
    except (KeyError, TypeError, ValueError) as err:
        raise CorruptFileError(f"{path / CONFIG_FILE} is not a valid adapter config: {err!r}") from None
    if scaling != "alpha/r":
        raise CorruptFileError(f"{path / CONFIG_FILE}: unsupported scaling rule {scaling!r} (expected 'alpha/r').")
    _base_mismatch(fingerprint, saved_config, model, f"Adapter {path}")
    return config, read_tensors(path / WEIGHTS_FILE)


def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a save_adapter folder into `model` (plain: LoRA is applied first; adapted: tensors replaced)."""
    config, tensors = _read_adapter(path, model)
    return _install(model, config, tensors, f"Adapter {path}")


# ----------------------------------------------------------------------------------------------
# Many adapters, one base: swapping moves a few small tensors, the base weights stay where they are


class AdapterBank:
    """Named adapters for one loaded base model. activate(name) detaches the current LoRA layers (their
    base nn.Linear objects go back in place) and attaches the named adapter; the base is never reloaded.
    A model that already carries LoRA when the bank is made is registered as adapter "default"."""

    def __init__(self, model: nn.Module):
        self.model = model
        self._adapters: dict[str, tuple[LoRAConfig, dict[str, torch.Tensor]]] = {}
        self._base_values: dict[str, torch.Tensor] = {}  # base copies of weights that `trainable` adapters change
        self.active: str | None = None
        layers = lora_layers(model)
        if layers:
            if any(l.merged for l in layers.values()) or model.lora_config.trainable:
                raise LoRAError("AdapterBank needs an unmerged model whose adapter trains no extra modules "
                                "(their base weights would be lost); pass the plain base model instead.")
            tensors = {n: t.detach().clone() for n, t in _adapter_tensors(model).items()}
            self._adapters["default"] = (model.lora_config, tensors)
            self.active = "default"

    @property
    def names(self) -> list[str]:
        return list(self._adapters)

    def add(self, name: str, source: str | os.PathLike | nn.Module) -> None:
        """Register an adapter from a save_adapter folder or from an adapted model (its tensors are copied)."""
        if not isinstance(name, str) or not name:
            raise LoRAError(f"Adapter names are non-empty strings, got {name!r}.")
        if name in self._adapters:
            raise LoRAError(f"An adapter named {name!r} already exists; delete it first.")
        if isinstance(source, nn.Module):
            _require_lora(source)
            _base_mismatch(source.config.fingerprint(), source.config.to_dict(), self.model, f"Adapter {name!r}")
            config, tensors = source.lora_config, _adapter_tensors(source)
        else:
            config, tensors = _read_adapter(source, self.model)
        _check_tensors(tensors, _expected_shapes(self.model, config), f"Adapter {name!r}")
        extra = [n for n in tensors if not n.endswith((".lora_A", ".lora_B")) and n not in self._base_values]
        if extra and source is self.model:
            raise LoRAError(f"The bank's own model trained {extra[:4]} in full, so their base values are lost; "
                            "train adapters with `trainable` modules on a copy of the base.")
        params = dict(self.model.named_parameters())
        for n in extra:  # a `trainable` weight: keep its base value to restore when switching away
            self._base_values[n] = params[n].detach().clone()
        device = next(self.model.parameters()).device
        self._adapters[name] = (config, {n: t.detach().to(device).clone() for n, t in tensors.items()})

    def _detach(self) -> None:
        if any(l.merged for l in lora_layers(self.model).values()):
            raise LoRAError("The active adapter is merged; call unmerge_lora before switching adapters.")
        _unwrap(self.model)
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for n, value in self._base_values.items():
                params[n].copy_(value)

    def activate(self, name: str) -> None:
        if name not in self._adapters:
            raise LoRAError(f"No adapter named {name!r}; the bank holds {self.names}.")
        self._detach()
        self.active = None
        config, tensors = self._adapters[name]
        _install(self.model, config, tensors, f"Adapter {name!r}")
        self.active = name

    def disable(self) -> None:
        """Detach all adapters: the model is the plain base again."""
        self._detach()
        self.active = None

    def delete(self, name: str) -> None:
        if name not in self._adapters:
            raise LoRAError(f"No adapter named {name!r}; the bank holds {self.names}.")
        if name == self.active:
            self.disable()
        del self._adapters[name]

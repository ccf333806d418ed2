"""Many adapters, one loaded base: AdapterBank swaps them without reloading or copying the base weights.

Each adapter's layers are built once, when it is added: around the base's own nn.Linear objects, checked
against the shapes those layers hold (same base, finite outputs). activate(name) then only puts them in
place and copies the adapter's saved tensors back into them (training the active adapter never changes
what the bank holds). A swap builds no layer and draws no random numbers, unless the base moved to
another device or dtype, or its modules were replaced, since the layers were built: then they are built
again, once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..lora import LoRAConfig, LoRAError, lora_layers, own_parameters, require_lora, unload_lora
from ..targets import is_lora_layer, parent_of, trainable_parameters
from .adapters import (
    adapter_tensors,
    base_record,
    build_layers,
    check_architecture,
    check_tensors,
    check_verified,
    check_weights,
    fill_layers,
    probe_layers,
    read_adapter,
)


@dataclass
class _Adapter:
    config: LoRAConfig
    tensors: dict[str, torch.Tensor]  # the values activate() puts back, on the base's device
    layers: dict[str, nn.Module]  # target name -> its layer, wrapping the base's own nn.Linear
    requires_grad: dict[str, dict[str, bool]]  # target name -> {own parameter: flag its variant gave it}
    built_for: dict[str, tuple]  # target name -> (id, device, dtype) of the base weight the layer wraps


def _signature(layers: dict[str, nn.Module]) -> dict[str, tuple]:
    return {n: (id(l.base), l.base.weight.device, l.base.weight.dtype) for n, l in layers.items()}


def _flags(layers: dict[str, nn.Module]) -> dict[str, dict[str, bool]]:
    return {n: {k: p.requires_grad for k, p in own_parameters(l).items()} for n, l in layers.items()}


class AdapterBank:
    """Named adapters for one loaded base model. activate(name) detaches the current LoRA layers (their
    base nn.Linear objects go back in place) and attaches the named adapter's; the base is never reloaded.
    A model that already carries LoRA when the bank is made is registered as adapter "default"."""

    def __init__(self, model: nn.Module):
        self.model = model
        self._adapters: dict[str, _Adapter] = {}
        self._base_values: dict[str, torch.Tensor] = {}  # base copies of weights that `trainable` adapters change
        self.active: str | None = None
        layers = lora_layers(model)
        if layers:
            if any(l.merged for l in layers.values()) or model.lora_config.trainable:
                raise LoRAError(
                    "AdapterBank needs an unmerged model whose adapter trains no extra modules "
                    "(their base weights would be lost); pass the plain base model instead."
                )
            tensors = {n: t.detach().clone() for n, t in adapter_tensors(model).items()}
            self._adapters["default"] = self._entry(model.lora_config, tensors, layers)
            self.active = "default"

    @property
    def names(self) -> list[str]:
        return list(self._adapters)

    @staticmethod
    def _entry(config: LoRAConfig, tensors: dict, layers: dict) -> _Adapter:
        return _Adapter(config, tensors, layers, _flags(layers), _signature(layers))

    def add(
        self,
        name: str,
        source: str | os.PathLike | nn.Module,
        allow_other_base: bool = False,
        allow_unverified: bool = False,
    ) -> None:
        """Register an adapter from a save_adapter folder or from an adapted model (its tensors are copied).

        Like load_adapter, an adapter trained on other base weights is refused unless allow_other_base=True,
        and an unverified folder (no checksums or no base digest) unless allow_unverified=True.
        """
        if not isinstance(name, str) or not name:
            raise LoRAError(f"Adapter names are non-empty strings, got {name!r}.")
        if name in self._adapters:
            raise LoRAError(f"An adapter named {name!r} already exists; delete it first.")
        if isinstance(source, nn.Module):
            require_lora(source)
            config, tensors = source.lora_config, adapter_tensors(source)
            base, label = base_record(source, config), f"Adapter {name!r}"
            allow_other_base = allow_other_base or source is self.model
        else:
            config, tensors, base = read_adapter(source)
            label = f"Adapter {source}"
            check_verified(base, label, allow_other_base, allow_unverified)
        check_architecture(base, self.model, label)
        layers = build_layers(self.model, config)
        shapes = {f"{n}.{key}": tuple(t.shape) for n, l in layers.items() for key, t in l.adapter_tensors().items()}
        own = trainable_parameters(self.model, config.trainable, layers)  # `trainable` weights, not A/B
        shapes.update({n: tuple(p.shape) for n, p in own.items()})
        check_tensors(tensors, shapes, f"Adapter {name!r}")
        check_weights(base, self.model, config, label, allow_other_base, self._base_values)
        fill_layers(layers, tensors)
        probe_layers(layers, config, f"Adapter {name!r}")
        extra = [n for n in tensors if n in own and n not in self._base_values]
        if extra and source is self.model:
            raise LoRAError(
                f"The bank's own model trained {extra[:4]} in full, so their base values are lost; "
                "train adapters with `trainable` modules on a copy of the base."
            )
        for n in extra:  # a `trainable` weight: keep its base value to restore when switching away
            self._base_values[n] = own[n].detach().clone()
        device = next(self.model.parameters()).device
        saved = {n: t.detach().to(device).clone() for n, t in tensors.items()}
        self._adapters[name] = self._entry(config, saved, layers)

    def config(self, name: str) -> LoRAConfig:
        """The named adapter's LoRAConfig."""
        return self._get(name).config

    def layers(self, name: str) -> dict[str, nn.Module]:
        """The named adapter's layers, holding its saved tensors, not attached to the model (MixedAdapterModel
        runs them on its rows). Not for the active adapter, whose layers are the model's."""
        entry = self._get(name)
        if name == self.active:
            raise LoRAError(f"Adapter {name!r} is active: its layers are the model's; disable() it first.")
        self._fresh(entry)
        fill_layers(entry.layers, entry.tensors)
        return dict(entry.layers)

    def _get(self, name: str) -> _Adapter:
        if name not in self._adapters:
            raise LoRAError(f"No adapter named {name!r}; the bank holds {self.names}.")
        return self._adapters[name]

    def _fresh(self, entry: _Adapter) -> None:
        """Rebuild the adapter's layers if the base's Linear objects, device or dtype changed since they were built."""
        current = {
            n: (id(m), m.weight.device, m.weight.dtype) if isinstance(m, nn.Linear) else None
            for n, m in self._targets(entry).items()
        }
        if current != entry.built_for:
            entry.layers = build_layers(self.model, entry.config)
            entry.requires_grad = _flags(entry.layers)
            entry.built_for = _signature(entry.layers)

    def _targets(self, entry: _Adapter) -> dict[str, nn.Module | None]:
        """The modules now at the adapter's target names (the plain model's, or None where there is none)."""
        found = {}
        for n in entry.layers:
            try:
                module = self.model.get_submodule(n)
            except AttributeError:
                module = None
            found[n] = module.base if is_lora_layer(module) else module
        return found

    def _detach(self) -> None:
        attached = self._adapters[self.active].layers if self.active is not None else lora_layers(self.model)
        if any(l.merged for l in attached.values()):
            raise LoRAError("The active adapter is merged; call unmerge_lora before switching adapters.")
        unload_lora(self.model)
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for n, value in self._base_values.items():
                params[n].copy_(value)

    def activate(self, name: str) -> None:
        entry = self._get(name)
        self._detach()
        self.active = None
        self._fresh(entry)
        model, config = self.model, entry.config
        fill_layers(entry.layers, entry.tensors)
        params = dict(model.named_parameters())
        trained = [n for n in entry.tensors if n in params]  # `trainable` weights of the base model
        with torch.no_grad():
            for n in trained:
                params[n].copy_(entry.tensors[n])
        model.requires_grad_(False)
        for n, layer in entry.layers.items():
            for key, p in own_parameters(layer).items():
                p.requires_grad_(entry.requires_grad[n][key])
            layer.train(layer.base.training)  # the mode of the Linear it replaces, as apply_lora does
            parent, attr = parent_of(model, n)
            setattr(parent, attr, layer)
        for n in trained:
            params[n].requires_grad_(True)
        model.lora_config = config
        self.active = name

    def disable(self) -> None:
        """Detach all adapters: the model is the plain base again."""
        self._detach()
        self.active = None

    def delete(self, name: str) -> None:
        self._get(name)
        if name == self.active:
            self.disable()
        del self._adapters[name]

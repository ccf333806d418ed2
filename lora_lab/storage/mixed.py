"""Many adapters, one batch: each row of a batch uses its own adapter (or none), on one loaded base.

AdapterBank serves one adapter at a time: a batch for three adapters is three passes and two swaps.
`MixedAdapterModel` serves them together, as PEFT's `adapter_names=` and S-LoRA/Punica do: every adapted
layer computes base(x) once for the whole batch, then each adapter's branch on its own rows only:

    y[rows of a] = variant_a(x[rows of a], given base(x)[rows of a])        rows of "no adapter": base(x)

A merged model cannot do this: W + ΔW_a holds one adapter's update for every row, and un-merging per row
would mean one d x k weight per adapter per layer, in one matmul each: N full passes again. Unmerged
adapters keep ΔW as two thin factors, so each adapter only adds r(d+k) work per row.

Which variants run per row: those whose layer class says `rows_independent = True` (see LoRALinear), i.e.
whose branch treats each row of x on its own. All built-ins do. DoRA too: its norm ‖W0 + sBA‖ is per
weight, so it is one d-vector per adapter (not per row), computed once per forward from that adapter's
own factors, and it rescales that adapter's rows of the shared base output. Others are refused.

Any model whose adapted nn.Linear layers see its batch as their first dimension can be served: forward
takes the model's own arguments after the adapter names. A model that reshapes its batch before a layer
(e.g. to (B*T, k)) is refused at that layer with a clear error.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch
import torch.nn as nn

from ..lora import LoRAError, LoRALinear, lora_layers, variant_class
from .bank import AdapterBank


def serves_rows(variant: str) -> bool:
    """True if adapters of this variant can serve some rows of a batch while other rows use others: its
    layer class says so with `rows_independent = True`."""
    return getattr(variant_class(variant), "rows_independent", False) is True


class PrecomputedBase(nn.Module):
    """Stands in for an adapter layer's frozen nn.Linear while the layer runs on its rows: returns the base
    output already computed for those rows (so the base matmul runs once per batch), and shows the real
    weight and bias to variants that read them (DoRA's norm)."""

    def __init__(self, linear: nn.Linear, output: torch.Tensor):
        super().__init__()
        self.linear, self.output = linear, output

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output


class MixedRowsLinear(nn.Module):
    """One base nn.Linear and the adapters that target it; `routes` says which rows use which adapter."""

    def __init__(self, base: nn.Linear, path: str):
        super().__init__()
        self.base, self.path = base, path
        self.adapters: dict[str, LoRALinear] = {}  # not submodules: the model's state_dict stays the base's
        self.routes: list[tuple[LoRALinear, torch.Tensor]] = []  # (adapter layer, its row indices)
        self.batch = 0  # rows of the batch being routed

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, ..., k)
        out = self.base(x)
        if not self.routes:
            return out
        if x.dim() < 2 or x.size(0) != self.batch:
            raise LoRAError(
                f"MixedAdapterModel: layer {self.path} gets an input of shape {tuple(x.shape)}, not the batch of "
                f"{self.batch} rows first; this model reshapes its batch before the layer, so rows cannot be "
                "routed to their adapters there."
            )
        mixed = out.clone()
        for layer, rows in self.routes:
            with precomputed_base(layer, out[rows]):
                mixed[rows] = layer(x[rows])
        return mixed


@contextmanager
def precomputed_base(layer: LoRALinear, output: torch.Tensor):
    linear = layer.base
    layer.base = PrecomputedBase(linear, output)
    try:
        yield
    finally:
        layer.base = linear


class MixedAdapterModel:
    """A plain base model plus named adapters, any of which each row of a batch may use.

        mixed = MixedAdapterModel(base.model)
        mixed.add("romeo", "runs/romeo"); mixed.add("shout", "runs/shout")
        logits = mixed.forward(idx, ["romeo", None, "shout", "romeo"])     # None: the plain base
        text_ids = mixed.generate(prompt_ids, ["romeo", "shout"], max_new_tokens=100)

    Adapters are checked as AdapterBank checks them (same base, shapes, finite outputs). Add them after
    moving the model to its device. Outside forward/generate the model is the plain base, untouched; a model
    that was changed meanwhile (LoRA applied to it, a layer replaced) is refused rather than overwritten."""

    def __init__(self, model: nn.Module):
        layers = lora_layers(model)
        if any(layer.merged for layer in layers.values()):
            raise LoRAError(
                "MixedAdapterModel needs an unmerged base: a merged W already holds one adapter's "
                "update for every row, so rows cannot use different adapters. Call unmerge_lora and "
                "unload_lora (or pass the plain base) first."
            )
        if layers:
            raise LoRAError(
                "MixedAdapterModel needs the plain base model (it carries a LoRA adapter now); call "
                "unload_lora, save that adapter and add it by name."
            )
        self.model = model
        self.configs: dict[str, object] = {}  # name -> its LoRAConfig
        self.mixers: dict[str, MixedRowsLinear] = {}  # layer path -> its mixer

    @property
    def names(self) -> list[str]:
        return list(self.configs)

    def add(
        self,
        name: str,
        source: str | os.PathLike | nn.Module,
        allow_other_base: bool = False,
        allow_unverified: bool = False,
    ) -> None:
        """Register an adapter from a save_adapter folder or an adapted model; its variant must serve rows."""
        if not isinstance(name, str) or not name:
            raise LoRAError(f"Adapter names are non-empty strings, got {name!r}.")
        if name in self.configs:
            raise LoRAError(f"An adapter named {name!r} already exists.")
        if lora_layers(self.model):
            raise self._changed()
        bank = AdapterBank(self.model)  # its checks, and the adapter's layers built once
        bank.add(name, source, allow_other_base, allow_unverified)
        config, layers = bank.config(name), bank.layers(name)
        if config.trainable:
            raise LoRAError(
                f"Adapter {name!r} also trains whole modules {config.trainable}; their weights are "
                "shared by every row, so it cannot be mixed with other adapters."
            )
        if not serves_rows(config.variant):
            raise LoRAError(
                f"Adapter {name!r} is a {config.variant!r} adapter, which is not known to compute each "
                "row on its own, so it cannot share a batch: its class has rows_independent = "
                f"{getattr(config.layer_class, 'rows_independent', None)!r}. If its forward treats every row "
                "of x independently (no statistics across the batch), set `rows_independent = True` on its class."
            )
        for path, layer in layers.items():
            mixer = self.mixers.setdefault(path, MixedRowsLinear(layer.base, path))
            mixer.adapters[name] = layer.eval()
        self.configs[name] = config

    def row_groups(self, adapter_names, batch: int, device) -> dict[str, torch.Tensor]:
        """{adapter name: its row indices}; None rows use the plain base. Bad names are refused."""
        if isinstance(adapter_names, str) or len(adapter_names) != batch:
            raise ValueError(
                f"adapter_names needs one entry (a name or None) per row: {batch} rows, got {adapter_names!r}."
            )
        unknown = sorted({n for n in adapter_names if n is not None and n not in self.configs}, key=str)
        if unknown:
            raise LoRAError(
                f"No adapter named {', '.join(map(repr, unknown))}; this model holds {self.names} "
                "(use None for the plain base)."
            )
        groups: dict[str, list[int]] = {}
        for i, n in enumerate(adapter_names):
            if n is not None:
                groups.setdefault(n, []).append(i)
        return {n: torch.tensor(rows, device=device) for n, rows in groups.items()}

    def _changed(self) -> LoRAError:
        return LoRAError(
            "MixedAdapterModel needs its model to stay the plain base, but the model was changed since "
            "adapters were added (LoRA applied to it, or a layer replaced); unload that LoRA (unload_lora), "
            "or make a new MixedAdapterModel."
        )

    @contextmanager
    def routed(self, adapter_names, batch: int, device):
        """Within: each adapted layer of the model is its mixer, routing the named rows to their adapters."""
        groups = self.row_groups(adapter_names, batch, device)
        places = {}
        for path, mixer in self.mixers.items():
            parent_path, _, attr = path.rpartition(".")
            parent = self.model.get_submodule(parent_path)
            if getattr(parent, attr, None) is not mixer.base:
                raise self._changed()
            places[path] = (parent, attr)
        swapped = []
        try:
            for path, mixer in self.mixers.items():
                mixer.routes = [
                    (layer.train(self.model.training), groups[n]) for n, layer in mixer.adapters.items() if n in groups
                ]
                mixer.batch = batch
                parent, attr = places[path]
                setattr(parent, attr, mixer)
                swapped.append((parent, attr, mixer))
            yield
        finally:
            for parent, attr, mixer in swapped:
                setattr(parent, attr, mixer.base)
                mixer.routes = []

    def _check_inputs(self, x, *what: str) -> None:
        check = getattr(self.model, "check_token_ids", None)  # lora_lab's GPT names bad token ids clearly
        if callable(check):
            check(x, *what)
        if not isinstance(x, torch.Tensor) or x.dim() < 1:
            raise LoRAError(f"MixedAdapterModel needs a tensor with the batch first, got {type(x).__name__}.")

    def forward(self, x: torch.Tensor, adapter_names, *args, **kwargs):
        """The model's output on x (and any further arguments, e.g. a GPT's targets) with row i computed
        through adapter adapter_names[i] (None: no adapter)."""
        self._check_inputs(x)
        with self.routed(adapter_names, x.size(0), x.device):
            return self.model(x, *args, **kwargs)

    __call__ = forward

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, adapter_names, *args, **kwargs) -> torch.Tensor:
        """The model's generate(idx, ...) (GPT.generate: max_new_tokens, temperature, top_k, generator) with row
        i's tokens sampled through adapter adapter_names[i] (None: no adapter)."""
        generate = getattr(self.model, "generate", None)
        if not callable(generate):
            raise LoRAError(
                f"MixedAdapterModel.generate needs a model with a generate method; "
                f"{type(self.model).__name__} has none."
            )
        self._check_inputs(idx, "the prompt")
        with self.routed(adapter_names, idx.size(0), idx.device):
            return generate(idx, *args, **kwargs)

"""LoRA adapters as files and as swappable parts of one loaded base model.

An adapter is only the adapted layers' own tensors (A and B for plain LoRA; whatever a variant declares:
its parameters and persistent buffers) plus any `trainable` weights, saved as adapter_model.safetensors
next to adapter_config.json, which names the variant, its hyperparameters and the base model it fits.
Which tensors to expect is never typed here: it comes from building the variant's layer on "meta".
AdapterBank keeps several adapters for one base and swaps them without reloading the base.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path

import torch
import torch.nn as nn

from .files import CorruptFileError, nonfinite_names, read_bundle, write_bundle
from .lora import AdapterMismatchError, LoRAConfig, LoRAError, apply_lora, lora_layers, require_lora, unload_lora
from .targets import target_linears, trainable_parameters

ADAPTER_FORMAT = "lora_lab.adapter.v1"
WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
LEGACY_FILES = ("lora_lab_base.json",)  # the CLI of lora_lab 0.1 wrote this side file into adapter folders
DIGEST_KEY = "base_weights_sha256"
ALLOW_OTHER_BASE_HINT = "allow_other_base=True (CLI: --allow-other-base)"


# ----------------------------------------------------------------------------------------------
# Which base? The architecture (fingerprint) and the weights themselves (digest)


def base_weights_digest(model: nn.Module, exclude=(), overrides: dict | None = None) -> str:
    """sha256 over the frozen base weights of `model`, whether or not it carries LoRA layers.

    The base is the model without the adapters: a LoRA layer (any variant) contributes only its base weight
    (as it was before a merge) under the plain layer's name; its own tensors are left out. Tensors go in sorted name order, each as fp32 bytes with its
    name and shape, so the digest does not depend on the device. `exclude` names weights the adapter
    itself replaces (its `trainable` modules), which training changes; `overrides` gives base values
    to use instead of the model's current ones ({name: tensor}, for weights an active adapter changed).
    """
    layers = lora_layers(model)
    renamed = {}
    for name, t in model.state_dict().items():
        for n, layer in layers.items():
            if name.startswith(f"{n}.") and not name.startswith(f"{n}.base."):
                break  # the layer's own tensors (A, B, a DoRA magnitude, ...)
            if name.startswith(f"{n}.base."):
                name = f"{n}.{name[len(n) + 6:]}"
                if name == f"{n}.weight" and getattr(layer, "weight_before_merge", None) is not None:
                    t = layer.weight_before_merge
                renamed[name] = t
                break
        else:
            renamed[name] = t
    renamed.update(overrides or {})
    h = hashlib.sha256()
    for name in sorted(set(renamed) - set(exclude)):
        t = renamed[name].detach().to("cpu", torch.float32).contiguous()
        h.update(f"{name}:{tuple(t.shape)};".encode())
        h.update(t.numpy().tobytes())
    return "sha256:" + h.hexdigest()


def _trainable_names(model: nn.Module, config: LoRAConfig) -> list[str]:
    return sorted(trainable_parameters(model, config.trainable, target_linears(model, config.targets, config.r)))


def _check_same_base(fingerprint, saved_config: dict, digest, model: nn.Module, config: LoRAConfig,
                     source: str, allow_other_base: bool, overrides: dict | None = None) -> None:
    """Refuse an adapter made for another architecture (always) or other base weights (unless allowed)."""
    if fingerprint != model.config.fingerprint():
        mine = model.config.to_dict()
        diff = ", ".join(f"{k}: adapter {v}, model {mine.get(k)}" for k, v in saved_config.items()
                         if k != "dropout" and mine.get(k) != v)
        raise AdapterMismatchError(f"{source} was made for another base model (fingerprint {fingerprint}, this "
                                   f"model {model.config.fingerprint()}; {diff or 'config differs'}).")
    if digest is None or allow_other_base:  # adapters of lora_lab 0.1 recorded no digest
        return
    mine = base_weights_digest(model, exclude=_trainable_names(model, config), overrides=overrides)
    if digest != mine:
        raise AdapterMismatchError(
            f"{source} was trained on other base weights: same architecture, but the weights differ "
            f"(adapter's base {digest[:19]}..., this model {mine[:19]}...), so it would not do what it was "
            f"trained to do. Load the base it was trained on, or pass {ALLOW_OTHER_BASE_HINT} to load it anyway.")


# ----------------------------------------------------------------------------------------------
# Adapters on disk: the layers' own tensors (and `trainable` weights) plus a config naming the base they fit


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """{name: tensor} of everything an adapter of `model` holds: each LoRA layer's own tensors, then the
    `trainable` weights. Names are the model's ("blocks.0.attn.q_proj.lora_A")."""
    tensors = {}
    for n, layer in require_lora(model).items():
        tensors.update({f"{n}.{key}": t for key, t in layer.adapter_tensors().items()})
    tensors.update(trainable_parameters(model, model.lora_config.trainable, lora_layers(model)))
    return tensors


def _layer_tensor_names(model: nn.Module) -> set[str]:
    return {f"{n}.{key}" for n, layer in lora_layers(model).items() for key in layer.adapter_tensors()}


def save_adapter(model: nn.Module, path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Atomically write the folder `path`: adapter_model.safetensors + adapter_config.json.

    The config records the LoRA settings, the base's architecture and a digest of its weights (so the
    adapter is refused on any other base), a sha256 of the tensor file, and `metadata` (any JSON object).
    Refused, with nothing written: non-finite tensors (a diverged fine-tune), and a `path` holding
    anything but a lora_lab adapter (see files.write_bundle).
    """
    layers = require_lora(model)
    tensors = adapter_tensors(model)
    bad = nonfinite_names(tensors)
    if bad:
        raise LoRAError(f"Refusing to save the adapter to {path}: tensors {bad[:5]} contain NaN or Inf "
                        "(the fine-tune diverged; try a lower learning rate). Nothing was written.")
    layer_tensors = _layer_tensor_names(model)
    if metadata is not None and not isinstance(metadata, dict):
        raise TypeError(f"metadata must be a JSON object (a dict), got {type(metadata).__name__}.")
    meta = {
        "format": ADAPTER_FORMAT,
        "lora_config": model.lora_config.to_dict(),
        "variant": model.lora_config.variant,
        "scaling": model.lora_config.layer_class.scaling_rule,
        "base_fingerprint": model.config.fingerprint(),
        "base_config": model.config.to_dict(),
        DIGEST_KEY: base_weights_digest(model, exclude=_trainable_names(model, model.lora_config)),
        "modules": [
            {"name": n, "d": l.base.out_features, "k": l.base.in_features, "r": l.r,
             **{key: list(t.shape) for key, t in l.adapter_tensors().items()}}
            for n, l in layers.items()
        ],
        "trainable_params": {n: list(t.shape) for n, t in tensors.items() if n not in layer_tensors},
        "metadata": metadata or {},
    }
    try:
        json.dumps(meta)
    except (TypeError, ValueError) as err:
        raise TypeError(f"metadata must be JSON-serialisable: {err}") from None
    return write_bundle(path, {WEIGHTS_FILE: tensors, CONFIG_FILE: meta}, config_file=CONFIG_FILE,
                        format_tag=ADAPTER_FORMAT, legacy_files=LEGACY_FILES)


def read_adapter_metadata(path: str | os.PathLike) -> dict:
    """The `metadata` object save_adapter stored in the adapter folder `path` ({} for older adapters)."""
    config, _ = read_bundle(path, config_file=CONFIG_FILE, tensor_files=[])
    meta = config.get("metadata", {})
    if not isinstance(meta, dict):
        raise CorruptFileError(f"{Path(path) / CONFIG_FILE}: 'metadata' should be a JSON object.")
    return meta


def expected_shapes(model: nn.Module, config: LoRAConfig) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} an adapter with `config` must hold for `model`: each target's variant layer is
    built on the "meta" device (no memory, no random numbers) and asked for its tensors."""
    targets = target_linears(model, config.targets, config.r)
    shapes = {}
    with torch.random.fork_rng(devices=[]):
        for n, lin in targets.items():
            probe = nn.Linear(lin.in_features, lin.out_features, bias=lin.bias is not None, device="meta")
            layer = config.layer_class.from_config(probe, config)
            shapes.update({f"{n}.{key}": tuple(t.shape) for key, t in layer.adapter_tensors().items()})
    shapes.update({n: tuple(p.shape) for n, p in trainable_parameters(model, config.trainable, targets).items()})
    return shapes


def _check_tensors(tensors: dict, shapes: dict, source: str) -> None:
    missing, extra = sorted(set(shapes) - set(tensors)), sorted(set(tensors) - set(shapes))
    if missing or extra:
        raise CorruptFileError(f"{source}: missing tensors {missing[:4]}, unexpected tensors {extra[:4]}.")
    for n, t in sorted(tensors.items()):
        if not t.is_floating_point():
            raise CorruptFileError(f"{source}: tensor {n} has dtype {t.dtype}; LoRA tensors must be floating point.")
        if tuple(t.shape) != shapes[n]:
            raise AdapterMismatchError(f"{source}: tensor {n} has shape {tuple(t.shape)}, "
                                       f"this model needs {shapes[n]}.")
        if not torch.isfinite(t).all():
            raise CorruptFileError(f"{source}: tensor {n} contains NaN or Inf.")


def _check_installable(model: nn.Module, config: LoRAConfig, tensors: dict, source: str) -> None:
    """Raise unless _install(model, config, tensors) can succeed; touches nothing."""
    layers = lora_layers(model)
    if any(l.merged for l in layers.values()):
        raise LoRAError("The model's LoRA is merged; call unmerge_lora before loading another adapter.")
    shapes = expected_shapes(model, config)
    if layers:
        theirs = sorted(target_linears(model, config.targets, config.r))
        mine = model.lora_config
        if theirs != sorted(layers) or config.r != mine.r:
            raise AdapterMismatchError(f"{source} adapts {theirs[:4]} at r={config.r}, but the model is adapted at "
                                       f"{sorted(layers)[:4]} with r={mine.r}: targets and rank must agree.")
        if (config.variant, config.options) != (mine.variant, mine.options):
            raise AdapterMismatchError(f"{source} is a {config.variant!r} adapter {config.options or ''}, the model "
                                       f"carries {mine.variant!r} {mine.options or ''}; load it into the plain base "
                                       "(or an AdapterBank) instead.")
        if set(trainable_parameters(model, config.trainable, layers)) != set(
                trainable_parameters(model, mine.trainable, layers)):
            raise AdapterMismatchError(f"{source} trains modules {config.trainable}, the model {mine.trainable}.")
    _check_tensors(tensors, shapes, source)


def _install(model: nn.Module, config: LoRAConfig, tensors: dict, source: str) -> nn.Module:
    """Validate, then put the adapter (config + tensors) into the model: apply it to a plain model, or
    replace the tensors of an adapted one whose targets agree. The model is untouched on any error."""
    _check_installable(model, config, tensors, source)
    if not lora_layers(model):
        cuda = sorted({p.device.index or 0 for p in model.parameters() if p.is_cuda})
        with torch.random.fork_rng(devices=cuda):  # loading must not consume random numbers
            apply_lora(model, config)
    state = model.state_dict(keep_vars=True)  # parameters and persistent buffers, by name
    with torch.no_grad():
        for layer in lora_layers(model).values():  # an adapted model takes the adapter's alpha and dropout
            layer.alpha = float(config.alpha)
            layer.lora_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        for n, t in tensors.items():
            state[n].copy_(t)  # cast to the model's dtype and device
    model.lora_config = config
    return model


def _check_finite_outputs(model: nn.Module, config: LoRAConfig, tensors: dict, source: str) -> None:
    """Refuse an adapter whose adapted model computes NaN/Inf (e.g. alpha=1e30 in a hand-edited config).

    Finite A, B and alpha can still overflow in the forward pass, so the adapter is installed into a
    copy of the plain base and run on a short probe; the model itself is not touched.
    """
    probe = copy.deepcopy(model)
    if lora_layers(probe):
        unload_lora(probe)
    _install(probe, config, tensors, source)
    n = min(probe.config.block_size, 16)
    device = next(probe.parameters()).device
    idx = (torch.arange(n, device=device) % probe.config.vocab_size).unsqueeze(0)
    with torch.no_grad():
        logits = probe.eval()(idx)[0]
    if not torch.isfinite(logits).all():
        raise LoRAError(f"{source} makes the model's outputs NaN or Inf (alpha={config.alpha:g}, r={config.r}, "
                        f"scale alpha/r={config.alpha / config.r:g}); refusing to load it. The model is unchanged.")


def _read_adapter(path: str | os.PathLike, model: nn.Module) -> tuple[LoRAConfig, dict, dict]:
    """(LoRA config, tensors, base record) of an adapter folder; refuses another architecture."""
    path = Path(path)
    meta, files = read_bundle(path, config_file=CONFIG_FILE, tensor_files=[WEIGHTS_FILE])
    if meta.get("format") != ADAPTER_FORMAT:
        raise CorruptFileError(f"{path / CONFIG_FILE} is not a lora_lab adapter config "
                               f"(format {meta.get('format')!r}).")
    try:
        config = LoRAConfig.from_dict(meta["lora_config"])
        base = {"fingerprint": meta["base_fingerprint"], "saved_config": dict(meta["base_config"]),
                "digest": meta.get(DIGEST_KEY)}
        scaling = meta["scaling"]
        if meta.get("variant", "lora") != config.variant:
            raise ValueError(f"'variant' {meta.get('variant')!r} differs from lora_config's {config.variant!r}")
    except (KeyError, TypeError, ValueError) as err:
        raise CorruptFileError(f"{path / CONFIG_FILE} is not a valid adapter config: {err!r}") from None
    rule = config.layer_class.scaling_rule
    if scaling != rule:
        raise CorruptFileError(f"{path / CONFIG_FILE}: unsupported scaling rule {scaling!r} for variant "
                               f"{config.variant!r} (expected {rule!r}).")
    _check_same_base(base["fingerprint"], base["saved_config"], None, model, config, f"Adapter {path}", True)
    return config, files[WEIGHTS_FILE], base


def load_adapter(model: nn.Module, path: str | os.PathLike, allow_other_base: bool = False) -> nn.Module:
    """Load a save_adapter folder into `model` (plain: LoRA is applied first; adapted: tensors replaced).

    Refused, with the model unchanged: an adapter for another architecture, one trained on other base
    weights (unless allow_other_base=True), damaged files (checksum), and one whose outputs are not finite.
    """
    source = f"Adapter {path}"
    config, tensors, base = _read_adapter(path, model)
    _check_installable(model, config, tensors, source)
    _check_same_base(base["fingerprint"], base["saved_config"], base["digest"], model, config, source,
                     allow_other_base)
    return install_adapter(model, config, tensors, source)


def install_adapter(model: nn.Module, config: LoRAConfig, tensors: dict, source: str) -> nn.Module:
    """Put an adapter (its LoRAConfig and {name: tensor}) into `model`: a plain model gets LoRA applied, an
    adapted one with the same targets gets its tensors replaced. Everything is checked first (shapes,
    finite tensors, finite outputs on a probe); on any error the model is unchanged. `source` names the
    adapter in error messages. Does not check which base the adapter was trained on."""
    _check_installable(model, config, tensors, source)
    _check_finite_outputs(model, config, tensors, source)
    return _install(model, config, tensors, source)


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
            tensors = {n: t.detach().clone() for n, t in adapter_tensors(model).items()}
            self._adapters["default"] = (model.lora_config, tensors)
            self.active = "default"

    @property
    def names(self) -> list[str]:
        return list(self._adapters)

    def add(self, name: str, source: str | os.PathLike | nn.Module, allow_other_base: bool = False) -> None:
        """Register an adapter from a save_adapter folder or from an adapted model (its tensors are copied).

        Like load_adapter, an adapter trained on other base weights is refused unless allow_other_base=True.
        """
        if not isinstance(name, str) or not name:
            raise LoRAError(f"Adapter names are non-empty strings, got {name!r}.")
        if name in self._adapters:
            raise LoRAError(f"An adapter named {name!r} already exists; delete it first.")
        if isinstance(source, nn.Module):
            require_lora(source)
            config, tensors = source.lora_config, adapter_tensors(source)
            digest = base_weights_digest(source, exclude=_trainable_names(source, config))
            _check_same_base(source.config.fingerprint(), source.config.to_dict(), digest, self.model, config,
                             f"Adapter {name!r}", allow_other_base or source is self.model, self._base_values)
        else:
            config, tensors, base = _read_adapter(source, self.model)
        _check_tensors(tensors, expected_shapes(self.model, config), f"Adapter {name!r}")
        if not isinstance(source, nn.Module):
            _check_same_base(base["fingerprint"], base["saved_config"], base["digest"], self.model, config,
                             f"Adapter {source}", allow_other_base, self._base_values)
        _check_finite_outputs(self.model, config, tensors, f"Adapter {name!r}")
        targets = target_linears(self.model, config.targets, config.r)
        own = set(trainable_parameters(self.model, config.trainable, targets))  # `trainable` weights, not A/B
        extra = [n for n in tensors if n in own and n not in self._base_values]
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
        unload_lora(self.model)
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

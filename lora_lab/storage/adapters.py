"""LoRA adapters as files: save_adapter, load_adapter, and the record of which base model an adapter fits.

An adapter is only the adapted layers' own tensors (A and B for plain LoRA; whatever a variant declares:
its parameters and persistent buffers) plus any `trainable` weights, saved as adapter_model.safetensors
next to adapter_config.json, which names the variant, its hyperparameters and the base model it fits.
Which tensors to expect is never typed here: it comes from the variant's layer itself.

The base is recorded from the model, whatever built it: the name, shape and dtype of every weight of the
plain model (the model without its LoRA layers) and a digest of their values. So an adapter is refused on
a model of another shape (always) and on other weights of the same shape (unless allow_other_base=True).
Adapters written before this record existed name a lora_lab GPTConfig instead (`base_fingerprint`); they
still load, checked as they were then. bank.py serves several adapters on one base.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.nn as nn

from ..digests import tensors_digest
from ..lora import (
    VARIANTS,
    AdapterMismatchError,
    LoRAConfig,
    LoRAError,
    UnknownVariantError,
    apply_lora,
    lora_layers,
    require_lora,
    variant_class,
)
from ..nf4 import quantization_record
from ..targets import target_linears, trainable_parameters
from .files import CHECKSUMS_KEY, CorruptFileError, check_output_path, nonfinite_names, read_bundle, write_bundle

ADAPTER_FORMAT = "lora_lab.adapter.v1"
WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
LEGACY_FILES = ("lora_lab_base.json",)  # the CLI of lora_lab 0.1 wrote this side file into adapter folders
DIGEST_KEY = "base_weights_sha256"
WEIGHTS_KEY = "base_weights"  # {name: {"shape": [...], "dtype": "float32"}} of the plain base model
ALLOW_OTHER_BASE_HINT = "allow_other_base=True (CLI: --allow-other-base)"
QUANT_KEY = "base_quantization"  # nf4.quantization_record of the base: what a QLoRA adapter was trained on


class UnverifiedAdapterError(AdapterMismatchError):
    """An adapter whose config lacks what would verify it (its tensor checksum or its base digest)."""


# What an adapter config may say about its base; older adapters hold only the fingerprint/config pair.
BASE_KEYS = (WEIGHTS_KEY, DIGEST_KEY, "base_class", "base_config", "base_fingerprint", QUANT_KEY)


# ----------------------------------------------------------------------------------------------
# Which base? Its weights' names, shapes and dtypes (the architecture) and a digest of their values


def base_state(model: nn.Module, overrides: dict | None = None) -> dict[str, torch.Tensor]:
    """{name: tensor} of the plain base model inside `model`, whether or not it carries LoRA layers.

    A LoRA layer (any variant) contributes only its base weights (as they were before a merge) under the
    plain layer's names; its own tensors are left out. `overrides` gives base values to use instead of the
    model's current ones ({name: tensor}, for weights an active adapter's `trainable` modules changed).
    """
    layers = lora_layers(model)
    state = {}
    for name, t in model.state_dict().items():
        if not isinstance(t, torch.Tensor):
            continue  # a module's extra state (get_extra_state) is not a weight
        for n, layer in layers.items():
            if name.startswith(f"{n}.base."):
                name = f"{n}.{name[len(n) + 6 :]}"
                if name == f"{n}.weight" and getattr(layer, "weight_before_merge", None) is not None:
                    t = layer.weight_before_merge
                state[name] = t
                break
            if name.startswith(f"{n}."):
                break  # the layer's own tensors (A, B, a DoRA magnitude, ...)
        else:
            state[name] = t
    state.update(overrides or {})
    return state


def base_weights_digest(model: nn.Module, exclude=(), overrides: dict | None = None) -> str:
    """digests.tensors_digest of base_state(model, overrides) without `exclude` (the weights the adapter
    itself replaces, its `trainable` modules, which training changes)."""
    return tensors_digest(base_state(model, overrides), exclude=exclude)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def weights_record(state: dict[str, torch.Tensor]) -> dict[str, dict]:
    return {n: {"shape": list(t.shape), "dtype": _dtype_name(t.dtype)} for n, t in state.items()}


def trainable_names(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Names of the weights `config.trainable` trains in full in `model` (left out of the base digest)."""
    return sorted(trainable_parameters(model, config.trainable, target_linears(model, config.targets, config.r)))


def _model_config(model: nn.Module) -> dict | None:
    """The model's own `config.to_dict()` if it has a JSON one (lora_lab's GPT does): shown in messages only."""
    to_dict = getattr(getattr(model, "config", None), "to_dict", None)
    try:
        config = to_dict() if callable(to_dict) else None
        json.dumps(config)
    except (TypeError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def base_record(model: nn.Module, config: LoRAConfig, overrides: dict | None = None) -> dict:
    """What an adapter of `model` records about its base (the BASE_KEYS save_adapter writes)."""
    state = base_state(model, overrides)
    record = {
        "base_class": f"{type(model).__module__}.{type(model).__qualname__}",
        WEIGHTS_KEY: weights_record(state),
        DIGEST_KEY: tensors_digest(state, exclude=trainable_names(model, config)),
    }
    model_config = _model_config(model)
    if model_config is not None:
        record["base_config"] = model_config
    quantization = quantization_record(model)  # a QLoRA base: its digest is of the 4-bit codes and scales
    if quantization is not None:
        record[QUANT_KEY] = quantization
    return record


def _listed(names: list[str], n: int = 4) -> str:
    return ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "")


def _config_difference(saved: dict | None, model: nn.Module) -> str:
    mine = _model_config(model)
    if not isinstance(saved, dict) or mine is None:
        return ""
    # dropout changes no weight: not part of the architecture
    return ", ".join(
        f"{k}: adapter {v}, model {mine.get(k)}" for k, v in saved.items() if k != "dropout" and mine.get(k) != v
    )


def _architecture_difference(theirs: dict, mine: dict) -> str:
    """'' if the two weights records have the same names and shapes; else what differs, in words."""
    parts = []
    missing, extra = sorted(set(theirs) - set(mine)), sorted(set(mine) - set(theirs))
    if missing:
        parts.append(f"this model lacks {_listed(missing)}")
    if extra:
        parts.append(f"this model has {_listed(extra)}, which the adapter's base did not")
    shapes = [
        f"{n} (adapter's base {tuple(theirs[n]['shape'])}, this model {tuple(mine[n]['shape'])})"
        for n in sorted(set(theirs) & set(mine))
        if list(theirs[n]["shape"]) != mine[n]["shape"]
    ]
    if shapes:
        parts.append(f"shapes differ: {_listed(shapes, 3)}")
    return "; ".join(parts)


def _quantization_summary(record: dict | None) -> str:
    if not record:
        return "not quantized"
    settings = sorted({(l["block_size"], l["double_quant"]) for l in record["layers"].values()})
    how = ", ".join(f"blocks of {b}{' with double quantization' if dq else ''}" for b, dq in settings)
    return f"{len(record['layers'])} layers in {record['method'].upper()} ({how})"


def _layout(record: dict | None) -> dict | None:
    if not record:
        return None
    layers = {n: {k: v for k, v in info.items() if k != "dtype"} for n, info in record["layers"].items()}
    return {**record, "layers": layers}


def unquantized_view(weights: dict, quantization: dict | None) -> dict:
    """A weights record as the model would have it unquantized: each NF4 layer's buffers become its weight."""
    out = dict(weights)
    for layer, info in (quantization or {}).get("layers", {}).items():
        for buffer in info.get("buffers", ()):
            out.pop(f"{layer}.{buffer}", None)
        out[f"{layer}.weight"] = {"shape": info["shape"], "dtype": info["dtype"]}
    return out


def check_quantization(base: dict, model: nn.Module, source: str, allow_other_base: bool) -> bool:
    """Refuse an adapter trained on a base quantized otherwise than this model (a QLoRA adapter on the
    full-precision base, a 16-bit one on a 4-bit base, other block sizes) unless allow_other_base. Returns
    whether the two differ (then allowed), so that the architecture is compared without the quantization."""
    theirs, mine = base.get(QUANT_KEY), quantization_record(model)
    if _layout(theirs) == _layout(mine):  # the dtype the layers compute in does not change their codes
        return False
    if allow_other_base:
        return True
    if theirs and not mine:
        advice = (
            "Quantize the base as it was first (nf4.quantize_base(model, ...); CLI: --qlora), or pass "
            f"{ALLOW_OTHER_BASE_HINT} to run it on the full-precision weights, which differ from the 4-bit "
            "ones it was trained on"
        )
        what = "is a QLoRA adapter: it was trained on a 4-bit base"
    elif mine and not theirs:
        advice = f"Load it into the unquantized base, or pass {ALLOW_OTHER_BASE_HINT} to run it on the 4-bit weights"
        what = "was trained on a full-precision base"
    else:
        advice = f"Quantize the base the same way, or pass {ALLOW_OTHER_BASE_HINT}"
        what = "was trained on a base quantized otherwise"
    raise AdapterMismatchError(
        f"{source} {what} ({_quantization_summary(theirs)}), and this model is {_quantization_summary(mine)}. {advice}."
    )


def check_architecture(base: dict, model: nn.Module, source: str, allow_other_base: bool = False) -> None:
    """Refuse an adapter whose base record (BASE_KEYS) describes a model of other weight names or shapes, or
    one quantized otherwise (check_quantization; with allow_other_base the shapes are compared unquantized)."""
    mine = weights_record(base_state(model))
    quantized_otherwise = check_quantization(base, model, source, allow_other_base)
    if WEIGHTS_KEY in base:
        theirs = base[WEIGHTS_KEY]
        if quantized_otherwise:
            theirs = unquantized_view(theirs, base.get(QUANT_KEY))
            mine = unquantized_view(mine, quantization_record(model))
        diff = _architecture_difference(theirs, mine)
        if diff:
            config_diff = _config_difference(base.get("base_config"), model)
            raise AdapterMismatchError(
                f"{source} was made for another base model ({base.get('base_class', 'a model')}): {diff}"
                f"{f'; config {config_diff}' if config_diff else ''}."
            )
    else:  # written before the weights record: a lora_lab GPT named by its GPTConfig's fingerprint
        fingerprint = getattr(getattr(model, "config", None), "fingerprint", None)
        if callable(fingerprint) and base.get("base_fingerprint") != fingerprint():
            diff = _config_difference(base.get("base_config"), model)
            raise AdapterMismatchError(
                f"{source} was made for another base model (fingerprint {base.get('base_fingerprint')}, this "
                f"model {fingerprint()}; {diff or 'config differs'})."
            )
        if not callable(fingerprint) and base.get(DIGEST_KEY) is None:
            raise AdapterMismatchError(
                f"{source} was saved by an older lora_lab for its own GPT and records neither the base's "
                f"weights nor their digest, so nothing shows that it fits this {type(model).__name__}."
            )


def check_weights(
    base: dict,
    model: nn.Module,
    config: LoRAConfig,
    source: str,
    allow_other_base: bool,
    overrides: dict | None = None,
) -> None:
    """Refuse an adapter whose base record's digest is not of this model's base weights (unless
    allow_other_base). `overrides`: base values of weights an active adapter's `trainable` modules changed."""
    state = base_state(model, overrides)
    mine = weights_record(state)
    digest = base.get(DIGEST_KEY)
    if digest is None or allow_other_base:  # adapters of lora_lab 0.1 recorded no digest
        return
    exclude = trainable_names(model, config)
    actual = tensors_digest(state, exclude=exclude)
    if actual == digest:
        return
    theirs = base.get(WEIGHTS_KEY, {})
    dtypes = {n: theirs[n]["dtype"] for n in theirs if n in mine and theirs[n]["dtype"] != mine[n]["dtype"]}
    rounded_too = ""
    if dtypes:
        wanted = {n: getattr(torch, d, None) for n, d in dtypes.items()}
        coarser = all(
            isinstance(d, torch.dtype)
            and d.is_floating_point
            and state[n].is_floating_point()
            and torch.finfo(d).eps > torch.finfo(state[n].dtype).eps
            for n, d in wanted.items()
        )
        if not coarser:  # this model is the coarser copy: its values cannot be compared with the digest
            first = sorted(dtypes)[0]
            raise AdapterMismatchError(
                f"{source} was trained on base weights of another dtype: {first} is {dtypes[first]} in the "
                f"adapter's base and {mine[first]['dtype']} here ({len(dtypes)} weights differ so), and the "
                "digest it records is of the weights as they were, so a rounded copy cannot be verified. Load "
                f"it into the base in {dtypes[first]} and convert the model afterwards (model.to(...)), or pass "
                f"{ALLOW_OTHER_BASE_HINT} if this is that base in another dtype."
            )
        rounded = {n: t.to(wanted[n]) if n in wanted else t for n, t in state.items()}
        if tensors_digest(rounded, exclude=exclude) == digest:
            return  # this model holds the adapter's base at a higher precision: rounded, it is that base
        rounded_too = f" (also when rounded to the adapter's {', '.join(sorted(set(dtypes.values())))})"
    raise AdapterMismatchError(
        f"{source} was trained on other base weights: same architecture, but the weights differ{rounded_too} "
        f"(adapter's base {digest[:19]}..., this model {actual[:19]}...), so it "
        "would not do what it was trained to do. Load the base it was trained on, or pass "
        f"{ALLOW_OTHER_BASE_HINT} to load it anyway."
    )


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


def importable_name(cls: type) -> str | None:
    """ "module:QualName" of a class another process can import (not one defined in __main__ or a function)."""
    module, qualname = cls.__module__, cls.__qualname__
    if module == "__main__" or "<locals>" in qualname or getattr(sys.modules.get(module), "__spec__", None) is None:
        return None
    return f"{module}:{qualname}"


def save_adapter(model: nn.Module, path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Atomically write the folder `path`: adapter_model.safetensors + adapter_config.json.

    The config records the LoRA settings, the base model (each weight's name, shape and dtype, and a digest
    of their values, so the adapter is refused on any other base), a sha256 of the tensor file, the
    variant's class ("module:QualName", when another process can import it) and `metadata` (any JSON
    object). Refused, with nothing written: non-finite tensors (a diverged fine-tune), and a `path` holding
    anything but a lora_lab adapter (see files.write_bundle).
    """
    path = check_output_path(path, "save_adapter")  # an empty path is named before any work
    layers = require_lora(model)
    tensors = adapter_tensors(model)
    bad = nonfinite_names(tensors)
    if bad:
        raise LoRAError(
            f"Refusing to save the adapter to {path}: tensors {bad[:5]} contain NaN or Inf "
            "(the fine-tune diverged; try a lower learning rate). Nothing was written."
        )
    if metadata is not None and not isinstance(metadata, dict):
        raise TypeError(f"metadata must be a JSON object (a dict), got {type(metadata).__name__}.")
    config = model.lora_config
    layer_tensors = {f"{n}.{key}" for n, layer in layers.items() for key in layer.adapter_tensors()}
    meta = {
        "format": ADAPTER_FORMAT,
        "lora_config": config.to_dict(),
        "variant": config.variant,
        "scaling": config.layer_class.scaling_rule,
        **base_record(model, config),
        "modules": [
            {
                "name": n,
                "d": l.base.out_features,
                "k": l.base.in_features,
                "r": l.r,
                **{key: list(t.shape) for key, t in l.adapter_tensors().items()},
            }
            for n, l in layers.items()
        ],
        "trainable_params": {n: list(t.shape) for n, t in tensors.items() if n not in layer_tensors},
        "metadata": metadata or {},
    }
    spec = importable_name(config.layer_class)
    if spec is not None:
        meta["variant_class"] = spec
    try:
        json.dumps(meta)
    except (TypeError, ValueError) as err:
        raise TypeError(f"metadata must be JSON-serialisable: {err}") from None
    return write_bundle(
        path,
        {WEIGHTS_FILE: tensors, CONFIG_FILE: meta},
        config_file=CONFIG_FILE,
        format_tag=ADAPTER_FORMAT,
        legacy_files=LEGACY_FILES,
    )


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


def check_tensors(tensors: dict, shapes: dict, source: str) -> None:
    """Refuse tensors that are not exactly `shapes` ({name: shape}), not floating point, or not finite."""
    missing, extra = sorted(set(shapes) - set(tensors)), sorted(set(tensors) - set(shapes))
    if missing or extra:
        raise CorruptFileError(f"{source}: missing tensors {missing[:4]}, unexpected tensors {extra[:4]}.")
    for n, t in sorted(tensors.items()):
        if not t.is_floating_point():
            raise CorruptFileError(f"{source}: tensor {n} has dtype {t.dtype}; LoRA tensors must be floating point.")
        if tuple(t.shape) != shapes[n]:
            raise AdapterMismatchError(
                f"{source}: tensor {n} has shape {tuple(t.shape)}, this model needs {shapes[n]}."
            )
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
            raise AdapterMismatchError(
                f"{source} adapts {theirs[:4]} at r={config.r}, but the model is adapted at "
                f"{sorted(layers)[:4]} with r={mine.r}: targets and rank must agree."
            )
        if (config.variant, config.options) != (mine.variant, mine.options):
            raise AdapterMismatchError(
                f"{source} is a {config.variant!r} adapter {config.options or ''}, the model "
                f"carries {mine.variant!r} {mine.options or ''}; load it into the plain base "
                "(or an AdapterBank) instead."
            )
        if set(trainable_parameters(model, config.trainable, layers)) != set(
            trainable_parameters(model, mine.trainable, layers)
        ):
            raise AdapterMismatchError(f"{source} trains modules {config.trainable}, the model {mine.trainable}.")
    check_tensors(tensors, shapes, source)


def rng_devices(model: nn.Module) -> list[int]:
    """The CUDA devices whose random state building layers for `model` must leave as it was."""
    return sorted({p.device.index or 0 for p in model.parameters() if p.is_cuda})


def _install(model: nn.Module, config: LoRAConfig, tensors: dict) -> nn.Module:
    """Put the adapter (config + tensors, checked by _check_installable and probe_layers) into the model:
    apply it to a plain model, or replace the tensors of an adapted one whose targets agree."""
    if not lora_layers(model):
        with torch.random.fork_rng(devices=rng_devices(model)):  # loading must not consume random numbers
            apply_lora(model, config)
    state = model.state_dict(keep_vars=True)  # parameters and persistent buffers, by name
    with torch.no_grad():
        for layer in lora_layers(model).values():  # an adapted model takes the adapter's alpha and dropout
            layer.alpha = float(config.alpha)
            dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
            layer.lora_dropout = dropout.train(layer.training)  # a new module would start in training mode
        for n, t in tensors.items():
            state[n].copy_(t)  # cast to the model's dtype and device
    model.lora_config = config
    return model


def build_layers(model: nn.Module, config: LoRAConfig) -> dict[str, nn.Module]:
    """{target name: a new layer of the config's variant around the model's own nn.Linear}, not attached to
    the model (which is not touched), in eval mode. Draws no random numbers from the global generators."""
    targets = target_linears(model, config.targets, config.r)
    modes = {n: lin.training for n, lin in targets.items()}
    with torch.random.fork_rng(devices=rng_devices(model)):
        layers = {n: config.layer_class.from_config(lin, config).eval() for n, lin in targets.items()}
    for n, lin in targets.items():  # eval() reached the model's own Linear too: its mode is the model's
        lin.train(modes[n])
    return layers


def fill_layers(layers: dict[str, nn.Module], tensors: dict) -> None:
    """Copy each layer's part of `tensors` (checked by check_tensors) into it, cast to its dtype and device."""
    with torch.no_grad():
        for n, layer in layers.items():
            for key, t in layer.adapter_tensors().items():
                t.copy_(tensors[f"{n}.{key}"])


def probe_layers(layers: dict[str, nn.Module], config: LoRAConfig, source: str) -> None:
    """Refuse an adapter whose layers compute NaN/Inf on a unit-scale input (e.g. alpha=1e30 in a hand-edited
    config): finite A, B and alpha can still overflow. An output whose squared norm overflows float32 counts
    too: any normalisation or softmax after the layer would turn it into NaN. Works on any model: each
    adapted layer is run on its own."""
    gen = torch.Generator().manual_seed(0)
    for n, layer in layers.items():
        w = layer.base.weight
        x = torch.randn(4, layer.base.in_features, generator=gen).to(w.device, w.dtype)
        with torch.no_grad():
            y = layer(x).float()
        if not (torch.isfinite(y).all() and torch.isfinite(y.pow(2).sum(-1)).all()):
            raise LoRAError(
                f"{source} makes the model's outputs NaN or Inf (alpha={config.alpha:g}, r={config.r}, "
                f"scale alpha/r={config.alpha / config.r:g}; first at {n}); refusing to load it. "
                "The model is unchanged."
            )


def read_adapter(path: str | os.PathLike) -> tuple[LoRAConfig, dict, dict]:
    """(LoRA config, tensors, base record: the config's BASE_KEYS) of a save_adapter folder. Checks the files
    (checksum, format, a registered variant); which base it fits is check_architecture and check_weights's."""
    path = Path(path)
    meta, files = read_bundle(path, config_file=CONFIG_FILE, tensor_files=[WEIGHTS_FILE])
    if meta.get("format") != ADAPTER_FORMAT:
        raise CorruptFileError(
            f"{path / CONFIG_FILE} is not a lora_lab adapter config (format {meta.get('format')!r})."
        )
    lora_config = meta.get("lora_config")
    variant = lora_config.get("variant", "lora") if isinstance(lora_config, dict) else None
    if isinstance(variant, str):
        try:
            variant_class(variant)  # a registered variant, or one an installed package publishes
        except UnknownVariantError:
            spec = meta.get("variant_class")
            where = (
                f" (it was saved from {spec}: `import {spec.partition(':')[0]}`)"
                if isinstance(spec, str) and ":" in spec and len(spec) < 300
                else ""
            )
            raise UnknownVariantError(
                variant,
                f"Adapter {path} uses the LoRA variant {variant!r}, which is not registered in this process. "
                f"Import the module that defines it{where}, or register_variant its class, then load again "
                f"(registered variants: {sorted(VARIANTS)}).",
            ) from None
    try:
        config = LoRAConfig.from_dict(meta["lora_config"])
        base = {k: meta[k] for k in BASE_KEYS if k in meta}
        if WEIGHTS_KEY not in base and "base_fingerprint" not in base:
            raise KeyError(WEIGHTS_KEY)
        if WEIGHTS_KEY in base:
            _check_weights_record(base[WEIGHTS_KEY])
        if QUANT_KEY in base:
            _check_quantization_record(base[QUANT_KEY])
        if not isinstance(base.get(DIGEST_KEY, ""), str):
            raise TypeError(f"{DIGEST_KEY} should be a string")
        scaling = meta["scaling"]
        if meta.get("variant", "lora") != config.variant:
            raise ValueError(f"'variant' {meta.get('variant')!r} differs from lora_config's {config.variant!r}")
    except (KeyError, TypeError, ValueError) as err:
        raise CorruptFileError(f"{path / CONFIG_FILE} is not a valid adapter config: {err!r}") from None
    rule = config.layer_class.scaling_rule
    if scaling != rule:
        raise CorruptFileError(
            f"{path / CONFIG_FILE}: unsupported scaling rule {scaling!r} for variant "
            f"{config.variant!r} (expected {rule!r})."
        )
    # What an adapter of lora_lab 0.1 lacks, and so does one whose fields were deleted: the two look the same.
    base["unchecked"] = [key for key in (CHECKSUMS_KEY, DIGEST_KEY) if key not in meta]
    return config, files[WEIGHTS_FILE], base


def _check_quantization_record(record) -> None:
    record = record if isinstance(record, dict) else {}
    if not (isinstance(record.get("method"), str) and isinstance(record.get("layers"), dict)):
        raise TypeError(f"{QUANT_KEY} should be {{'method': name, 'layers': {{...}}}}, got {record!r}"[:300])
    layers = record["layers"]
    for n, info in layers.items():
        keys = {"shape": list, "dtype": str, "block_size": int, "double_quant": bool, "buffers": list}
        if not (isinstance(info, dict) and all(isinstance(info.get(k), t) for k, t in keys.items())):
            raise ValueError(f"{QUANT_KEY} layer {n!r} should have {sorted(keys)}, got {info!r}"[:300])


def _check_weights_record(record) -> None:
    if not isinstance(record, dict):
        raise TypeError(f"{WEIGHTS_KEY} should be a JSON object")
    for n, entry in record.items():
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if not (
            isinstance(shape, list)
            and all(type(s) is int and s >= 0 for s in shape)
            and isinstance(entry.get("dtype"), str)
        ):
            raise ValueError(f"{WEIGHTS_KEY}[{n!r}] should be {{'shape': [ints], 'dtype': name}}, got {entry!r}")


_UNCHECKED = {
    CHECKSUMS_KEY: f"{CHECKSUMS_KEY!r} (so changes to {WEIGHTS_FILE} go unnoticed)",
    DIGEST_KEY: f"{DIGEST_KEY!r} (so nothing shows that it was trained on this model's weights)",
}


def check_verified(base: dict, source: str, allow_other_base: bool, allow_unverified: bool) -> None:
    """Refuse an adapter whose config lacks its checksums or its base digest, unless allow_unverified (a
    missing digest is no loss with allow_other_base, which skips that check anyway)."""
    unchecked = [k for k in base.get("unchecked", ()) if not (k == DIGEST_KEY and allow_other_base)]
    if unchecked and not allow_unverified:
        missing = " and no ".join(_UNCHECKED[k] for k in unchecked)
        raise UnverifiedAdapterError(
            f"{source} is unverified: its {CONFIG_FILE} records no {missing}. "
            "Adapters saved by lora_lab 0.1 look like this, and so does one whose fields were deleted. Pass "
            "allow_unverified=True to load it without those checks."
        )


def load_adapter(
    model: nn.Module, path: str | os.PathLike, allow_other_base: bool = False, allow_unverified: bool = False
) -> nn.Module:
    """Load a save_adapter folder into `model` (plain: LoRA is applied first; adapted: tensors replaced).

    Refused, with the model unchanged: an adapter for another architecture, one trained on other base
    weights (unless allow_other_base=True), damaged files (checksum), one whose outputs are not finite, and
    an unverified one, whose config records no checksums or no base digest (unless allow_unverified=True).
    """
    source = f"Adapter {path}"
    config, tensors, base = read_adapter(path)
    check_verified(base, source, allow_other_base, allow_unverified)
    check_architecture(base, model, source, allow_other_base)  # first: an adapter for another model is named as such
    _check_installable(model, config, tensors, source)
    check_weights(base, model, config, source, allow_other_base)
    return _probe_and_install(model, config, tensors, source)


def install_adapter(model: nn.Module, config: LoRAConfig, tensors: dict, source: str) -> nn.Module:
    """Put an adapter (its LoRAConfig and {name: tensor}) into `model`: a plain model gets LoRA applied, an
    adapted one with the same targets gets its tensors replaced. Everything is checked first (shapes,
    finite tensors, finite outputs on a probe); on any error the model is unchanged. `source` names the
    adapter in error messages. Does not check which base the adapter was trained on."""
    _check_installable(model, config, tensors, source)
    return _probe_and_install(model, config, tensors, source)


def _probe_and_install(model: nn.Module, config: LoRAConfig, tensors: dict, source: str) -> nn.Module:
    layers = build_layers(model, config)
    fill_layers(layers, tensors)
    probe_layers(layers, config, source)
    return _install(model, config, tensors)

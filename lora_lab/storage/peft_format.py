"""Move LoRA adapters between lora_lab and Hugging Face PEFT (https://github.com/huggingface/peft).

PEFT's on-disk LoRA adapter is a folder with
  adapter_model.safetensors  keys "base_model.model.<module>.lora_A.weight" (r, k) and ".lora_B.weight" (d, r);
                             modules_to_save weights under "base_model.model.<module>.<param>"
  adapter_config.json        {"peft_type": "LORA", "r", "lora_alpha", "target_modules", "lora_dropout", ...}
PEFT scales the update by lora_alpha / r, like lora_lab, so A and B move across unchanged. Each variant
declares its own mapping (LoRALinear.peft_flags / peft_names / to_peft): rslora is PEFT's use_rslora,
dora its use_dora (+ "lora_magnitude_vector"), pissa exports as the equivalent plain LoRA of rank 2r,
and a variant PEFT cannot express (vera) is refused with its reason.
Reading and writing the files needs no PEFT install; only `require_peft` (used to build PEFT models) does.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch.nn as nn

from ..lora import VARIANTS, LoRAConfig, LoRAError, require_lora
from ..targets import tied_parameters, trainable_parameters
from .adapters import install_adapter
from .files import CorruptFileError, check_output_path, nonfinite_names, read_json, read_tensors, write_bundle

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
PREFIX = "base_model.model."  # PeftModel -> LoraModel -> our GPT

# PEFT options that change what LoRA computes; lora_lab implements only their defaults (falsy or "none"),
# apart from use_rslora and use_dora, which select a variant.
_UNSUPPORTED = {
    "rank_pattern": {},
    "alpha_pattern": {},
    "bias": "none",
    "fan_in_fan_out": False,
    "lora_bias": False,
    "trainable_token_indices": None,
    "target_parameters": None,
    "layer_replication": None,
    "use_qalora": False,
    "alora_invocation_tokens": None,
}
_EXPORTED_DEFAULTS = ("rank_pattern", "alpha_pattern", "bias", "fan_in_fan_out")


def require_peft():
    """Import peft, or say how to get it: it is an optional dependency of lora_lab."""
    try:
        import peft
    except ImportError:
        raise ImportError(
            "This needs the optional package 'peft': pip install 'lora-lab[peft]' (or pip install peft)."
        ) from None
    return peft


def _trainable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules trained in full (config.trainable) as PEFT's modules_to_save; tied weights cannot go there."""
    config, layers = model.lora_config, require_lora(model)
    params = trainable_parameters(model, config.trainable, layers)
    tied = {name for names in tied_parameters(model).values() for name in names}
    if tied & set(params):
        raise LoRAError(
            "PEFT's modules_to_save copies a module and unties its weight, so a trainable tied "
            "embedding (tok_emb / lm_head) cannot be exported to PEFT."
        )
    return {n.rpartition(".")[0]: model.get_submodule(n.rpartition(".")[0]) for n in params}


def export_peft(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the model's LoRA adapter in PEFT's format; PeftModel.from_pretrained(base_gpt, path) loads it.

    `path` may be missing, an empty folder or a PEFT LoRA adapter folder holding only these two files;
    anything else is refused (files.OutputExistsError) and left untouched. Non-finite tensors are refused.
    """
    path = check_output_path(path, "export_peft")  # an empty path is named as export_peft's, before any work
    layers = require_lora(model)
    config = model.lora_config
    flags = config.layer_class.peft_flags
    if flags is None:
        raise LoRAError(f"Variant {config.variant!r} cannot be exported to PEFT: {config.layer_class.peft_refusal}")
    to_save = _trainable_modules(model)
    modules = [n for n, _ in model.named_modules()]
    for name in to_save:  # PEFT picks modules_to_save by plain suffix match: make sure ours are unambiguous
        if sum(m.endswith(name) for m in modules) > 1:
            raise LoRAError(f"trainable module {name!r} is a suffix of other module names; PEFT would match those too.")
    tensors = {}
    for n, layer in layers.items():
        peft_r, peft_alpha, own = layer.to_peft()  # e.g. {"lora_A.weight": A (r, k), "lora_B.weight": B (d, r)}
        d, k = layer.base.out_features, layer.base.in_features
        if peft_r > min(d, k):  # PiSSA exports at rank 2r: such a file could not be imported back
            raise LoRAError(
                f"Variant {config.variant!r} at r={config.r} exports to PEFT as LoRA of rank {peft_r}, more than "
                f"min(d, k) = {min(d, k)} of {n}; lora_lab could not import that back. Use a rank of at most "
                f"{min(d, k) * config.r // peft_r}. Nothing was written."
            )
        tensors.update({f"{PREFIX}{n}.{key}": t for key, t in own.items()})
    for n, module in to_save.items():
        tensors.update({f"{PREFIX}{n}.{p}": t for p, t in module.named_parameters()})
    bad = nonfinite_names(tensors)
    if bad:
        raise LoRAError(f"Refusing to export to {path}: tensors {bad[:5]} contain NaN or Inf. Nothing was written.")
    peft_config = {
        "peft_type": "LORA",
        "task_type": None,
        "r": peft_r,
        "lora_alpha": peft_alpha,
        "lora_dropout": config.dropout,
        "target_modules": sorted(layers),  # full names: PEFT matches them exactly
        "modules_to_save": sorted(to_save) or None,
        "init_lora_weights": True if config.init == "kaiming" else "gaussian",
        "inference_mode": True,
        "base_model_name_or_path": None,
        "revision": None,
        **flags,
        **{k: _UNSUPPORTED[k] for k in _EXPORTED_DEFAULTS},
    }
    # PEFT's own layout, recognised by peft_type: only a PEFT LoRA folder with just these files is replaced.
    # No checksum is added: the config must stay exactly what PEFT reads.
    return write_bundle(
        path,
        {PEFT_WEIGHTS: tensors, PEFT_CONFIG: peft_config},
        config_file=PEFT_CONFIG,
        format_key="peft_type",
        format_tag="LORA",
        checksums=False,
    )


def import_peft(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a PEFT LoRA adapter (get_peft_model(gpt, ...).save_pretrained(path)) into a lora_lab GPT.

    Like load_adapter: a plain model gets LoRA applied first, an adapted one gets its tensors replaced;
    on any error the model is unchanged.
    """
    if isinstance(path, (str, os.PathLike)) and os.fspath(path) == "":  # Path("") would read the working directory
        raise ValueError("import_peft: the path is empty (''); name the PEFT adapter folder to read.")
    path = Path(path)
    if not (path / PEFT_WEIGHTS).is_file() and (path / "adapter_model.bin").is_file():
        raise CorruptFileError(
            f"{path} holds a pickled adapter_model.bin; lora_lab reads only safetensors "
            "(save with save_pretrained(..., safe_serialization=True))."
        )
    cfg = read_json(path / PEFT_CONFIG)
    if cfg.get("peft_type") != "LORA":
        raise CorruptFileError(f"{path / PEFT_CONFIG} is not a PEFT LoRA config (peft_type {cfg.get('peft_type')!r}).")
    odd = {k: cfg[k] for k, default in _UNSUPPORTED.items() if cfg.get(k) and cfg[k] != default}
    if odd:
        raise LoRAError(f"{path}: PEFT options lora_lab does not implement: {odd}.")
    flags = {k: cfg.get(k) or False for k in ("use_rslora", "use_dora")}  # absent or null: PEFT's default
    wrong = {k: v for k, v in flags.items() if not isinstance(v, bool)}
    if wrong:
        raise CorruptFileError(f"{path / PEFT_CONFIG}: {wrong} should be true or false (JSON booleans).")
    init = cfg.get("init_lora_weights", True)
    if init not in (True, False, "gaussian"):  # others (pissa, olora, loftq, ...) change the base weights too
        raise LoRAError(
            f"{path}: PEFT adapters made with init_lora_weights={init!r} are not plain LoRA on the original "
            "weights, and lora_lab cannot import them (convert them to plain LoRA in PEFT first)."
        )
    matching = [name for name, cls in VARIANTS.items() if cls.peft_flags == flags]  # lora, rslora or dora
    if not matching:
        raise LoRAError(f"{path}: no lora_lab variant is PEFT's LoRA with {flags} (rsLoRA and DoRA together).")
    variant = matching[0]
    ours = {suffix: mine for mine, suffix in VARIANTS[variant].peft_names.items()}  # PEFT suffix -> our name
    raw = read_tensors(path / PEFT_WEIGHTS)
    tensors, targets, trainable = {}, [], []
    for key, t in raw.items():
        if not key.startswith(PREFIX):
            raise CorruptFileError(f"{path / PEFT_WEIGHTS}: unexpected tensor {key!r} (expected prefix {PREFIX!r}).")
        name = key[len(PREFIX) :]
        for suffix, mine in ours.items():
            if name.endswith(f".{suffix}"):
                module = name[: -len(f".{suffix}")]
                tensors[f"{module}.{mine}"] = t
                targets.append(module)
                break
        else:
            tensors[name] = t  # a modules_to_save parameter, e.g. "ln_f.weight"
            trainable.append(name.rpartition(".")[0])
    try:
        config = LoRAConfig(
            r=cfg["r"],
            alpha=cfg["lora_alpha"],
            dropout=cfg.get("lora_dropout", 0.0) or 0.0,
            targets=tuple(sorted(set(targets))),
            trainable=tuple(sorted(set(trainable))),
            init="kaiming" if init is True else "gaussian",
            variant=variant,
        )
    except (KeyError, TypeError, ValueError) as err:
        raise CorruptFileError(f"{path / PEFT_CONFIG} is not a usable LoRA config: {err!r}") from None
    tied = {name for names in tied_parameters(model).values() for name in names}
    if tied & set(tensors):
        raise LoRAError(
            f"{path} retrains {sorted(tied & set(tensors))}, a weight tied to another module here; "
            "PEFT unties it, lora_lab's GPT cannot."
        )
    return install_adapter(model, config, tensors, f"PEFT adapter {path}")

"""The pretrained base GPT, trained once and cached.

The first call trains the base on the source domain (see `tasks.source_domain`) with a progress bar;
later calls load it from the cache folder. The cache key hashes the model config, the training
config and the training text, so changing any of them never loads a stale model.
Cache folder: $LORA_LAB_CACHE, else the user's cache directory (~/.cache/lora_lab on Linux).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .. import tasks
from ..data import CharDataset, CharTokenizer, load_splits
from ..digests import json_digest, text_digest
from ..distributed import data_parallel
from ..model import GPT, GPTConfig
from ..nf4 import quantize_like
from ..storage.adapters import LEGACY_FILES, QUANT_KEY, load_adapter, read_adapter, read_adapter_metadata
from ..storage.checkpoint import (
    CheckpointMismatchError,
    UnverifiedCheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from ..storage.files import CorruptFileError, bundle_exists, read_json
from ..tensorboard_logs import log_recorded_run
from ..train import TrainConfig, learning_rate_at, train

CACHE_ENV = "LORA_LAB_CACHE"

# Named sizes. "tiny" is nanoGPT's CPU shakespeare-char config, meant for a CPU;
# "small" is the paper-scale 10.65M model (6 layers, 6 heads, 384 dims) meant for a GPU. Both keep the weights
# of their best validation evaluation (keep_best), as nanoGPT keeps its best checkpoint: the small model
# overfits this text well before its last step, and its last weights are far worse than its best.
PRESETS: dict[str, tuple[GPTConfig, TrainConfig]] = {
    "tiny": (
        GPTConfig(block_size=64, n_layer=4, n_head=4, n_embd=128, dropout=0.0),
        TrainConfig(max_iters=2000, batch_size=12, learning_rate=1e-3, min_lr=1e-4, warmup_iters=100, keep_best=True),
    ),
    "small": (
        GPTConfig(block_size=256, n_layer=6, n_head=6, n_embd=384, dropout=0.2),
        TrainConfig(
            max_iters=5000,
            batch_size=64,
            learning_rate=1e-3,
            min_lr=1e-4,
            warmup_iters=100,
            eval_interval=250,
            keep_best=True,
        ),
    ),
}


LEGACY_BASE_RECORD = LEGACY_FILES[0]  # lora_lab 0.1's CLI wrote the base record next to the adapter; still read


def pretrain_config(preset: str = "tiny", iters: int | None = None) -> TrainConfig:
    """The preset's pretraining config, or with iters a quick, rough one of that many steps (for tests and demos):
    the warmup, evaluation interval and evaluation batches shrink with it, so a short run still evaluates."""
    if preset not in PRESETS:
        raise ValueError(f"Unknown preset {preset!r}; choose one of {sorted(PRESETS)}.")
    config = PRESETS[preset][1]
    if iters is None:
        return config
    if isinstance(iters, bool) or not isinstance(iters, int) or iters <= 0:
        raise ValueError(f"pretrain iters must be a positive integer, got {iters!r}.")
    return replace(
        config,
        max_iters=iters,
        warmup_iters=min(config.warmup_iters, iters // 10),
        eval_interval=min(config.eval_interval, iters),
        eval_iters=min(config.eval_iters, max(1, iters // 10)),
    )


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    if override is not None:
        return Path(override).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lora_lab"


@dataclass
class Pretrained:
    model: GPT
    dataset: CharDataset  # source-domain train/validation tokens and the tokenizer
    texts: dict[str, str]  # all dataset splits as text, for building tasks
    history: dict  # the TrainResult of pretraining, as a dict
    path: Path  # the cached checkpoint folder
    from_cache: bool


def cache_key(
    model_config: GPTConfig, train_config: TrainConfig, train_text: str, vocab: list[str], world_size: int = 1
) -> str:
    # The device is left out: where training ran does not change what was trained for. The number of
    # data-parallel processes is in (when above 1): it multiplies the batch, so it is another training run.
    payload = {
        "model": model_config.to_dict(),
        "train": {k: v for k, v in train_config.to_dict().items() if k != "device"},
        "vocab": "".join(vocab),
        "text_sha256": text_digest(train_text),
    }
    if world_size > 1:
        payload["world_size"] = world_size
    return json_digest(payload, 20)


def _load_cached(path: Path, model_config: GPTConfig) -> tuple[GPT, dict]:
    """Load a cache entry; a damaged one gets an error that names the folder and how to recover."""
    try:
        return load_checkpoint(path, expected_config=model_config)
    except UnverifiedCheckpointError:  # lora_lab's own folder, from before checksums: trained again, never trusted
        raise CorruptFileError(
            f"The cached base model in {path} is unverified: its config records no checksum of its weights (saved "
            f"before lora_lab recorded them, or edited). Train it again with retrain=True (CLI: --retrain), which "
            f"replaces that folder, or delete the folder {path}."
        ) from None
    except (CorruptFileError, CheckpointMismatchError, FileNotFoundError) as err:
        raise CorruptFileError(
            f"The cached base model in {path} is damaged: {err} To recover, train it again with "
            f"retrain=True (CLI: --retrain), which replaces that folder, or delete the folder {path}."
        ) from None


def pretrained_base(
    preset: str = "tiny",
    *,
    model_config: GPTConfig | None = None,
    train_config: TrainConfig | None = None,
    data_source: str | os.PathLike | None = None,
    cache: str | os.PathLike | None = None,
    device: str | None = None,
    progress: bool = True,
    retrain: bool = False,
) -> Pretrained:
    """Load the cached base GPT for `preset` (or explicit configs), training it first if needed.
    With train_config.log_dir, training logs to TensorBoard; a cached base writes its recorded history there."""
    if preset not in PRESETS:
        raise ValueError(f"Unknown preset {preset!r}; choose one of {sorted(PRESETS)}.")
    preset_model, preset_train = PRESETS[preset]
    train_config = train_config or preset_train
    if device is not None:
        train_config = replace(train_config, device=device)
    texts = load_splits(data_source)
    source = tasks.source_domain(texts)
    tokenizer = CharTokenizer.from_text("".join(texts.values()))
    dataset = CharDataset.from_texts(source, tokenizer)
    model_config = replace(model_config or preset_model, vocab_size=tokenizer.vocab_size)

    run = data_parallel()  # under torchrun: every rank trains, rank 0 alone writes the cache entry
    world_size = run.world_size if run else 1
    path = (
        cache_dir(cache) / f"base-{cache_key(model_config, train_config, source['train'], tokenizer.chars, world_size)}"
    )
    if bundle_exists(path) and not retrain:  # also while a save without renameat2 has the entry moved aside
        model, meta = _load_cached(path, model_config)
        history = meta.get("history", {})
        if train_config.log_dir is not None:  # TensorBoard: the cached base's recorded history, once per folder
            rates = [learning_rate_at(i, train_config) for i in range(train_config.max_iters)]
            note = "Loaded from lora_lab's base cache, not trained again: no gradient norms were recorded."
            log_recorded_run(train_config.log_dir, rates, history.get("evals", []), history.get("losses"), note)
        return Pretrained(model, dataset, texts, history, path, from_cache=True)

    torch.manual_seed(train_config.seed)
    model = GPT(model_config)
    result = train(
        model, dataset.splits["train"], dataset.splits["validation"], train_config, progress, desc="pretraining base"
    )
    meta = {"history": result.to_dict(), "train_config": train_config.to_dict(), "vocab": "".join(tokenizer.chars)}
    if run is None or run.is_main:
        save_checkpoint(model.cpu(), path, metadata=meta, replace_damaged=True)  # only ever a cache folder of ours
    if run is not None:
        torch.distributed.barrier()  # no rank returns before the entry exists
    return Pretrained(model, dataset, texts, result.to_dict(), path, from_cache=False)


# ----------------------------------------------------------------------------------------------
# Which base an adapter belongs to


def base_provenance(base: Pretrained, preset: str, pretrain_iters: int | None = None) -> dict:
    """How to get `base` again: its preset, quick-pretrain steps (None: the preset's), cached checkpoint and
    vocabulary. Stored in an adapter's or a checkpoint's metadata as "base"."""
    return {
        "preset": preset,
        "pretrain_iters": pretrain_iters,
        "checkpoint": str(base.path.resolve()),
        "vocab": "".join(base.dataset.tokenizer.chars),
    }


def adapter_provenance(adapter: str | os.PathLike) -> dict:
    """The base record of an adapter folder: its metadata's "base", else lora_lab 0.1's side file, else {}.

    The record comes from a file, so it is checked before anything acts on it: a preset lora_lab knows, a
    pretrain_iters of None or a positive integer no larger than the preset's own steps, text fields as text.
    Raises CorruptFileError naming the field otherwise."""
    adapter = Path(adapter)
    record = read_adapter_metadata(adapter).get("base")
    if not isinstance(record, dict):
        legacy = adapter / LEGACY_BASE_RECORD
        if not legacy.is_file():
            return {}
        old = read_json(legacy)
        record = {
            "preset": old.get("preset"),
            "pretrain_iters": old.get("pretrain_iters"),
            "checkpoint": old.get("base_checkpoint"),
            "vocab": old.get("vocab"),
        }
    where = f"{adapter}: the base record (metadata 'base')"
    preset, iters = record.get("preset"), record.get("pretrain_iters")
    if preset is not None and preset not in PRESETS:
        raise CorruptFileError(f"{where} names preset {preset!r}; lora_lab knows {sorted(PRESETS)}.")
    limit = PRESETS[preset or "tiny"][1].max_iters
    if iters is not None and (isinstance(iters, bool) or not isinstance(iters, int) or not 0 < iters <= limit):
        raise CorruptFileError(f"{where} has pretrain_iters {iters!r}; expected null or an integer 1..{limit}.")
    for name in ("checkpoint", "vocab"):
        if record.get(name) is not None and not isinstance(record[name], str):
            raise CorruptFileError(f"{where} has a {name} of type {type(record[name]).__name__}; expected text.")
    return record


def load_adapted(
    adapter: str | os.PathLike,
    *,
    preset: str | None = None,
    pretrain_iters: int | None = None,
    data_source: str | os.PathLike | None = None,
    cache: str | os.PathLike | None = None,
    device: str | None = None,
    progress: bool = True,
    allow_other_base: bool = False,
    allow_unverified: bool = False,
) -> tuple[GPT, CharTokenizer, dict]:
    """(the base with the adapter loaded, its tokenizer, the adapter's base record).

    The base is the record's cached checkpoint when it is still there; else it is got again with
    pretrained_base from the record's preset and pretrain_iters (preset / pretrain_iters here fill in what the
    record leaves out). load_adapter then refuses an adapter trained on other weights unless allow_other_base, and
    an unverified one (no checksums or base digest) unless allow_unverified, which also lets the recorded base
    checkpoint load if it is unverified (no checksum). A QLoRA adapter's base is quantized as its record says
    (nf4.quantize_like) before the adapter is loaded; with allow_other_base it runs on the full-precision base."""
    record = adapter_provenance(adapter)
    path = record.get("checkpoint")
    if path and bundle_exists(path) and record.get("vocab"):  # not is_dir(): a fallback swap may be mid-way
        model, _ = load_checkpoint(path, allow_unverified=allow_unverified)
        tokenizer = CharTokenizer(record["vocab"])
    else:  # the cached base is gone, or the adapter was saved outside the CLI: get the base again
        preset = record.get("preset") or preset or "tiny"
        iters = record.get("pretrain_iters") or pretrain_iters
        base = pretrained_base(
            preset,
            train_config=pretrain_config(preset, iters) if iters else None,
            data_source=data_source,
            cache=cache,
            device=device,
            progress=progress,
        )
        model, tokenizer = base.model, base.dataset.tokenizer
        if record.get("vocab") and "".join(tokenizer.chars) != record["vocab"]:
            raise ValueError(f"Adapter {adapter} was trained with another vocabulary than this data's.")
    quantized = read_adapter(adapter)[2].get(QUANT_KEY)
    if quantized is not None and not allow_other_base:  # a QLoRA adapter: quantize the base as it was
        quantize_like(model, quantized)
    load_adapter(model, adapter, allow_other_base=allow_other_base, allow_unverified=allow_unverified)
    return model, tokenizer, record

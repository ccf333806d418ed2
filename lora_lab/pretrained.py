"""The pretrained base GPT, trained once and cached.

The first call trains the base on the source domain (see `tasks.source_domain`) with a progress bar;
later calls load it from the cache folder. The cache key hashes the model config, the training
config and the training text, so changing any of them never loads a stale model.
Cache folder: $LORA_LAB_CACHE, else the user's cache directory (~/.cache/lora_lab on Linux).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from . import tasks
from .checkpoint import CheckpointMismatchError, load_checkpoint, save_checkpoint
from .files import CorruptFileError
from .data import CharDataset, CharTokenizer, load_splits
from .distributed import data_parallel
from .model import GPT, GPTConfig
from .train import TrainConfig, train

CACHE_ENV = "LORA_LAB_CACHE"

# Named sizes. "tiny" is nanoGPT's CPU shakespeare-char config and trains in ~1-2 minutes on 2 cores;
# "small" is the paper-scale 10.65M model (6 layers, 6 heads, 384 dims) meant for a GPU. Both keep the weights
# of their best validation evaluation (keep_best), as nanoGPT keeps its best checkpoint: the small model
# overfits this text after ~1500 steps, and its last weights are far worse than its best.
PRESETS: dict[str, tuple[GPTConfig, TrainConfig]] = {
    "tiny": (
        GPTConfig(block_size=64, n_layer=4, n_head=4, n_embd=128, dropout=0.0),
        TrainConfig(max_iters=2000, batch_size=12, learning_rate=1e-3, min_lr=1e-4, warmup_iters=100, keep_best=True),
    ),
    "small": (
        GPTConfig(block_size=256, n_layer=6, n_head=6, n_embd=384, dropout=0.2),
        TrainConfig(max_iters=5000, batch_size=64, learning_rate=1e-3, min_lr=1e-4, warmup_iters=100, eval_interval=250,
                    keep_best=True),
    ),
}


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


def cache_key(model_config: GPTConfig, train_config: TrainConfig, train_text: str, vocab: list[str],
              world_size: int = 1) -> str:
    # The device is left out: where training ran does not change what was trained for. The number of
    # data-parallel processes is in (when above 1): it multiplies the batch, so it is another training run.
    payload = {
        "model": model_config.to_dict(),
        "train": {k: v for k, v in train_config.to_dict().items() if k != "device"},
        "vocab": "".join(vocab),
        "text_sha256": hashlib.sha256(train_text.encode()).hexdigest(),
    }
    if world_size > 1:
        payload["world_size"] = world_size
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def _load_cached(path: Path, model_config: GPTConfig) -> tuple[GPT, dict]:
    """Load a cache entry; a damaged one gets an error that names the folder and how to recover."""
    try:
        return load_checkpoint(path, expected_config=model_config)
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
    """Load the cached base GPT for `preset` (or explicit configs), training it first if needed."""
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
    path = cache_dir(cache) / f"base-{cache_key(model_config, train_config, source['train'], tokenizer.chars, world_size)}"
    if path.exists() and not retrain:
        model, meta = _load_cached(path, model_config)
        return Pretrained(model, dataset, texts, meta.get("history", {}), path, from_cache=True)

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

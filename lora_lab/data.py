"""Tiny-shakespeare through Hugging Face `datasets`, a character tokenizer, and seeded batches.

Where the text comes from, first match wins:
  1. the `source` argument of `load_splits`,
  2. the environment variable LORA_LAB_DATA,
  3. the hub id `karpathy/tiny_shakespeare`.
A local source is a folder in the hub's parquet layout or a plain text file. A plain text file is cut
into the dataset's own 90/5/5 character splits, so both kinds of local copy give the same splits.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

HUB_ID = "karpathy/tiny_shakespeare"
DATA_ENV = "LORA_LAB_DATA"
SPLITS = ("train", "validation", "test")


class DataUnavailableError(RuntimeError):
    """Neither the hub nor a local copy of the dataset could be read."""


def resolve_source(source: str | os.PathLike | None = None) -> str:
    """The dataset location that `load_splits` will read: argument, then $LORA_LAB_DATA, then the hub id."""
    if source is not None:
        return str(source)
    return os.environ.get(DATA_ENV) or HUB_ID


def _split_plain_text(text: str) -> dict[str, str]:
    # The hub dataset cuts input.txt at 90% and 95% of its characters.
    n = len(text)
    a, b = int(n * 0.9), int(n * 0.95)
    return {"train": text[:a], "validation": text[a:b], "test": text[b:]}


def load_splits(source: str | os.PathLike | None = None) -> dict[str, str]:
    """Return {"train", "validation", "test"} -> text, loaded with `datasets.load_dataset`."""
    import datasets  # imported here: it is slow to import and only this function needs it

    where = resolve_source(source)
    path = Path(where).expanduser()
    local = path.exists()
    looks_like_path = path.is_absolute() or where.startswith((".", "~")) or where.count("/") != 1
    if not local and looks_like_path:
        raise DataUnavailableError(
            f"Local dataset path {where!r} does not exist. Point {DATA_ENV} (or the `source` argument) at a "
            "folder in the hub's parquet layout or at tiny-shakespeare's input.txt."
        )
    # datasets prints progress bars and notes while it builds its cache; keep notebooks' output stable.
    bars_were_on = datasets.is_progress_bar_enabled()
    verbosity = datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    hub_logger = logging.getLogger("huggingface_hub.repocard")  # warns about the local README's header
    hub_level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)
    try:
        if local and path.is_file():
            ds = datasets.load_dataset("text", data_files=str(path), sample_by="document")
            return _split_plain_text(ds["train"][0]["text"])
        ds = datasets.load_dataset(str(path) if local else where)
    except Exception as err:  # datasets raises many kinds of errors when offline or on bad files
        raise DataUnavailableError(
            f"Could not load the tiny-shakespeare dataset from {where!r} ({type(err).__name__}: {err}). "
            f"Without access to the Hugging Face Hub, set {DATA_ENV}=/path/to/tiny_shakespeare (a folder in "
            "the hub's parquet layout, or input.txt), or pass `source=` explicitly."
        ) from err
    finally:
        datasets.logging.set_verbosity(verbosity)
        hub_logger.setLevel(hub_level)
        if bars_were_on:
            datasets.enable_progress_bars()
    missing = [s for s in SPLITS if s not in ds]
    if missing:
        raise DataUnavailableError(f"Dataset at {where!r} has no split(s) {missing}; found {list(ds)}.")
    return {s: "".join(ds[s]["text"]) for s in SPLITS}


class CharTokenizer:
    """One token per character; the vocabulary is the sorted set of characters of a corpus."""

    def __init__(self, chars: str | list[str]):
        self.chars = sorted(set(chars))
        self.stoi = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls(text)

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError as err:
            raise ValueError(
                f"Character {err.args[0]!r} is not in the tokenizer's vocabulary of {self.vocab_size} characters."
            ) from None

    def decode(self, ids) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        try:
            return "".join(self.chars[i] for i in ids)
        except (IndexError, TypeError):
            raise ValueError(f"Token ids must be integers in [0, {self.vocab_size}).") from None


@dataclass
class CharDataset:
    """Encoded splits plus the tokenizer that made them."""

    tokenizer: CharTokenizer
    splits: dict[str, torch.Tensor]  # split name -> (n_chars,) int64

    @classmethod
    def from_texts(cls, texts: dict[str, str], tokenizer: CharTokenizer | None = None) -> "CharDataset":
        # The vocabulary comes from all splits, so validation text never holds an unknown character.
        tokenizer = tokenizer or CharTokenizer.from_text("".join(texts.values()))
        splits = {k: torch.tensor(tokenizer.encode(v), dtype=torch.long) for k, v in texts.items()}
        return cls(tokenizer, splits)

    @classmethod
    def load(cls, source: str | os.PathLike | None = None) -> "CharDataset":
        return cls.from_texts(load_splits(source))


def get_batch(data: torch.Tensor, batch_size: int, block_size: int, generator: torch.Generator | None = None):
    """Random (x, y) windows from a 1-D token tensor; y is x shifted by one. Seeded by `generator`."""
    if batch_size <= 0 or block_size <= 0:
        raise ValueError(f"batch_size and block_size must be positive, got {batch_size} and {block_size}.")
    if len(data) <= block_size:
        raise ValueError(f"Need more than block_size={block_size} tokens, the data has {len(data)}.")
    ix = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
    offsets = torch.arange(block_size)
    x = data[ix[:, None] + offsets]  # (B, T)
    y = data[ix[:, None] + offsets + 1]  # (B, T)
    return x, y

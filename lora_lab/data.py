"""Tiny-shakespeare through Hugging Face `datasets`, a character tokenizer, and seeded batches.

Where the text comes from, first match wins:
  1. the `source` argument of `load_splits`,
  2. the environment variable LORA_LAB_DATA,
  3. the hub id `karpathy/tiny_shakespeare`.
A local source is a folder in the hub's parquet layout or a plain text file. A plain text file is cut
into the dataset's own 90/5/5 character splits, so both kinds of local copy give the same splits.
Before asking the hub, one quiet TCP connection (3 s at most) checks that it can be reached, so an
offline machine gets the error and the LORA_LAB_DATA hint at once instead of after the hub client's
retries. The libraries' offline switches (HF_HUB_OFFLINE=1, HF_DATASETS_OFFLINE=1) skip that check.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import torch

HUB_ID = "karpathy/tiny_shakespeare"
DATA_ENV = "LORA_LAB_DATA"
SPLITS = ("train", "validation", "test")
HUB_CHECK_TIMEOUT = 3.0  # seconds for the one reachability check before the hub is asked for data


class DataUnavailableError(RuntimeError):
    """Neither the hub nor a local copy of the dataset could be read."""


def resolve_source(source: str | os.PathLike | None = None) -> str:
    """The dataset location that `load_splits` will read: argument, then $LORA_LAB_DATA, then the hub id."""
    if source is not None:
        return str(source)
    return os.environ.get(DATA_ENV) or HUB_ID


def _hub_offline() -> bool:
    """True when the user switched the hub clients to offline mode (they then read only their own cache)."""
    import datasets.config
    import huggingface_hub.constants

    switches = (
        getattr(datasets.config, "HF_HUB_OFFLINE", False),
        getattr(datasets.config, "HF_DATASETS_OFFLINE", False),
        getattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False),
    )  # names differ across versions
    return any(switches)


def _hub_unreachable(timeout: float = HUB_CHECK_TIMEOUT) -> str | None:
    """Why the hub (or the HTTPS proxy in front of it) cannot be reached, or None if a connection opens."""
    import huggingface_hub.constants

    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    url = urlsplit(proxy or huggingface_hub.constants.ENDPOINT)
    host, port = url.hostname, url.port or (80 if url.scheme == "http" else 443)
    if not host:
        return f"cannot tell which host to connect to from {proxy or huggingface_hub.constants.ENDPOINT!r}"
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as err:
        return f"no connection to {host}:{port} within {timeout:g} s ({type(err).__name__}: {err})"


def _split_plain_text(text: str) -> dict[str, str]:
    # The hub dataset cuts input.txt at 90% and 95% of its characters.
    n = len(text)
    a, b = int(n * 0.9), int(n * 0.95)
    return {"train": text[:a], "validation": text[a:b], "test": text[b:]}


def load_splits(source: str | os.PathLike | None = None) -> dict[str, str]:
    """Return {"train", "validation", "test"} -> text, loaded with `datasets.load_dataset`."""
    import datasets  # imported here: it is slow to import and only this function needs it

    if source is not None and not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"source must be a path or a hub id (str), got {type(source).__name__}.")
    where = resolve_source(source)
    path = Path(where).expanduser()
    local = path.exists()
    looks_like_path = path.is_absolute() or where.startswith((".", "~")) or where.count("/") != 1
    if not local and looks_like_path:
        raise DataUnavailableError(
            f"Local dataset path {where!r} does not exist. Point {DATA_ENV} (or the `source` argument) at a "
            "folder in the hub's parquet layout or at tiny-shakespeare's input.txt."
        )
    unreachable = None if local or _hub_offline() else _hub_unreachable()
    if unreachable:
        raise DataUnavailableError(
            f"Could not load {where!r} from the Hugging Face Hub: the hub is not reachable ({unreachable}). "
            f"Without hub access, set {DATA_ENV}=/path/to/tiny_shakespeare (a folder in the hub's parquet "
            "layout, or input.txt), or pass `source=` explicitly. (If the dataset is in your Hugging Face "
            "cache already, HF_HUB_OFFLINE=1 reads it from there.)"
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
            splits = _split_plain_text(ds["train"][0]["text"] if len(ds["train"]) else "")
        else:
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
    if not (local and path.is_file()):
        missing = [s for s in SPLITS if s not in ds]
        if missing:
            raise DataUnavailableError(f"Dataset at {where!r} has no split(s) {missing}; found {list(ds)}.")
        splits = {s: "".join(ds[s]["text"]) for s in SPLITS}
    empty = [s for s in SPLITS if not splits[s]]
    if empty:  # a model cannot be validated (or trained) on no text: say so now, not with an empty batch later
        sizes = ", ".join(f"{s} {len(t):,}" for s, t in splits.items())
        raise DataUnavailableError(
            f"The text at {where!r} is too short: its {'/'.join(empty)} split(s) are empty (characters per "
            f"split: {sizes}). A plain text file is cut 90/5/5: 20 characters or more always give three splits; "
            "tiny-shakespeare has 1,115,394."
        )
    return splits


class CharTokenizer:
    """One token per character; the vocabulary is the sorted set of characters of a corpus."""

    def __init__(self, chars: str | list[str]):
        if isinstance(chars, str):
            chars = list(chars)
        if not isinstance(chars, (list, tuple, set, frozenset)) or not all(
            isinstance(c, str) and len(c) == 1 for c in chars
        ):
            raise ValueError(f"CharTokenizer needs a string (or a list of single characters), got {chars!r:.80}.")
        if not chars:
            raise ValueError("CharTokenizer needs at least one character; the text is empty.")
        self.chars = sorted(set(chars))
        self.stoi = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
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
            bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.vocab_size]
        except TypeError:  # not iterable, or a nested list from a 2-D tensor
            bad = [ids]
        if bad:  # a negative id would otherwise index from the end and decode silently
            raise ValueError(f"Token ids must be integers in [0, {self.vocab_size}); got {bad[:8]!r:.80}.")
        return "".join(self.chars[i] for i in ids)


@dataclass
class CharDataset:
    """Encoded splits plus the tokenizer that made them."""

    tokenizer: CharTokenizer
    splits: dict[str, torch.Tensor]  # split name -> (n_chars,) int64

    @classmethod
    def from_texts(cls, texts: dict[str, str], tokenizer: CharTokenizer | None = None) -> CharDataset:
        if not isinstance(texts, dict) or not texts or not all(isinstance(t, str) for t in texts.values()):
            raise ValueError(f"texts must be a non-empty dict of split name -> text (str), got {texts!r:.80}.")
        empty = [name for name, text in texts.items() if not text]
        if empty:
            raise ValueError(f"Split(s) {empty} of the texts are empty; every split needs some text.")
        # The vocabulary comes from all splits, so validation text never holds an unknown character.
        tokenizer = tokenizer or CharTokenizer.from_text("".join(texts.values()))
        splits = {k: torch.tensor(tokenizer.encode(v), dtype=torch.long) for k, v in texts.items()}
        return cls(tokenizer, splits)

    @classmethod
    def load(cls, source: str | os.PathLike | None = None) -> CharDataset:
        return cls.from_texts(load_splits(source))


def get_batch(data: torch.Tensor, batch_size: int, block_size: int, generator: torch.Generator | None = None):
    """Random (x, y) windows from a 1-D token tensor; y is x shifted by one. Seeded by `generator`."""
    for name, value in (("batch_size", batch_size), ("block_size", block_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"batch_size and block_size must be positive integers, got {name}={value!r}.")
    if not isinstance(data, torch.Tensor) or data.dim() != 1 or data.dtype.is_floating_point:
        what = (
            f"shape {tuple(data.shape)}, dtype {data.dtype}" if isinstance(data, torch.Tensor) else type(data).__name__
        )
        raise ValueError(f"data must be a 1-D tensor of token ids, got {what}.")
    if len(data) <= block_size:
        raise ValueError(f"Need more than block_size={block_size} tokens, the data has {len(data)}.")
    ix = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
    offsets = torch.arange(block_size)
    x = data[ix[:, None] + offsets]  # (B, T)
    y = data[ix[:, None] + offsets + 1]  # (B, T)
    return x, y

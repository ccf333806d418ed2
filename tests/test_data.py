import hashlib
from pathlib import Path

import pytest
import torch

from lora_lab import CharDataset, CharTokenizer, DataUnavailableError, get_batch, load_splits
from lora_lab.data import DATA_ENV, resolve_source


def test_real_splits_have_the_datasets_sizes_and_text(real_data_source):
    splits = load_splits(real_data_source)
    assert {k: len(v) for k, v in splits.items()} == {"train": 1_003_854, "validation": 55_770, "test": 55_770}
    assert splits["train"].startswith("First Citizen:\nBefore we proceed any further, hear me speak.")
    # The three splits put back together are exactly the published input.txt.
    whole = splits["train"] + splits["validation"] + splits["test"]
    assert hashlib.md5(whole.encode()).hexdigest() == "6fb458f1232090904fb40fe944165e91"


def test_plain_text_file_gives_the_same_splits_as_the_parquet_folder(real_data_source):
    folder = Path(real_data_source)
    if not (folder / "input.txt").is_file():
        pytest.skip("the offline copy has no input.txt")
    assert load_splits(folder / "input.txt") == load_splits(folder)


def test_source_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    assert resolve_source() == str(tmp_path)
    assert resolve_source("elsewhere") == "elsewhere"
    monkeypatch.delenv(DATA_ENV)
    assert resolve_source() == "karpathy/tiny_shakespeare"


def test_missing_local_copy_says_how_to_point_at_one(tmp_path):
    with pytest.raises(DataUnavailableError, match="LORA_LAB_DATA"):
        load_splits(tmp_path / "no_such_folder")


def test_unreachable_hub_is_an_error_not_a_fallback(monkeypatch, tmp_path):
    # Offline mode (set on the libraries' own switches, read at import time) so no request leaves the
    # machine; an empty cache so nothing is found locally. The error must say how to use a local copy.
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf")
    with pytest.raises(DataUnavailableError, match="LORA_LAB_DATA"):
        load_splits("some-user/definitely-not-cached-dataset")


def test_small_text_file_is_split_90_5_5(tmp_path):
    text = "".join(chr(97 + i % 26) for i in range(1000))
    path = tmp_path / "tiny.txt"
    path.write_text(text)
    splits = load_splits(path)
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [900, 50, 50]
    assert "".join(splits.values()) == text


def test_tokenizer_round_trip_and_vocab():
    text = "Hello, world!\nHELLO"
    tok = CharTokenizer.from_text(text)
    assert tok.vocab_size == len(set(text))
    assert tok.chars == sorted(tok.chars)
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode(torch.tensor(ids)) == text


def test_tokenizer_names_the_unknown_character():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(ValueError, match="'z'"):
        tok.encode("abz")
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        tok.decode([5])


def test_batches_are_reproducible_from_a_seed_and_shifted_by_one():
    data = torch.arange(1000)
    x1, y1 = get_batch(data, 4, 8, torch.Generator().manual_seed(7))
    x2, y2 = get_batch(data, 4, 8, torch.Generator().manual_seed(7))
    x3, _ = get_batch(data, 4, 8, torch.Generator().manual_seed(8))
    assert x1.shape == y1.shape == (4, 8)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(x1, x3)
    assert torch.equal(y1, x1 + 1)  # data[i] == i, so the target is the next token


def test_batch_arguments_are_checked():
    with pytest.raises(ValueError, match="positive"):
        get_batch(torch.arange(100), 0, 8)
    with pytest.raises(ValueError, match="block_size=200"):
        get_batch(torch.arange(100), 2, 200)


def test_dataset_vocab_covers_all_splits():
    ds = CharDataset.from_texts({"train": "aab", "validation": "abc"})
    assert ds.tokenizer.chars == ["a", "b", "c"]
    assert ds.splits["validation"].tolist() == [0, 1, 2]

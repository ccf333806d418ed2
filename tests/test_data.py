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


def _no_network(monkeypatch, calls):
    import datasets.config
    import huggingface_hub.constants

    for module, name in (
        (datasets.config, "HF_HUB_OFFLINE"),
        (datasets.config, "HF_DATASETS_OFFLINE"),
        (huggingface_hub.constants, "HF_HUB_OFFLINE"),
    ):
        monkeypatch.setattr(module, name, False, raising=False)
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    monkeypatch.delenv("https_proxy", raising=False)

    def refuse(address, timeout=None):
        calls.append((address, timeout))
        raise OSError("Network is unreachable")

    def never(*args, **kwargs):
        raise AssertionError("datasets.load_dataset must not be called when the hub is unreachable")

    monkeypatch.setattr("socket.create_connection", refuse)
    monkeypatch.setattr("datasets.load_dataset", never)


def test_unreachable_hub_fails_at_once_with_the_local_copy_hint(monkeypatch):
    import time

    calls = []
    _no_network(monkeypatch, calls)
    t0 = time.perf_counter()
    with pytest.raises(DataUnavailableError, match="hub is not reachable") as err:
        load_splits("karpathy/tiny_shakespeare")
    assert time.perf_counter() - t0 < 2.0
    assert "LORA_LAB_DATA=" in str(err.value) and "Network is unreachable" in str(err.value)
    assert calls == [(("huggingface.co", 443), 3.0)]  # one quiet check, with a short timeout


def test_offline_switch_skips_the_reachability_check(monkeypatch):
    import datasets.config

    calls = []
    _no_network(monkeypatch, calls)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataUnavailableError, match="Could not load"):  # the (fake) hub client was asked
        load_splits("karpathy/tiny_shakespeare")
    assert calls == []


@pytest.mark.parametrize("n_chars", [0, 3, 10])
def test_a_text_too_short_for_every_split_is_refused(tmp_path, n_chars):
    path = tmp_path / "short.txt"
    path.write_text("abcdefghijklmnopqrstuvwxyz"[:n_chars])
    with pytest.raises(DataUnavailableError, match=r"too short: its .*validation.* split\(s\) are empty"):
        load_splits(path)
    path.write_text("x" * 20)
    assert [len(t) for t in load_splits(path).values()] == [18, 1, 1]


def test_bad_tokenizer_and_dataset_input_is_named():
    with pytest.raises(ValueError, match="at least one character"):
        CharTokenizer("")
    with pytest.raises(ValueError, match="single characters"):
        CharTokenizer(["ab", "c"])
    tok = CharTokenizer("abc")
    with pytest.raises(ValueError, match=r"\[0, 3\); got \[-1\]"):
        tok.decode([0, -1])  # would silently decode as 'c' by indexing from the end
    with pytest.raises(ValueError, match="got \\[True\\]"):
        tok.decode([True])
    with pytest.raises(ValueError, match=r"Split\(s\) \['validation'\] of the texts are empty"):
        CharDataset.from_texts({"train": "abc", "validation": ""})
    with pytest.raises(ValueError, match="non-empty dict"):
        CharDataset.from_texts("abc")
    with pytest.raises(ValueError, match="1-D tensor of token ids"):
        get_batch(torch.zeros((4, 100), dtype=torch.long), 2, 8)
    with pytest.raises(ValueError, match="batch_size=2.5"):
        get_batch(torch.arange(100), 2.5, 8)
    with pytest.raises(TypeError, match="source must be a path"):
        load_splits(42)

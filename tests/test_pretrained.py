import pytest
import torch

from lora_lab import GPTConfig, TrainConfig, pretrained_base
from lora_lab.files import CorruptFileError, OutputExistsError
from lora_lab.pretrained import cache_dir

TINY = GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=16)
FAST = TrainConfig(max_iters=20, batch_size=4, eval_interval=10, eval_iters=2, warmup_iters=2, device="cpu")


@pytest.fixture
def text_file(tmp_path):
    # A small corpus in tiny-shakespeare's shape: speeches separated by blank lines, with a stretch of
    # Romeo and Juliet in the middle (the held-out play, which pretraining leaves out).
    speeches = [f"SPEAKER {i % 3}:\nWords of speech number {i}, said plainly.\n" for i in range(300)]
    speeches[140:160] = [f"ROMEO:\nBut soft, what light {i}.\n" for i in range(20)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(speeches))
    return path


def test_first_call_trains_later_calls_load_the_same_model(tmp_path, text_file):
    kwargs = dict(model_config=TINY, train_config=FAST, data_source=text_file, cache=tmp_path / "c", progress=False)
    first = pretrained_base(**kwargs)
    second = pretrained_base(**kwargs)
    assert (first.from_cache, second.from_cache) == (False, True)
    assert first.path == second.path and first.path.parent == tmp_path / "c"
    idx = torch.randint(0, first.model.config.vocab_size, (2, 16))
    assert torch.equal(first.model(idx)[0], second.model(idx)[0])
    assert second.history["evals"] == first.history["evals"]


def test_a_changed_config_or_corpus_never_loads_a_stale_model(tmp_path, text_file):
    kwargs = dict(model_config=TINY, data_source=text_file, cache=tmp_path / "c", progress=False)
    base = pretrained_base(train_config=FAST, **kwargs)
    longer = pretrained_base(train_config=TrainConfig(**{**FAST.to_dict(), "max_iters": 21}), **kwargs)
    assert not longer.from_cache and longer.path != base.path
    text_file.write_text(text_file.read_text() + "\n\nSPEAKER 9:\nA new speech.\n")
    changed = pretrained_base(train_config=FAST, **kwargs)
    assert not changed.from_cache and changed.path not in (base.path, longer.path)


def test_vocab_size_follows_the_corpus(tmp_path, text_file):
    pre = pretrained_base(model_config=TINY, train_config=FAST, data_source=text_file, cache=tmp_path, progress=False)
    assert pre.model.config.vocab_size == pre.dataset.tokenizer.vocab_size == len(set(text_file.read_text()))


def test_cache_location_setting(monkeypatch, tmp_path):
    monkeypatch.setenv("LORA_LAB_CACHE", str(tmp_path / "x"))
    assert cache_dir() == tmp_path / "x"
    assert cache_dir(tmp_path / "y") == tmp_path / "y"
    monkeypatch.delenv("LORA_LAB_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "lora_lab"


def test_unknown_preset_is_refused():
    with pytest.raises(ValueError, match="Unknown preset 'huge'"):
        pretrained_base("huge")


@pytest.mark.parametrize("damage", ["unreadable json", "flipped byte", "truncated tensors", "missing weights"])
def test_a_damaged_cache_entry_names_its_folder_and_the_way_out(tmp_path, text_file, damage):
    kwargs = dict(model_config=TINY, train_config=FAST, data_source=text_file, cache=tmp_path / "c", progress=False)
    first = pretrained_base(**kwargs)
    weights, config = first.path / "model.safetensors", first.path / "config.json"
    if damage == "unreadable json":
        config.write_text(config.read_text()[:-30])
    elif damage == "flipped byte":
        data = bytearray(weights.read_bytes())
        data[-5] ^= 0x01
        weights.write_bytes(bytes(data))
    elif damage == "truncated tensors":
        weights.write_bytes(weights.read_bytes()[:200])
    else:
        weights.unlink()
    with pytest.raises(CorruptFileError) as info:
        pretrained_base(**kwargs)
    message = str(info.value)
    assert f"The cached base model in {first.path} is damaged" in message
    assert "retrain=True (CLI: --retrain)" in message and f"delete the folder {first.path}" in message

    again = pretrained_base(retrain=True, **kwargs)  # retraining repairs the entry in place
    assert not again.from_cache and again.path == first.path
    loaded = pretrained_base(**kwargs)
    assert loaded.from_cache
    idx = torch.randint(0, loaded.model.config.vocab_size, (2, 16))
    assert torch.equal(loaded.model(idx)[0], first.model.eval()(idx)[0])  # same seed, same model


def test_the_cache_writer_replaces_only_its_own_folder(tmp_path, text_file):
    kwargs = dict(model_config=TINY, train_config=FAST, data_source=text_file, cache=tmp_path / "c", progress=False)
    first = pretrained_base(**kwargs)
    (first.path / "notes.txt").write_text("mine")  # someone put a file of their own into the cache folder
    before = {p.name: p.read_bytes() for p in first.path.iterdir()}
    with pytest.raises(OutputExistsError, match="notes.txt"):
        pretrained_base(retrain=True, **kwargs)
    assert {p.name: p.read_bytes() for p in first.path.iterdir()} == before


def test_the_cached_base_loads_in_eval_mode(tmp_path, text_file):
    kwargs = dict(model_config=TINY, train_config=FAST, data_source=text_file, cache=tmp_path / "c", progress=False)
    pretrained_base(**kwargs)
    assert not pretrained_base(**kwargs).model.training

import pytest
import torch

from lora_lab import GPTConfig, TrainConfig, pretrained_base
from lora_lab.experiments.pretrained import cache_dir
from lora_lab.storage.files import CorruptFileError, OutputExistsError

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


def test_pretrain_config_is_the_preset_or_a_quick_run_of_it():
    from lora_lab.experiments.pretrained import PRESETS, pretrain_config

    assert pretrain_config("tiny") == PRESETS["tiny"][1]
    quick = pretrain_config("tiny", 20)
    assert (quick.max_iters, quick.warmup_iters, quick.eval_interval, quick.eval_iters) == (20, 2, 20, 2)
    assert quick.learning_rate == PRESETS["tiny"][1].learning_rate and quick.keep_best
    for bad in (0, -3, True, "20"):
        with pytest.raises(ValueError, match="pretrain iters must be a positive integer"):
            pretrain_config("tiny", bad)
    with pytest.raises(ValueError, match="Unknown preset 'huge'"):
        pretrain_config("huge")


def _adapter_with_record(path, record):
    from lora_lab import GPT, LoRAConfig, apply_lora, save_adapter

    model = GPT(TINY.__class__(**{**TINY.to_dict(), "vocab_size": 12}))
    apply_lora(model, LoRAConfig(r=2, targets=("q_proj",)))
    return save_adapter(model, path, metadata=None if record is None else {"base": record})


@pytest.mark.parametrize(
    "record, message",
    [
        ({"preset": "huge"}, "names preset 'huge'"),
        ({"preset": "tiny", "pretrain_iters": 10**9}, "pretrain_iters 1000000000; expected null or an integer 1..2000"),
        ({"preset": "tiny", "pretrain_iters": "20"}, "pretrain_iters '20'"),
        ({"preset": "tiny", "pretrain_iters": True}, "pretrain_iters True"),
        ({"preset": "tiny", "vocab": 7}, "a vocab of type int; expected text"),
    ],
)
def test_an_adapters_base_record_is_checked_before_it_is_acted_on(tmp_path, record, message):
    from lora_lab.experiments.pretrained import adapter_provenance

    adapter = _adapter_with_record(tmp_path / "a", record)
    with pytest.raises(CorruptFileError, match=message.replace("(", r"\(").replace(")", r"\)")):
        adapter_provenance(adapter)


def test_an_adapters_base_record_from_metadata_or_the_old_side_file(tmp_path):
    import json

    from lora_lab.experiments.pretrained import LEGACY_BASE_RECORD, adapter_provenance

    good = {"preset": "tiny", "pretrain_iters": 20, "checkpoint": "/somewhere", "vocab": "abc"}
    assert adapter_provenance(_adapter_with_record(tmp_path / "a", good)) == good
    old = _adapter_with_record(tmp_path / "b", None)
    assert adapter_provenance(old) == {}
    (old / LEGACY_BASE_RECORD).write_text(json.dumps({"preset": "tiny", "pretrain_iters": 20, "base_checkpoint": "/x"}))
    assert adapter_provenance(old) == {"preset": "tiny", "pretrain_iters": 20, "checkpoint": "/x", "vocab": None}


# --- readers during a writer's fallback swap (no renameat2), and unverified entries ------------------------


def _write_stuck_between_renames(path, model):
    """In a forked child: save a checkpoint at `path` with the fallback swap (renameat2 off), stopped for good
    between its two renames, where only the moved-aside old bundle is left. The test kills it there."""
    import os
    import time

    from lora_lab import save_checkpoint
    from lora_lab.storage import files

    files._renameat2 = None
    rename = os.rename

    def slow_rename(src, dst, *args, **kwargs):
        rename(src, dst, *args, **kwargs)
        if "-old-" in os.fspath(dst):
            time.sleep(600)

    os.rename = slow_rename  # the child's own os module
    save_checkpoint(model, path, replace_damaged=True)


def _in_the_gap(path, model):
    """A forked writer stuck in the gap of a fallback swap at `path` (returned once the old bundle moved aside)."""
    import multiprocessing
    import os
    import time

    writer = multiprocessing.get_context("fork").Process(target=_write_stuck_between_renames, args=(path, model))
    writer.start()
    deadline = time.monotonic() + 30
    while os.path.lexists(path):
        assert time.monotonic() < deadline and writer.is_alive(), "the writer never reached the gap"
        time.sleep(0.005)
    return writer


def test_readers_find_a_cached_base_that_a_fallback_swap_has_moved_aside(tmp_path, text_file):
    import copy
    import os
    import signal

    from lora_lab import GPT, LoRAConfig, apply_lora, save_adapter, save_checkpoint
    from lora_lab.experiments.pretrained import load_adapted

    kwargs = dict(model_config=TINY, train_config=FAST, data_source=text_file, cache=tmp_path / "c", progress=False)
    first = pretrained_base(**kwargs)
    idx = torch.randint(0, first.model.config.vocab_size, (2, 16))
    expected = first.model.eval()(idx)[0]
    other = GPT(first.model.config)  # what the stuck writer is putting in: other weights
    recorded = tmp_path / "base"  # an adapter's recorded base checkpoint, outside the cache
    save_checkpoint(first.model, recorded)
    model = apply_lora(copy.deepcopy(first.model), LoRAConfig(r=2, targets=("q_proj",)))
    vocab = "".join(first.dataset.tokenizer.chars)
    adapter = save_adapter(model, tmp_path / "a", metadata={"base": {"checkpoint": str(recorded), "vocab": vocab}})
    for path in (first.path, recorded):
        writer = _in_the_gap(path, other)
        try:
            for killed in (False, True):  # while the writer is stuck there, and once it was killed there
                if killed:
                    os.kill(writer.pid, signal.SIGKILL)
                    writer.join()
                again = pretrained_base(**kwargs)  # with path.exists() this trained the base again
                assert again.from_cache and torch.equal(again.model(idx)[0], expected)
                # the recorded base is read, not got again from the data (which is not there)
                adapted, _, _ = load_adapted(adapter, data_source=tmp_path / "no-data", cache=tmp_path / "none")
                assert torch.equal(adapted.eval()(idx)[0], expected)  # B = 0: the base's own logits
        finally:
            if writer.is_alive():
                os.kill(writer.pid, signal.SIGKILL)
                writer.join()
        assert not path.exists()  # still moved aside: the next write to it puts it back
    assert not (tmp_path / "none").exists()


def test_an_unverified_cached_base_or_recorded_checkpoint_is_never_trusted_silently(tmp_path, text_file):
    import copy
    import json

    from lora_lab import LoRAConfig, apply_lora, save_adapter
    from lora_lab.experiments.pretrained import load_adapted
    from lora_lab.storage.checkpoint import UnverifiedCheckpointError

    kwargs = dict(model_config=TINY, train_config=FAST, data_source=text_file, cache=tmp_path / "c", progress=False)
    first = pretrained_base(**kwargs)
    config_file = first.path / "config.json"
    config = json.loads(config_file.read_text())
    del config["checksums"]  # as a cache entry written before checksums existed (or edited)
    config_file.write_text(json.dumps(config))
    before = {p.name: p.read_bytes() for p in first.path.iterdir()}
    with pytest.raises(CorruptFileError, match="is unverified: its config records no checksum") as info:
        pretrained_base(**kwargs)
    assert str(first.path) in str(info.value) and "retrain=True (CLI: --retrain)" in str(info.value)
    assert {p.name: p.read_bytes() for p in first.path.iterdir()} == before
    # an adapter whose recorded base is that checkpoint: refused by name unless opted in
    model = apply_lora(copy.deepcopy(first.model), LoRAConfig(r=2, targets=("q_proj",)))
    vocab = "".join(first.dataset.tokenizer.chars)
    adapter = save_adapter(model, tmp_path / "a", metadata={"base": {"checkpoint": str(first.path), "vocab": vocab}})
    with pytest.raises(UnverifiedCheckpointError, match="allow_unverified=True"):
        load_adapted(adapter, data_source=text_file, cache=tmp_path / "c")
    adapted, _, _ = load_adapted(adapter, data_source=text_file, cache=tmp_path / "c", allow_unverified=True)
    idx = torch.randint(0, first.model.config.vocab_size, (2, 16))
    assert torch.equal(adapted.eval()(idx)[0], first.model.eval()(idx)[0])
    assert {p.name: p.read_bytes() for p in first.path.iterdir()} == before
    again = pretrained_base(retrain=True, **kwargs)  # the way out the message names
    assert not again.from_cache and "checksums" in json.loads(config_file.read_text())
    assert pretrained_base(**kwargs).from_cache

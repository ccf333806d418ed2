"""Issue 17, hardening round two: one test per class of fault, a property or fuzz test where the class is open.

1. Silent wrong results: new LoRA layers take the mode of the model they join (every variant, both modes,
   every way in), and an adapter's integrity fields cannot be switched off by deleting, nulling or retyping them.
2. Untrusted folders: random JSON shapes and depths in adapter and checkpoint configs, and random file types in
   a bundle (a link to /dev/zero, a FIFO, a folder, a link loop, a tensor file too long or too short, a cut
   header), are refused by name and without hanging, with the model and every file byte for byte as they were.
3. The CLI: random bad option values exit with code 2 and one line naming the option, before any work.
4. Crash safety without renameat2: a writer SIGKILLed at random moments of the two-rename swap never leaves a
   reader without the old or the new bundle, whole. Also: long target names and an empty path.
"""

import copy
import json
import math
import multiprocessing
import os
import random
import shutil
import signal
import stat
import tempfile
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_adapters import adapted
from tiny_models import assert_same, snapshot, tiny_gpt, tokens

from lora_lab import (
    AdapterBank,
    AdapterMismatchError,
    CheckpointMismatchError,
    LoRAConfig,
    LoRAError,
    apply_lora,
    load_adapter,
    load_checkpoint,
    save_adapter,
    save_checkpoint,
)
from lora_lab.cli import build_parser, main
from lora_lab.storage import files
from lora_lab.storage.adapters import CONFIG_FILE, WEIGHTS_FILE, UnverifiedAdapterError
from lora_lab.storage.files import CorruptFileError, read_bundle, write_bundle
from lora_lab.storage.peft_format import export_peft
from lora_lab.variants import VARIANTS

FORK = multiprocessing.get_context("fork")  # children that have lora_lab and torch imported already: fast starts
CKPT_CONFIG, CKPT_WEIGHTS = "config.json", "model.safetensors"
# Every error lora_lab raises for a bad file names it with one of these (all are ValueErrors: CLI exit code 2).
NAMED = (CorruptFileError, LoRAError, CheckpointMismatchError, FileNotFoundError)
FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def tree(path: Path) -> dict:
    """Everything under `path`, never following a link or opening a FIFO: {relative path: what it is}."""
    out = {}
    for root, dirs, names in os.walk(path):
        for name in dirs + names:
            p = Path(root) / name
            mode = os.lstat(p).st_mode
            rel = str(p.relative_to(path))
            if stat.S_ISLNK(mode):
                out[rel] = ("link", os.readlink(p))
            elif stat.S_ISREG(mode) and os.lstat(p).st_size > 2**24:  # a sparse giant: any write changes these
                st_ = os.lstat(p)
                out[rel] = ("big file", st_.st_size, st_.st_mtime_ns, st_.st_ino)
            elif stat.S_ISREG(mode):
                out[rel] = ("file", p.read_bytes())
            else:
                out[rel] = ("dir",) if stat.S_ISDIR(mode) else ("special", stat.S_IFMT(mode))
    return out


def with_alarm(fn, seconds=20):
    """fn(), failing instead of hanging (a FIFO opened without a writer, a read of /dev/zero, a huge build)."""

    def hung(*_):
        raise TimeoutError("the call blocked")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        return fn()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A base, a LoRA adapter of it and a checkpoint of it, saved once; tests work on copies."""
    root = tmp_path_factory.mktemp("saved")
    base = tiny_gpt()
    model = adapted(base, LoRAConfig(r=2, targets=("q_proj", "v_proj"), dropout=0.3), seed=3)
    save_adapter(model, root / "adapter")
    save_checkpoint(base, root / "checkpoint")
    return {"base": base, "adapter": root / "adapter", "checkpoint": root / "checkpoint", "root": root}


def load(kind: str, folder: Path, base):
    """Load the adapter (into a copy of the base) or the checkpoint at `folder`; returns the model it changed."""
    if kind == "adapter":
        model = copy.deepcopy(base)
        before = snapshot(model)
        try:
            load_adapter(model, folder)
        except BaseException:
            assert_same(model, before)  # refused: the model is as it was
            raise
        return model
    return load_checkpoint(folder)[0]


# ----------------------------------------------------------------------------------------------
# 1. Silent wrong results


@pytest.fixture(scope="module")
def variant_adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("variants")
    for name in sorted(VARIANTS):
        save_adapter(adapted(tiny_gpt(), LoRAConfig(r=2, dropout=0.3, variant=name), seed=3), root / name)
    return root


@settings(FUZZ, max_examples=30)
@given(
    variant=st.sampled_from(sorted(VARIANTS)),
    training=st.booleans(),
    way=st.sampled_from(["apply_lora", "load_adapter", "load onto adapted", "AdapterBank"]),
)
def test_new_layers_take_the_mode_of_the_model_they_join(variant_adapters, variant, training, way):
    model = tiny_gpt().train(training)
    config = LoRAConfig(r=2, dropout=0.3, variant=variant)
    if way == "apply_lora":
        apply_lora(model, config)
    elif way == "load_adapter":
        load_adapter(model, variant_adapters / variant)
    elif way == "load onto adapted":
        model = adapted(tiny_gpt(), config, seed=4).train(training)
        load_adapter(model, variant_adapters / variant)
    else:
        bank = AdapterBank(model)
        bank.add("a", variant_adapters / variant)
        bank.activate("a")
        model = bank.model
    assert {m.training for m in model.modules()} == {training}
    if not training:  # eval means eval: no LoRA dropout, so the same input gives the same output
        with torch.no_grad():
            assert torch.equal(model(tokens())[0], model(tokens())[0])


DIGEST = "base_weights_sha256"
json_leaves = (
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8)
)  # floats include NaN and inf: Python's json reads them
json_values = st.recursive(
    json_leaves, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=10,
)  # fmt: skip
integrity_values = {
    "checksums": st.none()
    | json_values
    | st.builds(lambda v: {WEIGHTS_FILE: v}, json_leaves | st.just("sha256:" + "0" * 64)),
    DIGEST: st.none() | json_values | st.text("0123456789abcdef", min_size=1, max_size=64).map("sha256:".__add__),
    "base_weights": st.none() | json_values,
}
DELETE = object()


@settings(FUZZ, max_examples=60)
@given(
    changes=st.dictionaries(
        st.sampled_from(sorted(integrity_values)),
        st.just(DELETE) | st.sampled_from(sorted(integrity_values)).flatmap(integrity_values.get),
        min_size=1,
    ),
    rewrite=st.booleans(),
)
def test_an_adapters_integrity_cannot_be_switched_off_by_editing_its_fields(saved, changes, rewrite):
    # Deleting, nulling or retyping the checksums, the base digest or the base record, with or without other
    # tensors in the file, never gives a silent load: refused by name (or "unverified") unless opted in.
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "ad"
        shutil.copytree(saved["adapter"], folder)
        config = json.loads((folder / CONFIG_FILE).read_text())
        edited = dict(config)
        for key, value in changes.items():
            if value is DELETE:
                edited.pop(key, None)
            else:
                edited[key] = value
        if edited == config and not rewrite:
            return  # nothing changed
        (folder / CONFIG_FILE).write_text(json.dumps(edited))
        if rewrite:  # other numbers in a well-formed tensor file
            tensors = files.read_tensors(folder / WEIGHTS_FILE)
            (folder / WEIGHTS_FILE).write_bytes(files.tensor_file_bytes({k: v * 2 for k, v in tensors.items()}))
        before = tree(folder)
        with pytest.raises((CorruptFileError, AdapterMismatchError)) as info:  # UnverifiedAdapterError is one
            load("adapter", folder, saved["base"])
        assert str(folder) in str(info.value)
        if isinstance(info.value, UnverifiedAdapterError):
            assert "unverified" in str(info.value) and "allow_unverified=True" in str(info.value)
        assert tree(folder) == before


# ----------------------------------------------------------------------------------------------
# 2. Untrusted folders


def locations(kind: str, config: dict) -> list[tuple]:
    """Where a fuzzed value goes in a config: the whole file, each top-level key, each key one level down."""
    places = [()] + [(k,) for k in config]
    places += [(k, sub) for k, v in config.items() if isinstance(v, dict) for sub in list(v)[:8]]
    return places + [("new key",)]


def put(config, where: tuple, value):
    if not where:
        return value
    out = copy.deepcopy(config)
    node = out
    for key in where[:-1]:
        node = node[key]
    node[where[-1]] = value
    return out


@settings(FUZZ, max_examples=80)
@given(
    kind=st.sampled_from(["adapter", "checkpoint"]),
    place=st.integers(0, 10**6),
    value=json_values,
    depth=st.none() | st.integers(65, 100_000),
)
def test_random_json_shapes_and_depths_in_a_config_are_refused_by_name(saved, kind, place, value, depth):
    config_file = CONFIG_FILE if kind == "adapter" else CKPT_CONFIG
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / kind
        shutil.copytree(saved[kind], folder)
        config = json.loads((folder / config_file).read_text())
        places = locations(kind, config)
        where = places[place % len(places)]
        deep = "[" * (depth or 0) + "]" * (depth or 0)
        text = json.dumps(put(config, where, "@DEEP@" if depth else value))
        (folder / config_file).write_text(text.replace('"@DEEP@"', deep))
        before = tree(folder)
        try:
            with_alarm(lambda: load(kind, folder, saved["base"]))
        except NAMED as err:
            assert str(folder) in str(err), f"the error does not name the folder: {err!r}"
            if depth:
                assert "nests JSON more than 64 levels deep" in str(err)
        else:
            assert depth is None  # accepted: a change that means nothing (metadata, dropout, ...)
        assert tree(folder) == before


def make_bad(path: Path, how: str, rng: random.Random) -> None:
    data = path.read_bytes()
    header = 8 + int.from_bytes(data[:8], "little") if path.suffix == ".safetensors" else len(data)
    path.unlink()
    if how == "link to /dev/zero":
        path.symlink_to("/dev/zero")
    elif how == "FIFO":
        os.mkfifo(path)
    elif how == "folder":
        path.mkdir()
        (path / "inside").write_bytes(data)
    elif how == "dangling link":
        path.symlink_to(path.parent / "nowhere")
    elif how == "link loop":
        path.symlink_to(path.name)
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "oversize":
        path.write_bytes(data + rng.randbytes(rng.randint(1, 300)))
    elif how == "sparse 10 GB":  # what a reader must not read in full
        path.write_bytes(data)
        os.truncate(path, 10 * 2**30)
    elif how == "undersize":
        path.write_bytes(data[: rng.randrange(len(data))])
    elif how == "cut header":
        path.write_bytes(data[: rng.randrange(min(header, len(data)))])
    elif how == "header length lies":
        path.write_bytes(rng.randrange(2**64).to_bytes(8, "little") + data[8:])


@settings(FUZZ, max_examples=60)
@given(
    kind=st.sampled_from(["adapter", "checkpoint"]),
    which=st.sampled_from(["config", "tensors"]),
    how=st.sampled_from(
        [
            "link to /dev/zero",
            "FIFO",
            "folder",
            "dangling link",
            "link loop",
            "empty",
            "oversize",
            "sparse 10 GB",
            "undersize",
            "cut header",
            "header length lies",
        ]
    ),
    seed=st.integers(0, 2**32),
)
def test_random_file_types_in_a_bundle_are_refused_by_name_without_hanging(saved, kind, which, how, seed):
    names = {"adapter": (CONFIG_FILE, WEIGHTS_FILE), "checkpoint": (CKPT_CONFIG, CKPT_WEIGHTS)}[kind]
    name = names[0] if which == "config" else names[1]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / kind
        shutil.copytree(saved[kind], folder)
        if how == "oversize" and which == "config":
            how = "sparse 10 GB"  # trailing bytes may be JSON whitespace; a JSON file over 64 MB is refused
        make_bad(folder / name, how, random.Random(seed))
        before = tree(folder)
        with pytest.raises(NAMED) as info:
            with_alarm(lambda: load(kind, folder, saved["base"]))
        assert str(folder / name) in str(info.value), f"the error does not name {name}: {info.value!r}"
        assert tree(folder) == before


# ----------------------------------------------------------------------------------------------
# 3. The CLI: bad values exit 2 with one named line, before any work


def positive_int(text: str) -> bool:
    try:
        return int(text) > 0
    except ValueError:
        return False


def positive_float(text: str) -> bool:
    try:
        value = float(text)
    except ValueError:
        return False
    return value > 0 and math.isfinite(value)


def seed_value(text: str, top: int) -> bool:
    try:
        return 0 <= int(text) <= top
    except ValueError:
        return False


words = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=8)
bad_ints = st.integers(max_value=0).map(str) | words.filter(lambda t: not positive_int(t))
bad_floats = (
    st.floats(max_value=0).map(repr)
    | st.sampled_from(["nan", "inf", "-inf", "infinity", "1e999"])
    | words.filter(lambda t: not positive_float(t))
)
out_of_range_seeds = st.integers(max_value=-1).map(str) | st.integers(2**63).map(str)
BAD_VALUES = [
    # (command, option, bad values, extra arguments the option needs)
    *[("finetune", opt, bad_ints, []) for opt in ("--rank", "--steps", "--batch-size", "--eval-chars")],
    *[("sample", opt, bad_ints, []) for opt in ("--chars", "--top-k", "--pretrain-iters", "--threads")],
    ("compare", "--rank", bad_ints, []),
    ("sweep", "--ranks", st.lists(bad_ints.filter(lambda t: "," not in t), min_size=1).map(",".join), []),
    *[("finetune", opt, bad_floats, []) for opt in ("--lr", "--alpha", "--lora-plus")],
    ("sample", "--temperature", bad_floats, []),
    *[(cmd, "--seed", out_of_range_seeds, []) for cmd in ("tour", "sample")],
    ("finetune", "--seed", words.filter(lambda t: not seed_value(t, 2**63 - 1)), []),
    (
        "finetune",
        "--vera-seed",
        st.integers(max_value=-1).map(str) | st.integers(2**32).map(str) | words.filter(lambda t: not seed_value(t, 0)),
        ["--variant", "vera"],
    ),
    ("finetune", "--d-init", st.sampled_from(["nan", "inf", "-inf", "NaN", "1e999"]), ["--variant", "vera"]),
    ("finetune", "--targets", st.text(", \t", max_size=5), []),
    ("finetune", "--task", st.text(min_size=1, max_size=6).map("x".__add__), []),
    ("pretrain", "--preset", st.text(min_size=1, max_size=6).map("x".__add__), []),
]  # fmt: skip


@settings(FUZZ, max_examples=120)
@given(case=st.sampled_from(BAD_VALUES).flatmap(lambda c: st.tuples(st.just(c), c[2])))
def test_random_bad_cli_values_exit_2_with_one_named_line_before_any_work(tmp_path, monkeypatch, capsys, case):
    (command, option, _, extra), value = case
    with tempfile.TemporaryDirectory() as tmp:
        monkeypatch.chdir(tmp)  # default output folders would land here
        argv = [command, f"{option}={value}", *extra, "--cache", f"{tmp}/cache", "--data", f"{tmp}/no-data"]
        code = main(argv)
        out, err = capsys.readouterr()
        assert code == 2, (argv, err)
        assert out == "" and err.count("\n") == 1 and "Traceback" not in err, (argv, err)
        assert option in err or option.lstrip("-").replace("-", "_") in err, (argv, err)  # the error names it
        assert os.listdir(tmp) == []  # nothing trained, cached or written


# ----------------------------------------------------------------------------------------------
# 4. Crash safety on every platform: the fallback swap (renameat2 disabled)

CONFIG, WEIGHTS, TAG = "config.json", "model.safetensors", "test.hardening.v1"


def write(directory, value: float):
    bundle = {WEIGHTS: {"w": torch.full((2000,), float(value))}, CONFIG: {"format": TAG, "value": value}}
    return write_bundle(directory, bundle, config_file=CONFIG, format_tag=TAG)


def read(directory) -> float:
    """The bundle's value, checking that its config and tensors belong together (a whole bundle)."""
    config, tensors = read_bundle(directory, config_file=CONFIG, tensor_files=[WEIGHTS])
    assert torch.all(tensors[WEIGHTS]["w"] == config["value"]), "config and tensors come from different bundles"
    return config["value"]


def force_fallback(gap: float) -> None:
    """In a child process: no renameat2, and `gap` seconds between the swap's two renames (where a kill hurts)."""
    files._renameat2 = None
    rename = os.rename

    def slow_rename(src, dst, *args, **kwargs):
        rename(src, dst, *args, **kwargs)
        if "-old-" in os.fspath(dst):  # the old bundle has just moved aside; the new one is not in yet
            time.sleep(gap)

    os.rename = slow_rename  # the child's own os module: the test process is not touched


def _write_forever(directory, start):
    force_fallback(gap=0.05)
    value = start
    while True:
        write(directory, value)
        value += 1.0


def test_a_writer_sigkilled_at_random_during_fallback_swaps_never_leaves_a_reader_without_the_bundle(tmp_path):
    target = tmp_path / "b"
    write(target, 0.0)
    rng = random.Random(17)
    last, reads, killed_in_gap, gap_reads = 0.0, 0, 0, 0
    for trial in range(12):
        writer = FORK.Process(target=_write_forever, args=(target, 1000.0 * (trial + 1)))
        writer.start()
        deadline = time.monotonic() + rng.uniform(0.05, 0.3)
        try:
            while time.monotonic() < deadline:
                missing = not os.path.lexists(target)
                value = read(target)  # never "No such folder", never a mixed bundle
                assert value >= last, "a reader went back to an older bundle"
                last, reads, gap_reads = value, reads + 1, gap_reads + missing
        finally:
            os.kill(writer.pid, signal.SIGKILL)
            writer.join()
        killed_in_gap += not os.path.lexists(target)  # only the moved-aside copy is left
        assert files.bundle_exists(target)
        value = read(target)
        assert value >= last
        last = value
    assert killed_in_gap, "no kill landed between the two renames"
    assert gap_reads, "no read happened while the target was moved aside"
    write(target, 99999.0)  # the next write puts back or removes whatever the killed writers left
    assert read(target) == 99999.0 and os.listdir(tmp_path) == ["b"]
    print(
        f"{reads} reads while writing; {gap_reads} with the target moved aside; {killed_in_gap} of 12 kills in the gap"
    )


def _save_and_hang(kind, folder, model):
    force_fallback(gap=600)  # killed in the gap by the test
    if kind == "adapter":
        save_adapter(model, folder)
    else:
        save_checkpoint(model, folder)


@pytest.mark.parametrize("kind", ["adapter", "checkpoint"])
def test_load_finds_the_old_bundle_while_a_fallback_swap_is_between_its_renames(saved, tmp_path, kind):
    folder = tmp_path / kind
    shutil.copytree(saved[kind], folder)
    base = saved["base"]
    old_logits = load(kind, folder, base)(tokens())[0]
    if kind == "adapter":
        new = adapted(base, LoRAConfig(r=2, targets=("q_proj", "v_proj")), seed=9)
    else:
        new = tiny_gpt(seed=5)
    writer = FORK.Process(target=_save_and_hang, args=(kind, folder, new))
    writer.start()
    try:
        deadline = time.monotonic() + 30
        while os.path.lexists(folder):  # until the old bundle has moved aside
            assert time.monotonic() < deadline and writer.is_alive()
            time.sleep(0.005)
        assert torch.equal(load(kind, folder, base)(tokens())[0], old_logits)  # while the writer is stuck there
        os.kill(writer.pid, signal.SIGKILL)
        writer.join()
        assert torch.equal(load(kind, folder, base)(tokens())[0], old_logits)  # and once it was killed there
        args = build_parser().parse_args(["sample", f"--{kind}", str(folder)])  # the CLI finds it too
        assert getattr(args, kind) == folder
    finally:
        if writer.is_alive():
            os.kill(writer.pid, signal.SIGKILL)
            writer.join()
    assert not folder.exists()
    (save_adapter if kind == "adapter" else save_checkpoint)(new, folder)  # puts the old one back, then replaces it
    assert torch.equal(load(kind, folder, base)(tokens())[0], new(tokens())[0])
    assert os.listdir(tmp_path) == [kind]


@pytest.mark.parametrize("swap", ["renameat2", "two renames"])
def test_an_adapter_and_a_checkpoint_with_a_240_byte_name(saved, tmp_path, monkeypatch, swap):
    if swap == "two renames":
        monkeypatch.setattr(files, "_renameat2", None)
    base = saved["base"]
    model = adapted(base, LoRAConfig(r=2), seed=3)
    for i, name in enumerate(["a" * 240, "\u00e9" * 120]):  # 240 bytes each
        save_adapter(model, tmp_path / name)
        save_adapter(model, tmp_path / name)  # replacing: the hidden temp and old names fit too
        assert torch.equal(load("adapter", tmp_path / name, base)(tokens())[0], model(tokens())[0])
        save_checkpoint(base, tmp_path / f"{i}{name[1:]}")
        save_checkpoint(base, tmp_path / f"{i}{name[1:]}")
    assert len(os.listdir(tmp_path)) == 4


def test_an_empty_path_is_named_before_any_work(saved, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = adapted(saved["base"], LoRAConfig(r=2), seed=3)
    with pytest.raises(ValueError, match=r"save_adapter: the path is empty \(''\)"):
        save_adapter(model, "")
    with pytest.raises(ValueError, match=r"save_adapter: the path is empty"):
        save_adapter(tiny_gpt(), "")  # named before the model is even looked at
    with pytest.raises(ValueError, match=r"save_checkpoint: the path is empty \(''\)"):
        save_checkpoint(saved["base"], "")
    with pytest.raises(ValueError, match=r"the path is empty \(''\)"):
        export_peft(model, "")
    with pytest.raises(ValueError, match=r"save_adapter: '\.' names no folder of its own"):
        save_adapter(model, ".")  # the working directory, even an empty one, is not an adapter's folder
    assert os.listdir(tmp_path) == []

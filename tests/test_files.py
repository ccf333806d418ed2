"""files.py: writers never destroy what is not theirs; bundles are swapped in whole, checksummed and readable
while they are being replaced, even by a writer killed halfway."""

import json
import multiprocessing
import os
import random
import signal
import tempfile
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora_lab.storage import files
from lora_lab.storage.files import (
    OUTPUT_MARKER,
    CorruptFileError,
    OutputExistsError,
    check_bundle_target,
    claim_output_dir,
    read_bundle,
    write_bundle,
    write_file_atomic,
    write_json_atomic,
)

CONFIG, WEIGHTS, TAG = "config.json", "model.safetensors", "test.bundle.v1"
FORK = multiprocessing.get_context("fork")  # the children need lora_lab and torch already imported: fast starts


def bundle(value: float, size: int = 16) -> dict:
    """A bundle whose config says which value its tensor holds: a mixed (half old, half new) read shows."""
    return {WEIGHTS: {"w": torch.full((size,), float(value))}, CONFIG: {"format": TAG, "value": value}}


def write(directory, value: float, size: int = 16) -> Path:
    return write_bundle(directory, bundle(value, size), config_file=CONFIG, format_tag=TAG)


def read(directory) -> float:
    """The bundle's value, after checking that its config and its tensors belong together."""
    config, tensors = read_bundle(directory, config_file=CONFIG, tensor_files=[WEIGHTS])
    w = tensors[WEIGHTS]["w"]
    assert torch.all(w == config["value"]), "config and tensors come from different bundles"
    return config["value"]


def tree(path: Path) -> dict:
    """Everything under `path` (not following links): {relative path: ("dir",) | ("file", bytes) | ("link", target)}."""
    out = {}
    for root, dirs, names in os.walk(path):
        for name in dirs + names:
            p = Path(root) / name
            rel = str(p.relative_to(path))
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir",)
            else:
                out[rel] = ("file", p.read_bytes())
    return out


def temp_names(parent: Path) -> list[str]:
    return sorted(n for n in os.listdir(parent) if ".lora_lab-" in n)


# --- what may be replaced: property test over random existing trees ---------------------------------

names = st.sampled_from(["a.txt", "thesis.tex", "src", "model.safetensors", "config.json", "notes", ".hidden"])
contents = st.binary(max_size=40)
user_trees = st.recursive(contents, lambda inner: st.dictionaries(names, inner, min_size=1, max_size=4), max_leaves=8)


def build(path: Path, content) -> None:
    if isinstance(content, dict):
        path.mkdir()
        for name, sub in content.items():
            build(path / name, sub)
    else:
        path.write_bytes(content)


@st.composite
def existing_targets(draw):
    """(kind, how to build it at the target). Only missing, empty and same-kind bundles may be replaced."""
    kind = draw(
        st.sampled_from(
            [
                "missing",
                "empty",
                "bundle",
                "config only",
                "bundle + extra file",
                "bundle + extra folder",
                "other kind",
                "no format",
                "user tree",
                "file",
                "link to bundle",
                "link to nothing",
            ]
        )
    )
    extra = draw(st.sampled_from(["thesis.tex", "src", "lora_lab_base.json", ".DS_Store"]))
    payload = draw(contents)
    user = draw(st.dictionaries(names, user_trees, min_size=1, max_size=4))
    return kind, extra, payload, user


def make_target(root: Path, target: Path, kind, extra, payload, user) -> None:
    if kind == "missing":
        return
    if kind == "empty":
        target.mkdir()
    elif kind in ("bundle", "bundle + extra file", "bundle + extra folder"):
        write(target, 1.0)
        if kind == "bundle + extra file":
            (target / extra).write_bytes(payload)
        elif kind == "bundle + extra folder":
            (target / extra).mkdir()
    elif kind == "config only":
        target.mkdir()
        (target / CONFIG).write_text(json.dumps({"format": TAG}))
    elif kind == "other kind":
        write_bundle(
            target,
            {WEIGHTS: {"w": torch.ones(2)}, CONFIG: {"format": "another.kind"}},
            config_file=CONFIG,
            format_tag="another.kind",
        )
    elif kind == "no format":
        target.mkdir()
        (target / CONFIG).write_text(json.dumps({"value": 1}))
        (target / WEIGHTS).write_bytes(payload)
    elif kind == "user tree":
        build(target, user)
    elif kind == "file":
        target.write_bytes(payload)
    elif kind == "link to bundle":
        write(root / "real_bundle", 1.0)
        target.symlink_to(root / "real_bundle")
    elif kind == "link to nothing":
        target.symlink_to(root / "nowhere")


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(existing_targets(), st.dictionaries(names, user_trees, max_size=3))
def test_a_write_replaces_only_a_bundle_of_its_own_kind(existing, neighbours):
    kind, extra, payload, user = existing
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build(root / "neighbours", neighbours)  # the user's other files next to the target
        (root / ".target.backup").write_bytes(b"a name like ours, but not ours")
        target = root / "target"
        make_target(root, target, kind, extra, payload, user)
        before = tree(root)
        replaceable = kind in ("missing", "empty", "bundle", "config only")
        if replaceable:
            write(target, 2.0)
            assert read(target) == 2.0
            assert sorted(os.listdir(target)) == [CONFIG, WEIGHTS]
            after = tree(root)

            def outside(t):
                return {p: v for p, v in t.items() if p != "target" and not p.startswith("target/")}

            assert outside(after) == outside(before)  # nothing outside the target changed or was left behind
        else:
            with pytest.raises(OutputExistsError) as info:
                write(target, 2.0)
            message = str(info.value)
            assert str(target) in message and "choose another path" in message
            assert tree(root) == before  # refused: every byte as it was


def test_the_refusal_says_what_is_there(tmp_path):
    (tmp_path / "myproject" / "src").mkdir(parents=True)
    (tmp_path / "myproject" / "src" / "thesis.tex").write_text("chapter 1")
    (tmp_path / "myproject" / "README").write_text("mine")
    with pytest.raises(
        OutputExistsError,
        match=r"myproject: it is a folder holding README, src, and \['README', "
        r"'src'\] are not files of a test.bundle.v1 bundle",
    ):
        write(tmp_path / "myproject", 1.0)
    (tmp_path / "notes.txt").write_text("x" * 10)
    with pytest.raises(OutputExistsError, match=r"notes.txt: it is a file \(10 bytes\)"):
        write(tmp_path / "notes.txt", 1.0)
    assert (tmp_path / "myproject" / "src" / "thesis.tex").read_text() == "chapter 1"


def test_legacy_files_and_the_published_check(tmp_path):
    write(tmp_path / "b", 1.0)
    (tmp_path / "b" / "lora_lab_base.json").write_text("{}")  # written next to the bundle by an older CLI
    kwargs = dict(config_file=CONFIG, format_tag=TAG, files=[CONFIG, WEIGHTS])
    with pytest.raises(OutputExistsError, match="lora_lab_base.json"):
        check_bundle_target(tmp_path / "b", **kwargs)
    assert check_bundle_target(tmp_path / "b", legacy_files=["lora_lab_base.json"], **kwargs) == tmp_path / "b"
    write_bundle(tmp_path / "b", bundle(2.0), config_file=CONFIG, format_tag=TAG, legacy_files=["lora_lab_base.json"])
    assert sorted(os.listdir(tmp_path / "b")) == [CONFIG, WEIGHTS] and read(tmp_path / "b") == 2.0


def test_a_bundle_must_carry_its_format_tag(tmp_path):
    with pytest.raises(ValueError, match="must have 'format': 'test.bundle.v1'"):
        write_bundle(tmp_path / "b", {CONFIG: {"format": "other"}}, config_file=CONFIG, format_tag=TAG)
    assert not (tmp_path / "b").exists()


# --- checksums -------------------------------------------------------------------------------------


def test_checksums_are_recorded_and_verified(tmp_path):
    write(tmp_path / "b", 3.0)
    config = json.loads((tmp_path / "b" / CONFIG).read_text())
    assert set(config["checksums"]) == {WEIGHTS} and config["checksums"][WEIGHTS].startswith("sha256:")
    weights = tmp_path / "b" / WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x04  # a flipped bit inside the numbers: still a well-formed safetensors file
    weights.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match=f"{WEIGHTS} does not match its checksum in {CONFIG}"):
        read(tmp_path / "b")


def test_bundles_written_before_checksums_still_load(tmp_path):
    write(tmp_path / "b", 3.0)
    config = json.loads((tmp_path / "b" / CONFIG).read_text())
    del config["checksums"]
    (tmp_path / "b" / CONFIG).write_text(json.dumps(config))
    assert read(tmp_path / "b") == 3.0


def test_a_missing_bundle_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"No such folder: {tmp_path / 'nowhere'}"):
        read(tmp_path / "nowhere")


# --- interrupted writers, concurrent readers and writers ---------------------------------------------


def _write_and_exit(directory, value, size):
    write(directory, value, size)
    os._exit(0)


def test_a_writer_killed_at_any_point_leaves_the_old_or_the_new_bundle_whole(tmp_path):
    target = tmp_path / "b"
    size = 400_000  # 1.6 MB of tensors: a write takes long enough to be killed inside it
    write(target, 1.0, size)
    start = time.perf_counter()
    child = FORK.Process(target=_write_and_exit, args=(target, 1.0, size))
    child.start()
    child.join()
    duration = time.perf_counter() - start  # fork + one complete write
    rng = random.Random(8)
    current, outcomes, interrupted = 1.0, {"old": 0, "new": 0}, 0
    for trial in range(30):
        new = float(trial + 2)
        child = FORK.Process(target=_write_and_exit, args=(target, new, size))
        child.start()
        time.sleep(rng.uniform(0, 1.2 * duration))
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        value = read(target)  # whole: config and tensors agree and the checksum verifies
        assert value in (current, new)
        outcomes["old" if value == current else "new"] += 1
        current = value
        interrupted += bool(temp_names(tmp_path))  # killed inside the write: its temp folder is still there
    assert outcomes["old"] and outcomes["new"], f"kills did not land on both sides of the swap: {outcomes}"
    assert interrupted, "no kill landed inside a write"
    (tmp_path / f".b.lora_lab-tmp-{child.pid}-0123abcd").mkdir(exist_ok=True)  # as a killed writer leaves it
    write(target, 100.0, 16)  # the next write removes what killed writers left behind
    assert temp_names(tmp_path) == [] and os.listdir(tmp_path) == ["b"] and read(target) == 100.0
    print(f"one write {duration * 1000:.0f} ms; outcomes {outcomes}; killed inside a write: {interrupted} of 30")


def test_stale_temp_folders_are_removed_only_when_their_writer_is_dead(tmp_path):
    dead = FORK.Process(target=os._exit, args=(0,))
    dead.start()
    dead.join()
    stale = tmp_path / f".b.lora_lab-tmp-{dead.pid}-0123abcd"
    alive = tmp_path / f".b.lora_lab-old-{os.getpid()}-0123abcd"  # a writer that is still running
    other = tmp_path / f".c.lora_lab-tmp-{dead.pid}-0123abcd"  # another target's: not this write's business
    for folder in (stale, alive, other):
        folder.mkdir()
        (folder / WEIGHTS).write_bytes(b"half a bundle")
    (tmp_path / ".b.backup").mkdir()
    write(tmp_path / "b", 1.0)
    assert sorted(os.listdir(tmp_path)) == sorted([".b.backup", alive.name, other.name, "b"])


def _overwrite_forever(directory):
    value = 0.0
    while True:
        value += 1.0
        write(directory, value, 2000)


@pytest.mark.parametrize("swap", ["renameat2", "two renames"])
def test_a_reader_never_sees_a_missing_or_half_bundle(tmp_path, monkeypatch, swap):
    if swap == "two renames":  # the fallback where renameat2 is missing: readers retry over the gap
        monkeypatch.setattr(files, "_renameat2", None)
    elif files._renameat2 is None:
        pytest.skip("this system has no renameat2")
    target = tmp_path / "b"
    write(target, 0.0, 2000)
    writer = FORK.Process(target=_overwrite_forever, args=(target,))
    writer.start()
    try:
        values, deadline = [], time.monotonic() + 2.0
        while time.monotonic() < deadline:
            values.append(read(target))  # raises on a missing folder, a missing file or a mixed bundle
    finally:
        os.kill(writer.pid, signal.SIGKILL)
        writer.join()
    assert len(set(values)) > 5, "the writer did not overwrite the bundle while the reader read it"


def _write_many(directory, offset, count):
    for i in range(count):
        write(directory, offset + i, 2000)
    os._exit(0)


def test_two_concurrent_writers_both_succeed(tmp_path):
    target = tmp_path / "b"
    writers = [FORK.Process(target=_write_many, args=(target, offset, 40)) for offset in (1000.0, 2000.0)]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    assert [w.exitcode for w in writers] == [0, 0]
    assert read(target) in (1039.0, 2039.0)
    assert os.listdir(tmp_path) == ["b"]


# --- output folders and single files ------------------------------------------------------------------


def test_claim_output_dir(tmp_path):
    out = claim_output_dir(tmp_path / "runs" / "tour", "lora_lab.tour.v1")  # missing: created and marked
    assert json.loads((out / OUTPUT_MARKER).read_text()) == {"format": "lora_lab.tour.v1"}
    (out / "report.md").write_text("old report")
    assert claim_output_dir(out, "lora_lab.tour.v1") == out  # ours: accepted as it is
    assert (out / "report.md").read_text() == "old report"
    (tmp_path / "empty").mkdir()
    assert (claim_output_dir(tmp_path / "empty", "t") / OUTPUT_MARKER).is_file()

    home = tmp_path / "home"
    (home / "Documents").mkdir(parents=True)
    (home / ".bashrc").write_text("alias x=y")
    (tmp_path / "file").write_text("mine")
    (tmp_path / "link").symlink_to(out)
    for path, why in [
        (home, "no .lora_lab_output.json"),
        (out, "another kind"),
        (tmp_path / "file", "a file"),
        (tmp_path / "link", "symbolic link"),
    ]:
        before = tree(tmp_path)
        with pytest.raises(OutputExistsError, match=why):
            claim_output_dir(path, "lora_lab.sweep.v1" if path == out else "lora_lab.tour.v1")
        assert tree(tmp_path) == before


def test_claim_output_dir_refuses_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "thesis.tex").write_text("chapter 1")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OutputExistsError, match="thesis.tex"):
        claim_output_dir(".", "lora_lab.tour.v1")
    assert os.listdir(tmp_path) == ["thesis.tex"]


def test_single_files_replace_only_inside_a_claimed_folder(tmp_path):
    assert write_file_atomic(tmp_path / "new" / "a.txt", "one").read_text() == "one"  # new files: anywhere
    with pytest.raises(OutputExistsError, match="outside a folder claimed by lora_lab"):
        write_file_atomic(tmp_path / "new" / "a.txt", "two")
    assert (tmp_path / "new" / "a.txt").read_text() == "one"
    write_json_atomic(tmp_path / "new" / "a.txt", {"x": 1}, overwrite=True)  # the caller's explicit choice
    assert json.loads((tmp_path / "new" / "a.txt").read_text()) == {"x": 1}

    out = claim_output_dir(tmp_path / "out", "t")
    write_file_atomic(out / "report.md", "first")
    write_file_atomic(out / "report.md", "second")
    assert (out / "report.md").read_text() == "second"
    (out / "dir").mkdir()
    with pytest.raises(OutputExistsError, match="not a file lora_lab may replace"):
        write_file_atomic(out / "dir", "x")
    assert temp_names(out) == []


def dead_pid() -> int:
    dead = FORK.Process(target=os._exit, args=(0,))
    dead.start()
    dead.join()
    return dead.pid


def test_a_writer_killed_between_the_two_fallback_renames_loses_nothing(tmp_path):
    # Without renameat2 the old bundle is moved aside before the new one moves in. A writer killed in between
    # leaves the moved-aside copy and its own temp folder (the new bundle): readers read the old copy at the
    # target's path, and the next writer puts it back instead of deleting it.
    write(tmp_path / "b", 1.0)
    pid = dead_pid()
    write(tmp_path / f".b.lora_lab-tmp-{pid}-0123abcd", 2.0)  # the new bundle, whole, not yet moved in
    os.rename(tmp_path / "b", tmp_path / f".b.lora_lab-old-{pid}-0123abcd")
    assert read(tmp_path / "b") == 1.0 and files.bundle_exists(tmp_path / "b")  # no "No such folder"
    assert not (tmp_path / "b").exists()  # the reader changed nothing
    write(tmp_path / "c", 5.0)  # another target's write leaves it alone
    assert read(tmp_path / "b") == 1.0
    files._remove_stale_temps(tmp_path / "b")  # what the next write to b does first
    assert read(tmp_path / "b") == 1.0 and sorted(os.listdir(tmp_path)) == ["b", "c"]
    write(tmp_path / "b", 3.0)
    assert read(tmp_path / "b") == 3.0 and sorted(os.listdir(tmp_path)) == ["b", "c"]


def test_a_finished_swaps_leftover_is_never_read_or_put_back(tmp_path):
    # Killed after the second rename: the old copy has no temp folder beside it. If the user then deletes the
    # bundle, it stays deleted: the stale copy is neither read as the bundle nor moved back, only removed.
    pid = dead_pid()
    write(tmp_path / f".b.lora_lab-old-{pid}-0123abcd", 1.0)
    with pytest.raises(FileNotFoundError, match="No such folder"):
        read(tmp_path / "b")
    assert not files.bundle_exists(tmp_path / "b")
    write(tmp_path / "b", 2.0)
    assert read(tmp_path / "b") == 2.0 and os.listdir(tmp_path) == ["b"]


@pytest.mark.parametrize("swap", ["renameat2", "two renames"])
def test_a_target_name_of_up_to_255_bytes_works(tmp_path, monkeypatch, swap):
    if swap == "two renames":
        monkeypatch.setattr(files, "_renameat2", None)
    for name in ["a" * 221, "b" * 222, "c" * 240, "é" * 127 + "x", "d" * 255]:  # bytes, not characters
        target = tmp_path / name
        write(target, 1.0)
        write(target, 2.0)  # the hidden temp and old names of a long name fit too
        assert read(target) == 2.0
        write_file_atomic(tmp_path / f"{name[:-4]}.txt", "x" * 3)
    names = os.listdir(tmp_path)
    assert len(names) == 10 and temp_names(tmp_path) == []


def test_long_names_sharing_a_prefix_never_touch_each_others_temps(tmp_path):
    long_a, long_b = "x" * 230 + "-a", "x" * 230 + "-b"
    pid = dead_pid()
    stale_a = tmp_path / files._hidden_name(long_a, "tmp", pid, "0123abcd")
    stale_b = tmp_path / files._hidden_name(long_b, "tmp", pid, "0123abcd")
    assert stale_a != stale_b and all(len(p.name.encode()) <= 255 for p in (stale_a, stale_b))
    stale_a.mkdir()
    stale_b.mkdir()
    write(tmp_path / long_a, 1.0)
    assert sorted(os.listdir(tmp_path)) == sorted([long_a, stale_b.name])


@pytest.mark.parametrize("swap", ["renameat2", "two renames"])
def test_a_target_whose_name_contains_tmp_keeps_its_hidden_names_apart(tmp_path, monkeypatch, swap):
    # The old copy's name is built, not edited from the temp name: "run-tmp-1" must not become "run-old-1".
    if swap == "two renames":
        monkeypatch.setattr(files, "_renameat2", None)
    write(tmp_path / "run-tmp-1", 1.0)
    write(tmp_path / "run-tmp-1", 2.0)
    assert read(tmp_path / "run-tmp-1") == 2.0 and os.listdir(tmp_path) == ["run-tmp-1"]


def test_an_empty_path_is_named_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = ""
    for call in (
        lambda: write(path, 1.0),
        lambda: write_file_atomic(path, "x"),
        lambda: write_json_atomic(path, {}),
        lambda: claim_output_dir(path, "t"),
    ):
        with pytest.raises(ValueError, match=r"the path is empty \(''\)"):
            call()
    for where in (".", "..", "/", "runs/.."):
        with pytest.raises(ValueError, match=rf"{where!r} names no folder of its own"):
            write(where, 1.0)
    assert os.listdir(tmp_path) == []


def test_a_single_file_write_removes_its_own_stale_temp_files(tmp_path):
    dead = FORK.Process(target=os._exit, args=(0,))
    dead.start()
    dead.join()
    out = claim_output_dir(tmp_path / "out", "t")
    (out / f".report.md.lora_lab-tmp-{dead.pid}-0123abcd").write_text("half a report")
    (out / ".report.md.swp").write_text("the user's editor")
    write_file_atomic(out / "report.md", "done")
    assert sorted(os.listdir(out)) == [".lora_lab_output.json", ".report.md.swp", "report.md"]


# --- untrusted folders: regular files only, sizes bounded by what the files promise -------------------


def read_raw(directory):
    return read_bundle(directory, config_file=CONFIG, tensor_files=[WEIGHTS])


def with_alarm(fn, seconds=5):
    """Run fn, failing (not hanging) if it blocks: a FIFO opened for reading without a writer would."""

    def hung(*_):
        raise TimeoutError("the read blocked")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        return fn()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("which", [CONFIG, WEIGHTS])
def test_a_fifo_or_a_device_in_a_bundle_is_refused_without_blocking(tmp_path, which):
    write(tmp_path / "b", 1.0)
    (tmp_path / "b" / which).unlink()
    os.mkfifo(tmp_path / "b" / which)
    with pytest.raises(CorruptFileError, match=rf"{which} is a FIFO \(named pipe\); lora_lab reads only regular"):
        with_alarm(lambda: read_raw(tmp_path / "b"))
    (tmp_path / "b" / which).unlink()
    (tmp_path / "b" / which).symlink_to("/dev/zero")  # would read until memory runs out
    with pytest.raises(CorruptFileError, match=rf"{which} is a character device"):
        with_alarm(lambda: read_raw(tmp_path / "b"))


def test_a_link_to_a_regular_file_is_read(tmp_path):
    write(tmp_path / "b", 2.0)
    (tmp_path / "b" / WEIGHTS).rename(tmp_path / "elsewhere")
    (tmp_path / "b" / WEIGHTS).symlink_to(tmp_path / "elsewhere")
    config, tensors = read_raw(tmp_path / "b")
    assert config["value"] == 2.0 and torch.equal(tensors[WEIGHTS]["w"], torch.full((16,), 2.0))


def test_a_safetensors_header_that_promises_other_sizes_is_refused_before_reading(tmp_path):
    write(tmp_path / "b", 1.0)
    path = tmp_path / "b" / WEIGHTS
    data = path.read_bytes()
    path.write_bytes((10**12).to_bytes(8, "little") + data[8:])  # a header of a terabyte
    with pytest.raises(CorruptFileError, match="its header claims 1,000,000,000,000 bytes"):
        read_raw(tmp_path / "b")
    path.write_bytes(data + b"\0" * 1000)  # more bytes than the header describes
    with pytest.raises(CorruptFileError, match=r"header describes [\d,]+ bytes, the file holds"):
        read_raw(tmp_path / "b")


@given(depth=st.integers(65, 200_000), kind=st.sampled_from(["[", '{"a":']))
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_deeply_nested_json_is_refused_by_name(tmp_path, depth, kind):
    path = tmp_path / "deep.json"
    close = "]" if kind == "[" else "}"
    path.write_text('{"a": ' + kind * depth + "1" + close * depth + "}")
    with pytest.raises(CorruptFileError, match="nests JSON more than 64 levels deep"):
        files.read_json(path)


def test_a_huge_config_in_the_way_is_not_read_to_decide_whether_it_is_ours(tmp_path):
    write(tmp_path / "b", 1.0)
    os.truncate(tmp_path / "b" / CONFIG, 10 * 2**30)  # sparse: reading it whole would take 10 GB of memory
    with pytest.raises(OutputExistsError, match="config.json format: None"):
        with_alarm(lambda: write(tmp_path / "b", 2.0))
    assert (tmp_path / "b" / CONFIG).stat().st_size == 10 * 2**30 and temp_names(tmp_path) == []

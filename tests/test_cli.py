"""The lora-lab command line, called in-process through main([...]).

A quick base (the tiny preset pretrained for 20 steps, --pretrain-iters) is cached once per module;
fine-tunes take 10 steps. Data: $LORA_LAB_DATA, else a synthetic corpus passed as --data.
"""

import argparse
import json
import os

import pytest
import torch
from test_tasks import write_synthetic_corpus

from lora_lab import load_adapter, load_checkpoint, lora_layers
from lora_lab.cli import build_parser, main
from lora_lab.storage.adapters import read_adapter_metadata

FAST = ["--steps", "10", "--eval-chars", "300"]


@pytest.fixture(scope="module")
def base_args(tmp_path_factory):
    source = os.environ.get("LORA_LAB_DATA") or write_synthetic_corpus(tmp_path_factory.mktemp("data") / "input.txt")
    cache = tmp_path_factory.mktemp("cache")
    return ["--data", str(source), "--cache", str(cache), "--pretrain-iters", "20", "--device", "cpu", "--quiet"]


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return action.choices


def test_help_explains_every_option_of_every_subcommand(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "usage: lora-lab" in out
    assert "exit codes: 0 done; 1 the run failed" in " ".join(out.split())
    commands = subparsers()
    assert set(commands) == {
        "pretrain",
        "sample",
        "finetune",
        "compare",
        "merge",
        "sweep",
        "tour",
        "course",
        "paper-lab",
        "placement-lab",
    }
    for name, sub in commands.items():
        assert name in out
        code, out_sub, err = run(capsys, name, "--help")
        assert code == 0 and err == "" and f"usage: lora-lab {name}" in out_sub
        for action in sub._actions:
            assert action.help, f"{name}: {action.option_strings or action.dest} has no help text"
            for option in action.option_strings:
                assert option in out_sub
    code, out, _ = run(capsys, "tour", "--help")
    assert "--pretrain-iters" in out and "--rank" in out and "--no-full" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["finetune", "--rank", "0"], "argument --rank/-r: must be a positive integer, got '0'"),
        (["tour", "--rank", "-3"], "argument --rank/-r: must be a positive integer, got '-3'"),
        (["sweep", "--ranks", "4,0"], "argument --ranks: must be a positive integer, got '0'"),
        (["finetune", "--task", "hamlet"], "argument --task: invalid choice: 'hamlet'"),
        (["tour", "--device", "tpu"], "argument --device: Unknown device 'tpu'"),
        (["sample", "--adapter", "{tmp}/missing"], "adapter folder '{tmp}/missing' does not exist"),
        (["merge", "--adapter", "{tmp}/missing", "--out", "{tmp}/m"], "adapter folder '{tmp}/missing' does not exist"),
        (["merge", "--adapter", "{tmp}"], "is not a LoRA adapter folder"),
        (["sample", "--temperature", "0"], "argument --temperature: must be a number from 1e-06 to 1e+06, got '0'"),
        (["finetune", "--lr", "fast"], "argument --lr: must be a number from 1.18e-38 to 3.4e+38, got 'fast'"),
        (["finetune", "--targets", ","], "argument --targets: needs at least one module name"),
        (["finetune", "--targets", "qproj"], "LoRA target 'qproj' matches no module"),
        (["tour", "--rank", "200"], "LoRA rank r=200 exceeds min(d, k)"),
        (["sweep", "--targets", "qproj"], "LoRA target 'qproj' matches no module"),
        (["sweep", "--ranks", "2,200"], "LoRA rank r=200 exceeds min(d, k)"),
        (["finetune", "--seed", str(2**70)], "argument --seed: must be an integer from 0 to 2**63 - 1"),
        (["sample", "--seed", "-1"], "argument --seed: must be an integer from 0 to 2**63 - 1"),
        (["finetune", "--variant", "vera", "--vera-seed", str(2**62)], "vera_seed"),
        (["finetune", "--variant", "nosuch"], "Unknown LoRA variant 'nosuch'"),
        (["finetune", "--variant", "no_such_module_xyz:Thing"], "cannot import module 'no_such_module_xyz'"),
        (["finetune", "--variant", "dora", "--vera-seed", "3"], "vera_seed"),
        (["finetune", "--full", "--variant", "dora", "--rank", "4"], "--rank, --variant: LoRA option(s); --full"),
        (["finetune", "--full", "--lora-plus"], "--lora-plus: LoRA option(s); --full trains every weight"),
        (["sample", "--allow-other-base"], "--allow-other-base does not apply without --adapter"),
        (["sample", "--variant", "dora"], "--variant does not apply without --adapter"),
        (["train"], "argument COMMAND: invalid choice: 'train'"),
        ([], "the following arguments are required: COMMAND"),
    ],
)
def test_bad_arguments_give_one_clear_line_and_exit_code_2(capsys, tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)  # default output folders would land here
    argv = [a.format(tmp=tmp_path) for a in argv] + ["--cache", str(tmp_path / "cache")] * bool(argv)
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert out == "" and err.count("\n") == 1 and "Traceback" not in err
    assert message.format(tmp=tmp_path) in err
    assert list(tmp_path.iterdir()) == []  # nothing trained, cached or written


def test_cuda_without_a_gpu_is_a_usage_error(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU, so --device cuda is valid")
    code, _, err = run(capsys, "finetune", "--device", "cuda")
    assert code == 2 and "torch sees no CUDA GPU" in err and err.count("\n") == 1


def test_pretrain_reports_the_cache_and_losses(capsys, base_args):
    code, out, _ = run(capsys, "pretrain", *base_args)
    assert code == 0
    assert "base GPT: 4 layers x 128 dims" in out and "pretraining losses after 20 steps" in out
    code, out, _ = run(capsys, "pretrain", *base_args)
    assert code == 0 and "loaded from cache" in out


def test_bad_input_found_after_loading_is_one_line_and_changes_nothing(capsys, base_args, tmp_path):
    code, out, err = run(capsys, "sample", *base_args, "--prompt", "caf\u00e9")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "'\u00e9' is not in the tokenizer's vocabulary" in err
    keep = tmp_path / "notes"
    keep.mkdir()
    (keep / "todo.txt").write_text("mine")
    code, _, err = run(capsys, "finetune", *base_args, *FAST, "--out", keep)
    assert code == 2 and f"--out: Refusing to write {keep}" in err and "choose another path" in err
    assert [p.name for p in keep.iterdir()] == ["todo.txt"] and (keep / "todo.txt").read_text() == "mine"


def test_finetune_merge_sample_end_to_end(capsys, base_args, tmp_path):
    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    code, out, _ = run(
        capsys,
        "finetune",
        *base_args,
        *FAST,
        "--task",
        "romeo_juliet",
        "--rank",
        "2",
        "--targets",
        "q_proj,v_proj",
        "--out",
        adapter,
    )
    assert code == 0, out
    assert "| base " in out and "| LoRA r=2 " in out and f"saved the adapter to {adapter}" in out
    assert {p.name for p in adapter.iterdir()} == {"adapter_model.safetensors", "adapter_config.json"}
    record = read_adapter_metadata(adapter)  # which base: in the adapter's own config, no side file
    assert record["task"] == "romeo_juliet" and record["base"]["pretrain_iters"] == 20
    code, out, _ = run(capsys, "merge", *base_args, "--adapter", adapter, "--out", merged)
    assert code == 0 and "max |logits(merged) - logits(base + adapter)|" in out

    # The merged checkpoint is a plain GPT computing what base + adapter computes.
    plain, meta = load_checkpoint(merged)
    assert not lora_layers(plain) and meta["merged_from"] == str(adapter.resolve())
    base, _ = load_checkpoint(record["base"]["checkpoint"])
    load_adapter(base, adapter)
    assert len(lora_layers(base)) == 2 * 4  # q and v in 4 blocks
    x = torch.randint(plain.config.vocab_size, (2, plain.config.block_size), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(plain(x)[0], base(x)[0], atol=1e-5, rtol=1e-5)

    samples = {}
    for source in (["--adapter", adapter], ["--checkpoint", merged]):
        code, out, _ = run(capsys, "sample", *base_args, *source, "--prompt", "ROMEO:", "-n", "40", "--seed", "3")
        assert code == 0 and out.startswith("ROMEO:") and len(out) == len("ROMEO:") + 40 + 1
        samples[source[0]] = out
    assert samples["--adapter"] == samples["--checkpoint"]  # same model, same seed, same text

    full = tmp_path / "full"
    code, out, _ = run(capsys, "finetune", *base_args, *FAST, "--full", "--out", full)
    assert code == 0 and "| full FT " in out and (full / "config.json").is_file()
    code, _, err = run(capsys, "merge", *base_args, "--adapter", full, "--out", tmp_path / "m2")
    assert code == 2 and "is not a LoRA adapter folder" in err


def test_sweep_writes_table_and_plot(capsys, base_args, tmp_path):
    out_dir = tmp_path / "sweep"
    code, out, _ = run(
        capsys, "sweep", *base_args, *FAST, "--ranks", "1,2", "--targets", "q_proj", "--task", "shout", "--out", out_dir
    )
    assert code == 0 and "Rank sweep on shout" in out
    assert sorted(p.name for p in out_dir.iterdir()) == [".lora_lab_output.json", "sweep.csv", "sweep.png"]
    assert len((out_dir / "sweep.csv").read_text().splitlines()) == 3


def test_compare_runs_the_protocol_and_a_second_call_is_cached(capsys, base_args, tmp_path):
    out_dir = tmp_path / "compare"
    code, out, _ = run(capsys, "compare", *base_args, "--steps", "3", "--rank", "2", "--out", out_dir)
    assert code == 0, out
    assert "Task rot13: 3 steps, seeds [0, 1, 2, 3, 4]" in out and "| base " in out and "| LoRA r=2 " in out
    assert "| full FT " in out and "would arise by chance" in out and "Holm" in out
    assert sorted(p.name for p in out_dir.iterdir()) == [
        ".lora_lab_output.json",
        "comparison.json",
        "comparison.md",
        "curves.png",
    ]
    record = json.loads((out_dir / "comparison.json").read_text())
    assert [m["label"] for m in record["methods"]] == ["LoRA r=2", "full FT"]
    assert all(len(m["runs"]) == 5 for m in record["methods"])
    first_table = out.split("| method")[1].split("\n\n")[0]
    code, out, _ = run(capsys, "compare", *base_args, "--steps", "3", "--rank", "2", "--out", out_dir)
    assert code == 0 and out.split("| method")[1].split("\n\n")[0] == first_table  # cached: identical numbers


def test_tour_end_to_end(capsys, base_args, tmp_path):
    out_dir = tmp_path / "tour"
    code, out, _ = run(capsys, "tour", *base_args, *FAST, "--out", out_dir)
    assert code == 0, out
    for step in ("== 1.", "== 2. The task 'rot13'", "== 3. LoRA", "== 3b. Full", "== 4. Merge", "== 5. Report"):
        assert step in out
    report = json.loads((out_dir / "report.json").read_text())
    assert report["merge_ok"] is True and report["merge_max_logit_gap"] < 1e-4
    assert [r["method"] for r in report["results"]] == ["lora", "full"]
    lora, full = report["results"]
    assert lora["trainable_params"] < full["trainable_params"] == report["base_params"]
    assert report["adapter_bytes"] * 10 < report["merged_bytes"]
    assert (out_dir / "loss_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert (out_dir / "adapter" / "adapter_config.json").is_file() and (out_dir / "merged" / "config.json").is_file()
    markdown = (out_dir / "report.md").read_text()
    assert markdown.startswith("# lora-lab tour: LoRA on `rot13`") and "```text\nXVAT EVPUNEQ VVV:\n" in markdown
    assert "lora-lab tour: LoRA on 'rot13'\n===" in out  # the text rendering is printed
    assert "| base " in markdown and "target_acc" in markdown  # rot13 is scored by accuracy too
    assert "merged == unmerged: max |logit difference|" in out and "-> OK" in out
    assert f"{report['merge_max_logit_gap']:.2e} -> OK" in markdown
    assert json.loads((out_dir / "adapter" / "adapter_config.json").read_text())["metadata"]["task"] == "rot13"
    assert lora["task"] == "rot13" and 0.0 <= lora["target_accuracy"] <= 1.0
    assert lora["base_target_loss"] > lora["base_source_loss"]  # ROT13 text is new to the base: a real gap


# ----------------------------------------------------------------------------------------------
# Output paths are checked before any work, and nothing of the user's is touched


def tree(path):
    """Every path under `path` with its bytes (files) or None (folders): a snapshot to compare."""
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else None) for p in sorted(path.rglob("*"))}


@pytest.mark.parametrize(
    "command",
    [
        ["finetune"],
        ["finetune", "--full"],
        ["sweep", "--ranks", "1"],
        ["tour"],
        ["merge", "--adapter", "{adapter}"],
    ],
)
@pytest.mark.parametrize("where", [".", "~", "~/notes", "notes/todo.txt"])
def test_out_that_the_writer_would_refuse_fails_first_and_touches_nothing(
    capsys, tmp_path, monkeypatch, command, where
):
    home, work = tmp_path / "home", tmp_path / "work"
    for folder in (home / "notes", work / "notes"):
        folder.mkdir(parents=True)
        (folder / "todo.txt").write_text("mine")
    (home / ".bashrc").write_text("export X=1")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")  # enough for the argument check; never read
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    before = tree(tmp_path)
    argv = [a.format(adapter=adapter) for a in command]
    code, out, err = run(capsys, *argv, "--out", where, "--cache", tmp_path / "cache", "--data", tmp_path / "no-data")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "--out: Refusing to write" in err and "choose another path" in err
    assert tree(tmp_path) == before  # no base loaded (no cache), no marker, nothing moved or removed


def test_a_failed_run_takes_back_the_output_folder_it_claimed(capsys, tmp_path):
    out_dir = tmp_path / "tour"
    code, _, err = run(capsys, "tour", "--out", out_dir, "--data", tmp_path / "no-data", "--cache", tmp_path / "c")
    assert code == 2 and "does not exist" in err
    assert not out_dir.exists()


def test_a_diverged_finetune_saves_nothing_and_exits_1(capsys, base_args, tmp_path):
    out_dir = tmp_path / "rj"
    code, out, err = run(capsys, "finetune", *base_args, *FAST, "--lr", "1e6", "--out", out_dir)
    assert code == 1, (out, err)
    assert "diverged" in err and "nothing was saved" in err and "smaller learning rate" in err
    assert "saved" not in out and not out_dir.exists()


# ----------------------------------------------------------------------------------------------
# Which base an adapter belongs to


def _adapter_from_python(capsys, base_args, path):
    """An adapter saved outside the CLI (no base record) on the module's 20-step base, with random A and B.
    Returns (the base's cache folder, its vocabulary)."""
    from lora_lab import LoRAConfig, apply_lora, save_adapter

    code, out, _ = run(capsys, "pretrain", *base_args)
    assert code == 0
    base_path = out.split(" at ", 1)[1].split(")")[0]  # "... (loaded from cache at PATH)"
    model, meta = load_checkpoint(base_path)
    torch.manual_seed(1)
    apply_lora(model, LoRAConfig(r=2, targets=("q_proj",)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.5)
    save_adapter(model, path)
    return base_path, meta["vocab"]


def test_adapter_of_another_base_is_refused_unless_allowed(capsys, base_args, tmp_path):
    adapter = tmp_path / "adapter"
    _adapter_from_python(capsys, base_args, adapter)
    other_base = [a if a != "20" else "21" for a in base_args]  # --pretrain-iters 21: same shape, other weights
    code, out, err = run(capsys, "sample", *other_base, "--adapter", adapter, "-n", "20")
    assert code == 2 and out == "" and "trained on other base weights" in err and "--allow-other-base" in err
    code, out, err = run(capsys, "sample", *other_base, "--adapter", adapter, "-n", "20", "--allow-other-base")
    assert code == 0 and len(out) == 1 + 20 + 1
    code, out, _ = run(
        capsys, "merge", *other_base, "--adapter", adapter, "--out", tmp_path / "m", "--allow-other-base"
    )
    assert code == 0 and (tmp_path / "m" / "config.json").is_file()


def test_an_unverified_adapter_is_refused_unless_the_user_opts_in(capsys, base_args, tmp_path):
    adapter = tmp_path / "adapter"
    _adapter_from_python(capsys, base_args, adapter)
    config_file = adapter / "adapter_config.json"
    config = json.loads(config_file.read_text())
    del config["checksums"]  # as an edited (or lora_lab 0.1) adapter would be
    config_file.write_text(json.dumps(config))
    before = {p.name: p.read_bytes() for p in adapter.iterdir()}
    code, out, err = run(capsys, "sample", *base_args, "--adapter", adapter, "-n", "10")
    assert code == 2 and out == "" and "checksums" in err and "Traceback" not in err
    code, out, err = run(capsys, "sample", *base_args, "--adapter", adapter, "-n", "10", "--allow-unverified")
    assert code == 0 and len(out) == 1 + 10 + 1, err
    assert {p.name: p.read_bytes() for p in adapter.iterdir()} == before  # reading never rewrites the adapter


def test_an_old_adapter_with_the_side_file_still_finds_its_base(capsys, base_args, tmp_path):
    adapter = tmp_path / "old"
    base_path, vocab = _adapter_from_python(capsys, base_args, adapter)
    (adapter / "lora_lab_base.json").write_text(
        json.dumps(
            {
                "format": "lora_lab.cli.base.v1",
                "preset": "tiny",
                "pretrain_iters": 20,
                "base_checkpoint": base_path,
                "vocab": vocab,
                "task": "shout",
            }
        )
    )
    other_base = [a if a != "20" else "21" for a in base_args]
    code, out, err = run(capsys, "sample", *other_base, "--adapter", adapter, "-n", "10")
    assert code == 0, err  # the side file points at the right base, not at the 21-step one of the arguments


def test_sampling_a_dropout_model_is_fixed_by_the_seed(capsys, base_args, tmp_path):
    # A checkpoint with dropout 0.5 (as the small preset has 0.2): sampling must switch dropout off.
    from lora_lab import GPT, GPTConfig, save_checkpoint

    vocab = "".join(sorted(set("\nabcdefgh ")))
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=len(vocab), block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.5))
    save_checkpoint(model, tmp_path / "ckpt", metadata={"vocab": vocab})
    outs = {
        run(
            capsys, "sample", *base_args, "--checkpoint", tmp_path / "ckpt", "--prompt", "ab", "--seed", "4", "-n", "50"
        )[1]
        for _ in range(3)
    }
    assert len(outs) == 1 and len(outs.pop()) == 2 + 50 + 1


def test_a_corrupt_cache_entry_says_how_to_recover(capsys, base_args, tmp_path):
    args = list(base_args)
    args[args.index("--cache") + 1] = str(tmp_path / "cache")  # a cache of its own, to break
    code, _, _ = run(capsys, "pretrain", *args)
    assert code == 0
    (entry,) = (tmp_path / "cache").iterdir()
    weights = entry / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF  # a flipped bit inside a tensor
    weights.write_bytes(bytes(data))
    code, out, err = run(capsys, "sample", *args, "-n", "5")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert str(entry) in err and "--retrain" in err
    code, out, _ = run(capsys, "pretrain", *args, "--retrain")
    assert code == 0 and "trained and cached" in out
    code, out, _ = run(capsys, "sample", *args, "-n", "5")
    assert code == 0


# ----------------------------------------------------------------------------------------------
# Every option is used or refused; paths and ranges are checked before any work


def test_sweep_trains_the_variant_it_is_asked_for(capsys, base_args, tmp_path):
    tables = {}
    for variant in ("lora", "vera"):
        out_dir = tmp_path / variant
        code, out, err = run(
            capsys, "sweep", *base_args, *FAST, "--ranks", "2", "--targets", "q_proj", "--variant", variant,
            "--out", out_dir,
        )  # fmt: skip
        assert code == 0, err
        tables[variant] = (out_dir / "sweep.csv").read_text().splitlines()[1].split(",")
    columns = ["rank", "alpha", "targets", "trainable_params"]
    lora, vera = ({c: row[i] for i, c in enumerate(columns)} for row in tables.values())
    assert int(vera["trainable_params"]) < int(lora["trainable_params"])  # VeRA trains only its two vectors


@pytest.mark.parametrize(
    "argv, message",
    [
        (["finetune", "--out", "{tmp}/notes.txt/adapter"], "notes.txt is a file"),
        (["tour", "--out", "{tmp}/notes.txt/tour"], "notes.txt is a file"),
        (["pretrain", "--cache", "{tmp}/notes.txt"], "--cache: {tmp}/notes.txt cannot be a folder"),
        (["finetune", "--cache", "{tmp}/notes.txt/cache"], "--cache: {tmp}/notes.txt/cache cannot be a folder"),
    ],
)
def test_paths_that_cannot_be_written_fail_first_and_change_nothing(capsys, tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    argv = [a.format(tmp=tmp_path) for a in argv]
    if "--cache" not in argv:
        argv += ["--cache", str(tmp_path / "cache")]
    code, out, err = run(capsys, *argv, "--data", tmp_path / "no-data")
    assert code == 2 and out == "" and err.count("\n") == 1 and "Traceback" not in err
    assert message.format(tmp=tmp_path) in err
    assert (
        sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"] and (tmp_path / "notes.txt").read_text() == "mine"
    )


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs a user whom file permissions bind")
def test_a_folder_that_cannot_be_written_is_named_before_any_work(capsys, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code, out, err = run(capsys, "finetune", "--out", locked / "adapter", "--cache", tmp_path / "c")
    finally:
        locked.chmod(0o700)
    assert code == 2 and f"--out: cannot write under {locked}" in err and err.count("\n") == 1
    assert list(locked.iterdir()) == [] and not (tmp_path / "c").exists()


USER_VARIANT = '''
from lora_lab import LoRALinear


class HalfLoRA(LoRALinear):
    """LoRA whose update is scaled by a factor of its own. Trainable parameters per layer: r*(d+k)"""

    variant = "half_lora"
    options = {"factor": 0.5}

    @property
    def scale(self):
        return self.options["factor"] * self.alpha / self.r
'''


def test_a_users_variant_trains_saves_and_loads_through_the_cli(base_args, tmp_path):
    import subprocess
    import sys

    (tmp_path / "my_variants.py").write_text(USER_VARIANT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}

    def cli(*argv):
        done = subprocess.run(
            [sys.executable, "-m", "lora_lab.cli", *map(str, argv)], env=env, capture_output=True, text=True
        )
        return done.returncode, done.stdout, done.stderr

    adapter = tmp_path / "adapter"
    spec = "my_variants:HalfLoRA"
    code, out, err = cli(
        "finetune", *base_args, *FAST, "--variant", spec, "--factor", "0.25", "-r", "2", "--out", adapter
    )
    assert code == 0, err
    assert "| half_lora r=2 " in out  # the one label rule names the variant
    saved = json.loads((adapter / "adapter_config.json").read_text())
    assert json.dumps(saved).count("half_lora") >= 1 and "0.25" in json.dumps(saved)
    code, out, err = cli("sample", *base_args, "--adapter", adapter, "--variant", spec, "-n", "12")
    assert code == 0 and len(out) == 1 + 12 + 1, err
    code, out, err = cli("sample", *base_args, "--adapter", adapter, "-n", "12")  # not imported: named, exit 2
    assert code == 2 and "half_lora" in err and err.count("\n") == 1 and "Traceback" not in err
    code, _, err = cli("finetune", *base_args, *FAST, "--variant", spec, "--factor", "x", "--out", tmp_path / "b")
    assert code == 2 and "--factor" in err and not (tmp_path / "b").exists()


@pytest.mark.parametrize(
    "argv, option",
    [
        (["finetune", "--batch-size", "1000000000"], "--batch-size"),
        (["finetune", "--batch-size", "5000"], "--batch-size"),  # 5,000 x the tiny preset's 64 tokens: too many
        (["finetune", "--threads", "100000"], "--threads"),
        (["finetune", "--alpha", "1e308"], "--alpha"),
        (["finetune", "--lr", "1e39"], "--lr"),
        (["finetune", "--steps", "10000000"], "--steps"),
        (["finetune", "--pretrain-iters", "3000"], "--pretrain-iters"),
        (["sample", "--temperature", "1e-9"], "--temperature"),
        (["sample", "--chars", "10000000"], "--chars"),
    ],
)
def test_values_that_would_hang_overflow_or_exhaust_memory_are_refused_before_any_work(
    capsys, tmp_path, monkeypatch, argv, option
):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, *argv, "--cache", tmp_path / "cache")
    assert code == 2 and out == "" and err.count("\n") == 1 and option in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # nothing pretrained, cached or written

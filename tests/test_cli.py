"""The lora-lab command line, called in-process through main([...]).

A quick base (the tiny preset pretrained for 20 steps, --pretrain-iters) is cached once per module;
fine-tunes take 10 steps. Data: $LORA_LAB_DATA, else a synthetic corpus passed as --data.
"""
import argparse
import json
import os

import pytest
import torch

from lora_lab import load_checkpoint
from lora_lab.cli import build_parser, main
from lora_lab import load_adapter, lora_layers
from test_tasks import write_synthetic_corpus

FAST = ["--steps", "10", "--eval-iters", "2"]


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
    commands = subparsers()
    assert set(commands) == {"pretrain", "sample", "finetune", "merge", "sweep", "tour"}
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
        (["sample", "--temperature", "0"], "argument --temperature: must be a positive number, got '0'"),
        (["finetune", "--lr", "fast"], "argument --lr: must be a positive number, got 'fast'"),
        (["finetune", "--targets", ","], "argument --targets: needs at least one module name"),
        (["finetune", "--targets", "qproj"], "LoRA target 'qproj' matches no module"),
        (["tour", "--rank", "200"], "LoRA rank r=200 exceeds min(d, k)"),
        (["sweep", "--targets", "qproj"], "LoRA target 'qproj' matches no module"),
        (["sweep", "--ranks", "2,200"], "LoRA rank r=200 exceeds min(d, k)"),
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
    assert code == 2 and "is not empty and is not a LoRA adapter" in err
    assert [p.name for p in keep.iterdir()] == ["todo.txt"] and (keep / "todo.txt").read_text() == "mine"


def test_finetune_merge_sample_end_to_end(capsys, base_args, tmp_path):
    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    code, out, _ = run(capsys, "finetune", *base_args, *FAST, "--task", "romeo_juliet", "--rank", "2",
                       "--targets", "q_proj,v_proj", "--out", adapter)
    assert code == 0, out
    assert "| base " in out and "| LoRA r=2 " in out and f"saved the adapter to {adapter}" in out
    assert {p.name for p in adapter.iterdir()} == {"adapter_model.safetensors", "adapter_config.json",
                                                   "lora_lab_base.json"}
    code, out, _ = run(capsys, "merge", *base_args, "--adapter", adapter, "--out", merged)
    assert code == 0 and "max |logits(merged) - logits(base + adapter)|" in out

    # The merged checkpoint is a plain GPT computing what base + adapter computes.
    plain, meta = load_checkpoint(merged)
    assert not lora_layers(plain) and meta["merged_from"] == str(adapter.resolve())
    base, _ = load_checkpoint(json.loads((adapter / "lora_lab_base.json").read_text())["base_checkpoint"])
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
    code, out, _ = run(capsys, "sweep", *base_args, *FAST, "--ranks", "1,2", "--targets", "q_proj",
                       "--task", "shout", "--out", out_dir)
    assert code == 0 and "Rank sweep on shout" in out
    assert sorted(p.name for p in out_dir.iterdir()) == ["sweep.csv", "sweep.png"]
    assert len((out_dir / "sweep.csv").read_text().splitlines()) == 3


def test_tour_end_to_end(capsys, base_args, tmp_path):
    out_dir = tmp_path / "tour"
    code, out, _ = run(capsys, "tour", *base_args, *FAST, "--out", out_dir)
    assert code == 0, out
    for step in ("== 1.", "== 2. The task 'shout'", "== 3. LoRA", "== 3b. Full", "== 4. Merge", "== 5. Report"):
        assert step in out
    report = json.loads((out_dir / "report.json").read_text())
    assert report["merge_ok"] is True and report["merge_max_logit_gap"] < 1e-4
    assert [r["method"] for r in report["results"]] == ["lora", "full"]
    lora, full = report["results"]
    assert lora["trainable_params"] < full["trainable_params"] == report["base_params"]
    assert report["adapter_bytes"] * 10 < report["merged_bytes"]
    assert (out_dir / "loss_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert (out_dir / "adapter" / "adapter_config.json").is_file() and (out_dir / "merged" / "config.json").is_file()
    assert (out_dir / "report.md").read_text() in out
    assert "merged == unmerged: max |logit difference|" in out and "-> OK" in out

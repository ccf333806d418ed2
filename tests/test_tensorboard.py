"""TensorBoard logs (lora_lab.tensorboard_logs): what train(), the protocol and the CLI write, read back with
tensorboard's own event reader and compared with the run's own record.

TensorBoard stores scalars as float32, so "the same number" here means the recorded number rounded to float32,
compared with ==. Losses are float32 already; learning rates and protocol scores are float64 and get rounded."""

import copy
import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_finetune import setup  # noqa: F401 (the module-scoped synthetic base)
from test_tasks import write_synthetic_corpus

from lora_lab import GPT, TrainConfig, train
from lora_lab.cli import main
from lora_lab.experiments.pretrained import cache_key
from lora_lab.experiments.protocol import compare, lora_method
from lora_lab.experiments.runs import CACHED_RUN_NOTE, run_key
from lora_lab.tasks import make_task
from lora_lab.tensorboard_logs import EVENT_FILE_PREFIX, log_recorded_run, run_log_dir
from lora_lab.train import BatchSampler, learning_rate_at

FAST = dict(max_iters=23, batch_size=4, eval_interval=10, eval_iters=2, warmup_iters=5, device="cpu", bf16=False)


def _data(n=2000, vocab=17, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.where(
        torch.rand(n, generator=g) < 0.05, torch.randint(0, vocab, (n,), generator=g), torch.arange(n) % 7
    )


def f32(value: float) -> float:
    return float(np.float32(value))


def events(folder) -> EventAccumulator:
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def scalars(acc: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def event_files(folder) -> list[Path]:
    return sorted(p for p in Path(folder).rglob(f"{EVENT_FILE_PREFIX}*"))


def first_step_grad_norm(model: GPT, data: torch.Tensor, cfg: TrainConfig) -> float:
    """The gradient norm of train()'s first step, recomputed by hand: same weights, same first batch."""
    model = copy.deepcopy(model).train()
    x, y = BatchSampler(
        data, cfg.batch_size, model.config.block_size, torch.Generator().manual_seed(cfg.seed), torch.device("cpu")
    )()
    _, loss = model(x, y)
    loss.backward()
    return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])).item()


@pytest.mark.parametrize("grad_clip", [1.0, 0.0])  # clipped: clip_grad_norm_'s norm; unclipped: computed for the log
def test_train_logs_the_recorded_losses_rates_norms_and_evaluations(tiny_config, tmp_path, grad_clip):
    torch.manual_seed(3)
    model = GPT(tiny_config)
    untrained = copy.deepcopy(model)
    cfg = TrainConfig(**FAST, grad_clip=grad_clip, log_interval=7, log_dir=tmp_path / "run")  # reads in chunks 7,7,7,2
    res = train(model, _data(), _data(seed=1), cfg, progress=False)
    (only,) = event_files(tmp_path / "run")
    acc = events(tmp_path / "run")
    steps = list(range(cfg.max_iters))
    assert scalars(acc, "train/loss") == [(i, f32(v)) for i, v in zip(steps, res.losses)]
    assert scalars(acc, "train/lr") == [(i, f32(learning_rate_at(i, cfg))) for i in steps]
    for name in ("train", "val"):
        assert scalars(acc, f"eval/{name}") == [(e["iter"], f32(e[name])) for e in res.evals]
    assert [e["iter"] for e in res.evals] == [0, 10, 20, 23]
    norms = scalars(acc, "train/grad_norm")
    assert [s for s, _ in norms] == steps and all(np.isfinite(v) and v > 0 for _, v in norms)
    assert norms[0][1] == pytest.approx(first_step_grad_norm(untrained, _data(), cfg), rel=1e-5)
    assert len({v for _, v in norms}) > 1  # a norm per step, not one number repeated

    # Logging changes nothing about the run: the same config without a log trains bit for bit alike.
    torch.manual_seed(3)
    plain = GPT(tiny_config)
    again = train(plain, _data(), _data(seed=1), replace(cfg, log_dir=None), progress=False)
    assert again.losses == res.losses and again.evals == res.evals
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), plain.parameters()))
    assert event_files(tmp_path) == [only]


def test_the_log_folder_is_not_part_of_a_runs_identity(setup, tmp_path):  # noqa: F811
    base, tokenizer, splits = setup
    task = make_task("shout", splits)
    cfg = TrainConfig(**FAST)
    logged = replace(cfg, log_dir=tmp_path / "tb")
    assert "log_dir" not in logged.to_dict() and logged.to_dict() == cfg.to_dict()
    assert run_key("base", task, None, logged, 300, 3) == run_key("base", task, None, cfg, 300, 3)
    assert cache_key(base.config, logged, "text", ["a"]) == cache_key(base.config, cfg, "text", ["a"])
    assert run_key("base", task, None, replace(cfg, seed=1), 300, 3) != run_key("base", task, None, cfg, 300, 3)


def test_a_bad_log_dir_is_named(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="notes.txt is a file"):
        TrainConfig(**FAST, log_dir=tmp_path / "notes.txt")
    with pytest.raises(ValueError, match="log_dir must be a folder path"):
        TrainConfig(**FAST, log_dir=5)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_missing_tensorboard_is_named_with_its_extra_before_any_work(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # `import torch.utils.tensorboard` now fails
    with pytest.raises(ImportError, match=r"pip install 'lora-lab\[tensorboard\]'"):
        TrainConfig(**FAST, log_dir=tmp_path / "tb")
    argv = ["--tensorboard", tmp_path / "tb", "--cache", tmp_path / "cache", "--out", tmp_path / "adapter"]
    code = main(["finetune", *map(str, argv), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "--tensorboard:" in err and "pip install 'lora-lab[tensorboard]'" in err
    assert sorted(tmp_path.iterdir()) == []  # no cache, no log folder, no adapter: nothing was touched


def test_only_rank_0_writes(tiny_config, tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")  # what torchrun tells rank 1 (is_main_process reads it before any group)
    train(GPT(tiny_config), _data(), None, TrainConfig(**FAST, log_dir=tmp_path / "tb"), progress=False)
    assert not log_recorded_run(tmp_path / "tb", [1e-3], [{"step": 0, "target": 1.0}])
    assert not (tmp_path / "tb").exists()


WORKER = """
import json, os, sys
import torch
from lora_lab import GPT, GPTConfig, TrainConfig, train
torch.set_num_threads(1)
out, rank = sys.argv[1], int(os.environ["RANK"])
torch.manual_seed(0)
model = GPT(GPTConfig(vocab_size=13, block_size=16, n_layer=2, n_head=2, n_embd=32))
data = torch.randint(0, 13, (3000,), generator=torch.Generator().manual_seed(0))
cfg = TrainConfig(max_iters=6, batch_size=4, eval_interval=3, eval_iters=2, warmup_iters=1, device="cpu",
                  bf16=False, log_dir=os.path.join(out, f"rank{rank}"))
res = train(model, data, None, cfg, progress=False)
json.dump(res.losses, open(os.path.join(out, f"losses{rank}.json"), "w"))
"""


def test_under_torchrun_only_rank_0_writes_and_logs_the_mean_over_ranks(tmp_path):
    import json
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(WORKER))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1"]
    command += ["--master_addr=127.0.0.1", f"--master_port={port}", str(script), str(tmp_path)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert not (tmp_path / "rank1").exists()  # rank 1 was given a folder of its own, and wrote nothing
    (only,) = event_files(tmp_path)
    losses = json.loads((tmp_path / "losses0.json").read_text())
    assert losses == json.loads((tmp_path / "losses1.json").read_text())  # the mean over ranks, on every rank
    assert scalars(events(tmp_path / "rank0"), "train/loss") == [(i, f32(v)) for i, v in enumerate(losses)]


def test_protocol_runs_log_under_task_method_lr_seed_and_cached_runs_from_their_record(setup, tmp_path):  # noqa: F811
    base, tokenizer, splits = setup
    task = make_task("shout", splits)
    method = lora_method(2, learning_rates=[1e-6, 1e-2])
    kwargs = dict(seeds=(0, 1), steps=6, eval_chars=300, curve_points=3, cache=tmp_path / "cache")
    comp = compare(base, task, tokenizer, [method], log_dir=tmp_path / "tb", **kwargs)
    (res,) = comp.results
    folders = {p.parent.relative_to(tmp_path / "tb").as_posix() for p in event_files(tmp_path / "tb")}
    assert folders == {
        "shout/LoRA r=2/lr=0.01/seed=0",
        "shout/LoRA r=2/lr=0.01/seed=1",
        "shout/LoRA r=2/lr=1e-06/seed=1000",  # the sweep, with the selection seed on the validation text
        "shout/LoRA r=2/lr=0.01/seed=1000",
    }
    for run in res.runs:  # the chosen rate, every seed: the events are the run's own curve
        acc = events(run_log_dir(tmp_path / "tb", "shout", "LoRA r=2", run.seed, run.learning_rate))
        for key in ("target", "target_accuracy", "source"):
            assert scalars(acc, f"eval/{key}") == [(p["step"], f32(p[key])) for p in run.curve]
        assert len(scalars(acc, "train/loss")) == len(scalars(acc, "train/grad_norm")) == 6

    # A second comparison is cached (the log folder changed nothing of the keys), and logs the runs from their record.
    again = compare(base, task, tokenizer, [method], log_dir=tmp_path / "tb2", **kwargs)
    assert all(run.from_cache for run in again.results[0].runs)
    assert again.results[0].values("target") == res.values("target")
    run = again.results[0].runs[1]
    folder = run_log_dir(tmp_path / "tb2", "shout", "LoRA r=2", run.seed, run.learning_rate)
    acc = events(folder)
    assert scalars(acc, "eval/target") == [(p["step"], f32(p["target"])) for p in run.curve]
    cfg = TrainConfig(max_iters=6, learning_rate=run.learning_rate, min_lr=run.learning_rate / 10, warmup_iters=0)
    assert scalars(acc, "train/lr") == [(i, f32(learning_rate_at(i, cfg))) for i in range(6)]
    assert "train/loss" not in acc.Tags()["scalars"]  # the cache keeps no per-step loss: the Text tab says so
    (note,) = acc.Tensors("notes/text_summary")
    assert CACHED_RUN_NOTE in note.tensor_proto.string_val[0].decode()
    before = event_files(tmp_path / "tb2")
    compare(base, task, tokenizer, [method], log_dir=tmp_path / "tb2", **kwargs)
    assert event_files(tmp_path / "tb2") == before  # a folder with events is not written twice


def test_cli_tensorboard_writes_events_for_every_training_command(tmp_path, capsys):
    source = write_synthetic_corpus(tmp_path / "input.txt", n_turns=1500)  # quicker to load than tiny-shakespeare
    base = ["--data", source, "--cache", tmp_path / "cache", "--pretrain-iters", "6", "--device", "cpu", "--quiet"]
    tb = tmp_path / "tb"
    tb.mkdir()
    (tb / "my notes.txt").write_text("mine")  # a folder of the user's files is fine to add logs to

    def cli(*argv) -> str:
        assert main([str(a) for a in argv]) == 0
        out = capsys.readouterr().out
        assert "tensorboard --logdir" in out
        return out

    cli("pretrain", *base, "--tensorboard", tb)  # trains the base, logging as it goes
    trained = events(tb / "pretrain" / "tiny 6 steps" / "seed=1337")
    assert [s for s, _ in scalars(trained, "train/loss")] == list(range(6)) and scalars(trained, "train/grad_norm")
    cli("pretrain", *base, "--tensorboard", tmp_path / "tb2")  # cached now: written from the recorded history
    cached = events(tmp_path / "tb2" / "pretrain" / "tiny 6 steps" / "seed=1337")
    for tag in ("train/loss", "train/lr", "eval/train", "eval/val"):
        assert scalars(cached, tag) == scalars(trained, tag), tag
    assert "train/grad_norm" not in cached.Tags()["scalars"]  # not recorded: the Text tab says so

    fast = ["--steps", "3", "--eval-chars", "300"]
    cli("finetune", *base, *fast, "--rank", "2", "--out", tmp_path / "adapter", "--tensorboard", tb)
    cli("sweep", *base, *fast, "--ranks", "1,2", "--out", tmp_path / "sweep", "--tensorboard", tb)
    cli("compare", *base, *fast, "--rank", "2", "--out", tmp_path / "compare", "--tensorboard", tb)
    runs = {p.parent.relative_to(tb).as_posix() for p in event_files(tb)}
    assert runs == {
        "pretrain/tiny 6 steps/seed=1337",
        "rot13/LoRA r=1/seed=0",
        "rot13/LoRA r=2/seed=0",  # finetune, sweep's rank 2 and compare's seed 0: one run folder, three files
        *(f"rot13/{method}/seed={seed}" for method in ("LoRA r=2", "full FT") for seed in range(5)),
    }
    assert len(event_files(tb / "rot13" / "LoRA r=2" / "seed=0")) == 3  # names of their own: nothing overwritten
    assert (tb / "my notes.txt").read_text() == "mine"


def test_cli_tensorboard_that_cannot_be_written_fails_first(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    argv = ["--tensorboard", tmp_path / "notes.txt" / "tb", "--cache", tmp_path / "c", "--out", tmp_path / "a"]
    code = main(["finetune", *map(str, argv)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--tensorboard:" in err and "notes.txt is a file" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]

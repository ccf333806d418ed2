"""Data-parallel training (lora_lab.distributed + train): 2 CPU processes under torchrun with gloo, each with
batch B/2, against 1 process with batch B drawn as those two ranks draw it (train(emulate_ranks=2)).

Tolerance: the two runs add the same numbers in another order (DDP averages two half-batch gradients, one
process averages the whole batch), so losses agree to 1e-5 relative and final weights to 1e-5 absolute."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import distributed_worker as worker
import pytest
import torch
from safetensors.torch import load_file

from lora_lab import TrainConfig, train
from lora_lab.distributed import (
    DataParallel,
    data_parallel,
    effective_batch_note,
    is_main_process,
    launched_by_torchrun,
)
from lora_lab.train import BatchSampler

RANKS = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def torchrun_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update(
        OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(Path(worker.__file__).parent), env.get("PYTHONPATH", "")])
    )
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={RANKS}",
        "--nnodes=1",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        worker.__file__,
        str(out),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(RANKS)]
    weights = [load_file(out / f"rank{r}.safetensors") for r in range(RANKS)]
    return ranks, weights, done.stdout


def single_process(kind: str):
    """The same training in this process: batch B = RANKS x per-rank batch, drawn as the ranks draw it."""
    torch.set_num_threads(1)
    model = worker.fresh(kind == "lora")
    cfg = TrainConfig(**{**worker.PER_RANK, "batch_size": worker.PER_RANK["batch_size"] * RANKS})
    res = train(model, worker.token_data(), worker.token_data(seed=1), cfg, progress=False, emulate_ranks=RANKS)
    return res, {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_two_ranks_with_half_batches_train_like_one_process(torchrun_results, kind):
    ranks, weights, _ = torchrun_results
    res, reference = single_process(kind)
    got = ranks[0][kind]
    assert got["losses"] == pytest.approx(res.losses, rel=1e-5)
    assert [e["iter"] for e in got["evals"]] == [e["iter"] for e in res.evals]
    for e_ddp, e_one in zip(got["evals"], res.evals):
        assert e_ddp["val"] == pytest.approx(e_one["val"], rel=1e-5)
    assert reference.keys() == {n.split(".", 1)[1] for n in weights[0] if n.startswith(kind + ".")}
    for name, tensor in reference.items():
        torch.testing.assert_close(weights[0][f"{kind}.{name}"], tensor, rtol=0, atol=1e-5)
    assert got["tokens"] == res.tokens  # tokens of the global batch, counted once


def test_every_rank_ends_with_the_same_weights_and_history(torchrun_results):
    ranks, weights, _ = torchrun_results
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name]), name
    for kind in ("full", "lora"):  # losses are averaged over ranks and rank 0's evaluations shared
        assert ranks[0][kind]["losses"] == ranks[1][kind]["losses"]
        assert ranks[0][kind]["evals"] == ranks[1][kind]["evals"]


def test_only_rank_0_prints_and_the_effective_batch_is_stated(torchrun_results):
    ranks, _, stdout = torchrun_results
    note = effective_batch_note(worker.PER_RANK["batch_size"], DataParallel(0, RANKS, 0))
    assert "effective batch 8" in note
    assert note in ranks[0]["full"]["notes"]
    assert stdout.count(note) == 2  # once per training (full, LoRA), from rank 0 only


def test_gradient_traffic_is_the_trainable_parameters_only(torchrun_results):
    ranks, weights, _ = torchrun_results
    for kind in ("full", "lora"):
        trainable = sum(t.numel() for n, t in weights[0].items() if n.startswith(kind + "."))
        assert ranks[0][kind]["gradient_bytes_per_step"] == 4 * trainable  # fp32 gradients, each once per step
    assert ranks[0]["lora"]["gradient_bytes_per_step"] < ranks[0]["full"]["gradient_bytes_per_step"] / 10


def test_a_trainable_tensor_that_never_reaches_the_loss_is_named(torchrun_results):
    ranks, _, _ = torchrun_results
    for record in ranks:
        assert "stray" in record["unused_error"] and "never reach the loss" in record["unused_error"]
        assert "Expected to have finished reduction" not in record["unused_error"]


def test_a_single_process_is_not_data_parallel(monkeypatch):
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert not launched_by_torchrun()
    assert data_parallel() is None
    assert is_main_process()


def test_emulated_ranks_draw_each_ranks_rows_from_its_own_seed():
    data = torch.arange(500)
    one = BatchSampler(data, 6, 8, [torch.Generator().manual_seed(s) for s in (3, 4)], torch.device("cpu"))()
    halves = [BatchSampler(data, 3, 8, torch.Generator().manual_seed(s), torch.device("cpu"))() for s in (3, 4)]
    assert torch.equal(one[0], torch.cat([h[0] for h in halves]))
    assert torch.equal(one[1], torch.cat([h[1] for h in halves]))


@pytest.mark.parametrize("ranks", [0, 3, 2.0])
def test_emulate_ranks_must_divide_the_batch(ranks):
    model = worker.fresh(lora=False)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(ValueError, match="emulate_ranks"):
        train(model, worker.token_data(), None, TrainConfig(**worker.PER_RANK), progress=False, emulate_ranks=ranks)
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())


def test_gradient_traffic_spawns_ranks_and_counts_each_methods_bytes():
    from lora_lab import GPTConfig, LoRAConfig
    from lora_lab.experiments.scaling import gradient_traffic, lora_matrix_fraction

    config = GPTConfig(vocab_size=13, block_size=8, n_layer=1, n_head=2, n_embd=16)
    rows = gradient_traffic(config, [None, LoRAConfig(r=2, alpha=4, targets=("q_proj", "v_proj"))], steps=1)
    assert [r.method for r in rows] == ["full", "LoRA r=2 on q_proj+v_proj"]
    assert all(r.bytes_per_step == r.predicted_bytes == 4 * r.trainable for r in rows)
    assert rows[1].bytes_per_step == 4 * 2 * lora_matrix_fraction(2, 16, 16) * 16 * 16  # two 16 x 16 matrices


def test_cli_finetune_runs_data_parallel_under_torchrun(tmp_path, real_data_source):
    # The protocol's curve runs through train(), so `lora-lab finetune` is data-parallel too: one table and one
    # "saved" line (rank 0), the effective batch stated, and one adapter whose base record names the run.
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update(OMP_NUM_THREADS="1", LORA_LAB_CACHE=str(tmp_path / "cache"), LORA_LAB_DATA=real_data_source)
    out = tmp_path / "adapter"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={RANKS}",
        "--nnodes=1",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        "-m",
        "lora_lab.cli",
        "finetune",
        "--pretrain-iters",
        "20",
        "--steps",
        "6",
        "--batch-size",
        "4",
        "--eval-chars",
        "200",
        "--quiet",
        "--out",
        str(out),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("saved the adapter") == 1
    assert "batch 4 per rank x 2 = effective batch 8 per step" in done.stdout
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]

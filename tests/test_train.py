import pytest
import torch

from lora_lab import GPT, TrainConfig, pick_device, train
from lora_lab.train import learning_rate_at, make_optimizer


def _data(n=2000, vocab=17, seed=0):
    # A learnable sequence: a repeating pattern with a little seeded noise.
    g = torch.Generator().manual_seed(seed)
    data = torch.arange(n) % 7
    noise = torch.rand(n, generator=g) < 0.05
    return torch.where(noise, torch.randint(0, vocab, (n,), generator=g), data)


FAST = dict(max_iters=40, batch_size=4, eval_interval=20, eval_iters=2, warmup_iters=5, device="cpu")


def test_same_seed_same_result_on_cpu(tiny_config):
    results = []
    for _ in range(2):
        torch.manual_seed(3)
        model = GPT(tiny_config)
        res = train(model, _data(), _data(seed=1), TrainConfig(**FAST, seed=11), progress=False)
        results.append((res.losses, res.evals, [p.clone() for p in model.parameters()]))
    assert results[0][0] == results[1][0]
    assert results[0][1] == results[1][1]
    assert all(torch.equal(a, b) for a, b in zip(results[0][2], results[1][2]))


def test_another_seed_gives_another_run(tiny_config):
    losses = []
    for seed in (1, 2):
        torch.manual_seed(3)
        losses.append(train(GPT(tiny_config), _data(), None, TrainConfig(**FAST, seed=seed), progress=False).losses)
    assert losses[0] != losses[1]


def test_training_lowers_the_loss_and_records_history(tiny_config):
    torch.manual_seed(0)
    model = GPT(tiny_config)
    cfg = TrainConfig(**{**FAST, "max_iters": 150, "eval_interval": 50}, learning_rate=3e-3)
    res = train(model, _data(), _data(seed=1), cfg, progress=False)
    assert [e["iter"] for e in res.evals] == [0, 50, 100, 150]
    assert res.evals[-1]["val"] < res.evals[0]["val"] - 0.5
    assert len(res.losses) == 150 and res.tokens == 150 * 4 * 16 and res.tokens_per_second > 0


def test_only_trainable_parameters_change(tiny_config):
    model = GPT(tiny_config)
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith("blocks.1.")
    before = {n: p.clone() for n, p in model.named_parameters()}
    train(model, _data(), None, TrainConfig(**FAST), progress=False)
    for n, p in model.named_parameters():
        assert torch.equal(before[n], p) != n.startswith("blocks.1."), n


def test_no_trainable_parameters_is_an_error(tiny_config):
    model = GPT(tiny_config).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        make_optimizer(model, TrainConfig())


def test_weight_decay_only_on_matrices(tiny_config):
    opt = make_optimizer(GPT(tiny_config), TrainConfig(weight_decay=0.1))
    for group in opt.param_groups:
        assert all((p.dim() >= 2) == (group["weight_decay"] > 0) for p in group["params"])


def test_schedule_warms_up_then_decays_to_min_lr():
    cfg = TrainConfig(max_iters=1000, warmup_iters=100, learning_rate=1e-3, min_lr=1e-4)
    lrs = [learning_rate_at(i, cfg) for i in range(1001)]
    assert lrs[0] < lrs[50] < lrs[99] <= 1e-3
    assert max(lrs) == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[100:], lrs[101:]))
    assert lrs[1000] == pytest.approx(1e-4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_iters": -5}, "max_iters must be a positive integer"),
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"learning_rate": 0}, "learning_rate"),
        ({"device": "tpu"}, "Unknown device 'tpu'"),
    ],
)
def test_bad_train_configs_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)


def test_device_choice():
    assert pick_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="Unknown device 'gpu'"):
        pick_device("gpu")
    if not torch.cuda.is_available():
        assert pick_device("auto").type in ("cpu", "mps")
        with pytest.raises(ValueError, match="no CUDA GPU"):
            pick_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none)")
def test_cuda_bf16_training_runs_and_learns(tiny_config):
    torch.manual_seed(0)
    model = GPT(tiny_config)
    cfg = TrainConfig(**{**FAST, "device": "cuda", "max_iters": 150, "eval_interval": 50}, learning_rate=3e-3)
    res = train(model, _data(), _data(seed=1), cfg, progress=False)
    assert next(model.parameters()).device.type == "cuda"
    assert next(model.parameters()).dtype == torch.float32  # autocast: fp32 master weights, bf16 compute
    assert res.evals[-1]["val"] < res.evals[0]["val"] - 0.5

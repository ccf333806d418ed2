from dataclasses import replace

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


# ----------------------------------------------------------------------------------------------
# Validation of every TrainConfig field, and the speed switches (issue 11)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"learning_rate": float("inf")}, r"learning_rate must be a finite number > 0, got inf"),
        ({"learning_rate": float("nan")}, r"learning_rate must be a finite number > 0, got nan"),
        ({"grad_clip": float("nan")}, r"grad_clip must be a finite number >= 0, got nan"),
        ({"weight_decay": -0.1}, r"weight_decay must be a finite number >= 0"),
        ({"beta1": 1.5}, r"beta1 must be in \[0, 1\), got 1.5"),
        ({"beta2": 1.0}, r"beta2 must be in \[0, 1\), got 1.0"),
        ({"max_iters": True}, r"max_iters must be a positive integer, got True"),
        ({"eval_iters": 2.0}, r"eval_iters must be a positive integer, got 2.0"),
        ({"log_interval": 0}, r"log_interval must be a positive integer"),
        ({"min_lr": 2e-3, "learning_rate": 1e-3}, r"min_lr=0.002 is above learning_rate=0.001"),
        ({"min_lr": float("inf")}, r"min_lr must be a finite number >= 0"),
        ({"warmup_iters": 1.5}, r"warmup_iters must be an integer >= 0, got 1.5"),
        ({"lr_decay_iters": 0}, r"lr_decay_iters must be a positive integer or None, got 0"),
        ({"seed": "7"}, r"seed must be an integer from 0 to 2\*\*63 - 1, got '7'"),
        ({"bf16": "yes"}, r"bf16 must be True or False"),
        ({"keep_best": 1}, r"keep_best must be True or False"),
        ({"activation_checkpointing": None}, r"activation_checkpointing must be True or False"),
        ({"compile": None}, r"compile must be True or False"),
        ({"fused_optimizer": 1.0}, r"fused_optimizer must be True, False or None"),
        ({"device": 0}, r"Unknown device 0"),
    ],
)
def test_every_train_config_field_is_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def test_fused_optimizer_matches_the_default_one(tiny_config):
    runs = {}
    for fused in (False, True):
        torch.manual_seed(3)
        model = GPT(tiny_config)
        # fp32: under bf16 autocast, last-bit differences between the two AdamWs would be rounded up to bf16's
        cfg = TrainConfig(**FAST, fused_optimizer=fused, bf16=False)
        res = train(model, _data(), None, cfg, progress=False)
        runs[fused] = (res.losses, _params(model))
    assert not make_optimizer(GPT(tiny_config), TrainConfig(fused_optimizer=False)).defaults.get("fused")
    assert make_optimizer(GPT(tiny_config), TrainConfig(fused_optimizer=True)).defaults["fused"] is True
    assert runs[True][0] == pytest.approx(runs[False][0], abs=1e-5)
    for a, b in zip(runs[True][1], runs[False][1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_losses_of_every_step_are_recorded_whatever_the_log_interval(tiny_config):
    runs = []
    for log_interval in (1, 7, 1000):
        torch.manual_seed(3)
        res = train(GPT(tiny_config), _data(), None, TrainConfig(**FAST, log_interval=log_interval), progress=False)
        runs.append(res.losses)
    assert len(runs[0]) == FAST["max_iters"] and runs[0] == runs[1] == runs[2]


def test_batches_cut_on_the_device_are_get_batchs_batches():
    from lora_lab.data import get_batch
    from lora_lab.train import BatchSampler

    data = _data(500)
    sampler = BatchSampler(data, 5, 16, torch.Generator().manual_seed(9), torch.device("cpu"))
    gen = torch.Generator().manual_seed(9)
    for _ in range(3):
        (x, y), (rx, ry) = sampler(), get_batch(data, 5, 16, gen)
        assert torch.equal(x, rx) and torch.equal(y, ry)


def test_activation_checkpointing_gives_the_same_loss_and_gradients(tiny_config):
    from dataclasses import replace as dc_replace

    config = dc_replace(tiny_config, dropout=0.2)  # dropout too: the recomputation must replay the same masks
    torch.manual_seed(0)
    model = GPT(config).train()
    x, y = _data(64)[:48].view(3, 16), _data(64)[1:49].view(3, 16)
    grads = {}
    for ckpt in (False, True):
        model.activation_checkpointing = ckpt
        model.zero_grad()
        torch.manual_seed(5)
        _, loss = model(x, y)
        loss.backward()
        grads[ckpt] = (loss.item(), [p.grad.clone() for p in model.parameters()])
    assert grads[True][0] == pytest.approx(grads[False][0], abs=1e-6)
    for a, b in zip(grads[True][1], grads[False][1]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_train_turns_activation_checkpointing_on_and_off_again(tiny_config, monkeypatch):
    import lora_lab.model as model_module

    calls = []
    real = model_module.checkpoint
    monkeypatch.setattr(model_module, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = GPT(tiny_config)
    train(model, _data(), None, TrainConfig(**FAST, activation_checkpointing=True), progress=False)
    assert len(calls) == FAST["max_iters"] * tiny_config.n_layer  # every block of every training step, no eval
    assert model.activation_checkpointing is False


def test_keep_best_ends_with_the_best_evaluations_weights(tiny_config):
    torch.manual_seed(3)
    model = GPT(tiny_config)
    initial = _params(model)
    # Validation text that steps by 3 where the training text steps by 1: the better the model fits the
    # training text, the more confidently wrong it is on this, so the best evaluation is the first one.
    cfg = TrainConfig(**FAST, learning_rate=3e-3, keep_best=True)
    res = train(model, _data(), (torch.arange(2000) * 3) % 7, cfg, progress=False)
    vals = [e["val"] for e in res.evals]
    assert res.best_iter == res.evals[vals.index(min(vals))]["iter"] == 0 and vals[-1] > vals[0]
    assert all(torch.equal(a, b) for a, b in zip(initial, model.parameters()))
    assert res.final["val"] == min(vals) and res.to_dict()["best_iter"] == 0


def test_keep_best_restores_exactly_what_was_evaluated(tiny_config):
    from lora_lab import estimate_loss

    torch.manual_seed(3)
    model = GPT(tiny_config)
    cfg = TrainConfig(**{**FAST, "max_iters": 60, "eval_interval": 10}, learning_rate=3e-2, keep_best=True)
    val = _data(seed=1)
    res = train(model, _data(), val, cfg, progress=False)
    best = min(res.evals, key=lambda e: e["val"])
    assert res.best_iter == best["iter"]
    again = estimate_loss(model, {"val": val}, cfg.batch_size, cfg.eval_iters, cfg.seed + 1, "cpu", cfg.bf16)
    assert again["val"] == best["val"]
    without = train(GPT(tiny_config), _data(), val, TrainConfig(**FAST), progress=False)
    assert without.best_iter is None and without.final == without.evals[-1]


def test_keep_best_without_validation_data_is_an_error(tiny_config):
    model = GPT(tiny_config)
    before = _params(model)
    with pytest.raises(ValueError, match="keep_best needs validation data"):
        train(model, _data(), None, TrainConfig(**FAST, keep_best=True), progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_a_failing_torch_compile_falls_back_to_eager_with_a_note(tiny_config, monkeypatch, capsys):
    def broken_compile(model, *args, **kwargs):
        def forward(*a, **k):
            raise RuntimeError("no C++ compiler here")

        return forward

    monkeypatch.setattr(torch, "compile", broken_compile)
    torch.manual_seed(3)
    res = train(GPT(tiny_config), _data(), None, TrainConfig(**FAST, compile=True), progress=False)
    torch.manual_seed(3)
    eager = train(GPT(tiny_config), _data(), None, TrainConfig(**FAST, compile=False), progress=False)
    assert res.losses == eager.losses
    assert res.notes == ["torch.compile failed (RuntimeError); trained eagerly."]
    assert "note: torch.compile failed" in capsys.readouterr().out
    assert eager.notes == []


def test_compile_is_off_by_default(tiny_config, monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda *a, **k: pytest.fail("torch.compile was called"))
    train(GPT(tiny_config), _data(), None, TrainConfig(**FAST), progress=False)


def test_cpu_bf16_autocast_follows_the_hardware():
    from contextlib import nullcontext

    from lora_lab.devices import autocast_for, cpu_has_native_bf16

    ctx = autocast_for(torch.device("cpu"))
    assert isinstance(ctx, torch.autocast) == cpu_has_native_bf16()
    assert isinstance(autocast_for(torch.device("cpu"), use_bf16=False), nullcontext)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none)")
def test_cuda_compiled_fused_bf16_training_learns(tiny_config):
    torch.manual_seed(0)
    model = GPT(tiny_config)
    cfg = TrainConfig(
        **{**FAST, "device": "cuda", "max_iters": 150, "eval_interval": 50},
        learning_rate=3e-3,
        compile=True,
        fused_optimizer=True,
    )
    res = train(model, _data(), _data(seed=1), cfg, progress=False)
    assert res.notes == []  # compiled for real, no fallback
    assert res.evals[-1]["val"] < res.evals[0]["val"] - 0.5
    assert make_optimizer(model, cfg).defaults["fused"] is True


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none)")
def test_cuda_activation_checkpointing_lowers_peak_memory():
    from lora_lab import GPTConfig

    config = GPTConfig(vocab_size=65, block_size=128, n_layer=4, n_head=4, n_embd=256)
    peaks = {}
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = GPT(config)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        cfg = TrainConfig(
            max_iters=2,
            batch_size=32,
            eval_interval=2,
            eval_iters=1,
            device="cuda",
            activation_checkpointing=ckpt,
            compile=False,
        )
        train(model, torch.arange(5000) % 65, None, cfg, progress=False)
        peaks[ckpt] = torch.cuda.max_memory_allocated()
        del model
    assert peaks[True] < 0.8 * peaks[False]


def test_too_little_data_is_refused_before_the_model_is_touched(tiny_config):
    model = GPT(tiny_config)
    before = _params(model)
    with pytest.raises(ValueError, match="Need more than block_size=16 tokens"):
        train(model, _data(10), None, TrainConfig(**FAST), progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())) and model.training


def test_score_replaces_the_estimate_at_exactly_the_score_steps(tiny_config):
    torch.manual_seed(0)
    model = GPT(tiny_config)
    data = torch.randint(0, tiny_config.vocab_size, (400,), generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(max_iters=9, batch_size=2, eval_interval=2, eval_iters=1, warmup_iters=0, device="cpu")
    seen = []

    def score(m):
        seen.append(m.training)
        return {"my_metric": float(len(seen))}

    res = train(model, data, None, cfg, progress=False, score=score, score_steps=[0, 4, 9])
    assert [e["iter"] for e in res.evals] == [0, 4, 9]
    assert [e["my_metric"] for e in res.evals] == [1.0, 2.0, 3.0]
    assert len(res.losses) == 9
    with pytest.raises(ValueError, match="score_steps"):
        train(GPT(tiny_config), data, None, cfg, progress=False, score=score)
    with pytest.raises(ValueError, match="keep_best"):
        train(GPT(tiny_config), data, data, replace(cfg, keep_best=True), progress=False, score=score, score_steps=[0])

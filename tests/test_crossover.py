"""lora_lab.experiments.crossover: exact FLOP and operator counts of a training step at any width, and the
step-time model that turns them into the LoRA / full crossover."""

import json
from dataclasses import replace

import pytest
import torch

from lora_lab import GPTConfig, LoRAConfig
from lora_lab.experiments.costs import OperatorCount
from lora_lab.experiments.crossover import (
    CROSSOVER_COLUMNS,
    H100_RESULTS,
    LORA_QKVO,
    StepCount,
    StepTimeModel,
    build,
    count_matmuls,
    count_operators,
    count_step,
    crossover_table,
    crossover_width,
    direct_matmul_count,
    direct_operator_count,
    fit_step_time_model,
    linear_flops,
    measured_ratios,
    plot_crossover,
    sweep_config,
)
from lora_lab.train import TrainConfig, make_optimizer

SMALL = GPTConfig(vocab_size=65, block_size=16, n_layer=3, n_head=2, n_embd=32)
LORA4 = LoRAConfig(r=4, targets=("q_proj", "k_proj", "v_proj", "o_proj"))


def test_the_sweep_scales_heads_and_layers_with_width():
    assert [(c.n_layer, c.n_head) for c in map(sweep_config, (384, 768, 1024, 1536, 2048))] == [
        (6, 6), (12, 12), (16, 16), (24, 24), (32, 32)
    ]  # fmt: skip
    assert sweep_config(384).block_size == 256 and sweep_config(384).dropout == 0.2
    for bad in (100, 0, 384.0, True):
        with pytest.raises(ValueError, match="multiples of 64"):
            sweep_config(bad)


def test_full_training_runs_6_N_T_matmul_flops_and_the_attention_products():
    B = 2
    matmuls, attention, params, trainable = count_matmuls(SMALL, B, "full")
    C, L, V, T = SMALL.n_embd, SMALL.n_layer, SMALL.vocab_size, B * SMALL.block_size
    N = L * 12 * C * C + V * C  # the linear layers' weights (the head is the tied embedding)
    assert sum(matmuls) == 6 * N * T == linear_flops(SMALL, B, "full")
    assert attention == L * 12 * B * SMALL.block_size**2 * C  # QK^T and PV: 4 B T^2 C forward, twice that back
    assert params == trainable == N + 2 * L * C + C  # + the LayerNorms


def test_lora_flops_follow_the_formula_and_the_fast_path_adds_the_block_diagonal_zeros():
    B, r = 2, LORA4.r
    reference = sum(count_matmuls(SMALL, B, "LoRA", LORA4, fast_path=False)[0])
    assert reference == linear_flops(SMALL, B, "LoRA", LORA4)
    fused = sum(count_matmuls(SMALL, B, "LoRA", LORA4)[0])
    C, N = SMALL.n_embd, B * SMALL.block_size
    assert fused - reference == SMALL.n_layer * 3 * 2 * N * (9 * r * C - 3 * r * C)  # as in test_costs
    with pytest.raises(ValueError, match="q/k/v/o"):
        linear_flops(SMALL, B, "LoRA", LoRAConfig(r=4, targets=("q_proj", "v_proj")))


def test_the_matmul_list_agrees_with_torchs_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    for method in ("full", "LoRA"):
        with torch.device("meta"):
            model = build(SMALL, method, LORA4).train()
            x = torch.zeros(2, SMALL.block_size, dtype=torch.long)
        with FlopCounterMode(display=False) as counter:
            model(x, x)[1].backward()
        by_op = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
        matmuls, attention, _, _ = count_matmuls(SMALL, 2, method, LORA4)
        assert sum(matmuls) == by_op.get("aten.mm", 0) + by_op.get("aten.addmm", 0)
        assert attention == by_op["aten.bmm"]


@pytest.mark.parametrize("method", ["full", "LoRA", "floor"])
def test_the_per_block_rule_gives_the_direct_counts(method):
    deep = replace(SMALL, n_layer=4)
    for training in (True, False):
        matmuls, attention, params, trainable = count_matmuls(deep, 2, method, LORA4, training=training)
        direct = direct_matmul_count(deep, 2, method, LORA4, training=training)
        assert (sorted(direct[0].elements()), *direct[1:]) == (list(matmuls), attention, params, trainable)
    assert count_operators(deep, method, LORA4) == direct_operator_count(deep, method, LORA4)
    assert count_operators(deep, method, LORA4, training=False) == direct_operator_count(
        deep, method, LORA4, training=False
    )


def a_training_step_counted(config, method, lora, batch):
    """Operators of train()'s second step on the real model, counted by hand here (not by the library)."""
    torch.manual_seed(0)
    model = build(config, method, lora).train()
    optimizer = make_optimizer(model, TrainConfig())
    x = torch.randint(0, config.vocab_size, (batch, config.block_size))
    for _ in range(2):
        with OperatorCount() as ops:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                _, loss = model(x, x)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return ops.count


@pytest.mark.parametrize("method", ["full", "LoRA"])
def test_operator_counts_are_what_OperatorCount_sees_on_the_real_model(method):
    # the library counts a narrow stand-in of one and two layers; here: the real width, depth, length and batch
    wide = replace(SMALL, n_embd=64, n_head=4, block_size=32, dropout=0.1)
    assert count_operators(wide, method, LORA4) == a_training_step_counted(wide, method, LORA4, batch=3)
    model, x = build(wide, method, LORA4).eval(), torch.randint(0, 65, (3, 32))
    with OperatorCount() as ops, torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)
    assert count_operators(wide, method, LORA4, training=False) == ops.count


def test_counting_leaves_the_random_stream_alone():
    torch.manual_seed(3)
    expected = torch.rand(2)
    torch.manual_seed(3)
    count_step(SMALL, 2, "LoRA", LORA4)
    assert torch.equal(torch.rand(2), expected)


def a_count(operators, matmuls, training=True, width=64, layers=2, tokens=128):
    return StepCount("x", width, layers, tokens, training, 0, 0, tuple(matmuls), 0, operators)


def test_the_time_model_is_max_of_host_and_device_eager_and_device_alone_graphed():
    m = StepTimeModel(
        launch_s=1e-5, host_fixed_s=1e-3, gemm_flops_per_s=1e12, gemm_min_s=2e-6, kernel_min_s=1e-6, elementwise_s=1e-9
    )
    c = a_count(operators=100, matmuls=[1e6, 1e7])  # 1e6 FLOPs: 1 us < the 2 us minimum; 1e7: 10 us
    device = (2e-6 + 1e-5) + 98 * 1e-6 + 2 * 128 * 64 * 3 * 1e-9
    assert m.device_s(c) == pytest.approx(device) and m.graphed_s(c) == pytest.approx(device)
    assert m.host_s(c) == pytest.approx(1e-3 + 100 * 1e-5)
    assert m.eager_s(c) == pytest.approx(max(device, 2e-3))
    assert m.host_s(a_count(100, [], training=False)) == pytest.approx(1e-3)  # no per-step fixed cost in a forward


def synthetic_results(truth: StepTimeModel, size, e=2 / 5) -> dict:
    """What bench_gpu.py would write if a GPU ran exactly like `truth` (its profile holding e eval forwards)."""
    n_layer, n_head, n_embd, block, batch, dropout = size
    config = GPTConfig(vocab_size=65, block_size=block, n_layer=n_layer, n_head=n_head, n_embd=n_embd, dropout=dropout)
    kernels, eager = {}, {}
    for method, name in (("full", "full"), ("LoRA", "LoRA"), ("floor", "floor (all frozen but the embedding)")):
        step, fwd = count_step(config, batch, method), count_step(config, batch, method, training=False)
        kernels[name] = {
            "kernels_per_step": step.operators + e * fwd.operators,
            "kernel_ms_per_step": 1e3 * (truth.device_s(step) + e * truth.device_s(fwd)),
            "gemm_ms_per_step": 1e3 * (truth.gemm_s(step) + e * truth.gemm_s(fwd)),
        }
        eager[f"lora_lab {method}"] = {"ms_per_step": 1e3 * truth.eager_s(step)}
    kernels["LoRA, reference layers"] = {}  # a run with the fast path: "LoRA" is the fast path
    machine = {"device": "a model GPU", "torch": torch.__version__, "date": "today"}
    return {"machine": {**machine, "size (layers, heads, dims, block, batch, dropout)": list(size)},
            "kernels": kernels, "throughput_eager": eager}  # fmt: skip


def test_the_fit_recovers_the_parameters_of_a_gpu_that_follows_the_model():
    size = (2, 2, 128, 32, 8, 0.0)
    truth = StepTimeModel(
        launch_s=2e-5, host_fixed_s=5e-3, gemm_flops_per_s=2e11, gemm_min_s=4e-6, kernel_min_s=3e-6, elementwise_s=1e-10
    )
    results = json.loads(json.dumps(synthetic_results(truth, size)))  # as read back from the file
    fitted, checks = fit_step_time_model(results)
    for name in ("launch_s", "host_fixed_s", "gemm_flops_per_s", "gemm_min_s", "kernel_min_s", "elementwise_s"):
        assert getattr(fitted, name) == pytest.approx(getattr(truth, name), rel=1e-6), name
    assert checks["floor kernel ms: predicted"] == pytest.approx(checks["floor kernel ms: measured"], abs=1e-3)


@pytest.mark.skipif(not H100_RESULTS.is_file(), reason="needs the repository's benchmarks/gpu_results_h100.json")
def test_the_h100_fit_reproduces_what_it_was_fitted_to_and_predicts_the_floor_gemms():
    results = json.loads(H100_RESULTS.read_text())
    model, checks = fit_step_time_model(results)
    size = results["machine"]["size (layers, heads, dims, block, batch, dropout)"]
    config = GPTConfig(65, size[3], size[0], size[1], size[2], size[5])
    full, lora = (count_step(config, size[4], m, LORA_QKVO, fast_path=False) for m in ("full", "LoRA"))
    eager = results["throughput_eager"]
    assert 1e3 * model.eager_s(full) == pytest.approx(eager["lora_lab full"]["ms_per_step"], rel=0.05)
    assert 1e3 * model.eager_s(lora) == pytest.approx(eager["lora_lab LoRA"]["ms_per_step"], rel=0.05)
    assert model.host_s(full) > model.device_s(full)  # the profile's finding: launch-bound at d = 384
    # the floor (all frozen) was not fitted: its GEMM time is a prediction
    assert checks["floor GEMM ms: predicted"] == pytest.approx(checks["floor GEMM ms: measured"], rel=0.1)


def test_the_table_and_the_crossover_width():
    model = StepTimeModel(2e-5, 5e-3, 2e11, 4e-6, 3e-6, 1e-10)
    rows = crossover_table(widths=(64, 128), batch_size=2, block_size=16, model=model, dropout=0.0)
    assert [r["width"] for r in rows] == [64, 128] and set(CROSSOVER_COLUMNS) <= set(rows[0])
    for r in rows:
        assert r["eager_ratio"] == pytest.approx(r["lora_eager_ms"] / r["full_eager_ms"])
        assert r["graphed_ratio"] == pytest.approx(r["lora_graphed_ms"] / r["full_graphed_ms"])
        assert r["flop_ratio"] < 1 and r["lora_ops"] > r["full_ops"]
    sweep = [{"width": 256, "r": 1.2}, {"width": 1024, "r": 0.8}, {"width": 2048, "r": 0.7}]
    assert crossover_width(sweep, "r") == pytest.approx(512.0)  # halfway in log width between 256 and 1024
    assert crossover_width(sweep, "r", at=0.75) == pytest.approx(2**10.5)
    assert crossover_width(sweep, "r", at=0.5) is None and crossover_width(sweep, "r", at=1.5) == 256


def test_the_plot_draws_the_model_and_measured_points(tmp_path):
    rows = [
        {"width": w, "eager_ratio": e, "graphed_ratio": g, "flop_ratio": 0.7}
        for w, e, g in ((384, 1.1, 1.0), (768, 0.9, 0.85))
    ]
    fig = plot_crossover(rows, measured={"H100 eager": {384: 1.3}}, path=tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 0
    labels = [line.get_label() for line in fig.axes[0].get_lines()]
    assert "model, eager" in labels and "measured: H100 eager" in labels


def test_measured_ratios_come_from_a_sweep_section():
    results = {
        "sweep": {
            "384": {"full eager": {"ms_per_step": 2.0}, "LoRA / full, eager": 1.2, "LoRA / full, graphs": 1.05},
            "768": {"LoRA / full, eager": 0.9, "LoRA / full, graphs": 0.88, "notes": {}},
            "measured crossover width, eager": 600.0,
        }
    }
    assert measured_ratios(results) == {"eager": {384: 1.2, 768: 0.9}, "graphs": {384: 1.05, 768: 0.88}}
    with pytest.raises(ValueError, match="no 'sweep' section"):
        measured_ratios({"model": {}})

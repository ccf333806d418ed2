"""The course's numbers (lora_lab.course.numerics): low-rank math, parameter counts read from the model and the
variant classes, training memory and formatting. No widget is built here: the module does not need ipywidgets."""

import math
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open

from lora_lab import GPT, GPTConfig, LoRAConfig, LoRALinear, apply_lora, parameter_report, save_adapter
from lora_lab.course import numerics
from lora_lab.lora import VARIANTS, variant_class
from lora_lab.model import count_parameters_formula


def test_importing_numerics_does_not_import_ipywidgets():
    code = "import sys, lora_lab.course.numerics; print('ipywidgets' in sys.modules, 'matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


# ---------------------------------------------------------------------------------------------------
# formatting


def test_format_count_and_bytes():
    assert numerics.format_count(4_718_592) == "4.7M"
    assert numerics.format_count(37_748_736) == "37.7M"
    assert numerics.format_count(174_604_259_328) == "174.6B"
    assert numerics.format_count(950) == "950"
    assert numerics.format_bytes(350e9) == "350.0 GB"
    assert numerics.format_bytes(37_748_736) == "37.7 MB"
    assert numerics.format_bytes(12) == "12 B"


def test_storage_comparison_words():
    assert numerics.storage_comparison(2048, 16384) == "8.0x fewer"
    assert numerics.storage_comparison(16384, 16384) == "as many"
    assert numerics.storage_comparison(9792, 9216) == "1.06x more"
    assert numerics.storage_comparison(9024, 9216) == "1.02x fewer"


# ---------------------------------------------------------------------------------------------------
# chapter 1: low-rank approximation


def test_synthetic_image_is_deterministic_and_in_range():
    a, b = numerics.synthetic_image(48), numerics.synthetic_image(48)
    assert a.shape == (48, 48) and torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 1
    # it has structure: far from rank 1, far below full rank in energy terms
    S = torch.linalg.svdvals(a.double())
    assert S[1] > 1e-3 * S[0]
    assert (S[:10] ** 2).sum() / (S**2).sum() > 0.95


def test_low_rank_approximation_is_the_truncated_svd():
    W = torch.randn(9, 5, dtype=torch.float64)
    S = torch.linalg.svdvals(W)
    for r in range(0, 6):
        approx = numerics.low_rank_approximation(W, r)
        assert approx.shape == W.shape
        assert int(torch.linalg.matrix_rank(approx)) == r
        assert math.isclose(
            float(torch.linalg.matrix_norm(W - approx)), numerics.eckart_young_error(S, r), abs_tol=1e-9
        )
    assert torch.allclose(numerics.low_rank_approximation(W, 5), W)


@pytest.mark.parametrize("bad_r", [-1, 6])
def test_low_rank_approximation_rejects_impossible_ranks(bad_r):
    with pytest.raises(ValueError, match="between 0 and min"):
        numerics.low_rank_approximation(torch.zeros(9, 5), bad_r)
    with pytest.raises(ValueError, match="2-D"):
        numerics.low_rank_approximation(torch.zeros(3, 3, 3), 1)


def test_one_svd_truncated_at_every_rank_is_the_best_approximation():
    W = torch.randn(20, 12, generator=torch.Generator().manual_seed(0))
    low = numerics.LowRank(W)
    for r in (1, 5, 12):
        t = low.at(r)
        assert torch.allclose(t.approximation, numerics.low_rank_approximation(W.double(), r))
        assert math.isclose(t.error, t.predicted_error, rel_tol=1e-9, abs_tol=1e-9)
        assert t.relative_error == t.error / float(torch.linalg.matrix_norm(W.double()))
        assert (t.stored_numbers, t.compression) == (r * 32, 240 / (r * 32))
    with pytest.raises(ValueError, match="2-D torch.Tensor"):
        numerics.LowRank([[1.0]])


# ---------------------------------------------------------------------------------------------------
# chapter 2: parameter counts, read from the model and from the variant classes


@pytest.mark.parametrize(
    "targets",
    [("q_proj",), ("q_proj", "v_proj"), ("up_proj",), ("down_proj", "o_proj"), tuple(numerics.block_linears())],
)
@pytest.mark.parametrize("r", [1, 4])
def test_transformer_formula_matches_the_real_model(tiny_config, targets, r):
    model = apply_lora(GPT(tiny_config), LoRAConfig(r=r, targets=targets))
    report = parameter_report(model)
    expected = numerics.transformer_lora_params(tiny_config.n_layer, tiny_config.n_embd, r, targets)
    assert report.lora_params == expected == report.trainable_params


def test_transformer_formula_rejects_unknown_targets():
    with pytest.raises(ValueError, match="lm_head"):
        numerics.transformer_lora_params(2, 32, 1, ("q_proj", "lm_head"))


@pytest.mark.parametrize(
    "config",
    [
        GPTConfig(vocab_size=17, block_size=16, n_layer=2, n_head=2, n_embd=32),
        GPTConfig(vocab_size=33, block_size=32, n_layer=3, n_head=2, n_embd=48, bias=True, positions="learned"),
        numerics.MODEL_CONFIGS["lora_lab tiny"],
    ],
)
def test_shapes_and_totals_come_from_the_model(config):
    model = GPT(config)
    linears = {
        n.rpartition(".")[2]: tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, nn.Linear)
    }
    assert linears.pop("lm_head")  # tied to the embedding: not a LoRA target
    assert numerics.block_linears(config) == linears  # (out, in) of every Linear in a block, names as in the model
    assert numerics.base_parameter_count(config) == model.num_parameters() == count_parameters_formula(config)


def test_gpt3_is_counted_without_building_it():
    gpt3 = numerics.MODEL_CONFIGS["GPT-3 175B"]
    shapes = numerics.block_linears(gpt3)
    assert shapes["q_proj"] == (12288, 12288) and shapes["up_proj"] == (4 * 12288, 12288)
    assert numerics.base_parameter_count(gpt3) == count_parameters_formula(gpt3)
    assert numerics.transformer_lora_params(96, 12288, 1, ("q_proj", "v_proj")) == 4_718_592  # the paper's 4.7M


def test_counting_draws_no_random_numbers():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    numerics.transformer_lora_params(7, 160, 2, ("q_proj", "up_proj"))
    numerics.base_parameter_count(GPTConfig(n_layer=5, n_embd=96, n_head=3))
    assert torch.equal(torch.rand(3), expected)


def test_counts_are_asked_of_the_variant_class(monkeypatch):
    for name in VARIANTS:
        assert numerics.lora_params(12, 20, 3, name) == variant_class(name).parameter_count(12, 20, 3)
    # a changed rule on the class changes every count: nothing re-types r(d+k)
    monkeypatch.setattr(LoRALinear, "parameter_count", classmethod(lambda cls, d, k, r: d + k + r))
    assert numerics.lora_params(12, 20, 3) == 35
    assert numerics.transformer_lora_params(2, 32, 1, ("q_proj", "up_proj")) == 2 * ((32 + 32 + 1) + (128 + 32 + 1))
    assert numerics.matrix_counts(12, 20, 3).lora_params == 35


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_whole_model_counts_match_the_adapted_model(tiny_config, variant):
    targets = ("q_proj", "up_proj", "down_proj")
    with torch.random.fork_rng():
        model = apply_lora(GPT(tiny_config), LoRAConfig(r=2, targets=targets, variant=variant))
    assert numerics.lora_parameter_count(tiny_config, 2, targets, variant) == parameter_report(model).lora_params


def test_matrix_and_model_counts():
    c = numerics.matrix_counts(4096, 1024, 16)
    assert (c.full_params, c.lora_params) == (4096 * 1024, 16 * 5120)
    assert c.ratio == c.full_params / c.lora_params and c.break_even_rank == 4096 * 1024 / 5120
    assert c.last_saving_rank == 819  # 819 * 5120 < 4096 * 1024 <= 820 * 5120
    config = GPTConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128)
    m = numerics.model_counts(config, 8, ("q_proj", "v_proj"), 2)
    assert m.base_params == GPT(config).num_parameters() and m.lora_params == 4 * 2 * 8 * 256
    assert (m.full_checkpoint_bytes, m.adapter_bytes, m.fraction) == (
        2 * m.base_params,
        2 * m.lora_params,
        m.lora_params / m.base_params,
    )


# ---------------------------------------------------------------------------------------------------
# chapter 5: training memory


def _batch(config, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, config.vocab_size, (3, config.block_size), generator=gen)
    return x, torch.roll(x, -1, dims=1)


def test_count_training_memory_full_vs_lora(tiny_config):
    x, y = _batch(tiny_config)
    full = numerics.count_training_memory(GPT(tiny_config), x, y)
    n = GPT(tiny_config).num_parameters()
    assert full.frozen_weights == 0 and full.trainable_weights == 4 * n
    assert full.gradients == 4 * n
    assert 8 * n <= full.optimizer <= 8 * n + 8 * 100  # two moments per weight, plus small step counters
    assert full.activations > 0
    assert full.total == sum(v for k, v in full.as_dict().items() if k != "total")

    lora_model = apply_lora(GPT(tiny_config), LoRAConfig(r=2, targets=("q_proj", "v_proj")))
    t = parameter_report(lora_model).trainable_params
    lora = numerics.count_training_memory(lora_model, x, y)
    assert lora.trainable_weights == lora.gradients == 4 * t
    assert lora.frozen_weights == 4 * (lora_model.num_parameters() - t)
    assert 8 * t <= lora.optimizer < full.optimizer
    assert lora.total < full.total


def test_count_training_memory_grows_with_the_batch(tiny_config):
    small = numerics.count_training_memory(GPT(tiny_config), *_batch(tiny_config))
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, tiny_config.vocab_size, (6, tiny_config.block_size), generator=gen)
    big = numerics.count_training_memory(GPT(tiny_config), x, torch.roll(x, -1, dims=1))
    assert big.activations > 1.5 * small.activations
    assert (big.gradients, big.optimizer) == (small.gradients, small.optimizer)


def test_cuda_peak_needs_a_gpu_batch(tiny_config):
    with pytest.raises(ValueError, match="CUDA"):
        numerics.cuda_peak_training_memory(GPT(tiny_config), *_batch(tiny_config))


# ---------------------------------------------------------------------------------------------------
# chapter 7: what a dashboard setting costs


@pytest.mark.parametrize("variant", ["lora", "pissa", "vera"])
def test_setting_costs_match_the_saved_adapter(tiny_config, tmp_path, variant):
    lora = LoRAConfig(r=2, targets=("q_proj", "v_proj"), variant=variant)
    with torch.random.fork_rng():
        model = apply_lora(GPT(tiny_config), lora)
    path = save_adapter(model, tmp_path / variant)
    with safe_open(str(path / "adapter_model.safetensors"), "pt") as f:
        in_file = sum(numerics.tensor_bytes(f.get_tensor(k)) for k in f.keys())
    trainable, stored, training = numerics.setting_costs(tiny_config, lora)
    assert trainable == parameter_report(model).trainable_params
    assert stored == in_file and training == 12 * trainable


def test_setting_costs_of_full_fine_tuning(tiny_config):
    n = GPT(tiny_config).num_parameters()
    assert numerics.setting_costs(tiny_config, None) == (n, 4 * n, 12 * n)
    assert numerics.SettingResult(None, (), n, 4 * n, 12 * n, 1.0, 1.0).label == "full FT"
    assert numerics.SettingResult(4, ("Wq", "Wv"), 1, 1, 1, 1.0, 1.0, "dora").label == "dora r=4 Wq+Wv"

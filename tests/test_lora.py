"""The LoRA layer, targeting/freezing, merging and the parameter report (lora_lab/lora.py)."""

import copy
import math

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import TINY, assert_same, snapshot, tiny_gpt, tokens

from lora_lab import (
    GPT,
    VARIANTS,
    GPTConfig,
    LoRAConfig,
    LoRAError,
    LoRALinear,
    apply_lora,
    lora_layers,
    merge_and_unload,
    merge_lora,
    parameter_report,
    register_variant,
    set_lora_enabled,
    unmerge_lora,
)
from lora_lab.model import count_parameters_formula


def randomize_B(model, seed=2, std=0.5):
    """B starts at zero; give it values so LoRA actually changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * std)


# --- the layer -----------------------------------------------------------------------------------


@pytest.mark.parametrize("init", ["gaussian", "kaiming"])
def test_identity_at_init(init):
    base = tiny_gpt()
    model = apply_lora(copy.deepcopy(base), LoRAConfig(r=4, targets=("*_proj",), init=init))
    x = tokens()
    assert torch.equal(model(x)[0], base(x)[0])
    for layer in lora_layers(model).values():
        assert torch.count_nonzero(layer.lora_B) == 0
        assert torch.count_nonzero(layer.lora_A) == layer.lora_A.numel()  # A is random, not zero


def test_forward_is_base_plus_scaled_low_rank_branch():
    torch.manual_seed(0)
    lin = nn.Linear(20, 12, bias=True)
    layer = LoRALinear(lin, r=3, alpha=6.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(5, 7, 20)
    expected = x @ lin.weight.T + lin.bias + (6.0 / 3) * (x @ layer.lora_A.T @ layer.lora_B.T)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    assert layer.scale == 2.0 and layer.lora_A.shape == (3, 20) and layer.lora_B.shape == (12, 3)
    torch.testing.assert_close(layer.delta_weight(), 2.0 * layer.lora_B @ layer.lora_A)


def test_dropout_only_on_lora_branch():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 16, bias=False), r=4, alpha=4.0, dropout=0.5).train()
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 16)
    torch.manual_seed(123)
    out = layer(x)
    torch.manual_seed(123)
    mask_x = nn.functional.dropout(x, 0.5, training=True)
    expected = layer.base(x) + layer.scale * (mask_x @ layer.lora_A.T @ layer.lora_B.T)
    torch.testing.assert_close(out, expected)
    # the base path never sees dropout: with B = 0 the output is exactly base(x) even in training mode
    with torch.no_grad():
        layer.lora_B.zero_()
    assert torch.equal(layer(x), layer.base(x))
    layer.eval()
    with torch.no_grad():
        layer.lora_B.normal_()
    assert torch.equal(layer(x), layer(x))  # eval: no dropout at all


def test_gradients_reach_only_lora_and_trainable():
    model = apply_lora(tiny_gpt(), LoRAConfig(r=4, targets=("q_proj", "v_proj"), trainable=("ln_f",)))
    randomize_B(model)
    x = tokens()
    _, loss = model(x, x)
    loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    lora = {n for n in with_grad if n.endswith(("lora_A", "lora_B"))}
    assert with_grad == lora | {"ln_f.weight"}
    assert len(lora) == 2 * 2 * TINY.n_layer
    for n, p in model.named_parameters():
        assert p.requires_grad == (n in with_grad), n  # frozen weights get no .grad at all
    for layer in lora_layers(model).values():
        assert layer.base.weight.grad is None and layer.lora_A.grad.abs().sum() > 0


def test_training_changes_only_lora_weights():
    model = apply_lora(tiny_gpt(), LoRAConfig(r=2, targets=("q_proj", "up_proj")))
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    lora = {n: p.clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = tokens()
    for _ in range(3):
        _, loss = model(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad()
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in frozen.items())
    assert all(not torch.equal(params[n], v) for n, v in lora.items())


def test_disabled_is_exactly_the_base():
    base = tiny_gpt()
    model = apply_lora(copy.deepcopy(base), LoRAConfig(r=4))
    randomize_B(model)
    x = tokens()
    adapted = model(x)[0]
    assert not torch.allclose(adapted, base(x)[0])
    set_lora_enabled(model, False)
    assert torch.equal(model(x)[0], base(x)[0])
    set_lora_enabled(model, True)
    assert torch.equal(model(x)[0], adapted)


def test_same_seed_same_lora():
    a = apply_lora(tiny_gpt(), LoRAConfig(r=4))
    b = apply_lora(tiny_gpt(), LoRAConfig(r=4))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


# --- targets, freezing and refusals --------------------------------------------------------------


@pytest.mark.parametrize(
    "targets, expected",
    [
        (("*.mlp.*",), {f"blocks.{i}.mlp.{n}" for i in range(2) for n in ("up_proj", "down_proj")}),
        (("blocks.0.attn.q_proj",), {"blocks.0.attn.q_proj"}),
        (("?_proj",), {f"blocks.{i}.attn.{n}_proj" for i in range(2) for n in "qkvo"}),
        (("q_proj", "down_proj"), {f"blocks.{i}.{n}" for i in range(2) for n in ("attn.q_proj", "mlp.down_proj")}),
    ],
)
def test_target_patterns(targets, expected):
    model = apply_lora(tiny_gpt(), LoRAConfig(r=2, targets=targets))
    assert set(lora_layers(model)) == expected
    assert model.lora_config.targets == targets


def test_config_round_trip_and_validation():
    config = LoRAConfig(r=3, alpha=5, targets=["q_proj", "v_proj"], dropout=0.1, init="kaiming", trainable="ln_f")
    assert config.targets == ("q_proj", "v_proj") and config.trainable == ("ln_f",) and config.alpha == 5.0
    assert LoRAConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="Unknown LoRAConfig field"):
        LoRAConfig.from_dict({**config.to_dict(), "rank": 3})
    with pytest.raises(LoRAError, match="targets is empty"):
        LoRAConfig(targets=())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"r": 0}, "rank r must be a positive integer"),
        ({"r": -2}, "rank r must be a positive integer"),
        ({"r": 2.5}, "rank r must be a positive integer"),
        ({"alpha": 0}, "alpha must be a positive finite number"),
        ({"alpha": -1.0}, "alpha must be a positive finite number"),
        ({"alpha": float("nan")}, "alpha must be a positive finite number"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"init": "xavier"}, "init must be one of"),
    ],
)
def test_bad_hyperparameters_are_refused(kwargs, message):
    with pytest.raises(LoRAError, match=message):
        LoRAConfig(**kwargs)
    with pytest.raises(LoRAError, match=message):
        LoRALinear(nn.Linear(8, 8), **{"r": 2, "alpha": 1.0, **kwargs})


@pytest.mark.parametrize(
    "config, message",
    [
        (LoRAConfig(r=33), r"r=33 exceeds min\(d, k\) = min\(32, 32\)"),
        (
            LoRAConfig(targets=("q_proj", "query")),
            "'query' matches no module.*Linear layers in this model: q_proj, k_proj",
        ),
        (LoRAConfig(targets=("ln_1",)), r"'ln_1' matches only blocks.0.ln_1 \(LayerNorm\).*only nn.Linear"),
        (LoRAConfig(targets=("attn",)), r"only blocks.0.attn \(CausalSelfAttention\)"),
        (LoRAConfig(targets=("lm_head",)), r"'lm_head' shares its weight with \['tok_emb.weight'\]"),
        (LoRAConfig(trainable=("nothing",)), "trainable pattern 'nothing' matches no module"),
        (LoRAConfig(trainable=("attn",)), "trainable module 'blocks.0.attn' contains LoRA targets"),
    ],
)
def test_bad_targets_are_refused_and_model_untouched(config, message):
    model = tiny_gpt()
    before = snapshot(model)
    with pytest.raises(LoRAError, match=message):
        apply_lora(model, config)
    assert_same(model, before)


def test_applying_twice_is_refused():
    model = apply_lora(tiny_gpt(), LoRAConfig(r=2, targets=("q_proj",)))
    before = snapshot(model)
    for config in (LoRAConfig(r=2, targets=("q_proj",)), LoRAConfig(r=2, targets=("v_proj",))):
        with pytest.raises(LoRAError, match="LoRA is already applied to .*blocks.0.attn.q_proj"):
            apply_lora(model, config)
    with pytest.raises(LoRAError, match="wraps an nn.Linear, got LoRALinear"):
        LoRALinear(model.blocks[0].attn.q_proj, r=2, alpha=1.0)
    assert_same(model, before)


def test_trainable_modules_stay_trainable():
    model = apply_lora(tiny_gpt(), LoRAConfig(r=2, trainable=("ln_f", "tok_emb")))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"ln_f.weight", "tok_emb.weight"} <= trainable
    assert all(n.endswith(("lora_A", "lora_B")) for n in trainable - {"ln_f.weight", "tok_emb.weight"})
    assert model.lm_head.weight.requires_grad  # tied: the same tensor as tok_emb.weight


def test_apply_lora_keeps_the_flags_a_variant_chose():
    class FrozenA(LoRALinear):
        """LoRA with A frozen as a parameter (not a buffer). Trainable parameters per layer: r*d"""

        variant, parameter_formula = "frozen_a_test", "r*d"

        @classmethod
        def parameter_count(cls, d, k, r):
            return r * d

        def __init__(self, base, r, alpha, dropout=0.0, init="gaussian"):
            super().__init__(base, r, alpha, dropout, init)
            self.lora_A.requires_grad_(False)

    register_variant(FrozenA)
    try:
        base = tiny_gpt()
        base.ln_f.weight.requires_grad_(False)  # whatever the model's own flags were, the base ends frozen
        model = apply_lora(base, LoRAConfig(r=2, variant="frozen_a_test", targets=("q_proj",), trainable=("ln_f",)))
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable == {f"{n}.lora_B" for n in lora_layers(model)} | {"ln_f.weight"}
        assert parameter_report(model).lora_params == len(lora_layers(model)) * 2 * TINY.n_embd
    finally:
        del VARIANTS["frozen_a_test"]


@pytest.mark.parametrize("training", [False, True])
def test_new_layers_take_the_mode_of_the_model_they_join(training):
    model = tiny_gpt().train(training)
    model.blocks[1].eval()  # a part the user put in eval mode stays so
    apply_lora(model, LoRAConfig(r=2, dropout=0.3, targets=("q_proj",)))
    layers = lora_layers(model)
    assert layers["blocks.0.attn.q_proj"].training is training
    assert layers["blocks.0.attn.q_proj"].lora_dropout.training is training
    assert layers["blocks.1.attn.q_proj"].training is False
    if not training:  # eval means eval: LoRA dropout is off, so two forwards agree
        randomize_B(model)
        x = tokens()
        assert torch.equal(model(x)[0], model(x)[0])


# --- parameter report ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "gpt, config",
    [
        (TINY, LoRAConfig(r=4)),
        (TINY, LoRAConfig(r=1, targets=("up_proj", "down_proj"))),
        (
            GPTConfig(vocab_size=7, block_size=8, n_layer=3, n_head=4, n_embd=24, bias=True),
            LoRAConfig(r=8, targets=("*_proj",), trainable=("ln_f",)),
        ),
        (
            GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=1, n_embd=16),
            LoRAConfig(r=16, targets=("v_proj",), trainable=("lm_head",)),
        ),
    ],
)
def test_parameter_report_matches_formula(gpt, config):
    model = apply_lora(tiny_gpt(gpt), config)
    C, L, r = gpt.n_embd, gpt.n_layer, config.r
    shapes = {
        "q_proj": (C, C),
        "k_proj": (C, C),
        "v_proj": (C, C),
        "o_proj": (C, C),
        "up_proj": (4 * C, C),
        "down_proj": (C, 4 * C),
    }  # (d, k) = (out, in)
    chosen = [n for n in shapes if any(t == n or (t == "*_proj") for t in config.targets)]
    lora = L * sum(r * (shapes[n][0] + shapes[n][1]) for n in chosen)
    extra = {(): 0, ("ln_f",): C * (1 + gpt.bias), ("lm_head",): gpt.vocab_size * C}[config.trainable]
    report = parameter_report(model)
    assert len(report.rows) == L * len(chosen)
    for row in report.rows:
        d, k = shapes[row.name.rpartition(".")[2]]
        assert (row.d, row.k, row.r, row.lora_params, row.full_params) == (d, k, r, r * (d + k), d * k)
    assert report.lora_params == lora
    assert report.total_params == count_parameters_formula(gpt) + lora  # the tied embedding counted once
    assert report.trainable_params == lora + extra
    assert report.trainable_fraction == (lora + extra) / (count_parameters_formula(gpt) + lora)
    text = report.to_text()
    assert f"{lora:,}" in text and report.rows[0].name in text
    assert text.splitlines()[0].split() == ["module", "d", "k", "r", "trained", "d*k"]


# --- merging -------------------------------------------------------------------------------------


def test_merged_equals_unmerged_and_round_trip():
    model = apply_lora(tiny_gpt(), LoRAConfig(r=4, targets=("*_proj",)))
    randomize_B(model)
    x = tokens()
    weights = {n: l.base.weight.clone() for n, l in lora_layers(model).items()}
    unmerged = model(x)[0]
    merge_lora(model)
    assert all(l.merged for l in lora_layers(model).values())
    torch.testing.assert_close(model(x)[0], unmerged, rtol=1e-5, atol=1e-5)
    for n, layer in lora_layers(model).items():  # merged forward is just base(x) with W + ΔW
        assert not torch.equal(layer.base.weight, weights[n])
        h = torch.randn(2, layer.base.in_features)
        assert torch.equal(layer(h), nn.functional.linear(h, layer.base.weight))
    unmerge_lora(model)
    for n, layer in lora_layers(model).items():
        assert torch.equal(layer.base.weight, weights[n])  # bit for bit
    assert torch.equal(model(x)[0], unmerged)


def test_merge_state_errors():
    model = apply_lora(tiny_gpt(), LoRAConfig(r=2))
    with pytest.raises(LoRAError, match="not merged into .*nothing to unmerge"):
        unmerge_lora(model)
    merge_lora(model)
    before = snapshot(model)
    with pytest.raises(LoRAError, match="already merged .*merging twice"):
        merge_lora(model)
    with pytest.raises(LoRAError, match="Cannot disable LoRA while it is merged"):
        set_lora_enabled(model, False)
    assert_same(model, before)
    unmerge_lora(model)
    set_lora_enabled(model, False)
    with pytest.raises(LoRAError, match="Cannot merge while LoRA is disabled"):
        merge_lora(model)
    with pytest.raises(LoRAError, match="no LoRA layers"):
        merge_lora(tiny_gpt())


@settings(max_examples=40, deadline=None)
@given(
    d=st.integers(1, 48),
    k=st.integers(1, 48),
    r_frac=st.floats(0.0, 1.0),
    alpha=st.floats(0.1, 64.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_merge_unmerge_round_trip_property(d, k, r_frac, alpha, seed):
    torch.manual_seed(seed)
    r = 1 + int(r_frac * (min(d, k) - 1))
    layer = LoRALinear(nn.Linear(k, d, bias=False), r=r, alpha=alpha)
    with torch.no_grad():
        layer.lora_B.normal_()
    model = nn.Sequential(layer)
    W = layer.base.weight.clone()
    x = torch.randn(3, k)
    unmerged = model(x)
    merge_lora(model)
    torch.testing.assert_close(model(x), unmerged, rtol=1e-4, atol=1e-4 * (1 + unmerged.abs().max().item()))
    unmerge_lora(model)
    assert torch.equal(layer.base.weight, W)  # restored bit for bit, not up to rounding
    assert getattr(layer, "weight_before_merge", None) is None  # the copy is dropped again


@settings(max_examples=30, deadline=None)
@given(
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    d=st.integers(1, 40),
    k=st.integers(1, 40),
    alpha=st.floats(0.1, 64.0),
    std=st.floats(1e-3, 1.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_merge_unmerge_restores_W_exactly_in_every_dtype(dtype, d, k, alpha, std, seed):
    torch.manual_seed(seed)
    layer = LoRALinear(nn.Linear(k, d, bias=False), r=1, alpha=alpha).to(dtype)
    with torch.no_grad():
        layer.lora_B.normal_(std=std)
    W = layer.base.weight.clone()
    model = nn.Sequential(layer)
    for _ in range(3):  # repeated round trips do not drift either
        merge_lora(model)
        assert layer.weight_before_merge.dtype == dtype
        unmerge_lora(model)
        assert torch.equal(layer.base.weight, W)


def test_bf16_unmerge_by_subtraction_would_drift():
    # Why unmerge keeps W: in bf16, (W + ΔW) - ΔW is not W. Without the kept copy, entries would move.
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(64, 48, bias=False), r=8, alpha=8.0).to(torch.bfloat16)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.05)
    W = layer.base.weight.clone()
    merge_lora(nn.Sequential(layer))
    subtracted = (layer.base.weight.float() - layer.delta_weight()).to(torch.bfloat16)
    assert not torch.equal(subtracted, W)
    unmerge_lora(nn.Sequential(layer))
    assert torch.equal(layer.base.weight, W)


def test_unmerge_after_the_merged_weight_changed_subtracts_delta():
    # Training a merged model changes W + ΔW; the kept W would throw that away, so ΔW is subtracted.
    layer = LoRALinear(nn.Linear(8, 8, bias=False), r=2, alpha=2.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    merge_lora(nn.Sequential(layer))
    with torch.no_grad():
        layer.base.weight.add_(1.0)
    expected = layer.base.weight.float() - layer.delta_weight()
    unmerge_lora(nn.Sequential(layer))
    torch.testing.assert_close(layer.base.weight, expected, rtol=0, atol=1e-6)
    assert layer.weight_before_merge is None


def test_bf16_merge_drifts_at_most_one_rounding():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(64, 48, bias=False), r=8, alpha=8.0).to(torch.bfloat16)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.05)
    W = layer.base.weight.clone()
    exact = W.double() + layer.scale * (layer.lora_B.double() @ layer.lora_A.double())  # ΔW in fp64
    merge_lora(nn.Sequential(layer))
    merged = layer.base.weight
    assert merged.dtype == torch.bfloat16
    # bf16 keeps 8 significant bits: one rounding moves a value by at most half a step 2**(e - 7)
    step = torch.exp2(torch.floor(torch.log2(exact.abs().clamp_min(1e-30))) - 7)
    assert ((merged.double() - exact).abs() <= 0.5 * step * (1 + 1e-3)).all()


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_nonfinite_merge_is_refused_before_any_change(poison):
    model = apply_lora(tiny_gpt(), LoRAConfig(r=2, targets=("q_proj", "up_proj")))
    randomize_B(model)
    last = list(lora_layers(model).values())[-1]
    with torch.no_grad():
        last.lora_B[0, 0] = poison
    weights = {n: l.base.weight.clone() for n, l in lora_layers(model).items()}
    with pytest.raises(LoRAError, match=r"NaN/Inf in \['blocks.1.mlp.up_proj'\]; weights left unchanged"):
        merge_lora(model)
    for n, layer in lora_layers(model).items():  # earlier layers were not merged either
        assert torch.equal(layer.base.weight, weights[n]) and not layer.merged


@pytest.mark.parametrize("merge_first", [False, True])
def test_merge_and_unload_gives_plain_gpt(merge_first):
    model = apply_lora(tiny_gpt(), LoRAConfig(r=4, targets=("*_proj",)))
    randomize_B(model)
    x = tokens()
    adapted = model(x)[0]
    if merge_first:
        merge_lora(model)
    plain = merge_and_unload(model)
    assert isinstance(plain, GPT)
    assert not any("weight_before_merge" in n for n, _ in plain.named_buffers())  # the merge copy is dropped
    assert not any(isinstance(m, LoRALinear) for m in plain.modules())
    assert plain.state_dict().keys() == GPT(TINY).state_dict().keys()
    assert all(p.requires_grad for p in plain.parameters()) and not hasattr(plain, "lora_config")
    torch.testing.assert_close(plain(x)[0], adapted, rtol=1e-5, atol=1e-5)
    assert math.isclose(parameter_report(plain).total_params, count_parameters_formula(TINY))

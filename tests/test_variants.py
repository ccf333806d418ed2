"""LoRA variants as plug-ins: one contract suite over the registry, plus what each variant's paper says."""

import copy
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file
from tiny_models import TINY, assert_same, snapshot, tiny_gpt, tokens

from lora_lab import (
    GPT,
    VARIANTS,
    AdapterBank,
    LoRAConfig,
    LoRAError,
    LoRALinear,
    TrainConfig,
    apply_lora,
    check_variant,
    cli,
    export_peft,
    import_peft,
    load_adapter,
    lora_layers,
    merge_lora,
    parameter_report,
    register_variant,
    save_adapter,
    set_lora_enabled,
    unmerge_lora,
)
from lora_lab.course import numerics, widgets
from lora_lab.lora import lora_plus_parameters
from lora_lab.train import LoRAPlusAdamW, make_optimizer
from lora_lab.variants.contract import CHECKS
from lora_lab.variants.vera import shared_pair

PEFT_VARIANTS = ("lora", "rslora", "dora", "pissa")
# The built-ins: what the package itself registers (a variant's module says where it lives)
BUILTIN_VARIANTS = tuple(sorted(n for n, cls in VARIANTS.items() if cls.__module__.startswith("lora_lab.")))


@pytest.fixture
def scratch_variants():
    """Toy variants registered by a test are removed again, so the registry holds only the built-ins."""
    before = dict(VARIANTS)
    yield
    VARIANTS.clear()
    VARIANTS.update(before)


def trained(model, seed=0, std=0.1):
    """Move every trainable tensor as training would (B, b, ... are no longer zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * std)
    return model


def logits(model, x):
    with torch.no_grad():
        return model(x)[0]


# --- the contract, for every registered variant ----------------------------------------------------


def test_the_builtins_are_registered():
    assert {"lora", "rslora", "dora", "pissa", "vera", "lora_fa"} <= set(BUILTIN_VARIANTS)
    assert LoRAConfig().variant == "lora" and VARIANTS["lora"] is LoRALinear


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_contract(name, capsys):
    report = check_variant(name, verbose=True)
    printed = capsys.readouterr().out
    assert report.passed, printed
    assert [g.name for g in report.guarantees] == ["registered", *CHECKS]
    assert f"Contract of LoRA variant {name!r}" in printed and "all guarantees hold" in printed
    peft = report.guarantees[-1]
    if name in PEFT_VARIANTS:  # these must really round-trip through PEFT, not be skipped
        assert peft.holds is True, peft.detail
    else:
        assert peft.holds in (True, None) and peft.detail


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_parameter_count_equals_the_real_count_and_the_docstring_formula(name):
    cls = VARIANTS[name]
    assert cls.parameter_formula in cls.__doc__
    for d, k, r in [(12, 20, 3), (20, 12, 1), (16, 16, 8), (7, 5, 5)]:
        layer = cls(nn.Linear(k, d), r, 4.0)
        real = sum(p.numel() for n, p in layer.named_parameters() if not n.startswith("base.") and p.requires_grad)
        assert real == cls.parameter_count(d, k, r), (name, d, k, r)
        # the formula text says the same thing (read here with d, k, r bound; the library never evaluates it)
        assert eval(cls.parameter_formula, {"__builtins__": {}}, {"d": d, "k": k, "r": r}) == real, (name, d, k, r)
        model = apply_lora(GPT(TINY), LoRAConfig(r=min(r, 4), variant=name, targets=("q_proj", "up_proj")))
        for row in parameter_report(model).rows:
            assert row.lora_params == cls.parameter_count(row.d, row.k, row.r)
        assert parameter_report(model).lora_params == sum(p.numel() for p in model.parameters() if p.requires_grad)


# --- a broken variant fails the checker, each guarantee for its own reason -------------------------


def toy(name, formula="r*(d+k)", **body):
    doc = f"A toy. Trainable parameters per layer: {formula}"
    return type(name.title(), (LoRALinear,), {"__doc__": doc, "variant": name, "parameter_formula": formula, **body})


def _random_B_init(self, base, r, alpha, dropout=0.0, init="gaussian"):
    LoRALinear.__init__(self, base, r, alpha, dropout, init)
    nn.init.normal_(self.lora_B)  # forgets the zero start


def _ignores_switch(self, x):
    return self.base(x) + F.linear(F.linear(x, self.lora_A) * self.scale, self.lora_B)  # no merged/enabled check


def _forgets_scale(self):
    return self.lora_B.detach().float() @ self.lora_A.detach().float()  # ΔW without alpha / r


def _extra_param_init(self, base, r, alpha, dropout=0.0, init="gaussian"):
    LoRALinear.__init__(self, base, r, alpha, dropout, init)
    self.unused = nn.Parameter(torch.zeros(3, dtype=base.weight.dtype))  # trained (and counted), not in the formula


@pytest.mark.parametrize(
    "variant, fails",
    [
        (toy("noisy_start", __init__=_random_B_init), {"output = base at step 0"}),
        (toy("no_switch", forward=_ignores_switch), {"disable = original base", "merge / unmerge"}),
        (toy("no_scale", delta_weight=_forgets_scale), {"merge / unmerge"}),
        (toy("extra_param", __init__=_extra_param_init), {"parameter report", "gradients"}),
    ],
)
def test_a_broken_variant_fails_and_says_why(variant, fails, scratch_variants, capsys):
    report = check_variant(variant)
    printed = capsys.readouterr().out
    assert not report.passed and {g.name for g in report.failures} == fails, printed
    assert "FAILS" in printed and "guarantee(s) fail" in printed


def test_checker_reports_a_bad_registration(scratch_variants, capsys):
    no_formula = type("NoFormula", (LoRALinear,), {"__doc__": "Forgot to say.", "variant": "no_formula"})
    report = check_variant(no_formula)
    assert not report.passed and "docstring must state its parameter formula" in report.failures[0].detail
    assert "no_formula" not in VARIANTS
    assert not check_variant("no_such_variant", verbose=False).passed


def test_a_notebook_sized_variant(scratch_variants):
    @register_variant
    class GatedLoRA(LoRALinear):
        """LoRA with a learned gate per rank component: y = base(x) + scale * B(g * A(x)).

        Trainable parameters per layer: r*(d+k)+r
        """

        variant = "gated"
        parameter_formula = "r*(d+k)+r"

        @classmethod
        def parameter_count(cls, d, k, r):
            return r * (d + k) + r

        def __init__(self, base, r, alpha, dropout=0.0, init="gaussian"):
            super().__init__(base, r, alpha, dropout, init)
            self.gate = nn.Parameter(torch.ones(r, device=base.weight.device, dtype=base.weight.dtype))

        def forward(self, x):
            if self.merged or not self.enabled:
                return self.base(x)
            h = F.linear(self.lora_dropout(x), self.lora_A) * self.gate * self.scale
            return self.base(x) + F.linear(h, self.lora_B)

        def delta_weight(self):
            f = lambda t: t.detach().float()  # noqa: E731
            return self.scale * (f(self.lora_B) * f(self.gate)) @ f(self.lora_A)

    report = check_variant(GatedLoRA, verbose=False)
    assert report.passed
    assert report.guarantees[-1].holds is None and "['gate'] have no place in PEFT" in report.guarantees[-1].detail
    with pytest.raises(LoRAError, match="belongs to the built-in"):
        register_variant(type("Fake", (LoRALinear,), {"__doc__": "r*(d+k)", "variant": "dora"}))


def test_a_new_formula_needs_its_own_parameter_count(scratch_variants):
    gated = type(
        "Gated", (LoRALinear,), {"__doc__": "Counts r*(d+k)+r", "variant": "gated2", "parameter_formula": "r*(d+k)+r"}
    )
    with pytest.raises(LoRAError, match=r"inherits parameter_count from LoRALinear \('r\*\(d\+k\)'\); define"):
        register_variant(gated)
    gated.parameter_count = classmethod(lambda cls, d, k, r: r * (d + k) + r)
    assert register_variant(gated) is gated and gated.parameter_count(3, 4, 2) == 16
    broken = type(
        "Broken", (gated,), {"__doc__": "r*(d+k)+r", "variant": "broken2", "parameter_count": lambda self, d, k, r: 1}
    )
    with pytest.raises(LoRAError, match=r"Broken.parameter_count\(d=8, k=6, r=2\) raised TypeError"):
        register_variant(broken)  # not a classmethod: called on the class, it fails


def test_rows_independent_is_a_claim_each_forward_makes():
    assert all(VARIANTS[n].rows_independent is True for n in BUILTIN_VARIANTS)  # each built-in computes rows alone
    same_forward = type("SameForward", (LoRALinear,), {})
    own_forward = type("OwnForward", (LoRALinear,), {"forward": lambda self, x: self.base(x)})
    claimed = type("Claimed", (own_forward,), {"rows_independent": True})
    assert same_forward.rows_independent and not own_forward.rows_independent and claimed.rows_independent
    assert not type("Later", (claimed,), {"forward": claimed.forward}).rows_independent  # a new forward: a new claim


# --- settings -----------------------------------------------------------------------------------------


def test_bad_variant_settings_are_refused_clearly():
    with pytest.raises(LoRAError, match=r"Unknown LoRA variant 'doraa'; registered variants: \[.*'dora'"):
        LoRAConfig(variant="doraa")
    with pytest.raises(LoRAError, match=r"Variant 'lora' has no option\(s\) \['vera_seed'\]; its options: none"):
        LoRAConfig(options={"vera_seed": 1})
    with pytest.raises(LoRAError, match=r"vera_seed must be a non-negative integer below 2\*\*32, got -1"):
        LoRAConfig(variant="vera", options={"vera_seed": -1})
    with pytest.raises(LoRAError, match="below 2"):
        LoRAConfig(variant="vera", options={"vera_seed": 2**62})
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(LoRAError, match="option d_init must be a finite number"):
            LoRAConfig(variant="vera", options={"d_init": bad})
    with pytest.raises(LoRAError, match="option vera_seed must be a int, got 1.5"):
        LoRAConfig(variant="vera", options={"vera_seed": 1.5})
    assert LoRAConfig(variant="vera", options={"d_init": 1}).options == {"vera_seed": 0, "d_init": 1}
    config = LoRAConfig(variant="vera", options={"vera_seed": 3})
    assert LoRAConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_apply_lora_refusal_leaves_the_model_untouched():
    model = tiny_gpt()
    before = snapshot(model)
    for config in (LoRAConfig(r=33, variant="dora"), LoRAConfig(r=2, variant="pissa", targets=("nope",))):
        with pytest.raises(LoRAError):
            apply_lora(model, config)
        assert_same(model, before)


# --- each variant's own rule ------------------------------------------------------------------------


def test_rslora_scales_by_alpha_over_sqrt_r():
    layer = VARIANTS["rslora"](nn.Linear(16, 12), r=4, alpha=8.0)
    assert layer.scale == 8.0 / 2.0
    with torch.no_grad():
        layer.lora_B.normal_()
    torch.testing.assert_close(layer.delta_weight(), 4.0 * layer.lora_B @ layer.lora_A)


def test_dora_is_magnitude_times_normalised_direction():
    torch.manual_seed(0)
    layer = VARIANTS["dora"](nn.Linear(16, 12, bias=True), r=4, alpha=8.0)
    W0 = layer.base.weight.detach().clone()
    torch.testing.assert_close(layer.lora_magnitude.detach(), W0.norm(dim=1))  # m starts at ||W0|| per row
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.lora_magnitude.mul_(torch.linspace(0.5, 2.0, 12))
    x = torch.randn(5, 16)
    V = W0 + layer.scale * layer.lora_B @ layer.lora_A
    W = layer.lora_magnitude[:, None] * V / V.norm(dim=1, keepdim=True)
    torch.testing.assert_close(layer(x), x @ W.T + layer.base.bias)
    # the norm is a constant for autograd (the paper's detach): the gradient of m is the unit direction's output
    layer(x).sum().backward()
    expected = ((x @ (V / V.norm(dim=1, keepdim=True)).T).sum(0)).detach()
    torch.testing.assert_close(layer.lora_magnitude.grad, expected)
    torch.testing.assert_close(layer.merged_weight(W0), W.detach())


def test_pissa_starts_from_the_principal_part_and_keeps_the_original_weight():
    torch.manual_seed(0)
    base = nn.Linear(20, 16)
    W = base.weight.detach().clone()
    layer = VARIANTS["pissa"](base, r=3, alpha=6.0)
    U, S, Vh = torch.linalg.svd(W)
    top = U[:, :3] @ torch.diag(S[:3]) @ Vh[:3]
    torch.testing.assert_close(layer.scale * layer.pissa_B0 @ layer.pissa_A0, top)  # s B0 A0 = best rank-r part
    assert torch.equal(layer.lora_A, layer.pissa_A0) and torch.equal(layer.lora_B, layer.pissa_B0)
    assert torch.equal(layer.base.weight, W)  # the residual stays implicit: W itself is never rewritten
    x = torch.randn(4, 20)
    with torch.no_grad():
        layer.lora_B.add_(0.1)
    residual = W - top
    torch.testing.assert_close(layer(x), x @ (residual + layer.scale * layer.lora_B @ layer.lora_A).T + base.bias)
    assert not layer.pissa_A0.requires_grad and "pissa_A0" not in dict(layer.named_parameters())


def test_pissa_disabled_is_the_original_base_and_exports_as_rank_2r(tmp_path):
    base = tiny_gpt()
    model = trained(apply_lora(copy.deepcopy(base), LoRAConfig(r=3, alpha=6, variant="pissa")))
    x = tokens()
    set_lora_enabled(model, False)
    assert torch.equal(logits(model, x), logits(base, x))
    set_lora_enabled(model, True)
    export_peft(model, tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["use_dora"], cfg["use_rslora"]) == (6, 12.0, False, False)
    shapes = {k: tuple(v.shape) for k, v in load_file(str(tmp_path / "peft" / "adapter_model.safetensors")).items()}
    assert shapes["base_model.model.blocks.0.attn.q_proj.lora_A.weight"] == (6, TINY.n_embd)
    again = import_peft(copy.deepcopy(base), tmp_path / "peft")
    assert again.lora_config.variant == "lora" and again.lora_config.r == 6
    torch.testing.assert_close(logits(again, x), logits(model, x), rtol=1e-5, atol=1e-6)


def test_vera_shares_one_frozen_pair_and_stores_only_the_vectors(tmp_path):
    base = tiny_gpt()
    config = LoRAConfig(r=4, variant="vera", targets=("q_proj", "v_proj", "up_proj"), options={"vera_seed": 7})
    model = trained(apply_lora(copy.deepcopy(base), config))
    layers = lora_layers(model)
    q, v = layers["blocks.0.attn.q_proj"], layers["blocks.1.attn.v_proj"]
    assert q.vera_A is v.vera_A and q.vera_B is v.vera_B  # one tensor, shared
    assert torch.equal(q.vera_A, shared_pair(7, 4, TINY.n_embd, TINY.n_embd)[0])
    assert not torch.equal(q.vera_A, shared_pair(8, 4, TINY.n_embd, TINY.n_embd)[0])  # the seed matters
    assert {n for n, p in q.named_parameters() if not n.startswith("base.")} == {"vera_d", "vera_b"}
    assert torch.all(VARIANTS["vera"](nn.Linear(8, 8), 2, 1.0).vera_d == 0.1)
    save_adapter(model, tmp_path / "vera")
    stored = load_file(str(tmp_path / "vera" / "adapter_model.safetensors"))
    assert {k.rpartition(".")[2] for k in stored} == {"vera_d", "vera_b"}
    again = load_adapter(copy.deepcopy(base), tmp_path / "vera")  # the pair is regenerated from the seed
    assert torch.equal(logits(again, tokens()), logits(model, tokens()))
    with pytest.raises(LoRAError, match="cannot be exported to PEFT"):
        export_peft(model, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


def test_lora_fa_trains_only_B():
    model = apply_lora(tiny_gpt(), LoRAConfig(r=2, variant="lora_fa"))
    layer = lora_layers(model)["blocks.0.attn.q_proj"]
    assert "lora_A" in dict(layer.named_buffers()) and "lora_A" not in dict(layer.named_parameters())
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {f"{n}.lora_B" for n in lora_layers(model)}
    assert parameter_report(model).lora_params == len(lora_layers(model)) * 2 * TINY.n_embd


# --- everything else works for every variant ---------------------------------------------------------


@pytest.mark.parametrize("name", BUILTIN_VARIANTS)
def test_bank_swaps_variants_and_disable_gives_the_original_base(name, tmp_path):
    base = tiny_gpt()
    x = tokens()
    adapted = trained(apply_lora(copy.deepcopy(base), LoRAConfig(r=2, variant=name)))
    plain = trained(apply_lora(copy.deepcopy(base), LoRAConfig(r=2)), seed=1)
    save_adapter(adapted, tmp_path / name)
    bank = AdapterBank(copy.deepcopy(base))
    bank.add(name, tmp_path / name)
    bank.add("plain", plain)
    bank.activate(name)
    assert torch.equal(logits(bank.model, x), logits(adapted, x))
    merge_lora(bank.model)
    torch.testing.assert_close(logits(bank.model, x), logits(adapted, x), rtol=1e-5, atol=1e-5)
    unmerge_lora(bank.model)
    bank.activate("plain")
    assert torch.equal(logits(bank.model, x), logits(plain, x))
    bank.disable()
    assert torch.equal(logits(bank.model, x), logits(base, x))
    assert all(torch.equal(a, b) for a, b in zip(bank.model.state_dict().values(), base.state_dict().values()))


def test_an_adapted_model_refuses_another_variants_adapter(tmp_path):
    save_adapter(apply_lora(tiny_gpt(), LoRAConfig(r=2, variant="dora")), tmp_path / "dora")
    model = apply_lora(tiny_gpt(), LoRAConfig(r=2))
    before = snapshot(model)
    with pytest.raises(LoRAError, match="is a 'dora' adapter .* the model carries 'lora'"):
        load_adapter(model, tmp_path / "dora")
    assert_same(model, before)


def test_adapter_config_names_the_variant_and_its_options(tmp_path):
    model = apply_lora(tiny_gpt(), LoRAConfig(r=2, variant="vera", options={"vera_seed": 5}))
    save_adapter(model, tmp_path / "a")
    meta = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert meta["variant"] == "vera" and meta["scaling"] == "none"
    assert meta["lora_config"]["options"] == {"vera_seed": 5, "d_init": 0.1}
    assert meta["modules"][0]["vera_d"] == [2] and meta["modules"][0]["vera_b"] == [TINY.n_embd]
    meta["scaling"] = "alpha/r"  # a file whose scaling rule does not match its variant is refused
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.raises(Exception, match="unsupported scaling rule 'alpha/r' for variant 'vera'"):
        load_adapter(tiny_gpt(), tmp_path / "a")


# --- LoRA+ ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, fast", [("lora", {"lora_B"}), ("dora", {"lora_B", "lora_magnitude"}), ("vera", {"vera_b"})]
)
def test_lora_plus_trains_B_at_ratio_times_the_rate(name, fast):
    model = apply_lora(tiny_gpt(), LoRAConfig(r=2, variant=name))
    layer = lora_layers(model)["blocks.0.attn.q_proj"]
    assert {id(p) for p in lora_plus_parameters(model)} == {
        id(p) for l in lora_layers(model).values() for n, p in l.named_parameters() if n in fast
    }
    trained(model)
    x = tokens()
    moves = {}
    for ratio in (None, 16.0):
        m = copy.deepcopy(model)
        cfg = TrainConfig(learning_rate=1e-3, weight_decay=0.0, lora_plus_ratio=ratio, fused_optimizer=False)
        opt = make_optimizer(m, cfg)
        assert isinstance(opt, LoRAPlusAdamW) == (ratio is not None)
        for g in opt.param_groups:
            g["lr"] = 1e-3  # what any training loop's schedule does
        m(x, x)[1].backward()
        opt.step()
        after = dict(lora_layers(m)["blocks.0.attn.q_proj"].named_parameters())
        moves[ratio] = {n: (after[n] - p).abs().max().item() for n, p in layer.named_parameters() if p.requires_grad}
        assert all(g["lr"] == 1e-3 for g in opt.param_groups)  # the schedule's value is left in place
    for n in moves[None]:  # Adam's first step moves each weight by ~lr: 16x that for B
        expected = 16.0 if n in fast else 1.0
        assert moves[16.0][n] == pytest.approx(expected * moves[None][n], rel=1e-3), n


def test_lora_plus_settings_are_checked(scratch_variants):
    with pytest.raises(ValueError, match="lora_plus_ratio must be None"):
        TrainConfig(lora_plus_ratio=0)
    with pytest.raises(ValueError, match="no LoRA B tensors"):
        make_optimizer(tiny_gpt(), TrainConfig(lora_plus_ratio=16.0))
    # a variant whose lora_plus_names match none of its trained tensors is named, with its names
    register_variant(toy("up_down", lora_plus_names=("lora_up",)))
    model = apply_lora(tiny_gpt(), LoRAConfig(r=2, variant="up_down"))
    before = snapshot(model)
    with pytest.raises(LoRAError, match=r"variant 'up_down' names \('lora_up',\) and its layer .* trains"):
        make_optimizer(model, TrainConfig(lora_plus_ratio=16.0))
    assert_same(model, before)


# --- CLI and widgets ---------------------------------------------------------------------------------


def test_cli_variant_options(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = cli.build_parser().parse_args(["finetune", "--variant", "vera", "--vera-seed", "3", "--lora-plus"])
    assert args.lora_plus == 16.0
    config = cli._lora_config(args)
    assert (config.variant, config.options["vera_seed"]) == ("vera", 3)
    assert cli._train_config(args, full=False).lora_plus_ratio == 16.0
    assert cli.main(["finetune", "--vera-seed", "3"]) == 2
    assert "Variant 'lora' has no option(s) ['vera_seed']" in capsys.readouterr().err
    assert cli.main(["finetune", "--full", "--lora-plus", "4"]) == 2
    err = capsys.readouterr().err
    assert "--lora-plus" in err and "--full" in err
    assert cli.main(["finetune", "--variant", "nope"]) == 2
    assert not any(tmp_path.iterdir())  # refused before anything was loaded or written


def test_counts_in_widgets_come_from_the_variants(tiny_config):
    assert numerics.lora_params(12, 20, 3, "dora") == 3 * 32 + 12
    assert numerics.lora_params(12, 20, 3) == 3 * 32 and numerics.lora_params(12, 20, 3, "vera") == 15
    seen = []
    dash = widgets.RankDashboard(
        GPT(tiny_config),
        ranks=(1, 2),
        r=2,
        groups=("Wq",),
        include_full=False,
        evaluate=lambda lora: seen.append(lora) or {"target": 2.0, "source": 1.0},
    )
    assert dash.current.variant == "lora"
    dash.variant.value = "pissa"
    assert seen[-1].variant == "pissa" and dash.current.variant == "pissa" and "pissa r=2" in dash.current.label
    n = tiny_config.n_layer
    assert dash.current.trainable_params == n * 2 * 2 * tiny_config.n_embd
    assert dash.current.adapter_bytes == 2 * 4 * dash.current.trainable_params  # A, B and the frozen A0, B0
    dash.variant.value = "lora"
    assert dash.from_cache and dash.current.variant == "lora"


# --- older adapters, and the base a fine-tune reports -----------------------------------------------------


def test_an_adapter_written_before_variants_still_loads(tmp_path):
    model = trained(apply_lora(tiny_gpt(), LoRAConfig(r=2)))
    save_adapter(model, tmp_path / "a")
    path = tmp_path / "a" / "adapter_config.json"
    meta = json.loads(path.read_text())
    del meta["variant"], meta["lora_config"]["variant"], meta["lora_config"]["options"]  # the v1 layout before
    for m in meta["modules"]:
        assert set(m) == {"name", "d", "k", "r", "lora_A", "lora_B"}
    path.write_text(json.dumps(meta))
    again = load_adapter(tiny_gpt(), tmp_path / "a")
    assert again.lora_config.variant == "lora"
    assert torch.equal(logits(again, tokens()), logits(model, tokens()))


@pytest.mark.parametrize("variant", ["pissa", "noisy_start"])
def test_finetune_reports_the_original_base(variant, tmp_path, scratch_variants):
    # pissa's step 0 equals the base only up to rounding; a toy that starts away from the base shows that
    # the base row is measured on the base itself (adapters off), not on the adapted model's step 0.
    if variant == "noisy_start":
        register_variant(toy("noisy_start", __init__=_random_B_init, starts_at_base=False))
    from test_tasks import write_synthetic_corpus

    from lora_lab import CharTokenizer
    from lora_lab.experiments.estimator import task_scores
    from lora_lab.experiments.finetune import encode_task, finetune, finetune_config
    from lora_lab.tasks import make_task

    text = write_synthetic_corpus(tmp_path / "input.txt", n_turns=400).read_text()
    a, b = int(len(text) * 0.9), int(len(text) * 0.95)
    splits = {"train": text[:a], "validation": text[a:b], "test": text[b:]}
    tokenizer = CharTokenizer.from_text(text)
    torch.manual_seed(0)
    base = GPT(TINY.__class__(vocab_size=tokenizer.vocab_size, block_size=16, n_layer=2, n_head=2, n_embd=32))
    task = make_task("shout", splits)
    cfg = finetune_config(max_iters=2, device="cpu", lora_plus_ratio=16.0)
    res = finetune(base, task, tokenizer, LoRAConfig(r=2, variant=variant), cfg, progress=False, eval_chars=200)
    exact = task_scores(base, encode_task(task, tokenizer), 200)
    assert res.base_losses == {"target": exact["target"], "source": exact["source"]}
    if variant == "noisy_start":
        assert res.curve[0]["target"] != exact["target"]  # step 0 is not the base here
    assert res.lora.variant == variant and res.trainable_params == parameter_report(res.model).lora_params

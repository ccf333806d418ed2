"""The variant contract, proved both ways: a new variant written from the public API alone passes it and works
everywhere (another process, merging, banks, mixed batches, LoRA+, bf16), and each check fails on a variant
built to break it."""

import os
import subprocess
import sys
import textwrap
from importlib.metadata import EntryPoint

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file
from tiny_models import tiny_gpt, tokens

import lora_lab as ll
from lora_lab import lora
from lora_lab.lora import UnknownVariantError, resolve_variant
from lora_lab.storage.mixed import MixedAdapterModel
from lora_lab.train import make_optimizer

# LoRA-XS (Bałazy et al. 2024, arXiv:2405.17604), as a user would write it: fewer than 40 lines, public API only.
LORA_XS = '''
import torch, torch.nn as nn, torch.nn.functional as F

import lora_lab as ll


@ll.register_variant
class LoRAXS(ll.LoRALinear):
    """LoRA-XS: y = W x + scale * B R A x, with A and B frozen from W's top-r singular vectors and R (r x r)
    trained from zero. Trainable parameters per layer: r*r"""

    variant, parameter_formula = "lora_xs", "r*r"
    lora_plus_names = ("lora_R",)  # R is the only trained tensor, on the output side of A
    rows_independent = True  # every row on its own

    @classmethod
    def parameter_count(cls, d, k, r):
        return r * r

    def __init__(self, base, r, alpha, dropout=0.0, init="gaussian"):
        super().__init__(base, r, alpha, dropout, init)
        w = base.weight
        U, S, Vh = torch.linalg.svd(w.detach().float(), full_matrices=False)
        with torch.no_grad():
            self.lora_A.copy_(Vh[:r])  # (r, k)
            self.lora_B.copy_(U[:, :r] * S[:r])  # (d, r)
        self.lora_A.requires_grad_(False)  # frozen, and saved with the adapter
        self.lora_B.requires_grad_(False)
        self.lora_R = nn.Parameter(torch.zeros(r, r, dtype=w.dtype, device=w.device))

    def forward(self, x):
        if self.merged or not self.enabled:
            return self.base(x)
        h = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_R) * self.scale
        return self.base(x) + F.linear(h, self.lora_B)

    def delta_weight(self):
        B, R, A = (t.detach().float() for t in (self.lora_B, self.lora_R, self.lora_A))
        return self.scale * B @ R @ A
'''


@pytest.fixture
def scratch_variants():
    """Variants registered by a test are removed again, so the registry holds only the built-ins."""
    before = dict(ll.VARIANTS)
    yield
    ll.VARIANTS.clear()
    ll.VARIANTS.update(before)


@pytest.fixture
def lora_xs(tmp_path, monkeypatch, scratch_variants):
    """The LoRA-XS module, written to a folder on sys.path and imported as a user's module is."""
    (tmp_path / "my_lora_xs.py").write_text(LORA_XS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_lora_xs", raising=False)
    import my_lora_xs

    yield my_lora_xs.LoRAXS
    sys.modules.pop("my_lora_xs", None)


def logits(model, x):
    with torch.no_grad():
        return model(x)[0]


def moved(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen).to(p.dtype) * 0.1)
    return model


def test_lora_xs_is_under_40_lines_of_public_api():
    assert len(LORA_XS.strip().splitlines()) < 40
    assert "lora_lab." not in LORA_XS.replace("import lora_lab as ll", "")  # only what `ll` offers


def test_lora_xs_passes_the_whole_contract(lora_xs, capsys):
    report = ll.check_variant(lora_xs)
    printed = capsys.readouterr().out
    assert report.passed, printed
    applies = {g.name: g.holds for g in report.guarantees}
    assert all(applies[n] is True for n in applies if n != "PEFT round trip"), printed  # none skipped as n/a
    assert applies["PEFT round trip"] is None and "lora_R" in report.guarantees[-1].detail  # refused, clearly


def test_lora_xs_keeps_A_and_B_frozen_and_trains_R_with_lora_plus_in_bf16(lora_xs):
    base = tiny_gpt().to(torch.bfloat16)
    model = ll.apply_lora(base, ll.LoRAConfig(r=2, variant="lora_xs", targets=("q_proj", "up_proj")))
    layer = ll.lora_layers(model)["blocks.0.attn.q_proj"]
    assert not layer.lora_A.requires_grad and not layer.lora_B.requires_grad and layer.lora_R.requires_grad
    assert ll.parameter_report(model).lora_params == 2 * 2 * 2 * 2  # two layers per block, two blocks, r*r
    frozen = {n: t.clone() for n, t in model.state_dict().items() if not n.endswith("lora_R")}
    opt = make_optimizer(model, ll.TrainConfig(learning_rate=1e-2, lora_plus_ratio=16.0, fused_optimizer=False))
    assert [g.get("lr_scale", 1.0) for g in opt.param_groups] == [16.0]  # R, the only trained tensor: LoRA+'s group
    x = tokens()
    for _ in range(3):
        loss = model(x, x)[1]
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert torch.isfinite(loss) and layer.lora_R.dtype == torch.bfloat16 and layer.lora_R.abs().sum() > 0
    assert all(torch.equal(t, model.state_dict()[n]) for n, t in frozen.items())  # A, B and the base never moved


def test_lora_xs_saves_and_loads_in_a_fresh_process(lora_xs, tmp_path):
    model = moved(ll.apply_lora(tiny_gpt(), ll.LoRAConfig(r=3, variant="lora_xs")))
    ll.save_adapter(model, tmp_path / "xs")
    save_file({"logits": logits(model, tokens())}, str(tmp_path / "expected.safetensors"))
    child = textwrap.dedent(f"""
        import torch
        from safetensors.torch import load_file
        from tiny_models import tiny_gpt, tokens
        import lora_lab as ll
        from lora_lab.lora import resolve_variant
        IMPORTS
        torch.manual_seed(1234)  # another random state than the one the adapter was made under
        try:
            model = ll.load_adapter(tiny_gpt(), {str(tmp_path / "xs")!r})
        except Exception as err:
            print("refused:", err)
        else:
            with torch.no_grad():
                same = torch.equal(model(tokens())[0], load_file({str(tmp_path / "expected.safetensors")!r})["logits"])
            print(type(ll.lora_layers(model)["blocks.0.attn.q_proj"]).__name__, same)
    """)
    helpers = os.path.dirname(sys.modules["tiny_models"].__file__)  # tests/, for tiny_gpt and tokens
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), helpers, os.environ.get("PYTHONPATH", "")])}

    def run(imports):
        code = child.replace("IMPORTS", imports)
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout

    for imports in ("import my_lora_xs", "resolve_variant('my_lora_xs:LoRAXS')"):
        assert run(imports).split() == ["LoRAXS", "True"]
    refused = run("pass")  # the module that registers the variant was never imported: said so, by name
    assert refused.startswith("refused:") and "'lora_xs'" in refused and "import" in refused, refused


def test_lora_xs_merges_banks_and_mixes(lora_xs, tmp_path):
    base, x = tiny_gpt(), tokens(batch=4)
    config = ll.LoRAConfig(r=2, variant="lora_xs", targets=("q_proj", "v_proj", "down_proj"))
    xs = moved(ll.apply_lora(tiny_gpt(), config))
    want = logits(xs, x)
    merged = ll.merge_and_unload(moved(ll.apply_lora(tiny_gpt(), config)))
    assert not ll.lora_layers(merged)
    torch.testing.assert_close(logits(merged, x), want, rtol=1e-5, atol=1e-5)
    ll.save_adapter(xs, tmp_path / "xs")
    bank = ll.AdapterBank(tiny_gpt())
    bank.add("xs", tmp_path / "xs")
    bank.add("plain", moved(ll.apply_lora(tiny_gpt(), ll.LoRAConfig(r=2)), seed=3))
    bank.activate("plain")
    bank.activate("xs")
    assert torch.equal(logits(bank.model, x), want)
    bank.disable()
    assert torch.equal(logits(bank.model, x), logits(base, x))
    mixed = MixedAdapterModel(tiny_gpt())
    mixed.add("xs", tmp_path / "xs")
    with torch.no_grad():
        rows = mixed(x, ["xs", None, "xs", None])[0]
    torch.testing.assert_close(rows[[0, 2]], want[[0, 2]], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rows[[1, 3]], logits(base, x)[[1, 3]], rtol=1e-5, atol=1e-6)


# --- a user's variant by name: registered, an import path, or an installed package's entry point -----------


def test_resolve_variant_by_name_import_path_and_entry_point(lora_xs, monkeypatch):
    assert resolve_variant("dora") is ll.VARIANTS["dora"]
    del ll.VARIANTS["lora_xs"]
    assert resolve_variant("my_lora_xs:LoRAXS") is lora_xs and ll.VARIANTS["lora_xs"] is lora_xs  # registered
    del ll.VARIANTS["lora_xs"]
    published = [EntryPoint("lora_xs", "my_lora_xs:LoRAXS", lora.ENTRY_POINT_GROUP)]
    monkeypatch.setattr(lora, "entry_points", lambda group: published if group == lora.ENTRY_POINT_GROUP else [])
    assert resolve_variant("lora_xs") is lora_xs
    del ll.VARIANTS["lora_xs"]
    assert ll.LoRAConfig(variant="lora_xs").layer_class is lora_xs  # a config (or an adapter file) finds it too
    published[:] = [EntryPoint("xs", "my_lora_xs:LoRAXS", lora.ENTRY_POINT_GROUP)]
    with pytest.raises(ll.LoRAError, match="'xs'.*variant name is 'lora_xs'; publish it under that name"):
        resolve_variant("xs")
    published[:] = [EntryPoint("broken", "no_such_module_here:X", lora.ENTRY_POINT_GROUP)]
    with pytest.raises(ll.LoRAError, match="'broken' .*cannot be loaded: ModuleNotFoundError"):
        resolve_variant("broken")


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no_such_module_here:X", r"'no_such_module_here:X': cannot import module 'no_such_module_here'"),
        ("lora_lab.lora:Nothing", r"'lora_lab.lora:Nothing': module 'lora_lab.lora' has no attribute 'Nothing'"),
        ("lora_lab.lora:LoRAConfig", r"'lora_lab.lora:LoRAConfig' is .*LoRAConfig.*not a subclass of LoRALinear"),
        ("lora_lab.variants.dora:row_norm", r"not a subclass of LoRALinear"),
        ("", r"a name or an import path 'module:Class', got ''"),
    ],
)
def test_resolve_variant_names_what_failed(spec, message):
    before = dict(ll.VARIANTS)
    with pytest.raises(ll.LoRAError, match=message):
        resolve_variant(spec)
    assert ll.VARIANTS == before


def test_an_unknown_name_says_how_to_register_it():
    with pytest.raises(UnknownVariantError, match="'nope'.*import it first.*'lora_lab.variants'") as err:
        resolve_variant("nope")
    assert err.value.variant == "nope" and isinstance(err.value, ll.LoRAError)


def test_a_variant_that_cannot_register_is_refused_by_resolve(tmp_path, monkeypatch, scratch_variants):
    (tmp_path / "bad_variant.py").write_text(
        "import lora_lab as ll\nclass Fake(ll.LoRALinear):\n    '''r*(d+k)'''\n    variant = 'dora'\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ll.LoRAError, match="'bad_variant:Fake' cannot be registered: .*belongs to the built-in"):
        resolve_variant("bad_variant:Fake")


# --- each check fails on a variant built to break it -------------------------------------------------------


def variant(name, body, formula="r*(d+k)", **attrs):
    doc = f"A broken toy. Trainable parameters per layer: {formula}"
    return type(
        name.title(), (ll.LoRALinear,), {"__doc__": doc, "variant": name, "parameter_formula": formula, **body, **attrs}
    )


def _fp32_gate_init(self, base, r, alpha, dropout=0.0, init="gaussian"):
    ll.LoRALinear.__init__(self, base, r, alpha, dropout, init)
    self.gate = nn.Parameter(torch.ones(r))  # the README's old bug: fp32 whatever the base's dtype


def _gated_forward(self, x):
    if self.merged or not self.enabled:
        return self.base(x)
    return self.base(x) + F.linear(F.linear(x, self.lora_A) * self.gate * self.scale, self.lora_B)


def _gated_delta(self):
    return self.scale * (self.lora_B * self.gate).detach().float() @ self.lora_A.detach().float()


def _dead_init(self, base, r, alpha, dropout=0.0, init="gaussian"):
    ll.LoRALinear.__init__(self, base, r, alpha, dropout, init)
    nn.init.zeros_(self.lora_A)  # A = B = 0: the output is the base, and no gradient ever moves either


def _accept_anything(cls, options):
    return {**cls.options, **options}  # no names, no types, no ranges checked


def _types_only(cls, options):
    full = {**cls.options, **options}
    if set(full) != set(cls.options) or not all(isinstance(v, float) for v in full.values()):
        raise ll.LoRAError(f"bad options {options}")
    return full  # forgets that NaN and inf are floats too


def _with_gain_init(self, base, r, alpha, dropout=0.0, init="gaussian", gain=1.0):
    ll.LoRALinear.__init__(self, base, r, alpha, dropout, init)


def _eval_blind_forward(self, x):
    if self.merged or (not self.enabled and self.training):  # forgets the switch in eval mode
        return self.base(x)
    return self.base(x) + F.linear(F.linear(x, self.lora_A) * self.scale, self.lora_B)


def _random_buffer_init(self, base, r, alpha, dropout=0.0, init="gaussian"):
    ll.LoRALinear.__init__(self, base, r, alpha, dropout, init)
    w = base.weight
    self.register_buffer("jitter", 1 + 0.1 * torch.randn(base.out_features, dtype=w.dtype), persistent=False)


def _jittered_forward(self, x):
    if self.merged or not self.enabled:
        return self.base(x)
    return self.base(x) + self.jitter * F.linear(F.linear(x, self.lora_A) * self.scale, self.lora_B)


def _jittered_delta(self):
    return self.jitter.float()[:, None] * ll.LoRALinear.delta_weight(self)


GATE = dict(
    __init__=_fp32_gate_init,
    forward=_gated_forward,
    delta_weight=_gated_delta,
    parameter_count=classmethod(lambda cls, d, k, r: r * (d + k) + r),
)


@pytest.mark.parametrize(
    "broken, fails, why",
    [
        (variant("fp32_gate", GATE, "r*(d+k)+r"), {"bf16 and fp16"}, "dtype=base.weight.dtype"),
        (variant("dead_start", dict(__init__=_dead_init)), {"learns from step 0"}, "all-zero gradient"),
        (
            variant(
                "lax_options",
                dict(__init__=_with_gain_init, check_options=classmethod(_accept_anything)),
                options={"gain": 1.0},
            ),
            {"bad hyperparameters"},
            "accepted",
        ),
        (
            variant(
                "nan_gain",
                dict(__init__=_with_gain_init, check_options=classmethod(_types_only)),
                options={"gain": 1.0},
            ),
            {"bad hyperparameters"},
            "gain=nan",
        ),
        (variant("eval_blind", dict(forward=_eval_blind_forward)), {"disable = original base"}, "in eval mode"),
        (
            variant(
                "jitter", dict(__init__=_random_buffer_init, forward=_jittered_forward, delta_weight=_jittered_delta)
            ),
            {"save -> load", "AdapterBank", "PEFT round trip"},
            "another random state",
        ),
    ],
    ids=[
        "fp32-only tensor",
        "A = B = 0",
        "options accept nonsense",
        "options accept NaN",
        "disable broken in eval",
        "random buffer",
    ],
)
def test_each_check_fails_on_a_variant_built_to_break_it(broken, fails, why, scratch_variants, capsys):
    report = ll.check_variant(broken)
    printed = capsys.readouterr().out
    assert {g.name for g in report.failures} == fails, printed
    assert why in report.failures[0].detail, printed


def test_lora_plus_names_that_match_nothing_are_named(scratch_variants):
    renamed = variant("renamed_b", {}, lora_plus_names=("lora_up",))
    report = ll.check_variant(renamed, verbose=False)
    lora_plus = next(g for g in report.guarantees if g.name == "LoRA+")
    assert lora_plus.holds is False and "'renamed_b' names ('lora_up',)" in lora_plus.detail
    model = ll.apply_lora(tiny_gpt(), ll.LoRAConfig(r=2, variant="renamed_b"))
    with pytest.raises(
        ll.LoRAError, match=r"variant 'renamed_b' names \('lora_up',\) .* trains \['lora_A', 'lora_B'\]"
    ):
        make_optimizer(model, ll.TrainConfig(lora_plus_ratio=16.0))
    opted_out = variant("no_lora_plus", {}, lora_plus_names=())
    report = ll.check_variant(opted_out, verbose=False)
    assert report.passed and next(g for g in report.guarantees if g.name == "LoRA+").holds is None

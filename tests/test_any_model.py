"""LoRA on models lora_lab did not build: a GPT written elsewhere (one fused q/k/v Linear, GPT-2's names, a
`config` that is not lora_lab's) and a plain nn.Sequential MLP. Everything that stores or serves adapters
works on them: save/load, refusal of other weights, merge, AdapterBank, mixed batches, PEFT, the report."""

import copy
import json
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lora_lab import (
    AdapterBank,
    AdapterMismatchError,
    LoRAConfig,
    apply_lora,
    export_peft,
    import_peft,
    load_adapter,
    lora_layers,
    merge_and_unload,
    parameter_report,
    save_adapter,
)
from lora_lab.storage.mixed import MixedAdapterModel


@dataclass
class OtherConfig:  # not lora_lab's GPTConfig: no fingerprint, no to_dict
    vocab: int = 11
    width: int = 16
    heads: int = 2
    layers: int = 2
    context: int = 8


class Block(nn.Module):
    def __init__(self, c: OtherConfig):
        super().__init__()
        self.heads = c.heads
        self.ln_1, self.ln_2 = nn.LayerNorm(c.width), nn.LayerNorm(c.width)
        self.attn = nn.Module()
        self.attn.c_attn = nn.Linear(c.width, 3 * c.width)  # q, k and v in one matrix, as in GPT-2
        self.attn.c_proj = nn.Linear(c.width, c.width)
        self.mlp = nn.Module()
        self.mlp.c_fc = nn.Linear(c.width, 4 * c.width)
        self.mlp.c_proj = nn.Linear(4 * c.width, c.width)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.attn.c_attn(self.ln_1(x)).split(C, dim=-1)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.attn.c_proj(y)
        return x + self.mlp.c_proj(F.gelu(self.mlp.c_fc(self.ln_2(x))))


class OtherGPT(nn.Module):
    def __init__(self, c: OtherConfig):
        super().__init__()
        self.config = c
        self.wte, self.wpe = nn.Embedding(c.vocab, c.width), nn.Embedding(c.context, c.width)
        self.h = nn.ModuleList(Block(c) for _ in range(c.layers))
        self.ln_f = nn.LayerNorm(c.width)
        self.lm_head = nn.Linear(c.width, c.vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as in GPT-2

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1)))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def other_gpt(seed=0, **config):
    torch.manual_seed(seed)
    return OtherGPT(OtherConfig(**config)).eval()


def mlp(seed=0, hidden=24):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 3))


MODELS = {
    "gpt": dict(make=other_gpt, other_shape=dict(width=24), targets=("c_attn", "c_fc"), peft=True),
    "mlp": dict(make=mlp, other_shape=dict(hidden=20), targets=("0", "2"), peft=True),
}


def inputs(kind, batch=4, seed=1):
    gen = torch.Generator().manual_seed(seed)
    if kind == "gpt":
        return torch.randint(0, 11, (batch, 8), generator=gen)
    return torch.randn(batch, 10, generator=gen)


def trained(kind, config, seed=3, steps=3):
    """A copy of the base with LoRA, trained for a few steps on random targets (B moves away from zero)."""
    model = apply_lora(MODELS[kind]["make"](), config).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    torch.manual_seed(seed)
    x = inputs(kind, batch=8, seed=seed)
    for _ in range(steps):
        out = model(x)
        loss = (out - torch.randn_like(out)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(params=sorted(MODELS))
def kind(request):
    return request.param


def test_a_fused_qkv_linear_is_one_target():
    model = apply_lora(other_gpt(), LoRAConfig(r=2, targets=("c_attn",)))
    layers = lora_layers(model)
    assert sorted(layers) == ["h.0.attn.c_attn", "h.1.attn.c_attn"]
    assert layers["h.0.attn.c_attn"].lora_B.shape == (48, 2)  # 3 x width outputs: q, k and v together


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_save_load_and_refusal_of_other_weights(kind, variant, tmp_path):
    spec = MODELS[kind]
    config = LoRAConfig(r=2, alpha=4, targets=spec["targets"], variant=variant)
    model = trained(kind, config)
    x = inputs(kind)
    expected = model(x)
    assert not torch.equal(expected, spec["make"]()(x))  # the adapter does something
    save_adapter(model, tmp_path / "ad", metadata={"model": kind})
    saved = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert saved["base_class"].endswith(type(model).__qualname__)
    assert "base_fingerprint" not in saved and "base_config" not in saved  # nothing of lora_lab's GPT

    fresh = load_adapter(spec["make"](), tmp_path / "ad")
    assert torch.equal(fresh(x), expected)

    other_weights = spec["make"](seed=1)  # the same shapes, other values
    with pytest.raises(AdapterMismatchError, match="trained on other base weights"):
        load_adapter(other_weights, tmp_path / "ad")
    assert not lora_layers(other_weights)
    load_adapter(other_weights, tmp_path / "ad", allow_other_base=True)
    assert lora_layers(other_weights)

    other_shape = spec["make"](**spec["other_shape"])
    with pytest.raises(AdapterMismatchError, match=r"another base model .*shapes differ: .*\(adapter's base \("):
        load_adapter(other_shape, tmp_path / "ad", allow_other_base=True)  # never allowed
    assert not lora_layers(other_shape)


def test_merge_and_unload(kind):
    model = trained(kind, LoRAConfig(r=2, alpha=4, targets=MODELS[kind]["targets"]))
    x = inputs(kind)
    unmerged = model(x)
    merged = merge_and_unload(model)
    assert not lora_layers(merged)
    torch.testing.assert_close(merged(x), unmerged, rtol=1e-5, atol=1e-5)


def test_bank_and_mixed_batches(kind, tmp_path):
    spec = MODELS[kind]
    a = trained(kind, LoRAConfig(r=2, alpha=4, targets=spec["targets"]), seed=3)
    b = trained(kind, LoRAConfig(r=3, alpha=3, targets=spec["targets"][:1], variant="dora"), seed=4)
    save_adapter(b, tmp_path / "b")
    base = spec["make"]()
    x = inputs(kind)
    expected = {"a": a(x), "b": b(x), None: base(x)}

    bank = AdapterBank(copy.deepcopy(base))
    bank.add("a", a)
    bank.add("b", tmp_path / "b")
    on_other_weights = load_adapter(spec["make"](seed=1), tmp_path / "b", allow_other_base=True)
    with pytest.raises(AdapterMismatchError, match="other base weights"):
        bank.add("c", on_other_weights)
    assert bank.names == ["a", "b"]
    for name in ["a", "b", None, "a", "b"]:
        bank.activate(name) if name else bank.disable()
        assert torch.equal(bank.model(x), expected[name]), name

    mixed = MixedAdapterModel(copy.deepcopy(base))
    mixed.add("a", a)
    mixed.add("b", tmp_path / "b")
    names = ["a", None, "b", "a"]
    out = mixed(x, names)
    for i, n in enumerate(names):
        torch.testing.assert_close(out[i], expected[n][i], rtol=0, atol=1e-5)


def test_mixed_batches_refuse_a_model_that_reshapes_its_batch():
    class Flattening(nn.Module):  # its Linear sees (B*T, k): rows of the batch are gone there
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(6, 6)

        def forward(self, x):
            return self.proj(x.reshape(-1, 6)).reshape(x.shape)

    torch.manual_seed(0)
    base = Flattening()
    mixed = MixedAdapterModel(base)
    mixed.add("a", apply_lora(copy.deepcopy(base), LoRAConfig(r=2, targets=("proj",))))
    with pytest.raises(Exception, match=r"layer proj gets an input of shape \(12, 6\), not the batch of 4 rows"):
        mixed(torch.randn(4, 3, 6), ["a", None, "a", None])
    assert mixed.model.proj.__class__ is nn.Linear  # put back after the refusal


def test_peft_round_trip(kind, tmp_path):
    peft = pytest.importorskip("peft")
    spec = MODELS[kind]
    model = trained(kind, LoRAConfig(r=2, alpha=4, targets=spec["targets"]))
    x = inputs(kind)
    export_peft(model, tmp_path / "peft")
    through_peft = peft.PeftModel.from_pretrained(spec["make"](), str(tmp_path / "peft")).eval()
    with torch.no_grad():
        torch.testing.assert_close(through_peft(x), model(x), rtol=1e-5, atol=1e-5)
    back = import_peft(spec["make"](), tmp_path / "peft")
    assert torch.equal(back(x), model(x))


def test_parameter_report(kind):
    spec = MODELS[kind]
    model = apply_lora(spec["make"](), LoRAConfig(r=2, targets=spec["targets"]))
    report = parameter_report(model)
    assert [row.name for row in report.rows] == sorted(lora_layers(model))
    assert all(row.lora_params == 2 * (row.d + row.k) for row in report.rows)
    assert (
        report.trainable_params == report.lora_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
    )
    assert "LoRA parameters" in report.to_text()

"""lora_lab <-> Hugging Face PEFT: the same LoRA math, and adapters that load in either library."""

import copy
import json
import math
import os
import sys

import peft  # in the test extras; lora_lab itself only needs it for require_peft
import pytest
import torch
import torch.nn as nn
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from safetensors.torch import load_file

from lora_lab import (
    GPT,
    GPTConfig,
    LoRAConfig,
    LoRAError,
    LoRALinear,
    apply_lora,
    export_peft,
    import_peft,
    lora_layers,
    save_adapter,
)
from lora_lab.storage.files import CorruptFileError, OutputExistsError
from lora_lab.storage.peft_format import require_peft

TINY = GPTConfig(vocab_size=13, block_size=16, n_layer=2, n_head=2, n_embd=32)


def tiny_gpt(seed=0) -> GPT:
    torch.manual_seed(seed)
    return GPT(TINY).eval()


def tokens(batch=3, seed=1) -> torch.Tensor:
    return torch.randint(0, TINY.vocab_size, (batch, TINY.block_size), generator=torch.Generator().manual_seed(seed))


def snapshot(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [(n, type(m).__name__) for n, m in model.named_modules()],
    )


def assert_same(model, snap):
    state, structure = snapshot(model)
    assert structure == snap[1] and state.keys() == snap[0].keys()
    assert all(torch.equal(state[k], snap[0][k]) for k in state)


@pytest.mark.parametrize("d, k, r, alpha, bias", [(16, 24, 4, 8.0, False), (40, 8, 8, 3.0, True), (5, 5, 1, 1.0, True)])
def test_layer_conformance_with_peft(d, k, r, alpha, bias):
    torch.manual_seed(0)
    base = nn.Linear(k, d, bias=bias)
    ours = LoRALinear(copy.deepcopy(base), r=r, alpha=alpha)
    theirs = PeftLoraLinear(
        copy.deepcopy(base), "default", config=LoraConfig(r=r, lora_alpha=alpha), r=r, lora_alpha=alpha
    )
    with torch.no_grad():
        ours.lora_B.normal_()
        theirs.lora_A["default"].weight.copy_(ours.lora_A)
        theirs.lora_B["default"].weight.copy_(ours.lora_B)
    assert theirs.scaling["default"] == ours.scale == alpha / r
    x = torch.randn(3, 7, k)
    # lora_lab scales the r-wide intermediate, PEFT the d-wide output: the same math, and the same bits
    # whenever the scale is a power of two (then multiplying before or after the matmul is exact)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-6, atol=1e-6)
    if math.log2(alpha / r).is_integer():
        assert torch.equal(ours(x), theirs(x))
    torch.testing.assert_close(ours.delta_weight(), theirs.get_delta_weight("default"))


def test_export_loads_in_peft_with_identical_logits(tmp_path):
    base = tiny_gpt()
    config = LoRAConfig(r=4, alpha=8, targets=("q_proj", "*.mlp.*"), trainable=("ln_f",))
    model = apply_lora(copy.deepcopy(base), config)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    x = tokens()
    export_peft(model, tmp_path / "peft")
    assert sorted(p.name for p in (tmp_path / "peft").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"], cfg["modules_to_save"]) == ("LORA", 4, 8.0, ["ln_f"])
    assert cfg["target_modules"] == sorted(lora_layers(model))
    keys = set(load_file(str(tmp_path / "peft" / "adapter_model.safetensors")))
    assert keys == {f"base_model.model.{n}.lora_{ab}.weight" for n in lora_layers(model) for ab in "AB"} | {
        "base_model.model.ln_f.weight"
    }

    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft").eval()
    assert torch.equal(peft_model(x)[0], model(x)[0])  # scale 8 / 4 = 2: bit-identical (see conformance test)
    # and back again
    again = import_peft(copy.deepcopy(base), tmp_path / "peft")
    assert torch.equal(again(x)[0], model(x)[0])


@pytest.mark.parametrize("modules_to_save", [None, ["ln_f"]])
def test_import_peft_trained_adapter(tmp_path, modules_to_save):
    base = tiny_gpt()
    torch.manual_seed(5)
    config = LoraConfig(
        r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"], modules_to_save=modules_to_save
    )
    peft_model = get_peft_model(copy.deepcopy(base), config)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    x = tokens()
    for _ in range(3):  # a few real training steps, so B is no longer zero
        _, loss = peft_model(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad()
    peft_model.eval()
    peft_model.save_pretrained(tmp_path / "trained")

    model = import_peft(copy.deepcopy(base), tmp_path / "trained")
    assert model.lora_config.r == 4 and model.lora_config.alpha == 16.0
    assert set(lora_layers(model)) == {
        f"blocks.{i}.{n}" for i in range(2) for n in ("attn.q_proj", "attn.v_proj", "mlp.up_proj")
    }
    assert model.lora_config.trainable == tuple(modules_to_save or ())
    assert torch.equal(model(x)[0], peft_model(x)[0])  # scale 16 / 4 = 4: bit-identical
    assert not torch.equal(model(x)[0], base(x)[0])


def test_import_refuses_unsupported_or_corrupt(tmp_path):
    base = tiny_gpt()
    get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "a")
    cfg_path = tmp_path / "a" / "adapter_config.json"
    original = cfg_path.read_text()
    model = tiny_gpt()
    before = snapshot(model)
    for edit, error, message in [
        # use_dora selects lora_lab's dora variant, which needs the magnitude vectors this file lacks
        ({"use_dora": True}, CorruptFileError, r"missing tensors \['blocks.0.attn.q_proj.lora_magnitude'"),
        ({"rank_pattern": {"q_proj": 4}}, LoRAError, r"PEFT options lora_lab does not implement: \{'rank_pattern'"),
        ({"use_qalora": True}, LoRAError, "'use_qalora': True"),
        ({"peft_type": "IA3"}, CorruptFileError, "not a PEFT LoRA config"),
        ({"r": 0}, CorruptFileError, "rank r must be a positive integer"),
        ({"r": 3}, LoRAError, r"has shape \(2, 32\), this model needs \(3, 32\)"),
        ({"use_rslora": True, "use_dora": True}, LoRAError, "no lora_lab variant is PEFT's LoRA with"),
        ({"use_dora": "false"}, CorruptFileError, r"\{'use_dora': 'false'\} should be true or false"),
        ({"init_lora_weights": "pissa"}, LoRAError, "init_lora_weights='pissa' are not plain LoRA"),
    ]:
        cfg_path.write_text(json.dumps({**json.loads(original), **edit}))
        with pytest.raises(error, match=message):
            import_peft(model, tmp_path / "a")
        assert_same(model, before)
    cfg_path.write_text(original)
    (tmp_path / "a" / "adapter_model.safetensors").rename(tmp_path / "a" / "adapter_model.bin")
    with pytest.raises(CorruptFileError, match="pickled adapter_model.bin"):
        import_peft(model, tmp_path / "a")
    assert_same(model, before)


def test_tied_embedding_cannot_cross_to_peft(tmp_path):
    model = apply_lora(tiny_gpt(), LoRAConfig(r=2, trainable=("tok_emb",)))
    with pytest.raises(LoRAError, match="tied embedding"):
        export_peft(model, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_missing_peft_gives_clear_error(monkeypatch):
    assert require_peft() is peft
    monkeypatch.setitem(sys.modules, "peft", None)  # what an uninstalled package looks like to import
    with pytest.raises(ImportError, match="optional package 'peft'.*pip install"):
        require_peft()


def test_export_replaces_only_a_peft_lora_folder(tmp_path):
    base = tiny_gpt()
    model = apply_lora(copy.deepcopy(base), LoRAConfig(r=2, targets=("q_proj",)))
    export_peft(model, tmp_path / "peft")
    with torch.no_grad():
        lora_layers(model)["blocks.0.attn.q_proj"].lora_B.add_(1.0)
    export_peft(model, tmp_path / "peft")  # our own earlier export: replaced
    again = import_peft(copy.deepcopy(base), tmp_path / "peft")
    assert torch.equal(again(tokens())[0], model(tokens())[0])
    assert sorted(os.listdir(tmp_path)) == ["peft"]

    save_adapter(model, tmp_path / "ours")  # same file names, but a lora_lab adapter, not a PEFT one
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "adapter_config.json").write_text('{"note": "my own"}')
    get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "hf")
    for target, message in [("ours", "peft_type: None"), ("user", "peft_type: None"), ("hf", "README.md")]:
        before = {p.name: p.read_bytes() for p in (tmp_path / target).iterdir()}
        with pytest.raises(OutputExistsError, match=message):
            export_peft(model, tmp_path / target)
        assert {p.name: p.read_bytes() for p in (tmp_path / target).iterdir()} == before


def test_export_refuses_non_finite_tensors(tmp_path):
    model = apply_lora(tiny_gpt(), LoRAConfig(r=2, targets=("q_proj",)))
    with torch.no_grad():
        lora_layers(model)["blocks.1.attn.q_proj"].lora_A[0, 0] = float("nan")
    with pytest.raises(LoRAError, match=r"base_model.model.blocks.1.attn.q_proj.lora_A.weight'\] contain NaN"):
        export_peft(model, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_a_pissa_export_of_a_rank_peft_could_not_give_back_is_refused(tmp_path):
    model = apply_lora(tiny_gpt(), LoRAConfig(r=20, targets=("q_proj",), variant="pissa"))  # PEFT rank 40 > 32
    with pytest.raises(LoRAError, match=r"exports to PEFT as LoRA of rank 40, more than min\(d, k\) = 32 .*at most 16"):
        export_peft(model, tmp_path / "x")
    assert not (tmp_path / "x").exists()

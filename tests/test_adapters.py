"""Adapters on disk (save_adapter / load_adapter) and hot-swapping on one base (AdapterBank)."""
import copy
import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_lab import (
    AdapterBank,
    AdapterMismatchError,
    GPTConfig,
    LoRAConfig,
    LoRAError,
    apply_lora,
    load_adapter,
    lora_layers,
    merge_lora,
    save_adapter,
)
from lora_lab.files import CorruptFileError

from tiny_models import TINY, assert_same, snapshot, tiny_gpt, tokens


def adapted(base, config, seed):
    """A copy of base with LoRA whose B (and any trainable weights) hold seeded random values, as if trained."""
    torch.manual_seed(seed)
    model = apply_lora(copy.deepcopy(base), config)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    return model


def file_hashes(path: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(path).iterdir())}


# --- save / load ---------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    base = tiny_gpt()
    model = adapted(base, LoRAConfig(r=4, alpha=8, targets=("q_proj", "*.mlp.*"), trainable=("ln_f",)), seed=3)
    x = tokens()
    expected = model(x)[0]
    save_adapter(model, tmp_path / "ad")

    fresh = copy.deepcopy(base)
    rng = torch.get_rng_state()
    assert load_adapter(fresh, tmp_path / "ad") is fresh
    assert torch.equal(torch.get_rng_state(), rng)  # loading consumes no random numbers
    assert torch.equal(fresh(x)[0], expected)
    assert fresh.lora_config == model.lora_config
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad}

    # onto an already adapted model with the same targets: the tensors are replaced
    other = adapted(base, model.lora_config, seed=4)
    assert not torch.equal(other(x)[0], expected)
    load_adapter(other, tmp_path / "ad")
    assert torch.equal(other(x)[0], expected)


def test_adapter_files_hold_only_lora_tensors(tmp_path):
    model = adapted(tiny_gpt(), LoRAConfig(r=4, alpha=8, targets=("q_proj", "v_proj")), seed=3)
    save_adapter(model, tmp_path / "ad")
    assert sorted(p.name for p in (tmp_path / "ad").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    tensors = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    layers = lora_layers(model)
    assert set(tensors) == {f"{n}.{ab}" for n in layers for ab in ("lora_A", "lora_B")}
    for n, layer in layers.items():
        assert torch.equal(tensors[f"{n}.lora_A"], layer.lora_A) and torch.equal(tensors[f"{n}.lora_B"], layer.lora_B)
    meta = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert meta["lora_config"] == {"r": 4, "alpha": 8.0, "targets": ["q_proj", "v_proj"], "dropout": 0.0,
                                   "init": "gaussian", "trainable": []}
    assert meta["scaling"] == "alpha/r" and meta["base_fingerprint"] == TINY.fingerprint()
    assert {m["name"]: (m["lora_A"], m["lora_B"]) for m in meta["modules"]} == {
        n: ([4, 32], [32, 4]) for n in layers}
    payload = sum(4 * (32 + 32) for _ in layers) * 4  # Σ r(d + k) fp32 numbers, 4 bytes each
    size = (tmp_path / "ad" / "adapter_model.safetensors").stat().st_size
    assert payload <= size <= payload + 120 * len(tensors) + 200  # plus a small JSON header


def test_save_replaces_existing_adapter(tmp_path):
    base = tiny_gpt()
    save_adapter(adapted(base, LoRAConfig(r=2), seed=3), tmp_path / "ad")
    second = adapted(base, LoRAConfig(r=2), seed=4)
    save_adapter(second, tmp_path / "ad")
    fresh = load_adapter(copy.deepcopy(base), tmp_path / "ad")
    assert torch.equal(fresh(tokens())[0], second(tokens())[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad"]  # no temporary folders left behind


def test_save_needs_lora(tmp_path):
    with pytest.raises(LoRAError, match="no LoRA layers"):
        save_adapter(tiny_gpt(), tmp_path / "ad")
    assert not (tmp_path / "ad").exists()


def corrupt(path: Path, how: str):
    weights, config = path / "adapter_model.safetensors", path / "adapter_config.json"
    tensors = load_file(str(weights))
    first = sorted(tensors)[0]
    if how == "truncated":
        weights.write_bytes(weights.read_bytes()[:-50])
    elif how == "bad json":
        config.write_text(config.read_text()[:-20])
    elif how == "missing key":
        save_file({k: v for k, v in tensors.items() if k != first}, str(weights))
    elif how == "nan":
        tensors[first][0, 0] = float("nan")
        save_file(tensors, str(weights))
    elif how == "int dtype":
        tensors[first] = tensors[first].to(torch.int32)
        save_file(tensors, str(weights))
    elif how == "wrong shape":
        tensors[first] = tensors[first][:, :-1].contiguous()
        save_file(tensors, str(weights))
    elif how == "other rank":
        meta = json.loads(config.read_text())
        meta["lora_config"]["r"] = 3
        config.write_text(json.dumps(meta))
    elif how == "no lora_config":
        meta = json.loads(config.read_text())
        del meta["lora_config"]
        config.write_text(json.dumps(meta))
    return first


@pytest.mark.parametrize(
    "how, error, message",
    [
        ("truncated", CorruptFileError, "is not a readable safetensors file"),
        ("bad json", CorruptFileError, "is not valid JSON"),
        ("missing key", CorruptFileError, r"missing tensors \['{first}'\]"),
        ("nan", CorruptFileError, "tensor {first} contains NaN or Inf"),
        ("int dtype", CorruptFileError, "tensor {first} has dtype torch.int32"),
        ("wrong shape", AdapterMismatchError, r"tensor {first} has shape \(2, 31\), this model needs \(2, 32\)"),
        ("other rank", AdapterMismatchError, r"has shape \(2, 32\), this model needs \(3, 32\)"),
        ("no lora_config", CorruptFileError, "is not a valid adapter config: KeyError\\('lora_config'\\)"),
    ],
)
@pytest.mark.parametrize("onto", ["plain", "adapted"])
def test_corrupt_or_mismatched_adapter_is_refused(tmp_path, how, error, message, onto):
    base = tiny_gpt()
    save_adapter(adapted(base, LoRAConfig(r=2, targets=("q_proj", "v_proj")), seed=3), tmp_path / "ad")
    first = corrupt(tmp_path / "ad", how)
    if onto == "plain":
        model = copy.deepcopy(base)
    else:
        model = adapted(base, LoRAConfig(r=3 if how == "other rank" else 2, targets=("q_proj", "v_proj")), seed=5)
    before, files = snapshot(model), file_hashes(tmp_path / "ad")
    with pytest.raises(error, match=message.format(first=first)):
        load_adapter(model, tmp_path / "ad")
    assert_same(model, before)
    assert file_hashes(tmp_path / "ad") == files


def test_adapter_for_another_base_is_refused(tmp_path):
    other_base = tiny_gpt(GPTConfig(vocab_size=13, block_size=16, n_layer=2, n_head=2, n_embd=48))
    save_adapter(adapted(other_base, LoRAConfig(r=2), seed=3), tmp_path / "ad")
    model = tiny_gpt()
    before, files = snapshot(model), file_hashes(tmp_path / "ad")
    with pytest.raises(AdapterMismatchError, match=r"made for another base model .*n_embd: adapter 48, model 32"):
        load_adapter(model, tmp_path / "ad")
    assert_same(model, before)
    assert file_hashes(tmp_path / "ad") == files


def test_load_onto_differently_adapted_or_merged_model_is_refused(tmp_path):
    base = tiny_gpt()
    save_adapter(adapted(base, LoRAConfig(r=2, targets=("q_proj",)), seed=3), tmp_path / "ad")
    for config, message in [
        (LoRAConfig(r=2, targets=("v_proj",)), r"adapts \['blocks.0.attn.q_proj'.*targets and rank must agree"),
        (LoRAConfig(r=4, targets=("q_proj",)), r"at r=2, but the model is adapted .* with r=4"),
        (LoRAConfig(r=2, targets=("q_proj",), trainable=("ln_f",)), "trains modules"),
    ]:
        model = adapted(base, config, seed=4)
        before = snapshot(model)
        with pytest.raises(AdapterMismatchError, match=message):
            load_adapter(model, tmp_path / "ad")
        assert_same(model, before)
    model = adapted(base, LoRAConfig(r=2, targets=("q_proj",)), seed=4)
    merge_lora(model)
    before = snapshot(model)
    with pytest.raises(LoRAError, match="merged; call unmerge_lora"):
        load_adapter(model, tmp_path / "ad")
    assert_same(model, before)


# --- AdapterBank ---------------------------------------------------------------------------------


def base_tensors(model):
    """data_ptr of every base weight, keyed by its name in the plain model."""
    return {n.replace(".base.", "."): p.data_ptr() for n, p in model.named_parameters()
            if not n.endswith(("lora_A", "lora_B"))}


def test_bank_swaps_adapters_without_touching_the_base(tmp_path):
    base = tiny_gpt()
    x = tokens()
    a = adapted(base, LoRAConfig(r=2, targets=("q_proj", "v_proj")), seed=3)
    b = adapted(base, LoRAConfig(r=6, alpha=3, targets=("*.mlp.*",), trainable=("ln_f",)), seed=4)
    save_adapter(b, tmp_path / "b")
    expected = {"a": a(x)[0], "b": b(x)[0], None: base(x)[0]}

    model = copy.deepcopy(base)
    bank = AdapterBank(model)
    ptrs, linears = base_tensors(model), [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    bank.add("a", a)
    bank.add("b", tmp_path / "b")
    assert bank.names == ["a", "b"] and bank.active is None
    for name in ["a", "b", "a", None, "b", "b", None]:
        bank.activate(name) if name else bank.disable()
        assert bank.active == name
        assert torch.equal(model(x)[0], expected[name]), name
        assert base_tensors(model) == ptrs  # the same base tensors, never reloaded
        assert all(any(m is l for m in model.modules()) for l in linears)

    bank.activate("b")
    with torch.no_grad():  # training the active adapter does not change what the bank holds
        lora_layers(model)["blocks.0.mlp.up_proj"].lora_B.add_(1.0)
        model.ln_f.weight.add_(1.0)
    bank.activate("a")
    bank.activate("b")
    assert torch.equal(model(x)[0], expected["b"])

    bank.delete("b")
    assert bank.names == ["a"] and bank.active is None
    assert torch.equal(model(x)[0], expected[None])  # ln_f is back to the base value too
    bank.delete("a")
    assert bank.names == [] and not lora_layers(model)


def test_bank_registers_an_adapted_model_as_default():
    base = tiny_gpt()
    model = adapted(base, LoRAConfig(r=2), seed=3)
    x = tokens()
    expected = model(x)[0]
    bank = AdapterBank(model)
    assert bank.names == ["default"] and bank.active == "default"
    bank.disable()
    assert torch.equal(model(x)[0], base(x)[0])
    bank.activate("default")
    assert torch.equal(model(x)[0], expected)


def test_bank_refusals(tmp_path):
    base = tiny_gpt()
    bank = AdapterBank(copy.deepcopy(base))
    bank.add("a", adapted(base, LoRAConfig(r=2), seed=3))
    bank.activate("a")
    before = snapshot(bank.model)
    with pytest.raises(LoRAError, match=r"No adapter named 'zzz'; the bank holds \['a'\]"):
        bank.activate("zzz")
    with pytest.raises(LoRAError, match="No adapter named 'zzz'"):
        bank.delete("zzz")
    with pytest.raises(LoRAError, match="'a' already exists"):
        bank.add("a", adapted(base, LoRAConfig(r=2), seed=4))
    with pytest.raises(LoRAError, match="no LoRA layers"):
        bank.add("plain", tiny_gpt())
    other = tiny_gpt(GPTConfig(vocab_size=13, block_size=16, n_layer=3, n_head=2, n_embd=32))
    with pytest.raises(AdapterMismatchError, match="another base model .*n_layer: adapter 3, model 2"):
        bank.add("other", adapted(other, LoRAConfig(r=2), seed=3))
    save_adapter(adapted(other, LoRAConfig(r=2), seed=3), tmp_path / "other")
    with pytest.raises(AdapterMismatchError, match="another base model"):
        bank.add("other", tmp_path / "other")
    assert bank.names == ["a"] and bank.active == "a"
    assert_same(bank.model, before)
    merge_lora(bank.model)
    with pytest.raises(LoRAError, match="merged; call unmerge_lora before switching"):
        bank.disable()
    with pytest.raises(LoRAError, match="pass the plain base model"):
        AdapterBank(adapted(base, LoRAConfig(r=2, trainable=("ln_f",)), seed=3))
    own = AdapterBank(copy.deepcopy(base))
    apply_lora(own.model, LoRAConfig(r=2, trainable=("ln_f",)))
    with pytest.raises(LoRAError, match=r"own model trained \['ln_f.weight'\] in full"):
        own.add("x", own.model)
    assert own.names == []

"""Adapters on disk (save_adapter / load_adapter) and hot-swapping on one base (AdapterBank)."""

import copy
import hashlib
import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import TINY, assert_same, snapshot, tiny_gpt, tokens

from lora_lab import (
    GPT,
    AdapterBank,
    AdapterMismatchError,
    GPTConfig,
    LoRAConfig,
    LoRAError,
    LoRALinear,
    apply_lora,
    load_adapter,
    lora_layers,
    merge_lora,
    register_variant,
    save_adapter,
)
from lora_lab.errors import UnknownVariantError
from lora_lab.storage.adapters import UnverifiedAdapterError, base_weights_digest, read_adapter_metadata
from lora_lab.storage.files import CorruptFileError, OutputExistsError
from lora_lab.variants import VARIANTS


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
        n for n, p in model.named_parameters() if p.requires_grad
    }

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
    assert meta["lora_config"] == {
        "r": 4,
        "alpha": 8.0,
        "targets": ["q_proj", "v_proj"],
        "dropout": 0.0,
        "init": "gaussian",
        "trainable": [],
        "variant": "lora",
        "options": {},
    }
    assert meta["variant"] == "lora"
    assert meta["scaling"] == "alpha/r" and meta["base_config"] == TINY.to_dict()
    assert meta["base_class"] == "lora_lab.model.GPT" and meta["variant_class"] == "lora_lab.lora:LoRALinear"
    plain = tiny_gpt()
    assert meta["base_weights"] == {
        n: {"shape": list(t.shape), "dtype": "float32"} for n, t in plain.state_dict().items()
    }
    assert meta["base_weights_sha256"] == base_weights_digest(plain)
    assert {m["name"]: (m["lora_A"], m["lora_B"]) for m in meta["modules"]} == {n: ([4, 32], [32, 4]) for n in layers}
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


def rewrite_tensors(path: Path, tensors: dict) -> None:
    """Replace the adapter's tensors and re-record their checksum: a consistent file with wrong content."""
    weights, config = path / "adapter_model.safetensors", path / "adapter_config.json"
    save_file(tensors, str(weights))
    meta = json.loads(config.read_text())
    meta["checksums"] = {weights.name: "sha256:" + hashlib.sha256(weights.read_bytes()).hexdigest()}
    config.write_text(json.dumps(meta))


def corrupt(path: Path, how: str):
    weights, config = path / "adapter_model.safetensors", path / "adapter_config.json"
    tensors = load_file(str(weights))
    first = sorted(tensors)[0]
    if how == "truncated":
        weights.write_bytes(weights.read_bytes()[:-50])
    elif how == "truncated, no checksum":  # as an adapter written before checksums existed
        weights.write_bytes(weights.read_bytes()[:-50])
        meta = json.loads(config.read_text())
        del meta["checksums"]
        config.write_text(json.dumps(meta))
    elif how == "flipped byte":
        data = bytearray(weights.read_bytes())
        data[-7] ^= 0x10  # inside the last tensor's numbers: still a valid safetensors file
        weights.write_bytes(bytes(data))
    elif how == "bad json":
        config.write_text(config.read_text()[:-20])
    elif how == "missing key":
        rewrite_tensors(path, {k: v for k, v in tensors.items() if k != first})
    elif how == "nan":
        tensors[first][0, 0] = float("nan")
        rewrite_tensors(path, tensors)
    elif how == "int dtype":
        tensors[first] = tensors[first].to(torch.int32)
        rewrite_tensors(path, tensors)
    elif how == "wrong shape":
        tensors[first] = tensors[first][:, :-1].contiguous()
        rewrite_tensors(path, tensors)
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
        # refused before it is read in full: the safetensors header promises more bytes than the file holds
        (
            "truncated",
            CorruptFileError,
            r"adapter_model.safetensors is not a readable .*header describes [\d,]+ bytes, the file holds",
        ),
        ("truncated, no checksum", CorruptFileError, "adapter_model.safetensors is not a readable safetensors file"),
        ("flipped byte", CorruptFileError, "adapter_model.safetensors does not match its checksum"),
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
    return {
        n.replace(".base.", "."): p.data_ptr()
        for n, p in model.named_parameters()
        if not n.endswith(("lora_A", "lora_B"))
    }


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


# --- which base: weights digest, checksums, refusals at save time ----------------------------------

FIXTURE_V01 = Path(__file__).parent / "fixtures" / "adapter_v0.1"  # made by tests/fixtures/make_adapter_v01.py


def test_an_adapter_trained_on_other_base_weights_is_refused_unless_allowed(tmp_path):
    base, other_base = tiny_gpt(seed=0), tiny_gpt(seed=1)  # same architecture, different weights
    trained = adapted(other_base, LoRAConfig(r=2, targets=("q_proj", "v_proj")), seed=3)
    save_adapter(trained, tmp_path / "ad")
    model = copy.deepcopy(base)
    before = snapshot(model)
    with pytest.raises(
        AdapterMismatchError,
        match=r"trained on other base weights: same architecture, but the "
        r"weights differ .*allow_other_base=True",
    ):
        load_adapter(model, tmp_path / "ad")
    assert_same(model, before)
    bank = AdapterBank(copy.deepcopy(base))
    with pytest.raises(AdapterMismatchError, match="other base weights"):
        bank.add("x", tmp_path / "ad")
    with pytest.raises(AdapterMismatchError, match="other base weights"):
        bank.add("x", trained)
    assert bank.names == []

    load_adapter(model, tmp_path / "ad", allow_other_base=True)  # the explicit opt-in
    assert lora_layers(model) and torch.equal(
        lora_layers(model)["blocks.0.attn.q_proj"].lora_B, lora_layers(trained)["blocks.0.attn.q_proj"].lora_B
    )
    bank.add("x", tmp_path / "ad", allow_other_base=True)
    bank.add("y", trained, allow_other_base=True)
    assert bank.names == ["x", "y"]


def test_base_weights_digest(tmp_path):
    base = tiny_gpt()
    digest = base_weights_digest(base)
    assert digest.startswith("sha256:") and base_weights_digest(copy.deepcopy(base)) == digest
    model = adapted(base, LoRAConfig(r=2, targets=("q_proj",)), seed=3)
    assert base_weights_digest(model) == digest  # A and B are not part of the base
    merge_lora(model)
    assert base_weights_digest(model) == digest  # a merged layer counts with its weight before the merge
    assert base_weights_digest(base.to(torch.bfloat16)) != digest  # rounded weights are other weights
    changed = copy.deepcopy(tiny_gpt())
    with torch.no_grad():
        changed.blocks[1].mlp.up_proj.weight[0, 0] += 1e-3
    assert base_weights_digest(changed) != digest
    save_adapter(adapted(tiny_gpt(), LoRAConfig(r=2), seed=3), tmp_path / "ad")
    assert json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["base_weights_sha256"] == digest


def test_trainable_modules_are_not_part_of_the_base_digest(tmp_path):
    base = tiny_gpt()
    model = adapted(base, LoRAConfig(r=2, targets=("q_proj",), trainable=("ln_f",)), seed=3)  # ln_f changed
    save_adapter(model, tmp_path / "ad")
    fresh = load_adapter(copy.deepcopy(base), tmp_path / "ad")
    assert torch.equal(fresh(tokens())[0], model(tokens())[0])


def test_a_lora_lab_0_1_adapter_still_loads():
    config = json.loads((FIXTURE_V01 / "adapter_config.json").read_text())
    assert "checksums" not in config and "base_weights_sha256" not in config  # the old layout
    base = tiny_gpt(replace(TINY, positions="learned"))  # 0.1's GPT had learned positions
    with pytest.raises(UnverifiedAdapterError, match="records no 'checksums' .* and no 'base_weights_sha256'"):
        load_adapter(copy.deepcopy(base), FIXTURE_V01)  # it looks like an adapter whose fields were deleted
    model = load_adapter(copy.deepcopy(base), FIXTURE_V01, allow_unverified=True)  # the explicit opt-in
    stored = load_file(str(FIXTURE_V01 / "adapter_model.safetensors"))
    for n, layer in lora_layers(model).items():
        assert torch.equal(layer.lora_A, stored[f"{n}.lora_A"]) and torch.equal(layer.lora_B, stored[f"{n}.lora_B"])
    assert model.lora_config == LoRAConfig(r=2, alpha=4, targets=("q_proj", "v_proj"))
    assert not torch.equal(model(tokens())[0], base(tokens())[0])


FIXTURE_V1 = Path(__file__).parent / "fixtures" / "adapter_v1"  # made by tests/fixtures/make_adapter_v1.py


def fixture_v1_base():
    """The base the adapter_v1 fixture belongs to, from its stored weights (so not from the RNG)."""
    record = json.loads((FIXTURE_V1 / "base.json").read_text())
    base = GPT(GPTConfig.from_dict(record["gpt_config"])).eval()
    missing, unexpected = base.load_state_dict(load_file(str(FIXTURE_V1 / "base.safetensors")), strict=False)
    assert missing == ["lm_head.weight"] and not unexpected  # tied to tok_emb.weight
    return base


@pytest.mark.parametrize("name", ["lora", "dora", "lora_ln_f"])
def test_an_adapter_saved_before_the_base_record_still_loads(name):
    config = json.loads((FIXTURE_V1 / name / "adapter_config.json").read_text())
    assert "base_fingerprint" in config and "base_weights" not in config  # the layout of commit b2e38de
    expected = load_file(str(FIXTURE_V1 / "expected.safetensors"))
    base = fixture_v1_base()
    idx = expected["tokens"]
    torch.testing.assert_close(base(idx)[0], expected["base_logits"], rtol=0, atol=1e-6)
    model = load_adapter(copy.deepcopy(base), FIXTURE_V1 / name)
    torch.testing.assert_close(model(idx)[0], expected[f"{name}_logits"], rtol=0, atol=1e-6)
    bank = AdapterBank(copy.deepcopy(base))
    bank.add(name, FIXTURE_V1 / name)
    bank.activate(name)
    torch.testing.assert_close(bank.model(idx)[0], expected[f"{name}_logits"], rtol=0, atol=1e-6)
    with torch.no_grad():  # still bound to those weights: the recorded digest is today's algorithm
        base.blocks[0].mlp.up_proj.weight[0, 0] += 1e-3
    with pytest.raises(AdapterMismatchError, match="trained on other base weights"):
        load_adapter(base, FIXTURE_V1 / name)


def test_a_diverged_adapter_is_not_saved(tmp_path):
    model = adapted(tiny_gpt(), LoRAConfig(r=2, targets=("q_proj", "v_proj")), seed=3)
    with torch.no_grad():
        lora_layers(model)["blocks.1.attn.v_proj"].lora_B[0, 0] = float("nan")
    with pytest.raises(
        LoRAError,
        match=r"tensors \['blocks.1.attn.v_proj.lora_B'\] contain NaN or Inf .*"
        "Nothing was written",
    ):
        save_adapter(model, tmp_path / "ad")
    assert list(tmp_path.iterdir()) == []


def test_save_adapter_refuses_a_folder_of_the_users_files(tmp_path):
    project = tmp_path / "myproject"
    (project / "src").mkdir(parents=True)
    (project / "src" / "thesis.tex").write_text("chapter 1")
    with pytest.raises(OutputExistsError, match="myproject: it is a folder holding src"):
        save_adapter(adapted(tiny_gpt(), LoRAConfig(r=2), seed=3), project)
    assert (project / "src" / "thesis.tex").read_text() == "chapter 1" and os.listdir(project) == ["src"]


def test_metadata_goes_into_the_adapter_config(tmp_path):
    model = adapted(tiny_gpt(), LoRAConfig(r=2), seed=3)
    save_adapter(model, tmp_path / "ad", metadata={"base_checkpoint": "/cache/base-1", "task": "shout"})
    assert read_adapter_metadata(tmp_path / "ad") == {"base_checkpoint": "/cache/base-1", "task": "shout"}
    (tmp_path / "ad" / "lora_lab_base.json").write_text("{}")  # the side file the 0.1 CLI wrote
    save_adapter(model, tmp_path / "ad")  # an adapter folder with it is still ours to replace
    assert sorted(os.listdir(tmp_path / "ad")) == ["adapter_config.json", "adapter_model.safetensors"]
    assert read_adapter_metadata(tmp_path / "ad") == {}
    with pytest.raises(TypeError, match="JSON-serialisable"):
        save_adapter(model, tmp_path / "ad2", metadata={"x": object()})
    assert not (tmp_path / "ad2").exists()


def test_a_huge_alpha_is_refused_at_load(tmp_path):
    base = tiny_gpt()
    save_adapter(adapted(base, LoRAConfig(r=2, targets=("q_proj", "v_proj")), seed=3), tmp_path / "ad")
    config_path = tmp_path / "ad" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["lora_config"]["alpha"] = 1e30
    config_path.write_text(json.dumps(config))
    for onto in ("plain", "adapted"):
        model = (
            copy.deepcopy(base)
            if onto == "plain"
            else adapted(base, LoRAConfig(r=2, targets=("q_proj", "v_proj")), seed=5)
        )
        before = snapshot(model)
        with pytest.raises(LoRAError, match=r"makes the model's outputs NaN or Inf \(alpha=1e\+30"):
            load_adapter(model, tmp_path / "ad")
        assert_same(model, before)
    bank = AdapterBank(copy.deepcopy(base))
    with pytest.raises(LoRAError, match="NaN or Inf"):
        bank.add("huge", tmp_path / "ad")
    assert bank.names == []


class ScaledTwiceLoRA(LoRALinear):
    """A user's variant (module-level, so its import path is recorded): LoRA at twice the scale.

    Trainable parameters per layer: r*(d+k)
    """

    variant = "scaled_twice_test"

    @property
    def scale(self) -> float:
        return 2 * self.alpha / self.r


def test_an_unregistered_variant_is_named_with_where_to_import_it(tmp_path):
    register_variant(ScaledTwiceLoRA)
    try:
        save_adapter(adapted(tiny_gpt(), LoRAConfig(r=2, variant="scaled_twice_test"), seed=3), tmp_path / "ad")
    finally:
        del VARIANTS["scaled_twice_test"]  # as in a fresh process that has not imported this module
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert config["variant_class"] == f"{__name__}:ScaledTwiceLoRA"
    model = tiny_gpt()
    with pytest.raises(
        UnknownVariantError, match=rf"variant 'scaled_twice_test', which is not registered .*import {__name__}"
    ):
        load_adapter(model, tmp_path / "ad")
    with pytest.raises(UnknownVariantError, match="not registered"):
        AdapterBank(model).add("x", tmp_path / "ad")
    assert not lora_layers(model)


def test_a_swap_builds_no_layers_and_draws_no_random_numbers():
    base = tiny_gpt()
    x = tokens()
    a = adapted(base, LoRAConfig(r=2, targets=("q_proj", "v_proj")), seed=3)
    b = adapted(base, LoRAConfig(r=2, targets=("q_proj", "v_proj"), variant="pissa"), seed=4)
    bank = AdapterBank(copy.deepcopy(base).eval())
    bank.add("a", a)
    bank.add("b", b)
    bank.activate("a")
    first = lora_layers(bank.model)
    rng = torch.get_rng_state()
    built = []
    original = LoRALinear.__init__
    LoRALinear.__init__ = lambda self, *args, **kw: built.append(1) or original(self, *args, **kw)
    try:
        for name in ["b", "a", "b", "a"]:
            bank.activate(name)
    finally:
        LoRALinear.__init__ = original
    assert built == [] and torch.equal(torch.get_rng_state(), rng)
    assert all(lora_layers(bank.model)[n] is layer for n, layer in first.items())  # the same layers again
    assert not any(layer.training for layer in first.values())  # the mode of the eval model they join
    assert torch.equal(bank.model(x)[0], a(x)[0])

    bank.model.double()  # the base changed dtype: the layers are built again, once, in float64
    bank.activate("b")
    torch.testing.assert_close(bank.model(x)[0], b.double()(x)[0], rtol=1e-6, atol=1e-6)
    assert lora_layers(bank.model)["blocks.0.attn.q_proj"].lora_A.dtype == torch.float64


def test_a_copy_of_the_base_in_another_dtype(tmp_path):
    base = tiny_gpt()
    save_adapter(adapted(base, LoRAConfig(r=2), seed=3), tmp_path / "fp32")
    with pytest.raises(
        AdapterMismatchError,
        match="base weights of another dtype: .* is float32 in the adapter's base and bfloat16 here",
    ):
        load_adapter(copy.deepcopy(base).to(torch.bfloat16), tmp_path / "fp32")
    load_adapter(copy.deepcopy(base).to(torch.bfloat16), tmp_path / "fp32", allow_other_base=True)
    # trained on a bf16 copy: the float32 original rounds to that copy, so it is the same base
    save_adapter(adapted(copy.deepcopy(base).to(torch.bfloat16), LoRAConfig(r=2), seed=3), tmp_path / "bf16")
    assert lora_layers(load_adapter(copy.deepcopy(base), tmp_path / "bf16"))
    other = tiny_gpt(seed=1)
    with pytest.raises(
        AdapterMismatchError, match=r"other base weights: .* differ \(also when rounded to the adapter's bfloat16\)"
    ):
        load_adapter(other, tmp_path / "bf16")


@pytest.mark.parametrize("deleted", ["checksums", "base_weights_sha256"])
def test_integrity_cannot_be_switched_off_by_deleting_a_field(deleted, tmp_path):
    base = tiny_gpt()
    save_adapter(adapted(base, LoRAConfig(r=2), seed=3), tmp_path / "ad")
    path = tmp_path / "ad" / "adapter_config.json"
    config = json.loads(path.read_text())
    del config[deleted]
    path.write_text(json.dumps(config))
    model = copy.deepcopy(base)
    before = snapshot(model)
    with pytest.raises(UnverifiedAdapterError, match=rf"is unverified: its adapter_config.json records no '{deleted}'"):
        load_adapter(model, tmp_path / "ad")
    assert_same(model, before)
    with pytest.raises(UnverifiedAdapterError, match="unverified"):
        AdapterBank(model).add("x", tmp_path / "ad")
    if deleted == "base_weights_sha256":  # allow_other_base skips the digest check anyway: nothing else is lost
        assert lora_layers(load_adapter(copy.deepcopy(base), tmp_path / "ad", allow_other_base=True))
    assert lora_layers(load_adapter(model, tmp_path / "ad", allow_unverified=True))


def test_an_adapter_loaded_into_an_eval_model_runs_in_eval_mode(tmp_path):
    # LoRA dropout must not run in eval mode: loading, banking and applying keep the model's mode.
    save_adapter(adapted(tiny_gpt(), LoRAConfig(r=2, dropout=0.3), seed=3), tmp_path / "ad")
    for fresh in (tiny_gpt().eval(), adapted(tiny_gpt(), LoRAConfig(r=2, dropout=0.3), seed=4).eval()):
        model = load_adapter(fresh, tmp_path / "ad")
        assert not model.training and not any(m.training for m in model.modules())
        with torch.no_grad():
            assert torch.equal(model(tokens())[0], model(tokens())[0])
    bank = AdapterBank(tiny_gpt().eval())
    bank.add("a", tmp_path / "ad")
    bank.activate("a")
    assert not any(m.training for m in bank.model.modules())

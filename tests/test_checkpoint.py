import json
import os

import pytest
import torch

from lora_lab import (
    GPT,
    CheckpointMismatchError,
    GPTConfig,
    LoRAConfig,
    LoRAError,
    apply_lora,
    load_checkpoint,
    merge_and_unload,
    save_checkpoint,
)
from lora_lab.storage.files import CorruptFileError, OutputExistsError


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_round_trip_gives_identical_logits(tiny_config, tmp_path):
    model = GPT(tiny_config).eval()
    save_checkpoint(model, tmp_path / "ckpt", metadata={"note": "hi"})
    loaded, meta = load_checkpoint(tmp_path / "ckpt", expected_config=tiny_config)
    idx = torch.randint(0, tiny_config.vocab_size, (2, 16))
    assert torch.equal(model(idx)[0], loaded.eval()(idx)[0])
    assert meta == {"note": "hi"}
    assert loaded.lm_head.weight is loaded.tok_emb.weight  # tying survives the round trip


def test_files_are_safetensors_and_json_only(tiny_config, tmp_path):
    save_checkpoint(GPT(tiny_config), tmp_path / "ckpt")
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["config.json", "model.safetensors"]
    assert not any(name.startswith(".") for name in os.listdir(tmp_path))  # no temp files left behind


def test_overwrite_replaces_the_whole_bundle(tiny_config, tmp_path):
    first, second = GPT(tiny_config), GPT(tiny_config)
    save_checkpoint(first, tmp_path / "ckpt")
    save_checkpoint(second, tmp_path / "ckpt")
    loaded, _ = load_checkpoint(tmp_path / "ckpt")
    assert torch.equal(loaded.tok_emb.weight, second.tok_emb.weight)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_a_failed_write_leaves_the_old_checkpoint(tiny_config, tmp_path, monkeypatch):
    save_checkpoint(GPT(tiny_config), tmp_path / "ckpt")
    before = _snapshot(tmp_path / "ckpt")
    import lora_lab.storage.files as files

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(files, "save_safetensors", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(GPT(tiny_config), tmp_path / "ckpt")
    assert _snapshot(tmp_path / "ckpt") == before
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_wrong_config_is_refused(tiny_config, tmp_path):
    save_checkpoint(GPT(tiny_config), tmp_path / "ckpt")
    other = GPTConfig(**{**tiny_config.to_dict(), "n_embd": 64})
    with pytest.raises(CheckpointMismatchError, match="n_embd: expected 64, checkpoint has 32"):
        load_checkpoint(tmp_path / "ckpt", expected_config=other)


def test_weights_that_do_not_fit_the_config_are_refused(tiny_config, tmp_path):
    save_checkpoint(GPT(tiny_config), tmp_path / "ckpt")
    bigger = GPT(GPTConfig(**{**tiny_config.to_dict(), "n_layer": 3}))
    save_checkpoint(bigger, tmp_path / "other")
    # Put a 3-layer model's weights behind a 2-layer config (with no checksum, as written before checksums).
    (tmp_path / "ckpt" / "model.safetensors").write_bytes((tmp_path / "other" / "model.safetensors").read_bytes())
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    del config["checksums"]
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointMismatchError, match="unexpected"):
        load_checkpoint(tmp_path / "ckpt", allow_unverified=True)  # unverified, so opted in: the shapes still count


def test_corrupt_files_are_named(tiny_config, tmp_path):
    save_checkpoint(GPT(tiny_config), tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CorruptFileError, match="model.safetensors"):
        load_checkpoint(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "config.json").write_text("{not json")
    with pytest.raises(CorruptFileError, match="config.json"):
        load_checkpoint(tmp_path / "ckpt")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_checkpoint(tmp_path / "nowhere")


def test_a_model_with_lora_layers_is_refused(tiny_config, tmp_path):
    model = apply_lora(GPT(tiny_config), LoRAConfig(r=2))
    with pytest.raises(LoRAError, match="still has LoRA layers .*Call merge_and_unload"):
        save_checkpoint(model, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()
    save_checkpoint(merge_and_unload(model), tmp_path / "ckpt")
    assert load_checkpoint(tmp_path / "ckpt", expected_config=tiny_config)[0]


def test_non_finite_weights_are_refused(tiny_config, tmp_path):
    model = GPT(tiny_config)
    with torch.no_grad():
        model.blocks[0].attn.q_proj.weight[1, 2] = float("inf")
    with pytest.raises(ValueError, match=r"weights \['blocks.0.attn.q_proj.weight'\] contain NaN or Inf"):
        save_checkpoint(model, tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


def test_a_flipped_byte_is_caught_by_the_checksum(tiny_config, tmp_path):
    save_checkpoint(GPT(tiny_config), tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match="model.safetensors does not match its checksum in config.json"):
        load_checkpoint(tmp_path / "ckpt")


def test_loads_in_eval_mode(tiny_config, tmp_path):
    config = GPTConfig(**{**tiny_config.to_dict(), "dropout": 0.2})
    save_checkpoint(GPT(config).train(), tmp_path / "ckpt")
    model, _ = load_checkpoint(tmp_path / "ckpt")
    assert not model.training and not any(m.training for m in model.modules())
    idx = torch.randint(0, config.vocab_size, (2, 8))
    assert torch.equal(model(idx)[0], model(idx)[0])  # dropout is off: the same input gives the same logits


def test_a_checkpoint_never_replaces_the_users_files_or_an_adapter(tiny_config, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "thesis.tex").write_text("chapter 1")
    with pytest.raises(OutputExistsError, match="thesis.tex"):
        save_checkpoint(GPT(tiny_config), tmp_path / "out")
    assert os.listdir(tmp_path / "out") == ["thesis.tex"]
    (tmp_path / "file").write_text("mine")
    with pytest.raises(OutputExistsError, match="it is a file"):
        save_checkpoint(GPT(tiny_config), tmp_path / "file")
    assert (tmp_path / "file").read_text() == "mine"


def test_a_config_claiming_a_huge_model_is_refused_before_any_allocation(tiny_config, tmp_path):
    save_checkpoint(GPT(tiny_config), tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    config["gpt_config"].update(n_embd=65536, n_layer=64, n_head=64)  # about 3.3e12 weights: would never fit
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointMismatchError, match="do not fit GPT"):
        load_checkpoint(tmp_path / "ckpt")

"""sample_text: one seeded sampler for the CLI, the widgets and the notebooks."""

from dataclasses import replace

import pytest
import torch

from lora_lab import GPT, CharTokenizer, LoRAConfig, apply_lora
from lora_lab.course import widgets
from lora_lab.sampling import sample_text

VOCAB = "\nabcdefghijklmnop"  # 17 characters: tiny_config's vocab_size


@pytest.fixture
def dropout_model(tiny_config):
    torch.manual_seed(0)
    return GPT(replace(tiny_config, dropout=0.5)), CharTokenizer(VOCAB)


def test_same_seed_same_text_with_dropout_in_train_mode(dropout_model):
    model, tok = dropout_model
    model.train()
    a = sample_text(model, tok, "ab", length=60, seed=7)
    b = sample_text(model, tok, "ab", length=60, seed=7)
    assert a == b and len(a) == 60
    assert model.training  # the caller's mode is back
    model.eval()
    assert sample_text(model, tok, "ab", length=60, seed=7) == a  # eval or train: the same sample
    assert not model.training
    assert sample_text(model, tok, "ab", length=60, seed=8) != a


def test_dropout_really_changes_a_train_mode_forward(dropout_model):
    # Guards the test above: with dropout on, the model is not deterministic, so sampling must switch it off.
    model, _ = dropout_model
    model.train()
    x = torch.zeros((1, 8), dtype=torch.long)
    torch.manual_seed(1)
    first = model(x)[0]
    assert not torch.equal(first, model(x)[0])


def test_submodule_modes_and_global_rng_are_restored(dropout_model):
    model, tok = dropout_model
    apply_lora(model, LoRAConfig(r=2, targets=("q_proj",), dropout=0.3))
    model.train()
    model.blocks[0].eval()  # a caller's mixed mode survives sampling
    before = {name: m.training for name, m in model.named_modules()}
    rng = torch.get_rng_state()
    sample_text(model, tok, "a", length=10)
    assert {name: m.training for name, m in model.named_modules()} == before
    assert torch.equal(torch.get_rng_state(), rng)


def test_mode_is_restored_even_when_generation_fails(dropout_model):
    model, tok = dropout_model
    model.train()
    with pytest.raises(ValueError, match="top_k"):
        sample_text(model, tok, "a", length=5, top_k=0)
    assert model.training


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"prompt": ""}, "prompt must be a non-empty string"),
        ({"prompt": None}, "prompt must be a non-empty string"),
        ({"length": -5}, "length must be an integer >= 0, got -5"),
        ({"length": 2.5}, "length must be an integer"),
        ({"temperature": 0}, "temperature must be a positive finite number"),
        ({"temperature": float("inf")}, "temperature must be a positive finite number"),
        ({"temperature": float("nan")}, "temperature must be a positive finite number"),
        ({"top_k": 0}, "top_k must be an integer >= 1"),
        ({"seed": "1"}, "seed must be an integer"),
        ({"seed": 2**70}, "seed must be an integer"),
        ({"prompt": "xyz"}, "Character 'q' is not|Character 'x' is not"),
    ],
)
def test_bad_arguments_are_named(dropout_model, kwargs, message):
    model, tok = dropout_model
    with pytest.raises(ValueError, match=message):
        sample_text(model, tok, **{"prompt": "a", **kwargs})


def test_zero_length_gives_empty_text(dropout_model):
    model, tok = dropout_model
    assert sample_text(model, tok, "ab", length=0) == ""


def test_widgets_reexport_the_library_sampler():
    assert widgets.sample_text is sample_text

"""Houlsby-style adapter layers: the latency baseline of chapter 6."""

import pytest
import torch
import torch.nn.functional as F
from tiny_models import TINY, assert_same, snapshot, tiny_gpt, tokens

from lora_lab.course.adapter_layers import BottleneckAdapter, adapter_layer_params, adapter_layers, add_adapter_layers


def test_starts_as_the_base_and_only_adapters_train():
    base = tiny_gpt()
    x = tokens()
    with torch.no_grad():
        before = base(x)[0].clone()
    model = add_adapter_layers(base, bottleneck=4)
    assert len(adapter_layers(model)) == 2 * TINY.n_layer
    with torch.no_grad():
        assert torch.equal(model(x)[0], before)  # up = 0: each adapter is the identity at first
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapter." in n for n in trainable)
    assert sum(model.get_parameter(n).numel() for n in trainable) == adapter_layer_params(TINY.n_layer, TINY.n_embd, 4)


def test_adapters_learn_and_change_the_output():
    model = add_adapter_layers(tiny_gpt(), bottleneck=4)
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    x = tokens()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(20):
        logits = model(x)[0]
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, TINY.vocab_size), x[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_one_adapter_is_a_residual_bottleneck():
    adapter = BottleneckAdapter(6, 2)
    torch.nn.init.normal_(adapter.up.weight)
    h = torch.randn(3, 6)
    expected = h + adapter.up(F.gelu(adapter.down(h)))
    assert torch.equal(adapter(h), expected)
    assert not torch.allclose(adapter(h), h)


@pytest.mark.parametrize("bottleneck", [0, -3, 2.5, True, "8"])
def test_bad_bottleneck_leaves_the_model_alone(bottleneck):
    model = tiny_gpt()
    snap = snapshot(model)
    with pytest.raises(ValueError, match="bottleneck must be a positive integer"):
        add_adapter_layers(model, bottleneck)
    assert_same(model, snap)


def test_refuses_to_stack_a_second_set():
    model = add_adapter_layers(tiny_gpt(), bottleneck=2)
    snap = snapshot(model)
    with pytest.raises(ValueError, match="already has adapter layers"):
        add_adapter_layers(model, bottleneck=2)
    assert_same(model, snap)


def test_refuses_a_model_that_is_not_a_gpt():
    with pytest.raises(ValueError, match="lora_lab GPT"):
        add_adapter_layers(torch.nn.Linear(3, 3), 2)

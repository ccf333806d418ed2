"""lora_lab.experiments.costs counts a training step's matrix FLOPs and operators exactly, and leaves the model
as it was."""

import copy

import torch

from lora_lab import GPT, LoRAConfig, apply_lora, set_fast_path
from lora_lab.experiments.costs import OperatorCount, step_cost


def batch(config, rows):
    x = torch.randint(0, config.vocab_size, (rows, config.block_size), generator=torch.Generator().manual_seed(0))
    return x, x


def frozen_but_embedding(model):
    model.requires_grad_(False)
    model.tok_emb.weight.requires_grad_(True)  # so gradients still flow back through every layer
    return model


def test_a_frozen_linear_skips_exactly_its_weight_gradient_matmul(tiny_config):
    model = GPT(tiny_config)
    x, y = batch(tiny_config, 3)
    full = step_cost(model, x, y, bf16=False)
    floor = step_cost(frozen_but_embedding(copy.deepcopy(model)), x, y, bf16=False)
    # every block's q, k, v, o (C x C each) and up, down (4C x C each): the weight gradient of a d x k layer
    # on N rows is one (d x N) @ (N x k) matmul, 2 N d k FLOPs
    C, N = tiny_config.n_embd, x.numel()
    weight_gradient_flops = tiny_config.n_layer * 2 * N * (4 * C * C + 2 * 4 * C * C)
    assert full.flops - floor.flops == weight_gradient_flops


def test_counts_do_not_depend_on_the_batch_but_flops_do(tiny_config):
    model = GPT(tiny_config)
    small, large = step_cost(model, *batch(tiny_config, 2)), step_cost(model, *batch(tiny_config, 4))
    assert small.operators == large.operators
    assert large.flops == 2 * small.flops


def test_the_q_k_v_fast_path_runs_fewer_operators_for_a_few_more_flops(tiny_config):
    model = apply_lora(GPT(tiny_config), LoRAConfig(r=4))
    x, y = batch(tiny_config, 2)
    fused = step_cost(model, x, y)
    set_fast_path(model, False)
    reference = step_cost(model, x, y)
    assert fused.operators < reference.operators
    # the block-diagonal B multiplies zeros too: (3r)(3C) instead of 3 r C per row, forward and backward
    C, r, N = tiny_config.n_embd, 4, x.numel()
    assert fused.flops - reference.flops == tiny_config.n_layer * 3 * 2 * N * (9 * r * C - 3 * r * C)


def test_the_model_gradients_and_random_stream_are_left_as_they_were(tiny_config):
    model = GPT(tiny_config)
    x, y = batch(tiny_config, 2)
    marker = torch.full_like(model.ln_f.weight, 7.0)
    model.ln_f.weight.grad = marker
    torch.manual_seed(5)
    step_cost(model, x, y)
    after = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(after, torch.rand(3))
    assert model.ln_f.weight.grad is marker
    assert all(p.grad is None for n, p in model.named_parameters() if n != "ln_f.weight")


def test_views_and_bare_allocations_are_not_counted():
    a = torch.randn(4, 4)
    with OperatorCount() as ops:
        a.view(16), a.t(), a[1:], a.unflatten(0, (2, 2))
        torch.empty(3)
    assert ops.count == 0
    with OperatorCount() as ops:
        a + a
        a.mm(a)
    assert ops.count == 2


def test_optimizer_step_cost_counts_adamw_elementwise_work_on_a_copy():
    import torch

    from lora_lab import GPT, GPTConfig, LoRAConfig, apply_lora
    from lora_lab.experiments.costs import optimizer_step_cost

    config = GPTConfig(vocab_size=13, block_size=16, n_layer=2, n_head=2, n_embd=32)
    x = torch.randint(0, 13, (4, 16), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    full = GPT(config)
    lora = apply_lora(GPT(config), LoRAConfig(r=4))
    before = {k: v.clone() for k, v in full.state_dict().items()}
    costs = {}
    for name, model in (("full", full), ("lora", lora)):
        costs[name] = optimizer_step_cost(model, x, x, lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=False))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert costs[name].trainable == trainable
        # AdamW writes each trainable number's two moments, the decayed weight, the update and a few temporaries
        assert 6 * trainable <= costs[name].elements <= 12 * trainable
    assert costs["lora"].elements < costs["full"].elements / 5
    assert all(torch.equal(before[k], v) for k, v in full.state_dict().items()) and full.tok_emb.weight.grad is None

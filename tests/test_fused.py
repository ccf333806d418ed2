"""The fast path for q/k/v (fused.grouped_linear through LoRALinear.forward_together) equals the reference
LoRALinear.forward, value and gradient, and steps aside wherever it could not."""

from dataclasses import replace

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from lora_lab import GPT, LoRAConfig, apply_lora, lora_layers, merge_lora, set_fast_path, set_lora_enabled
from lora_lab.lora import LoRAError, LoRALinear


def adapted(config, **lora):
    model = apply_lora(GPT(config), LoRAConfig(**{"r": 4, "targets": ("q_proj", "k_proj", "v_proj", "o_proj"), **lora}))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in lora_layers(model).values():  # B = 0 at the start would hide any mistake in the B path
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.1)
            if layer.base.bias is not None:
                layer.base.bias.copy_(torch.randn(layer.base.bias.shape, generator=gen))
    return model


def reference(attn, x):
    return torch.stack([LoRALinear.forward(m, x) for m in (attn.q_proj, attn.k_proj, attn.v_proj)], dim=2)


def leaves(attn):
    return [t for m in (attn.q_proj, attn.k_proj, attn.v_proj) for t in (m.lora_A, m.lora_B)]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("variant", ["lora", "rslora", "lora_fa"])
def test_q_k_v_together_equal_each_layer_alone(tiny_config, bias, variant):
    attn = adapted(replace(tiny_config, bias=bias), variant=variant).blocks[0].attn
    x = torch.randn(3, 7, tiny_config.n_embd, requires_grad=True)
    fused = attn.project_qkv(x)
    assert type(attn.q_proj).forward_together((attn.q_proj, attn.k_proj, attn.v_proj), x) is not None
    separate = reference(attn, x)
    torch.testing.assert_close(fused, separate, atol=1e-6, rtol=1e-5)
    wanted = [x] + [t for t in leaves(attn) if t.requires_grad]
    g = torch.randn_like(fused)
    for a, b in zip(torch.autograd.grad(fused, wanted, g), torch.autograd.grad(separate, wanted, g)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))],
)
def test_bf16_autocast_matches_the_reference_at_bf16_precision(tiny_config, device):
    attn = adapted(tiny_config).blocks[0].attn.to(device)
    x = torch.randn(3, 7, tiny_config.n_embd, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        fused, separate = attn.project_qkv(x), reference(attn, x)
    assert fused.dtype == separate.dtype == torch.bfloat16
    truth = reference(attn, x)  # fp32
    # both within bf16's rounding of the fp32 result, and no further from it than the reference is
    err_fused, err_ref = (fused.float() - truth).abs().max(), (separate.float() - truth).abs().max()
    assert err_fused <= 2 * err_ref + 1e-3, (err_fused, err_ref)


def test_training_with_and_without_the_fast_path_is_the_same(tiny_config):
    losses = {}
    for fuse in (True, False):
        torch.manual_seed(0)
        model = adapted(tiny_config)
        set_fast_path(model, fuse)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        gen = torch.Generator().manual_seed(2)
        curve = []
        for _ in range(5):
            idx = torch.randint(0, tiny_config.vocab_size, (4, tiny_config.block_size), generator=gen)
            _, loss = model(idx, idx)
            loss.backward()
            opt.step()
            opt.zero_grad()
            curve.append(loss.item())
        losses[fuse] = curve
    torch.testing.assert_close(losses[True], losses[False], atol=1e-5, rtol=1e-5)


def test_merged_or_disabled_layers_are_computed_as_their_bases_together(tiny_config):
    model = adapted(tiny_config)
    attn = model.blocks[0].attn
    x = torch.randn(2, 5, tiny_config.n_embd)
    layers = (attn.q_proj, attn.k_proj, attn.v_proj)
    for switch in ("disabled", "merged"):
        set_lora_enabled(model, True)
        set_lora_enabled(model, False) if switch == "disabled" else merge_lora(model)
        together = LoRALinear.forward_together(layers, x)
        assert together is not None
        torch.testing.assert_close(together.unflatten(-1, (3, -1)), reference(attn, x), atol=1e-6, rtol=1e-5)
        if switch == "merged":
            from lora_lab import unmerge_lora

            unmerge_lora(model)


def test_layers_that_cannot_join_run_themselves(tiny_config):
    x = torch.randn(2, 5, tiny_config.n_embd)
    dora = adapted(tiny_config, variant="dora").blocks[0].attn  # its own forward: the reference runs
    assert type(dora.q_proj).forward_together((dora.q_proj, dora.k_proj, dora.v_proj), x) is None

    dropped = adapted(tiny_config, dropout=0.5).blocks[0].attn  # one dropout mask per layer while training
    layers = (dropped.q_proj, dropped.k_proj, dropped.v_proj)
    assert LoRALinear.forward_together(layers, x) is None
    dropped.eval()
    assert LoRALinear.forward_together(layers, x) is not None  # dropout is the identity in eval

    attn = adapted(tiny_config).blocks[0].attn
    layers = (attn.q_proj, attn.k_proj, attn.v_proj)
    attn.k_proj.fuse_with_siblings = False
    assert LoRALinear.forward_together(layers, x) is None
    attn.k_proj.fuse_with_siblings = True
    attn.k_proj.alpha = 2 * attn.k_proj.alpha  # a different scale
    assert LoRALinear.forward_together(layers, x) is None


def test_a_forward_hook_on_one_projection_still_fires(tiny_config):
    attn = adapted(tiny_config).blocks[0].attn
    seen = []
    attn.k_proj.register_forward_hook(lambda module, inputs, output: seen.append(output.shape))
    x = torch.randn(2, 5, tiny_config.n_embd)
    out = attn.project_qkv(x)
    assert seen == [torch.Size([2, 5, tiny_config.n_embd])]
    torch.testing.assert_close(out, reference(attn, x))


def test_a_plain_model_hook_fires_too(tiny_config):
    attn = GPT(tiny_config).blocks[0].attn
    seen = []
    attn.q_proj.register_forward_pre_hook(lambda module, inputs: seen.append(1))
    attn.project_qkv(torch.randn(2, 5, tiny_config.n_embd))
    assert seen == [1]


def operator_count(model, idx) -> int:
    """aten operators run by one training forward + backward (on a GPU, roughly one kernel each)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        _, loss = model(idx, idx)
        loss.backward()
    return sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))


def test_the_fast_path_runs_fewer_operators(tiny_config):
    model = adapted(tiny_config)
    idx = torch.randint(0, tiny_config.vocab_size, (2, tiny_config.block_size))
    fused = operator_count(model, idx)
    set_fast_path(model, False)
    separate = operator_count(model, idx)
    assert fused < 0.9 * separate, (fused, separate)


def test_set_fast_path_switches_every_layer_and_needs_lora(tiny_config):
    model = adapted(tiny_config)
    set_fast_path(model, False)
    assert not any(layer.fuse_with_siblings for layer in lora_layers(model).values())
    set_fast_path(model, True)
    assert all(layer.fuse_with_siblings for layer in lora_layers(model).values())
    with pytest.raises(LoRAError, match="no LoRA layers"):
        set_fast_path(GPT(tiny_config), False)


def test_the_rules_live_with_the_fast_path(tiny_config):
    from lora_lab.fused import can_join

    for variant, joins in (("lora", True), ("rslora", True), ("lora_fa", True), ("dora", False), ("pissa", False)):
        layer = adapted(tiny_config, variant=variant).blocks[0].attn.q_proj
        assert can_join(layer, LoRALinear.forward) is joins, variant  # a variant's own forward never joins
        layer.fuse_with_siblings = False  # opted out (set_fast_path(model, False) does this for every layer)
        assert not can_join(layer, LoRALinear.forward)

from dataclasses import replace

import pytest
import torch

from lora_lab import GPT, GPTConfig
from lora_lab.model import apply_rotary, count_parameters_formula, rotary_tables

POSITIONS = ["rope", "learned"]


@pytest.mark.parametrize("positions", POSITIONS)
def test_logits_and_loss_shapes(tiny_config, positions):
    model = GPT(replace(tiny_config, positions=positions))
    idx = torch.randint(0, tiny_config.vocab_size, (3, 10))
    logits, loss = model(idx)
    assert logits.shape == (3, 10, tiny_config.vocab_size) and loss is None
    _, loss = model(idx, idx)
    assert loss.shape == () and torch.isfinite(loss)


def test_initial_loss_is_near_uniform(tiny_config):
    model = GPT(tiny_config)
    idx = torch.randint(0, tiny_config.vocab_size, (8, 16))
    targets = torch.randint(0, tiny_config.vocab_size, (8, 16))
    _, loss = model(idx, targets)
    assert abs(loss.item() - torch.log(torch.tensor(17.0)).item()) < 0.3


@pytest.mark.parametrize("positions", POSITIONS)
def test_changing_a_future_token_never_changes_earlier_logits(tiny_config, positions):
    model = GPT(replace(tiny_config, positions=positions)).eval()
    idx = torch.randint(0, tiny_config.vocab_size, (2, 16))
    for t in (3, 9, 15):
        changed = idx.clone()
        changed[:, t] = (changed[:, t] + 1) % tiny_config.vocab_size
        a, _ = model(idx)
        b, _ = model(changed)
        assert torch.equal(a[:, :t], b[:, :t])
        assert not torch.allclose(a[:, t:], b[:, t:])


@pytest.mark.parametrize(
    "config",
    [
        GPTConfig(vocab_size=17, block_size=16, n_layer=2, n_head=2, n_embd=32),
        GPTConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128),
        GPTConfig(vocab_size=65, block_size=256, n_layer=6, n_head=6, n_embd=384),
        GPTConfig(vocab_size=11, block_size=8, n_layer=3, n_head=4, n_embd=16, bias=True),
        GPTConfig(vocab_size=17, block_size=16, n_layer=2, n_head=2, n_embd=32, positions="learned"),
        GPTConfig(vocab_size=11, block_size=8, n_layer=3, n_head=4, n_embd=16, bias=True, positions="learned"),
    ],
)
def test_parameter_count_matches_the_formula(config):
    model = GPT(config)
    assert model.num_parameters() == count_parameters_formula(config)
    assert model.num_parameters() == sum(p.numel() for p in model.parameters())


def test_the_10_65m_config_has_10_65m_parameters():
    config = GPTConfig(vocab_size=65, block_size=256, n_layer=6, n_head=6, n_embd=384)
    assert round(GPT(config).num_parameters() / 1e6, 2) == 10.65  # rotary positions add no parameters
    learned = GPT(replace(config, positions="learned")).num_parameters()
    assert learned - GPT(config).num_parameters() == 256 * 384  # nanoGPT's table: one vector per position


def test_rotary_attention_scores_depend_only_on_the_offset():
    cos, sin = rotary_tables(head_size=8, block_size=32)
    q, k = torch.randn(2, 8, generator=torch.Generator().manual_seed(0))
    q_at = apply_rotary(q.expand(1, 1, 32, 8), cos, sin)[0, 0]  # the same q placed at positions 0..31
    k_at = apply_rotary(k.expand(1, 1, 32, 8), cos, sin)[0, 0]
    for offset in (0, 1, 5):
        scores = torch.stack([q_at[t + offset] @ k_at[t] for t in range(32 - offset)])
        assert torch.allclose(scores, scores[0].expand_as(scores), atol=1e-5)
    assert not torch.allclose(q_at[3] @ k_at[0], q_at[1] @ k_at[0], atol=1e-3)  # different offsets differ
    assert torch.allclose(q_at.norm(dim=-1), q.norm().expand(32), atol=1e-5)  # a rotation keeps lengths
    assert torch.equal(q_at[0], q)  # position 0 is not turned


def test_rotary_model_has_no_position_parameters_and_saves_no_tables(tiny_config):
    model = GPT(tiny_config)
    assert model.pos_emb is None
    assert not any("rope" in name for name in model.state_dict())  # rebuilt from the config, not stored
    learned = GPT(replace(tiny_config, positions="learned"))
    assert "pos_emb.weight" in learned.state_dict()
    assert not any("rope" in name for name, _ in learned.named_buffers())


@pytest.mark.parametrize("positions", POSITIONS)
def test_bf16_autocast_forward_and_backward_run(tiny_config, positions):
    # the path CUDA training takes: q and k come out of the Linear layers in bf16, the tables must follow
    model = GPT(replace(tiny_config, positions=positions))
    idx = torch.randint(0, tiny_config.vocab_size, (2, 16))
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        logits, loss = model(idx, idx)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(loss)
    loss.backward()
    assert model.blocks[0].attn.q_proj.weight.grad is not None


def test_head_is_tied_to_the_embedding(tiny_config):
    model = GPT(tiny_config)
    assert model.lm_head.weight is model.tok_emb.weight


def test_attention_has_separate_q_k_v_o(tiny_config):
    names = {n for n, m in GPT(tiny_config).named_modules() if isinstance(m, torch.nn.Linear)}
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert f"blocks.0.attn.{proj}" in names
    assert "blocks.1.mlp.up_proj" in names and "blocks.1.mlp.down_proj" in names


def test_a_tiny_model_overfits_one_batch(tiny_config):
    torch.manual_seed(0)
    model = GPT(tiny_config)
    x = torch.randint(0, tiny_config.vocab_size, (4, 16))
    y = torch.roll(x, -1, dims=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1


def test_generate_extends_and_is_seeded(tiny_config):
    model = GPT(tiny_config).eval()
    idx = torch.zeros((2, 1), dtype=torch.long)
    a = model.generate(idx, 30, temperature=0.8, top_k=5, generator=torch.Generator().manual_seed(1))
    b = model.generate(idx, 30, temperature=0.8, top_k=5, generator=torch.Generator().manual_seed(1))
    assert a.shape == (2, 31) and torch.equal(a, b)
    assert int(a.max()) < tiny_config.vocab_size


def test_top_k_one_is_greedy(tiny_config):
    model = GPT(tiny_config).eval()
    idx = torch.zeros((1, 1), dtype=torch.long)
    out = model.generate(idx, 5, top_k=1)
    logits, _ = model(out[:, :-1])
    assert torch.equal(out[0, 1:], logits[0].argmax(-1))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n_layer": -1}, "n_layer must be a positive integer"),
        ({"n_embd": 0}, "n_embd must be a positive integer"),
        ({"vocab_size": 2.5}, "vocab_size must be a positive integer"),
        ({"n_embd": 30, "n_head": 4}, "n_embd=30 must be divisible by n_head=4"),
        ({"dropout": 1.5}, "dropout"),
        ({"positions": "alibi"}, "positions must be one of"),
        ({"n_embd": 6, "n_head": 2}, "even head size; n_embd/n_head = 3"),
    ],
)
def test_bad_configs_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig(**kwargs)


def test_too_long_input_and_bad_sampling_args(tiny_config):
    model = GPT(tiny_config)
    with pytest.raises(ValueError, match="exceeds block_size 16"):
        model(torch.zeros((1, 17), dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        model.generate(torch.zeros((1, 1), dtype=torch.long), 2, temperature=0)
    with pytest.raises(ValueError, match="top_k"):
        model.generate(torch.zeros((1, 1), dtype=torch.long), 2, top_k=0)


def test_config_round_trip_and_fingerprint(tiny_config):
    assert GPTConfig.from_dict(tiny_config.to_dict()) == tiny_config
    assert tiny_config.fingerprint() == GPTConfig.from_dict(tiny_config.to_dict()).fingerprint()
    assert tiny_config.fingerprint() != GPTConfig(**{**tiny_config.to_dict(), "n_layer": 3}).fingerprint()
    assert tiny_config.fingerprint() != replace(tiny_config, positions="learned").fingerprint()
    with pytest.raises(ValueError, match="Unknown GPTConfig field"):
        GPTConfig.from_dict({**tiny_config.to_dict(), "n_layers": 3})


def test_a_config_saved_before_positions_existed_loads_as_the_learned_table(tiny_config):
    old = {k: v for k, v in tiny_config.to_dict().items() if k != "positions"}
    assert GPTConfig.from_dict(old).positions == "learned"
    assert GPTConfig.from_dict(tiny_config.to_dict()).positions == "rope"
    # the fingerprint lora_lab 0.1 (learned positions only) wrote for this config into checkpoints and adapters
    assert GPTConfig.from_dict(old).fingerprint() == "9350e3999f4ac0e2"


def test_generate_refuses_an_empty_prompt_and_bad_lengths(tiny_config):
    model = GPT(tiny_config)
    with pytest.raises(ValueError, match="the prompt is empty"):
        model.generate(torch.zeros((1, 0), dtype=torch.long), 3)
    for bad in (-5, 2.0, True, None):
        with pytest.raises(ValueError, match=f"max_new_tokens must be a non-negative integer, got {bad!r}"):
            model.generate(torch.zeros((1, 1), dtype=torch.long), bad)
    idx = torch.tensor([[1, 2, 3]])
    assert torch.equal(model.generate(idx, 0), idx)  # 0 new tokens is allowed: the prompt comes back


@pytest.mark.parametrize("bad_ids, shown", [([[3, -1, 2]], "-1"), ([[17, 4, 99]], "17, 99")])
def test_ids_outside_the_vocabulary_are_named(tiny_config, bad_ids, shown):
    model = GPT(tiny_config)
    idx = torch.tensor(bad_ids)
    with pytest.raises(ValueError, match=rf"token id\(s\) {shown} outside the vocabulary \[0, 17\)"):
        model(idx)
    with pytest.raises(ValueError, match=rf"{shown} outside the vocabulary \[0, 17\) \(vocab_size=17\)"):
        model.generate(idx, 2)
    with pytest.raises(ValueError, match="integer token ids"):
        model(torch.zeros((1, 2)))
    with pytest.raises(ValueError, match=r"\(batch, time\) tensor"):
        model(torch.zeros(3, dtype=torch.long))


def test_generate_runs_in_eval_mode_and_restores_the_callers(tiny_config):
    model = GPT(replace(tiny_config, dropout=0.5)).train()
    idx = torch.zeros((1, 1), dtype=torch.long)
    a = model.generate(idx, 20, generator=torch.Generator().manual_seed(3))
    b = model.generate(idx, 20, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and model.training
    model.eval()
    assert torch.equal(model.generate(idx, 20, generator=torch.Generator().manual_seed(3)), a)
    assert not model.training


# ----------------------------------------------------------------------------------------------
# The fast attention path (issue 11): each shortcut equals the readable computation it replaces


def test_rotating_q_and_k_together_equals_apply_rotary():
    from lora_lab.model import apply_rotary, rotary_pair_tables, rotary_tables, rotate_pairs

    B, T, H, D = 2, 10, 3, 8
    cos, sin = rotary_tables(D, 16)
    qk = torch.randn(B, T, 2, H * D)
    fast = rotate_pairs(qk.unflatten(-1, (H, 2, -1)), *rotary_pair_tables(cos, sin)).flatten(-3)  # (B, T, 2, C)
    for i in range(2):
        heads = qk[:, :, i].view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        reference = apply_rotary(heads, cos, sin).transpose(1, 2).reshape(B, T, H * D)
        torch.testing.assert_close(fast[:, :, i], reference, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("bias", [False, True])
def test_one_matmul_for_q_k_v_equals_three(tiny_config, bias):
    from dataclasses import replace

    attn = GPT(replace(tiny_config, bias=bias)).blocks[0].attn
    if bias:
        for layer in (attn.q_proj, attn.k_proj, attn.v_proj):
            torch.nn.init.normal_(layer.bias)
    x = torch.randn(2, 5, tiny_config.n_embd, requires_grad=True)
    fused = attn.project_qkv(x)
    separate = torch.stack((attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)), dim=2)
    torch.testing.assert_close(fused, separate, atol=1e-6, rtol=1e-6)
    g = torch.randn_like(fused)
    grads_fused = torch.autograd.grad(fused, [x, attn.q_proj.weight, attn.v_proj.weight], g)
    grads_separate = torch.autograd.grad(separate, [x, attn.q_proj.weight, attn.v_proj.weight], g)
    for a, b in zip(grads_fused, grads_separate):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_a_wrapped_projection_runs_itself(tiny_config):
    attn = GPT(tiny_config).blocks[0].attn

    class Doubled(torch.nn.Module):  # stands in for a LoRA wrapper: anything that is not a plain nn.Linear
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return 2 * self.inner(x)

    x = torch.randn(2, 5, tiny_config.n_embd)
    before = attn.project_qkv(x)
    attn.k_proj = Doubled(attn.k_proj)
    after = attn.project_qkv(x)
    torch.testing.assert_close(after[:, :, 1], 2 * before[:, :, 1])
    torch.testing.assert_close(after[:, :, ::2], before[:, :, ::2])


def test_cpu_bf16_attention_runs_in_fp32():
    from lora_lab.model import attention

    q, k, v = (torch.randn(2, 3, 8, 16).to(torch.bfloat16) for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = attention(q, k, v)
    reference = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, reference.to(torch.bfloat16))

"""Small helpers shared by several test files (imported as a plain module: pytest puts tests/ on sys.path)."""

import torch

from lora_lab import GPT, GPTConfig

TINY = GPTConfig(vocab_size=13, block_size=16, n_layer=2, n_head=2, n_embd=32)


def tiny_gpt(config=TINY, seed=0) -> GPT:
    torch.manual_seed(seed)
    return GPT(config).eval()


def tokens(config=TINY, batch=3, seed=1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (batch, config.block_size), generator=gen)


def snapshot(model):
    """Everything a failed call must leave alone: values, requires_grad flags and module structure."""
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        {k: p.requires_grad for k, p in model.named_parameters()},
        [(n, type(m).__name__) for n, m in model.named_modules()],
        getattr(model, "lora_config", None),
    )


def assert_same(model, snap):
    state, grads, structure, config = snapshot(model)
    assert structure == snap[2]
    assert grads == snap[1]
    assert config == snap[3]
    assert state.keys() == snap[0].keys()
    for k in state:
        assert torch.equal(state[k], snap[0][k]), k

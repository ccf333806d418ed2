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

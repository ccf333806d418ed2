"""A minimal character-level GPT, written to be read top to bottom.

Shapes: B = batch, T = time (sequence length), C = n_embd, H = n_head, D = C // H.
Attention has separate q_proj, k_proj, v_proj and o_proj layers: they are the LoRA paper's
Wq, Wk, Wv and Wo, so each can be targeted on its own.

Positions are rotary by default (RoPE, Su et al. 2021): q and k are rotated by an angle that grows with
the position, so q·k depends only on how far apart two characters are. With nanoGPT's budget this
reaches a much lower loss than a learned position table; positions="learned" keeps nanoGPT's model.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F


POSITIONS = ("rope", "learned")


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 65
    block_size: int = 64  # longest context the model sees
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = False  # biases in Linear and LayerNorm layers
    positions: str = "rope"  # "rope": rotary q/k in attention; "learned": nanoGPT's position embedding table

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}.")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig.n_embd={self.n_embd} must be divisible by n_head={self.n_head}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}.")
        if self.positions not in POSITIONS:
            raise ValueError(f"GPTConfig.positions must be one of {POSITIONS}, got {self.positions!r}.")
        if self.positions == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError(
                f"Rotary positions need an even head size; n_embd/n_head = {self.n_embd // self.n_head}."
            )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"Unknown GPTConfig field(s): {sorted(unknown)}.")
        # Configs saved before `positions` existed describe the learned-table model.
        return cls(**{"positions": "learned", **d})

    def fingerprint(self) -> str:
        """A short hash of the architecture (dropout excluded: it does not change any weight's shape)."""
        arch = {k: v for k, v in self.to_dict().items() if k != "dropout"}
        if arch["positions"] == "learned":  # so fingerprints saved before `positions` existed still match
            del arch["positions"]
        return hashlib.sha256(json.dumps(arch, sort_keys=True).encode()).hexdigest()[:16]


def rotary_tables(head_size: int, block_size: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles, (block_size, head_size // 2): position t turns channel
    pair i by t * base**(-2i / head_size), fast for early pairs and slow for late ones."""
    inv_freq = base ** (-torch.arange(0, head_size, 2, dtype=torch.float32) / head_size)  # (D/2,)
    angles = torch.outer(torch.arange(block_size, dtype=torch.float32), inv_freq)  # (T, D/2)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, D) by position: channel i pairs with channel i + D/2, and each pair turns
    like a point in the plane. A rotation keeps lengths, and q·k then sees only the angle between."""
    T = x.size(-2)
    cos, sin = cos[:T].to(x.dtype), sin[:T].to(x.dtype)  # (T, D/2); x's dtype, so bf16 autocast stays bf16
    x1, x2 = x.chunk(2, dim=-1)  # (B, H, T, D/2) each
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        C = config.n_embd
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.q_proj = nn.Linear(C, C, bias=config.bias)  # Wq
        self.k_proj = nn.Linear(C, C, bias=config.bias)  # Wk
        self.v_proj = nn.Linear(C, C, bias=config.bias)  # Wv
        self.o_proj = nn.Linear(C, C, bias=config.bias)  # Wo
        self.resid_dropout = nn.Dropout(config.dropout)
        self.rotary = config.positions == "rope"
        if self.rotary:  # fixed tables, rebuilt from the config, so not saved in checkpoints
            cos, sin = rotary_tables(C // config.n_head, config.block_size)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        H = self.n_head
        q = self.q_proj(x).view(B, T, H, C // H).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, H, C // H).transpose(1, 2)  # (B, H, T, D)
        v = self.v_proj(x).view(B, T, H, C // H).transpose(1, 2)  # (B, H, T, D)
        if self.rotary:
            q, k = apply_rotary(q, self.rope_cos, self.rope_sin), apply_rotary(k, self.rope_cos, self.rope_sin)
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.o_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.up_proj = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.down_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down_proj(F.gelu(self.up_proj(x))))  # (B, T, C)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        # nanoGPT's learned table: one vector per position, added to the token embedding
        self.pos_emb = nn.Embedding(config.block_size, config.n_embd) if config.positions == "learned" else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight  # weight tying: one matrix embeds and un-embeds

        # GPT-2 init: N(0, 0.02) everywhere, residual output projections scaled down by sqrt(2 * n_layer)
        # so the residual stream's variance does not grow with depth.
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Unique parameters (the tied embedding counts once)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """idx: (B, T) token ids -> logits (B, T, vocab), and the mean cross-entropy if targets are given."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"Sequence length {T} exceeds block_size {self.config.block_size}.")
        x = self.tok_emb(idx)  # (B, T, C)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(T, device=idx.device))  # (T, C) broadcast over B
        x = self.drop(x)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))  # (B, T, vocab)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.view(-1))
        return logits, loss

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Extend idx (B, T) by sampling max_new_tokens tokens; returns (B, T + max_new_tokens)."""
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}.")
        if top_k is not None and top_k <= 0:
            raise ValueError(f"top_k must be a positive integer or None, got {top_k}.")
        for _ in range(max_new_tokens):
            context = idx[:, -self.config.block_size :]  # (B, <=block_size)
            logits, _ = self(context)
            logits = logits[:, -1, :].float() / temperature  # (B, vocab)
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = F.softmax(logits, dim=-1)
            next_id = torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
            idx = torch.cat((idx, next_id), dim=1)
        return idx


def count_parameters_formula(config: GPTConfig) -> int:
    """The parameter count of GPT(config), derived by hand from the architecture."""
    V, P, C, L = config.vocab_size, config.block_size, config.n_embd, config.n_layer
    b = int(config.bias)
    ln = C + b * C  # weight (+ bias)
    attn = 4 * (C * C + b * C)  # q, k, v, o
    mlp = (C * 4 * C + b * 4 * C) + (4 * C * C + b * C)  # up, down
    per_block = 2 * ln + attn + mlp
    positions = P * C if config.positions == "learned" else 0  # rotary tables are fixed, not parameters
    return V * C + positions + L * per_block + ln  # tied head adds nothing

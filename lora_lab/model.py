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
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

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
            raise ValueError(f"Rotary positions need an even head size; n_embd/n_head = {self.n_embd // self.n_head}.")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
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


def rotary_pair_tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """apply_rotary's tables laid out for rotate_pairs: (T, 1, 1, 2, D/2), with sin signed per half, so
    that the rotation of (x1, x2) is (x1, x2) * (cos, cos) + (x2, x1) * (-sin, sin)."""
    cos2 = torch.stack((cos, cos), dim=1)  # (T, 2, D/2)
    sin2 = torch.stack((-sin, sin), dim=1)  # (T, 2, D/2)
    return cos2[:, None, None], sin2[:, None, None]


def rotate_pairs(x: torch.Tensor, cos2: torch.Tensor, sin2: torch.Tensor) -> torch.Tensor:
    """apply_rotary for x viewed as (B, T, n, H, 2, D/2) (n = 2: q and k together, each head's halves
    split out): a few kernels for q and k at once instead of fourteen; equal to apply_rotary (tested)."""
    T = x.size(1)
    cos2, sin2 = cos2[:T].to(x.dtype), sin2[:T].to(x.dtype)  # (T, 1, 1, 2, D/2)
    swapped = x.roll(1, dims=-2)  # (x1, x2) -> (x2, x1): one kernel, and one in backward
    return torch.addcmul(x * cos2, swapped, sin2)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """Causal scaled dot-product attention, (B, H, T, D) -> (B, H, T, D). On a CPU under bf16 autocast it
    runs in fp32: PyTorch's CPU flash-attention backward is slower in bf16 than in fp32, while the matmuls
    around it gain from bf16 (benchmarks/RESULTS_pretrain.md has the measurements)."""
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        with torch.autocast("cpu", enabled=False):
            y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), dropout_p=dropout_p, is_causal=True)
        return y.to(torch.bfloat16)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)


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
            cos2, sin2 = rotary_pair_tables(*rotary_tables(C // config.n_head, config.block_size))  # for rotate_pairs
            self.register_buffer("rope_cos2", cos2, persistent=False)
            self.register_buffer("rope_sin2", sin2, persistent=False)

    def project_qkv(self, x: torch.Tensor) -> torch.Tensor:
        """q, k and v stacked as (B, T, 3, C). While all three are plain nn.Linear layers they run as one
        matmul on their concatenated weights (one big kernel beats three small ones). Layers of another
        class that offers `forward_together(layers, x)` (LoRALinear does) compute themselves together the
        same way; anything else (or a layer with forward hooks) runs itself, so wrapping one just works."""
        layers = (self.q_proj, self.k_proj, self.v_proj)
        kind = type(layers[0])
        together = all(type(m) is kind and not m._forward_hooks and not m._forward_pre_hooks for m in layers)
        qkv = None
        if together and kind is nn.Linear:
            weight = torch.cat([m.weight for m in layers])  # (3C, C)
            bias = None if layers[0].bias is None else torch.cat([m.bias for m in layers])
            qkv = F.linear(x, weight, bias)  # (B, T, 3C)
        elif together and hasattr(kind, "forward_together"):
            qkv = kind.forward_together(layers, x)  # (B, T, 3C), or None: the layers run themselves
        if qkv is None:
            return torch.stack([m(x) for m in layers], dim=2)
        return qkv.unflatten(-1, (3, -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        H = self.n_head
        qkv = self.project_qkv(x)  # (B, T, 3, C)
        if self.rotary:  # rotate q and k in one go: view each as two halves of H heads
            # split/unbind rather than indexing: their backward is one cat/stack, not a zero-filled copy per index
            qk, v = qkv.split((2, 1), dim=2)  # (B, T, 2, C), (B, T, 1, C)
            qk = rotate_pairs(qk.unflatten(-1, (H, 2, -1)), self.rope_cos2, self.rope_sin2)
            q, k = qk.flatten(-3).unbind(2)  # (B, T, C) each
            v = v.squeeze(2)
        else:
            q, k, v = qkv.unbind(2)  # (B, T, C) each
        q, k, v = (t.unflatten(-1, (H, C // H)).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D) each
        y = attention(q, k, v, self.dropout if self.training else 0.0)  # (B, H, T, D)
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
        # A training-time switch, not architecture (so not in the config or its fingerprint): train() sets it.
        self.activation_checkpointing = False

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

    def check_token_ids(self, idx: torch.Tensor, what: str = "idx") -> None:
        """Refuse anything but a (B, T) integer tensor of ids in [0, vocab_size) with 1 <= T, with a clear error."""
        if not isinstance(idx, torch.Tensor) or idx.dim() != 2:
            shape = tuple(idx.shape) if isinstance(idx, torch.Tensor) else type(idx).__name__
            raise ValueError(f"{what} must be a (batch, time) tensor of token ids, got {shape}.")
        if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
            raise ValueError(f"{what} must hold integer token ids, got dtype {idx.dtype}.")
        if idx.size(1) == 0:
            raise ValueError(f"{what} is empty (time length 0): give at least one token.")
        if torch.compiler.is_compiling() or (idx.device.type != "cpu" and self.training):
            # Reading the ids' range waits for the GPU (and breaks a compiled graph): training batches are
            # cut from already-encoded text, so on a GPU only eval and generation pay for the check.
            return
        V = self.config.vocab_size
        lo, hi = torch.aminmax(idx)  # one cheap reduction instead of nn.Embedding's bare IndexError
        if lo < 0 or hi >= V:
            bad = idx[(idx < 0) | (idx >= V)].unique()
            shown = ", ".join(str(i) for i in bad[:8].tolist()) + (", ..." if bad.numel() > 8 else "")
            raise ValueError(f"{what} holds token id(s) {shown} outside the vocabulary [0, {V}) (vocab_size={V}).")

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """idx: (B, T) token ids -> logits (B, T, vocab), and the mean cross-entropy if targets are given."""
        self.check_token_ids(idx)
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"Sequence length {T} exceeds block_size {self.config.block_size}.")
        x = self.tok_emb(idx)  # (B, T, C)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(T, device=idx.device))  # (T, C) broadcast over B
        x = self.drop(x)
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            # Activation checkpointing keeps only each block's input and recomputes the rest in backward.
            x = checkpoint(block, x, use_reentrant=False) if recompute else block(x)
        logits = self.lm_head(self.ln_f(x))  # (B, T, vocab)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1))
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
        """Extend idx (B, T) by sampling max_new_tokens tokens; returns (B, T + max_new_tokens).

        max_new_tokens=0 is allowed and returns idx unchanged. Sampling runs in eval mode (no dropout, so a
        seeded `generator` fixes the output) and the caller's train/eval mode is restored afterwards.
        """
        self.check_token_ids(idx, "the prompt")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}.")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature < math.inf:
            raise ValueError(f"temperature must be a positive finite number, got {temperature!r}.")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k <= 0):
            raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}.")
        with eval_mode(self):
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


@contextmanager
def eval_mode(model: nn.Module):
    """Run the block in eval mode (dropout off), then give back the caller's train/eval mode, even on error.

    Each submodule gets its own flag back, so a model with, say, one frozen part in eval mode stays so."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


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

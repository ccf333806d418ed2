"""Why apply_lora refuses a DDP-wrapped model, measured: 2 CPU processes (gloo) train the same seeded LoRA model
for a few steps in both orders (lora_lab.distributed.ddp_order_drift). LoRA first, then DDP: every LoRA gradient is
all-reduced and the ranks' A and B stay bit-identical. DDP first, then LoRA layers (by hand): DDP all-reduces
nothing, and the ranks' adapters drift apart without any error."""

import pytest

from lora_lab import GPTConfig, LoRAConfig
from lora_lab.distributed import ORDERS, ddp_order_drift

CONFIG = GPTConfig(vocab_size=17, block_size=8, n_layer=2, n_head=2, n_embd=16, dropout=0.0)
LORA = LoRAConfig(r=2, alpha=4, targets=("q_proj", "v_proj"))


@pytest.fixture(scope="module")
def drift():
    return {row.order: row for row in ddp_order_drift(CONFIG, LORA, ranks=2, steps=3)}


def test_lora_then_ddp_keeps_every_rank_identical(drift):
    right = drift[ORDERS[0]]
    lora_numbers = 2 * CONFIG.n_layer * LORA.r * (CONFIG.n_embd + CONFIG.n_embd)  # A and B of W_q, W_v per block
    assert right.steps == 3 and right.trainable_bytes == 4 * lora_numbers
    assert right.bytes_per_step == right.trainable_bytes  # every LoRA gradient, every step
    assert right.start_gap == right.max_a_gap == right.max_b_gap == 0.0


def test_ddp_then_lora_all_reduces_nothing_and_the_ranks_drift(drift):
    wrong = drift[ORDERS[1]]
    assert wrong.trainable_bytes == drift[ORDERS[0]].trainable_bytes  # the same adapter, only the order differs
    assert wrong.bytes_per_step == 0.0  # DDP registered the base, which is now frozen: nothing to send
    assert wrong.start_gap == 0.0  # the ranks start identical (same seed): the gap comes from training alone
    assert wrong.max_b_gap > 1e-3 and wrong.max_a_gap > 1e-3  # each rank stepped on its own gradients


@pytest.mark.parametrize("kwargs, message", [({"ranks": 1}, "at least 2 ranks"), ({"steps": 0}, "at least 1")])
def test_bad_arguments_are_refused_before_any_process_starts(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ddp_order_drift(CONFIG, LORA, **kwargs)

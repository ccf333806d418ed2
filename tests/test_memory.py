"""The memory ledger: exact byte counts by kind for full fine-tuning, LoRA and QLoRA, checked independently."""

import copy

import pytest
import torch
import torch.nn as nn

from lora_lab.experiments import memory
from lora_lab.lora import LoRAConfig, apply_lora
from lora_lab.model import GPT, GPTConfig

CONFIG = GPTConfig(vocab_size=65, block_size=32, n_layer=2, n_head=2, n_embd=64, dropout=0.0)
LORA = LoRAConfig(r=4, alpha=8.0, targets=("q_proj", "v_proj"))


def gpt(device="cpu"):
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(0)
        return GPT(CONFIG)


class TanhProbe(nn.Module):
    """loss = sum(tanh(Wx) * y): autograd keeps x (for W's gradient), tanh's output (shared by tanh and the
    product: one storage) and y, and nothing else. The added offset (an addition saves nothing) keeps something
    trainable when the layer is frozen."""

    def __init__(self, k=8, d=5):
        super().__init__()
        self.lin = nn.Linear(k, d, bias=False)
        self.offset = nn.Parameter(torch.zeros(()))

    def forward(self, x, y):
        out = torch.tanh(self.lin(x))
        return out, (out * y).sum() + self.offset


def test_a_known_activation_is_counted_exactly():
    B, k, d = 3, 8, 5
    x, y = torch.randn(B, k), torch.randn(B, d)
    probe = TanhProbe(k, d)
    ledger = memory.memory_ledger(probe, B, 1, batch=(x, y))
    assert ledger.activations == 4 * B * (k + d + d)  # x, tanh(Wx) once (saved twice, one storage), y
    assert ledger.trainable_weights == ledger.gradients == 4 * (k * d + 1)
    # Frozen, the layer needs no input for a weight gradient, and nothing before the offset trains: autograd
    # records no operation at all, so nothing is saved (the offset's addition saves nothing either).
    probe = TanhProbe(k, d)
    probe.lin.weight.requires_grad_(False)
    ledger = memory.memory_ledger(probe, B, 1, batch=(x, y))
    assert ledger.activations == 0 and ledger.trainable_numbers == 1
    assert ledger.frozen_weights == 4 * k * d and ledger.frozen_numbers == k * d


def saved_by_graph(loss: torch.Tensor, model: nn.Module) -> int:
    """Bytes of every tensor the autograd graph of `loss` holds (its nodes' _saved_* attributes), each storage
    once, parameters and buffers excluded: an independent count of what saved_tensors_hooks sees."""
    held = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    found, seen, stack = {}, set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for name in dir(node):
            if name.startswith("_saved_"):
                value = getattr(node, name)
                for t in value if isinstance(value, (tuple, list)) else (value,):
                    # A Python number an operator saved (LoRA's `scale * ...`) is kept as a number and comes back
                    # as a fresh 0-d float64 tensor on each access: no tensor memory.
                    if not isinstance(t, torch.Tensor) or (t.dim() == 0 and t.dtype == torch.float64):
                        continue
                    if t.untyped_storage().data_ptr() not in held:
                        found[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        stack.extend(next_node for next_node, _ in node.next_functions)
    return sum(found.values())


@pytest.mark.parametrize("method", ["full", "lora"])
def test_activations_equal_what_the_graph_saves(method):
    model = gpt() if method == "full" else apply_lora(gpt(), LORA)
    g = torch.Generator().manual_seed(1)
    x, y = (torch.randint(0, 65, (4, 32), generator=g) for _ in range(2))
    _, loss = model(x, y)
    expected = saved_by_graph(loss, model)
    del loss
    ledger = memory.memory_ledger(copy.deepcopy(model), 4, 32, batch=(x, y))
    assert ledger.activations == expected > 0
    assert ledger.method == method


def test_full_fine_tuning_is_16_bytes_per_trainable_number():
    model = gpt()
    n = sum(p.numel() for p in model.parameters())
    tensors = len(list(model.parameters()))
    ledger = memory.memory_ledger(model, 2, 16)
    assert ledger.trainable_numbers == n and ledger.frozen_numbers == 0
    assert ledger.trainable_weights == ledger.gradients == 4 * n
    assert ledger.optimizer_counters == 4 * tensors  # one fp32 step counter per parameter tensor
    moments = ledger.optimizer_state - ledger.optimizer_counters
    assert ledger.trainable_weights + ledger.gradients + moments == 16 * n
    assert ledger.frozen_weights == 0 and ledger.buffers == sum(b.numel() * 4 for b in model.buffers()) > 0
    assert ledger.predicted_difference == ledger.buffers + ledger.optimizer_counters
    assert ledger.total == sum(ledger.as_dict()[k] for k in memory.KINDS)


def test_lora_keeps_4_bytes_per_frozen_number_and_is_smaller():
    full = memory.memory_ledger(gpt(), 4, 32)
    model = apply_lora(gpt(), LORA)
    lora = memory.memory_ledger(model, 4, 32)
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert lora.trainable_numbers == n_lora == CONFIG.n_layer * 2 * LORA.r * (64 + 64)
    assert lora.frozen_weights == 4 * lora.frozen_numbers == 4 * full.trainable_numbers
    assert lora.predicted_difference == lora.buffers + lora.optimizer_counters
    for kind in ("trainable_weights", "gradients", "optimizer_state"):
        assert getattr(lora, kind) < getattr(full, kind) / 10
    assert lora.activations < full.activations  # frozen layers keep no inputs for weight gradients
    assert lora.total < full.total


def test_a_real_qlora_step_matches_the_nf4_formula():
    from lora_lab.nf4 import quantize_base

    lora_model = apply_lora(gpt(), LORA)
    lora = memory.memory_ledger(copy.deepcopy(lora_model), 4, 32)
    qlora = memory.memory_ledger(apply_lora(quantize_base(gpt()), LORA), 4, 32)
    estimate = memory.as_qlora(lora, lora_model)
    assert qlora.method == estimate.method == "qlora"
    assert qlora.quantized_numbers == estimate.quantized_numbers == memory.quantizable_numbers(lora_model) > 0
    # the same adapter, activations and optimizer; the base in NF4 (within the per-layer mean and rounding)
    for kind in ("trainable_weights", "gradients", "optimizer_state", "activations"):
        assert getattr(qlora, kind) == getattr(lora, kind)
    layers = 6 * CONFIG.n_layer
    assert 0 <= qlora.frozen_weights - estimate.frozen_weights <= 8 * layers
    assert qlora.buffers == lora.buffers  # the rotary tables; the NF4 codes and scales are frozen weights
    assert 0 <= qlora.predicted_difference - qlora.buffers - qlora.optimizer_counters <= 8 * layers
    assert qlora.frozen_weights < lora.frozen_weights / 4


def test_checkpointing_reduces_saved_activations_and_nothing_else():
    plain = memory.memory_ledger(gpt(), 4, 32)
    model = gpt()
    ckpt = memory.memory_ledger(model, 4, 32, checkpointing=True)
    assert ckpt.activations < plain.activations / 2
    assert ckpt.weights_and_state == plain.weights_and_state
    assert model.activation_checkpointing is False  # the switch is restored


def test_the_meta_device_counts_the_same_weights_and_state():
    cpu = memory.memory_ledger(apply_lora(gpt(), LORA), 2, 32)
    meta = memory.memory_ledger(apply_lora(gpt("meta"), LORA), 2, 32)
    assert meta.device == "meta" and meta.weights_and_state == cpu.weights_and_state
    assert meta.activations > 0


def test_the_ledger_step_really_trains_and_seeds_the_batch():
    model = gpt()
    before = model.blocks[0].attn.q_proj.weight.detach().clone()
    memory.memory_ledger(model, 2, 16)
    assert not torch.equal(before, model.blocks[0].attn.q_proj.weight)
    assert all(p.grad is None for p in model.parameters())  # zeroed afterwards, as a training loop does


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="batch_size"):
        memory.memory_ledger(gpt(), 0, 16)
    with pytest.raises(ValueError, match="block_size"):
        memory.memory_ledger(gpt(), 1, 33)
    with pytest.raises(ValueError, match="no trainable"):
        memory.memory_ledger(gpt().requires_grad_(False), 1, 16)
    with pytest.raises(ValueError, match="activation_checkpointing"):
        memory.memory_ledger(TanhProbe(), 1, 1, batch=(torch.randn(1, 8), torch.randn(1, 5)), checkpointing=True)
    with pytest.raises(ValueError, match="multiple of 64"):
        memory.regime_config(100)


def test_regime_shows_where_the_saving_appears_and_disappears():
    rows = memory.memory_regime(widths=(128, 1024), shapes=((1, 32), (16, 512)), checkpointing=(False, True))
    by = {(r.n_embd, r.batch_size, r.checkpointing): r for r in rows}
    small_batch_wide = by[(1024, 1, True)]
    big_batch_narrow = by[(128, 16, False)]
    # weights and state dominate: LoRA approaches the fp32 limit (4 bytes vs 16 per number), QLoRA goes further
    assert small_batch_wide.activation_share < 0.05
    assert small_batch_wide.lora_over_full < 0.3 and small_batch_wide.qlora_over_full < small_batch_wide.lora_over_full
    # activations dominate: the saving all but disappears
    assert big_batch_narrow.activation_share > 0.9 and big_batch_narrow.lora_over_full > 0.7
    for r in rows:
        assert r.qlora.activations == r.lora.activations and r.qlora.total < r.lora.total < r.full.total
    assert "| 1024 | 1 x 32 | yes |" in memory.format_regime(rows)


def test_gpt3_through_the_formula():
    n, n_lora, rows = memory.gpt3_memory()
    assert 170e9 < n < 180e9 and n_lora == 96 * 2 * 4 * (12288 + 12288)
    mixed = next(r for r in rows if r.accounting.startswith("fp16 weights and gradients"))
    assert mixed.lora == 2 * n + 16 * n_lora and mixed.full == 16 * n
    assert abs(mixed.lora / memory.PAPER_LORA_BYTES - 1) < 0.01  # the paper's 350 GB: fp16 frozen weights


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (max_memory_allocated)")
def test_cuda_peak_is_bounded_by_the_count():
    config = GPTConfig(vocab_size=65, block_size=128, n_layer=4, n_head=4, n_embd=256, dropout=0.0)
    model = GPT(config).cuda()
    ledger = memory.memory_ledger(model, 16, 128)
    weights = ledger.frozen_weights + ledger.trainable_weights
    # at the end of the forward pass weights and activations are all alive; at the step, weights, gradients
    # and optimizer state; the peak is at least the larger of the two. On top: temporaries and the allocator's
    # rounding, and cuBLAS's workspace (tens of MiB at most) on the first matmul.
    lower = weights + max(ledger.activations, ledger.gradients + ledger.optimizer_state)
    assert lower <= ledger.measured_peak <= 2 * ledger.total + 64 * 2**20


def _step_total_bytes(model, optimizer, saved):
    def nbytes(t):
        return t.numel() * t.element_size()

    params, buffers = list(model.parameters()), list(model.buffers())
    held = {t.untyped_storage().data_ptr() for t in params + buffers}
    grads = sum(nbytes(p.grad) for p in params if p.grad is not None)
    state = sum(nbytes(t) for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}
    activations = sum(n for ptr, n in storages.items() if ptr not in held)
    return sum(nbytes(t) for t in params + buffers) + grads + state + activations


def test_the_chapter_12_checker_catches_the_classic_bugs():
    from lora_lab.course import exercises

    def failures(report):
        return "\n".join(msg for passed, msg in report.results if not passed)

    assert exercises.check_step_total_bytes(_step_total_bytes).ok

    def no_optimizer(model, optimizer, saved):
        state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values())
        return _step_total_bytes(model, optimizer, saved) - state

    def via_state_dict(model, optimizer, saved):
        own = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
        listed = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        return _step_total_bytes(model, optimizer, saved) - own + listed

    def every_saved_tensor(model, optimizer, saved):
        return _step_total_bytes(model, optimizer, []) + sum(t.numel() * t.element_size() for t in saved)

    for wrong, hint in (
        (no_optimizer, "optimizer's state is missing"),
        (via_state_dict, "tied embedding counted twice"),
        (every_saved_tensor, "count each storage once"),
    ):
        report = exercises.check_step_total_bytes(wrong)
        assert not report.ok and hint in failures(report)
    assert exercises.check_step_total_bytes(lambda m, o, s: (_ for _ in ()).throw(NotImplementedError)).unanswered

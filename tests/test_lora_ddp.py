"""apply_lora refuses a model already wrapped in DistributedDataParallel: DDP would never synchronise LoRA's new
tensors (it registered what it all-reduces when it was built), so the ranks would silently drift apart."""

import pytest
import torch.distributed as dist
import torch.nn as nn
from tiny_models import assert_same, snapshot, tiny_gpt
from torch.nn.parallel import DistributedDataParallel

from lora_lab import LoRAConfig, apply_lora, lora_layers
from lora_lab.lora import LoRAError, WrappedModelError


@pytest.fixture
def process_group(tmp_path):
    """A single-process gloo group (world size 1): enough to build a real DDP wrapper on the CPU."""
    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


class Holder(nn.Module):
    """A wrapper of one's own whose `module` is the DDP-wrapped model."""

    def __init__(self, module):
        super().__init__()
        self.module = module


def test_apply_lora_refuses_a_ddp_wrapped_model_and_leaves_it_unchanged(process_group):
    model = tiny_gpt()
    ddp = DistributedDataParallel(model)
    before = snapshot(model)
    with pytest.raises(WrappedModelError, match="Apply LoRA before wrapping") as err:
        apply_lora(ddp, LoRAConfig(r=2))
    assert isinstance(err.value, LoRAError) and "the model is already wrapped in DistributedDataParallel" in str(
        err.value
    )
    assert_same(model, before) and not lora_layers(model)
    with pytest.raises(WrappedModelError, match="its module 'module' is already wrapped"):
        apply_lora(Holder(ddp), LoRAConfig(r=2))
    assert_same(model, before)
    # the right order works: LoRA first, then DDP, which then all-reduces exactly the LoRA tensors
    adapted = apply_lora(tiny_gpt(), LoRAConfig(r=2))
    wrapped = DistributedDataParallel(adapted)
    synced = {n.removeprefix("module.") for n, p in wrapped.named_parameters() if p.requires_grad}
    assert synced and all("lora_" in n for n in synced)

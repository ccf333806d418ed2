"""lora_lab: learn and prototype LoRA on a from-scratch character-level GPT.

Modules, in the order they build on each other: data -> model -> lora (targets, variants)
-> adapters/peft_interop -> contract -> train -> pretrained -> protocol -> finetune -> widgets/exercises -> cli
(tests/test_layering.py checks it).
"""
from .data import CharDataset, CharTokenizer, DataUnavailableError, get_batch, load_splits
from .model import GPT, GPTConfig
from .lora import (
    AdapterMismatchError, LoRAConfig, LoRAError, LoRALinear, ParameterReport, apply_lora, lora_layers,
    merge_and_unload, merge_lora, parameter_report, register_variant, select_targets, set_fast_path, set_lora_enabled,
    unload_lora, unmerge_lora,
)
from .variants import VARIANTS
from .adapters import AdapterBank, load_adapter, save_adapter
from .peft_interop import export_peft, import_peft
from .contract import check_variant
from .train import TrainConfig, TrainResult, estimate_loss, pick_device, train
from .checkpoint import CheckpointMismatchError, load_checkpoint, save_checkpoint
from . import tasks
from .pretrained import PRESETS, Pretrained, pretrained_base
from . import protocol  # the fair comparison: protocol.compare, lora_vs_full, norm_by_rank, attention_vs_mlp
from . import finetune  # the module: finetune.finetune, finetune.compare_methods, finetune.rank_sweep

__version__ = "0.1.0"

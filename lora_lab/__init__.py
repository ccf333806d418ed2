"""lora_lab: learn and prototype LoRA on a from-scratch character-level GPT."""
from .data import CharDataset, CharTokenizer, DataUnavailableError, get_batch, load_splits
from .model import GPT, GPTConfig
from .train import TrainConfig, TrainResult, estimate_loss, pick_device, train
from .checkpoint import CheckpointMismatchError, load_checkpoint, save_checkpoint

__version__ = "0.1.0"
from .pretrained import PRESETS, Pretrained, pretrained_base
from . import tasks
from .lora import (AdapterBank, AdapterMismatchError, LoRAConfig, LoRAError, LoRALinear, ParameterReport, apply_lora,
                   load_adapter, lora_layers, merge_and_unload, merge_lora, parameter_report, save_adapter,
                   set_lora_enabled, unmerge_lora)
from .peft_interop import export_peft, import_peft

"""lora_lab: learn and prototype LoRA on a from-scratch character-level GPT.

The package is a spine and four rooms; imports run one way, left to right (tests/test_layering.py checks it):

    spine        errors, data, tasks, model, sampling, targets, fused, lora, nf4, devices, distributed, train
    storage/     files, checkpoints, adapter files, banks of adapters, mixed-adapter batches, PEFT's format
    variants/    the built-in LoRA variants and check_variant, the contract every variant keeps
    experiments/ pretrained bases, the fair-comparison protocol, fine-tuning, costs, scaling, reports
    course/      what the notebooks use: numeric helpers, widgets, exercises, the tour, adapter layers
    cli          the lora-lab command, a thin skin over the above
"""

from . import tasks
from .data import CharDataset, CharTokenizer, DataUnavailableError, get_batch, load_splits
from .devices import pick_device
from .experiments import (
    finetune,  # finetune.finetune: the one fine-tune pipeline (rank sweeps and studies: experiments.studies)
    protocol,  # the fair comparison: protocol.compare, seeds, grids, the paired-seed verdicts
)
from .experiments.pretrained import PRESETS, Pretrained, pretrained_base
from .lora import (
    AdapterMismatchError,
    LoRAConfig,
    LoRAError,
    LoRALinear,
    ParameterReport,
    apply_lora,
    lora_layers,
    merge_and_unload,
    merge_lora,
    parameter_report,
    register_variant,
    select_targets,
    set_fast_path,
    set_lora_enabled,
    unload_lora,
    unmerge_lora,
)
from .model import GPT, GPTConfig
from .nf4 import NF4Linear, NF4Weight, bits_per_parameter, dequantize_nf4, nf4_codebook, quantize_base, quantize_nf4
from .storage.adapters import load_adapter, save_adapter
from .storage.bank import AdapterBank
from .storage.checkpoint import CheckpointMismatchError, load_checkpoint, save_checkpoint
from .storage.peft_format import export_peft, import_peft
from .train import TrainConfig, TrainResult, estimate_loss, train
from .variants import VARIANTS, check_variant

__version__ = "0.1.0"

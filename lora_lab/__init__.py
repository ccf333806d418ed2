"""lora_lab: learn and prototype LoRA on a from-scratch character-level GPT."""
from .data import CharDataset, CharTokenizer, DataUnavailableError, get_batch, load_splits
from .model import GPT, GPTConfig
from .train import TrainConfig, TrainResult, estimate_loss, pick_device, train
from .checkpoint import CheckpointMismatchError, load_checkpoint, save_checkpoint

__version__ = "0.1.0"
from .pretrained import PRESETS, Pretrained, pretrained_base
from . import tasks

"""A tiny stand-in for chapter 07's setup, so the real RankDashboard is built in seconds, not minutes.

Chapter 07 fine-tunes the cached pretrained base for every setting (minutes from a cold cache). Here the
base is a small freshly initialised GPT and the task a few thousand characters of made-up speeches, which
keeps every fine-tune under a second. The browser test imports this module in two places: the notebook it
runs in JupyterLab builds its dashboard from it, and the test itself fine-tunes the same settings with the
library to know which numbers the page must show. Same seed, same numbers.
"""

import torch

from lora_lab import GPT, CharTokenizer, GPTConfig, tasks
from lora_lab.experiments.finetune import finetune_config

RANKS = (1, 2, 4)  # the dashboard's rank slider
START_RANK = 2
GROUPS = ("Wq", "Wv")
ALPHA = 16.0
STEPS = 20

SPEECHES = (
    "ROMEO:\nBut soft, what light through yonder window breaks?",
    "JULIET:\nO Romeo, Romeo, wherefore art thou Romeo?",
    "NURSE:\nEven or odd, of all days in the year, come Lammas-eve at night shall she be fourteen.",
    "MERCUTIO:\nA plague on both your houses!",
)


def _speeches(count: int, seed: int) -> str:
    order = torch.randint(0, len(SPEECHES), (count,), generator=torch.Generator().manual_seed(seed))
    return "".join(SPEECHES[i] + "\n\n" for i in order.tolist())


def toy_setup():
    """(base GPT, task, tokenizer, LoRA train config), the same on every call."""
    task = tasks.Task(
        name="toy_speeches",
        description="Made-up speeches (target) against the same speeches in upper case (source).",
        train=_speeches(200, seed=1),
        validation=_speeches(40, seed=2),
        source_validation=_speeches(40, seed=3).upper(),
    )
    tokenizer = CharTokenizer.from_text(task.train + task.validation + task.source_validation)
    torch.manual_seed(0)
    base = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=32, n_layer=2, n_head=2, n_embd=32))
    return base, task, tokenizer, finetune_config(max_iters=STEPS)

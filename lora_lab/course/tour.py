"""The guided tour as a library function: the whole LoRA story on one task, and a report of it.

`run_tour` takes a pretrained base (see `pretrained.pretrained_base`), fine-tunes it with LoRA (and in
full, to compare), saves the adapter, merges it into a plain checkpoint, checks that the merged model
computes what base + adapter computes, samples from both, and returns a `TourReport`: its numbers as a
dict and renderings as text and markdown. `lora-lab tour` only parses arguments and prints the report.

Output folder (claimed with files.claim_output_dir, so a folder of someone else's files is refused):
  adapter/ (save_adapter), merged/ (save_checkpoint), loss_curves.png, report.md, report.json.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from .. import tasks
from ..experiments.defaults import DEFAULT_TASK, EVAL_CHARS, default_lora_config, finetune_config
from ..experiments.finetune import FinetuneResult, finetune
from ..experiments.pretrained import Pretrained
from ..experiments.reports import format_table, loss_rows, plot_loss_curves
from ..lora import LoRAConfig, merge_and_unload, select_targets
from ..model import eval_mode
from ..sampling import sample_text
from ..storage.adapters import save_adapter
from ..storage.checkpoint import save_checkpoint
from ..storage.files import claim_output_dir, folder_bytes, write_file_atomic, write_json_atomic
from ..storage.outputs import check_adapter_target, check_checkpoint_target
from ..train import TrainConfig

TOUR_OUTPUT_FORMAT = "lora_lab.tour.v1"
# Speakers each text knows (rot13's is "KING RICHARD III:" in ROT13).
TOUR_PROMPTS = {"romeo_juliet": "ROMEO:\n", "shout": "KING RICHARD III:\n", "rot13": "XVAT EVPUNEQ VVV:\n"}
SAMPLE_CHARS = 160
SAMPLE_TEMPERATURE = 0.8
MERGE_TOLERANCE = 1e-4  # largest |logit difference| that still counts as "the same function" in fp32


def check_tour_output(out_dir: str | os.PathLike) -> Path:
    """Claim `out_dir` for a tour and check that its adapter/ and merged/ bundles may be written.

    Raises files.OutputExistsError (and changes nothing) for a file, a folder of other files (`.`, `~`),
    or another kind of lora_lab output. Call it before any training; run_tour calls it too.
    """
    out = claim_output_dir(out_dir, TOUR_OUTPUT_FORMAT)
    check_adapter_target(out / "adapter")
    check_checkpoint_target(out / "merged")
    return out


@torch.no_grad()
def max_logit_gap(a: nn.Module, b: nn.Module, seed: int = 0) -> float:
    """Largest |logit difference| of two models on a fixed random batch: ~0 if they compute the same function.

    Both run in eval mode (their modes are restored after), each on its own device."""
    cfg = a.config
    x = torch.randint(cfg.vocab_size, (8, cfg.block_size), generator=torch.Generator().manual_seed(seed))  # (8, T)
    logits = []
    for model in (a, b):
        with eval_mode(model):
            logits.append(model(x.to(next(model.parameters()).device))[0].float().cpu())  # (8, T, vocab)
    return (logits[0] - logits[1]).abs().max().item()


@dataclass
class TourReport:
    task: str
    task_description: str
    base_shape: str  # "4 layers x 128 dims"
    base_params: int
    lora: LoRAConfig
    results: list[FinetuneResult]  # LoRA first, then full fine-tuning if it ran
    adapter_dir: Path
    merged_dir: Path
    adapter_bytes: int
    merged_bytes: int
    merge_max_logit_gap: float
    prompt: str
    samples: dict[str, str]  # "base", "lora" -> the text generated after the prompt
    loss_curves: Path
    seconds: float

    @property
    def merge_ok(self) -> bool:
        return self.merge_max_logit_gap < MERGE_TOLERANCE

    def numbers(self) -> dict:
        """The report's numbers, ready for JSON (what report.json holds)."""
        return {
            "task": self.task,
            "results": [r.summary() for r in self.results],
            "base_params": self.base_params,
            "adapter_bytes": self.adapter_bytes,
            "merged_bytes": self.merged_bytes,
            "merge_max_logit_gap": self.merge_max_logit_gap,
            "merge_ok": self.merge_ok,
            "seconds": self.seconds,
        }

    def _body(self) -> list[str]:
        lora_res, lora = self.results[0], self.lora
        return [
            self.task_description,
            f"base GPT: {self.base_shape}, {self.base_params:,} parameters",
            f"LoRA: r={lora.r}, alpha={lora.alpha:g}, targets {','.join(lora.targets)}: "
            f"{lora_res.trainable_params:,} trainable parameters = "
            f"{100 * lora_res.trainable_params / self.base_params:.2f}% of the base's {self.base_params:,}",
            "",
            f"Validation loss (nats/char): the exact loss of the first {EVAL_CHARS:,} characters of each "
            "validation text, the same estimator as every point of loss_curves.png; target = the task, "
            "source = pretraining text (higher than base = forgetting); target_acc = next-character accuracy. "
            "One seed: `lora_lab.protocol.compare` adds paired seeds, a learning-rate sweep and verdicts.",
            "",
            format_table(loss_rows(self.results, self.base_params)),
            "",
        ]

    def _sizes(self) -> list[str]:
        return [
            f"adapter on disk:           {self.adapter_bytes:>12,} bytes  ({self.adapter_dir})",
            f"merged checkpoint on disk: {self.merged_bytes:>12,} bytes  ({self.merged_dir}), "
            f"{self.merged_bytes / self.adapter_bytes:.0f}x the adapter",
            f"merged == unmerged: max |logit difference| = {self.merge_max_logit_gap:.2e} -> "
            f"{'OK' if self.merge_ok else 'MISMATCH'}",
        ]

    def to_text(self) -> str:
        title = f"lora-lab tour: LoRA on {self.task!r}"
        indent = lambda text: "    " + text.replace("\n", "\n    ")  # noqa: E731
        lines = [
            title,
            "=" * len(title),
            "",
            *self._body(),
            *self._sizes(),
            "",
            f"sample from the base (prompt {self.prompt!r}, seed 0):",
            indent(self.prompt + self.samples["base"]),
            "sample after LoRA (same prompt and seed):",
            indent(self.prompt + self.samples["lora"]),
            "",
            f"loss curves: {self.loss_curves}",
            f"fine-tuning, merging and reporting took {self.seconds:.0f} s",
        ]
        return "\n".join(lines) + "\n"

    def to_markdown(self) -> str:
        fence = lambda text: "```text\n" + text + "\n```"  # noqa: E731
        lines = [
            f"# lora-lab tour: LoRA on `{self.task}`",
            "",
            *self._body(),
            "## Sizes and the merge check",
            "",
            *(f"- {line}" for line in self._sizes()),
            "",
            "## Samples",
            "",
            f"From the base (prompt {self.prompt!r}, seed 0):",
            "",
            fence(self.prompt + self.samples["base"]),
            "",
            "After LoRA (same prompt and seed):",
            "",
            fence(self.prompt + self.samples["lora"]),
            "",
            f"![loss curves]({self.loss_curves.name})",
            "",
            f"Fine-tuning, merging and reporting took {self.seconds:.0f} s.",
        ]
        return "\n".join(lines) + "\n"


def run_tour(
    base: Pretrained,
    task_name: str = DEFAULT_TASK,
    lora: LoRAConfig | None = None,
    lora_train_config: TrainConfig | None = None,
    full_train_config: TrainConfig | None = None,
    out_dir: str | os.PathLike = "runs/tour",
    *,
    compare_full: bool = True,
    metadata: dict | None = None,
    eval_chars: int | None = EVAL_CHARS,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> TourReport:
    """Fine-tune `base` on a task with LoRA (and in full unless compare_full=False), merge, and report.

    lora defaults to defaults.default_lora_config() (r=8, alpha=16 on DEFAULT_TARGETS); the train configs
    to defaults.finetune_config (the protocol's chosen rates). metadata (a JSON object, e.g. which base this is) is
    stored with the adapter and the merged checkpoint. log, if given, receives a line at the start of each step.
    Raises finetune.DivergedError if the LoRA run
    diverged (nothing is saved then); the output folder is checked before any training.
    """
    say = log or (lambda line: None)
    t0 = time.perf_counter()
    lora = lora or default_lora_config()
    select_targets(base.model, lora)  # a bad config fails before anything is written or trained
    out = check_tour_output(out_dir)
    tokenizer = base.dataset.tokenizer
    task = tasks.make_task(task_name, base.texts)
    say(f"\n== 2. The task {task.name!r}: {task.description}")
    say(f"{len(task.train):,} characters to fine-tune on, {len(task.validation):,} to validate on")

    say(f"\n== 3. LoRA fine-tuning: r={lora.r}, alpha={lora.alpha:g}, targets {','.join(lora.targets)}")
    lora_res = finetune(
        base.model,
        task,
        tokenizer,
        lora,
        lora_train_config or finetune_config(),
        progress=progress,
        eval_chars=eval_chars,
    ).require_finite()
    results = [lora_res]
    if compare_full:
        say("\n== 3b. Full fine-tuning, for comparison: every weight trainable")
        results.append(
            finetune(
                base.model,
                task,
                tokenizer,
                None,
                full_train_config or finetune_config(full=True),
                progress=progress,
                eval_chars=eval_chars,
            )
        )

    say("\n== 4. Merge: fold B A into W, save the adapter and the merged checkpoint")
    adapted = lora_res.model.cpu()
    adapter_dir = save_adapter(adapted, out / "adapter", metadata=metadata)
    merged = merge_and_unload(copy.deepcopy(adapted))
    merged_dir = save_checkpoint(
        merged, out / "merged", metadata={**(metadata or {}), "merged_from": str(adapter_dir.resolve())}
    )
    gap = max_logit_gap(adapted, merged)
    curves = plot_loss_curves(results, out / "loss_curves.png")
    prompt = TOUR_PROMPTS.get(task.name, "\n")
    samples = {
        name: sample_text(model, tokenizer, prompt, SAMPLE_CHARS, SAMPLE_TEMPERATURE, None, 0)
        for name, model in (("base", base.model), ("lora", adapted))
    }
    c = base.model.config
    report = TourReport(
        task=task.name,
        task_description=task.description,
        base_shape=f"{c.n_layer} layers x {c.n_embd} dims",
        base_params=base.model.num_parameters(),
        lora=lora,
        results=results,
        adapter_dir=adapter_dir,
        merged_dir=merged_dir,
        adapter_bytes=folder_bytes(adapter_dir),
        merged_bytes=folder_bytes(merged_dir),
        merge_max_logit_gap=gap,
        prompt=prompt,
        samples=samples,
        loss_curves=curves,
        seconds=time.perf_counter() - t0,
    )
    write_file_atomic(out / "report.md", report.to_markdown())
    write_json_atomic(out / "report.json", report.numbers())
    return report

"""The run cache: one fine-tune's numbers (curve, ‖ΔW‖_F per layer), kept as JSON and returned again at once.

Entries live under <model cache>/protocol-runs/, one file per run, named by a key over everything that determines
the run's numbers (base weights, task texts, method, LoRA config, training config, evaluation, device kind), so a
second call returns identical numbers and any change of those inputs misses. A run that diverged is not kept.
An entry carries its key, the PROTOCOL_VERSION that made it and a checksum of its numbers: an entry that was
edited, truncated or made by other code is refused with its path ("delete that file"), never displayed.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from ..devices import pick_device
from ..digests import json_digest, tensors_digest, text_digest
from ..lora import LoRAConfig
from ..model import GPT
from ..storage.files import CorruptFileError, claim_output_dir, read_json, write_json_atomic
from ..tasks import Task
from ..tensorboard_logs import log_recorded_run
from ..train import TrainConfig, learning_rate_at
from .defaults import CURVE_POINTS, EVAL_CHARS
from .finetune import delta_norms, finetune, method_label
from .pretrained import cache_dir

# Bump when a change makes cached runs incomparable (2: one CPU thread; 3: q/k/v fast path; 4: keys by
# lora_lab.digests, entries checked).
PROTOCOL_VERSION = 4
RUNS_FORMAT = "lora_lab.protocol_runs.v1"


@dataclass
class Run:
    method: str  # the method's label, e.g. "LoRA r=8" or "full FT"
    learning_rate: float
    seed: int
    curve: list[dict]  # [{"step", "target", "target_accuracy", "source"}]; the last point is `final`
    delta_norms: dict[str, float]
    trainable_params: int
    seconds: float  # training + scoring wall time when it ran (a cache hit keeps the original time)
    from_cache: bool = False

    @property
    def final(self) -> dict:
        return self.curve[-1]

    @property
    def diverged(self) -> bool:
        return not all(math.isfinite(v) for v in (self.final["target"], self.final["source"]))

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "from_cache"}


def entry_record(run: Run, key: str) -> dict:
    """What a cache file holds: the run's numbers, the key and code version they belong to, and their checksum."""
    numbers = run.to_dict()
    return {"key": key, "version": PROTOCOL_VERSION, "checksum": json_digest(numbers), "run": numbers}


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_entry(path: Path, key: str, cfg: TrainConfig, label: str) -> Run:
    """The cached Run at `path`, checked; raises CorruptFileError (naming the file and what is wrong) otherwise."""

    def damaged(why: str) -> CorruptFileError:
        return CorruptFileError(f"The cached run {path} is damaged ({why}); delete that file to run it again.")

    try:
        record = read_json(path)
    except CorruptFileError as err:
        raise damaged(str(err)) from None
    if not isinstance(record, dict) or set(record) != {"key", "version", "checksum", "run"}:
        raise damaged("not a run cache entry of this lora_lab")
    if record["version"] != PROTOCOL_VERSION or record["key"] != key:
        raise damaged(f"made by protocol version {record['version']!r} for key {record['key']!r}")
    numbers = record["run"]
    if not isinstance(numbers, dict) or record["checksum"] != json_digest(numbers):
        raise damaged("its numbers do not match their checksum: the file was edited")
    expected = {"method", "learning_rate", "seed", "curve", "delta_norms", "trainable_params", "seconds"}
    if set(numbers) != expected:
        raise damaged(f"fields {sorted(numbers)}, expected {sorted(expected)}")
    curve = numbers["curve"]
    point_keys = {"step", "target", "target_accuracy", "source"}
    if not isinstance(curve, list) or not curve:
        raise damaged("an empty curve")
    if any(not isinstance(p, dict) or set(p) != point_keys or not all(map(_number, p.values())) for p in curve):
        raise damaged(f"a curve point without the numbers {sorted(point_keys)}")
    norms = numbers["delta_norms"]
    if not isinstance(norms, dict) or not all(map(_number, norms.values())):
        raise damaged("delta_norms that are not numbers")
    if numbers["learning_rate"] != cfg.learning_rate or numbers["seed"] != cfg.seed:
        raise damaged("the learning rate or seed of another run")
    if not isinstance(numbers["trainable_params"], int) or not _number(numbers["seconds"]):
        raise damaged("trainable_params or seconds that are not numbers")
    return Run(**{**numbers, "method": label}, from_cache=True)


CACHED_RUN_NOTE = (
    "Read from lora_lab's run cache, not trained again: the evaluations and the learning-rate schedule are the "
    "run's own, but the cache keeps no per-step training loss or gradient norm (run_once(cache=False) logs them)."
)


def log_cached_run(run: Run, cfg: TrainConfig) -> bool:
    """A cached run in TensorBoard too (cfg.log_dir; see tensorboard_logs.log_recorded_run): its curve points and
    its learning rate at every step, if the folder holds no events yet. True if it wrote."""
    rates = [learning_rate_at(i, cfg) for i in range(cfg.max_iters)]
    return log_recorded_run(cfg.log_dir, rates, run.curve, why=CACHED_RUN_NOTE)


def model_digest(model: GPT) -> str:
    """A digest of the model's config and weights: a cache key part that changes whenever the base does."""
    return json_digest({"config": model.config.to_dict(), "weights": tensors_digest(model.state_dict())})


def run_key(base_digest: str, task: Task, lora: LoRAConfig | None, cfg: TrainConfig, eval_chars, points) -> str:
    """Everything that determines a run's numbers. Of the device only its kind counts ("cuda:1" and "cuda"
    compute alike; a GPU trains under bf16 autocast and so gives other numbers than the CPU)."""
    texts = {k: text_digest(getattr(task, k)) for k in ("train", "validation", "source_validation")}
    return json_digest(
        {
            "version": PROTOCOL_VERSION,
            "base": base_digest,
            "task": [task.name, texts],
            "lora": lora.to_dict() if lora is not None else None,
            "train": {k: v for k, v in cfg.to_dict().items() if k != "device"},
            "device": pick_device(cfg.device).type,
            "eval": {"chars": eval_chars, "points": points},
        },
        24,
    )


def runs_dir(cache: str | os.PathLike | None = None) -> Path:
    """The folder cached runs live in: <model cache>/protocol-runs (see pretrained.cache_dir)."""
    return cache_dir(cache) / "protocol-runs"


def run_once(
    base_model: GPT,
    task: Task,
    tokenizer,
    lora: LoRAConfig | None,
    cfg: TrainConfig,
    *,
    label: str | None = None,
    eval_chars: int | None = EVAL_CHARS,
    points: int = CURVE_POINTS,
    cache: str | os.PathLike | None | bool = None,
    base_digest: str | None = None,
) -> Run:
    """finetune.finetune of `base_model` (LoRA with `lora`, every weight if None) with `cfg`, cached on disk.

    cache=False runs without the cache; None uses runs_dir(); a path uses that model cache folder.
    With cfg.log_dir the run logs to TensorBoard there as it trains; a cache hit writes its recorded curve there
    instead (log_cached_run). cfg.log_dir is not part of the key: where a run logs does not change it.
    label defaults to finetune.method_label(lora)."""
    label = label or method_label(lora)
    key = None
    if cache is not False:
        key = run_key(base_digest or model_digest(base_model), task, lora, cfg, eval_chars, points)
        path = runs_dir(None if cache is None else cache) / f"{key}.json"
        if path.is_file():
            cached = read_entry(path, key, cfg, label)
            log_cached_run(cached, cfg)  # nothing without cfg.log_dir
            return cached
    t0 = time.perf_counter()
    res = finetune(
        base_model, task, tokenizer, lora, cfg, False, eval_chars=eval_chars, curve_points=points, score_base=False
    )
    run = Run(
        label,
        cfg.learning_rate,
        cfg.seed,
        res.curve,
        delta_norms(res.model.cpu(), base_model),
        res.trainable_params,
        time.perf_counter() - t0,
    )
    if key is not None and not run.diverged:
        folder = claim_output_dir(runs_dir(None if cache is None else cache), RUNS_FORMAT)
        write_json_atomic(folder / f"{key}.json", entry_record(run, key))
    return run

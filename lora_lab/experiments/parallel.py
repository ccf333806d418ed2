"""Independent protocol runs trained side by side in worker processes, straight into the run cache.

A protocol run is one single-threaded fine-tune (estimator.one_cpu_thread), so a machine with n cores can train
n of them at once. A `Prefetcher` is given the runs a study is about to ask runs.run_once for, trains the ones
the run cache lacks in a process pool (concurrent.futures, "spawn" start method: a fresh interpreter per worker, no
fork of a process that holds torch's threads), and each worker stores its run exactly as run_once would. The study
then reads every run back with run_once, so its numbers are the same whatever `workers` is; only the wall time
changes. Without a run cache (cache=False) or with one worker, nothing is done here and run_once trains in turn.
"""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import get_context

import torch

from ..devices import pick_device
from ..lora import LoRAConfig
from ..model import GPT, GPTConfig
from ..storage.files import claim_output_dir
from ..tasks import Task
from ..train import TrainConfig
from .runs import RUNS_FORMAT, model_digest, run_key, run_once, runs_dir


@dataclass(frozen=True)
class RunRequest:
    """One run as run_once would be called for it (the base and tokenizer are the Prefetcher's)."""

    task: Task
    lora: LoRAConfig | None
    cfg: TrainConfig
    label: str
    eval_chars: int | None
    points: int


def default_workers() -> int:
    """One worker per core this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def check_workers(workers) -> int:
    limit = default_workers()
    if isinstance(workers, bool) or not isinstance(workers, int) or not 1 <= workers <= limit:
        raise ValueError(
            f"workers must be an integer from 1 to the {limit} core(s) this process may use, got {workers!r}."
        )
    return workers


def missing_runs(requests: list[RunRequest], base_digest: str, cache=None) -> list[RunRequest]:
    """The requests whose run is not in the run cache yet, each once, in the order given."""
    folder = runs_dir(cache)
    out, seen = [], set()
    for r in requests:
        key = run_key(base_digest, r.task, r.lora, r.cfg, r.eval_chars, r.points)
        if key not in seen and not (folder / f"{key}.json").is_file():
            seen.add(key)
            out.append(r)
    return out


_worker: dict = {}


def _start_worker(config: dict, state: dict, training: bool, tokenizer, cache, base_digest: str) -> None:
    torch.set_num_threads(1)
    model = GPT(GPTConfig.from_dict(config))
    model.load_state_dict(state)
    _worker.update(model=model.train(training), tokenizer=tokenizer, cache=cache, digest=base_digest)


def _train(request: RunRequest) -> float:
    run = run_once(
        _worker["model"],
        request.task,
        _worker["tokenizer"],
        request.lora,
        request.cfg,
        label=request.label,
        eval_chars=request.eval_chars,
        points=request.points,
        cache=_worker["cache"],
        base_digest=_worker["digest"],
    )
    return run.seconds


class Prefetcher:
    """Trains requested runs the run cache lacks, `workers` at a time (default: one per core), into the cache (None:
    runs_dir(), a path: that model cache). One pool of worker processes serves every `train` call until the
    prefetcher is closed (use it as a context manager): a worker loads torch and the base once.

    Nothing is trained here when cache is False, with one worker, or for a request on a GPU (one device, one
    process): run_once then trains those runs itself when the study asks for them."""

    def __init__(self, base_model: GPT, tokenizer, *, cache=None, workers: int | None = None, base_digest=None):
        self.workers = default_workers() if workers is None else check_workers(workers)
        self.cache = cache
        self.base_model, self.tokenizer = base_model, tokenizer
        self.digest = base_digest or model_digest(base_model)
        self._pool = None
        self.broken = False

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            state = {k: v.detach().cpu() for k, v in self.base_model.state_dict().items()}
            folder = None if self.cache is None else os.fspath(self.cache)
            init = (
                self.base_model.config.to_dict(),
                state,
                self.base_model.training,
                self.tokenizer,
                folder,
                self.digest,
            )
            self._pool = ProcessPoolExecutor(self.workers, get_context("spawn"), _start_worker, init)
        return self._pool

    def train(self, requests: list[RunRequest]) -> int:
        """Train the missing ones side by side; returns how many were trained here."""
        if self.cache is False or self.workers < 2 or self.broken:
            return 0
        todo = [r for r in missing_runs(requests, self.digest, self.cache) if pick_device(r.cfg.device).type == "cpu"]
        if len(todo) < 2:
            return 0
        claim_output_dir(runs_dir(self.cache), RUNS_FORMAT)  # once, here: workers writing their first runs at once race
        try:
            for _ in self._executor().map(_train, todo):  # an error in a run is raised here, with its traceback
                pass
        except BrokenProcessPool as err:  # a worker could not start (e.g. a __main__ read from stdin)
            warnings.warn(
                f"parallel.Prefetcher: worker processes failed ({err}); runs train one at a time.", stacklevel=2
            )
            self.close()
            self.broken = True
            return 0
        return len(todo)

    def close(self, wait: bool = True) -> None:
        """Stop the workers; wait=False (after an error or an interrupt) cancels the runs not started yet."""
        if self._pool is not None:
            self._pool.shutdown(wait=wait, cancel_futures=not wait)
            self._pool = None

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(wait=exc_type is None)

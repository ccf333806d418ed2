"""TrainConfig.cuda_graphs: the whole training step captured as one CUDA graph (lora_lab.graphs). On a CPU the
switch trains exactly as without it and says why in the notes; the CUDA tests check a replayed run against an
eager one."""

import copy
from dataclasses import replace

import pytest
import torch

from lora_lab import GPT, LoRAConfig, TrainConfig, apply_lora, train
from lora_lab.graphs import WARMUP_STEPS, graph_problem, make_capturable, set_learning_rate
from lora_lab.train import make_optimizer

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none)")


def tokens(n=3000, vocab=17, seed=0):
    g = torch.Generator().manual_seed(seed)
    noise = torch.rand(n, generator=g) < 0.05
    return torch.where(noise, torch.randint(0, vocab, (n,), generator=g), torch.arange(n) % 7)


FAST = dict(max_iters=30, batch_size=4, eval_interval=15, eval_iters=2, warmup_iters=5, device="cpu")


def test_on_a_cpu_the_switch_trains_exactly_as_without_it_and_says_why(tiny_config):
    runs = []
    for graphs in (False, True):
        torch.manual_seed(0)
        model = GPT(tiny_config)
        res = train(model, tokens(), tokens(seed=1), TrainConfig(**FAST, cuda_graphs=graphs), progress=False)
        runs.append((res, [p.detach().clone() for p in model.parameters()]))
    (eager, w_eager), (graphed, w_graphed) = runs
    assert graphed.losses == eager.losses and graphed.evals == eager.evals
    assert all(torch.equal(a, b) for a, b in zip(w_eager, w_graphed))
    assert not eager.notes
    assert graphed.notes == ["cuda_graphs needs a CUDA device; this run is on cpu: trained without graphs."]


def test_the_switch_is_validated_and_stays_out_of_cache_keys_while_off():
    with pytest.raises(ValueError, match="cuda_graphs must be True or False"):
        TrainConfig(cuda_graphs="yes")
    assert "cuda_graphs" not in TrainConfig().to_dict()  # keys of runs made before the switch existed still hold
    assert TrainConfig(cuda_graphs=True).to_dict()["cuda_graphs"] is True
    assert TrainConfig(**TrainConfig(cuda_graphs=True).to_dict()) == TrainConfig(cuda_graphs=True)


def test_every_reason_not_to_capture_is_a_sentence():
    cuda = torch.device("cuda")
    assert graph_problem(cuda, False, False, False) is None or not hasattr(torch.cuda, "CUDAGraph")
    assert "data-parallel" in graph_problem(cuda, True, False, False)
    assert "activation checkpointing" in graph_problem(cuda, False, True, False)
    assert "gradient norm" in graph_problem(cuda, False, False, True)
    assert "on mps" in graph_problem(torch.device("mps"), False, False, False)


def test_learning_rates_are_set_in_place_where_a_graph_reads_them(tiny_config):
    optimizer = make_optimizer(GPT(tiny_config), TrainConfig(fused_optimizer=False))
    set_learning_rate(optimizer, 0.5)
    assert all(g["lr"] == 0.5 for g in optimizer.param_groups)
    make_capturable(optimizer, torch.device("cpu"))
    tensors = [g["lr"] for g in optimizer.param_groups]
    assert all(g["capturable"] for g in optimizer.param_groups) and all(torch.is_tensor(t) for t in tensors)
    set_learning_rate(optimizer, 0.25)
    assert all(g["lr"] is t and t.item() == 0.25 for g, t in zip(optimizer.param_groups, tensors))


def train_twice(model, cfg, **kwargs):
    """(eager result, graphed result, eager model, graphed model) from the same start."""
    out = []
    for graphs in (False, True):
        m = copy.deepcopy(model)
        torch.manual_seed(0)
        out.append((train(m, tokens(), tokens(seed=1), replace(cfg, cuda_graphs=graphs), progress=False), m))
    return out[0][0], out[1][0], out[0][1], out[1][1]


@needs_cuda
@pytest.mark.parametrize("lora", [None, LoRAConfig(r=4)])
def test_cuda_a_replayed_step_trains_as_the_eager_step(tiny_config, lora):
    torch.manual_seed(0)
    model = GPT(tiny_config) if lora is None else apply_lora(GPT(tiny_config), lora)
    cfg = TrainConfig(**{**FAST, "device": "cuda", "max_iters": 40, "eval_interval": 20}, bf16=False)
    eager, graphed, m_eager, m_graphed = train_twice(model, cfg)
    assert len(graphed.losses) == 40 and any("whole step captured" in n for n in graphed.notes), graphed.notes
    assert graphed.losses[0] == eager.losses[0]  # the same start; later steps read the rate from a tensor
    assert graphed.losses == pytest.approx(eager.losses, rel=1e-3, abs=1e-5)
    for a, b in zip(m_eager.parameters(), m_graphed.parameters()):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-5)
    assert all(p.grad is None for p in m_graphed.parameters())  # the graph's gradient buffers are released


@needs_cuda
def test_cuda_graphs_with_bf16_dropout_and_lora_plus_learn(tiny_config):
    torch.manual_seed(0)
    model = apply_lora(GPT(replace(tiny_config, dropout=0.1)), LoRAConfig(r=4))
    cfg = TrainConfig(
        **{**FAST, "device": "cuda", "max_iters": 150, "eval_interval": 50}, learning_rate=3e-3, lora_plus_ratio=4.0
    )
    eager, graphed, _, _ = train_twice(model, cfg)
    assert any("whole step captured" in n for n in graphed.notes), graphed.notes
    assert graphed.evals[-1]["val"] < graphed.evals[0]["val"] - 0.3  # it learns, with a fresh dropout mask per replay
    assert graphed.evals[-1]["val"] == pytest.approx(eager.evals[-1]["val"], abs=0.15)


@needs_cuda
def test_cuda_activation_checkpointing_trains_without_graphs_and_says_so(tiny_config):
    cfg = TrainConfig(**{**FAST, "device": "cuda"}, cuda_graphs=True, activation_checkpointing=True)
    res = train(GPT(tiny_config), tokens(), None, cfg, progress=False)
    assert any("activation checkpointing" in n for n in res.notes) and len(res.losses) == FAST["max_iters"]


class StandInGraphs:
    """torch.cuda's stream and graph calls as WholeStepGraph uses them, for a CPU: a "capture" runs the step in
    recording mode (the step registers what a replay recomputes) instead of running it, as a real capture does."""

    def __init__(self, fail=False):
        self.recording, self.fail, self.replays = False, fail, 0
        outer = self

        class Graph:
            def replay(self):
                outer.replays += 1
                for recompute in outer.recorded:
                    recompute()

        class Capture:
            def __init__(self, graph):
                pass

            def __enter__(self):
                outer.recording, outer.recorded = True, []

            def __exit__(self, *exc):
                outer.recording = False

        class Stream:
            def wait_stream(self, other):
                pass

        self.Graph, self.Capture, self.Stream = Graph, Capture, Stream

    def install(self, monkeypatch):
        from contextlib import nullcontext

        monkeypatch.setattr(torch.cuda, "CUDAGraph", self.Graph)
        monkeypatch.setattr(torch.cuda, "graph", self.Capture)
        monkeypatch.setattr(torch.cuda, "Stream", self.Stream)
        monkeypatch.setattr(torch.cuda, "stream", lambda s: nullcontext())
        monkeypatch.setattr(torch.cuda, "current_stream", self.Stream)
        monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)

    def step(self, log):
        """A step whose 'loss' is the batch's sum: eager steps compute it, a capture records how to."""

        def step(x, y):
            if not self.recording:
                log.append("eager")
                return x.sum()
            if self.fail:
                raise RuntimeError("operation not permitted when stream is capturing")
            log.append("captured")
            out = torch.zeros(())
            self.recorded.append(lambda: out.copy_(x.sum() + y.sum() * 0))  # reads the graph's input buffers
            return out

        return step


def test_warm_up_then_one_capture_then_replays_of_each_new_batch(tiny_config, monkeypatch):
    from lora_lab.graphs import WholeStepGraph

    fake, log, notes = StandInGraphs(), [], []
    fake.install(monkeypatch)
    optimizer = make_optimizer(GPT(tiny_config), TrainConfig(fused_optimizer=False))
    graphed = WholeStepGraph(fake.step(log), optimizer, notes)
    batches = [torch.full((2, 3), float(i)) for i in range(7)]
    losses = [graphed(x, x).item() for x in batches]
    assert losses == [6.0 * i for i in range(7)]  # every step saw its own batch, replays included
    assert log == ["eager"] * WARMUP_STEPS + ["captured"] and fake.replays == 7 - WARMUP_STEPS
    assert len(notes) == 1 and f"after {WARMUP_STEPS} eager warm-up steps" in notes[0]
    graphed.release()
    assert len(notes) == 1 and graphed.graph is None


def test_a_failed_capture_falls_back_to_eager_steps_with_a_note(tiny_config, monkeypatch):
    from lora_lab.graphs import WholeStepGraph

    fake, log, notes = StandInGraphs(fail=True), [], []
    fake.install(monkeypatch)
    optimizer = make_optimizer(GPT(tiny_config), TrainConfig(fused_optimizer=False))
    graphed = WholeStepGraph(fake.step(log), optimizer, notes)
    losses = [graphed(x, x).item() for x in (torch.full((2, 3), float(i)) for i in range(6))]
    assert losses == [6.0 * i for i in range(6)] and log == ["eager"] * 6 and fake.replays == 0
    assert len(notes) == 1 and notes[0].startswith("CUDA graph capture failed (RuntimeError")


def test_a_run_shorter_than_the_warm_up_says_nothing_was_captured(tiny_config, monkeypatch):
    from lora_lab.graphs import WholeStepGraph

    fake, notes = StandInGraphs(), []
    fake.install(monkeypatch)
    graphed = WholeStepGraph(fake.step([]), make_optimizer(GPT(tiny_config), TrainConfig()), notes)
    graphed(torch.ones(2, 3), torch.ones(2, 3))
    graphed.release()
    assert notes == [f"cuda_graphs: the run ended within its {WARMUP_STEPS} eager warm-up steps; nothing was captured."]

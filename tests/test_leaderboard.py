"""The variant leaderboard: budget-matched ranks, learning rates chosen on validation text by grids that extend at
their edges, paired seeds reported on a test text that selection never reads, verdicts, the cache and the files.
Runs on test_finetune's tiny synthetic base (and tiny_models' untrained GPT where only shapes matter)."""

import json
import math
import random
import sys
from dataclasses import replace

import pytest
from test_cli import base_args, run  # noqa: F401 (the CLI's quick cached base)
from test_finetune import setup  # noqa: F401 (the module-scoped synthetic base)
from tiny_models import tiny_gpt

from lora_lab import apply_lora
from lora_lab.experiments import estimator
from lora_lab.experiments.leaderboard import (
    LEADERBOARD_FORMAT,
    contestants,
    leaderboard,
    rank_for_budget,
    report_view,
    select_learning_rate,
    selection_view,
    target_shapes,
    write_leaderboard,
)
from lora_lab.experiments.stats import TooFewSeedsError, holm_adjust, paired_difference
from lora_lab.lora import VARIANTS, LoRAError, resolve_variant
from lora_lab.storage.files import OutputExistsError
from lora_lab.tasks import make_task

QUICK = dict(steps=4, eval_chars=64, max_extensions=1)
SEEDS = (0, 1, 2, 3, 4)

MY_VARIANT = '''
from lora_lab import LoRALinear


class FrozenA(LoRALinear):
    """LoRA whose random A stays frozen, so only B trains. Trainable parameters per layer: r*d"""

    variant = "frozen_a_test"
    parameter_formula = "r*d"

    @classmethod
    def parameter_count(cls, d, k, r):
        return r * d

    def __init__(self, base, r, alpha, dropout=0.0, init="gaussian", **options):
        super().__init__(base, r, alpha, dropout, init, **options)
        self.lora_A.requires_grad_(False)
'''


@pytest.fixture
def my_variant(tmp_path, monkeypatch):
    """A variant of one's own in an importable module, "my_lb_variants:FrozenA"; unregistered afterwards, so
    no other test sees it in VARIANTS."""
    (tmp_path / "my_lb_variants.py").write_text(MY_VARIANT)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_lb_variants:FrozenA"
    VARIANTS.pop("frozen_a_test", None)
    sys.modules.pop("my_lb_variants", None)


# ----------------------------------------------------------------------------------------------
# Budgets


def test_budget_matching_picks_the_largest_rank_within_budget_for_each_variant(my_variant):
    model = tiny_gpt()  # 2 blocks x q, k, v, o: eight 32 x 32 layers
    shapes = target_shapes(model, ("q_proj", "k_proj", "v_proj", "o_proj"))
    assert len(shapes) == 8 and set(shapes.values()) == {(32, 32)}
    field = {c.spec: c for c in contestants(model, ["lora", "dora", "vera", "full"], budget=2048)}
    # LoRA: 8 * r * (32 + 32) = 512 r -> r = 4 (2,048); DoRA: 512 r + 8 * 32 -> r = 3 (1,792; r = 4 is 2,304);
    # VeRA: 8 * (r + 32) -> any rank fits, so the largest the layers allow, 32, marked as capped (512 numbers).
    assert (field["lora"].lora.r, field["dora"].lora.r, field["vera"].lora.r) == (4, 3, 32)
    assert field["vera"].capped and not field["lora"].capped and field["full"].lora is None
    for spec, expected in (("lora", 2048), ("dora", 1792), ("vera", 512)):
        adapted = apply_lora(tiny_gpt(), field[spec].lora)
        assert adapted.num_parameters(trainable_only=True) == expected  # the formula is what the model trains
    assert rank_for_budget(resolve_variant("lora"), shapes, 2047) == (3, False)  # never above the budget
    with pytest.raises(ValueError, match="below what 'lora' trains at rank 1 \\(512 over 8 layers\\)"):
        rank_for_budget(resolve_variant("lora"), shapes, 300)
    # a variant of one's own, by import path, is sized by its own parameter_count: 8 * 32 r <= 1000 -> r = 3
    (mine,) = contestants(model, [my_variant], budget=1000)
    assert mine.lora.variant == "frozen_a_test" and mine.lora.r == 3
    assert apply_lora(tiny_gpt(), mine.lora).num_parameters(trainable_only=True) == 768
    # equal rank: every variant at the rank given
    assert {c.lora.r for c in contestants(model, ["lora", "dora", "vera"], rank=2)} == {2}


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(methods=["lora"], budget=2048, rank=2), ValueError, "either budget .* or rank"),
        (dict(methods=["lora"]), ValueError, "either budget .* or rank"),
        (dict(methods=["lora", "lora"], rank=2), ValueError, "named twice"),
        (dict(methods=["nosuch"], rank=2), LoRAError, "Unknown LoRA variant 'nosuch'"),
        (dict(methods=["lora"], rank=64), LoRAError, "exceeds min\\(d, k\\)"),
        (dict(methods=["lora"], rank=2, learning_rates={"dora": [1e-3]}), ValueError, "not among the methods"),
        (dict(methods=["lora"], rank=2, learning_rates={"lora": [1e-3, -1.0]}), ValueError, "positive finite"),
    ],
)
def test_bad_methods_are_refused_before_anything_runs(kwargs, error, message):
    with pytest.raises(error, match=message):
        contestants(tiny_gpt(), **kwargs)


# ----------------------------------------------------------------------------------------------
# Learning-rate grids


def bowl(best: float):
    """A cheap scorer: a loss that is lowest at `best`, quadratic in log2(lr). Records the rates it is asked."""
    asked = []

    def score(lr):
        asked.append(lr)
        return 1.0 + math.log2(lr / best) ** 2

    return score, asked


def test_a_grid_extends_at_its_edge_until_the_best_is_inside_and_shows_the_neighbours():
    score, asked = bowl(0.05)
    sel = select_learning_rate(score, (1e-3, 2e-3, 4e-3), max_extensions=6)
    # up from 4e-3 in factor-2 steps: 8e-3, 1.6e-2, 3.2e-2, 6.4e-2 (best), 0.128 (worse: the best is inside)
    assert sorted(asked) == pytest.approx([1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2, 6.4e-2, 0.128])
    assert sel.chosen == pytest.approx(0.064) and sel.extended == 5 and not sel.at_edge
    assert sel.neighbours() == (pytest.approx(0.032), pytest.approx(0.128))
    text = sel.describe()
    assert (
        f"0.064 -> {1 + math.log2(0.064 / 0.05) ** 2:.4f} [chosen]" in text
        and "below 0.032: +" in text
        and "above 0.128: +" in text
    )
    assert "grid extended by 5 factor-2 step(s)" in text and "widen" not in text
    # downwards too, and each rate is scored once
    score, asked = bowl(1e-4)
    sel = select_learning_rate(score, (1e-3, 2e-3), max_extensions=6)
    assert sel.chosen == pytest.approx(1.25e-4) and len(asked) == len(set(asked)) == 6 and not sel.at_edge


def test_extensions_are_bounded_and_the_edge_is_said():
    score, asked = bowl(100.0)
    sel = select_learning_rate(score, (1e-3, 2e-3), max_extensions=3)
    assert sel.extended == 3 and len(asked) == 5 and sel.at_edge and sel.chosen == pytest.approx(0.016)
    assert "still at the grid's edge after the extensions: widen the grid" in sel.describe()
    # a one-rate grid is a choice already made: not extended
    score, asked = bowl(100.0)
    assert select_learning_rate(score, (1e-3,)).extended == 0 and len(asked) == 1
    # a diverged rate counts as the worst, and all diverged is an error
    sel = select_learning_rate(lambda lr: math.nan if lr > 3e-3 else lr, (1e-3, 2e-3, 4e-3), max_extensions=0)
    assert sel.chosen == 1e-3 and sel.scores[4e-3] == math.inf
    with pytest.raises(RuntimeError, match="diverged"):
        select_learning_rate(lambda lr: math.inf, (1e-3, 2e-3))


# ----------------------------------------------------------------------------------------------
# Selection never reads the test text


def poisoned(task):
    """The task with its test texts replaced by garbage of the same characters (a shuffled copy)."""
    rng = random.Random(0)

    def shuffle(text):
        chars = list(text)
        rng.shuffle(chars)
        return "".join(chars)

    return replace(task, test=shuffle(task.test), source_test=shuffle(task.source_test))


def test_selection_never_reads_the_test_split(setup, monkeypatch):
    base, tokenizer, splits = setup
    clean = make_task("rot13", splits)
    dirty = poisoned(clean)
    assert selection_view(dirty).test is None and selection_view(dirty).source_test is None
    assert report_view(dirty).validation == dirty.test  # reports score the test text
    test_texts = {tuple(tokenizer.encode(t[:65])) for t in (dirty.test, dirty.source_test)}
    seen = []
    real = estimator.split_scores

    def watched(model, tokens, eval_chars=None, device="cpu"):
        seen.append("test" if tuple(tokens[:65].tolist()) in test_texts else "other")
        return real(model, tokens, eval_chars, device)

    monkeypatch.setattr(estimator, "split_scores", watched)
    args = dict(methods=["lora", "full"], rank=2, seeds=SEEDS, cache=False, **QUICK)
    grids = {"lora": (4e-3, 8e-3), "full": (1e-3, 2e-3)}
    board = leaderboard(base, dirty, tokenizer, learning_rates=grids, **args)
    first_test = seen.index("test")
    assert "test" not in seen[:first_test] and "other" not in seen[first_test:]  # every choice made before
    assert seen.count("other") >= 2 * 2 * 2  # >= 2 rates x 2 methods, each scored on target and source
    monkeypatch.setattr(estimator, "split_scores", real)
    again = leaderboard(base, clean, tokenizer, learning_rates=grids, **args)
    # the test text changed everything reported and nothing chosen
    assert [s.selection for s in again.standings] == [s.selection for s in board.standings]
    assert [s.values() for s in again.standings] != [s.values() for s in board.standings]
    # romeo_juliet has no test text: refused before anything is trained
    with pytest.raises(ValueError, match="has no test text"):
        leaderboard(base, make_task("romeo_juliet", splits), tokenizer, learning_rates=grids, **args)


# ----------------------------------------------------------------------------------------------
# The whole leaderboard: verdicts, cache, resume, files


def test_a_leaderboard_is_paired_cached_resumable_and_written(setup, tmp_path):
    base, tokenizer, splits = setup
    task = make_task("shout", splits)
    cache = tmp_path / "cache"
    grids = {"lora": (8e-3,), "vera": (0.05,), "full": (2e-3,)}
    args = dict(methods=["lora", "vera", "full"], budget=2048, seeds=SEEDS, cache=cache, learning_rates=grids, **QUICK)
    calls = []

    def stop_after_four(line):
        calls.append(line)
        if len(calls) == 4:
            raise KeyboardInterrupt  # an interrupted leaderboard: the runs made so far are on disk

    with pytest.raises(KeyboardInterrupt):
        leaderboard(base, task, tokenizer, log=stop_after_four, **args)
    board = leaderboard(base, task, tokenizer, **args)
    cached = [r["from_cache"] for r in board.record["runs"]]
    assert cached[:4] == [True] * 4 and not any(cached[4:])  # it continued where it stopped
    assert len(cached) == 3 + 3 * len(SEEDS)  # one rate each on validation, then every seed on test
    again = leaderboard(base, task, tokenizer, **args)
    assert all(r["from_cache"] for r in again.record["runs"]) and again.rows() == board.rows()

    rows = {r["method"]: r for r in board.rows()}
    assert set(rows) == {"LoRA r=4", "vera r=32", "full FT"} and board.reference == "LoRA r=4"
    assert rows["vera r=32"]["rank_capped"] and rows["LoRA r=4"]["trainable"] == 2048
    assert all(r["memory_bytes"] > r["activation_bytes"] > 0 for r in rows.values())
    assert rows["full FT"]["memory_bytes"] > rows["LoRA r=4"]["memory_bytes"]  # AdamW state for every weight
    # verdicts: paired differences against the first method, Holm-adjusted across the two calls
    ref = board.standings[0].values()
    diffs = [paired_difference(s.values(), ref) for s in board.standings[1:]]
    assert [v.adjusted_p for v in board.verdicts] == pytest.approx(holm_adjust([d.p_value for d in diffs]))
    assert all("5 paired seeds; Holm-adjusted p = " in v.sentence for v in board.verdicts)
    text = board.to_text()
    assert "Real differences (" in text and "chosen on the validation text with seed 1000" in text

    files = write_leaderboard(board, tmp_path / "out")
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == [
        ".lora_lab_output.json", "leaderboard.csv", "leaderboard.json", "leaderboard.md", "quality_vs_memory.png",
        "reproducibility.json",
    ]  # fmt: skip
    assert files["png"].read_bytes()[:4] == b"\x89PNG"
    assert len(files["csv"].read_text().splitlines()) == 4
    record = json.loads(files["record"].read_text())
    assert record["seeds"] == list(SEEDS) and record["selection_seed"] == 1000 and record["command"]
    assert record["versions"]["torch"] and record["machine"]["cpu"] and "gpu" in record["machine"]
    assert all(r["seconds"] > 0 for r in record["runs"]) and set(record["configs"]) == set(rows)
    assert json.loads(files["json"].read_text())["verdicts"][0]["sentence"] == board.verdicts[0].sentence
    write_leaderboard(again, tmp_path / "out")  # an earlier leaderboard's folder may be written again
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError):
        write_leaderboard(board, tmp_path / "mine")
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]
    assert json.loads((tmp_path / "out" / ".lora_lab_output.json").read_text())["format"] == LEADERBOARD_FORMAT


def test_too_few_seeds_or_a_reported_selection_seed_are_refused(setup):
    base, tokenizer, splits = setup
    task = make_task("shout", splits)
    with pytest.raises(TooFewSeedsError, match="at least MIN_SEEDS = 5"):
        leaderboard(base, task, tokenizer, ["lora"], rank=2, seeds=(0, 1, 2))
    with pytest.raises(ValueError, match="selection_seed 3 is one of the reported seeds"):
        leaderboard(base, task, tokenizer, ["lora"], rank=2, selection_seed=3)
    with pytest.raises(ValueError, match="reference must be 'first' or 'best'"):
        leaderboard(base, task, tokenizer, ["lora"], rank=2, reference="worst")


# ----------------------------------------------------------------------------------------------
# The command line: lora-lab compare --methods ...


def test_compare_with_methods_runs_the_leaderboard_and_says_which_differences_are_real(
    capsys, base_args, my_variant, tmp_path
):
    out_dir = tmp_path / "board"
    argv = [
        "compare", *base_args, "--methods", f"lora,{my_variant},full", "--budget", "16384", "--steps", "2",
        "--eval-chars", "64", "--grid", "lora=0.01", "--grid", f"{my_variant}=0.01", "--grid", "full=0.002",
        "--max-extensions", "0", "--task", "shout", "--out", out_dir,
    ]  # fmt: skip
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    # the tiny preset: 16 layers of 128 x 128; LoRA 16 * 256 r <= 16,384 -> r = 4; FrozenA 16 * 128 r -> r = 8
    assert "| LoRA r=4 (ref) " in out and "| frozen_a_test r=8 " in out and "| full FT " in out
    assert "Real differences (" in out and out.count("5 paired seeds; Holm-adjusted p = ") == 2
    record = json.loads((out_dir / "reproducibility.json").read_text())
    assert record["command"].startswith("lora-lab compare --data ") and "--budget 16384" in record["command"]
    assert len(record["runs"]) == 3 + 3 * 5 and not any(r["from_cache"] for r in record["runs"])
    table = (out_dir / "leaderboard.csv").read_text()
    code, out, err = run(capsys, *argv)  # a second call: every run from the cache, the same table
    assert code == 0 and (out_dir / "leaderboard.csv").read_text() == table
    assert all(r["from_cache"] for r in json.loads((out_dir / "reproducibility.json").read_text())["runs"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--budget", "100"], "--budget does not apply without --methods"),
        (["--seeds", "7"], "--seeds does not apply without --methods"),
        (["--methods", "lora"], "--methods needs --budget N"),
        (["--methods", "lora", "--budget", "10", "--rank", "2"], "--budget and --rank exclude each other"),
        (["--methods", "lora,nosuch", "--rank", "2"], "Unknown LoRA variant 'nosuch'"),
        (["--methods", "lora", "--rank", "2", "--sweep"], "--sweep does not apply with --methods"),
        (["--methods", "lora", "--rank", "2", "--seeds", "3"], "at least MIN_SEEDS = 5"),
        (["--methods", "lora", "--rank", "2", "--selection-seed", "2"], "selection_seed 2 is one of the reported"),
        (["--methods", "lora", "--budget", "10"], "below what 'lora' trains at rank 1"),
        (["--methods", "lora", "--rank", "2", "--grid", "dora=0.1"], "not among the methods"),
        (["--methods", "lora", "--rank", "2", "--grid", "lora"], "expected METHOD=R1,R2"),
        (["--methods", "lora", "--rank", "500"], "exceeds min(d, k)"),
    ],
)
def test_leaderboard_options_are_checked_before_any_work(capsys, tmp_path, argv, message):
    out_dir = tmp_path / "board"
    code, out, err = run(capsys, "compare", *argv, "--out", out_dir, "--cache", tmp_path / "c", "--data", tmp_path)
    assert code == 2 and out == "" and err.count("\n") == 1 and message in err, err
    assert not out_dir.exists() and not (tmp_path / "c").exists()


def test_tasks_carry_the_datasets_test_split_as_their_test_text(setup):
    _, _, splits = setup
    rot13, shout = make_task("rot13", splits), make_task("shout", splits)
    assert rot13.source_test == shout.source_test == splits["test"]
    assert shout.test == splits["test"].upper() and rot13.test != splits["test"]
    assert make_task("romeo_juliet", splits).test is None  # the held-out play has no third part
    assert make_task("rot13", {k: splits[k] for k in ("train", "validation")}).test is None  # no test split given
    with pytest.raises(ValueError, match="give both test and source_test, or neither"):
        replace(rot13, source_test=None)
    with pytest.raises(ValueError, match="its test text is empty"):
        replace(rot13, test="")

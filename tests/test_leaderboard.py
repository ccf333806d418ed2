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
    ALPHA_FACTORS,
    LEADERBOARD_FORMAT,
    RATIO_GRID,
    check_leaderboard_output,
    contestants,
    leaderboard,
    rank_for_budget,
    report_view,
    select_learning_rate,
    select_setting,
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
    # LoRA's alpha and LoRA+'s ratio are chosen on validation too: rslora and lora+ switch both searches on
    args = dict(methods=["lora", "rslora", "lora+", "full"], rank=2, seeds=SEEDS, cache=False, **QUICK)
    args |= dict(alpha_grid=(16.0,), ratio_grid=(2.0, 8.0))
    grids = {"lora": (4e-3, 8e-3), "rslora": (4e-3, 8e-3), "lora+": (4e-3, 8e-3), "full": (1e-3, 2e-3)}
    board = leaderboard(base, dirty, tokenizer, learning_rates=grids, **args)
    first_test = seen.index("test")
    assert "test" not in seen[:first_test] and "other" not in seen[first_test:]  # every choice made before
    # >= 2 rates x (2 alphas + 1 + 2 ratios + 1), each scored on target and source
    assert seen.count("other") >= 2 * 6 * 2
    assert [len(s.knob.sweeps) for s in board.standings if s.knob] == [2, 2]
    monkeypatch.setattr(estimator, "split_scores", real)
    again = leaderboard(base, clean, tokenizer, learning_rates=grids, **args)
    # the test text changed everything reported and nothing chosen: rates, alphas and ratios alike
    assert [(s.selection, s.knob) for s in again.standings] == [(s.selection, s.knob) for s in board.standings]
    assert [s.values() for s in again.standings] != [s.values() for s in board.standings]
    # romeo_juliet has no test text: refused before anything is trained
    with pytest.raises(ValueError, match="has no test text"):
        leaderboard(base, make_task("romeo_juliet", splits), tokenizer, learning_rates=grids, **args)


# ----------------------------------------------------------------------------------------------
# LoRA's alpha and LoRA+'s ratio, chosen on validation with the learning rate


def test_alpha_is_searched_whenever_rslora_or_lora_plus_is_compared_and_the_grid_holds_alpha_sqrt_r():
    model = tiny_gpt()
    for rank in (2, 4):
        lora, rs = contestants(model, ["lora", "rslora"], rank=rank)
        expected = sorted({16.0 * f for f in ALPHA_FACTORS} | {16.0 * math.sqrt(rank)})
        assert lora.knob == "alpha" and list(lora.knob_values) == expected and 16.0 * math.sqrt(rank) in expected
        assert rs.knob is None and rs.lora.alpha == 16.0  # rsLoRA keeps the leaderboard's alpha
    # a given alpha grid is used, always with alpha and alpha * sqrt(r), the LoRA that is rsLoRA at this rank
    (lora, plus) = contestants(model, ["lora", "lora+"], budget=2048, alpha_grid=(4.0,))
    assert lora.knob_values == (4.0, 16.0, 32.0) and lora.lora.r == plus.lora.r == 4  # LoRA+ trains LoRA's numbers
    assert plus.knob == "lora_plus_ratio" and plus.knob_values == RATIO_GRID and plus.label == "LoRA+ r=4"
    assert plus.lora.variant == "lora" and plus.at(8.0).train_overrides() == {"lora_plus_ratio": 8.0}
    assert lora.at(32.0).lora.alpha == 32.0 and lora.lora.alpha == 16.0
    # no rsLoRA, no LoRA+: LoRA's alpha stays as given, unless asked for
    assert contestants(model, ["lora", "dora"], rank=2)[0].knob is None
    assert contestants(model, ["lora", "dora"], rank=2, tune_alpha=True)[0].knob == "alpha"
    assert contestants(model, ["lora", "rslora"], rank=2, tune_alpha=False)[0].knob is None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(methods=["dora"], tune_alpha=True), "tunes plain 'lora', which is not among the methods"),
        (dict(methods=["lora"], tune_alpha="yes"), "tune_alpha must be 'auto', True or False"),
        (dict(methods=["lora"], alpha_grid=(8.0,), tune_alpha=False), "alpha grid was given with tune_alpha=False"),
        (dict(methods=["lora"], ratio_grid=(4.0,)), "'lora\\+' is not among the methods"),
        (dict(methods=["lora+"], ratio_grid=(4.0, -1.0)), "LoRA\\+ ratio grid is a non-empty list of positive"),
        (dict(methods=["lora", "rslora"], alpha_grid=(8.0, 8.0)), "alpha grid lists a value twice"),
        (dict(methods=["lora+"], ratio_grid=(1e36,), learning_rates={"lora+": (1e3,)}), "beyond float32"),
    ],
)
def test_bad_knob_grids_are_refused_before_anything_runs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        contestants(tiny_gpt(), rank=2, **kwargs)


def test_the_knob_search_runs_a_rate_search_per_value_and_keeps_the_best():
    asked = []

    def score(ratio, lr):  # lowest at ratio 8 and rate 0.01, quadratic in the logs
        asked.append((ratio, lr))
        return 1.0 + math.log2(ratio / 8) ** 2 + math.log2(lr / 0.01) ** 2

    found = select_setting(score, "lora_plus_ratio", (16, 2, 4, 8), (4e-3, 8e-3, 1.6e-2), max_extensions=2)
    assert found.chosen == 8 and list(found.sweeps) == [2, 4, 8, 16]
    assert found.chosen == min(found.scores, key=found.scores.get)  # the best validation loss of all settings
    assert found.sweeps[8].chosen == 8e-3 and found.runs == len(asked) == 4 * 3  # the rate was inside: no extension
    assert found.runs <= 4 * (3 + 2)  # the bound the docs state
    assert found.neighbours() == (4, 16)
    text = found.describe()
    assert "LoRA+ ratio 2 (lr 0.008) -> " in text and f"8 (lr 0.008) -> {1 + math.log2(0.8) ** 2:.4f} [chosen]" in text
    assert "below 4: +" in text and "above 16: +" in text and "12 selection runs" in text
    assert found.to_dict()["scores"]["8"] == found.scores[8] and found.to_dict()["sweeps"]["2"]["chosen"] == 8e-3
    with pytest.raises(ValueError, match="knob must be one of"):
        select_setting(score, "dropout", (0.1,), (1e-3,))


def test_lora_at_alpha_sqrt_r_is_rslora_to_the_bit_and_the_chosen_alpha_is_reported(setup, tmp_path):
    base, tokenizer, splits = setup
    task = make_task("shout", splits)
    rate = (8e-3,)
    board = leaderboard(
        base, task, tokenizer, ["lora", "rslora"], rank=4, alpha_grid=(16.0,), seeds=SEEDS, cache=False,
        learning_rates={"lora": rate, "rslora": rate}, **QUICK,
    )  # fmt: skip
    lora, rs = board.standings
    # at r = 4, alpha 32 scales by 32 / 4 = 8 = 16 / sqrt(4): the same seed, batches and init give the same bits
    assert list(lora.knob.sweeps) == [16.0, 32.0]
    assert lora.knob.sweeps[32.0].scores[8e-3] == rs.selection.scores[8e-3]
    assert lora.knob.sweeps[16.0].scores[8e-3] != rs.selection.scores[8e-3]  # and alpha matters
    if lora.knob.chosen == 32.0:
        assert lora.values() == rs.values()
    chosen = lora.knob.chosen
    assert lora.contestant.lora.alpha == chosen and lora.selection == lora.knob.sweeps[chosen]
    row = {r["method"]: r for r in board.rows()}["LoRA r=4"]
    assert row["alpha"] == chosen and row["tuned"] == "alpha"
    assert f"| alpha {chosen:g} " in board.table()
    (line,) = board.sections()["alpha and LoRA+ ratio (validation)"]
    assert line.startswith("LoRA r=4: alpha 16 (lr 0.008) -> ") and f"{chosen:g} (lr 0.008) -> " in line
    assert "[chosen]" in line and "neighbours vs chosen: " in line and "2 selection runs" in line
    assert "Alpha and LoRA+ ratio (validation):" in board.to_text()
    files = write_leaderboard(board, tmp_path / "out")
    record = json.loads(files["record"].read_text())
    assert record["configs"]["LoRA r=4"]["lora"]["alpha"] == chosen
    assert record["configs"]["LoRA r=4"]["tuned"]["scores"] == {
        "16": lora.knob.scores[16.0],
        "32": lora.knob.scores[32.0],
    }
    assert record["configs"]["rslora r=4"]["tuned"] is None
    assert [r["alpha"] for r in record["runs"] if r["method"] == "LoRA r=4"][:2] == [16.0, 32.0]
    shown = json.loads(files["json"].read_text())["methods"][0]
    assert shown["tuned"]["chosen"] == chosen and shown["lora"]["alpha"] == chosen
    assert "alpha,lora_plus_ratio,tuned" in files["csv"].read_text().splitlines()[0]


def test_lora_plus_chooses_its_ratio_by_the_best_validation_loss_and_caches_each_ratio(setup, tmp_path):
    base, tokenizer, splits = setup
    task = make_task("rot13", splits)
    args = dict(seeds=SEEDS, cache=tmp_path / "cache", tune_alpha=False, **QUICK)
    grids = {"lora": (8e-3,), "lora+": (2e-3, 4e-3)}
    board = leaderboard(
        base, task, tokenizer, ["lora", "lora+"], rank=2, learning_rates=grids, ratio_grid=(1, 16), **args
    )
    lora, plus = board.standings
    assert lora.knob is None and plus.knob.knob == "lora_plus_ratio"
    best = {v: min(sel.scores.values()) for v, sel in plus.knob.sweeps.items()}
    assert plus.knob.chosen == min(best, key=best.get) and plus.contestant.lora_plus_ratio == plus.knob.chosen
    assert plus.selection.chosen == min(plus.selection.scores, key=plus.selection.scores.get)
    assert best[1.0] != best[16.0]  # the ratio is in the run: B's rate changes the numbers
    record = board.record
    assert record["configs"]["LoRA+ r=2"]["train"]["lora_plus_ratio"] == plus.knob.chosen
    assert record["configs"]["LoRA r=2"]["train"]["lora_plus_ratio"] is None
    tried = {(r["lora_plus_ratio"], r["learning_rate"]) for r in record["runs"] if r["method"] == "LoRA+ r=2"}
    assert {(1.0, 2e-3), (16.0, 2e-3)} <= tried
    # each ratio is its own cached run: a second call is all cache hits with the same choice
    again = leaderboard(
        base, task, tokenizer, ["lora", "lora+"], rank=2, learning_rates=grids, ratio_grid=(1, 16), **args
    )
    assert all(r["from_cache"] for r in again.record["runs"]) and again.standings[1].knob == plus.knob
    with pytest.raises(ValueError, match="chooses its own ratio"):
        leaderboard(base, task, tokenizer, ["lora+"], rank=2, train_overrides={"lora_plus_ratio": 4.0}, **args)


def test_claimed_folders_are_refused_in_the_name_of_the_public_writer():
    with pytest.raises(ValueError, match="^write_leaderboard: the path is empty"):
        check_leaderboard_output("")


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


def test_compare_ranks_lora_rslora_and_lora_plus_with_alpha_and_ratio_chosen(capsys, base_args, tmp_path):
    out_dir = tmp_path / "board"
    argv = [
        "compare", *base_args, "--methods", "lora,rslora,lora+", "--rank", "2", "--steps", "2", "--eval-chars", "64",
        "--grid", "lora=0.01", "--grid", "rslora=0.01", "--grid", "lora+=0.01", "--alpha-grid", "16",
        "--ratio-grid", "16", "--max-extensions", "0", "--task", "shout", "--out", out_dir,
    ]  # fmt: skip
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    assert "| LoRA r=2 (ref) " in out and "| rslora r=2 " in out and "| LoRA+ r=2 " in out
    assert "Alpha and LoRA+ ratio (validation):" in out and "LoRA+ ratio 16 (lr 0.01) -> " in out
    record = json.loads((out_dir / "reproducibility.json").read_text())
    assert "--alpha-grid 16" in record["command"]
    assert len(record["configs"]["LoRA r=2"]["tuned"]["sweeps"]) == 2  # 16 and 16 * sqrt(2)
    assert record["configs"]["LoRA+ r=2"]["train"]["lora_plus_ratio"] == 16.0
    assert len(record["runs"]) == (2 + 1 + 1) + 3 * 5  # the selection runs, then every seed on test


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
        (["--methods", "lora", "--budget", str(2**31 + 1)], "--budget: must be an integer from 1 to 2,147,483,648"),
        (["--methods", "lora,rslora", "--rank", "2", "--alpha-grid", "0"], "argument --alpha-grid: must be a number"),
        (["--methods", "lora,rslora", "--rank", "2", "--alpha-grid", "8,,4"], "--alpha-grid: expected numbers"),
        (["--methods", "lora+", "--rank", "2", "--ratio-grid", "4,4"], "--ratio-grid: lists a value twice"),
        (["--methods", "lora+", "--rank", "2", "--ratio-grid", "inf"], "--ratio-grid: must be a number from"),
        (["--methods", "lora", "--rank", "2", "--ratio-grid", "4"], "'lora+' is not among the methods"),
        (["--methods", "dora", "--rank", "2", "--alpha-grid", "8"], "tunes plain 'lora', which is not among"),
        (["--alpha-grid", "8"], "--alpha-grid does not apply without --methods"),
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


def test_a_leaderboard_side_by_side_gives_the_numbers_of_one_process(setup, tmp_path):
    from lora_lab.experiments.parallel import default_workers

    base, tokenizer, splits = setup
    task = make_task("rot13", splits)
    args = dict(methods=["lora", "full"], rank=2, seeds=SEEDS, learning_rates={"lora": (4e-3, 8e-3), "full": (1e-3,)})
    two = leaderboard(base, task, tokenizer, cache=tmp_path / "two", workers=min(2, default_workers()), **args, **QUICK)
    one = leaderboard(base, task, tokenizer, cache=tmp_path / "one", workers=1, **args, **QUICK)
    assert [s.selection for s in two.standings] == [s.selection for s in one.standings]
    assert [s.values() for s in two.standings] == [s.values() for s in one.standings]
    assert sum(not r["from_cache"] for r in two.record["runs"]) < len(two.record["runs"])  # prefetched, then read

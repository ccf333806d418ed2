"""Chapter 11's lab: budgets matched exactly, the protocol's arms (rates chosen on validation text that never sees the
test split, paired seeds), runs trained side by side equal to runs trained in turn, and each section's reading on
constructed results with a known answer. Runs on test_finetune's tiny synthetic base."""

import math
from dataclasses import replace

import pytest
from test_cli import run  # noqa: F401
from test_finetune import setup  # noqa: F401 (the module-scoped synthetic base)
from test_leaderboard import poisoned
from tiny_models import tiny_gpt

from lora_lab import apply_lora
from lora_lab.experiments import estimator
from lora_lab.experiments import placement_lab as pl
from lora_lab.experiments.leaderboard import Selection
from lora_lab.experiments.parallel import Prefetcher, RunRequest, check_workers, default_workers, missing_runs
from lora_lab.experiments.protocol import protocol_train_config
from lora_lab.experiments.runs import Run, model_digest
from lora_lab.experiments.stats import holm_adjust, paired_difference
from lora_lab.storage.files import OutputExistsError
from lora_lab.tasks import make_task

SEEDS = (0, 1, 2, 3, 4)


def trained_numbers(model, arm) -> int:
    return apply_lora(model.__class__(model.config), arm.lora).num_parameters(trainable_only=True)


# ----------------------------------------------------------------------------------------------
# Budgets


def test_every_placement_arm_trains_exactly_the_budget():
    model = tiny_gpt()  # 2 blocks, width 32, MLP 128: per rank Wq 128, a pair or a half 256, all four 512, MLP 640
    budget = pl.placement_budget(model, budget_rank=8)
    assert budget == 2560  # lcm(128, 256, 512, 640) = 2560 >= Wq at r = 8 (1,024)
    arms = pl.placement_arms(model, budget)
    assert [a.label for a in arms] == [
        "Wq r=20", "Wk r=20", "Wv r=20", "Wo r=20", "Wq,Wk r=10", "Wq,Wv r=10", "Wq,Wk,Wv,Wo r=5", "W_up,W_down r=4",
        "front half Wq,Wk,Wv,Wo r=10", "back half Wq,Wk,Wv,Wo r=10",
    ]  # fmt: skip
    counts = {a.label: trained_numbers(model, a) for a in arms}
    assert set(counts.values()) == {budget}, counts
    assert arms[-2].lora.targets == tuple(f"blocks.0.attn.{t}" for t in pl.ATTENTION)
    assert arms[-1].lora.targets == tuple(f"blocks.1.attn.{t}" for t in pl.ATTENTION)
    kept = pl.placement_arms(model, budget, types=[("q_proj",), ("q_proj", "v_proj")])
    assert [a.label for a in kept][:3] == ["Wq r=20", "Wq,Wv r=10", "Wq,Wk,Wv,Wo r=5"] and len(kept) == 6


def test_a_budget_no_rank_meets_exactly_is_refused_by_name():
    model = tiny_gpt()
    with pytest.raises(ValueError, match=r"No rank trains exactly 100 numbers on Wq \(128 per rank\)"):
        pl.matched_rank(model, ("q_proj",), 100)


def test_halves_of_the_blocks_leave_the_middle_out_when_the_depth_is_odd():
    model = tiny_gpt(replace(tiny_gpt().config, n_layer=3))
    assert pl.half_targets(model, "front", ("q_proj",)) == ("blocks.0.attn.q_proj",)
    assert pl.half_targets(model, "back", ("q_proj",)) == ("blocks.2.attn.q_proj",)
    with pytest.raises(ValueError, match="part 'front' or 'back'"):
        pl.half_targets(model, "middle")


# ----------------------------------------------------------------------------------------------
# Readings on constructed results


def fake_run(label, seed, target, source=2.0, curve=None) -> Run:
    curve = curve or [{"step": 0, "target": 3.0, "target_accuracy": 0.1, "source": 1.0},
                      {"step": 10, "target": target, "target_accuracy": 0.5, "source": source}]  # fmt: skip
    return Run(label, 1e-3, seed, curve, {}, 100, 0.0)


def fake_arm(label, targets_by_seed, sources=None, r=1, targets=("q_proj", "v_proj")) -> pl.ArmResult:
    arm = pl.lora_arm(targets, r, label=label)
    sources = sources or [2.0] * len(targets_by_seed)
    runs = [fake_run(label, i, t, s) for i, (t, s) in enumerate(zip(targets_by_seed, sources))]
    return pl.ArmResult(arm, Selection({1e-3: 1.0}, 1e-3, 0, False), runs)


NOISE = [0.001, -0.002, 0.0015, -0.0005, 0.0]


def test_the_rank_table_calls_flat_when_rank_1_matches_and_not_when_it_lags():
    ranks = (1, 8)
    flat = {"Wq,Wv r=1": fake_arm("Wq,Wv r=1", [2.0 + n for n in NOISE]),
            "Wq,Wv r=8": fake_arm("Wq,Wv r=8", [2.0 - n for n in NOISE])}  # fmt: skip
    rows = pl.rank_rows(flat, [("q_proj", "v_proj")], ranks)
    assert rows[0]["targets"] == "Wq,Wv" and not rows[0]["real"]
    assert pl.rank_findings(rows, ranks, base_loss=3.0, full_loss=1.9)["verdict"] == "reproduced"
    steep = {**flat, "Wq,Wv r=1": fake_arm("Wq,Wv r=1", [2.5 + n for n in NOISE])}
    rows = pl.rank_rows(steep, [("q_proj", "v_proj")], ranks)
    assert rows[0]["best r"] == 8 and rows[0]["real"] and rows[0]["r=1 - best"] == pytest.approx(0.5)
    found = pl.rank_findings(rows, ranks, base_loss=3.0, full_loss=1.9)
    assert found["verdict"] == "not reproduced" and "50%" in found["ours"]  # r = 1 closes 0.5 of the 1.0 gap


def test_paired_calls_adjust_across_the_table():
    results = {"a": fake_arm("a", [2.0 + n for n in NOISE]), "b": fake_arm("b", [2.0 + n / 2 for n in NOISE]),
               "c": fake_arm("c", [1.8 + n for n in NOISE])}  # fmt: skip
    calls = pl.paired_calls(results, [("a", "b"), ("c", "b")])
    assert not calls[0]["real"] and calls[1]["real"] and calls[1]["a - b"] == pytest.approx(-0.2, abs=1e-3)
    raw = [paired_difference(results[x].values(), results["b"].values()).p_value for x in ("a", "c")]
    assert [c["holm p"] for c in calls] == holm_adjust(raw) and "c is lower than b" in calls[1]["sentence"]
    assert calls[0]["sentence"].startswith("No detectable difference")


def test_source_loss_at_a_matched_target_loss_is_interpolated_along_the_curve():
    curve = [{"step": 0, "target": 3.0, "source": 1.0}, {"step": 5, "target": 2.0, "source": 1.5},
             {"step": 10, "target": 1.0, "source": 2.5}]  # fmt: skip
    assert pl.source_at_target(curve, 2.0) == 1.5
    assert pl.source_at_target(curve, 1.5) == pytest.approx(2.0)  # halfway along the second segment
    assert pl.source_at_target(curve, 2.5) == pytest.approx(1.25)
    assert math.isnan(pl.source_at_target(curve, 0.5))  # never reached
    assert pl.source_at_target(curve, 3.5) == 1.0  # reached before training: the base


def test_forgetting_at_matched_learning_names_the_arm_that_forgets_less():
    def arm(label, final_source, noise=NOISE, final_target=1.0):
        a = fake_arm(label, [final_target] * 5)
        for i, trained in enumerate(a.runs):
            trained.curve = [{"step": 0, "target": 3.0, "target_accuracy": 0.1, "source": 1.0},
                         {"step": 10, "target": final_target, "target_accuracy": 0.5,
                          "source": final_source + noise[i]}]  # fmt: skip
        return a

    results = {"full FT": arm("full FT", 3.0), "LoRA": arm("LoRA", 2.0), "same": arm("same", 3.0, NOISE[::-1])}
    level, rows = pl.forgetting_rows(results, ["full FT", "LoRA", "same"])
    assert level == 1.0
    by = {r["arm"]: r for r in rows}
    assert by["LoRA"]["real"] and by["LoRA"]["minus full FT"] == pytest.approx(-1.0)
    assert not by["same"]["real"]
    found = pl.forgetting_findings(level, rows)
    assert found["verdict"] == "partly" and "1 of 2 LoRA arms forget detectably less" in found["ours"]


def test_rate_findings_read_the_rate_ratio_and_the_scalings():
    rows = [{"r": 2, "LoRA best lr": 4e-3, "rsLoRA best lr": 8e-3, "LoRA loss at lr=0.008": 2.0,
             "rsLoRA loss at lr=0.008": 2.0},
            {"r": 32, "LoRA best lr": 3.2e-2, "rsLoRA best lr": 8e-3, "LoRA loss at lr=0.008": 2.3,
             "rsLoRA loss at lr=0.008": 1.95}]  # fmt: skip
    ratio, scaling = pl.rate_findings(8.0, rows, 8e-3)
    assert ratio["verdict"] == "reproduced" and scaling["verdict"] == "reproduced"
    assert "moves 3 factor-2 steps under alpha / r, 0 under alpha / sqrt r" in scaling["ours"]
    assert pl.rate_findings(1.0, rows, 8e-3)[0]["verdict"] == "not reproduced"


# ----------------------------------------------------------------------------------------------
# The protocol on real (tiny) fine-tunes


QUICK = dict(steps=3, eval_chars=64, points=3, max_extensions=1)


def test_arms_side_by_side_equal_arms_in_turn_and_selection_never_reads_the_test_text(setup, tmp_path, monkeypatch):
    base, tokenizer, splits = setup
    task = make_task("echo", splits)
    arms = [pl.full_arm((1e-3, 2e-3)), pl.lora_arm(("q_proj", "v_proj"), 2, (4e-3, 8e-3))]
    two = pl.run_arms(base, task, tokenizer, arms, cache=tmp_path / "two", workers=min(2, default_workers()), **QUICK)
    one = pl.run_arms(base, task, tokenizer, arms, cache=tmp_path / "one", workers=1, **QUICK)
    assert list(two) == [a.label for a in arms]
    for label in two:
        assert two[label].selection == one[label].selection and two[label].values() == one[label].values()
        assert [r.seed for r in two[label].runs] == list(SEEDS)
    # the test text changes every reported number and no choice
    seen = []
    real = estimator.split_scores
    test_texts = {tuple(tokenizer.encode(t[:40])) for t in (poisoned(task).test, poisoned(task).source_test)}

    def watched(model, tokens, eval_chars=None, device="cpu"):
        seen.append("test" if tuple(tokens[:40].tolist()) in test_texts else "other")
        return real(model, tokens, eval_chars, device)

    monkeypatch.setattr(estimator, "split_scores", watched)
    dirty = pl.run_arms(base, poisoned(task), tokenizer, arms, cache=False, **QUICK)
    assert "test" not in seen[: seen.index("test")] and "other" not in seen[seen.index("test") :]
    for label in dirty:
        assert dirty[label].selection == one[label].selection and dirty[label].values() != one[label].values()


def test_the_prefetcher_trains_only_what_the_cache_lacks(setup, tmp_path):
    if default_workers() < 2:
        pytest.skip("one core: nothing to run side by side")  # CI has two
    base, tokenizer, splits = setup
    task = make_task("echo", splits)
    requests = [
        RunRequest(task, None, protocol_train_config(True, 1e-3, seed, 2), "full FT", 64, 2) for seed in (0, 1, 2)
    ]
    digest = model_digest(base)
    with Prefetcher(base, tokenizer, cache=tmp_path, workers=2) as pool:
        assert pool.train(requests) == 3
        assert missing_runs(requests, digest, tmp_path) == [] and pool.train(requests) == 0
    assert Prefetcher(base, tokenizer, cache=False, workers=2).train(requests) == 0
    with pytest.raises(ValueError, match="workers must be an integer from 1 to"):
        check_workers(default_workers() + 1)


def test_the_whole_lab_writes_its_tables_figures_and_computed_findings(setup, tmp_path):
    base, tokenizer, splits = setup
    task = make_task("echo", splits)
    plan = pl.LabPlan(steps=3, ranks=(1, 2), budget_rank=4, scaling_ranks=(1, 2), capacity_steps=(3, 6))
    lab = pl.run_placement_lab(base, task, tokenizer, plan, eval_chars=64, cache=tmp_path / "cache", workers=1)
    assert len(lab.findings) == 8
    assert {f["verdict"] for f in lab.findings} <= {"reproduced", "partly", "not reproduced"}
    assert all(f["rule"] and f["why"] and f["ours"] for f in lab.findings)
    # rsLoRA at rank 1 is LoRA at rank 1 (sqrt 1 = 1): the same numbers, rate by rate
    rs, plain = lab.results["rslora Wq,Wv r=1"].selection.scores, lab.results["Wq,Wv r=1"].selection.scores
    common = set(rs) & set(plain)
    assert pl.SHARED_RATE in common and all(rs[lr] == plain[lr] for lr in common)
    assert [r["steps"] for r in lab.tables["capacity"]] == [3, 6]
    written = pl.write_placement_lab(lab.tables, lab.figures, tmp_path / "out")
    assert {"rank.csv", "placement.csv", "findings.csv", "learn_vs_forget.png", "rank.png"} <= set(written)
    assert (tmp_path / "out" / "findings.csv").read_text().count("\n") == 9
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError):
        pl.write_placement_lab(lab.tables, lab.figures, tmp_path / "other")
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_the_cli_refuses_more_workers_than_cores_before_any_work(capsys):
    code, _, err = run(capsys, "placement-lab", "--workers", str(default_workers() + 1), "--out", "x")
    assert code == 2 and "--workers" in err and "must be an integer from 1 to" in err

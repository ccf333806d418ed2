"""The comparison protocol: the exact estimator, the training loop it shares with train(), the learning-rate
sweep, seeds and spreads, paired-seed verdicts and the run cache. Runs on the tiny synthetic base of test_finetune."""

import json
import math
import statistics

import pytest
import torch
import torch.nn.functional as F
from test_finetune import setup  # noqa: F401 (the module-scoped synthetic base)

from lora_lab import GPT, LoRAConfig, apply_lora, train
from lora_lab.digests import json_digest
from lora_lab.experiments.defaults import SELECTION_SEED
from lora_lab.experiments.estimator import curve_steps, encode_task, split_scores, task_scores
from lora_lab.experiments.finetune import train_with_curve
from lora_lab.experiments.protocol import (
    Comparison,
    Method,
    MethodResult,
    compare,
    full_method,
    lora_method,
    mean_spread,
    protocol_train_config,
    report_view,
    selection_view,
)
from lora_lab.experiments.reports import comparison_figure, plot_comparison
from lora_lab.experiments.runs import Run, model_digest, run_once, runs_dir
from lora_lab.experiments.stats import MIN_SEEDS, TooFewSeedsError, holm_adjust, paired_difference
from lora_lab.experiments.studies import delta_norm_rows, equal_budget_ranks, lr_ratio
from lora_lab.storage.files import CorruptFileError
from lora_lab.tasks import make_task

SHORT = dict(steps=12, eval_chars=600)


def test_split_scores_is_the_exact_loss_of_every_character_once(tiny_config):
    torch.manual_seed(0)
    model = GPT(tiny_config)
    T = tiny_config.block_size
    tokens = torch.randint(tiny_config.vocab_size, (3 * T + 7,))  # 3 full windows and a 6-character tail
    logits = torch.cat(
        [model(tokens[i : i + T][None])[0][0] for i in range(0, 3 * T, T)] + [model(tokens[3 * T : -1][None])[0][0]]
    )  # (len - 1, vocab)
    targets = tokens[1:]
    scores = split_scores(model, tokens, eval_chars=None)
    assert scores["loss"] == pytest.approx(F.cross_entropy(logits, targets).item(), rel=1e-6)
    assert scores["accuracy"] == pytest.approx((logits.argmax(-1) == targets).float().mean().item())
    # eval_chars keeps a prefix: the score of the first 2 windows only
    assert split_scores(model, tokens, eval_chars=2 * T)["loss"] == pytest.approx(
        F.cross_entropy(logits[: 2 * T], targets[: 2 * T]).item(), rel=1e-6
    )
    with pytest.raises(ValueError, match="at least 2 tokens"):
        split_scores(model, tokens[:1])


def test_the_curve_loop_trains_exactly_like_train_and_starts_at_the_base(setup):
    base, tokenizer, splits = setup
    task = make_task("shout", splits)
    data = encode_task(task, tokenizer)
    cfg = protocol_train_config(False, 5e-3, seed=3, steps=20)
    models = []
    for _ in range(2):
        model = GPT(base.config)
        model.load_state_dict(base.state_dict())
        torch.manual_seed(cfg.seed)
        apply_lora(model, LoRAConfig(r=2, alpha=4.0))
        models.append(model)
    trained = train_with_curve(models[0], data, cfg, eval_chars=500)
    curve = trained.curve
    history = train(models[1], data["train"], data["target"], cfg, progress=False)
    assert trained.step_losses == history.losses
    a, b = models[0].state_dict(), models[1].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same weights as train() gives
    assert [p["step"] for p in curve] == curve_steps(20) == [0, 5, 10, 15, 20]
    base_scores = task_scores(base, data, eval_chars=500)
    assert curve[0] == {"step": 0, **base_scores}  # B = 0: step 0 is the base, exactly
    assert curve[-1] == {"step": 20, **task_scores(models[0], data, eval_chars=500)}  # the last point is the table's


def test_mean_spread():
    mean, std = mean_spread([1.0, 2.0, 4.0])
    assert mean == pytest.approx(7 / 3)
    assert std == pytest.approx(math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2))  # n - 1
    assert mean_spread([2.5]) == (2.5, 0.0)


def _fake_run(label, lr, seed, target, source=1.0):
    return Run(
        label,
        lr,
        seed,
        [
            {"step": 0, "target": 3.0, "target_accuracy": 0.1, "source": 1.0},
            {"step": 9, "target": target, "target_accuracy": 0.5, "source": source},
        ],
        {"m": 1.0},
        10,
        0.1,
    )


def _fake_comparison(splits, lora_targets, full_targets, full_seeds=None):
    """A Comparison of LoRA r=2 and full FT with these final target losses, one run per seed 0, 1, ...
    (full FT's runs with full_seeds, if given), and a base target loss of 3."""
    seeds = tuple(range(len(lora_targets)))
    results = []
    for method, lr, targets, run_seeds in (
        (lora_method(2, learning_rates=[1e-3]), 1e-3, lora_targets, seeds),
        (full_method([1e-4]), 1e-4, full_targets, full_seeds or seeds),
    ):
        runs = [_fake_run(method.label, lr, seed, t) for seed, t in zip(run_seeds, targets)]
        results.append(MethodResult(method, lr, {lr: targets[0]}, runs))
    base = {"target": 3.0, "target_accuracy": 0.1, "source": 1.0}
    return Comparison(make_task("shout", splits), base, results, seeds, 9)


def test_table_has_a_base_row_mean_and_std_and_no_verdict_below_five_seeds(setup):
    _, _, splits = setup
    comp = _fake_comparison(splits, (2.0, 2.1, 2.2), (2.15, 2.3, 2.4))
    rows = comp.rows()
    assert [r["method"] for r in rows] == ["base", "LoRA r=2", "full FT"]
    assert rows[0]["target loss"] == "3.0000"
    assert rows[1]["target loss"] == "2.1000 ± 0.1000" and rows[1]["lr"] == "0.001"
    assert lr_ratio(comp, "LoRA r=2") == pytest.approx(10.0)
    with pytest.raises(TooFewSeedsError, match="at least MIN_SEEDS"):
        comp.verdicts("target", reference="full FT")
    text = comp.to_text()  # the report still prints, and says why it gives no verdict
    assert "± " in text and f"3 seed(s): no verdicts. A verdict needs at least {MIN_SEEDS} paired seeds" in text


def test_verdicts_known_answers(setup):
    _, _, splits = setup
    noise = (0.03, -0.02, 0.05, -0.04, 0.01, 0.00)
    lora = tuple(2.0 + e for e in noise)
    # identical methods: every paired difference is 0, so there is nothing to call real
    same = _fake_comparison(splits, lora, lora)
    (verdict,) = same.verdicts("target", reference="full FT")
    assert not verdict.real and verdict.diff.mean == 0 and "identical results" in verdict.sentence
    # the same seed luck on both sides plus a clear shift: real, though the seed ranges overlap
    jitter = (0.004, -0.003, 0.002, -0.001, 0.003, -0.005)  # sums to 0: the mean shift stays 0.05
    shifted = tuple(v + 0.05 + j for v, j in zip(lora, jitter))
    assert max(lora) > min(shifted)  # the seed ranges overlap: the old range rule would have called it noise
    comp = _fake_comparison(splits, lora, shifted)
    (verdict,) = comp.verdicts("target", reference="full FT")
    assert verdict.real and verdict.name == "LoRA r=2" and verdict.reference == "full FT"
    assert verdict.diff.mean == pytest.approx(-0.05) and verdict.diff.high < 0
    assert (
        verdict.sentence.startswith("LoRA r=2 is lower than full FT by 0.050") and "6 paired seeds" in verdict.sentence
    )
    # per-seed differences that vary as much as their mean: not detectable
    scattered = (2.3, 1.9, 2.2, 1.95, 2.25, 2.0)
    (verdict,) = _fake_comparison(splits, lora, scattered).verdicts("target", reference="full FT")
    assert not verdict.real and verdict.sentence.startswith("No detectable difference between LoRA r=2 and full FT")
    # against the base (one deterministic value): both methods, Holm-adjusted across the two calls
    against_base = comp.verdicts("target")
    assert [(v.name, v.reference, v.real) for v in against_base] == [
        ("LoRA r=2", "base", True),
        ("full FT", "base", True),
    ]
    one = paired_difference(lora, [3.0] * len(lora))
    assert against_base[0].diff == one
    assert [v.adjusted_p for v in against_base] == pytest.approx(holm_adjust([v.diff.p_value for v in against_base]))
    text = comp.to_text()
    assert "| LoRA r=2 | full FT" not in text  # the reference method is the first one: full FT vs LoRA r=2
    assert "full FT is higher than LoRA r=2 by 0.050" in text and "95% CI" in text and "Holm p" in text


def test_verdicts_refuse_unpaired_seeds_and_unknown_references(setup):
    _, _, splits = setup
    values = (2.0, 2.1, 2.2, 2.05, 2.15)
    comp = _fake_comparison(splits, values, [v + 0.1 for v in values], full_seeds=(0, 1, 2, 3, 7))
    with pytest.raises(ValueError, match=r"same seeds \[0, 1, 2, 3, 4\].*'full FT' has \[0, 1, 2, 3, 7\]"):
        comp.verdicts("target", reference="LoRA r=2")
    with pytest.raises(ValueError, match="neither 'base' nor a method"):
        comp.verdicts("target", reference="LoRA r=4")


def test_compare_picks_the_best_rate_of_the_grid_and_runs_every_seed(setup, tmp_path):
    base, tokenizer, splits = setup
    task = make_task("shout", splits)
    comp = compare(
        base,
        task,
        tokenizer,
        [lora_method(2, learning_rates=[1e-6, 1e-2])],
        seeds=(0, 1, 2),
        cache=tmp_path / "cache",
        **SHORT,
    )
    (res,) = comp.results
    assert res.sweep[1e-2] < res.sweep[1e-6]  # a rate of 1e-6 barely moves in 12 steps
    assert res.chosen_lr == 1e-2 == min(res.sweep, key=res.sweep.get)
    assert [r.seed for r in res.runs] == [0, 1, 2] and {r.learning_rate for r in res.runs} == {1e-2}
    assert len({r.final["target"] for r in res.runs}) == 3  # seeds differ
    # the rate was chosen with the selection seed on the validation text; the table is the test text's
    assert comp.selection_seed == SELECTION_SEED and comp.reported_on == "test"
    chosen_on = run_once(base, selection_view(task), tokenizer, res.method.lora,
                         protocol_train_config(False, 1e-2, SELECTION_SEED, SHORT["steps"]),
                         eval_chars=SHORT.get("eval_chars"), points=SHORT.get("curve_points", 5),
                         cache=tmp_path / "cache")  # fmt: skip
    assert chosen_on.from_cache and chosen_on.final["target"] == res.sweep[1e-2]
    assert comp.base == task_scores(base, encode_task(report_view(task), tokenizer), SHORT.get("eval_chars"))
    with pytest.raises(ValueError, match="selection_seed 1 is one of the reported seeds"):
        compare(base, task, tokenizer, [lora_method(2)], seeds=(0, 1, 2), selection_seed=1, cache=False, **SHORT)
    path = plot_comparison(comp, tmp_path / "curves.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the figure's points are the table's numbers: step 0 on the base line, the last point the seed mean
    for ax, key in zip(comparison_figure(comp).axes, ("target", "source")):
        lines = {line.get_label(): line for line in ax.get_lines()}
        (mean_line,) = [line for label, line in lines.items() if label.startswith("LoRA r=2 (lr 0.01)")]
        assert mean_line.get_ydata()[0] == comp.base[key] == lines["base"].get_ydata()[0]
        assert mean_line.get_ydata()[-1] == statistics.fmean(res.values(key))
    (row,) = delta_norm_rows(comp)
    assert row["r"] == 2 and row["alpha"] == 16.0 and row["delta_norm"] > 0


def test_the_run_cache_hits_with_identical_numbers_and_misses_on_any_change(setup, tmp_path, monkeypatch):
    base, tokenizer, splits = setup
    task = make_task("shout", splits)
    lora = LoRAConfig(r=2, alpha=4.0)
    cfg = protocol_train_config(False, 5e-3, seed=0, steps=8)
    first = run_once(base, task, tokenizer, lora, cfg, eval_chars=400, cache=tmp_path)
    assert not first.from_cache
    files = sorted(p.name for p in runs_dir(tmp_path).iterdir())
    assert len(files) == 2 and ".lora_lab_output.json" in files  # one run, in a folder claimed for runs
    again = run_once(base, task, tokenizer, lora, cfg, eval_chars=400, cache=tmp_path)
    assert again.from_cache and again.to_dict() == first.to_dict()
    changed = [
        dict(lora=LoRAConfig(r=2, alpha=8.0), cfg=cfg),
        dict(lora=lora, cfg=protocol_train_config(False, 5e-3, seed=1, steps=8)),
        dict(lora=lora, cfg=protocol_train_config(False, 4e-3, seed=0, steps=8)),
    ]
    for change in changed:
        again = run_once(base, task, tokenizer, change["lora"], change["cfg"], eval_chars=400, cache=tmp_path)
        assert not again.from_cache
    other_base = GPT(base.config)
    assert not run_once(other_base, task, tokenizer, lora, cfg, eval_chars=400, cache=tmp_path).from_cache
    assert not run_once(
        base, make_task("rot13", splits), tokenizer, lora, cfg, eval_chars=400, cache=tmp_path
    ).from_cache
    assert len(list(runs_dir(tmp_path).glob("*.json"))) == 1 + 6
    # cache=False neither reads nor writes
    assert not run_once(base, task, tokenizer, lora, cfg, eval_chars=400, cache=False).from_cache
    # a damaged entry is named, not silently retrained over or trusted, and left as it is
    entries = [p for p in runs_dir(tmp_path).glob("*.json") if p.name != ".lora_lab_output.json"]
    (damaged,) = [p for p in entries if json.loads(p.read_text())["run"] == first.to_dict()]
    good = json.loads(damaged.read_text())

    def edited(change):
        record = json.loads(json.dumps(good))
        change(record)
        return json.dumps(record)

    def set_point(record, **point):
        record["run"]["curve"][-1] = point

    for text in [
        "{not json",
        edited(lambda r: r["run"]["curve"][-1].update(target=0.0123)),  # a better number typed in: checksum
        edited(lambda r: r["run"]["curve"].clear() or r.update(checksum=json_digest(r["run"]))),
        edited(lambda r: set_point(r, step=8, source=1.0) or r.update(checksum=json_digest(r["run"]))),
        edited(lambda r: r.update(version=3)),
        json.dumps(first.to_dict()),  # an entry as lora_lab wrote it before entries were checked
    ]:
        damaged.write_text(text)
        with pytest.raises(CorruptFileError, match=f"cached run .*{damaged.name}.*delete that file"):
            run_once(base, task, tokenizer, lora, cfg, eval_chars=400, cache=tmp_path)
        assert damaged.read_text() == text  # refused, and left as it is


def test_full_finetuning_delta_norms_and_equal_budget_ranks(setup, tiny_config):
    base, tokenizer, splits = setup
    run = run_once(
        base,
        make_task("shout", splits),
        tokenizer,
        None,
        protocol_train_config(True, 1e-3, steps=5),
        eval_chars=300,
        cache=False,
    )
    assert run.trainable_params == base.num_parameters()
    assert any(name.endswith("q_proj.weight") for name in run.delta_norms) and min(run.delta_norms.values()) > 0
    model = GPT(tiny_config)  # 2 blocks of 32 dims: attention 4 x (32 + 32), MLP (32 + 128) x 2 per block
    assert equal_budget_ranks(model, 5) == (5, 4)  # 5 * 512 = 2560 = 4 * 640


def test_bad_protocol_input_is_named(setup):
    base, tokenizer, splits = setup
    task = make_task("shout", splits)
    with pytest.raises(ValueError, match="learning_rates must be"):
        Method(None, ())
    with pytest.raises(ValueError, match="learning_rates must be"):
        lora_method(2, learning_rates=[0.0])
    with pytest.raises(ValueError, match="share a label"):
        compare(base, task, tokenizer, [full_method([1e-3]), full_method([1e-4])], cache=False, **SHORT)
    with pytest.raises(ValueError, match="seeds must be distinct"):
        compare(base, task, tokenizer, [full_method([1e-3])], seeds=(1, 1), cache=False, **SHORT)


def test_finetune_is_one_protocol_run(setup):
    """finetune's default path and a protocol run of the same config give the same curve: one estimator."""
    from lora_lab.experiments.finetune import finetune, finetune_config

    base, tokenizer, splits = setup
    task = make_task("rot13", splits)
    lora, cfg = LoRAConfig(r=2, alpha=4.0), finetune_config(max_iters=10, device="cpu")
    res = finetune(base, task, tokenizer, lora, cfg, progress=False, eval_chars=300)
    run = run_once(base, task, tokenizer, lora, cfg, eval_chars=300, cache=False)
    assert res.curve == run.curve
    assert res.losses == {"target": run.final["target"], "source": run.final["source"]}
    for variant in ("dora", "pissa"):  # every variant too, and the label names the variant
        lora = LoRAConfig(r=2, alpha=4.0, variant=variant)
        res = finetune(base, task, tokenizer, lora, cfg, progress=False, eval_chars=300)
        run = run_once(base, task, tokenizer, lora, cfg, eval_chars=300, cache=False)
        assert res.curve == run.curve and run.method == res.label == f"{variant} r=2"
    assert Method(LoRAConfig(r=4, variant="dora"), (1e-3,)).label == "dora r=4"


def test_the_base_digest_follows_the_weights_and_the_config(setup):
    base, _, _ = setup
    same = GPT(base.config)
    same.load_state_dict(base.state_dict())
    assert model_digest(same) == model_digest(base)
    with torch.no_grad():
        same.lm_head.weight[0, 0] += 1e-3
    assert model_digest(same) != model_digest(base)


def test_the_chapter_studies_run_what_they_say(setup, tmp_path):
    from lora_lab.experiments.studies import attention_vs_mlp, lora_vs_full, norm_by_rank

    base, tokenizer, splits = setup
    task = make_task("shout", splits)
    fast = dict(seeds=(0, 1, 2), steps=6, cache=tmp_path)
    comp = lora_vs_full(base, task, tokenizer, r=2, **fast)
    # one-rate grids are choices already made: no selection runs
    assert [(r.method.label, r.chosen_lr, r.sweep) for r in comp.results] == [
        ("LoRA r=2", 8e-3, {}),
        ("full FT", 1e-3, {}),
    ]
    assert lr_ratio(comp, "LoRA r=2") == pytest.approx(8.0)
    by_rank = norm_by_rank(base, task, tokenizer, ranks=(1, 4), **fast)
    rows = delta_norm_rows(by_rank)
    assert [(r["r"], r["alpha"]) for r in rows] == [(1, 16.0), (4, 16.0)]
    assert [p["step"] for p in by_rank.results[0].runs[0].curve] == [0, 6]  # 2 points: cheap
    two_r = norm_by_rank(base, task, tokenizer, ranks=(1, 4), alpha=lambda r: 2.0 * r, **fast)
    assert [r["alpha"] for r in delta_norm_rows(two_r)] == [2.0, 8.0]
    budget = attention_vs_mlp(base, task, tokenizer, 5, **fast)
    attn, mlp = budget.results
    assert (attn.method.label, mlp.method.label) == ("attention r=5", "MLP r=4")
    assert attn.runs[0].trainable_params == mlp.runs[0].trainable_params == 2560
    assert set(mlp.runs[0].delta_norms) == {f"blocks.{i}.mlp.{m}" for i in (0, 1) for m in ("up_proj", "down_proj")}


def test_cli_compare_writes_the_table_the_runs_and_the_curves(tmp_path, capsys):
    from test_tasks import write_synthetic_corpus

    from lora_lab.cli import main

    source = write_synthetic_corpus(tmp_path / "input.txt")
    out = tmp_path / "compare"
    argv = [
        "compare",
        "--data",
        source,
        "--cache",
        tmp_path / "cache",
        "--pretrain-iters",
        "20",
        "--device",
        "cpu",
        "--quiet",
        "--task",
        "shout",
        "--rank",
        "2",
        "--steps",
        "4",
        "--out",
        out,
    ]
    assert main([str(a) for a in argv]) == 0
    printed = capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [
        ".lora_lab_output.json",
        "comparison.json",
        "comparison.md",
        "curves.png",
    ]
    record = json.loads((out / "comparison.json").read_text())
    assert [m["label"] for m in record["methods"]] == ["LoRA r=2", "full FT"]
    assert [len(m["runs"]) for m in record["methods"]] == [5, 5] and record["seeds"] == [0, 1, 2, 3, 4]
    assert (out / "comparison.md").read_text() in printed  # the table printed is the table written
    assert "| base " in printed and "Holm-adjusted p" in printed  # the CLI's default 5 paired seeds: verdicts
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    assert main([str(a) for a in argv[:-1] + [mine]]) == 2  # a folder of the user's files is refused
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


def test_compare_side_by_side_gives_the_numbers_of_one_process(setup, tmp_path):
    from lora_lab.experiments.parallel import default_workers
    from lora_lab.tasks import make_task

    base, tokenizer, splits = setup
    task = make_task("shout", splits)
    methods = [lora_method(2, learning_rates=(4e-3, 8e-3)), full_method((1e-3, 2e-3))]
    quick = dict(seeds=(0, 1, 2), steps=3, eval_chars=64, curve_points=2)
    two = compare(base, task, tokenizer, methods, cache=tmp_path / "two", workers=min(2, default_workers()), **quick)
    one = compare(base, task, tokenizer, methods, cache=tmp_path / "one", workers=1, **quick)
    assert [r.chosen_lr for r in two.results] == [r.chosen_lr for r in one.results]
    assert [r.sweep for r in two.results] == [r.sweep for r in one.results]
    assert [r.values("target") for r in two.results] == [r.values("target") for r in one.results]
    names = {side: sorted(p.name for p in (tmp_path / side / "protocol-runs").iterdir()) for side in ("two", "one")}
    assert names["two"] == names["one"] and len(names["one"]) > 2 * 2 + 2 * 2  # sweeps, seeds 1 and 2, the marker

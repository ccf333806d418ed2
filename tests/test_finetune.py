"""Fine-tuning with LoRA and in full, on a tiny GPT pretrained for a moment on a synthetic corpus."""

import csv

import pytest
import torch
from test_tasks import write_synthetic_corpus

from lora_lab import GPT, CharTokenizer, GPTConfig, LoRAConfig, TrainConfig, train
from lora_lab.experiments.defaults import (
    ALPHA,
    DEFAULT_TARGETS,
    FINETUNE_DEFAULTS,
    FULL_LEARNING_RATE,
    LORA_LEARNING_RATE,
    default_lora_config,
    finetune_config,
)
from lora_lab.experiments.estimator import encode_task, task_scores
from lora_lab.experiments.finetune import finetune, method_label
from lora_lab.experiments.protocol import protocol_train_config
from lora_lab.experiments.reports import format_table
from lora_lab.experiments.studies import compare_methods, rank_sweep
from lora_lab.lora import LoRALinear, lora_layers
from lora_lab.tasks import make_task, source_domain

EVAL = dict(eval_chars=400)  # the exact loss of a short fixed text: fast and still comparable


def quick(full: bool = False, **overrides) -> TrainConfig:
    lr = 1e-3 if full else 5e-3
    return finetune_config(full=full, **{"max_iters": 80, "learning_rate": lr, "device": "cpu", **overrides})


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(base GPT, tokenizer, splits): a 2-layer GPT pretrained for 300 steps on the synthetic source domain."""
    text = write_synthetic_corpus(tmp_path_factory.mktemp("data") / "input.txt", n_turns=1500).read_text()
    a, b = int(len(text) * 0.9), int(len(text) * 0.95)
    splits = {"train": text[:a], "validation": text[a:b], "test": text[b:]}
    tokenizer = CharTokenizer.from_text(text)
    source = source_domain(splits)
    data = {k: torch.tensor(tokenizer.encode(v)) for k, v in source.items()}
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=16, n_layer=2, n_head=2, n_embd=32))
    cfg = TrainConfig(
        max_iters=300, batch_size=16, learning_rate=3e-3, warmup_iters=10, eval_interval=300, eval_iters=2, device="cpu"
    )
    train(model, data["train"], data["validation"], cfg, progress=False)
    return model, tokenizer, splits


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [p.requires_grad for p in model.parameters()]


def test_finetune_never_changes_the_base(setup):
    base, tokenizer, splits = setup
    task = make_task("shout", splits)
    weights, grads = snapshot(base)
    modules = [type(m) for m in base.modules()]
    for lora in (LoRAConfig(r=4, alpha=8.0), None):
        res = finetune(base, task, tokenizer, lora, quick(lora is None, max_iters=20), progress=False, **EVAL)
        assert res.model is not base
    after_weights, after_grads = snapshot(base)
    assert after_weights.keys() == weights.keys()
    assert all(torch.equal(after_weights[k], weights[k]) for k in weights)
    assert after_grads == grads and [type(m) for m in base.modules()] == modules
    assert not lora_layers(base)


def task_losses(model, data, eval_chars):
    scores = task_scores(model, data, eval_chars)
    return {"target": scores["target"], "source": scores["source"]}


def test_lora_lowers_the_target_loss_below_the_base(setup):
    base, tokenizer, splits = setup
    task = make_task("shout", splits)
    res = finetune(base, task, tokenizer, LoRAConfig(r=4, alpha=8.0), quick(), progress=False, **EVAL)
    # The base's and the fine-tuned model's losses are the curve's first and last points, by one estimator.
    data = encode_task(task, tokenizer)
    assert res.base_losses == task_losses(base, data, 400)
    assert res.losses == task_losses(res.model, data, 400)
    assert [p["step"] for p in res.curve] == [0, 20, 40, 60, 80]
    assert res.curve[0]["target"] == res.base_losses["target"] and res.curve[-1]["source"] == res.losses["source"]
    assert [e["val"] for e in res.history.evals] == [p["target"] for p in res.curve]
    assert res.target_accuracy > res.curve[0]["target_accuracy"]
    assert res.losses["target"] < res.base_losses["target"] - 0.3, (res.losses, res.base_losses)
    # Only A and B trained: every pretrained weight of the fine-tuned copy is still the base's.
    layers = lora_layers(res.model)
    assert len(layers) == 2 * 4  # q, k, v, o in 2 blocks
    assert res.trainable_params == sum(l.lora_A.numel() + l.lora_B.numel() for l in layers.values())
    assert res.trainable_params == 8 * 4 * (32 + 32)  # 8 matrices of 32 x 32 at r = 4: r (d + k) each
    base_state = base.state_dict()
    for name, value in res.model.state_dict().items():
        if "lora_" not in name:
            assert torch.equal(value, base_state[name.replace(".base.", ".")]), name
    assert len(res.history.losses) == 80 and res.history.evals[-1]["iter"] == 80


def test_full_finetuning_trains_every_parameter(setup):
    base, tokenizer, splits = setup
    task = make_task("shout", splits)
    res = finetune(base, task, tokenizer, None, quick(full=True), progress=False, **EVAL)
    assert res.method == "full" and res.lora is None
    assert res.trainable_params == res.total_params == base.num_parameters()
    assert all(p.requires_grad for p in res.model.parameters())
    assert not any(isinstance(m, LoRALinear) for m in res.model.modules())
    base_state = base.state_dict()
    changed = {k for k, v in res.model.state_dict().items() if not torch.equal(v, base_state[k])}
    assert changed == set(base_state)  # every tensor moved, the tied embedding/head included
    assert res.losses["target"] < res.base_losses["target"]


def test_same_seed_same_result_and_another_seed_differs(setup):
    base, tokenizer, splits = setup
    task = make_task("romeo_juliet", splits)
    lora = LoRAConfig(r=2, alpha=4.0, targets=("q_proj", "v_proj"))
    runs = [
        finetune(base, task, tokenizer, lora, quick(max_iters=25, seed=s), progress=False, **EVAL) for s in (7, 7, 8)
    ]
    a, b, c = runs
    assert a.history.losses == b.history.losses and a.losses == b.losses
    state_a, state_b = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert c.history.losses != a.history.losses
    assert a.base_losses == c.base_losses  # the evaluation text does not depend on the training seed


def test_compare_methods_is_a_protocol_comparison_of_one_seed(setup):
    base, tokenizer, splits = setup
    task = make_task("shout", splits)
    lora_cfg, full_cfg = quick(max_iters=30), quick(full=True, max_iters=30)
    comp = compare_methods(
        base, task, tokenizer, LoRAConfig(r=2, alpha=4.0), lora_cfg, full_cfg, progress=False, **EVAL
    )
    rows = comp.rows()
    assert [r["method"] for r in rows] == ["base", "LoRA r=2", "full FT"]
    base_row, lora_row, full_row = rows
    assert base_row["trainable"] == "0" and full_row["trainable"] == f"{base.num_parameters():,}"
    lora_res, full_res = comp.results
    assert 0 < lora_res.runs[0].trainable_params < full_res.runs[0].trainable_params
    # the same numbers as finetune gives: one pipeline
    alone = finetune(base, task, tokenizer, LoRAConfig(r=2, alpha=4.0), lora_cfg, progress=False, **EVAL)
    assert lora_res.runs[0].curve == alone.curve and comp.base == {k: alone.curve[0][k] for k in comp.base}
    assert lora_row["target loss"] == f"{alone.losses['target']:.4f} ± 0.0000"
    assert (lora_res.chosen_lr, full_res.chosen_lr) == (lora_cfg.learning_rate, full_cfg.learning_rate)
    text = comp.to_text()
    assert "LoRA r=2" in text and "full FT" in text and "1 seed(s): no verdicts" in text


def test_rank_sweep_writes_a_table_and_a_plot(setup, tmp_path):
    base, tokenizer, splits = setup
    task = make_task("shout", splits)
    out = tmp_path / "sweep"
    sweep = rank_sweep(
        base, task, tokenizer, [1, 2, 4], ("q_proj", "v_proj"), 4.0, quick(max_iters=15), out, progress=False, **EVAL
    )
    # no temporary files left; the marker says the folder is a sweep's, so a rerun may replace its files
    assert sorted(p.name for p in out.iterdir()) == [".lora_lab_output.json", "sweep.csv", "sweep.png"]
    with open(out / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["rank"]) for r in rows] == [1, 2, 4]
    assert {float(r["alpha"]) for r in rows} == {4.0}  # one alpha for every rank
    params = [int(r["trainable_params"]) for r in rows]
    assert params == [r * 4 * (32 + 32) for r in (1, 2, 4)]  # q and v in 2 blocks: r (d + k) each
    sizes = [int(r["adapter_bytes"]) for r in rows]
    assert sizes[0] < sizes[1] < sizes[2]
    assert [float(r["target_loss"]) for r in rows] == pytest.approx([r["target_loss"] for r in sweep.rows])
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sweep.files == {"csv": out / "sweep.csv", "png": out / "sweep.png"}


def test_bad_input_is_refused_before_any_work(setup, tmp_path):
    base, tokenizer, splits = setup
    task = make_task("shout", splits)
    with pytest.raises(ValueError, match="ranks must be"):
        rank_sweep(base, task, tokenizer, [2, 0], out_dir=tmp_path / "sweep", progress=False)
    with pytest.raises(ValueError, match="rank"):
        rank_sweep(base, task, tokenizer, [2, 64], out_dir=tmp_path / "sweep", progress=False)  # r > d
    assert not (tmp_path / "sweep").exists()
    with pytest.raises(ValueError, match="vocab_size"):
        finetune(base, task, CharTokenizer("abc"), progress=False)
    with pytest.raises(TypeError, match="Task"):
        finetune(base, "shout", tokenizer, progress=False)
    with pytest.raises(ValueError, match="Unknown device"):
        finetune(base, task, tokenizer, train_config=quick(device="tpu"), progress=False)


def test_finetune_config_defaults_and_short_runs():
    assert finetune_config() == FINETUNE_DEFAULTS["lora"]
    assert finetune_config(full=True).learning_rate < finetune_config().learning_rate
    # the defaults are the protocol's seed-0 runs at the chosen rates: LoRA without weight decay, full with 0.1
    assert finetune_config() == protocol_train_config(False, LORA_LEARNING_RATE, seed=0, device="auto")
    assert finetune_config(full=True) == protocol_train_config(True, FULL_LEARNING_RATE, seed=0, device="auto")
    assert (finetune_config().weight_decay, finetune_config(full=True).weight_decay) == (0.0, 0.1)
    # one recipe: a warmup of 10% of the steps and cosine to a tenth of the rate, however many steps
    for steps in (40, 200, 2000):
        assert finetune_config(max_iters=steps).warmup_iters == steps // 10
        assert protocol_train_config(False, 1e-2, steps=steps) == finetune_config(
            max_iters=steps, learning_rate=1e-2, device="cpu"
        )
    assert finetune_config(max_iters=20, warmup_iters=0).warmup_iters == 0
    assert finetune_config(learning_rate=1e-2).min_lr == pytest.approx(1e-3)
    assert finetune_config(learning_rate=1e-2, min_lr=0.0).min_lr == 0.0


def test_one_alpha_rule_and_one_label_rule_everywhere():
    assert default_lora_config() == LoRAConfig(r=8, alpha=16.0, targets=DEFAULT_TARGETS)
    assert default_lora_config(4).alpha == default_lora_config(64).alpha == ALPHA == 16.0 == LoRAConfig.alpha
    assert default_lora_config(4, alpha=3.0).alpha == 3.0
    assert default_lora_config(2, "q_proj").targets == ("q_proj",)
    import inspect

    assert inspect.signature(finetune).parameters["lora"].default == default_lora_config()
    assert inspect.signature(rank_sweep).parameters["alpha"].default is None  # None: ALPHA at every rank
    assert "base_losses" not in inspect.signature(finetune).parameters  # it was accepted and ignored
    labels = [method_label(c) for c in (None, LoRAConfig(r=8), LoRAConfig(r=4, variant="dora"))]
    assert labels == ["full FT", "LoRA r=8", "dora r=4"]


def test_format_table():
    text = format_table([{"a": 1, "b": 0.5, "c": 16.0}, {"a": 22, "b": None, "c": 2.5}], formats={"c": ".1f"})
    assert text.splitlines() == [
        "| a  | b      | c    |",
        "| -- | ------ | ---- |",
        "| 1  | 0.5000 | 16.0 |",
        "| 22 | -      | 2.5  |",
    ]
    assert format_table([{"alpha": 16.0, "loss": 1.23456}]).splitlines()[2] == "| 16    | 1.2346 |"


def test_rank_sweep_refuses_a_folder_of_other_files_before_training(setup, tmp_path, monkeypatch):
    import lora_lab.experiments.studies as studies

    base, tokenizer, splits = setup
    task = make_task("shout", splits)
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "sweep.csv").write_text("my own table")
    monkeypatch.setattr(studies, "finetune", lambda *a, **k: pytest.fail("trained before checking the output folder"))
    with pytest.raises(ValueError, match="Refusing to write .*notes"):
        rank_sweep(base, task, tokenizer, [1], out_dir=mine, progress=False)
    assert [p.name for p in mine.iterdir()] == ["sweep.csv"] and (mine / "sweep.csv").read_text() == "my own table"


def test_rank_sweep_takes_one_target_name_as_a_string(setup):
    base, tokenizer, splits = setup
    task = make_task("shout", splits)
    sweep = rank_sweep(
        base, task, tokenizer, [1, 2], "q_proj", None, quick(max_iters=2), progress=False, eval_chars=100
    )
    assert sweep.rows[0]["targets"] == ["q_proj"] and sweep.rows[0]["trainable_params"] == 2 * (32 + 32)
    assert [row["alpha"] for row in sweep.rows] == [16.0, 16.0]  # alpha None: 16 for every rank


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"lora": "r=4"}, ValueError, "lora must be a LoRAConfig"),
        ({"train_config": {"max_iters": 3}}, TypeError, "train_config must be a TrainConfig"),
        ({"eval_chars": 0}, ValueError, "eval_chars must be a positive integer .*got 0"),
        ({"curve_points": 1}, ValueError, "curve_points must be an integer >= 2"),
        ({"tokenizer": "abc"}, TypeError, "tokenizer must be a CharTokenizer"),
    ],
)
def test_finetune_names_a_bad_argument(setup, kwargs, error, message):
    base, tokenizer, splits = setup
    task = make_task("shout", splits)
    args = {"tokenizer": tokenizer, **kwargs}
    with pytest.raises(error, match=message):
        finetune(base, task, args.pop("tokenizer"), progress=False, **args)


def test_finetune_refuses_texts_shorter_than_a_window(setup):
    from lora_lab.tasks import Task

    base, tokenizer, _ = setup
    task = Task("short", "d", train="the king" * 10, validation="the", source_validation="the king" * 10)
    with pytest.raises(ValueError, match=r"Task 'short': text\(s\) \{'target': 3\} .* block_size=16"):
        finetune(base, task, tokenizer, progress=False)


def test_rank_sweep_trains_the_variant_it_is_given(setup):
    base, tokenizer, splits = setup
    task = make_task("shout", splits)
    cfg = quick(max_iters=2)
    sweep = rank_sweep(base, task, tokenizer, [2], "q_proj", None, cfg, progress=False, variant="vera", eval_chars=100)
    vera = finetune(
        base, task, tokenizer, LoRAConfig(r=2, targets=("q_proj",), variant="vera"), cfg, False, eval_chars=100
    )
    plain = finetune(base, task, tokenizer, LoRAConfig(r=2, targets=("q_proj",)), cfg, False, eval_chars=100)
    assert sweep.rows[0]["trainable_params"] == vera.trainable_params != plain.trainable_params
    assert sweep.rows[0]["target_loss"] == vera.losses["target"]
    assert sweep.to_text().startswith("Rank sweep of vera on shout")

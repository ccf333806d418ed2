"""The tour's library parts: the output folder check, the merge check, and the report's renderings."""

from dataclasses import replace

import pytest
import torch
from test_finetune import setup  # noqa: F401 (the module-scoped synthetic base)

from lora_lab import GPT, LoRAConfig, apply_lora
from lora_lab.course.tour import check_tour_output, max_logit_gap
from lora_lab.experiments.defaults import finetune_config
from lora_lab.experiments.finetune import finetune
from lora_lab.experiments.reports import loss_curves_figure, loss_rows, plot_loss_curves
from lora_lab.storage.files import OutputExistsError
from lora_lab.tasks import make_task


def test_tour_output_is_claimed_once_and_reused_but_never_a_users_folder(tmp_path):
    out = check_tour_output(tmp_path / "tour")
    assert [p.name for p in out.iterdir()] == [".lora_lab_output.json"]
    assert check_tour_output(out) == out  # a rerun may write into its own folder
    (out / "adapter").mkdir()
    (out / "adapter" / "thesis.tex").write_text("mine")
    with pytest.raises(OutputExistsError, match="adapter"):
        check_tour_output(out)  # a sub-bundle holding the user's file is refused too
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(OutputExistsError, match="no .lora_lab_output.json"):
        check_tour_output(mine)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


def test_max_logit_gap_sees_a_real_difference_and_restores_modes(tiny_config):
    torch.manual_seed(0)
    model = apply_lora(GPT(replace(tiny_config, dropout=0.3)), LoRAConfig(r=2, targets=("q_proj",)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.1)
    other = GPT(model.config).train()  # an unrelated plain model: must differ
    model.train()
    assert max_logit_gap(model, other) > 1e-3
    assert model.training and other.training
    same = GPT(model.config)
    assert max_logit_gap(same, same) == 0.0  # eval mode: dropout off, the same function twice


def test_loss_curves_points_are_the_table_numbers(setup, tmp_path):
    """Step 0 of every curve sits on the base line, and the last points are the table's final losses."""
    base, tokenizer, splits = setup
    task = make_task("shout", splits)
    results = [
        finetune(
            base,
            task,
            tokenizer,
            LoRAConfig(r=2, alpha=4.0),
            finetune_config(max_iters=12, device="cpu"),
            progress=False,
            eval_chars=300,
        ),
        finetune(
            base,
            task,
            tokenizer,
            None,
            finetune_config(full=True, max_iters=12, device="cpu"),
            progress=False,
            eval_chars=300,
        ),
    ]
    rows = {row["model"]: row for row in loss_rows(results, base.num_parameters())}
    fig = loss_curves_figure(results)
    target_ax, source_ax = fig.axes
    for ax, column in ((target_ax, "target_loss"), (source_ax, "source_loss")):
        lines = {line.get_label(): line for line in ax.get_lines()}
        assert list(lines["base"].get_ydata()) == [rows["base"][column]] * 2  # the dashed base line
        for res in results:
            (label,) = [name for name in lines if name.startswith(f"{res.label} (lr")]
            xs, ys = lines[label].get_xdata(), lines[label].get_ydata()
            assert list(xs) == [0, 3, 6, 9, 12]
            assert ys[0] == rows["base"][column]  # step 0: the untouched base, by the same estimator
            assert ys[-1] == rows[res.label][column]  # last point: the table's number
    assert "forgetting" in source_ax.get_title()
    assert plot_loss_curves(results, tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"

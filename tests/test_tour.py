"""The tour's library parts: the output folder check, the merge check, and the report's renderings."""
from dataclasses import replace

import pytest
import torch

from lora_lab import GPT, LoRAConfig, apply_lora
from lora_lab.files import OutputExistsError
from lora_lab.tour import check_tour_output, max_logit_gap


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

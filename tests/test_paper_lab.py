"""Chapter 10's paper lab on a tiny GPT: the fine-tunes, the tables, the verdict rules, the files, the exercise."""

import math

import pytest
import torch
from test_tasks import write_synthetic_corpus

from lora_lab import GPT, CharTokenizer, GPTConfig, LoRAConfig, TrainConfig, train
from lora_lab.course import exercises
from lora_lab.experiments import paper_lab
from lora_lab.experiments.analysis import subspace_similarity
from lora_lab.storage.files import OutputExistsError
from lora_lab.tasks import make_task, source_domain


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """(base, task, tokenizer, updates): a 2-layer GPT pretrained briefly, then fine-tuned five ways on echo."""
    text = write_synthetic_corpus(tmp_path_factory.mktemp("data") / "input.txt", n_turns=1200).read_text()
    a, b = int(len(text) * 0.9), int(len(text) * 0.95)
    splits = {"train": text[:a], "validation": text[a:b], "test": text[b:]}
    tokenizer = CharTokenizer.from_text(text)
    source = source_domain(splits)
    torch.manual_seed(0)
    base = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=16, n_layer=2, n_head=2, n_embd=32))
    cfg = TrainConfig(max_iters=150, batch_size=16, learning_rate=3e-3, warmup_iters=10, eval_interval=150,
                      eval_iters=1, device="cpu")  # fmt: skip
    train(base, torch.tensor(tokenizer.encode(source["train"])), None, cfg, progress=False)
    task = make_task("echo", splits)
    targets = paper_lab.MATRIX_TYPES
    settings = [
        paper_lab.Setting("full FT", None),
        paper_lab.Setting("LoRA r=4", LoRAConfig(r=4, alpha=8, targets=targets)),
        paper_lab.Setting("LoRA r=8", LoRAConfig(r=8, alpha=16, targets=targets)),
        paper_lab.Setting("LoRA r=16", LoRAConfig(r=16, alpha=16, targets=targets)),
        paper_lab.Setting("LoRA r=8 seed 1", LoRAConfig(r=8, alpha=16, targets=targets), seed=1),
    ]
    updates = paper_lab.train_updates(base, task, tokenizer, settings, steps=30, eval_chars=300)
    return base, task, tokenizer, updates


def test_updates_are_the_weight_changes_and_a_starts_where_finetune_drew_it(lab):
    base, _, _, updates = lab
    full, lora = updates["full FT"], updates["LoRA r=8"]
    modules = dict(full.result.model.named_modules())
    name = "blocks.1.attn.q_proj"
    assert torch.equal(full.deltas[name], modules[name].weight.detach() - dict(base.named_modules())[name].weight)
    assert len(full.deltas) == len(lora.deltas) == 8 and not full.a_matrices
    assert int(torch.linalg.matrix_rank(lora.deltas[name])) <= 8
    # the recorded start is the A finetune drew: B @ (A - A_0) is not what moved, but A_0 has the init's scale
    a0 = lora.a_initial[name]
    assert a0.shape == (8, 32) and math.isclose(float(a0.std()), 1 / math.sqrt(32), rel_tol=0.25)
    assert 0 < lora.a_moved("q_proj") < 10
    assert not torch.equal(lora.a_initial[name], updates["LoRA r=8 seed 1"].a_initial[name])


def test_tables_hold_their_invariants(lab):
    base, task, tokenizer, updates = lab
    spectrum = paper_lab.spectrum_rows(updates, base)
    assert [r["matrix"] for r in spectrum] == list(paper_lab.MATRIX_TYPES)
    for row in spectrum:
        assert row["LoRA r=4"] <= 4 and row["LoRA r=8"] <= 8 and row["Gaussian"] <= row["max rank"] == 32
    similarity = paper_lab.similarity_rows(updates, [("LoRA r=8", "LoRA r=16"), ("LoRA r=8", "LoRA r=8 seed 1")])
    assert len(similarity) == 8
    assert all(0 <= r["phi(1,1)"] <= 1 and 0 <= r["chance reaches it"] <= 1 for r in similarity)
    table_7 = paper_lab.amplification_rows(updates, base, "blocks.1.attn.q_proj", {4: "LoRA r=4", 16: "LoRA r=16"})
    assert [r["r"] for r in table_7] == [4, 16] and table_7[0]["paper amplification"] == pytest.approx(6.91 / 0.32)
    assert all(r["onto Delta W"] <= r["onto W"] + 1e-9 and r["amplification"] > 0 for r in table_7)
    intruders = paper_lab.intruder_rows(updates, base)
    for row in intruders:  # a higher eps calls more vectors intruders, never fewer; at most k = 10 per matrix
        counts = [row[c] for c in row if c.startswith("eps=")]
        assert counts == sorted(counts) and counts[-1] <= 10 * row["matrices"]
    tradeoff = paper_lab.intruder_tradeoff(
        updates["LoRA r=8"], base, task, tokenizer, factors=(1.0, 0.0), eval_chars=300
    )
    assert tradeoff[0]["target"] == pytest.approx(updates["LoRA r=8"].result.losses["target"], abs=1e-4)
    with pytest.raises(ValueError, match="A matrices"):
        paper_lab.similarity_rows(updates, [("full FT", "LoRA r=8")])


def test_chance_of_top_similarity_matches_random_matrices():
    # the exact law (Beta(1/2, (k-1)/2), mean 1/k) against phi of actual Gaussian A's
    gen = torch.Generator().manual_seed(1)
    k = 16
    drawn = [float(subspace_similarity(torch.randn(3, k, generator=gen), torch.randn(7, k, generator=gen))[0, 0])
             for _ in range(400)]  # fmt: skip
    assert abs(sum(drawn) / len(drawn) - 1 / k) < 0.02
    threshold = sorted(drawn)[int(0.9 * len(drawn))]  # 10% of random pairs reach it
    assert abs(paper_lab.top_similarity_chance(threshold, k, layers=1) - 0.1) < 0.05
    assert paper_lab.top_similarity_chance(1.0, k, layers=4) == 0.0
    assert paper_lab.top_similarity_chance(0.0, k, layers=4) == 1.0


def spectrum_of(full, lora, gaussian=60.0):
    return [{"matrix": m, "max rank": 128, "Gaussian": gaussian, "W0": 30, "full FT": full, "LoRA r=8": lora}
            for m in paper_lab.MATRIX_TYPES]  # fmt: skip


def test_verdict_rules_on_constructed_tables():
    assert paper_lab.rank_verdict(spectrum_of(60, 5))["verdict"] == "reproduced"
    assert paper_lab.rank_verdict(spectrum_of(20, 5))["verdict"] == "partly"
    assert paper_lab.rank_verdict(spectrum_of(6, 5))["verdict"] == "not reproduced"
    row = lambda phi, p: {"pair": "a vs b", "phi(1,1)": phi, "chance reaches it": p, "A moved (first)": 0.1}  # noqa: E731
    assert paper_lab.similarity_verdict([row(0.7, 0.0)] * 4, "a vs b")["verdict"] == "reproduced"
    assert paper_lab.similarity_verdict([row(0.2, 0.0)] * 4, "a vs b")["verdict"] == "partly"
    assert paper_lab.similarity_verdict([row(0.01, 0.6)] * 4, "a vs b")["verdict"] == "not reproduced"
    with pytest.raises(ValueError, match="No similarity rows"):
        paper_lab.similarity_verdict([row(0.7, 0.0)], "c vs d")
    amp = lambda r, f, onto, w: {"r": r, "amplification": f, "onto Delta W": onto, "onto W": w,  # noqa: E731
                                 "||Delta W|| / ||W||": 0.5, "paper ||Delta W|| / ||W||": 0.11}  # fmt: skip
    assert paper_lab.amplification_verdict([amp(4, 20, 0.3, 20), amp(64, 2, 2, 30)])["verdict"] == "reproduced"
    assert paper_lab.amplification_verdict([amp(4, 0.5, 0.3, 20), amp(64, 2, 2, 30)])["verdict"] == "not reproduced"
    intr = lambda lora, full: [{"run": "LoRA r=8", "matrices": 16, "eps=0.5": lora},  # noqa: E731
                               {"run": "full FT", "matrices": 16, "eps=0.5": full}]  # fmt: skip
    assert paper_lab.intruder_verdict(intr(40, 0))["verdict"] == "reproduced"
    assert paper_lab.intruder_verdict(intr(40, 10))["verdict"] == "partly"
    assert paper_lab.intruder_verdict(intr(0, 0))["verdict"] == "not reproduced"


def test_write_paper_lab_writes_its_folder_and_refuses_a_foreign_one(lab, tmp_path):
    base, _, _, updates = lab
    tables = {"spectrum": paper_lab.spectrum_rows(updates, base)}
    figures = {"spectrum": paper_lab.spectrum_figure(updates, base, "blocks.1.attn.q_proj")}
    written = paper_lab.write_paper_lab(tables, figures, tmp_path / "lab")
    assert (tmp_path / "lab" / "spectrum.csv").read_text().startswith("matrix,max rank,Gaussian,W0,full FT")
    assert (tmp_path / "lab" / "spectrum.png").read_bytes()[:4] == b"\x89PNG" and len(written) == 2
    paper_lab.write_paper_lab(tables, figures, tmp_path / "lab")  # its own folder: rewritten
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(OutputExistsError):
        paper_lab.write_paper_lab(tables, figures, foreign)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]


def test_check_top_similarity_names_the_classic_bugs():
    def right(a, b):
        return float(subspace_similarity(a, b)[0, 0])

    def unsquared(a, b):
        return abs(float(torch.linalg.svd(a).Vh[0] @ torch.linalg.svd(b).Vh[0]))

    def first_rows(a, b):
        return float((a[0] / a[0].norm()) @ (b[0] / b[0].norm())) ** 2

    def left(a, b):
        return float(torch.linalg.svd(a).U[:, 0] @ torch.linalg.svd(b).U[:, 0]) ** 2

    def stub(a, b):
        raise NotImplementedError

    assert exercises.check_top_similarity(right).ok
    assert "squared cosine" in str(exercises.check_top_similarity(unsquared))
    assert "not rows of A" in str(exercises.check_top_similarity(first_rows))
    wrong = exercises.check_top_similarity(left)
    assert not wrong.ok and "left-singular" in str(wrong)
    assert exercises.check_top_similarity(stub).unanswered


def test_the_command_line_writes_the_lab_and_refuses_a_bad_rank_before_any_work(tmp_path, capsys):
    import os

    from lora_lab.cli import main

    source = os.environ.get("LORA_LAB_DATA") or write_synthetic_corpus(tmp_path / "input.txt")
    common = ["--data", str(source), "--cache", str(tmp_path / "cache"), "--pretrain-iters", "20", "--device", "cpu"]
    out = tmp_path / "lab"
    assert main(["paper-lab", *common, "--high-rank", "200", "--out", str(out)]) == 2
    assert "--high-rank" in capsys.readouterr().err and not out.exists() and not (tmp_path / "cache").exists()
    argv = ["paper-lab", *common, "--quiet", "--steps", "4", "--high-rank", "16", "--eval-chars", "300"]
    assert main([*argv, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "finding" in printed and "verdict" in printed
    names = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert "table_7.csv" in names and "findings.csv" in names and "similarity.png" in names
    assert "LoRA r=16" in (out / "table_7.csv").read_text()

"""Mixed-adapter batches (lora_lab.storage.mixed): every row equals that row run alone through its adapter."""

import copy

import pytest
import torch
import torch.nn.functional as F
from tiny_models import assert_same, snapshot, tiny_gpt, tokens

from lora_lab import LoRAConfig, LoRAError, LoRALinear, apply_lora, merge_lora, register_variant, save_adapter
from lora_lab.storage.mixed import MixedAdapterModel, serves_rows
from lora_lab.variants import VARIANTS

BUILT_INS = sorted(n for n, cls in VARIANTS.items() if cls.__module__.startswith("lora_lab."))

TOLERANCE = dict(rtol=0, atol=1e-5)  # fp32; the rows go through the same matmuls in other batch shapes


def trained_adapter(base, variant="lora", seed=0, targets=("q_proj", "v_proj")):
    """An adapted copy of base whose adapter tensors are random (as if trained), so every branch matters."""
    model = apply_lora(copy.deepcopy(base), LoRAConfig(r=2, alpha=4, targets=targets, variant=variant))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return model.eval()


def test_every_built_in_variant_serves_rows():
    assert {"lora", "dora", "pissa", "vera", "rslora", "lora_fa"} <= set(BUILT_INS)
    assert all(VARIANTS[v].rows_independent is True and serves_rows(v) for v in BUILT_INS)


@pytest.mark.parametrize("variant", BUILT_INS)
def test_each_row_equals_that_row_alone_with_its_adapter(variant):
    base = tiny_gpt()
    adapted = {
        "a": trained_adapter(base, variant, seed=1),
        "b": trained_adapter(base, variant, seed=2, targets=("q_proj", "k_proj", "o_proj")),
    }
    mixed = MixedAdapterModel(base)
    for name, model in adapted.items():
        mixed.add(name, model)
    idx = tokens(batch=5)
    names = ["a", None, "b", "a", "b"]
    logits, _ = mixed(idx, names)
    for i, name in enumerate(names):
        alone, _ = (adapted[name] if name else base)(idx[i : i + 1])
        torch.testing.assert_close(logits[i : i + 1], alone, **TOLERANCE)
    assert not torch.allclose(logits[0], logits[1], atol=1e-3)  # the adapters do change the rows


def test_adapters_of_different_variants_share_a_batch():
    base = tiny_gpt()
    adapted = {v: trained_adapter(base, v, seed=i) for i, v in enumerate(("lora", "dora", "vera", "pissa"))}
    mixed = MixedAdapterModel(base)
    for name, model in adapted.items():
        mixed.add(name, model)
    idx = tokens(batch=4, seed=3)
    logits, _ = mixed(idx, list(adapted))
    for i, model in enumerate(adapted.values()):
        torch.testing.assert_close(logits[i : i + 1], model(idx[i : i + 1])[0], **TOLERANCE)


def test_adapters_from_files_and_the_loss_of_a_mixed_batch(tmp_path):
    base = tiny_gpt()
    adapted = trained_adapter(base, seed=4)
    save_adapter(adapted, tmp_path / "a")
    mixed = MixedAdapterModel(base)
    mixed.add("a", tmp_path / "a")
    idx = tokens(batch=2, seed=5)
    _, loss = mixed(idx[:, :-1], ["a", None], idx[:, 1:])
    logits = torch.cat([adapted(idx[:1, :-1])[0], base(idx[1:, :-1])[0]])
    expected = F.cross_entropy(logits.reshape(-1, logits.size(-1)), idx[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, expected, **TOLERANCE)


def test_generate_gives_each_row_its_adapters_text():
    base = tiny_gpt()
    adapted = {"a": trained_adapter(base, seed=6), "b": trained_adapter(base, "dora", seed=7)}
    mixed = MixedAdapterModel(base)
    for name, model in adapted.items():
        mixed.add(name, model)
    prompt = tokens(batch=3, seed=8)[:, :4]
    names = ["b", "a", None]
    out = mixed.generate(prompt, names, max_new_tokens=8, top_k=1)  # greedy: no sampling order to match
    for i, name in enumerate(names):
        alone = (adapted[name] if name else base).generate(prompt[i : i + 1], 8, top_k=1)
        assert torch.equal(out[i : i + 1], alone)


def test_the_model_is_the_plain_base_outside_calls():
    base = tiny_gpt()
    before = snapshot(base)
    mixed = MixedAdapterModel(base)
    mixed.add("a", trained_adapter(base, seed=9))
    mixed(tokens(batch=2), ["a", None])
    assert_same(base, before)


def test_bad_adapter_names_are_refused_and_nothing_changes():
    base = tiny_gpt()
    mixed = MixedAdapterModel(base)
    mixed.add("a", trained_adapter(base, seed=10))
    before = snapshot(base)
    with pytest.raises(LoRAError, match=r"No adapter named 'nope'.*\['a'\]"):
        mixed(tokens(batch=2), ["a", "nope"])
    with pytest.raises(ValueError, match="one entry .* per row: 2 rows"):
        mixed(tokens(batch=2), ["a"])
    with pytest.raises(ValueError, match="per row"):
        mixed(tokens(batch=2), "a")
    with pytest.raises(LoRAError, match="already exists"):
        mixed.add("a", trained_adapter(base, seed=11))
    with pytest.raises(LoRAError, match="non-empty"):
        mixed.add("", trained_adapter(base, seed=11))
    assert_same(base, before)
    assert mixed.names == ["a"]


def test_merged_and_adapted_models_are_refused():
    merged = trained_adapter(tiny_gpt(), seed=12)
    merge_lora(merged)
    before = snapshot(merged)
    with pytest.raises(LoRAError, match="merged W already holds one adapter's update for every row"):
        MixedAdapterModel(merged)
    assert_same(merged, before)
    with pytest.raises(LoRAError, match="plain base"):
        MixedAdapterModel(trained_adapter(tiny_gpt(), seed=12))


class BatchCenteredLoRA(LoRALinear):
    """LoRA whose branch subtracts its mean over the batch: rows are not independent.
    Trainable parameters per layer: r*(d+k)"""

    variant, parameter_formula = "batch_centered_test", "r*(d+k)"

    def forward(self, x):
        branch = F.linear(F.linear(x, self.lora_A) * self.scale, self.lora_B)
        return self.base(x) + branch - branch.mean(dim=0, keepdim=True)


@pytest.fixture
def batch_centered():
    """The variant, registered for one test only (other test files go through every registered variant)."""
    register_variant(BatchCenteredLoRA)
    yield BatchCenteredLoRA.variant
    del VARIANTS[BatchCenteredLoRA.variant]


def test_a_variant_not_known_to_run_per_row_is_refused(batch_centered):
    base = tiny_gpt()
    before = snapshot(base)
    mixed = MixedAdapterModel(base)
    with pytest.raises(
        LoRAError,
        match="'batch_centered_test' adapter, which is not known to compute each row.*rows_independent = False",
    ):
        mixed.add("c", trained_adapter(base, "batch_centered_test", seed=13))
    assert mixed.names == [] and not mixed.mixers
    assert_same(base, before)
    BatchCenteredLoRA.rows_independent = True  # a custom variant that does run per row opts in
    try:
        assert serves_rows("batch_centered_test")
    finally:
        del BatchCenteredLoRA.rows_independent


def test_throughput_measures_the_three_ways_of_serving_the_same_rows():
    from lora_lab.experiments.scaling import adapted_copies, mixed_batch_throughput

    base = tiny_gpt()
    adapters = adapted_copies(base, LoRAConfig(r=2, alpha=4, targets=("q_proj",)), 3)
    rows = mixed_batch_throughput(base, adapters, rows_per_adapter=2, repeats=1)
    assert [(r.how, r.passes) for r in rows] == [
        ("one mixed batch", 1),
        ("one pass per adapter", 3),
        ("swap adapters on one base", 3),
    ]
    assert all(r.tokens_per_second > 0 for r in rows)


def test_a_model_changed_after_adapters_were_added_is_refused_not_overwritten():
    base = tiny_gpt()
    mixed = MixedAdapterModel(base)
    mixed.add("a", trained_adapter(base, seed=1))
    apply_lora(base, LoRAConfig(r=2, targets=("q_proj",)))  # the user adapts the same model meanwhile
    before = snapshot(base)
    with pytest.raises(LoRAError, match="model was changed since adapters were added"):
        mixed(tokens(batch=2), ["a", None])
    assert_same(base, before)  # the user's LoRA layers are still there
    with pytest.raises(LoRAError, match="model was changed"):
        mixed.add("b", trained_adapter(tiny_gpt(), seed=2))

"""The notebook widgets, driven the way a notebook drives them: set a control's .value, read what was computed."""

import math

import pytest
import torch

from lora_lab import GPT, CharTokenizer, GPTConfig, LoRAConfig, apply_lora, parameter_report
from lora_lab.course import numerics, widgets
from lora_lab.model import count_parameters_formula
from lora_lab.train import TrainConfig


def image_of(output) -> bool:
    return len(output.outputs) == 1 and output.outputs[0]["data"]["image/png"]


# ---------------------------------------------------------------------------------------------------
# display


def test_text_form_of_a_widget_is_its_summary():
    counter = widgets.LoRAShapeCounter(d=64, k=32, r=2)
    bundle = counter._repr_mimebundle_()
    assert bundle["text/plain"] == counter.summary() == repr(counter)
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert "64" in bundle["text/plain"] and "r=2" in bundle["text/plain"]


# ---------------------------------------------------------------------------------------------------
# chapter 1


def test_low_rank_explorer_follows_the_slider():
    W = torch.randn(20, 12)
    explorer = widgets.LowRankExplorer(W, r=3, name="W", as_image=False)
    assert explorer.rank.max == 12 and explorer.r == 3
    errors = []
    for r in range(1, 13):
        explorer.rank.value = r
        assert explorer.r == r
        assert math.isclose(explorer.error, explorer.predicted_error, rel_tol=1e-9, abs_tol=1e-9)
        assert explorer.stored_numbers == r * (20 + 12)
        assert int(torch.linalg.matrix_rank(explorer.approximation)) == r
        assert f"rank {r}:" in explorer.numbers.value
        assert image_of(explorer.plot)
        errors.append(explorer.error)
    assert all(a > b for a, b in zip(errors, errors[1:]))  # more rank, less error
    assert errors[-1] < 1e-9 and explorer.relative_error < 1e-9
    assert "rank 12" in explorer.summary()


def test_low_rank_explorer_says_more_not_fewer_past_the_break_even_rank():
    explorer = widgets.LowRankExplorer(torch.randn(96, 96), r=47, as_image=False)
    assert explorer.numbers.value.endswith("stores 9,024 numbers instead of 9,216 (1.02x fewer)")
    explorer.rank.value = 48  # 48 * (96 + 96) == 96 * 96
    assert explorer.numbers.value.endswith("stores 9,216 numbers instead of 9,216 (as many)")
    explorer.rank.value = 51  # 9,792 numbers: more than the matrix, never "0.9x fewer"
    assert explorer.numbers.value.endswith("stores 9,792 numbers instead of 9,216 (1.06x more)")
    assert explorer.compression < 1


def test_low_rank_explorer_rejects_a_vector():
    with pytest.raises(ValueError, match="2-D"):
        widgets.LowRankExplorer(torch.zeros(5))


# ---------------------------------------------------------------------------------------------------
# chapter 2


def test_shape_counter():
    counter = widgets.LoRAShapeCounter(d=128, k=128, r=8)
    assert (counter.full_params, counter.lora_params, counter.ratio) == (16384, 2048, 8.0)
    counter.d.value = 4096
    counter.k.value = 1024
    counter.r.value = 16
    assert counter.full_params == 4096 * 1024 and counter.lora_params == 16 * 5120
    assert math.isclose(counter.break_even_rank, 4096 * 1024 / 5120)
    assert f"{counter.lora_params:,}" in counter.numbers.value


@pytest.mark.parametrize("d, k", [(4096, 1024), (128, 128), (16, 48), (1024, 1024)])
def test_shape_counter_last_saving_rank_is_exact(d, k):
    counter = widgets.LoRAShapeCounter(d=d, k=k, r=1)
    last = counter.last_saving_rank
    assert last * (d + k) < d * k <= (last + 1) * (d + k)  # r = last still saves, last + 1 does not
    assert f"LoRA saves up to r = {last}; from r = {last + 1} on" in counter.numbers.value
    if last + 1 <= counter.r.max:
        counter.r.value = last + 1
        assert "fewer" not in counter.numbers.value.split(".")[0]
    assert (4096 * 1024 - 1) // 5120 == 819  # the case chapter 2 prints: 819 saves, 820 does not


def test_model_counter_reproduces_the_papers_gpt3_numbers():
    counter = widgets.ModelLoRACounter(model="GPT-3 175B", r=1, targets=("q_proj", "v_proj"))
    assert counter.lora_params == 4_718_592  # the paper's 4.7M
    counter.r.value = 8
    assert counter.lora_params == 37_748_736  # the paper's 37.7M
    counter.r.value = 4
    assert counter.adapter_bytes == 2 * counter.lora_params
    assert round(counter.base_params / 1e9) == 175
    assert 9_000 < counter.full_checkpoint_bytes / counter.adapter_bytes < 10_000


def test_model_counter_switching_model_and_targets():
    counter = widgets.ModelLoRACounter(model="GPT-3 175B", r=8, targets=("q_proj", "v_proj"))
    counter.model.value = "lora_lab tiny"
    assert (counter.n_layer.value, counter.d_model.value) == (4, 128)
    config = GPTConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128)
    model = apply_lora(GPT(config), LoRAConfig(r=8, targets=("q_proj", "v_proj")))
    assert counter.lora_params == parameter_report(model).lora_params
    assert counter.base_params == count_parameters_formula(config)
    counter.targets.value = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")
    assert counter.lora_params == numerics.transformer_lora_params(4, 128, 8, numerics.block_linears())
    counter.targets.value = ()
    assert counter.lora_params == 0 and "nothing" in counter.numbers.value
    counter.n_layer.value = 2
    assert counter.base_params == count_parameters_formula(
        GPTConfig(vocab_size=65, block_size=64, n_layer=2, n_head=1, n_embd=128)
    )


# ---------------------------------------------------------------------------------------------------
# chapter 3


@pytest.fixture
def tiny_model_and_tokenizer():
    tokenizer = CharTokenizer.from_text("abcdefgh \n")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=16, n_layer=2, n_head=2, n_embd=32))
    return model, tokenizer


def test_sample_text_is_seeded(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    a = widgets.sample_text(model, tok, "abc", length=40, seed=1)
    assert len(a) == 40 and set(a) <= set(tok.chars)
    assert a == widgets.sample_text(model, tok, "abc", length=40, seed=1)
    assert a != widgets.sample_text(model, tok, "abc", length=40, seed=2)
    model.train()
    widgets.sample_text(model, tok, "abc", length=3)
    assert model.training  # the mode is restored
    with pytest.raises(ValueError, match="prompt"):
        widgets.sample_text(model, tok, "", length=3)


def test_sample_explorer_follows_its_controls(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    explorer = widgets.SampleExplorer(model, tok, prompt="ab", length=30, seed=0)
    first = explorer.text
    assert explorer.output.value == "ab" + first
    explorer.seed.value = 5
    assert explorer.text == widgets.sample_text(model, tok, "ab", 30, seed=5) != first
    explorer.temperature.value = 0.3
    explorer.top_k.value = 2
    assert explorer.text == widgets.sample_text(model, tok, "ab", 30, temperature=0.3, top_k=2, seed=5)
    explorer.length.value = 50
    assert len(explorer.text) == 50
    explorer.prompt.value = "xyz"  # not in the vocabulary: reported, not raised
    assert explorer.text == "" and "'x'" in explorer.error and explorer.output.value.startswith("[")
    explorer.prompt.value = "h"
    assert explorer.error == "" and len(explorer.text) == 50


def test_plot_history_draws_each_run():
    history = {"losses": [3.0, 2.5, 2.0], "evals": [{"iter": 0, "val": 3.1}, {"iter": 3, "val": 2.1}]}
    fig = widgets.plot_history({"a": history, "b": history})
    (ax,) = fig.axes
    assert len(ax.lines) == 4
    assert [tuple(line.get_xdata()) for line in ax.lines[1::2]] == [(0, 3), (0, 3)]


# ---------------------------------------------------------------------------------------------------
# chapter 4


def test_sample_comparer_samples_every_model(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    torch.manual_seed(1)
    other = GPT(model.config)
    comparer = widgets.SampleComparer({"one": model, "two": other}, tok, prompt="ab", length=20, seed=0)
    assert set(comparer.texts) == {"one", "two"} and comparer.texts["one"] != comparer.texts["two"]
    comparer.seed.value = 4
    comparer.temperature.value = 0.5
    assert comparer.texts["two"] == widgets.sample_text(other, tok, "ab", 20, temperature=0.5, seed=4)
    assert "<pre>ab" in comparer.table.value
    comparer.prompt.value = "<z>"
    assert comparer.texts == {} and "'<'" in comparer.error and "&lt;" in comparer.table.value
    with pytest.raises(ValueError, match="at least one"):
        widgets.SampleComparer({}, tok)


# ---------------------------------------------------------------------------------------------------
# chapter 6


def test_adapter_switcher_drives_the_bank(tiny_model_and_tokenizer, tmp_path):
    from lora_lab import AdapterBank, save_adapter

    model, tok = tiny_model_and_tokenizer
    adapted = {}
    for i, name in enumerate(("a", "b")):
        m = GPT(model.config)
        m.load_state_dict(model.state_dict())  # the same base weights as `model` (the adapter's digest checks it)
        apply_lora(m, LoRAConfig(r=2, targets=("v_proj", "o_proj", "up_proj", "down_proj")))
        with torch.no_grad():  # a strong random adapter, so that it visibly changes the samples
            for p in m.parameters():
                if p.requires_grad:
                    p.normal_(0, 3.0, generator=torch.Generator().manual_seed(i))
        save_adapter(m, tmp_path / name)
        adapted[name] = m
    bank = AdapterBank(model)
    bank.add("a", tmp_path / "a")
    bank.add("b", tmp_path / "b")
    switcher = widgets.AdapterSwitcher(bank, tok, prompt="ab", length=25, seed=2)
    assert switcher.active is None and switcher.adapter.options[0] == widgets.AdapterSwitcher.BASE
    base_text = switcher.text
    prompt = torch.tensor([tok.encode("ab")])
    base_logits = bank.model(prompt)[0]
    switcher.adapter.value = "b"
    assert bank.active == "b" == switcher.active
    # an untrained model's logits are near zero, so compare them as well as the (seeded) samples
    adapted_logits = bank.model(prompt)[0]
    assert torch.allclose(adapted_logits, adapted["b"](prompt)[0], atol=1e-3)
    assert (adapted_logits - base_logits).abs().max() > 1e-2
    assert switcher.text == widgets.sample_text(adapted["b"], tok, "ab", 25, seed=2)
    switcher.adapter.value = widgets.AdapterSwitcher.BASE
    assert bank.active is None and switcher.text == base_text
    switcher.prompt.value = "@"
    assert switcher.text == "" and switcher.error
    assert "2 adapters" in switcher.summary()


# ---------------------------------------------------------------------------------------------------
# chapter 7


def test_rank_dashboard_caches_each_setting(tiny_config):
    calls = []

    def evaluate(lora):
        calls.append(lora)
        r = 1000 if lora is None else lora.r
        return {"target": 2.0 + 1 / r + 0.01 * len(lora.targets if lora else ()), "source": 1.5}

    model = GPT(tiny_config)
    dash = widgets.RankDashboard(model, ranks=(1, 2, 4), r=2, groups=("Wv", "Wq"), evaluate=evaluate)
    assert [c if c is None else (c.r, c.targets) for c in calls] == [None, (2, ("q_proj", "v_proj"))]
    assert dash.full.trainable_params == model.num_parameters()
    assert dash.current.groups == ("Wq", "Wv") and dash.current.r == 2
    expected = numerics.transformer_lora_params(tiny_config.n_layer, tiny_config.n_embd, 2, ("q_proj", "v_proj"))
    assert dash.current.trainable_params == expected
    assert (dash.current.adapter_bytes, dash.current.optimizer_bytes) == (4 * expected, 12 * expected)
    assert calls[-1].alpha == 16.0  # alpha is fixed across ranks

    dash.rank.value = 4
    assert not dash.from_cache and dash.fine_tunes == 3
    dash.rank.value = 2
    assert dash.from_cache and dash.fine_tunes == 3 and len(calls) == 3
    dash.targets.value = ("Wq", "Wv", "MLP")
    assert calls[-1].targets == ("q_proj", "v_proj", "up_proj", "down_proj")
    dash.targets.value = ()
    assert dash.error and len(calls) == 4
    dash.targets.value = ("Wq",)
    assert dash.error == "" and dash.current.label == "r=2 Wq"
    dash.compute_all([(1, ("Wo",)), (2, ("Wq",))])
    assert len(calls) == 6
    table = dash.table().splitlines()
    assert len(table) == 1 + len(dash.results) and "full FT" in table[-1]  # sorted by memory: full FT last
    assert image_of(dash.plot) and len(dash.figure().axes) == 1


def test_rank_dashboard_says_what_trains_and_names_every_point_in_a_legend(tiny_config):
    statuses = []

    def evaluate(lora):
        statuses.append(dash_status[0].value if dash_status else "")
        return {"target": 2.0 if lora is None else 2.0 + 1 / lora.r, "source": 1.5}

    dash_status = []
    model = GPT(tiny_config)
    dash = widgets.RankDashboard(
        model, ranks=(1, 2, 4), r=2, groups=("Wq", "Wv"), evaluate=evaluate, include_full=False
    )
    dash_status.append(dash.status)
    assert dash.status.value.startswith("r=2 Wq+Wv: fine-tuned in ")
    dash.rank.value = 4
    assert statuses[-1] == "fine-tuning r=4 Wq+Wv: not in the cache yet..."  # shown while it trains
    dash.rank.value = 2
    assert dash.status.value == "r=2 Wq+Wv: from the cache (no new fine-tune)"
    assert "step memory" in dash.numbers.value and "gradients + AdamW moments" in dash.numbers.value
    lora = dash.lora_config(2, ("Wq", "Wv"))
    step = numerics.setting_memory(model, lora, TrainConfig().batch_size, model.config.block_size)
    assert dash.current.step_bytes == step.total > dash.current.optimizer_bytes  # the whole step, from the ledger
    # two settings with the same memory (r=4 on Wq alone, r=2 on Wq+Wv): each named once, in the legend
    dash.compute_all([(4, ("Wq",)), (1, ("Wq", "Wv"))])
    ax = dash.figure().axes[0]
    labels = ax.get_legend_handles_labels()[1]
    settings = [p.label for p in dash.results.values()]
    assert all(labels.count(label) == 1 for label in settings) and not ax.texts  # no labels drawn on the points
    assert "the memory ledger" in ax.get_xlabel()


def test_rank_dashboard_rejects_bad_settings(tiny_config):
    model = GPT(tiny_config)
    fake = lambda lora: {"target": 1.0, "source": 1.0}  # noqa: E731
    with pytest.raises(ValueError, match="starting rank"):
        widgets.RankDashboard(model, ranks=(1, 2), r=4, evaluate=fake)
    with pytest.raises(ValueError, match="target group"):
        widgets.RankDashboard(model, groups=("Wz",), evaluate=fake)
    with pytest.raises(ValueError, match="task and a tokenizer"):
        widgets.RankDashboard(model)


def test_rank_dashboard_fine_tunes_for_real(tiny_model_and_tokenizer):
    from lora_lab.experiments.finetune import finetune, finetune_config
    from lora_lab.tasks import Task

    model, tok = tiny_model_and_tokenizer
    text = "abc defg hab \n" * 40
    task = Task("toy", "toy", train=text, validation=text[:200], source_validation=text[:200].upper().lower())
    cfg = finetune_config(max_iters=4, batch_size=2, eval_iters=1)
    dash = widgets.RankDashboard(model, task, tok, cfg, ranks=(1, 2), r=1, groups=("Wq",), include_full=False)
    assert dash.full is None and dash.fine_tunes == 1
    assert dash.progress.value == 1.0  # the bar reached the last step of the fine-tune
    seen = []
    ft_points = finetune(
        model,
        task,
        tok,
        None,
        cfg,
        progress=False,
        curve_points=3,
        on_point=lambda step, steps: seen.append((step, steps)),
    )
    assert seen == [(0, 4), (2, 4), (4, 4)] and [p["step"] for p in ft_points.curve] == [0, 2, 4]
    # full fine-tuning, when asked for, gets its own (smaller) learning rate at the same budget
    full_defaults = finetune_config(full=True)
    assert dash.full_train_config.learning_rate == full_defaults.learning_rate != cfg.learning_rate
    assert (dash.full_train_config.max_iters, dash.full_train_config.batch_size) == (4, 2)
    assert math.isfinite(dash.current.target_loss) and set(dash.base_losses) == {"target", "source"}
    first = dash.current
    dash.rank.value = 2
    dash.rank.value = 1
    assert dash.from_cache and dash.current == first


# ---------------------------------------------------------------------------------------------------
# bad starting values: refused by name instead of silently clamped by a slider


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda m, t: widgets.LowRankExplorer(torch.eye(8), r=50), "r must be an integer from 1 to 8"),
        (lambda m, t: widgets.LowRankExplorer([[1.0]], r=1), "matrix must be a 2-D torch.Tensor"),
        (lambda m, t: widgets.LoRAShapeCounter(d=8), "d must be an integer from 16 to 16384"),
        (lambda m, t: widgets.LoRAShapeCounter(r=0), "r must be an integer from 1 to 256"),
        (lambda m, t: widgets.ModelLoRACounter(model="GPT-5"), "Unknown model 'GPT-5'"),
        (lambda m, t: widgets.ModelLoRACounter(targets=("wq",)), r"Unknown target\(s\) \['wq'\]"),
        (lambda m, t: widgets.ModelLoRACounter(r=100), "r must be an integer from 1 to 64"),
        (lambda m, t: widgets.ModelLoRACounter(bytes_per_param=0), "bytes_per_param must be a positive integer"),
        (lambda m, t: widgets.SampleExplorer(m, t, prompt="a", length=5), "length must be an integer from 10 to 1000"),
        (lambda m, t: widgets.SampleExplorer(m, t, prompt=""), "prompt must be a non-empty string"),
        (lambda m, t: widgets.SampleComparer({"m": m}, t, prompt="a", length=601), "length must be an integer from 10"),
        (lambda m, t: widgets.SampleComparer([m], t, prompt="a"), "needs a dict"),
        (lambda m, t: widgets.SampleExplorer(m, t, prompt="a", seed="1"), "seed must be an integer"),
        (lambda m, t: widgets.RankDashboard(m, evaluate=lambda c: {}, ranks=(0, 4)), "ranks must be positive integers"),
        (lambda m, t: widgets.RankDashboard(m, evaluate=lambda c: {}, alpha=float("inf")), "alpha must be a positive"),
    ],
)
def test_bad_starting_values_are_named(tiny_model_and_tokenizer, make, message):
    model, tok = tiny_model_and_tokenizer
    with pytest.raises(ValueError, match=message):
        make(model, tok)

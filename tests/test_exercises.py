"""The exercise checkers: a right answer passes, each typical wrong answer fails with a message saying why,
and an exception in the learner's code becomes a failed check rather than a crash."""

import math
from dataclasses import replace

import torch
import torch.nn as nn

from lora_lab import LoRALinear, merge_and_unload, merge_lora, unmerge_lora
from lora_lab.course import exercises, numerics
from lora_lab.model import count_parameters_formula


def failures(report) -> str:
    return "\n".join(msg for passed, msg in report.results if not passed)


def test_report_text_and_truthiness():
    report = exercises.CheckReport("demo")
    assert not report.ok  # no checks run is not a pass
    report.check(True, "fine")
    assert report.ok and bool(report) and "all 1 checks passed" in str(report)
    report.check(False, "ok text", "what went wrong")
    report.require(True, "never shown")
    assert not report.ok and "1 of 2 checks failed" in str(report)
    assert "FAIL what went wrong" in str(report) and "never shown" not in str(report)


def test_exceptions_in_learner_code_are_reported():
    report = exercises.check_rank_for_energy(lambda S, f: 1 / 0)
    assert not report.ok
    assert "ZeroDivisionError" in failures(report)


def _factorize(W, r):
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    return U[:, :r] * S[:r], Vh[:r]


def test_check_factorize():
    assert exercises.check_factorize(_factorize).ok

    def smallest(W, r):
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        return U[:, -r:] * S[-r:], Vh[-r:]

    assert "LARGEST" in failures(exercises.check_factorize(smallest))
    assert "expected B" in failures(exercises.check_factorize(lambda W, r: (W, torch.eye(W.shape[1]))))
    assert "pair of tensors" in failures(exercises.check_factorize(lambda W, r: W))


def test_check_rank_for_energy():
    def right(S, fraction):
        energy = (S**2).cumsum(0) / (S**2).sum()
        return int((energy >= fraction).nonzero()[0]) + 1

    def unsquared(S, fraction):  # a common slip: energy is sigma squared
        energy = S.cumsum(0) / S.sum()
        return int((energy >= fraction).nonzero()[0]) + 1

    assert exercises.check_rank_for_energy(right).ok
    assert not exercises.check_rank_for_energy(unsquared).ok


def test_check_gpt_lora_params():
    assert exercises.check_gpt_lora_params(numerics.transformer_lora_params).ok
    square_only = lambda L, d, r, targets: L * len(targets) * r * 2 * d  # noqa: E731
    assert "4*d_model" in failures(exercises.check_gpt_lora_params(square_only))


def test_check_break_even_rank():
    assert exercises.check_break_even_rank(lambda d, k: (d * k - 1) // (d + k)).ok
    assert "strictly" in failures(exercises.check_break_even_rank(lambda d, k: d * k // (d + k)))


def test_check_uniform_loss_and_count_parameters():
    assert exercises.check_uniform_loss(math.log).ok
    assert not exercises.check_uniform_loss(math.log2).ok
    assert exercises.check_count_parameters(count_parameters_formula).ok
    untied = lambda c: count_parameters_formula(c) + c.vocab_size * c.n_embd  # noqa: E731
    assert "count it once" in failures(exercises.check_count_parameters(untied))
    always_a_table = lambda c: count_parameters_formula(replace(c, positions="learned"))  # noqa: E731
    report = exercises.check_count_parameters(always_a_table)
    assert not report.ok and "rotary has none" in failures(report)


class _LoRA(nn.Module):
    def __init__(self, base, r, alpha, scale_by_r=True, zero_b=True, freeze=True, zero_a=False):
        super().__init__()
        self.base = base.requires_grad_(not freeze)
        a = (
            torch.zeros(r, base.in_features)
            if zero_a
            else torch.randn(r, base.in_features) / math.sqrt(base.in_features)
        )
        self.lora_A = nn.Parameter(a)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r) if zero_b else torch.randn(base.out_features, r))
        self.scale = alpha / r if scale_by_r else alpha

    def forward(self, x):
        return self.base(x) + self.scale * (x @ self.lora_A.T @ self.lora_B.T)


def test_check_lora_layer():
    assert exercises.check_lora_layer(_LoRA).ok
    assert "alpha / r" in failures(exercises.check_lora_layer(lambda b, r, a: _LoRA(b, r, a, scale_by_r=False)))
    assert "zero" in failures(exercises.check_lora_layer(lambda b, r, a: _LoRA(b, r, a, zero_b=False)))
    assert "frozen" in failures(exercises.check_lora_layer(lambda b, r, a: _LoRA(b, r, a, freeze=False)))
    # A = 0 and B = 0: the output is the base's and every later check passes, but nothing can ever learn
    saddle = exercises.check_lora_layer(lambda b, r, a: _LoRA(b, r, a, zero_a=True))
    assert not saddle.ok and "saddle point" in failures(saddle) and "A should start random" in failures(saddle)
    assert "computes exactly the base layer" in str(saddle)  # what is right is still reported right


class _SwappedLoRA(_LoRA):
    """A = 0 and B random: B A = 0, so the output is the base's, exactly as with the paper's init."""

    def __init__(self, base, r, alpha):
        super().__init__(base, r, alpha)
        with torch.no_grad():
            self.lora_B.copy_(torch.randn_like(self.lora_B))
            self.lora_A.zero_()


def test_check_lora_layer_catches_the_swapped_init():
    report = exercises.check_lora_layer(_SwappedLoRA)
    assert not report.ok and not report.unanswered
    assert "swapped" in failures(report) and "LoRA starts A random and B at zero" in failures(report)
    assert "saddle point" not in failures(report)
    assert "computes exactly the base layer" in str(report)  # the output alone could not tell


def test_check_lora_layer_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    exercises.check_lora_layer(_LoRA)
    assert torch.equal(torch.rand(3), expected)


def test_check_merged_weight():
    right = lambda layer: layer.base.weight + layer.scale * layer.lora_B @ layer.lora_A  # noqa: E731
    assert exercises.check_merged_weight(right).ok
    assert not exercises.check_merged_weight(lambda layer: layer.base.weight).ok

    def in_place(layer):
        with torch.no_grad():
            layer.base.weight += layer.delta_weight()
        return layer.base.weight

    assert "left unchanged" not in failures(exercises.check_merged_weight(in_place))
    assert "changed the layer" in failures(exercises.check_merged_weight(in_place))


def test_check_training_bytes():
    assert exercises.check_training_bytes(lambda f, t: 4 * (f + t) + 12 * t).ok
    assert "no gradient" in failures(exercises.check_training_bytes(lambda f, t: 16 * (f + t)))
    assert "gradient" in failures(exercises.check_training_bytes(lambda f, t: 4 * (f + t) + 8 * t))


def test_check_adapter_payload():
    right = lambda c, lora: 4 * numerics.transformer_lora_params(c.n_layer, c.n_embd, lora.r, lora.targets)  # noqa: E731
    assert exercises.check_adapter_payload(right).ok
    half = lambda c, lora: right(c, lora) // 2  # noqa: E731
    assert "saved file holds" in failures(exercises.check_adapter_payload(half))


def test_check_best_setting():
    def right(results, budget):
        fits = [p for p in results if p.optimizer_bytes <= budget]
        return min(fits, key=lambda p: p.target_loss) if fits else None

    def cheapest(results, budget):  # ignores quality
        fits = [p for p in results if p.optimizer_bytes <= budget]
        return min(fits, key=lambda p: p.optimizer_bytes) if fits else None

    assert exercises.check_best_setting(right).ok
    assert not exercises.check_best_setting(cheapest).ok
    assert not exercises.check_best_setting(lambda results, budget: min(results, key=lambda p: p.target_loss)).ok


def test_a_value_instead_of_a_function_is_explained():
    from lora_lab.course import exercises

    report = exercises.check_break_even_rank(42)
    assert not report.ok
    assert "expected your function (or class) itself, got a int" in str(report) and "without calling it" in str(report)


# ---------------------------------------------------------------------------------------------------
# The chapters' stubs, and the exercises that train or measure something


def _stub(*args):
    raise NotImplementedError


def test_a_stub_is_reported_as_unanswered_not_as_failures():
    report = exercises.check_rank_for_energy(_stub)
    assert report.unanswered and not report.ok
    assert "not answered yet" in str(report) and "solutions.ipynb" in str(report) and "FAIL" not in str(report)
    half = exercises.check_rank_for_energy(lambda S, f: _stub() if f > 0.9 else 1)
    assert not half.unanswered  # a partly written answer gets the full report
    assert "FAIL" in str(half)


def _smallest_rank_below(W, limit):
    norm = torch.linalg.matrix_norm(W)
    for r in range(min(W.shape) + 1):
        if torch.linalg.matrix_norm(W - numerics.low_rank_approximation(W, r)) / norm < limit:
            return r


def test_check_smallest_rank_below():
    assert exercises.check_smallest_rank_below(_smallest_rank_below).ok
    not_strict = exercises.check_smallest_rank_below(lambda W, limit: _smallest_rank_below(W, limit) + 1)
    assert not not_strict.ok and "one too many" in failures(not_strict)

    def by_sigma(W, limit):  # compares sigma_r / sigma_1 with the limit instead of measuring the error
        S = torch.linalg.svdvals(W)
        return int((S / S[0] < limit).nonzero()[0])

    assert not exercises.check_smallest_rank_below(by_sigma).ok


def _trainable_share(model):
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad) / sum(p.numel() for p in params)


def test_check_trainable_share():
    assert exercises.check_trainable_share(_trainable_share).ok

    def over_frozen(model):  # the other denominator: the frozen base only
        params = list(model.parameters())
        trainable = sum(p.numel() for p in params if p.requires_grad)
        return trainable / max(1, sum(p.numel() for p in params) - trainable)

    report = exercises.check_trainable_share(over_frozen)
    assert not report.ok and "divides by the frozen base only" in failures(report)
    percent = exercises.check_trainable_share(lambda m: 100 * _trainable_share(m))
    assert not percent.ok and "not a percentage" in failures(percent)


def _whole_text_loss(model, tokens):
    block = model.config.block_size
    n = (len(tokens) - 1) // block
    model.eval()
    with torch.no_grad():
        return model(tokens[: n * block].view(n, block), tokens[1 : n * block + 1].view(n, block))[1].item()


def test_check_whole_text_loss():
    assert exercises.check_whole_text_loss(_whole_text_loss).ok

    def in_train_mode(model, tokens):  # dropout stays on: a noisy, wrong measurement
        block = model.config.block_size
        n = (len(tokens) - 1) // block
        return model(tokens[: n * block].view(n, block), tokens[1 : n * block + 1].view(n, block))[1].item()

    def overlapping(model, tokens):  # every start position: a different average
        block = model.config.block_size
        starts = range(len(tokens) - block)
        x = torch.stack([tokens[i : i + block] for i in starts])
        y = torch.stack([tokens[i + 1 : i + block + 1] for i in starts])
        model.eval()
        with torch.no_grad():
            return model(x, y)[1].item()

    assert not exercises.check_whole_text_loss(in_train_mode).ok
    assert not exercises.check_whole_text_loss(overlapping).ok


def _fit_lora(base, target, r, steps, lr=1e-2):
    layer = LoRALinear(base.requires_grad_(False), r=r, alpha=r)
    optimizer = torch.optim.Adam([layer.lora_A, layer.lora_B], lr=lr)
    for _ in range(steps):
        x = torch.randn(64, base.in_features)
        loss = nn.functional.mse_loss(layer(x), target(x).detach())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return layer


def test_check_fit_lora():
    assert exercises.check_fit_lora(_fit_lora).ok
    untrained = exercises.check_fit_lora(lambda base, target, r, steps: _fit_lora(base, target, r, 0))
    assert not untrained.ok and "off the change" in failures(untrained)

    def trains_the_base_too(base, target, r, steps):
        layer = _fit_lora(base, target, r, steps)
        with torch.no_grad():
            layer.base.weight.add_(0.01)
        return layer

    moved = exercises.check_fit_lora(trains_the_base_too)
    assert not moved.ok and "base weight changed" in failures(moved)


def _gradient_bytes(model, x, y):
    model(x, y)[1].backward()
    return sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)


def test_check_gradient_bytes():
    assert exercises.check_gradient_bytes(_gradient_bytes).ok

    def every_weight(model, x, y):
        model(x, y)[1].backward()
        return sum(4 * p.numel() for p in model.parameters())

    report = exercises.check_gradient_bytes(every_weight)
    assert not report.ok and "frozen weights get no .grad" in failures(report)
    no_backward = exercises.check_gradient_bytes(
        lambda model, x, y: sum(4 * p.numel() for p in model.parameters() if p.requires_grad)
    )
    assert not no_backward.ok  # the number is right, but nothing was measured: no .grad exists


def _merge_difference(model, x):
    with torch.no_grad():
        before = model(x)[0]
        merge_lora(model)
        after = model(x)[0]
        unmerge_lora(model)
    return (after - before).abs().max().item()


def test_check_merge_difference():
    assert exercises.check_merge_difference(_merge_difference).ok

    def leaves_it_merged(model, x):
        with torch.no_grad():
            before = model(x)[0]
            merge_lora(model)
            return (model(x)[0] - before).abs().max().item()

    report = exercises.check_merge_difference(leaves_it_merged)
    assert not report.ok and "left merged" in failures(report)
    never_merged = exercises.check_merge_difference(lambda model, x: 0.0)
    assert not never_merged.ok


def test_check_merge_difference_reports_a_model_unloaded_in_place():
    def unloads(model, x):  # the right number, but merge_and_unload swaps the LoRA layers for plain Linears
        with torch.no_grad():
            before = model(x)[0]
            return (merge_and_unload(model)(x)[0] - before).abs().max().item()

    report = exercises.check_merge_difference(unloads)  # reported, never raised
    assert not report.ok and "lost its LoRA layers" in failures(report)
    assert "measured max |merged - unmerged|" in str(report)  # the number itself was right


def test_check_merged_weight_reports_a_layer_given_new_tensors():
    def adds_a_buffer(layer):
        layer.register_buffer("merged_copy", (layer.base.weight + layer.delta_weight()).detach())
        return layer.merged_copy

    report = exercises.check_merged_weight(adds_a_buffer)
    assert not report.ok and "changed the layer" in failures(report)


def test_check_update_norm():
    def right(layer):
        return torch.linalg.matrix_norm(layer.scale * layer.lora_B @ layer.lora_A).item()

    assert exercises.check_update_norm(right).ok
    unscaled = exercises.check_update_norm(lambda layer: torch.linalg.matrix_norm(layer.lora_B @ layer.lora_A).item())
    assert not unscaled.ok and "scaled by alpha / r" in failures(unscaled)


# --- chapter 8 ---------------------------------------------------------------------------------------


def _dora_weight(W0, A, B, magnitude, scale):
    direction = W0 + scale * B @ A
    return magnitude[:, None] * direction / direction.norm(dim=1, keepdim=True)


def test_check_dora_weight():
    assert exercises.check_dora_weight(_dora_weight).ok
    unscaled = exercises.check_dora_weight(lambda W0, A, B, m, s: _dora_weight(W0, A, B, m, 1.0))
    assert not unscaled.ok and "scaled by `scale`" in failures(unscaled)
    by_column = exercises.check_dora_weight(
        lambda W0, A, B, m, s: (W0 + s * B @ A) * (m / (W0 + s * B @ A).norm(dim=0))[None, :]
    )
    assert not by_column.ok and "norm of each column" in failures(by_column)
    no_rescale = exercises.check_dora_weight(lambda W0, A, B, m, s: W0 + s * B @ A)
    assert not no_rescale.ok and "rescales each row" in failures(no_rescale)
    transposed = exercises.check_dora_weight(lambda W0, A, B, m, s: _dora_weight(W0, A, B, m, s).T)
    assert not transposed.ok and "expected a tensor of shape" in failures(transposed)
    stub = exercises.check_dora_weight(lambda *args: (_ for _ in ()).throw(NotImplementedError))
    assert stub.unanswered and "not answered yet" in str(stub)


def _frozen_adapter_bytes(model):
    from lora_lab import lora_layers

    return sum(
        t.numel() * t.element_size()
        for layer in lora_layers(model).values()
        for name, t in layer.state_dict().items()
        if not name.startswith("base.") and not isinstance(getattr(layer, name, None), nn.Parameter)
    )


def test_frozen_adapter_bytes_reference_is_what_the_adapter_file_holds_beyond_the_trained_tensors(tmp_path):
    from safetensors import safe_open

    from lora_lab import save_adapter

    expected = {"lora": 0, "vera": 0}
    for variant in ("lora", "lora_fa", "pissa", "vera"):
        model = exercises._variant_model(variant, seed=3)
        path = save_adapter(model, tmp_path / variant)
        with safe_open(str(next(path.glob("*.safetensors"))), "pt") as f:
            in_file = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())
        trained = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        assert exercises._reference_frozen_bytes(model) == in_file - trained == _frozen_adapter_bytes(model)
        if variant in expected:
            assert in_file - trained == expected[variant]
        else:
            assert in_file - trained > 0


def test_check_frozen_adapter_bytes():
    from lora_lab import lora_layers

    assert exercises.check_frozen_adapter_bytes(_frozen_adapter_bytes).ok
    every_buffer = exercises.check_frozen_adapter_bytes(
        lambda m: sum(b.numel() * b.element_size() for l in lora_layers(m).values() for b in l.buffers())
    )
    assert not every_buffer.ok and "never saved" in failures(every_buffer)
    counts = exercises.check_frozen_adapter_bytes(lambda m: _frozen_adapter_bytes(m) // 4)
    assert not counts.ok and "4 bytes" in failures(counts)
    with_trained = exercises.check_frozen_adapter_bytes(
        lambda m: _frozen_adapter_bytes(m) + sum(p.numel() * 4 for p in m.parameters() if p.requires_grad)
    )
    assert not with_trained.ok and "trainable tensors too" in failures(with_trained)


def _mixed_lora_linear(x, weight, adapters, rows):
    """The worked answer to chapter 09's exercise: the base once for all rows, each adapter on its own rows."""
    y = x @ weight.T
    for name, (A, B, scale) in adapters.items():
        mine = [i for i, row in enumerate(rows) if row == name]
        if mine:
            y[mine] = y[mine] + scale * (x[mine] @ A.T) @ B.T
    return y


def test_check_mixed_lora_linear_passes_the_answer_and_names_the_classic_bugs():
    assert exercises.check_mixed_lora_linear(_mixed_lora_linear).ok

    def every_adapter_on_every_row(x, weight, adapters, rows):
        return x @ weight.T + sum(scale * (x @ A.T) @ B.T for A, B, scale in adapters.values())

    wrong = exercises.check_mixed_lora_linear(every_adapter_on_every_row)
    assert not wrong.ok and "every row got every adapter's branch" in failures(wrong)

    def unscaled(x, weight, adapters, rows):
        return _mixed_lora_linear(x, weight, {n: (A, B, 1.0) for n, (A, B, _) in adapters.items()}, rows)

    wrong = exercises.check_mixed_lora_linear(unscaled)
    assert not wrong.ok and "the branch is scaled" in failures(wrong)

    def none_means_the_first_adapter(x, weight, adapters, rows):
        first = next(iter(adapters))
        return _mixed_lora_linear(x, weight, adapters, [first if row is None else row for row in rows])

    wrong = exercises.check_mixed_lora_linear(none_means_the_first_adapter)
    assert not wrong.ok and "keeps the base output" in failures(wrong)

    def changes_x_in_place(x, weight, adapters, rows):
        y = _mixed_lora_linear(x.clone(), weight, adapters, rows)
        x.zero_()
        return y

    wrong = exercises.check_mixed_lora_linear(changes_x_in_place)
    assert not wrong.ok and "changed its inputs in place" in failures(wrong)

    shape = exercises.check_mixed_lora_linear(lambda x, weight, adapters, rows: x @ weight.T.sum(-1, keepdim=True))
    assert not shape.ok and "expected a tensor of shape" in failures(shape)

    def stub(x, weight, adapters, rows):
        raise NotImplementedError

    assert exercises.check_mixed_lora_linear(stub).unanswered


def _train_step(model, optimizer, x, y, clip=1.0):
    model.train()
    optimizer.zero_grad()
    _, loss = model(x, y)
    loss.backward()
    if clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    return loss.item()


def test_check_train_step_passes_the_answer_with_or_without_clipping():
    assert exercises.check_train_step(_train_step).ok
    assert exercises.check_train_step(lambda m, o, x, y: _train_step(m, o, x, y, clip=0)).ok
    assert exercises.check_train_step(lambda m, o, x, y: _train_step(m, o, x, y, clip=1e-3)).ok  # shorter, same way


def test_check_train_step_names_the_classic_bugs():
    def no_zero_grad(model, optimizer, x, y):  # the old gradients are added in
        model.train()
        _, loss = model(x, y)
        loss.backward()
        optimizer.step()
        return loss.item()

    wrong = exercises.check_train_step(no_zero_grad)
    assert not wrong.ok and "call optimizer.zero_grad() before backward" in failures(wrong)

    def step_before_backward(model, optimizer, x, y):
        model.train()
        optimizer.zero_grad()
        _, loss = model(x, y)
        optimizer.step()
        loss.backward()
        return loss.item()

    wrong = exercises.check_train_step(step_before_backward)
    assert not wrong.ok and "optimizer.step() must come after loss.backward()" in failures(wrong)

    def returns_the_tensor(model, optimizer, x, y):
        model.train()
        optimizer.zero_grad()
        _, loss = model(x, y)
        loss.backward()
        optimizer.step()
        return loss

    wrong = exercises.check_train_step(returns_the_tensor)
    assert not wrong.ok and "not a Python float: return loss.item()" in failures(wrong)
    assert "the weights move along" not in failures(wrong)  # the step itself was right: only the return is named

    def no_train_mode(model, optimizer, x, y):  # dropout stays off: a different loss and a different gradient
        optimizer.zero_grad()
        _, loss = model(x, y)
        loss.backward()
        optimizer.step()
        return loss.item()

    wrong = exercises.check_train_step(no_train_mode)
    assert not wrong.ok and "call model.train() first" in failures(wrong)

    def stub(model, optimizer, x, y):
        raise NotImplementedError

    assert exercises.check_train_step(stub).unanswered

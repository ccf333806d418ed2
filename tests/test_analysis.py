"""The paper-lab analyses on constructed matrices with known answers, and their invariants on a trained adapter."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import TINY, tiny_gpt, tokens

from lora_lab import LoRAConfig, apply_lora, lora_layers
from lora_lab.experiments.analysis import (
    amplification,
    energy_rank,
    intruder_dimensions,
    random_subspace_similarity,
    scale_intruders,
    subspace_similarity,
)


def basis(k, rows, scales=None):
    """Rows e_i (i in rows) of the k-dim identity, scaled so singular values are distinct and ordered."""
    scales = scales or [len(rows) - n for n in range(len(rows))]
    return torch.stack([s * torch.eye(k)[i] for i, s in zip(rows, scales)])


def test_energy_rank_counts_directions():
    assert energy_rank(torch.diag(torch.tensor([3.0, 0.0, 0.0]))) == 1
    assert energy_rank(torch.eye(5)) == 5  # equal energy: 90% needs 5 of 5 (4 hold 80%)
    assert energy_rank(torch.eye(5), share=0.8) == 4
    assert energy_rank(torch.zeros(3, 3)) == 0
    with pytest.raises(ValueError, match="share"):
        energy_rank(torch.eye(2), share=0)


def test_subspace_similarity_known_answers():
    k = 12
    same = basis(k, [0, 1, 2])
    phi = subspace_similarity(same, 7 * same)  # scaling A does not change its directions
    assert phi.shape == (3, 3) and torch.allclose(phi, torch.ones(3, 3, dtype=torch.float64), atol=1e-12)
    orthogonal = subspace_similarity(basis(k, [0, 1]), basis(k, [5, 6, 7]))
    assert torch.allclose(orthogonal, torch.zeros(2, 3, dtype=torch.float64), atol=1e-12)
    nested = subspace_similarity(basis(k, [0, 1]), basis(k, [0, 1, 2, 3]))  # A_1's subspace inside A_2's
    # j >= 2: all of A_1's top-i is covered
    assert torch.allclose(nested[:, 1:], torch.ones(2, 3, dtype=torch.float64), atol=1e-12)
    assert math.isclose(float(nested[0, 0]), 1.0) and math.isclose(float(nested[1, 0]), 1.0)
    assert math.isclose(float(subspace_similarity(basis(k, [0, 1]), basis(k, [1, 0]))[0, 0]), 0.0, abs_tol=1e-12)


def test_random_subspace_similarity_is_about_max_i_j_over_k():
    chance = random_subspace_similarity(4, 8, 64, draws=200)
    assert chance.shape == (4, 8)
    for i, j in ((1, 1), (4, 8), (2, 6)):
        expected = max(i, j) / 64
        assert abs(float(chance[i - 1, j - 1]) - expected) < 0.35 * expected + 0.01


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 6), st.integers(1, 6), st.integers(6, 20), st.integers(0, 2**16))
def test_subspace_similarity_is_a_share(r_1, r_2, k, seed):
    gen = torch.Generator().manual_seed(seed)
    a_1, a_2 = torch.randn(r_1, k, generator=gen), torch.randn(r_2, k, generator=gen)
    phi = subspace_similarity(a_1, a_2)
    assert phi.shape == (r_1, r_2) and bool((phi >= 0).all()) and bool((phi <= 1).all())
    assert torch.allclose(subspace_similarity(a_1, a_1).diagonal(), torch.ones(r_1, dtype=torch.float64))
    assert torch.allclose(phi, subspace_similarity(a_2, a_1).T, atol=1e-10)


def test_amplification_of_a_planted_update_along_the_weakest_direction():
    w = torch.diag(torch.tensor([10.0, 5.0, 1.0, 0.1], dtype=torch.float64))
    delta = torch.zeros(4, 4)
    delta[3, 3] = 2.0  # along W's weakest direction
    result = amplification(delta, w, r=1, draws=50)
    assert math.isclose(result.onto_delta, 0.1, rel_tol=1e-9)
    assert math.isclose(result.factor, 2.0 / 0.1, rel_tol=1e-9)
    assert math.isclose(result.onto_w, 10.0, rel_tol=1e-9)
    assert math.isclose(result.delta_norm, 2.0) and math.isclose(result.w_norm, math.sqrt(100 + 25 + 1 + 0.01))
    assert result.onto_delta < result.onto_random < result.onto_w


def test_amplification_of_an_update_onto_itself():
    gen = torch.Generator().manual_seed(3)
    delta = torch.randn(16, 4, generator=gen) @ torch.randn(4, 24, generator=gen)
    result = amplification(delta, delta, r=4)
    assert math.isclose(result.factor, 1.0, rel_tol=1e-9)  # its own top-4 directions hold all of it
    assert math.isclose(result.onto_delta, result.onto_w, rel_tol=1e-9)


def test_amplification_refuses_bad_input():
    with pytest.raises(ValueError, match="same shape"):
        amplification(torch.zeros(3, 4), torch.zeros(4, 3), 1)
    with pytest.raises(ValueError, match="r must be"):
        amplification(torch.zeros(3, 4), torch.zeros(3, 4), 4)
    with pytest.raises(ValueError, match="NaN"):
        amplification(torch.full((3, 4), float("nan")), torch.zeros(3, 4), 1)


def planted_intruder(d=16, strength=50.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    u0, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    v0, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    s0 = torch.linspace(10, 1, d, dtype=torch.float64)
    w0 = (u0 * s0) @ v0.T
    new_u = u0.sum(1) / math.sqrt(d)  # equally far from every pretrained direction: |cos| = 1/sqrt(d) each
    w = w0 + strength * torch.outer(new_u, v0[:, -1])
    return w0, w


def test_intruder_dimensions_find_a_planted_one():
    w0, w = planted_intruder()
    found = intruder_dimensions(w0, w, k=5, eps=0.5)
    assert found.indices == (0,) and found.count == 1
    assert found.best_cosine[0] < 0.5 and all(c >= 0.5 for c in found.best_cosine[1:])
    assert intruder_dimensions(w0, w0, k=5).count == 0  # every vector matches itself
    assert intruder_dimensions(w0, w, k=5, eps=1.0).count == 5  # eps = 1: no direction matches exactly


def test_scale_intruders_removes_them_and_keeps_the_rest():
    w0, w = planted_intruder()
    assert torch.allclose(scale_intruders(w0, w, 1.0, k=5), w, atol=1e-9)
    removed = scale_intruders(w0, w, 0.0, k=5)
    assert intruder_dimensions(w0, removed, k=5).count < intruder_dimensions(w0, w, k=5).count
    u, s, vh = torch.linalg.svd(w)
    assert math.isclose(float(torch.linalg.matrix_norm(w - removed)), float(s[0]), rel_tol=1e-9)


def test_invariants_on_a_trained_adapter():
    model = apply_lora(tiny_gpt().train(), LoRAConfig(r=4, alpha=8, targets=("q_proj",)))
    layer = next(iter(lora_layers(model).values()))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = tokens(TINY, batch=4)
    for _ in range(5):
        _, loss = model(x, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    phi = subspace_similarity(layer.lora_A, layer.lora_A)
    assert bool((phi >= 0).all()) and bool((phi <= 1 + 1e-12).all())
    assert torch.allclose(phi.diagonal(), torch.ones(4, dtype=torch.float64))
    delta = layer.delta_weight()
    assert energy_rank(delta, share=1.0) <= 4
    assert math.isclose(amplification(delta, delta, r=4).factor, 1.0, rel_tol=1e-6)

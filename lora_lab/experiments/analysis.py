"""What an update looks like: the LoRA paper's analyses (Hu et al. 2021, section 7) and one successor's.

Each function takes plain matrices, so it applies to any adapter, any fine-tune and any model:
- `energy_rank`: how many singular directions hold a share of a matrix's energy (sum of sigma^2).
- `subspace_similarity`: phi(i, j), how much of the top-i right-singular subspace of one A lies in the top-j of
  another (the paper's Figures 3 and 4). `random_subspace_similarity` is its chance level at the same shapes.
- `amplification`: how strongly Delta W amplifies directions W already has (the paper's Table 7).
- `intruder_dimensions`: top singular vectors of a fine-tuned W that match none of W0's (Shuttleworth et al.
  2024, "LoRA vs Full Fine-tuning: An Illusion of Equivalence"), and `scale_intruders` to shrink them.
Singular value decompositions run in float64 on the CPU, so results do not depend on the device a model lives on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def _matrix(m, name: str) -> torch.Tensor:
    if not isinstance(m, torch.Tensor) or m.dim() != 2:
        shown = tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
        raise ValueError(f"{name} must be a 2-D tensor, got {shown}.")
    m = m.detach().to("cpu", torch.float64)
    if not torch.isfinite(m).all():
        raise ValueError(f"{name} holds NaN or infinite values; no decomposition of it means anything.")
    return m


def energy_rank(matrix: torch.Tensor, share: float = 0.9) -> int:
    """The fewest singular directions whose sigma^2 add up to `share` of the matrix's energy (0 for a zero matrix)."""
    if not 0 < share <= 1:
        raise ValueError(f"share must be in (0, 1], got {share!r}.")
    s2 = torch.linalg.svdvals(_matrix(matrix, "matrix")).pow(2)
    total = float(s2.sum())
    if total == 0:
        return 0
    cumulative = torch.cumsum(s2, 0) / total
    return int((cumulative < share - 1e-12).sum()) + 1


def _right_singular_vectors(a: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svd(a, full_matrices=False).Vh  # (min(r, k), k), rows ordered by singular value


def subspace_similarity(a_1: torch.Tensor, a_2: torch.Tensor) -> torch.Tensor:
    """phi[i - 1, j - 1] = ||V_1[:i] V_2[:j]^T||_F^2 / min(i, j), for A_1 (r_1, k) and A_2 (r_2, k) as stored.

    V are the right-singular vectors (the k-dim directions each A reads its input along). phi is 1 where one
    subspace contains the other and 0 where they are orthogonal; (r_1, r_2) in shape."""
    a_1, a_2 = _matrix(a_1, "A_1"), _matrix(a_2, "A_2")
    if a_1.shape[1] != a_2.shape[1]:
        raise ValueError(f"A_1 {tuple(a_1.shape)} and A_2 {tuple(a_2.shape)} must read inputs of the same width k.")
    v_1, v_2 = _right_singular_vectors(a_1), _right_singular_vectors(a_2)
    overlap = (v_1 @ v_2.T).pow(2)  # (r_1, r_2): squared cosines between the directions
    cumulative = overlap.cumsum(0).cumsum(1)  # [i, j] = ||V_1[:i+1] V_2[:j+1]^T||_F^2
    i = torch.arange(1, v_1.shape[0] + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, v_2.shape[0] + 1, dtype=torch.float64)[None, :]
    return (cumulative / torch.minimum(i, j)).clamp(0.0, 1.0)


def random_subspace_similarity(r_1: int, r_2: int, k: int, draws: int = 20, seed: int = 0) -> torch.Tensor:
    """The mean phi between Gaussian A's of the given shapes: the chance level a measured phi must beat.
    For random subspaces phi(i, j) is about max(i, j) / k, which is large when k is small."""
    gen = torch.Generator().manual_seed(seed)
    total = torch.zeros(min(r_1, k), min(r_2, k), dtype=torch.float64)
    for _ in range(draws):
        a_1 = torch.randn(r_1, k, generator=gen, dtype=torch.float64)
        a_2 = torch.randn(r_2, k, generator=gen, dtype=torch.float64)
        total += subspace_similarity(a_1, a_2)
    return total / draws


@dataclass(frozen=True)
class Amplification:
    """The paper's Table 7 for one matrix: ||U^T W V^T||_F with U, V the top-r singular vectors of Delta W
    (`onto_delta`), of W itself (`onto_w`) and of random matrices (`onto_random`, averaged over draws);
    `delta_norm` = ||Delta W||_F, `w_norm` = ||W||_F and `factor` = ||Delta W||_F / ||U^T W V^T||_F (from Delta W's
    own directions): how much Delta W amplifies what W has along the directions Delta W changes."""

    r: int
    delta_norm: float
    w_norm: float
    onto_delta: float
    onto_w: float
    onto_random: float
    factor: float


def _projection_norm(w: torch.Tensor, u: torch.Tensor, vh: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(u.T @ w @ vh.T))  # u: (d, r), vh: (r, k)


def amplification(delta_w: torch.Tensor, w: torch.Tensor, r: int, draws: int = 20, seed: int = 0) -> Amplification:
    """How Delta W relates to W in the top-r directions of Delta W (the paper uses W = the pretrained weight)."""
    delta_w, w = _matrix(delta_w, "delta_w"), _matrix(w, "w")
    if delta_w.shape != w.shape:
        raise ValueError(f"delta_w {tuple(delta_w.shape)} and w {tuple(w.shape)} must have the same shape.")
    if not (isinstance(r, int) and 1 <= r <= min(w.shape)):
        raise ValueError(f"r must be an integer between 1 and min(d, k) = {min(w.shape)}, got {r!r}.")
    u, _, vh = torch.linalg.svd(delta_w, full_matrices=False)
    onto_delta = _projection_norm(w, u[:, :r], vh[:r])
    uw, _, vhw = torch.linalg.svd(w, full_matrices=False)
    onto_w = _projection_norm(w, uw[:, :r], vhw[:r])
    gen = torch.Generator().manual_seed(seed)
    d, k = w.shape
    random = []
    for _ in range(draws):  # random orthonormal r-frames on both sides
        qu, _ = torch.linalg.qr(torch.randn(d, r, generator=gen, dtype=torch.float64))
        qv, _ = torch.linalg.qr(torch.randn(k, r, generator=gen, dtype=torch.float64))
        random.append(_projection_norm(w, qu, qv.T))
    delta_norm = float(torch.linalg.matrix_norm(delta_w))
    factor = delta_norm / onto_delta if onto_delta > 0 else math.inf
    return Amplification(
        r, delta_norm, float(torch.linalg.matrix_norm(w)), onto_delta, onto_w, sum(random) / draws, factor
    )


@dataclass(frozen=True)
class Intruders:
    """Of the top-k left-singular vectors of the fine-tuned W, those whose best |cosine| with every singular
    vector of W0 is below eps: `indices` (0 = largest singular value) and each one's `best_cosine`."""

    k: int
    eps: float
    indices: tuple[int, ...]
    best_cosine: tuple[float, ...]

    @property
    def count(self) -> int:
        return len(self.indices)


def intruder_dimensions(w0: torch.Tensor, w: torch.Tensor, k: int = 10, eps: float = 0.5) -> Intruders:
    """Shuttleworth et al.'s intruder dimensions of a fine-tuned matrix w against its pretrained w0."""
    w0, w = _matrix(w0, "w0"), _matrix(w, "w")
    if w0.shape != w.shape:
        raise ValueError(f"w0 {tuple(w0.shape)} and w {tuple(w.shape)} must have the same shape.")
    if not (isinstance(k, int) and 1 <= k <= min(w.shape)):
        raise ValueError(f"k must be an integer between 1 and min(d, k) = {min(w.shape)}, got {k!r}.")
    if not 0 < eps <= 1:
        raise ValueError(f"eps must be in (0, 1], got {eps!r}.")
    u0 = torch.linalg.svd(w0, full_matrices=False).U  # (d, min(d, k))
    u = torch.linalg.svd(w, full_matrices=False).U[:, :k]
    best = (u.T @ u0).abs().amax(dim=1)  # (k,): each top vector's closest pretrained direction
    indices = tuple(int(i) for i in torch.nonzero(best < eps).flatten())
    return Intruders(k, eps, indices, tuple(float(b) for b in best))


def scale_intruders(w0: torch.Tensor, w: torch.Tensor, factor: float, k: int = 10, eps: float = 0.5) -> torch.Tensor:
    """w with the singular values of its intruder dimensions multiplied by `factor` (1 = unchanged, 0 = removed),
    in w's dtype: the intervention that trades target loss against forgetting."""
    original = w
    intruders = intruder_dimensions(w0, w, k, eps)
    u, s, vh = torch.linalg.svd(_matrix(w, "w"), full_matrices=False)
    s = s.clone()
    for i in intruders.indices:
        s[i] *= factor
    return ((u * s) @ vh).to(device=original.device, dtype=original.dtype)

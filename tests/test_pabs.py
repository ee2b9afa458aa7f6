"""PABS (spec Sec. 9, gates 4-5): principal angles against scipy, invariances, the code replica's bugs, Algorithm 1
against a naive reference, planted duplicate filters, baselines and the Sigma criteria (beyond the paper)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from sigma_core.decompose import filter_cp_als
from sigma_core.pabs import (
    algorithm1_select,
    check_pabs_weights,
    code_pabs_distance_matrix,
    code_select,
    factor_distance_matrix,
    norm_select,
    output_correlation_distance,
    principal_angles,
    random_select,
    sigma_metrics,
)

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("single_thread")


def _pairs(n_pairs=200, seed=0):
    rng = np.random.default_rng(seed)
    for k in range(n_pairs):
        n = int(rng.integers(3, 20))
        p, q = int(rng.integers(1, n + 1)), int(rng.integers(1, n + 1))
        x = rng.standard_normal((n, p))
        kind = k % 4
        if kind == 0:
            y = rng.standard_normal((n, q))
        elif kind == 1:  # near-identical: angles ~ 1e-8
            q = p
            y = x @ rng.standard_normal((p, p)) + 1e-8 * rng.standard_normal((n, p))
        elif kind == 2:  # rank-deficient inputs
            r = max(1, min(p, q) - 1)
            x = rng.standard_normal((n, r)) @ rng.standard_normal((r, p))
            y = rng.standard_normal((n, r)) @ rng.standard_normal((r, q))
        else:  # unequal dimensions, sharing a subspace
            y = np.concatenate([x[:, : max(1, p // 2)], rng.standard_normal((n, q))], axis=1)
        yield x, y


def test_principal_angles_equal_scipy_on_200_pairs():
    """1e-10 everywhere, except where scipy's own step 5 takes arccos of a cosine within 1e-12 of 1: there the
    angle is ~0 and arccos is only accurate to sqrt(eps) ~ 2e-8 in any implementation (scipy's mask is indexed by
    the descending cosines while the arccos branch runs over the reversed ones), so those entries get 5e-8."""
    worst, loose, total = 0.0, 0, 0
    for x, y in _pairs():
        ref = scipy.linalg.subspace_angles(x, y)
        got = principal_angles(torch.from_numpy(x), torch.from_numpy(y)).numpy()
        assert got.shape == ref.shape
        qa, qb = scipy.linalg.orth(x), scipy.linalg.orth(y)
        sig = scipy.linalg.svdvals(qa.T @ qb)
        arccos_near_one = (sig**2 < 0.5) & (sig[::-1] ** 2 > 1 - 1e-12)
        err = np.abs(got - ref)
        assert float(err[arccos_near_one].max(initial=0.0)) < 5e-8
        loose += int(arccos_near_one.sum())
        total += len(ref)
        worst = max(worst, float(err[~arccos_near_one].max(initial=0.0)))
    assert worst < 1e-10
    assert loose < 0.1 * total  # intersecting subspaces (p + q > n) only


def test_angle_invariances_and_special_values():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(9, 3, generator=g, dtype=F64), torch.randn(9, 3, generator=g, dtype=F64)
    base = principal_angles(x, y)
    transformed = (x * torch.tensor([2.0, -0.5, 3.0], dtype=F64))[:, [2, 0, 1]]
    assert torch.allclose(principal_angles(transformed, y), base, atol=1e-12)
    assert float(principal_angles(x, x).abs().max()) < 1e-12
    e = torch.eye(4, dtype=F64)
    assert abs(float(principal_angles(e[:, :1], e[:, 1:2])[0]) - math.pi / 2) < 1e-12


def test_distance_matrix_weights_and_degenerate_spatial_factors():
    k = torch.randn(6, 8, 3, 3, dtype=F64)
    res = filter_cp_als(k, 3)
    d = factor_distance_matrix(res.factors)
    assert torch.allclose(d, d.T) and float(d.diagonal().abs().max()) == 0.0
    # R >= K = 3: the 3 x R spatial factors span R^3, so only the channel term is left (spec Sec. 2.4)
    only_c = factor_distance_matrix(res.factors, weights=(0, 0, 1))
    assert torch.allclose(d, only_c / 3, atol=1e-7)
    assert float(factor_distance_matrix(res.factors, weights=(1, 0, 0)).abs().max()) < 1e-7
    for bad in [(0, 0, 0), (-1, 1, 1), (1, 1), (float("nan"), 1, 1)]:
        with pytest.raises(ValueError, match="sum to a positive number"):
            check_pabs_weights(bad)
    with pytest.raises(ValueError, match="angle"):
        factor_distance_matrix(res.factors, angle="min")


def test_code_replica_maps_dissimilar_subspaces_to_zero():
    g = torch.Generator().manual_seed(1)
    t, s, r = 4, 64, 2
    c = torch.randn(t, s, r, generator=g)
    # one spatial pair shared by all filters: the A/B terms vanish and D is the channel (head) term alone
    a, b = torch.randn(1, 3, r, generator=g).expand(t, -1, -1), torch.randn(1, 3, r, generator=g).expand(t, -1, -1)
    d_code = code_pabs_distance_matrix((c, a, b))
    d_paper = factor_distance_matrix((c, a, b), weights=(1, 1, 1))
    off = ~torch.eye(t, dtype=torch.bool)
    assert float(d_code[off].abs().max()) < 1e-5  # Frobenius norm >= 1 -> asin(1) = pi/2 -> remainder -> 0
    assert float(d_paper[off].min()) > 0.3
    # R = 1: the code's angle is the true one (vectors)
    c1, a1, b1 = c[..., :1], a[..., :1], b[..., :1]
    assert torch.allclose(code_pabs_distance_matrix((c1, a1, b1)),
                          3 * factor_distance_matrix((c1, a1, b1)), atol=1e-4)  # weights sum to 1 here


def _naive_algorithm1(d, keep):
    d = d.tolist()
    t = len(d)
    alive = list(range(t))
    order = []
    while len(alive) > keep:
        best = None
        for i in alive:
            for j in alive:
                if i < j and (best is None or d[i][j] < best[0]):
                    best = (d[i][j], i, j)
        _, i, j = best
        si = sum(d[i][k] for k in alive if k != i)
        sj = sum(d[j][k] for k in alive if k != j)
        out = i if si <= sj else j
        alive.remove(out)
        order.append(out)
    return sorted(alive), order


def test_algorithm1_equals_naive_reference_with_ties():
    g = torch.Generator().manual_seed(0)
    for trial in range(100):
        t = int(torch.randint(2, 14, (1,), generator=g))
        if trial % 2:  # small integers: many ties, exact sums
            d = torch.randint(0, 4, (t, t), generator=g).to(F64)
        else:
            d = torch.rand(t, t, generator=g, dtype=F64)
        d = torch.triu(d, 1)
        d = d + d.T
        keep = int(torch.randint(1, t + 1, (1,), generator=g))
        assert algorithm1_select(d, keep) == _naive_algorithm1(d, keep), trial


def test_code_select_toy_case_of_the_spec():
    # Spec Sec. 3.3: the code keeps {2, 3} (filter 2 was the FIRST removed) where Algorithm 1 keeps {1, 3}
    d = torch.tensor([[0, 8, 2, 2], [8, 0, 1, 9], [2, 1, 0, 3], [2, 9, 3, 0]], dtype=F64)
    kept, order = algorithm1_select(d, 2)
    assert (kept, order) == ([1, 3], [2, 0])
    assert code_select(d, 2) == [2, 3]


@pytest.mark.parametrize("rank", [1, 2])
def test_planted_duplicates_lose_exactly_one_of_each_pair(rank):
    g = torch.Generator().manual_seed(3)
    t, s = 10, 16
    base = torch.randn(t, s, 3, 3, generator=g, dtype=F64)
    pairs = [(0, 7), (2, 9), (4, 5)]
    scales = [1.0, 2.5, -0.7]
    for (i, j), c in zip(pairs, scales):
        base[j] = c * base[i]
    res = filter_cp_als(base, rank)
    d = factor_distance_matrix(res.factors)
    kept, order = algorithm1_select(d, t - len(pairs))
    for i, j in pairs:
        assert (i in order) != (j in order), (i, j, order)


def test_baselines():
    k = torch.zeros(5, 2, 3, 3)
    for t in range(5):
        k[t] = t + 1
    assert norm_select(k, 2) == [3, 4]
    a = random_select(10, 4, torch.Generator().manual_seed(0))
    assert a == random_select(10, 4, torch.Generator().manual_seed(0)) and len(set(a)) == 4
    with pytest.raises(ValueError, match="keep must be"):
        random_select(3, 0)


def test_sigma_criteria():
    g = torch.Generator().manual_seed(0)
    k = torch.randn(5, 4, 3, 3, generator=g, dtype=F64)
    k[3] = -2 * k[1]
    x = torch.randn(400, 36, generator=g, dtype=F64)
    sig = x.T @ x / 400
    d = output_correlation_distance(k, sig)
    assert abs(float(d[1, 3])) < 1e-12 and float(d[0, 1]) > 0
    mets = sigma_metrics(sig, 4, 3, 3)
    res = filter_cp_als(k, 1)
    dw = factor_distance_matrix(res.factors, metrics=mets)
    assert float(dw[1, 3]) < 1e-6 and dw.shape == (5, 5)

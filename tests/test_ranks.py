"""EVBMF rank estimation, the alpha rule (paper Eq. 2) and rank validation."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize_scalar

from sigma_core.ranks import (
    RankRule,
    alpha_rank,
    cp_max_rank,
    evbmf,
    ranks_from_fraction,
    tucker2_ranks_alpha,
    tucker2_vbmf_ranks,
    validate_tucker2_ranks,
)


def _planted(n_rows: int, n_cols: int, rank: int, noise: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    signal = rng.standard_normal((n_rows, rank)) @ rng.standard_normal((rank, n_cols))
    return signal + noise * rng.standard_normal((n_rows, n_cols))


def _public_evbmf(y: np.ndarray):
    """Compact port of the widely used public EVBMF (bounded search directly in sigma2).

    Returns its rank, its sigma2 and its objective Omega(sigma2) (times L) as a function.
    """
    n_rows, n_cols = y.shape
    if n_rows > n_cols:
        y = y.T
        n_rows, n_cols = n_cols, n_rows
    ratio = n_rows / n_cols
    tau_ubar = 2.5129 * np.sqrt(ratio)
    xubar = (1 + tau_ubar) * (1 + ratio / tau_ubar)
    s = np.linalg.svd(y, compute_uv=False)
    e_h = int(min(np.ceil(n_rows / (1 + ratio)) - 1, n_rows)) - 1
    upper = np.sum(s**2) / (n_rows * n_cols)
    lower = max(s[e_h + 1] ** 2 / (n_cols * xubar), np.mean(s[e_h + 1:] ** 2) / n_cols)

    def objective(sigma2):
        x = s**2 / (n_cols * sigma2)
        z1, z2 = x[x > xubar], x[x <= xubar]
        tau = 0.5 * (z1 - (1 + ratio) + np.sqrt((z1 - (1 + ratio)) ** 2 - 4 * ratio))
        return (np.sum(z2 - np.log(z2)) + np.sum(z1 - tau) + np.sum(np.log((tau + 1) / z1))
                + ratio * np.sum(np.log(tau / ratio + 1)))

    sigma2 = minimize_scalar(objective, bounds=[lower, upper], method="bounded").x
    return int(np.sum(s > np.sqrt(n_cols * sigma2 * xubar))), float(sigma2), objective


# ------------------------------------------------------------------------------------------------ EVBMF


@pytest.mark.parametrize("shape, rank, noise", [
    ((60, 120), 5, 0.1),
    ((120, 60), 5, 0.1),
    ((40, 300), 8, 0.3),
    ((100, 100), 12, 0.2),
    ((256, 64), 3, 0.05),
])
def test_evbmf_recovers_planted_rank(shape, rank, noise):
    y = _planted(*shape, rank, noise)
    res = evbmf(y)
    assert res.rank == rank
    assert res.sigma2 == pytest.approx(noise**2, rel=0.1)
    assert len(res.singular_values) == len(res.shrunk_singular_values) == rank
    assert all(0 < g_evb < g for g, g_evb in zip(res.singular_values, res.shrunk_singular_values))
    assert min(res.singular_values) > res.threshold
    assert res.shape == (min(shape), max(shape))


@pytest.mark.parametrize("shape, rank, noise, seed", [
    ((60, 120), 5, 0.1, 1), ((90, 45), 10, 0.5, 2), ((32, 288), 6, 1.0, 3), ((64, 576), 20, 1.0, 4),
])
def test_evbmf_agrees_with_public_implementation(shape, rank, noise, seed):
    y = _planted(*shape, rank, noise, seed)
    ref_rank, ref_sigma2, _ = _public_evbmf(y)
    res = evbmf(y)
    assert res.rank == ref_rank
    assert res.sigma2 == pytest.approx(ref_sigma2, rel=1e-3)


def test_evbmf_finds_global_minimum_where_public_search_stops_early():
    # Weak signal (singular values near the noise edge): Omega(sigma2) has two local minima here and a
    # bounded search in sigma2 stops in the worse one (rank 8); the scan in log(sigma2) finds the better one.
    y = _planted(50, 50, 20, 2.0, seed=4)
    ref_rank, ref_sigma2, objective = _public_evbmf(y)
    res = evbmf(y)
    assert objective(res.sigma2) < objective(ref_sigma2) - 1e-3
    assert (ref_rank, res.rank) == (8, 10)


@pytest.mark.parametrize("shape", [(60, 120), (100, 100), (300, 20)])
def test_evbmf_pure_noise_gives_zero_rank(shape):
    y = np.random.default_rng(5).standard_normal(shape)
    res = evbmf(y)
    assert res.rank <= 1
    assert res.sigma2 == pytest.approx(1.0, rel=0.1)


def test_evbmf_torch_input_transpose_and_scale_invariance():
    y = _planted(50, 80, 4, 0.1, seed=7)
    base = evbmf(y)
    assert evbmf(torch.from_numpy(y).float()).rank == base.rank
    assert evbmf(y.T).rank == base.rank
    scaled = evbmf(1e-3 * y)
    assert scaled.rank == base.rank
    assert scaled.sigma2 == pytest.approx(1e-6 * base.sigma2, rel=1e-4)


def test_evbmf_degenerate_inputs():
    assert evbmf(np.zeros((5, 8))).rank == 0
    exact = _planted(20, 30, 3, 0.0)
    assert evbmf(exact).rank == 3
    assert evbmf(np.array([[2.0]])).rank == 0
    with pytest.raises(ValueError, match="2-D"):
        evbmf(np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match="NaN"):
        evbmf(np.array([[1.0, np.nan]]))


def test_evbmf_known_sigma2_and_max_rank():
    y = _planted(30, 60, 5, 0.1)
    assert evbmf(y, sigma2=1e6).rank == 0
    assert evbmf(y, sigma2=1e-12).rank == 30
    assert evbmf(y, sigma2=0.01).rank == 5
    assert evbmf(y, max_rank=3).rank == 3
    with pytest.raises(ValueError, match="sigma2"):
        evbmf(y, sigma2=-1.0)
    with pytest.raises(ValueError, match="max_rank"):
        evbmf(y, max_rank=0)


def _planted_kernel(t=32, s=24, kh=3, kw=3, ranks=(6, 4), noise=0.01, seed=0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    u_t = torch.linalg.qr(torch.randn(t, ranks[0], generator=gen, dtype=torch.float64))[0]
    u_s = torch.linalg.qr(torch.randn(s, ranks[1], generator=gen, dtype=torch.float64))[0]
    core = torch.randn(*ranks, kh, kw, generator=gen, dtype=torch.float64)
    kernel = torch.einsum("abhw,ta,sb->tshw", core, u_t, u_s)
    return kernel + noise * torch.randn(t, s, kh, kw, generator=gen, dtype=torch.float64)


def test_tucker2_vbmf_ranks_planted_kernel():
    assert tucker2_vbmf_ranks(_planted_kernel()) == (6, 4)
    assert tucker2_vbmf_ranks(_planted_kernel(t=16, s=40, kh=5, kw=3, ranks=(3, 7)).numpy()) == (3, 7)
    with pytest.raises(ValueError, match=r"\(T, S, H, W\)"):
        tucker2_vbmf_ranks(torch.zeros(3, 3))


# ------------------------------------------------------------------------------------------- alpha rule


def test_alpha_rank_endpoints_and_midpoint():
    assert alpha_rank(4, 10, 1.0) == 4
    assert alpha_rank(4, 10, 0.0) == 10
    assert alpha_rank(4, 10, 0.5) == 7
    assert alpha_rank(3, 10, 0.5) == 7  # 6.5 rounds half up
    assert alpha_rank(0, 10, 1.0) == 1  # clamped: a layer keeps at least one component
    assert alpha_rank(10, 10, 0.3) == 10


def test_alpha_rank_monotone_in_alpha():
    for r_vbmf, r_max in [(0, 64), (5, 64), (17, 512), (3, 3)]:
        ranks = [alpha_rank(r_vbmf, r_max, a) for a in np.linspace(0.0, 1.0, 41)]
        assert all(a >= b for a, b in zip(ranks, ranks[1:]))
        assert ranks[0] == r_max and ranks[-1] == max(r_vbmf, 1)


@pytest.mark.parametrize("alpha", [-0.1, 1.1, math.nan, True, "0.5"])
def test_alpha_rank_rejects_bad_alpha(alpha):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        alpha_rank(3, 10, alpha)


def test_alpha_rank_rejects_bad_ranks():
    with pytest.raises(ValueError, match="r_vbmf"):
        alpha_rank(11, 10, 0.5)
    with pytest.raises(ValueError, match="r_max"):
        alpha_rank(0, 0, 0.5)


def test_cp_max_rank():
    assert cp_max_rank((64, 32, 3, 3)) == 64 * 32 * 9 // 64
    assert cp_max_rank((3, 3, 5, 2)) == 18
    with pytest.raises(ValueError):
        cp_max_rank((64, 32, 3))


def test_tucker2_ranks_alpha():
    kernel = _planted_kernel()
    assert tucker2_ranks_alpha(kernel, 1.0) == (6, 4)
    assert tucker2_ranks_alpha(kernel, 0.0) == (32, 24)
    assert tucker2_ranks_alpha(kernel, 0.5) == (19, 14)
    with pytest.raises(ValueError, match="alpha"):
        tucker2_ranks_alpha(kernel, 2.0)


def test_ranks_from_fraction():
    assert ranks_from_fraction((64, 32, 3, 3), 0.5) == (32, 16)
    assert ranks_from_fraction((64, 32, 3, 3), 1.0) == (64, 32)
    assert ranks_from_fraction((64, 3, 3, 3), 0.01) == (1, 1)
    for bad in (0.0, 1.5, -0.2):
        with pytest.raises(ValueError, match="fraction"):
            ranks_from_fraction((64, 32, 3, 3), bad)


@pytest.mark.parametrize("ranks, match", [
    ((0, 2), "R_T must be >= 1"),
    ((2, -1), "R_S must be >= 1"),
    ((65, 2), "R_T=65 exceeds T=64"),
    ((2, 33), "R_S=33 exceeds S=32"),
    ((1, 2, 3), "pair"),
    ((1.0, 2), "R_T must be an int"),
    ("ab", "pair"),
])
def test_validate_tucker2_ranks_errors(ranks, match):
    with pytest.raises(ValueError, match=match):
        validate_tucker2_ranks((64, 32, 3, 3), ranks)


def test_validate_tucker2_ranks_accepts_numpy_ints():
    assert validate_tucker2_ranks((64, 32, 3, 3), (np.int64(3), 32)) == (3, 32)


# -------------------------------------------------------------------------------------------- RankRule


@pytest.mark.parametrize("kwargs, match", [
    ({}, "exactly one"),
    ({"alpha": 0.5, "ranks": (2, 2)}, "exactly one"),
    ({"alpha": 0.5, "fraction": 0.5}, "exactly one"),
    ({"alpha": 1.5}, r"\[0, 1\]"),
    ({"alpha": -0.5}, r"\[0, 1\]"),
    ({"ranks": (0, 3)}, ">= 1"),
    ({"ranks": (3,)}, "pair"),
    ({"fraction": 0.0}, "fraction"),
])
def test_rank_rule_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RankRule(**kwargs)


def test_rank_rule_resolve_and_describe():
    kernel = _planted_kernel()
    assert RankRule(alpha=1.0).resolve(kernel) == (6, 4)
    assert RankRule(ranks=[5, 3]).resolve(kernel) == (5, 3)
    assert RankRule(ranks=(5, 3)).ranks == (5, 3)
    assert RankRule(fraction=0.25).resolve(kernel) == (8, 6)
    with pytest.raises(ValueError, match="R_S=30 exceeds S=24"):
        RankRule(ranks=(5, 30)).resolve(kernel)
    assert "alpha=0.5" in RankRule(alpha=0.5).describe()
    assert "(5, 3)" in RankRule(ranks=(5, 3)).describe()
    assert "fraction=0.25" in RankRule(fraction=0.25).describe()
    with pytest.raises(dataclasses.FrozenInstanceError):
        RankRule(alpha=0.5).alpha = 0.1  # type: ignore[misc]

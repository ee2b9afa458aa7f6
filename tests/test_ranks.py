"""EVBMF rank estimation, the alpha rule (paper Eq. 2) and rank validation."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize_scalar

from sigma_core.ranks import (
    RankRule, alpha_rank, cp_max_rank, cp_rank_alpha, cp_rank_from_fraction, cp_vbmf_rank, evbmf, ranks_from_fraction,
    svd_rank_alpha, svd_rank_from_fraction, tucker2_ranks_alpha, tucker2_vbmf_ranks, validate_cp_rank,
    validate_svd_rank, validate_tucker2_ranks,
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


# ------------------------------------------------------------------------------------------------ pinned outputs
# Values computed with the rank code as it stood before its shared helpers were factored out (alpha rule,
# fraction rounding, RankRule dispatch): the refactor must keep every public result.

_ALPHAS = (0.0, 0.25, 0.5, 0.8, 1.0)
_FRACTIONS = (0.05, 0.25, 0.3, 0.5, 1.0)


@pytest.fixture(scope="module")
def pinned_inputs():
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((16, 8, 3, 3))
    planted = (rng.standard_normal((24, 3)) @ rng.standard_normal((3, 12 * 9))).reshape(24, 12, 3, 3)
    kernel = planted + 0.05 * rng.standard_normal((24, 12, 3, 3))
    weight = rng.standard_normal((20, 3)) @ rng.standard_normal((3, 30)) + 0.01 * rng.standard_normal((20, 30))
    return noise, kernel, weight


def test_pinned_alpha_ranks(pinned_inputs):
    noise, kernel, weight = pinned_inputs
    assert tucker2_vbmf_ranks(kernel) == (3, 4) and cp_vbmf_rank(kernel) == 4
    assert tucker2_vbmf_ranks(noise) == (0, 0) and cp_vbmf_rank(noise) == 0
    assert [tucker2_ranks_alpha(noise, a) for a in _ALPHAS] == [(16, 8), (12, 6), (8, 4), (3, 2), (1, 1)]
    assert [tucker2_ranks_alpha(kernel, a) for a in _ALPHAS] == [(24, 12), (19, 10), (14, 8), (7, 6), (3, 4)]
    assert [cp_rank_alpha(noise, a) for a in _ALPHAS] == [72, 54, 36, 14, 1]
    assert [cp_rank_alpha(kernel, a) for a in _ALPHAS] == [108, 82, 56, 25, 4]
    for w in (weight, weight.T, weight.reshape(20, 30, 1, 1)):
        assert [svd_rank_alpha(w, a) for a in _ALPHAS] == [20, 16, 12, 6, 3]


@pytest.mark.parametrize("shape, tucker2, cp", [
    ((16, 8, 3, 3), [(1, 1), (4, 2), (5, 2), (8, 4), (16, 8)], [4, 18, 22, 36, 72]),
    ((7, 5, 5, 3), [(1, 1), (2, 1), (2, 2), (4, 3), (7, 5)], [4, 19, 23, 38, 75]),
    ((18, 6, 1, 1), [(1, 1), (5, 2), (5, 2), (9, 3), (18, 6)], [1, 2, 2, 3, 6]),  # 0.25 * 18 = 4.5 rounds up
])
def test_pinned_fraction_ranks(shape, tucker2, cp):
    assert [ranks_from_fraction(shape, f) for f in _FRACTIONS] == tucker2
    assert [cp_rank_from_fraction(shape, f) for f in _FRACTIONS] == cp


def test_pinned_svd_fraction_ranks():
    assert [svd_rank_from_fraction((20, 30), f) for f in _FRACTIONS] == [1, 5, 6, 10, 20]
    assert [svd_rank_from_fraction((18, 7, 1, 1), f) for f in _FRACTIONS] == [1, 2, 2, 4, 7]


def test_pinned_rank_rule_resolution(pinned_inputs):
    _, kernel, weight = pinned_inputs
    rule = RankRule(alpha=0.5)
    assert (rule.resolve(kernel), rule.resolve_cp(kernel), rule.resolve_svd(weight)) == ((14, 8), 56, 12)
    rule = RankRule(fraction=0.3)
    assert (rule.resolve(kernel), rule.resolve_cp(kernel), rule.resolve_svd(weight)) == ((7, 4), 32, 6)
    assert RankRule(cp_rank=np.int64(5)).resolve_cp(kernel) == 5
    assert RankRule(svd_rank=np.int64(7)).resolve_svd(weight.reshape(20, 30, 1, 1)) == 7


@pytest.mark.parametrize("kwargs, method, message", [
    ({"cp_rank": 5}, "resolve", "RankRule(cp_rank=5) is a CP rank; a Tucker-2 method needs "
                                "RankRule(ranks=(R_T, R_S)), alpha or fraction"),
    ({"svd_rank": 2}, "resolve", "RankRule(svd_rank=2) is an SVD rank; a Tucker-2 method needs "
                                 "RankRule(ranks=(R_T, R_S)), alpha or fraction"),
    ({"ranks": (3, 2)}, "resolve_cp", "RankRule(ranks=(3, 2)) holds Tucker-2 ranks (R_T, R_S); a CP method needs "
                                      "RankRule(cp_rank=R), alpha or fraction"),
    ({"svd_rank": 2}, "resolve_cp", "RankRule(svd_rank=2) is an SVD rank; a CP method needs RankRule(cp_rank=R), "
                                    "alpha or fraction"),
    ({"ranks": (3, 2)}, "resolve_svd", "RankRule(ranks=(3, 2)) is not an SVD rank; an SVD method needs "
                                       "RankRule(svd_rank=r), alpha or fraction"),
    ({"cp_rank": 5}, "resolve_svd", "RankRule(cp_rank=5) is not an SVD rank; an SVD method needs "
                                    "RankRule(svd_rank=r), alpha or fraction"),
])
def test_pinned_rank_rule_family_errors(pinned_inputs, kwargs, method, message):
    _, kernel, _ = pinned_inputs
    with pytest.raises(ValueError) as info:
        getattr(RankRule(**kwargs), method)(kernel)
    assert str(info.value) == message


@pytest.mark.parametrize("call, message", [
    (lambda: RankRule(cp_rank=0), "cp_rank must be an int >= 1, got 0"),
    (lambda: RankRule(svd_rank=1.5), "svd_rank must be an int >= 1, got 1.5"),
    (lambda: validate_svd_rank((20, 30), 0), "SVD rank must be an int >= 1, got 0"),
    (lambda: validate_svd_rank((20, 30, 1, 1), 21),
     "SVD rank 21 exceeds min(out, in) = 20 of the weight (20, 30, 1, 1); use a rank <= 20"),
    (lambda: validate_cp_rank((16, 8, 3, 3), 1.0), "CP rank must be an int, got 1.0 (float)"),
    (lambda: validate_cp_rank((16, 8, 3, 3), 73),
     "CP rank 73 exceeds R_max = TSHW / max(T, S, H, W) = 72 for kernel (16, 8, 3, 3): an exact CP decomposition "
     "with 72 terms exists; use a rank <= 72"),
    (lambda: cp_max_rank((16, 8, 3)), "shape must be 4 positive ints (T, S, H, W), got (16, 8, 3)"),
    (lambda: svd_rank_from_fraction((20, 30), 0.0),
     "fraction must be a number in (0, 1] (share of T and of S kept), got 0.0"),
])
def test_pinned_rank_errors(call, message):
    with pytest.raises(ValueError) as info:
        call()
    assert str(info.value) == message

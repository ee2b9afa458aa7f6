"""Bad inputs to the Tucker-2 solvers and their config give a clear ValueError that says what is wrong."""

from __future__ import annotations

import pytest
import torch

from sigma_core.decompose import Tucker2SigmaConfig, tucker2_als, tucker2_als_sigma

F64 = torch.float64
KERNEL_SHAPE = (6, 4, 3, 3)  # n = 36


@pytest.fixture(autouse=True)
def _single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _kernel() -> torch.Tensor:
    return torch.randn(KERNEL_SHAPE, generator=torch.Generator().manual_seed(0), dtype=F64)


def _sigma(n: int = 36) -> torch.Tensor:
    a = torch.randn(n, 2 * n, generator=torch.Generator().manual_seed(1), dtype=F64)
    return a @ a.T / (2 * n)


def _both_solvers(ranks, kernel=None):
    """Run both Tucker-2 solvers on the same (kernel, ranks); each must raise on its own."""
    kernel = _kernel() if kernel is None else kernel
    return [lambda: tucker2_als_sigma(kernel, _sigma(), ranks), lambda: tucker2_als(kernel, ranks)]


@pytest.mark.parametrize(
    "ranks,match",
    [
        ((7, 2), r"R_T=7 exceeds T=6"),
        ((2, 5), r"R_S=5 exceeds S=4"),
        ((0, 2), r"R_T must be >= 1"),
        ((2, 0), r"R_S must be >= 1"),
        ((-1, 2), r"R_T must be >= 1"),
        ((2,), r"pair \(R_T, R_S\)"),
        ((2, 2, 2), r"pair \(R_T, R_S\)"),
        ((2.5, 2), r"R_T must be an int"),
    ],
)
def test_bad_ranks(ranks, match):
    for solve in _both_solvers(ranks):
        with pytest.raises(ValueError, match=match):
            solve()


@pytest.mark.parametrize("shape", [(6, 36), (6, 4, 9), (1, 6, 4, 3, 3)])
def test_kernel_not_4d(shape):
    kernel = torch.zeros(shape, dtype=F64)
    for solve in _both_solvers((2, 2), kernel):
        with pytest.raises(ValueError, match="4-D"):
            solve()


@pytest.mark.parametrize("n", [35, 72])
def test_sigma_wrong_size(n):
    """Message names the size this layer needs, e.g. a Sigma computed for another layer."""
    with pytest.raises(ValueError, match=r"needs \(36, 36\)"):
        tucker2_als_sigma(_kernel(), _sigma(n), (2, 2))


def test_sigma_not_square():
    with pytest.raises(ValueError, match="square"):
        tucker2_als_sigma(_kernel(), torch.zeros(36, 35, dtype=F64), (2, 2))


def test_sigma_non_symmetric():
    sigma = _sigma()
    sigma[0, 5] += 1e-3 * float(sigma.abs().max())
    with pytest.raises(ValueError, match="not symmetric"):
        tucker2_als_sigma(_kernel(), sigma, (2, 2))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_sigma_nan_inf(bad):
    sigma = _sigma()
    sigma[3, 3] = bad
    with pytest.raises(ValueError, match="NaN/Inf"):
        tucker2_als_sigma(_kernel(), sigma, (2, 2))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(solver="lu"), "solver must be 'auto', 'direct' or 'cg'"),
        (dict(init="zeros"), "init must be 'svd' or 'random'"),
        (dict(max_iter=-1), "max_iter and tol must be >= 0"),
        (dict(tol=-1e-3), "max_iter and tol must be >= 0"),
        (dict(cg_maxiter=0), "cg_maxiter and kron_iters >= 1"),
        (dict(kron_iters=0), "cg_maxiter and kron_iters >= 1"),
        (dict(cg_steps=0), "cg_steps must be None or >= 1"),
        (dict(ridge=-1e-3), "ridge and cg_tol must be >= 0"),
        (dict(ridge=float("nan")), "ridge and cg_tol must be >= 0"),
        (dict(cg_tol=-1.0), "ridge and cg_tol must be >= 0"),
    ],
)
def test_bad_config_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Tucker2SigmaConfig(**kwargs)


def test_valid_edge_config_runs():
    """The boundary values are accepted: max_iter=0 returns the initial Step A, ridge=0 works on a PD Sigma."""
    res = tucker2_als_sigma(_kernel(), _sigma(), (2, 2), config=Tucker2SigmaConfig(max_iter=0, ridge=0.0))
    assert len(res.errors) == 1 and 0 < res.errors[0] < 1

"""Bad inputs to the decompositions (Tucker-2, CP, SVD) and their configs give a clear ValueError that says
what is wrong."""

from __future__ import annotations

import pytest
import torch

from sigma_core.decompose import (
    CPSigmaConfig,
    Tucker2SigmaConfig,
    ag_lra,
    cp_als,
    cp_als_sigma,
    cp_deflation_sigma,
    fw_lra,
    row_weighted_tucker2,
    svd_sigma,
    svd_truncated,
    tucker2_als,
    tucker2_als_sigma,
    weighted_tucker2,
)

F64 = torch.float64
KERNEL_SHAPE = (6, 4, 3, 3)  # n = 36


# Small kernels on a shared 2-core machine: one torch thread (fixture in conftest.py).
pytestmark = pytest.mark.usefixtures("single_thread")


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
        (dict(init="zeros"), r"init must be one of \('svd', 'random'\)"),
        (dict(max_iter=-1), "max_iter and tol must be >= 0"),
        (dict(tol=-1e-3), "max_iter and tol must be >= 0"),
        (dict(cg_maxiter=0), "cg_maxiter and kron_iters >= 1"),
        (dict(kron_iters=0), "cg_maxiter and kron_iters >= 1"),
        (dict(cg_steps=0), "cg_steps must be None or >= 1"),
        (dict(ridge=-1e-3), "ridge and cg_tol must be >= 0"),
        (dict(ridge=float("nan")), "ridge and cg_tol must be >= 0"),
        (dict(cg_tol=-1.0), "ridge and cg_tol must be >= 0"),
        (dict(tol=float("nan")), "max_iter and tol must be >= 0"),
    ],
)
@pytest.mark.parametrize("config_cls", [Tucker2SigmaConfig, CPSigmaConfig])
def test_bad_config_values(config_cls, kwargs, match):
    """Both Sigma solvers' configs share the solver-setting checks and their messages."""
    with pytest.raises(ValueError, match=match):
        config_cls(**kwargs)


def test_valid_edge_config_runs():
    """The boundary values are accepted: max_iter=0 returns the initial Step A, ridge=0 works on a PD Sigma."""
    res = tucker2_als_sigma(_kernel(), _sigma(), (2, 2), config=Tucker2SigmaConfig(max_iter=0, ridge=0.0))
    assert len(res.errors) == 1 and 0 < res.errors[0] < 1


# ---------------------------------------------------------------- non-finite weights, every entry point

def _nan_kernel(bad: float) -> torch.Tensor:
    kernel = _kernel()
    kernel[1, 2, 0, 1] = bad
    return kernel


_KERNEL_ENTRY_POINTS = {
    "tucker2_als_sigma": lambda k: tucker2_als_sigma(k, _sigma(), (2, 2)),
    "cp_als_sigma": lambda k: cp_als_sigma(k, _sigma(), 2),
    "cp_deflation_sigma": lambda k: cp_deflation_sigma(k, _sigma(), 2),
    "tucker2_als": lambda k: tucker2_als(k, (2, 2)),
    "cp_als": lambda k: cp_als(k, 2),
    "weighted_tucker2": lambda k: weighted_tucker2(k, torch.ones_like(k), (2, 2)),
    "fw_lra": lambda k: fw_lra(k, torch.ones_like(k), (2, 2)),
    "ag_lra": lambda k: ag_lra(k, torch.ones(k.shape[0], dtype=F64), (2, 2)),
    "row_weighted_tucker2": lambda k: row_weighted_tucker2(k, torch.ones(k.shape[0], dtype=F64), (2, 2)),
}


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("solve", list(_KERNEL_ENTRY_POINTS.values()), ids=list(_KERNEL_ENTRY_POINTS))
def test_non_finite_kernel(solve, bad):
    """A NaN/Inf kernel is a ValueError naming the problem, not a LinAlgError from deep inside an SVD."""
    with pytest.raises(ValueError, match=r"kernel contains 1 NaN/Inf entries"):
        solve(_nan_kernel(bad))


@pytest.mark.parametrize("shape", [(6, 4), (6, 4, 1, 1)])
@pytest.mark.parametrize("bad", [float("nan"), float("-inf")])
def test_non_finite_weight_svd(shape, bad):
    """svd_sigma and the Frobenius svd_truncated reject a non-finite linear weight / 1x1 kernel
    (svd_truncated used to return an all-NaN factorization with error 0)."""
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(2), dtype=F64)
    weight.view(-1)[5] = bad
    sigma = torch.eye(4, dtype=F64)
    for solve in (lambda: svd_sigma(weight, sigma, 2), lambda: svd_truncated(weight, 2)):
        with pytest.raises(ValueError, match=r"weight contains 1 NaN/Inf entries"):
            solve()


def test_complex_kernel_rejected():
    with pytest.raises(ValueError, match="real tensor"):
        cp_als_sigma(_kernel().to(torch.complex128), _sigma(), 2)


def test_cp_solvers_share_the_kernel_and_sigma_checks():
    """cp_als_sigma and cp_deflation_sigma give the Tucker-2 solver's messages for a non-4-D kernel and a Sigma
    of the wrong size (one helper, sigma_core.decompose._checks)."""
    for solve in (cp_als_sigma, cp_deflation_sigma):
        with pytest.raises(ValueError, match="4-D"):
            solve(_kernel()[0], _sigma(), 2)
        with pytest.raises(ValueError, match=r"needs \(36, 36\)"):
            solve(_kernel(), _sigma(35), 2)

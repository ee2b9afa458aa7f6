"""CP under the Sigma norm: every CP-ALS-Sigma sub-step against brute-force least squares with explicit Kronecker /
Khatri-Rao design matrices, monotonicity on real and ill-conditioned Sigma, planted recovery, the Frobenius
(tensorly parafac) and greedy-deflation baselines, CPConv against the dense conv, CP ranks and the method registry."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _helpers import real_sigma, rel_close, sigma_sq_err, spd_with_condition
from sigma_core import metrics
from sigma_core.decompose import CPResult, CPSigmaConfig, cp_als, cp_als_sigma, cp_deflation_sigma, kronecker_fit
from sigma_core.decompose.cp_sigma import (
    _CP,
    _CPKronPreconditioner,
    _pcg,
    _prepare,
    _psi,
    _step_s_cg,
    _step_s_direct,
    _step_s_matvec,
    _step_s_rhs,
    _step_spatial,
    _step_t,
)
from sigma_core.layers import CPConv, module_from_spec
from sigma_core.ranks import (
    RankRule,
    cp_max_rank,
    cp_rank_alpha,
    cp_rank_from_fraction,
    cp_vbmf_rank,
    evbmf,
    validate_cp_rank,
)

F64 = torch.float64


# Small kernels on a shared 2-core machine: one torch thread (fixture in conftest.py).
pytestmark = pytest.mark.usefixtures("single_thread")


# ---------------------------------------------------------------- explicit algebra (no sigma_core code)


def _vec(x: torch.Tensor) -> torch.Tensor:
    """Column-major vec (paper Eq. 5), so that vec(A X B) = (B^T kron A) vec(X) (Eq. 6)."""
    return x.T.reshape(-1)


def _unvec(v: torch.Tensor, rows: int) -> torch.Tensor:
    return v.reshape(-1, rows).T


def _khatri_rao(*mats: torch.Tensor) -> torch.Tensor:
    """Explicit Khatri-Rao product: column r is the Kronecker product of the r-th columns (torch.kron)."""
    cols = []
    for r in range(mats[0].shape[1]):
        col = mats[0][:, r]
        for m in mats[1:]:
            col = torch.kron(col, m[:, r])
        cols.append(col)
    return torch.stack(cols, dim=1)


def _unfold1(f: _CP) -> torch.Tensor:
    """``K~_(1) = U_T (U_S kr U_H kr U_W)^T`` with an explicit Khatri-Rao product, shape (T, S*H*W)."""
    return f.t @ _khatri_rao(f.s, f.h, f.w).T


def _design(f: _CP, mode: str, chol: torch.Tensor) -> torch.Tensor:
    """Explicit design matrix of ``vec(U_mode) -> vec(K~_(1) L)`` (paper Eqs. 30-33), built column by column: K~ is
    linear in each factor, so column i is the image of the i-th unit matrix."""
    shape = getattr(f, mode).shape
    cols = []
    for i in range(shape[0] * shape[1]):
        unit = torch.zeros(shape[1], shape[0], dtype=F64)
        unit.view(-1)[i] = 1.0  # column-major position i
        cols.append(_vec(_unfold1(f._replace(**{mode: unit.T})) @ chol))
    return torch.stack(cols, dim=1)


def _lstsq(design: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.linalg.lstsq(design, target.unsqueeze(1), driver="gelsd").solution.squeeze(1)


def _case(t=5, s=4, h=3, w=2, r=3, cond=1e3, seed=0):
    """Random kernel, random PD Sigma of the given condition number, its Cholesky factor and random factors."""
    gen = torch.Generator().manual_seed(seed)
    kernel = torch.randn(t, s, h, w, generator=gen, dtype=F64)
    sigma = spd_with_condition(s * h * w, cond, gen)
    f = _CP(*(torch.randn(d, r, generator=gen, dtype=F64) for d in (t, s, h, w)))
    return kernel, sigma, torch.linalg.cholesky(sigma), f, gen


SHAPES = [((5, 4, 3, 2), 3), ((6, 3, 2, 3), 5), ((4, 5, 3, 3), 2), ((7, 6, 1, 1), 4)]


# ---------------------------------------------------------------- sub-steps against brute force


@pytest.mark.parametrize("shape,rank", SHAPES)
def test_step_t_equals_brute_force_with_explicit_kronecker(shape, rank):
    """U_T = K1 Sigma Z (Z^T Sigma Z)^{-1} is the LS solution of Eq. 30, design ((Z^T L)^T kron I_T)."""
    kernel, sigma, chol, f, _ = _case(*shape, rank)
    t = shape[0]
    layer = _prepare(kernel, sigma, 0.0, F64)
    u_t, sq = _step_t(layer, f, _psi(layer, f.s))
    z = _khatri_rao(f.s, f.h, f.w)
    design = torch.kron((z.T @ chol).T.contiguous(), torch.eye(t, dtype=F64))  # P^(T) of Eq. 30
    u_ls = _unvec(_lstsq(design, _vec(kernel.reshape(t, -1) @ chol)), t)
    err = rel_close(u_t, u_ls)
    f_err = abs(sq - sigma_sq_err(kernel.reshape(t, -1), _unfold1(f._replace(t=u_t)), sigma)) / sq
    print(f"U_T {shape} R={rank}: vs LS {err:.1e}, f vs direct {f_err:.1e}")
    assert err < 1e-10 and f_err < 1e-10


@pytest.mark.parametrize("shape,rank", SHAPES)
def test_step_s_direct_and_pcg_equal_brute_force(shape, rank):
    kernel, sigma, chol, f, gen = _case(*shape, rank)
    t, s, h, w = shape
    layer = _prepare(kernel, sigma, 0.0, F64)
    atk = f.t.T @ layer.ksig
    design = _design(f, "s", chol)
    u_ls = _unvec(_lstsq(design, _vec(kernel.reshape(t, -1) @ chol)), s)
    u_direct = _step_s_direct(layer, f, atk)
    sigma_s, sigma_p = kronecker_fit(layer.sigma, s, h * w)
    start = f._replace(s=torch.randn(s, rank, generator=gen, dtype=F64))
    cfg = CPSigmaConfig(cg_tol=1e-14, cg_maxiter=500)
    u_cg, iters = _step_s_cg(layer, start, atk, torch.linalg.cholesky(sigma_s), sigma_p, cfg)
    errs = rel_close(u_direct, u_ls), rel_close(u_cg, u_ls)
    print(f"U_S {shape} R={rank}: direct vs LS {errs[0]:.1e}, PCG ({iters} it) vs LS {errs[1]:.1e}")
    assert max(errs) < 1e-10 and iters < 500


@pytest.mark.parametrize("shape,rank", SHAPES)
def test_step_s_matvec_rhs_and_preconditioner_against_explicit_normal_equations(shape, rank):
    """Structured mat-vec = D^T D vec(U), rhs = D^T vec(K1 L); for Sigma = A kron B the preconditioner is exact."""
    kernel, sigma, chol, f, gen = _case(*shape, rank)
    t, s, h, w = shape
    layer = _prepare(kernel, sigma, 0.0, F64)
    design = _design(f, "s", chol)
    e = _khatri_rao(f.h, f.w)
    phi = f.t.T @ f.t
    x = torch.randn(s, rank, generator=gen, dtype=F64)
    mv = rel_close(_vec(_step_s_matvec(layer, phi, e, x)), design.T @ design @ _vec(x))
    rhs = rel_close(_vec(_step_s_rhs(layer, f.t.T @ layer.ksig, e)),
                    design.T @ _vec(kernel.reshape(t, -1) @ chol))
    # Exact Kronecker Sigma: the preconditioner inverts the normal operator.
    kron_sigma = torch.kron(spd_with_condition(s, 1e2, gen), spd_with_condition(h * w, 1e2, gen))
    klayer = _prepare(kernel, kron_sigma, 0.0, F64)
    sig_s, sig_p = kronecker_fit(klayer.sigma, s, h * w, iters=30)
    pre = _CPKronPreconditioner(torch.linalg.cholesky(sig_s), sig_p, phi, e)
    inv = rel_close(pre(_step_s_matvec(klayer, phi, e, x)), x)
    print(f"U_S {shape}: matvec {mv:.1e}, rhs {rhs:.1e}, preconditioner on Kronecker Sigma {inv:.1e}")
    assert mv < 1e-12 and rhs < 1e-12 and inv < 1e-8


@pytest.mark.parametrize("mode", ["h", "w"])
@pytest.mark.parametrize("shape,rank", SHAPES)
def test_step_spatial_equals_brute_force(shape, rank, mode):
    kernel, sigma, chol, f, _ = _case(*shape, rank)
    t = shape[0]
    layer = _prepare(kernel, sigma, 0.0, F64)
    factor, sq = _step_spatial(layer, f, _psi(layer, f.s), f.t.T @ layer.ksig, mode)
    design = _design(f, mode, chol)
    u_ls = _unvec(_lstsq(design, _vec(kernel.reshape(t, -1) @ chol)), getattr(f, mode).shape[0])
    err = rel_close(factor, u_ls)
    f_err = abs(sq - sigma_sq_err(kernel.reshape(t, -1), _unfold1(f._replace(**{mode: factor})), sigma)) / sq
    print(f"U_{mode.upper()} {shape} R={rank}: vs LS {err:.1e}, f vs direct {f_err:.1e}")
    assert err < 1e-10 and f_err < 1e-10


@pytest.mark.parametrize("cg_steps", [1, 3])
def test_inexact_pcg_never_increases_the_u_s_objective(cg_steps):
    kernel, sigma, chol, f, gen = _case(6, 5, 3, 3, 4, cond=1e6)
    layer = _prepare(kernel, sigma, 0.0, F64)
    design, target = _design(f, "s", chol), _vec(kernel.reshape(6, -1) @ chol)
    sig_s, sig_p = kronecker_fit(layer.sigma, 5, 9)
    e, phi = _khatri_rao(f.h, f.w), f.t.T @ f.t
    pre = _CPKronPreconditioner(torch.linalg.cholesky(sig_s), sig_p, phi, e)
    rhs = _step_s_rhs(layer, f.t.T @ layer.ksig, e)
    x = torch.randn(5, 4, generator=gen, dtype=F64)
    obj = float(((design @ _vec(x) - target) ** 2).sum())
    for _ in range(5):
        x, _ = _pcg(lambda v: _step_s_matvec(layer, phi, e, v), pre, rhs, x, tol=0.0, maxiter=cg_steps)
        new = float(((design @ _vec(x) - target) ** 2).sum())
        assert new <= obj * (1 + 1e-12)
        obj = new


# ---------------------------------------------------------------- whole algorithm


def _random_kernel(shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _rel_direct(kernel, approx, sigma) -> float:
    k1 = kernel.reshape(kernel.shape[0], -1)
    return (sigma_sq_err(k1, approx.reshape(k1.shape), sigma) / sigma_sq_err(k1, 0 * k1, sigma)) ** 0.5


@pytest.fixture(scope="module")
def sigma_cases():
    """Real Sigma (FMNIST patches through ReLU(random conv 1 -> 8), 3x3) and a synthetic one with cond 1e8."""
    return {"real": real_sigma(8), "illcond": spd_with_condition(72, 1e8, torch.Generator().manual_seed(7))}


SOLVERS = {"direct": dict(solver="direct"), "cg_exact": dict(solver="cg", cg_tol=1e-12),
           "cg_3steps": dict(solver="cg", cg_steps=3)}


def _monotone(values, rtol=1e-12) -> bool:
    return all(b <= a * (1 + rtol) + 1e-15 for a, b in zip(values, values[1:]))


@pytest.mark.parametrize("solver", list(SOLVERS))
@pytest.mark.parametrize("case", ["real", "illcond"])
def test_error_never_increases_across_sweeps_and_sub_steps(sigma_cases, case, solver):
    """errors is non-increasing, so is the chain of errors after every single update, it made real progress,
    and the last value is the true rel_sigma_err of the returned factors."""
    sigma = sigma_cases[case]
    kernel = _random_kernel((12, 8, 3, 3), seed=11)
    if case == "illcond":
        assert float(torch.linalg.cond(sigma)) >= 1e7
    res = cp_als_sigma(kernel, sigma, 10, config=CPSigmaConfig(max_iter=30, tol=1e-12, **SOLVERS[solver]))
    errs = res.errors
    chain = [errs[0]]
    for subs in res.info["substep_rel_errors"][: len(errs) - 1]:
        chain.extend(subs)
    print(f"{case}/{solver}: {len(errs) - 1} sweeps, {errs[0]:.4f} -> {errs[-1]:.4f}")
    assert _monotone(errs), errs
    assert _monotone(chain), chain
    assert len(errs) >= 5 and errs[-1] < errs[0] * (1 - 1e-2)
    approx = res.reconstruct()
    assert abs(errs[-1] - _rel_direct(kernel, approx, sigma)) < 1e-8 * max(errs[-1], 1e-3)
    assert abs(errs[-1] - metrics.rel_sigma_err(kernel, approx, sigma)) < 1e-8


def test_solvers_agree(sigma_cases):
    """Direct and exact-CG U_S solves give the same error history."""
    kernel = _random_kernel((10, 8, 3, 3), seed=3)
    hist = [cp_als_sigma(kernel, sigma_cases["real"], 6,
                         config=CPSigmaConfig(max_iter=15, tol=0, **SOLVERS[s])).errors for s in ("direct", "cg_exact")]
    assert max(abs(a - b) / b for a, b in zip(*hist)) < 1e-7


def _planted(shape, rank, seed):
    gen = torch.Generator().manual_seed(seed)
    factors = [torch.randn(d, rank, generator=gen, dtype=F64) for d in shape]
    return torch.einsum("tr,sr,hr,wr->tshw", *factors)


@pytest.mark.parametrize("init", ["svd", "random"])
def test_planted_rank_r_recovery(init):
    """An exactly rank-4 kernel is recovered to ~1e-7 under a real Sigma (well inside max_iter)."""
    kernel = _planted((10, 8, 3, 3), 4, seed=5)
    sigma = spd_with_condition(72, 1e3, torch.Generator().manual_seed(2))
    res = cp_als_sigma(kernel, sigma, 4, config=CPSigmaConfig(max_iter=400, tol=1e-13, init=init),
                       generator=torch.Generator().manual_seed(0))
    print(f"planted ({init}): {len(res.errors) - 1} sweeps, final rel_sigma_err {res.errors[-1]:.2e}")
    assert res.errors[-1] < 1e-6
    assert rel_close(res.reconstruct(), kernel) < 1e-5


def test_full_rank_svd_init_is_exact(sigma_cases):
    """At R = R_max the HOSVD-style start is an exact CP: the error after the initial U_T solve is ~0."""
    kernel = _random_kernel((12, 8, 3, 3), seed=1)
    r_max = cp_max_rank(kernel.shape)
    res = cp_als_sigma(kernel, sigma_cases["real"], r_max, config=CPSigmaConfig(max_iter=1))
    assert res.errors[0] < 1e-7


@pytest.mark.parametrize("shape", [(8, 6, 1, 1), (2, 1, 3, 1), (3, 2, 5, 1)])
def test_full_rank_on_degenerate_shapes(shape):
    """1x1 convs and kernels whose largest mode is spatial (H unfolding wider than tall is not assumed)."""
    kernel = _random_kernel(shape, seed=2)
    n = shape[1] * shape[2] * shape[3]
    r_max = cp_max_rank(shape)
    res = cp_als_sigma(kernel, spd_with_condition(n, 1e2, torch.Generator().manual_seed(0)), r_max,
                       config=CPSigmaConfig(max_iter=300, tol=1e-12))
    assert res.errors[-1] < 1e-6, (shape, res.errors[-1])


@pytest.mark.parametrize("rank,seed", [(6, 0), (12, 1), (20, 2)])
def test_sigma_solver_beats_parafac_in_sigma_error(sigma_cases, rank, seed):
    kernel = _random_kernel((16, 8, 3, 3), seed=seed)
    sigma = sigma_cases["real"]
    ours = cp_als_sigma(kernel, sigma, rank, config=CPSigmaConfig(max_iter=150, tol=1e-7))
    base = cp_als(kernel, rank, n_iter_max=150, random_state=0)
    base_sigma = metrics.rel_sigma_err(kernel, base.reconstruct(), sigma)
    print(f"R={rank}: CP-ALS-Sigma {ours.errors[-1]:.4f} vs parafac {base_sigma:.4f}")
    assert ours.errors[-1] <= base_sigma


def test_identity_sigma_matches_frobenius_objective():
    """With Sigma = I both minimize the Frobenius error; ours is at least as good as parafac's from its start."""
    kernel = _random_kernel((10, 6, 3, 3), seed=4)
    ours = cp_als_sigma(kernel, torch.eye(54, dtype=F64), 8, config=CPSigmaConfig(max_iter=300, tol=1e-9))
    base = cp_als(kernel, 8, n_iter_max=300, random_state=0)
    frob = metrics.rel_frob_err(kernel, ours.reconstruct())
    assert abs(frob - ours.errors[-1]) < 1e-10
    assert frob <= base.errors[-1] * 1.02
    assert abs(base.errors[-1] - metrics.rel_frob_err(kernel, base.reconstruct())) < 1e-8


def test_deflation_is_monotone_and_worse_than_full_als(sigma_cases):
    kernel = _random_kernel((12, 8, 3, 3), seed=6)
    sigma = sigma_cases["real"]
    defl = cp_deflation_sigma(kernel, sigma, 8, config=CPSigmaConfig(max_iter=60, tol=1e-8))
    full = cp_als_sigma(kernel, sigma, 8, config=CPSigmaConfig(max_iter=100, tol=1e-8))
    assert defl.method == "cp-deflation-sigma" and len(defl.errors) == 8 and defl.rank == 8
    assert _monotone(defl.errors), defl.errors
    assert abs(defl.errors[-1] - metrics.rel_sigma_err(kernel, defl.reconstruct(), sigma)) < 1e-8
    print(f"R=8: deflation {defl.errors[-1]:.4f}, CP-ALS-Sigma {full.errors[-1]:.4f}")
    assert full.errors[-1] < defl.errors[-1]


def test_deflation_rank_one_is_cp_als_sigma_rank_one(sigma_cases):
    """The first deflation term is the rank-one CP-ALS-Sigma solution (same sub-steps, R = 1)."""
    kernel = _random_kernel((12, 8, 3, 3), seed=8)
    cfg = CPSigmaConfig(max_iter=50, tol=1e-10)
    one = cp_als_sigma(kernel, sigma_cases["real"], 1, config=cfg)
    defl = cp_deflation_sigma(kernel, sigma_cases["real"], 1, config=cfg)
    assert abs(one.errors[-1] - defl.errors[0]) < 1e-10
    assert rel_close(defl.reconstruct(), one.reconstruct()) < 1e-8


def test_result_metadata_dtype_and_balance(sigma_cases):
    kernel = _random_kernel((8, 8, 3, 3), seed=9).float()
    res = cp_als_sigma(kernel, sigma_cases["real"], 5, config=CPSigmaConfig(max_iter=5))
    assert res.method == "cp-als-sigma" and res.metric == "rel_sigma_err" and res.rank == 5 and res.ranks == (5,)
    assert res.u_t.dtype == torch.float32 and res.kernel_shape == (8, 8, 3, 3)
    assert {"cg_iters", "sweep_seconds", "substep_rel_errors", "seconds", "solver"} <= set(res.info)
    norms = torch.stack([f.double().norm(dim=0) for f in res.factors])
    assert rel_close(norms, norms[:1].expand_as(norms)) < 1e-5  # balanced columns
    with pytest.raises(dataclasses.FrozenInstanceError):
        res.rank = 3  # type: ignore[misc]
    base = cp_als(kernel, 5, n_iter_max=20)
    assert base.method == "cp-als" and base.metric == "rel_frob_err" and base.u_s.dtype == torch.float32


def test_parafac_callback_can_stop_early():
    seen = []
    res = cp_als(_random_kernel((8, 6, 3, 3), 0), 5, callback=lambda k, err: seen.append(err) or k >= 3)
    assert len(seen) == 4 and res.info["iterations"] == 3 and not res.converged
    assert res.info["stopped_by_callback"] and res.errors[-1] == seen[-1]


def test_callback_sees_every_sweep(sigma_cases):
    seen = []
    res = cp_als_sigma(_random_kernel((6, 8, 3, 3), 0), sigma_cases["real"], 4,
                       config=CPSigmaConfig(max_iter=4, tol=0), callback=lambda k, e, info: seen.append((k, e)))
    assert [k for k, _ in seen] == list(range(len(res.errors)))
    assert [e for _, e in seen] == list(res.errors)


# ---------------------------------------------------------------- bad inputs


def test_bad_inputs_raise_clear_errors(sigma_cases):
    kernel, sigma = _random_kernel((12, 8, 3, 3), 0), sigma_cases["real"]
    with pytest.raises(ValueError, match=">= 1"):
        cp_als_sigma(kernel, sigma, 0)
    with pytest.raises(ValueError, match=r"exceeds R_max .* = 72"):
        cp_als_sigma(kernel, sigma, 73)
    with pytest.raises(ValueError, match="int"):
        cp_als_sigma(kernel, sigma, 2.5)
    with pytest.raises(ValueError, match="72"):
        cp_als_sigma(kernel, sigma[:-1, :-1], 3)
    with pytest.raises(ValueError, match="4-D"):
        cp_als_sigma(kernel[0], sigma, 3)
    with pytest.raises(ValueError, match="exceeds R_max"):
        cp_deflation_sigma(kernel, sigma, 100)
    with pytest.raises(ValueError, match="exceeds R_max"):
        cp_als(kernel, 100)
    with pytest.raises(ValueError, match="solver"):
        CPSigmaConfig(solver="qr")
    with pytest.raises(ValueError, match="init"):
        CPSigmaConfig(init="tucker")
    with pytest.raises(ValueError, match="cg_steps"):
        CPSigmaConfig(cg_steps=0)


def test_cp_result_validates_shapes():
    f = [torch.zeros(d, 3) for d in (4, 5, 3, 3)]
    with pytest.raises(ValueError, match="u_s must be"):
        CPResult(f[0], torch.zeros(5, 2), f[2], f[3], rank=3, errors=(), converged=True, method="x")
    with pytest.raises(ValueError, match="rank must be"):
        CPResult(*f, rank=0, errors=(), converged=True, method="x")
    with pytest.raises(ValueError, match="dtype"):
        CPResult(f[0].double(), *f[1:], rank=3, errors=(), converged=True, method="x")


# ---------------------------------------------------------------- CPConv


def _random_cp(t, s, kh, kw, rank, seed=0, dtype=torch.float32) -> CPResult:
    gen = torch.Generator().manual_seed(seed)
    fac = [torch.randn(d, rank, generator=gen, dtype=dtype) / d ** 0.5 for d in (t, s, kh, kw)]
    return CPResult(*fac, rank=rank, errors=(0.0,), converged=True, method="test")


def _dense(conv: nn.Conv2d, x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """The dense conv with another kernel: torch's own padding-mode handling (pads once, both axes)."""
    return conv._conv_forward(x, kernel.to(x.dtype), conv.bias)


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("kernel_size", [(3, 3), (5, 3)])
@pytest.mark.parametrize("stride", [1, 2, (2, 1)])
@pytest.mark.parametrize("padding", [0, 1, (2, 1)])
@pytest.mark.parametrize("dilation", [1, (2, 1)])
@pytest.mark.parametrize("bias", [True, False])
def test_cpconv_matches_dense(padding_mode, kernel_size, stride, padding, dilation, bias):
    """Splitting padding over the two depthwise convs is exact in every padding mode (see CPConv's Notes)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(5, 7, kernel_size, stride=stride, padding=padding, dilation=dilation,
                     padding_mode=padding_mode, bias=bias)
    result = _random_cp(7, 5, *kernel_size, rank=4)
    layer = CPConv.from_result(conv, result)
    x = torch.randn(2, 5, 13, 12)
    expected = _dense(conv, x, result.reconstruct())
    out = layer(x)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.reconstructed_kernel(), result.reconstruct(), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("kernel_size", [(3, 3), (2, 4)])
def test_cpconv_same_padding_float64_is_exact(padding_mode, kernel_size):
    """padding='same' (asymmetric for even kernels) and float64: agreement to rounding, not just 1e-5."""
    conv = nn.Conv2d(4, 6, kernel_size, padding="same", dilation=(1, 2), padding_mode=padding_mode).double()
    result = _random_cp(6, 4, *kernel_size, rank=5, dtype=F64)
    layer = CPConv.from_result(conv, result)
    x = torch.randn(2, 4, 11, 12, dtype=F64)
    with torch.no_grad():
        expected = _dense(conv, x, result.reconstruct())
        assert float((layer(x) - expected).abs().max()) < 1e-12 * float(expected.abs().max())


def test_cpconv_structure_bias_and_cast():
    conv = nn.Conv2d(6, 8, 3, stride=(2, 1), padding=(1, 2), dilation=(1, 2))
    layer = CPConv.from_result(conv, _random_cp(8, 6, 3, 3, 5, dtype=F64))
    assert layer.in_proj.weight.shape == (5, 6, 1, 1) and layer.in_proj.bias is None
    assert layer.depth_h.weight.shape == (5, 1, 3, 1) and layer.depth_h.groups == 5
    assert layer.depth_h.stride == (2, 1) and layer.depth_h.padding == (1, 0) and layer.depth_h.dilation == (1, 1)
    assert layer.depth_w.weight.shape == (5, 1, 1, 3) and layer.depth_w.groups == 5
    assert layer.depth_w.stride == (1, 1) and layer.depth_w.padding == (0, 2) and layer.depth_w.dilation == (1, 2)
    assert layer.out_proj.weight.shape == (8, 5, 1, 1) and layer.in_proj.weight.dtype == torch.float32
    torch.testing.assert_close(layer.out_proj.bias, conv.bias)
    assert not CPConv.from_result(conv.eval(), _random_cp(8, 6, 3, 3, 2)).training


@pytest.mark.parametrize("padding", [(2, 1), "same"])
def test_cpconv_spec_round_trip(padding):
    conv = nn.Conv2d(5, 7, (5, 3), padding=padding, dilation=(1, 2), padding_mode="reflect")
    layer = CPConv.from_result(conv, _random_cp(7, 5, 5, 3, 6))
    spec = json.loads(json.dumps(layer.spec()))
    assert spec["type"] == "CPConv" and spec["rank"] == 6
    rebuilt = module_from_spec(spec)
    rebuilt.load_state_dict(layer.state_dict())
    x = torch.randn(2, 5, 11, 10)
    torch.testing.assert_close(rebuilt(x), layer(x), atol=0, rtol=0)
    assert rebuilt.spec() == layer.spec()


def test_cpconv_rejects_bad_sources():
    with pytest.raises(ValueError, match="grouped"):
        CPConv.from_result(nn.Conv2d(4, 8, 3, groups=2), _random_cp(8, 2, 3, 3, 2))
    with pytest.raises(ValueError, match=r"\(6, 5, 3, 3\).*\(6, 4, 3, 3\)"):
        CPConv.from_result(nn.Conv2d(4, 6, 3), _random_cp(6, 5, 3, 3, 2))
    with pytest.raises(ValueError, match="Conv2d"):
        CPConv.from_result(nn.Linear(4, 6), _random_cp(6, 4, 3, 3, 2))
    with pytest.raises(ValueError, match="CPResult"):
        CPConv.from_result(nn.Conv2d(4, 6, 3), object())
    with pytest.raises(ValueError, match="rank"):
        CPConv.empty(4, 6, 3, 0)
    with pytest.raises(ValueError, match="padding_mode"):
        CPConv.empty(4, 6, 3, 2, padding_mode="mirror")


# ---------------------------------------------------------------- ranks


def test_cp_vbmf_rank_is_max_over_unfoldings():
    kernel = _planted((32, 24, 3, 3), 6, seed=0) + 0.01 * _random_kernel((32, 24, 3, 3), 1)
    per_mode = [evbmf(kernel.movedim(m, 0).reshape(kernel.shape[m], -1)).rank for m in range(4)]
    assert cp_vbmf_rank(kernel) == max(per_mode) == 6


def test_cp_rank_alpha_and_fraction():
    kernel = _planted((32, 24, 3, 3), 6, seed=0) + 0.01 * _random_kernel((32, 24, 3, 3), 1)
    r_max = cp_max_rank(kernel.shape)
    assert r_max == 24 * 9
    assert cp_rank_alpha(kernel, 1.0) == 6
    assert cp_rank_alpha(kernel, 0.0) == r_max
    assert cp_rank_alpha(kernel, 0.8) == round(6 + 0.2 * (r_max - 6))
    assert cp_rank_from_fraction(kernel.shape, 0.1) == round(0.1 * r_max)
    assert cp_rank_from_fraction((2, 2, 1, 1), 0.01) == 1
    assert validate_cp_rank((4, 5, 3, 3), 12) == 12


def test_rank_rule_resolve_cp():
    kernel = _planted((32, 24, 3, 3), 6, seed=0) + 0.01 * _random_kernel((32, 24, 3, 3), 1)
    assert RankRule(alpha=0.8).resolve_cp(kernel) == cp_rank_alpha(kernel, 0.8)
    assert RankRule(fraction=0.5).resolve_cp(kernel) == 108
    assert RankRule(cp_rank=17).resolve_cp(kernel) == 17
    assert "R=17" in RankRule(cp_rank=17).describe()
    with pytest.raises(ValueError, match="exceeds R_max"):
        RankRule(cp_rank=1000).resolve_cp(kernel)
    with pytest.raises(ValueError, match="cp_rank=R"):
        RankRule(ranks=(4, 4)).resolve_cp(kernel)
    with pytest.raises(ValueError, match="CP rank"):
        RankRule(cp_rank=4).resolve(kernel)
    with pytest.raises(ValueError, match="pair.*cp_rank=3"):
        RankRule(ranks=(3,))
    with pytest.raises(ValueError, match="cp_rank must be"):
        RankRule(cp_rank=0)
    with pytest.raises(ValueError, match="exactly one"):
        RankRule(alpha=0.5, cp_rank=3)


# ---------------------------------------------------------------- pipeline registry


@pytest.mark.parametrize("name", ["cp-als-sigma", "cp-als", "cp-deflation-sigma"])
def test_registered_cp_methods_build_equivalent_layers(name, sigma_cases):
    from pipeline.compress import decompose_layer
    from pipeline.methods import SolverOptions, get_method

    method = get_method(name)
    assert method.family == "cp"
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, 3, padding=1)
    outcome, layer = decompose_layer("c", conv, sigma_cases["real"], RankRule(cp_rank=6), name,
                                     SolverOptions(max_iter=20))
    assert outcome.ok, outcome.error
    assert outcome.ranks == (6,) and isinstance(layer, CPConv)
    x = torch.randn(2, 8, 9, 9)
    expected = F.conv2d(x, layer.reconstructed_kernel(), conv.bias, padding=1)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    assert outcome.rel_sigma_err < 1.0

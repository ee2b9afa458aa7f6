"""Tucker2-ALS-Sigma (sigma_core/decompose/tucker2_sigma.py) against brute force with explicit Kronecker
design matrices, monotonicity on real and ill-conditioned Sigma, planted recovery, and the Frobenius baseline."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from _helpers import random_orthogonal, real_sigma, rel_close, sigma_sq_err, spd_with_condition, tucker2_unfold
from sigma_core import metrics
from sigma_core.decompose import Tucker2Result, Tucker2SigmaConfig, kronecker_fit, tucker2_als, tucker2_als_sigma
from sigma_core.decompose.tucker2_sigma import (
    _KronPreconditioner,
    _pcg,
    _prepare,
    _step_a,
    _step_b_direct,
    _step_b_matvec,
    _step_b_rhs,
)

F64 = torch.float64


# Small kernels on a shared 2-core machine: one torch thread (fixture in conftest.py).
pytestmark = pytest.mark.usefixtures("single_thread")


def _vec(x: torch.Tensor) -> torch.Tensor:
    """Column-major vec (so that vec(A X B) = (B^T kron A) vec(X))."""
    return x.T.reshape(-1)


def _unvec(v: torch.Tensor, rows: int) -> torch.Tensor:
    return v.reshape(-1, rows).T


def _kron(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Kronecker product by broadcasting (torch.kron rejects some views, e.g. (n, 1) column slices)."""
    return (a[:, None, :, None] * b[None, :, None, :]).reshape(a.shape[0] * b.shape[0], a.shape[1] * b.shape[1])


def _lstsq(design: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.linalg.lstsq(design, target.unsqueeze(1), driver="gelsd").solution.squeeze(1)


def _small_case(t=5, s=4, h=2, w=2, cond=1e3, seed=0):
    """Random kernel, random PD Sigma with the given condition number, its Cholesky factor L."""
    gen = torch.Generator().manual_seed(seed)
    kernel = torch.randn(t, s, h, w, generator=gen, dtype=F64)
    sigma = spd_with_condition(s * h * w, cond, gen)
    return kernel, sigma, torch.linalg.cholesky(sigma), gen


def _orth(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    return random_orthogonal(rows, gen)[:, :cols].contiguous()


def _m_matrix(u_s: torch.Tensor, p: int) -> torch.Tensor:
    return _kron(u_s, torch.eye(p, dtype=F64))


# ---------------------------------------------------------------- Step A


def test_step_a_full_rt_is_unconstrained_least_squares():
    """R_T = T: B = U_T G1 from Step A is the least-squares minimizer of ||(K1 - B M^T) L||_F over all B."""
    kernel, sigma, chol, gen = _small_case()
    t, s, h, w = kernel.shape
    p, r_s = h * w, 2
    u_s = _orth(s, r_s, gen)
    layer = _prepare(kernel, sigma, 0.0, F64)
    u_t, core, f = _step_a(layer, u_s, t)
    b = u_t @ core.reshape(t, -1)
    mtl = _m_matrix(u_s, p).T @ chol  # (R_S P, n)
    design = _kron(mtl.T, torch.eye(t, dtype=F64))
    b_ls = _unvec(_lstsq(design, _vec(kernel.reshape(t, -1) @ chol)), t)
    err = rel_close(b, b_ls)
    print(f"step A (R_T = T) vs brute-force LS: {err:.2e}")
    assert err < 1e-10
    assert abs(f - sigma_sq_err(kernel.reshape(t, -1), b @ _m_matrix(u_s, p).T, sigma)) < 1e-10 * f


@pytest.mark.parametrize(
    "shape,ranks",
    [((5, 4, 2, 2), (3, 2)), ((7, 5, 2, 3), (2, 3)), ((6, 3, 3, 1), (4, 1)), ((6, 4, 1, 1), (5, 2))],
)
def test_step_a_jointly_optimal_against_brute_force(shape, ranks):
    """R_T < T: with Step A's U_T fixed, LS over G gives Step A's G; with its G fixed, LS over U_T gives its U_T;
    and the returned f is the directly computed squared Sigma error.

    The last two cases have R_T > R_S*P (a 1x1 conv with R_T > R_S): K~1 then has rank R_S*P, G1 has zero rows,
    and only the product U_T G1 is determined by the LS over U_T."""
    kernel, sigma, chol, gen = _small_case(*shape)
    t, s, h, w = shape
    p = h * w
    r_t, r_s = ranks
    u_s = _orth(s, r_s, gen)
    layer = _prepare(kernel, sigma, 0.0, F64)
    u_t, core, f = _step_a(layer, u_s, r_t)
    assert u_t.shape == (t, r_t) and core.shape == (r_t, r_s, p)
    assert rel_close(u_t.T @ u_t, torch.eye(r_t, dtype=F64)) < 1e-12
    k1l = kernel.reshape(t, -1) @ chol
    mtl = _m_matrix(u_s, p).T @ chol
    g1 = core.reshape(r_t, r_s * p)
    # (b1) LS over G1 for fixed U_T: vec(U_T G1 M^T L) = ((M^T L)^T kron U_T) vec(G1).
    g1_ls = _unvec(_lstsq(_kron(mtl.T, u_t), _vec(k1l)), r_t)
    # (b2) LS over U_T for fixed G1: vec(U_T (G1 M^T L)) = ((G1 M^T L)^T kron I_T) vec(U_T).
    u_t_ls = _unvec(_lstsq(_kron((g1 @ mtl).T, torch.eye(t, dtype=F64)), _vec(k1l)), t)
    # (c) f against the directly computed error with an explicit Kronecker M.
    f_direct = sigma_sq_err(kernel.reshape(t, -1), tucker2_unfold(u_t, core, u_s), sigma)
    if r_t > r_s * p:
        assert torch.linalg.matrix_rank(g1) == r_s * p
        u_t_ls, u_t = u_t_ls @ g1, u_t @ g1
    errs = rel_close(g1, g1_ls), rel_close(u_t, u_t_ls), abs(f - f_direct) / f_direct
    print(f"step A {shape} {ranks}: G vs LS {errs[0]:.2e}, U_T vs LS {errs[1]:.2e}, f vs direct {errs[2]:.2e}")
    assert max(errs) < 1e-10


def test_step_a_beats_other_pairs():
    """No random (U_T, G) pair with the same U_S reaches a lower error than Step A's (joint optimality)."""
    kernel, sigma, _, gen = _small_case(6, 4, 3, 3)
    u_s = _orth(4, 2, gen)
    layer = _prepare(kernel, sigma, 0.0, F64)
    u_t, core, f = _step_a(layer, u_s, 3)
    k1 = kernel.reshape(6, -1)
    for _ in range(20):
        ut2 = u_t + 0.05 * torch.randn(u_t.shape, generator=gen, dtype=F64)
        core2 = core + 0.05 * torch.randn(core.shape, generator=gen, dtype=F64)
        assert sigma_sq_err(k1, tucker2_unfold(ut2, core2, u_s), sigma) >= f * (1 - 1e-12)


# ---------------------------------------------------------------- Step B


def _step_b_design(u_t, core, chol, s):
    """Explicit design matrix of vec(U_S) -> vec(K~1 L), built column by column (unit U_S per column)."""
    r_s = core.shape[1]
    cols = []
    for i in range(s * r_s):
        e = torch.zeros(s * r_s, dtype=F64)
        e[i] = 1.0
        cols.append((tucker2_unfold(u_t, core, e.reshape(s, r_s)) @ chol).reshape(-1))
    return torch.stack(cols, dim=1)


def _step_b_case(shape, ranks, seed=0, cond=1e3):
    kernel, sigma, chol, gen = _small_case(*shape, cond=cond, seed=seed)
    t, s, h, w = shape
    layer = _prepare(kernel, sigma, 0.0, F64)
    u_t = _orth(t, ranks[0], gen)  # Step B is always called with an orthonormal U_T (from Step A)
    core = torch.randn(ranks[0], ranks[1], h * w, generator=gen, dtype=F64)
    design = _step_b_design(u_t, core, chol, s)
    target = (kernel.reshape(t, -1) @ chol).reshape(-1)
    return layer, u_t, core, design, target, gen


STEP_B_CASES = [((5, 4, 2, 2), (3, 2)), ((7, 6, 3, 3), (3, 3)), ((4, 5, 2, 3), (4, 2))]


@pytest.mark.parametrize("shape,ranks", STEP_B_CASES)
def test_step_b_direct_and_pcg_equal_brute_force(shape, ranks):
    layer, u_t, core, design, target, gen = _step_b_case(shape, ranks)
    s, p = layer.sp
    u_ls = _lstsq(design, target).reshape(s, ranks[1])
    u_direct = _step_b_direct(layer, u_t, core)
    sigma_s, sigma_p = kronecker_fit(layer.sigma, s, p)
    pre = _KronPreconditioner(torch.linalg.cholesky(sigma_s), sigma_p, core)
    x0 = torch.randn(s, ranks[1], generator=gen, dtype=F64)
    u_cg, iters = _pcg(lambda x: _step_b_matvec(layer, core, x), pre, _step_b_rhs(layer, u_t, core), x0,
                       tol=1e-14, maxiter=500)
    err_d, err_cg = rel_close(u_direct, u_ls), rel_close(u_cg, u_ls)
    print(f"step B {shape} {ranks}: direct vs LS {err_d:.2e}, PCG ({iters} it) vs LS {err_cg:.2e}")
    assert err_d < 1e-10 and err_cg < 1e-10
    assert iters < 500


@pytest.mark.parametrize("shape,ranks", STEP_B_CASES)
def test_step_b_matvec_and_rhs_equal_explicit_normal_equations(shape, ranks):
    """Structured mat-vec = (D^T D) vec(U); right-hand side = D^T vec(K1 L), D the explicit design matrix."""
    layer, u_t, core, design, target, gen = _step_b_case(shape, ranks)
    s, _ = layer.sp
    u = torch.randn(s, ranks[1], generator=gen, dtype=F64)
    mv_err = rel_close(_step_b_matvec(layer, core, u).reshape(-1), design.T @ design @ u.reshape(-1))
    rhs_err = rel_close(_step_b_rhs(layer, u_t, core).reshape(-1), design.T @ target)
    print(f"step B {shape}: matvec vs explicit {mv_err:.2e}, rhs vs explicit {rhs_err:.2e}")
    assert mv_err < 1e-12 and rhs_err < 1e-12


@pytest.mark.parametrize("cg_steps", [1, 3])
def test_inexact_pcg_decreases_the_quadratic(cg_steps):
    """A few PCG steps from a warm start never increase the Step B objective (what makes inexact mode monotone)."""
    layer, u_t, core, design, target, gen = _step_b_case((7, 6, 3, 3), (3, 3), cond=1e6)
    s, p = layer.sp
    sigma_s, sigma_p = kronecker_fit(layer.sigma, s, p)
    pre = _KronPreconditioner(torch.linalg.cholesky(sigma_s), sigma_p, core)
    x = torch.randn(s, 3, generator=gen, dtype=F64)
    obj = float(((design @ x.reshape(-1) - target) ** 2).sum())
    for _ in range(5):
        x, _ = _pcg(lambda v: _step_b_matvec(layer, core, v), pre, _step_b_rhs(layer, u_t, core), x,
                    tol=0.0, maxiter=cg_steps)
        new = float(((design @ x.reshape(-1) - target) ** 2).sum())
        assert new <= obj * (1 + 1e-12)
        obj = new


def test_kronecker_fit_recovers_exact_kronecker_product():
    gen = torch.Generator().manual_seed(3)
    a, b = spd_with_condition(5, 1e2, gen), spd_with_condition(6, 1e3, gen)
    sigma_s, sigma_p = kronecker_fit(torch.kron(a, b), 5, 6, iters=30)
    assert rel_close(torch.kron(sigma_s, sigma_p), torch.kron(a, b)) < 1e-10


def _kronecker_fit_reference(sigma: torch.Tensor, s: int, p: int, iters: int = 20):
    """The original flip-flop, literally: each half-step contracts the (S, P, S, P) view of Sigma with an einsum."""
    sig4 = sigma.reshape(s, p, s, p)
    sigma_p = torch.eye(p, dtype=sigma.dtype)
    sigma_s = torch.eye(s, dtype=sigma.dtype)
    for _ in range(iters):
        sigma_s = torch.einsum("spSq,qp->sS", sig4, torch.linalg.inv(sigma_p)) / p
        sigma_p = torch.einsum("spSq,Ss->pq", sig4, torch.linalg.inv(sigma_s)) / s
    return 0.5 * (sigma_s + sigma_s.T), 0.5 * (sigma_p + sigma_p.T)


@pytest.mark.parametrize("s,p,iters", [(6, 9, 20), (4, 6, 1), (8, 4, 7)])
def test_kronecker_fit_equals_reference_flip_flop(s, p, iters):
    """The GEMV-on-rearranged-Sigma fit returns the old einsum flip-flop's iterates on a random PD Sigma (not a
    Kronecker product); S != P catches a swapped index order."""
    gen = torch.Generator().manual_seed(s * 100 + p)
    a = torch.randn(s * p, 3 * s * p, generator=gen, dtype=F64)
    sigma = a @ a.T / a.shape[1] + torch.diag(torch.rand(s * p, generator=gen, dtype=F64))
    sigma_s, sigma_p = kronecker_fit(sigma, s, p, iters=iters)
    ref_s, ref_p = _kronecker_fit_reference(sigma, s, p, iters=iters)
    err_s, err_p = rel_close(sigma_s, ref_s), rel_close(sigma_p, ref_p)
    print(f"kronecker_fit vs reference (S={s}, P={p}, {iters} it): {err_s:.1e}, {err_p:.1e}")
    assert err_s < 1e-12 and err_p < 1e-12


def _pcg_iterations(sigma: torch.Tensor, kernel: torch.Tensor):
    """Step B from U_S = 0 by PCG with the Kronecker preconditioner and by plain CG, to a 1e-10 residual.

    Returns (PCG iterations, plain CG iterations, relative difference of the PCG and direct solutions)."""
    layer = _prepare(kernel, sigma, 1e-10, F64)
    s, p = layer.sp
    u_t, core, _ = _step_a(layer, _orth(s, 3, torch.Generator().manual_seed(2)), 5)
    rhs = _step_b_rhs(layer, u_t, core)
    sigma_s, sigma_p = kronecker_fit(layer.sigma, s, p)
    pre = _KronPreconditioner(torch.linalg.cholesky(sigma_s), sigma_p, core)

    def solve(precond):
        return _pcg(lambda x: _step_b_matvec(layer, core, x), precond, rhs, torch.zeros_like(rhs),
                    tol=1e-10, maxiter=2000)

    (u_pcg, it_pcg), (_, it_cg) = solve(pre), solve(lambda r: r)
    return it_pcg, it_cg, rel_close(u_pcg, _step_b_direct(layer, u_t, core))


def test_kronecker_preconditioner_makes_pcg_converge():
    """PCG with the fitted preconditioner solves Step B to a 1e-10 residual with fewer iterations than plain CG:
    on a real Sigma (FMNIST patches, S = 8), and in 1-2 iterations on an exact, ill-conditioned Kronecker Sigma
    (where ``Sigma_S kron F~`` is the normal operator itself)."""
    kernel = _random_kernel(12, 8, 3, 3, seed=5)
    gen = torch.Generator().manual_seed(4)
    kron = torch.kron(spd_with_condition(8, 1e4, gen), spd_with_condition(9, 1e2, gen))
    for name, sigma, most in (("real", real_sigma(8), 200), ("kronecker", 0.5 * (kron + kron.T), 2)):
        it_pcg, it_cg, err = _pcg_iterations(sigma, kernel)
        print(f"Step B, {name} Sigma: PCG {it_pcg} it, plain CG {it_cg} it, PCG vs direct {err:.1e}")
        assert it_pcg <= most and it_pcg < it_cg and err < 1e-7


# ---------------------------------------------------------------- whole algorithm


def _random_kernel(t, s, h, w, seed):
    return torch.randn(t, s, h, w, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _rel_sigma_direct(kernel, approx, sigma) -> float:
    """rel_sigma_err by the trace formula, independent of sigma_core.metrics."""
    k1 = kernel.reshape(kernel.shape[0], -1)
    return (sigma_sq_err(k1, approx.reshape(k1.shape), sigma) / sigma_sq_err(k1, 0 * k1, sigma)) ** 0.5


@pytest.fixture(scope="module")
def sigma_cases():
    """Real Sigma (FMNIST patches through ReLU(random conv 1 -> 8), 3x3) and a synthetic one with cond 1e8."""
    return {
        "real": real_sigma(8),
        "illcond": spd_with_condition(72, 1e8, torch.Generator().manual_seed(7)),
    }


SOLVERS = {
    "direct": dict(solver="direct"),
    "cg_exact": dict(solver="cg", cg_tol=1e-12),
    "cg_3steps": dict(solver="cg", cg_steps=3),
}


@pytest.mark.parametrize("solver", list(SOLVERS))
@pytest.mark.parametrize("case", ["real", "illcond"])
def test_error_never_increases_across_sweeps(sigma_cases, case, solver):
    """errors is non-increasing, it made real progress over many sweeps, the final value is the true error of
    the returned factors, and on cond 1e8 it is far below the Frobenius solution's Sigma error."""
    sigma = sigma_cases[case]
    kernel = _random_kernel(12, 8, 3, 3, seed=11)
    cfg = Tucker2SigmaConfig(max_iter=25, tol=1e-10, **SOLVERS[solver])
    res = tucker2_als_sigma(kernel, sigma, (5, 3), config=cfg)
    errs = res.errors
    assert all(b <= a * (1 + 1e-12) for a, b in zip(errs, errs[1:])), errs
    assert len(errs) >= 4 and errs[-1] < errs[0] * (1 - 1e-3), errs
    final = _rel_sigma_direct(kernel, res.reconstruct(), sigma)
    assert abs(final - errs[-1]) < 1e-6 * errs[-1]
    frob = _rel_sigma_direct(kernel, tucker2_als(kernel, (5, 3)).reconstruct(), sigma)
    print(f"monotone {case}/{solver}: {len(errs) - 1} sweeps, err {errs[0]:.4f} -> {errs[-1]:.4f}, "
          f"Frobenius solution {frob:.4f}")
    assert errs[-1] <= frob
    if case == "illcond":
        assert errs[-1] < 0.5 * frob


@pytest.mark.parametrize("use_cg", [False, True])
@pytest.mark.parametrize("case", ["real", "illcond"])
def test_each_half_step_is_monotone_independently_measured(sigma_cases, case, use_cg):
    """Drive Step B / Step A by hand and measure the error of every intermediate iterate directly:
    Step B (direct or 3 PCG steps) and Step A after it never increase it."""
    sigma = sigma_cases[case]
    kernel = _random_kernel(12, 8, 3, 3, seed=12)
    k1 = kernel.reshape(12, -1)
    layer = _prepare(kernel, sigma, 0.0, F64)
    s, p = layer.sp
    sigma_s, sigma_p = kronecker_fit(layer.sigma, s, p)
    chol_s = torch.linalg.cholesky(sigma_s)
    u_s = _orth(8, 3, torch.Generator().manual_seed(1))
    u_t, core, _ = _step_a(layer, u_s, 5)
    prev = sigma_sq_err(k1, tucker2_unfold(u_t, core, u_s), sigma)
    for _ in range(6):
        if use_cg:
            pre = _KronPreconditioner(chol_s, sigma_p, core)
            u_s, _ = _pcg(lambda x: _step_b_matvec(layer, core, x), pre, _step_b_rhs(layer, u_t, core), u_s,
                          tol=0.0, maxiter=3)
        else:
            u_s = _step_b_direct(layer, u_t, core)
        after_b = sigma_sq_err(k1, tucker2_unfold(u_t, core, u_s), sigma)
        u_t, core, f = _step_a(layer, torch.linalg.qr(u_s).Q, 5)
        u_s = torch.linalg.qr(u_s).Q
        after_a = sigma_sq_err(k1, tucker2_unfold(u_t, core, u_s), sigma)
        assert after_b <= prev * (1 + 1e-10) and after_a <= after_b * (1 + 1e-10)
        assert abs(f - after_a) <= 1e-8 * after_a
        prev = after_a


@pytest.mark.parametrize("init", ["svd", "random"])
@pytest.mark.parametrize("solver", ["direct", "cg"])
def test_planted_low_rank_recovery(init, solver):
    """K = G x1 U_T x2 U_S with ranks (4, 3) is recovered (real Sigma), by the Sigma and Frobenius solvers."""
    gen = torch.Generator().manual_seed(21)
    u_t, u_s = torch.randn(10, 4, generator=gen, dtype=F64), torch.randn(8, 3, generator=gen, dtype=F64)
    core = torch.randn(4, 3, 3, 3, generator=gen, dtype=F64)
    kernel = torch.einsum("abhw,ta,sb->tshw", core, u_t, u_s)
    sigma = real_sigma(8)
    cfg = Tucker2SigmaConfig(solver=solver, init=init, max_iter=200, tol=1e-12, cg_tol=1e-12)
    res = tucker2_als_sigma(kernel, sigma, (4, 3), config=cfg, generator=torch.Generator().manual_seed(0))
    err = _rel_sigma_direct(kernel, res.reconstruct(), sigma)
    print(f"planted {init}/{solver}: rel_sigma_err {err:.2e} after {len(res.errors) - 1} sweeps")
    assert err < 1e-6
    frob = tucker2_als(kernel, (4, 3), init=init, random_state=0)
    frob_err = float((frob.reconstruct() - kernel).norm() / kernel.norm())
    print(f"planted frobenius {init}: rel_frob_err {frob_err:.2e}")
    assert frob_err < 1e-8


@pytest.mark.parametrize("solver", ["direct", "cg"])
@pytest.mark.parametrize("ranks", [(3, 5), (6, 3)])
def test_1x1_conv_reaches_reduced_rank_optimum(solver, ranks):
    """1x1 conv: K~1 = U_T G1 U_S^T is any rank-min(R_T, R_S) matrix, so the optimum is the truncated SVD of
    K1 L (L invertible). Covers R_T > R_S*P, where Step A pads U_T with zero-core columns."""
    sigma = real_sigma(8, 1, 1)
    kernel = _random_kernel(12, 8, 1, 1, seed=31)
    res = tucker2_als_sigma(kernel, sigma, ranks, config=Tucker2SigmaConfig(solver=solver, max_iter=200, tol=1e-12))
    assert res.u_t.shape == (12, ranks[0]) and res.core.shape == (*ranks, 1, 1)
    sv = torch.linalg.svdvals(kernel.reshape(12, 8) @ torch.linalg.cholesky(sigma))
    r = min(ranks)
    optimum = float((sv[r:] ** 2).sum() / (sv**2).sum()) ** 0.5
    err = _rel_sigma_direct(kernel, res.reconstruct(), sigma)
    print(f"1x1 {ranks} {solver}: {err:.6f} vs optimum {optimum:.6f}")
    assert abs(err - optimum) < 1e-6 * optimum


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_sigma_solver_beats_frobenius_at_equal_ranks(seed):
    sigma = real_sigma(8)
    kernel = _random_kernel(16, 8, 3, 3, seed=100 + seed)
    ranks = [(6, 4), (8, 3), (4, 6), (10, 5)][seed]
    res = tucker2_als_sigma(kernel, sigma, ranks, config=Tucker2SigmaConfig(max_iter=50, tol=1e-8))
    ours = _rel_sigma_direct(kernel, res.reconstruct(), sigma)
    frob = _rel_sigma_direct(kernel, tucker2_als(kernel, ranks).reconstruct(), sigma)
    print(f"equal ranks {ranks}: sigma solver {ours:.4f} vs Frobenius {frob:.4f}")
    assert ours <= frob * (1 + 1e-9)


def test_final_error_agrees_with_metrics_and_frobenius_errors():
    """errors[-1] (closed form, with the 1e-10 ridge) = metrics.rel_sigma_err of the reconstruction;
    metrics itself matches the L-based definition; the baseline's errors[-1] is its rel_frob_err."""
    sigma = real_sigma(8)
    kernel = _random_kernel(16, 8, 3, 3, seed=5)
    res = tucker2_als_sigma(kernel, sigma, (6, 4))
    m = metrics.rel_sigma_err(kernel, res.reconstruct(), sigma)
    assert abs(res.errors[-1] - m) < 1e-6 * m
    chol = torch.linalg.cholesky(sigma + 1e-12 * torch.eye(72, dtype=F64))
    d1 = (kernel - res.reconstruct()).reshape(16, -1)
    by_l = float((d1 @ chol).norm() / (kernel.reshape(16, -1) @ chol).norm())
    assert abs(m - by_l) < 1e-8 * m
    frob = tucker2_als(kernel, (6, 4))
    assert abs(frob.errors[-1] - metrics.rel_frob_err(kernel, frob.reconstruct())) < 1e-8
    assert abs(metrics.rel_frob_err(kernel, frob.reconstruct())
               - float((kernel - frob.reconstruct()).norm() / kernel.norm())) < 1e-14


def test_result_metadata_and_dtype():
    sigma = real_sigma(8)
    kernel = _random_kernel(9, 8, 3, 3, seed=6).float()
    res = tucker2_als_sigma(kernel, sigma, (4, 2), config=Tucker2SigmaConfig(max_iter=3))
    assert res.method == "tucker2-als-sigma" and res.metric == "rel_sigma_err" and res.ranks == (4, 2)
    assert res.core.dtype == res.u_t.dtype == res.u_s.dtype == torch.float32
    assert res.kernel_shape == (9, 8, 3, 3) and res.reconstruct().shape == kernel.shape
    assert rel_close(res.u_s.double().T @ res.u_s.double(), torch.eye(2, dtype=F64)) < 1e-6
    assert len(res.errors) <= 4 and len(res.info["cg_iters"]) == len(res.info["sweep_seconds"])


# ---------------------------------------------------------------- Tucker2Result


def _result(core_shape=(3, 2, 3, 3), u_t_shape=(6, 3), u_s_shape=(5, 2), ranks=(3, 2)):
    return Tucker2Result(core=torch.zeros(core_shape), u_t=torch.zeros(u_t_shape), u_s=torch.zeros(u_s_shape),
                         ranks=ranks, errors=(1.0,), converged=True, method="test")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(core_shape=(3, 2, 9)), "core must be 4-D"),
        (dict(u_t_shape=(6, 4)), r"u_t must be \(T, 3\)"),
        (dict(u_s_shape=(5, 3)), r"u_s must be \(S, 2\)"),
        (dict(core_shape=(2, 3, 3, 3)), "core leading dims"),
        (dict(ranks=(2, 2)), "u_t must be"),
    ],
)
def test_result_validates_shapes(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _result(**kwargs)


def test_results_are_frozen():
    res = _result()
    with pytest.raises(dataclasses.FrozenInstanceError):
        res.core = torch.ones(3, 2, 3, 3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        Tucker2SigmaConfig().max_iter = 3
    assert _result().reconstruct().shape == (6, 5, 3, 3)

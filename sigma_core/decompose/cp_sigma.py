"""CP-ALS-Sigma: rank-R CP of a conv kernel under the Sigma norm (paper Algorithm 1, App. B.2, solved as in design.md).

Objective (paper Eq. 4 / Prop. 1): ``f = ||(K1 - K~1) L||_F^2 = tr((K1 - K~1) Sigma (K1 - K~1)^T)`` with
``K~1 = U_T Z^T``, ``Z = U_S kr U_H kr U_W`` (n x R, rows ``s*H*W + h*W + w``), ``Sigma = L L^T``. Every factor is
updated by an EXACT least-squares solve under the Sigma norm (the paper's Eqs. 30-33, each ``Vec(U) <- P^+ Vec(K L)``):

* U_T (Eq. 30): ``U_T = K1 Sigma Z (Z^T Sigma Z)^{-1}``, an R x R Cholesky solve.
* U_S (Eq. 31): S*R unknowns; normal operator ``X -> sum_p E[p, r] (Sigma (X kr E) Phi)[(s, p), r]`` with
  ``E = U_H kr U_W`` (P x R) and ``Phi = U_T^T U_T``: direct Cholesky of the (S R)^2 normal matrix for small
  layers, else CG with this structured mat-vec (2 n^2 R flops; the Khatri-Rao Gram is never formed),
  preconditioned by ``Sigma_S kron (Phi o (E^T Sigma_P E))`` from the Kronecker fit ``Sigma ~ Sigma_S kron
  Sigma_P`` (design.md "CP under the Sigma norm").
* U_H, U_W (Eqs. 32, 33): H*R and W*R unknowns, dense Cholesky solves of normal matrices assembled from
  ``Psi = Sigma`` contracted with U_S on both channel indices (R, P, R, P), which is computed once per sweep and
  reused for the U_H, U_W and U_T updates.

One sweep updates U_S, U_H, U_W, U_T in turn (Algorithm 1's cyclic order, entered after an initial U_T solve), then
rebalances the column norms of the four factors, which leaves the product (and the error) unchanged but keeps the
systems well scaled. Each update is an exact block minimization, so the error never increases.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from sigma_core.decompose._checks import check_cp_inputs, check_solver_settings
from sigma_core.decompose._result import CPResult
from sigma_core.decompose.tucker2_sigma import _chol_psd, _Layer, _pcg, _prepare, _rel, _u_s_solver

__all__ = ["CPSigmaConfig", "cp_als_sigma"]

METHOD = "cp-als-sigma"

# Bytes of the temporary (rows, P, n) block when contracting Sigma with U_S (Psi is built in row chunks).
_PSI_CHUNK_BYTES = 256 * 2**20


@dataclass(frozen=True)
class CPSigmaConfig:
    """Solver settings for :func:`cp_als_sigma` (and, per rank-one term, :func:`cp_deflation_sigma`).

    Attributes
    ----------
    max_iter : int
        Maximum number of sweeps (one sweep = U_S, U_H, U_W, U_T updates).
    tol : float
        Stop when the relative decrease of rel_sigma_err over a sweep falls below ``tol``.
    solver : str
        U_S solver: ``"direct"`` (Cholesky of the (S R)^2 normal matrix), ``"cg"`` (preconditioned CG with a
        structured mat-vec), or ``"auto"`` (direct when ``S * R <= direct_max_unknowns``).
    cg_steps : int or None
        Inexact mode: a fixed number of CG steps per sweep from the current U_S (still monotone: CG from a warm
        start never increases the convex quadratic). ``None`` solves to ``cg_tol``.
    cg_tol : float
        Relative residual at which CG stops (exact mode).
    cg_maxiter : int
        Cap on CG iterations per sweep (exact mode).
    direct_max_unknowns : int
        Threshold of the ``"auto"`` solver choice.
    init : str
        ``"svd"``: deterministic HOSVD-style start -- rotate the spatial modes to the left singular vectors of
        the H and W unfoldings, take the SVD of every rotated (T x S) slice and keep the R largest singular
        triplets over all slices (exact when R = R_max and max(T, S) >= max(H, W); random columns fill
        a rank beyond the available triplets). ``"random"``: Gaussian factors from ``generator``.
    ridge : float
        ``ridge * mean(diag(Sigma))`` is added to Sigma's diagonal so that rank-deficient Sigma (dead ReLU
        channels) keeps every system positive definite; 1e-10 changes errors only at that relative level.
    kron_iters : int
        Flip-flop iterations of the Kronecker preconditioner fit.
    balance : bool
        Rescale the four columns of every component to a common norm once per sweep (product unchanged).
    """

    max_iter: int = 200
    tol: float = 1e-6
    solver: str = "auto"
    cg_steps: int | None = None
    cg_tol: float = 1e-8
    cg_maxiter: int = 1000
    direct_max_unknowns: int = 1024
    init: str = "svd"
    ridge: float = 1e-10
    kron_iters: int = 20
    balance: bool = True

    def __post_init__(self) -> None:
        check_solver_settings(self)


class _CP(NamedTuple):
    """The four factors: U_T (T, R), U_S (S, R), U_H (H, R), U_W (W, R)."""

    t: torch.Tensor
    s: torch.Tensor
    h: torch.Tensor
    w: torch.Tensor


# ------------------------------------------------------------------------------------------------- algebra


def _kr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Khatri-Rao (column-wise Kronecker) product: (I, R), (J, R) -> (I*J, R), rows ``i*J + j``."""
    return (x[:, None, :] * y[None, :, :]).reshape(x.shape[0] * y.shape[0], x.shape[1])


def _psi(layer: _Layer, u_s: torch.Tensor) -> torch.Tensor:
    """``Psi[a, p, b, q] = sum_{s, s'} U_S[s, a] Sigma[(s, p), (s', q)] U_S[s', b]``, shape (R, P, R, P).

    Everything the U_H, U_W and U_T updates need from Sigma for a fixed U_S (2 R n^2 + 2 R^2 P n flops). Built in
    chunks of rows of U_S^T so that the (rows, P, S, P) intermediate stays below ``_PSI_CHUNK_BYTES``.
    """
    s, p = layer.sp
    n = s * p
    r = u_s.shape[1]
    sig = layer.sigma.reshape(s, p * n)
    chunk = max(1, _PSI_CHUNK_BYTES // (p * n * layer.sigma.element_size()))
    out = []
    for lo in range(0, r, chunk):
        x = (u_s[:, lo:lo + chunk].T @ sig).reshape(-1, p, s, p)  # (rows, P, S', P')
        out.append(torch.einsum("apsq,sb->apbq", x, u_s))
    psi = torch.cat(out) if len(out) > 1 else out[0]
    return 0.5 * (psi + psi.permute(2, 3, 0, 1))  # exact symmetry (Sigma is symmetric)


def _gram_z(psi: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """``Z^T Sigma Z`` (R, R) from Psi and ``E = U_H kr U_W`` (P, R)."""
    y = torch.einsum("apbq,qb->apb", psi, e)
    g = torch.einsum("apb,pa->ab", y, e)
    return 0.5 * (g + g.T)


def _sq_err(layer: _Layer, f: _CP, psi: torch.Tensor) -> float:
    """``||K1 L||^2 - 2 <U_T, K1 Sigma Z> + <Phi, Z^T Sigma Z>``: the squared Sigma error of ``f``.

    ``psi`` must belong to ``f.s``. Costs 2 T n R flops (K1 Sigma Z) plus R^2 P^2.
    """
    e = _kr(f.h, f.w)
    ksz = layer.ksig @ _kr(f.s, e)
    val = layer.knorm2 - 2.0 * float((f.t * ksz).sum()) + float(((f.t.T @ f.t) * _gram_z(psi, e)).sum())
    return max(val, 0.0)


def _solve_spd(normal: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """``normal^{-1} rhs`` for a symmetric PSD ``normal`` (Cholesky, jitter only if it fails)."""
    return torch.cholesky_solve(rhs, _chol_psd(0.5 * (normal + normal.T)))


def _quad_err(layer: _Layer, x: torch.Tensor, rhs: torch.Tensor, normal: torch.Tensor) -> float:
    """``||K1 L||^2 - 2 x^T rhs + x^T N x``: squared error of a sub-problem's solution ``x`` (column vectors)."""
    return max(layer.knorm2 - 2.0 * float((x * rhs).sum()) + float((x * (normal @ x)).sum()), 0.0)


# ------------------------------------------------------------------------------------------------- U_T


def _step_t(layer: _Layer, f: _CP, psi: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Exact U_T for fixed (U_S, U_H, U_W) (paper Eq. 30): ``K1 Sigma Z (Z^T Sigma Z)^{-1}``.

    Parameters
    ----------
    psi : (R, P, R, P)
        :func:`_psi` of ``f.s``.

    Returns
    -------
    u_t : (T, R)
    f : float
        Squared Sigma error after the update.
    """
    e = _kr(f.h, f.w)
    rhs = layer.ksig @ _kr(f.s, e)  # (T, R) = K1 Sigma Z
    gram = _gram_z(psi, e)
    u_t = _solve_spd(gram, rhs.T).T
    return u_t, _quad_err(layer, u_t.T, rhs.T, gram)


# ------------------------------------------------------------------------------------------------- U_S


def _step_s_rhs(layer: _Layer, atk: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """Right-hand side ``sum_p (U_T^T K1 Sigma)[r, (s, p)] E[p, r]``, shape (S, R); ``atk = U_T^T K1 Sigma``."""
    s, p = layer.sp
    return torch.einsum("rsp,pr->sr", atk.reshape(-1, s, p), e)


def _step_s_matvec(layer: _Layer, phi: torch.Tensor, e: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Normal operator of Eq. 31, ``X -> sum_p E[p, r] (Sigma (X kr E) Phi)[(s, p), r]``; 2 n^2 R + 2 n R^2 flops."""
    s, p = layer.sp
    w = layer.sigma @ (_kr(x, e) @ phi)
    return torch.einsum("spr,pr->sr", w.reshape(s, p, -1), e)


def _step_s_normal(layer: _Layer, phi: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """Explicit (S R) x (S R) normal matrix of Eq. 31, rows/columns ordered (s, r) (small layers only)."""
    s, p = layer.sp
    r = e.shape[1]
    x = torch.einsum("spSq,qR->spSR", layer.sigma.reshape(s, p, s, p), e)
    y = torch.einsum("spSR,pr->srSR", x, e) * phi[None, :, None, :]
    return y.reshape(s * r, s * r)


def _step_s_direct(layer: _Layer, f: _CP, atk: torch.Tensor) -> torch.Tensor:
    """Exact U_S (S, R) by Cholesky of the explicit normal matrix."""
    e = _kr(f.h, f.w)
    normal = _step_s_normal(layer, f.t.T @ f.t, e)
    rhs = _step_s_rhs(layer, atk, e).reshape(-1, 1)
    return _solve_spd(normal, rhs).reshape(f.s.shape)


class _CPKronPreconditioner:
    """Applies ``(Sigma_S kron M)^{-1}``, ``M = Phi o (E^T Sigma_P E)``: two Cholesky solves per call.

    With ``Sigma = Sigma_S kron Sigma_P`` the U_S normal operator is exactly ``X -> Sigma_S X M``.
    """

    def __init__(self, chol_s: torch.Tensor, sigma_p: torch.Tensor, phi: torch.Tensor, e: torch.Tensor):
        m = phi * (e.T @ sigma_p @ e)
        self.chol_s = chol_s
        self.chol_m = _chol_psd(0.5 * (m + m.T))

    def __call__(self, r: torch.Tensor) -> torch.Tensor:
        x = torch.cholesky_solve(r, self.chol_s)
        return torch.cholesky_solve(x.T, self.chol_m).T


def _step_s_cg(layer: _Layer, f: _CP, atk: torch.Tensor, chol_s: torch.Tensor, sigma_p: torch.Tensor,
               config: CPSigmaConfig) -> tuple[torch.Tensor, int]:
    """U_S by preconditioned CG warm-started from ``f.s``; returns (U_S, CG iterations)."""
    e = _kr(f.h, f.w)
    phi = f.t.T @ f.t
    pre = _CPKronPreconditioner(chol_s, sigma_p, phi, e)
    exact = config.cg_steps is None
    return _pcg(lambda x: _step_s_matvec(layer, phi, e, x), pre, _step_s_rhs(layer, atk, e), f.s,
                tol=config.cg_tol if exact else 0.0, maxiter=config.cg_maxiter if exact else config.cg_steps)


# ------------------------------------------------------------------------------------------------- U_H, U_W


def _step_spatial(layer: _Layer, f: _CP, psi: torch.Tensor, atk: torch.Tensor,
                  mode: str) -> tuple[torch.Tensor, float]:
    """Exact U_H (``mode="h"``, Eq. 32) or U_W (``mode="w"``, Eq. 33) for the other three factors fixed.

    The unknown ``X`` (H, R) or (W, R) is solved as ``vec(X^T)`` (ordered (r, h)) from the dense normal matrix
    ``N[(a, h), (b, h')] = Phi[a, b] sum_{w, w'} U_W[w, a] U_W[w', b] Psi[a, (h, w), b, (h', w')]`` (and
    symmetrically for W).

    Returns
    -------
    factor : (H, R) or (W, R)
    f : float
        Squared Sigma error after the update.
    """
    _, s, h, w = layer.shape
    r = f.t.shape[1]
    phi = f.t.T @ f.t
    psi6 = psi.reshape(r, h, w, r, h, w)
    atk4 = atk.reshape(r, s, h, w)
    if mode == "h":
        y = torch.einsum("ahwbHx,xb->ahwbH", psi6, f.w)
        normal = torch.einsum("ahwbH,wa->ahbH", y, f.w)
        rhs = torch.einsum("ashw,sa,wa->ah", atk4, f.s, f.w)
        k = h
    else:
        y = torch.einsum("ahwbxW,xb->ahwbW", psi6, f.h)
        normal = torch.einsum("ahwbW,ha->awbW", y, f.h)
        rhs = torch.einsum("ashw,sa,ha->aw", atk4, f.s, f.h)
        k = w
    normal = (normal * phi[:, None, :, None]).reshape(r * k, r * k)
    rhs = rhs.reshape(-1, 1)
    x = _solve_spd(normal, rhs)
    return x.reshape(r, k).T.contiguous(), _quad_err(layer, x, rhs, normal)


# ------------------------------------------------------------------------------------------------- init / balance


def _balance(f: _CP) -> _CP:
    """Give the four columns of each component the same norm (their geometric mean); product unchanged.

    Components with a zero column are left as they are.
    """
    norms = torch.stack([x.norm(dim=0) for x in f])  # (4, R)
    ok = (norms > 0).all(dim=0)
    target = norms.prod(dim=0) ** 0.25
    scale = torch.where(ok, target / torch.where(ok, norms, torch.ones_like(norms)), torch.ones_like(norms))
    return _CP(*(x * c for x, c in zip(f, scale)))


def _mode_basis(unfolding: torch.Tensor) -> torch.Tensor:
    """Complete orthonormal basis of left singular vectors (descending) of a short-wide unfolding (k, m).

    From the eigenvectors of the k x k Gram matrix: an SVD with ``full_matrices=True`` would also build the
    (m, m) right factor, and ``full_matrices=False`` drops the basis completion when ``m < k``.
    """
    _, vecs = torch.linalg.eigh(unfolding @ unfolding.T)
    return vecs.flip(-1)


def _init_svd(kernel: torch.Tensor, rank: int, generator: torch.Generator | None) -> _CP:
    """HOSVD-style deterministic start (see :class:`CPSigmaConfig`, ``init="svd"``); U_T is zero (solved next)."""
    t, s, h, w = kernel.shape
    q_h = _mode_basis(kernel.permute(2, 0, 1, 3).reshape(h, -1))  # (H, H)
    q_w = _mode_basis(kernel.permute(3, 0, 1, 2).reshape(w, -1))  # (W, W)
    rotated = torch.einsum("tshw,hi,wj->ijts", kernel, q_h, q_w)  # (H, W, T, S) slices in the rotated basis
    u, sv, vh = torch.linalg.svd(rotated, full_matrices=False)  # (H, W, T, m), (H, W, m), (H, W, m, S)
    m = sv.shape[-1]
    order = torch.argsort(sv.reshape(-1), descending=True, stable=True)[:rank]
    i, rest = order // (w * m), order % (w * m)
    j, k = rest // m, rest % m
    u_s = vh[i, j, k, :].T  # (S, R') unit columns
    u_h, u_w = q_h[:, i], q_w[:, j]
    missing = rank - order.numel()
    if missing > 0:
        fill = _init_random((t, s, h, w), missing, generator, kernel.dtype, kernel.device)
        u_s, u_h, u_w = (torch.cat([a, b], dim=1) for a, b in zip((u_s, u_h, u_w), fill[1:]))
    return _CP(kernel.new_zeros(t, rank), u_s.contiguous(), u_h.contiguous(), u_w.contiguous())


def _init_random(shape: tuple[int, int, int, int], rank: int, generator: torch.Generator | None,
                 dtype: torch.dtype, device: torch.device) -> _CP:
    """Gaussian factors with unit-norm columns (drawn on CPU from ``generator``, then moved)."""
    cols = []
    for dim in shape:
        g = torch.randn(dim, rank, generator=generator, dtype=dtype)
        cols.append((g / g.norm(dim=0).clamp_min(1e-300)).to(device))
    return _CP(*cols)


# ------------------------------------------------------------------------------------------------- driver


@dataclass
class _Run:
    """Output of :func:`_als` (internal; mutable while the loop runs)."""

    factors: _CP
    sq_errors: list[float]
    converged: bool
    info: dict


def _als(layer: _Layer, start: _CP, config: CPSigmaConfig, *, solver: str,
         kron: tuple[torch.Tensor, torch.Tensor] | None,
         callback: Callable[[int, float, dict], None] | None = None) -> _Run:
    """Algorithm 1 from the (U_S, U_H, U_W) of ``start``: initial U_T, then sweeps U_S, U_H, U_W, U_T.

    ``kron`` is ``(chol(Sigma_S), Sigma_P)`` for the CG solver. ``sq_errors[k]`` is the squared Sigma error after
    sweep k (0 = after the initial U_T solve); ``info["substep_rel_errors"]`` holds, per sweep, rel_sigma_err
    after each of the U_S, U_H, U_W, U_T updates.
    """
    info: dict = {"solver": solver, "cg_iters": [], "sweep_seconds": [], "substep_rel_errors": []}
    psi = _psi(layer, start.s)
    u_t, f = _step_t(layer, start, psi)
    cur = _CP(u_t, start.s, start.h, start.w)
    if config.balance:
        cur = _balance(cur)
    run = _Run(cur, [f], False, info)
    if callback is not None:
        callback(0, _rel(f, layer), info)
    for sweep in range(1, config.max_iter + 1):
        tic = time.perf_counter()
        new, new_f, subs, iters = _sweep(layer, cur, config, solver, kron)
        info["cg_iters"].append(iters)
        info["sweep_seconds"].append(time.perf_counter() - tic)
        info["substep_rel_errors"].append(tuple(_rel(x, layer) for x in subs))
        if new_f > f * (1 + 1e-12) + 1e-300:
            # Only rounding can get here (every update is an exact minimization): keep the better iterate.
            run.converged = True
            break
        decrease = (_rel(f, layer) - _rel(new_f, layer)) / max(_rel(f, layer), 1e-300)
        cur, f = new, new_f
        run.factors = cur
        run.sq_errors.append(f)
        if callback is not None:
            callback(sweep, _rel(f, layer), info)
        if decrease < config.tol:
            run.converged = True
            break
    return run


def _sweep(layer: _Layer, f: _CP, config: CPSigmaConfig, solver: str,
           kron: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[_CP, float, list[float], int]:
    """One sweep U_S, U_H, U_W, U_T (exact block minimizations), then balancing.

    Returns the new factors, the squared error after the sweep, the squared error after each of the four
    updates and the CG iterations of the U_S solve.
    """
    atk = f.t.T @ layer.ksig  # (R, n): U_T^T K1 Sigma, shared by the U_S, U_H and U_W right-hand sides
    if solver == "direct":
        u_s, iters = _step_s_direct(layer, f, atk), 0
    else:
        u_s, iters = _step_s_cg(layer, f, atk, kron[0], kron[1], config)
    f = f._replace(s=u_s)
    psi = _psi(layer, u_s)  # the only Sigma contraction of the sweep besides CG: reused by U_H, U_W and U_T
    subs = [_sq_err(layer, f, psi)]
    u_h, err = _step_spatial(layer, f, psi, atk, "h")
    f = f._replace(h=u_h)
    subs.append(err)
    u_w, err = _step_spatial(layer, f, psi, atk, "w")
    f = f._replace(w=u_w)
    subs.append(err)
    u_t, err = _step_t(layer, f, psi)
    f = f._replace(t=u_t)
    subs.append(err)
    if config.balance:
        f = _balance(f)
    return f, err, subs, iters


def _setup(kernel: torch.Tensor, sigma: torch.Tensor, rank: int, config: CPSigmaConfig,
           dtype: torch.dtype) -> tuple[_Layer, str, tuple[torch.Tensor, torch.Tensor] | None]:
    """Per-layer constants, the U_S solver choice and, for CG, the Kronecker preconditioner factors."""
    layer = _prepare(kernel, sigma, config.ridge, dtype)
    return (layer, *_u_s_solver(layer, config, rank))


def _start(layer: _Layer, rank: int, config: CPSigmaConfig, generator: torch.Generator | None) -> _CP:
    t, s, h, w = layer.shape
    if config.init == "svd":
        return _init_svd(layer.k1.reshape(t, s, h, w), rank, generator)
    return _init_random(layer.shape, rank, generator, layer.k1.dtype, layer.k1.device)


def _to_result(kernel: torch.Tensor, f: _CP, rank: int, errors: list[float], converged: bool, method: str,
               info: dict, dtype: torch.dtype) -> CPResult:
    out_dtype = kernel.dtype if kernel.dtype.is_floating_point else dtype
    cast = {"device": kernel.device, "dtype": out_dtype}
    return CPResult(u_t=f.t.to(**cast), u_s=f.s.to(**cast), u_h=f.h.to(**cast), u_w=f.w.to(**cast), rank=rank,
                    errors=tuple(errors), converged=converged, method=method, metric="rel_sigma_err", info=info)


def cp_als_sigma(
    kernel: torch.Tensor,
    sigma: torch.Tensor,
    rank: int,
    *,
    config: CPSigmaConfig = CPSigmaConfig(),
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    callback: Callable[[int, float, dict], None] | None = None,
) -> CPResult:
    """Rank-R CP decomposition minimizing ``||(K - K~)_(1) Sigma^{1/2}||_F`` (paper Algorithm 1).

    Parameters
    ----------
    kernel : torch.Tensor, shape (T, S, H, W)
        Conv kernel in PyTorch layout.
    sigma : torch.Tensor, shape (S*H*W, S*H*W)
        Uncentered second moment of the layer's input patches (see ``sigma_core.covariance``); its device is
        where the computation runs.
    rank : int
        ``1 <= R <= R_max = TSHW / max(T, S, H, W)`` (larger ranks are rejected: an exact decomposition exists
        at R_max, see :func:`sigma_core.ranks.validate_cp_rank`).
    config : CPSigmaConfig
    generator : torch.Generator, optional
        Used by ``init="random"`` (and to fill an ``"svd"`` start beyond the available singular triplets).
    dtype : torch.dtype
        Working precision (float64 recommended: Sigma can be ill-conditioned).
    callback : callable, optional
        ``callback(sweep, rel_sigma_err, info)`` after the initial U_T solve (sweep 0) and after every sweep.

    Returns
    -------
    CPResult
        Balanced factors in the kernel's dtype and device. ``errors`` holds rel_sigma_err after the initial
        U_T solve and after each sweep (non-increasing); ``info`` has the U_S solver, CG iterations and seconds
        per sweep, rel_sigma_err after every update (``substep_rel_errors``), the ridge and the total seconds.

    Raises
    ------
    ValueError
        Kernel not 4-D or not finite, rank outside ``[1, R_max]``, Sigma not (n, n) with n = S*H*W,
        non-finite or not symmetric.

    Notes
    -----
    Cost per sweep (n = S*H*W, P = H*W): one contraction ``Psi`` of Sigma with U_S (2 R n^2 + 2 R^2 P n flops,
    R^2 P^2 floats of memory: 140 MB at R = 461 for 3x3 kernels), the U_S solve (per CG step one structured
    mat-vec of 2 n^2 R flops, or one (S R)^3 / 3 Cholesky), two (H R) and (W R) Cholesky solves and
    O(T n R) products with ``K1 Sigma``. The Khatri-Rao Gram matrices of Eqs. 30-33 are never formed.
    """
    rank = check_cp_inputs(kernel, sigma, rank)
    start_time = time.perf_counter()
    layer, solver, kron = _setup(kernel, sigma, rank, config, dtype)
    start = _start(layer, rank, config, generator)
    setup_seconds = time.perf_counter() - start_time
    run = _als(layer, start, config, solver=solver, kron=kron, callback=callback)
    info = {**run.info, "ridge": config.ridge, "init": config.init, "setup_seconds": setup_seconds,
            "seconds": time.perf_counter() - start_time}
    errors = [_rel(f, layer) for f in run.sq_errors]
    return _to_result(kernel, run.factors, rank, errors, run.converged, METHOD, info, dtype)

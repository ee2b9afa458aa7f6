"""Tucker2-ALS-Sigma: Tucker-2 of a conv kernel under the Sigma norm (paper Algorithm 2, solved as in design.md).

Objective (paper Eq. 4 / Prop. 1): ``f = ||(K1 - K~1) L||_F^2 = tr((K1 - K~1) Sigma (K1 - K~1)^T)`` with
``K~1 = U_T G1 M^T``, ``M = U_S kron I_P`` (P = H*W). Two exact block minimizations alternate:

* Step A -- best (U_T, G) jointly for fixed U_S, in closed form: with ``A = M^T Sigma M = C C^T`` and
  ``Y = K1 Sigma M C^{-T} = U s V^T``, take ``U_T = U[:, :R_T]``, ``G1 = s_R V_R^T C^{-1}``; then
  ``f = ||K1 L||^2 - sum_{i <= R_T} s_i^2``.
* Step B -- best U_S for fixed (U_T, G): the linear least-squares problem with normal equations
  ``sum_a mat(Sigma vec(U_S G_a)) G_a^T = sum_a mat((U_T^T K1 Sigma)_a) G_a^T`` (U_T orthonormal), solved
  directly for small layers or by CG preconditioned with a Kronecker fit ``Sigma ~ Sigma_S kron Sigma_P``.

Both are exact block minimizations (CG from a warm start also never increases a convex quadratic), so the
error never increases across sweeps.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from sigma_core.decompose._checks import check_solver_settings, check_tucker2_inputs
from sigma_core.decompose._result import Tucker2Result

__all__ = ["Tucker2SigmaConfig", "tucker2_als_sigma", "kronecker_fit"]

METHOD = "tucker2-als-sigma"


@dataclass(frozen=True)
class Tucker2SigmaConfig:
    """Solver settings for :func:`tucker2_als_sigma`.

    Attributes
    ----------
    max_iter : int
        Maximum number of sweeps (one sweep = Step B then Step A).
    tol : float
        Stop when the relative decrease of rel_sigma_err over a sweep falls below ``tol``.
    solver : str
        Step B solver: ``"direct"`` (Cholesky of the (S R_S)^2 normal matrix), ``"cg"`` (preconditioned CG with
        a structured mat-vec), or ``"auto"`` (direct when ``S * R_S <= direct_max_unknowns``).
    cg_steps : int or None
        Inexact mode: a fixed number of CG steps per sweep (still monotone). ``None`` solves to ``cg_tol``.
    cg_tol : float
        Relative residual at which CG stops (exact mode).
    cg_maxiter : int
        Cap on CG iterations per sweep (exact mode).
    direct_max_unknowns : int
        Threshold of the ``"auto"`` solver choice.
    init : str
        ``"svd"`` (leading left singular vectors of the mode-2 unfolding of K), ``"random"``, or ``"kron"``:
        the Sigma-whitened start -- with the Kronecker fit ``Sigma ~ Sigma_S kron Sigma_P = (L_S L_S^T) kron
        (L_P L_P^T)`` the Sigma problem becomes the Frobenius Tucker-2 of ``K' = K x_2 L_S^T x_3 L_P^T`` (exact
        when Sigma is a Kronecker product); ``init_iters`` HOOI iterations on K' give V and ``U_S = L_S^{-T} V``.
    ridge : float
        ``ridge * mean(diag(Sigma))`` is added to Sigma's diagonal so that rank-deficient Sigma (dead ReLU
        channels) keeps every system positive definite; 1e-10 changes errors only at that relative level.
    kron_iters : int
        Flip-flop iterations of the Kronecker preconditioner fit.
    matvec_dtype : str
        ``"float64"`` or ``"float32"``: precision of the Step B mat-vecs in inexact mode (``cg_steps`` set, CG
        solver). float32 halves the cost of the dominant GEMM; the residual is formed in float64 and the CG
        correction added to the float64 iterate (one step of iterative refinement per sweep), the objective is
        always evaluated in float64, and a sweep whose objective would increase is redone with float64
        mat-vecs, so the error still never increases. Exact mode (``cg_steps=None``) always uses float64.
    init_iters : int
        HOOI iterations of the ``init="kron"`` start in the whitened Frobenius problem.
    """

    # "kron": Sigma-whitened start (see _init_u_s_kron); Tucker-2 only, CP keeps sigma_core.INITS.
    INITS: ClassVar[tuple[str, ...]] = ("svd", "random", "kron")

    max_iter: int = 100
    tol: float = 1e-6
    solver: str = "auto"
    cg_steps: int | None = None
    cg_tol: float = 1e-8
    cg_maxiter: int = 1000
    direct_max_unknowns: int = 1024
    init: str = "svd"
    ridge: float = 1e-10
    kron_iters: int = 20
    matvec_dtype: str = "float64"
    init_iters: int = 5

    def __post_init__(self) -> None:
        check_solver_settings(self)
        if self.matvec_dtype not in ("float64", "float32"):
            raise ValueError(f"matvec_dtype must be 'float64' or 'float32', got {self.matvec_dtype!r}")
        if self.init_iters < 0:
            raise ValueError(f"init_iters must be >= 0, got {self.init_iters}")


@dataclass(frozen=True)
class _Layer:
    """Per-layer constants: computed once, used by every sweep."""

    k1: torch.Tensor  # (T, n)
    sigma: torch.Tensor  # (n, n), ridge added
    ksig: torch.Tensor  # (T, n) = K1 Sigma
    knorm2: float  # ||K1 L||_F^2
    shape: tuple[int, int, int, int]  # (T, S, H, W)

    @property
    def sp(self) -> tuple[int, int]:
        _, s, h, w = self.shape
        return s, h * w


def _prepare(kernel: torch.Tensor, sigma: torch.Tensor, ridge: float, dtype: torch.dtype) -> _Layer:
    t, s, h, w = kernel.shape
    k1 = kernel.detach().to(device=sigma.device, dtype=dtype).reshape(t, s * h * w)
    sig = sigma.to(dtype)
    sig = sig + ridge * float(sig.diagonal().mean()) * torch.eye(sig.shape[0], dtype=dtype, device=sig.device)
    ksig = k1 @ sig
    return _Layer(k1, sig, ksig, float((ksig * k1).sum()), (t, s, h, w))


def _init_u_s(kernel: torch.Tensor, r_s: int, init: str, generator: torch.Generator | None) -> torch.Tensor:
    """Initial input factor (S, R_S) with orthonormal columns."""
    t, s, h, w = kernel.shape
    if init == "svd":
        mode2 = kernel.transpose(0, 1).reshape(s, t * h * w)
        u, _, _ = torch.linalg.svd(mode2, full_matrices=False)
        return u[:, :r_s].contiguous()
    g = torch.randn(s, r_s, generator=generator, dtype=kernel.dtype, device="cpu").to(kernel.device)
    return torch.linalg.qr(g).Q


def _top_left(x: torch.Tensor, r: int) -> torch.Tensor:
    """The r leading left singular vectors of a (m, k) matrix, from the eigenvectors of its m x m Gram."""
    _, vecs = torch.linalg.eigh(x @ x.T)
    return vecs[:, -r:].flip(-1)


def _init_u_s_kron(layer: _Layer, r_t: int, r_s: int, chol_s: torch.Tensor, sigma_p: torch.Tensor,
                   iters: int) -> torch.Tensor:
    """Sigma-whitened start (config ``init="kron"``): U_S (S, R_S) with orthonormal columns.

    With ``Sigma ~ Sigma_S kron Sigma_P``, ``L_S = chol(Sigma_S)``, ``L_P = chol(Sigma_P)``:
    ``||(K1 - K~1) L||`` becomes ``||K' - K~'||_F`` with ``K'[t] = L_S^T K[t] L_P`` (S x P slices) and
    ``K~'`` a Tucker-2 whose input factor is ``V = L_S^T U_S``. HOSVD of K' then ``iters`` HOOI iterations
    (alternating leading singular subspaces of the mode-1 / mode-2 unfoldings of K' times the other factor)
    give V; ``U_S = L_S^{-T} V``, re-orthonormalized (Step A only sees its span). Costs a few T x T and S x S
    eigendecompositions and O(T S P (R_S + R_T)) products: nothing of order n^2.
    """
    t, s, h, w = layer.shape
    p = h * w
    l_p = _chol_psd(sigma_p)
    kw = torch.einsum("tsp,sa,pq->taq", layer.k1.reshape(t, s, p), chol_s, l_p)  # (T, S, P)
    v = _top_left(kw.transpose(0, 1).reshape(s, t * p), r_s)
    for _ in range(iters):
        u = _top_left(torch.einsum("tsp,sb->tbp", kw, v).reshape(t, r_s * p), r_t)
        v = _top_left(torch.einsum("tsp,ta->sap", kw, u).reshape(s, r_t * p), r_s)
    u_s = torch.linalg.solve_triangular(chol_s.T, v, upper=True)
    return torch.linalg.qr(u_s).Q


def _chol_psd(a: torch.Tensor) -> torch.Tensor:
    """Cholesky factor of a PSD matrix, with the smallest jitter (1e-14.. relative) that makes it succeed."""
    factor, info = torch.linalg.cholesky_ex(a)
    eps = 1e-14 * float(a.diagonal().mean().abs()) + 1e-300
    eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    while int(info) != 0:
        factor, info = torch.linalg.cholesky_ex(a + eps * eye)
        eps *= 10.0
    return factor


def _step_a(layer: _Layer, u_s: torch.Tensor, r_t: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Jointly optimal (U_T, G) for fixed U_S (design.md Step A).

    Returns
    -------
    u_t : (T, R_T), orthonormal columns
    core : (R_T, R_S, P)
    f : float
        ``||K1 L||^2 - sum_{i<=R_T} s_i^2``, the squared Sigma-norm error of the returned pair.
    """
    t = layer.shape[0]
    s, p = layer.sp
    r_s = u_s.shape[1]
    rsp = r_s * p
    # M^T Sigma, rows (b, q): contract Sigma's first s-index with U_S -- Sigma is symmetric, so this is (Sigma M)^T.
    mts = (u_s.T @ layer.sigma.reshape(s, p * s * p)).reshape(rsp, s, p)
    a = torch.einsum("xsp,sc->xcp", mts, u_s).reshape(rsp, rsp)
    a = 0.5 * (a + a.T)
    ksm = torch.einsum("tsp,sb->tbp", layer.ksig.reshape(t, s, p), u_s).reshape(t, rsp)
    c = _chol_psd(a)
    y = torch.linalg.solve_triangular(c, ksm.T, upper=False).T  # K1 Sigma M C^{-T}, (T, R_S P)
    # Leading left singular vectors of y from the eigenvectors of the T x T Gram y y^T (one GEMM and a small
    # eigh instead of an SVD of y): f needs only sum s_i^2 = sum of the top R_T eigenvalues, and
    # s_R V_R^T = U_R^T y, so V is never needed. The full eigenbasis also completes U_T when R_T > rank(y).
    evals, evecs = torch.linalg.eigh(y @ y.T)
    u_t = evecs[:, -r_t:].flip(-1)
    svh = u_t.T @ y  # s_R V_R^T
    g1 = torch.linalg.solve_triangular(c.T, svh.T, upper=True).T  # s_R V_R^T C^{-1}
    f = layer.knorm2 - float(evals[-r_t:].clamp_min(0).sum())
    return u_t.contiguous(), g1.reshape(r_t, r_s, p), max(f, 0.0)


def _step_b_rhs(layer: _Layer, u_t: torch.Tensor, core: torch.Tensor) -> torch.Tensor:
    """Right-hand side ``sum_a mat((U_T^T K1 Sigma)_a) G_a^T``, shape (S, R_S)."""
    s, p = layer.sp
    z = (u_t.T @ layer.ksig).reshape(-1, s, p)
    return torch.einsum("asp,abp->sb", z, core)


def _step_b_matvec(layer: _Layer, core: torch.Tensor, u: torch.Tensor, sigma: torch.Tensor | None = None) -> torch.Tensor:
    """Normal operator ``U -> sum_a mat(Sigma vec(U G_a)) G_a^T``: ~2 R_T n^2 flops, Sigma never reshaped.

    ``sigma`` (default ``layer.sigma``) may be a lower-precision copy; ``core`` and ``u`` must have its dtype.
    """
    s, p = layer.sp
    v = torch.einsum("sb,abp->asp", u, core).reshape(core.shape[0], s * p)
    w = (v @ (layer.sigma if sigma is None else sigma)).reshape(-1, s, p)
    return torch.einsum("asp,abp->sb", w, core)


def _step_b_direct(layer: _Layer, u_t: torch.Tensor, core: torch.Tensor) -> torch.Tensor:
    """Exact U_S by Cholesky of the explicit (S R_S)^2 normal matrix (small layers)."""
    s, p = layer.sp
    r_s = core.shape[1]
    f = torch.einsum("abp,acq->bpcq", core, core)
    normal = torch.einsum("spSq,bpcq->sbSc", layer.sigma.reshape(s, p, s, p), f).reshape(s * r_s, s * r_s)
    normal = 0.5 * (normal + normal.T)
    rhs = _step_b_rhs(layer, u_t, core).reshape(-1, 1)
    return torch.cholesky_solve(rhs, _chol_psd(normal)).reshape(s, r_s)


def _kron_rearrange(sigma: torch.Tensor, s: int, p: int) -> torch.Tensor:
    """``R[(s, S), (p, q)] = Sigma[(s, p), (S, q)]``, shape (S*S, P*P): Sigma's Kronecker "rearrangement" (one copy)."""
    return sigma.reshape(s, p, s, p).permute(0, 2, 1, 3).reshape(s * s, p * p)


def kronecker_fit(sigma: torch.Tensor, s: int, p: int, iters: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """Maximum-likelihood Kronecker fit ``Sigma ~ Sigma_S kron Sigma_P`` by the flip-flop iteration.

    ``Sigma_S = (1/P) sum_{pp'} (Sigma_P^{-1})_{p'p} Sigma_{pp'}`` and symmetrically (design.md, Step B). Sigma is
    rearranged once to ``R[(s, S), (p, q)] = Sigma[(s, p), (S, q)]``; then each half-step is one GEMV
    (``vec(Sigma_S) = R vec(Sigma_P^{-T}) / P``, ``vec(Sigma_P) = R^T vec(Sigma_S^{-T}) / S``, n^2 flops) instead
    of a contraction that re-permutes the n x n Sigma on every call. Extra memory: one n x n copy.

    Parameters
    ----------
    sigma : torch.Tensor, shape (S*P, S*P)
        Positive definite, rows ordered (s, p).
    s, p : int
        Channel count S and spatial size P = H*W.
    iters : int
        Flip-flop iterations (each one updates Sigma_S, then Sigma_P; the start is Sigma_P = I).

    Returns
    -------
    sigma_s : (S, S)
    sigma_p : (P, P)
        Symmetric; only their product is determined (the scale between them is arbitrary).
    """
    r = _kron_rearrange(sigma, s, p)
    sigma_p = torch.eye(p, dtype=sigma.dtype, device=sigma.device)
    sigma_s = torch.eye(s, dtype=sigma.dtype, device=sigma.device)
    for _ in range(iters):
        inv_p = torch.cholesky_inverse(_chol_psd(sigma_p))
        sigma_s = (r @ inv_p.T.reshape(-1)).reshape(s, s) / p
        inv_s = torch.cholesky_inverse(_chol_psd(sigma_s))
        sigma_p = (inv_s.T.reshape(-1) @ r).reshape(p, p) / s
    return 0.5 * (sigma_s + sigma_s.T), 0.5 * (sigma_p + sigma_p.T)


class _KronPreconditioner:
    """Applies ``(Sigma_S kron F~)^{-1}``, ``F~ = sum_a G_a Sigma_P G_a^T``: two Cholesky solves per call."""

    def __init__(self, chol_s: torch.Tensor, sigma_p: torch.Tensor, core: torch.Tensor):
        f_tilde = torch.einsum("abp,pq,acq->bc", core, sigma_p, core)
        self.chol_s = chol_s
        self.chol_f = _chol_psd(0.5 * (f_tilde + f_tilde.T))

    def __call__(self, r: torch.Tensor) -> torch.Tensor:
        x = torch.cholesky_solve(r, self.chol_s)
        return torch.cholesky_solve(x.T, self.chol_f).T


def _pcg(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    precond: Callable[[torch.Tensor], torch.Tensor],
    rhs: torch.Tensor,
    x0: torch.Tensor,
    *,
    tol: float,
    maxiter: int,
) -> tuple[torch.Tensor, int]:
    """Preconditioned CG on matrices (the unknown is U_S, (S, R_S)); returns (x, iterations)."""
    x = x0.clone()
    r = rhs - matvec(x)
    z = precond(r)
    d = z.clone()
    rz = float((r * z).sum())
    stop = tol * float(rhs.norm())
    for it in range(maxiter):
        if float(r.norm()) <= stop or rz <= 0:
            return x, it
        ad = matvec(d)
        dad = float((d * ad).sum())
        if dad <= 0:  # direction of zero curvature: nothing left to gain
            return x, it
        alpha = rz / dad
        x.add_(d, alpha=alpha)
        r.sub_(ad, alpha=alpha)
        z = precond(r)
        rz_new = float((r * z).sum())
        d = z + (rz_new / rz) * d
        rz = rz_new
    return x, maxiter


def _step_b(layer: _Layer, u_t: torch.Tensor, core: torch.Tensor, u_s: torch.Tensor, config: Tucker2SigmaConfig,
            kron: tuple[torch.Tensor, torch.Tensor] | None,
            sigma_lo: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """Step B: the new U_S (S, R_S), directly (``kron`` None) or by PCG from ``u_s``; returns (U_S, CG iterations).

    With ``sigma_lo`` (a float32 copy of Sigma; inexact mode only) the float64 residual ``rhs - A u_s`` is
    formed once and ``cg_steps`` PCG steps on the correction ``A d = r`` (from d = 0) use float32 mat-vecs.
    """
    if kron is None:
        return _step_b_direct(layer, u_t, core), 0
    exact = config.cg_steps is None
    pre = _KronPreconditioner(kron[0], kron[1], core)
    rhs = _step_b_rhs(layer, u_t, core)
    if sigma_lo is None or exact:
        return _pcg(lambda x: _step_b_matvec(layer, core, x), pre, rhs, u_s,
                    tol=config.cg_tol if exact else 0.0, maxiter=config.cg_maxiter if exact else config.cg_steps)
    lo = sigma_lo.dtype
    core_lo = core.to(lo)
    r = rhs - _step_b_matvec(layer, core, u_s)
    d, iters = _pcg(lambda x: _step_b_matvec(layer, core_lo, x.to(lo), sigma_lo).to(u_s.dtype), pre, r,
                    torch.zeros_like(u_s), tol=0.0, maxiter=config.cg_steps)
    return u_s + d, iters


def _rel(f: float, layer: _Layer) -> float:
    """rel_sigma_err from a squared Sigma error ``f`` (clamped at 0 against rounding)."""
    return (max(f, 0.0) / layer.knorm2) ** 0.5 if layer.knorm2 > 0 else 0.0


def _u_s_solver(layer: _Layer, config, r_s: int) -> tuple[str, tuple[torch.Tensor, torch.Tensor] | None]:
    """The U_S solver for ``S * r_s`` unknowns and, for CG, its Kronecker preconditioner factors.

    Parameters
    ----------
    layer : _Layer
    config : Tucker2SigmaConfig or CPSigmaConfig
        Uses ``solver``, ``direct_max_unknowns`` and ``kron_iters``.
    r_s : int
        Columns of U_S (R_S for Tucker-2, R for CP).

    Returns
    -------
    solver : str
        ``"direct"`` or ``"cg"`` (``"auto"`` resolved).
    kron : (chol(Sigma_S) (S, S), Sigma_P (P, P)) or None
        From :func:`kronecker_fit` of the layer's Sigma; None for the direct solver.
    """
    s, p = layer.sp
    solver = config.solver
    if solver == "auto":
        solver = "direct" if s * r_s <= config.direct_max_unknowns else "cg"
    if solver != "cg":
        return solver, None
    sigma_s, sigma_p = kronecker_fit(layer.sigma, s, p, config.kron_iters)
    return solver, (_chol_psd(sigma_s), sigma_p)


def tucker2_als_sigma(
    kernel: torch.Tensor,
    sigma: torch.Tensor,
    ranks: tuple[int, int],
    *,
    config: Tucker2SigmaConfig = Tucker2SigmaConfig(),
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    callback: Callable[[int, float, dict], None] | None = None,
) -> Tucker2Result:
    """Tucker-2 decomposition minimizing ``||(K - K~)_(1) Sigma^{1/2}||_F`` (paper Algorithm 2).

    Parameters
    ----------
    kernel : torch.Tensor, shape (T, S, H, W)
        Conv kernel in PyTorch layout.
    sigma : torch.Tensor, shape (S*H*W, S*H*W)
        Uncentered second moment of the layer's input patches (see ``sigma_core.covariance``); its device
        is where the computation runs.
    ranks : (R_T, R_S)
        1 <= R_T <= T, 1 <= R_S <= S.
    config : Tucker2SigmaConfig
    generator : torch.Generator, optional
        Used by ``init="random"``.
    dtype : torch.dtype
        Working precision (float64 recommended: Sigma can be ill-conditioned).
    callback : callable, optional
        ``callback(sweep, rel_sigma_err, info)`` after the initial Step A (sweep 0) and after every sweep.

    Returns
    -------
    Tucker2Result
        ``errors`` holds rel_sigma_err after the initial Step A and after each sweep (non-increasing);
        ``info`` has per-sweep CG iterations and seconds, the solver used and the ridge.

    Raises
    ------
    ValueError
        Kernel not 4-D or not finite, ranks outside ``[1, T] x [1, S]``, Sigma not (n, n) with n = S*H*W,
        non-finite or not symmetric.
    """
    r_t, r_s = check_tucker2_inputs(kernel, sigma, ranks)
    t, s, h, w = kernel.shape
    start = time.perf_counter()
    layer = _prepare(kernel, sigma, config.ridge, dtype)
    solver, kron = _u_s_solver(layer, config, r_s)
    # float32 mat-vecs only where they apply (inexact CG); "exact" solves stay float64 throughout.
    lo = config.matvec_dtype == "float32" and solver == "cg" and config.cg_steps is not None and dtype != torch.float32
    sigma_lo = layer.sigma.to(torch.float32) if lo else None

    if config.init == "kron":
        if kron is None:
            sigma_s, sigma_p = kronecker_fit(layer.sigma, s, h * w, config.kron_iters)
            kron_init = (_chol_psd(sigma_s), sigma_p)
        else:
            kron_init = kron
        u_s = _init_u_s_kron(layer, r_t, r_s, *kron_init, config.init_iters)
    else:
        u_s = _init_u_s(layer.k1.reshape(t, s, h, w), r_s, config.init, generator)
    u_t, core, f = _step_a(layer, u_s, r_t)
    errors = [_rel(f, layer)]
    info: dict = {"solver": solver, "ridge": config.ridge, "cg_iters": [], "sweep_seconds": [],
                  "matvec_dtype": "float32" if lo else "float64", "float64_redos": 0,
                  "setup_seconds": time.perf_counter() - start}
    if callback is not None:
        callback(0, errors[-1], info)
    converged = False
    for sweep in range(1, config.max_iter + 1):
        tic = time.perf_counter()
        new_u_s, iters = _step_b(layer, u_t, core, u_s, config, kron, sigma_lo)
        # Step A only sees span(U_S): re-orthonormalize for conditioning, the error is unchanged.
        new_u_s = torch.linalg.qr(new_u_s).Q
        new_u_t, new_core, new_f = _step_a(layer, new_u_s, r_t)
        if sigma_lo is not None and new_f > f * (1 + 1e-12) + 1e-300:
            # float32 rounding in the CG correction: redo this sweep's Step B in float64 (monotone again).
            info["float64_redos"] += 1
            new_u_s, more = _step_b(layer, u_t, core, u_s, config, kron)
            iters += more
            new_u_s = torch.linalg.qr(new_u_s).Q
            new_u_t, new_core, new_f = _step_a(layer, new_u_s, r_t)
        info["cg_iters"].append(iters)
        info["sweep_seconds"].append(time.perf_counter() - tic)
        if new_f > f * (1 + 1e-12) + 1e-300:
            # Only rounding can get here (both steps are exact minimizations): keep the better iterate.
            converged = True
            break
        decrease = (errors[-1] - _rel(new_f, layer)) / max(errors[-1], 1e-300)
        u_s, u_t, core, f = new_u_s, new_u_t, new_core, new_f
        errors.append(_rel(f, layer))
        if callback is not None:
            callback(sweep, errors[-1], info)
        if decrease < config.tol:
            converged = True
            break
    info["seconds"] = time.perf_counter() - start
    out_dtype = kernel.dtype if kernel.dtype.is_floating_point else dtype
    return Tucker2Result(
        core=core.reshape(r_t, r_s, h, w).to(device=kernel.device, dtype=out_dtype),
        u_t=u_t.to(device=kernel.device, dtype=out_dtype),
        u_s=u_s.to(device=kernel.device, dtype=out_dtype),
        ranks=(r_t, r_s),
        errors=tuple(errors),
        converged=converged,
        method=METHOD,
        metric="rel_sigma_err",
        info=info,
    )

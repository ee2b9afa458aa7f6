"""Filter-by-filter CP (NORTON, Pham et al. "Hybrid network compression through tensor decompositions and pruning").

Every output filter ``K_t`` (S, H, W) of a conv gets its own rank-R CP (paper eq. 2)
``K_t ~ sum_r C_t[:, r] o A_t[:, r] o B_t[:, r]``. Two solvers:

* :func:`filter_cp_als` (``norton-cp``): Frobenius ALS, batched over the T filters in one float64 loop. Each factor
  update is the exact least-squares solve ``C_t = X_t(1) (A_t kr B_t) (A_t^T A_t * B_t^T B_t)^+`` (and likewise
  for A_t, B_t), with a pseudo-inverse of the R x R Gram because R > 3 makes ``A_t^T A_t`` singular.
* :func:`filter_cp_als_sigma` (``norton-cp-sigma``, beyond the paper): the layer's output error decouples exactly,
  ``||(K - K~)_(1) L||_F^2 = sum_t (k_t - k~_t)^T Sigma (k_t - k~_t)``, because the filters share no factor, so
  minimizing every filter's Sigma error minimizes the layer's output MSE. Each factor update is the exact Sigma
  least-squares solve, batched over filters. It starts from the Frobenius solution, and every update is an exact
  block minimization, so it is never worse than ``norton-cp`` on any filter.

Rank rules (:func:`filter_cp_rank`): an explicit R, a fraction of the per-filter maximum rank (paper eq. 8,
``R <= min(S H, S W, H W)``), or the parameter break-even rank. The VBMF alpha rule has no filter-CP analogue in the
paper and is rejected.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from sigma_core.covariance import validate_sigma
from sigma_core.decompose._checks import check_init, check_kernel
from sigma_core.decompose._filter_result import FilterCPResult
from sigma_core.ranks import RankRule, cp_max_rank, validate_cp_rank

__all__ = [
    "FilterCPSigmaConfig",
    "filter_cp_als",
    "filter_cp_als_sigma",
    "filter_cp_max_rank",
    "filter_cp_breakeven_rank",
    "filter_cp_rank",
    "filter_nmse",
]

F64 = torch.float64
_SIGMA_CHUNK_BYTES = 128 * 2**20


# ------------------------------------------------------------------------------------------------- ranks


def filter_cp_max_rank(shape: Sequence[int]) -> int:
    """Per-filter maximal CP rank ``R_max = S H W / max(S, H, W)`` (paper eq. 8) for a (T, S, H, W) kernel."""
    _, s, h, w = (int(d) for d in shape)
    return cp_max_rank((1, s, h, w))


def filter_cp_breakeven_rank(shape: Sequence[int]) -> int:
    """Largest R that still saves parameters: ``R (S + H + W) < S H W`` (spec Sec. 2.4), at least 1.

    At R = 1 a filter with ``S H W <= S + H + W`` (e.g. S = 1, 3x3: 9 vs 7 still compresses; S = 1, 2x2 does not)
    is not compressed; 1 is returned anyway so that a rank exists.
    """
    _, s, h, w = (int(d) for d in shape)
    return max(1, min(math.ceil(s * h * w / (s + h + w)) - 1, filter_cp_max_rank(shape)))


@dataclass(frozen=True)
class BreakEvenRule:
    """Rank rule "the parameter break-even rank of each layer" (:func:`filter_cp_breakeven_rank`)."""

    def describe(self) -> str:
        return "break-even filter CP rank (largest R with R(S+H+W) < SHW)"


def filter_cp_rank(rule: RankRule | BreakEvenRule, kernel_shape: Sequence[int]) -> int:
    """Filter-CP rank R of a layer from a rank rule.

    Parameters
    ----------
    rule : RankRule or BreakEvenRule
        ``cp_rank``: the global R, checked against the per-filter maximum; ``fraction``: share of the per-filter
        ``R_max`` (``round``, clamped to [1, R_max]); :class:`BreakEvenRule`: :func:`filter_cp_breakeven_rank`.
    kernel_shape : (T, S, H, W)

    Raises
    ------
    ValueError
        ``alpha`` (the paper has no VBMF rule for filter CP), Tucker-2 ``ranks`` / ``svd_rank``, or a ``cp_rank``
        above the per-filter maximum.
    """
    shape = tuple(int(d) for d in kernel_shape)
    if len(shape) != 4:
        raise ValueError(f"kernel_shape must be (T, S, H, W), got {shape}")
    if isinstance(rule, BreakEvenRule):
        return filter_cp_breakeven_rank(shape)
    if not isinstance(rule, RankRule):
        raise ValueError(f"rule must be a RankRule or BreakEvenRule, got {type(rule).__name__}")
    if rule.alpha is not None:
        raise ValueError("filter CP (norton-cp, norton-cp-sigma) has no alpha/VBMF rank rule (the NORTON paper uses "
                         "one global R): give an explicit cp_rank R (--cp-rank), a fraction of the per-filter maximum "
                         "rank (--fraction) or the break-even rank (sigma_core.decompose.filter_cp.BreakEvenRule)")
    if rule.cp_rank is not None:
        r_max = filter_cp_max_rank(shape)
        if rule.cp_rank > r_max:
            raise ValueError(f"cp_rank={rule.cp_rank} exceeds the per-filter maximum rank R_max={r_max} of a "
                             f"(S, H, W)={shape[1:]} filter (paper eq. 8: an exact CP exists at R_max); choose "
                             f"1 <= R <= {r_max}")
        return validate_cp_rank((1, *shape[1:]), rule.cp_rank)
    if rule.fraction is not None:
        r_max = filter_cp_max_rank(shape)
        return min(r_max, max(1, math.floor(rule.fraction * r_max + 0.5)))
    raise ValueError(f"{rule.describe()} is not a filter-CP rank rule: give cp_rank, fraction or the break-even rule")


# ------------------------------------------------------------------------------------------------- helpers


def filter_nmse(kernel: torch.Tensor, approx: torch.Tensor) -> float:
    """NORTON's NMSE (public code ``NMSE.py``): mean over nonzero filters of ``||K_t - K~_t||^2 / ||K_t||^2``."""
    k = kernel.detach().reshape(kernel.shape[0], -1).to(F64)
    d = k - approx.detach().reshape(approx.shape[0], -1).to(k.device, F64)
    den = (k * k).sum(1)
    ok = den > 0
    if not bool(ok.any()):
        return float("nan")
    return float(((d * d).sum(1)[ok] / den[ok]).mean())


def _pinv_solve(gram: torch.Tensor, rhs: torch.Tensor, rcond: float = 1e-13) -> torch.Tensor:
    """``rhs @ gram^+`` for batched symmetric PSD (.., R, R) Grams: the minimum-norm least-squares solution."""
    vals, vecs = torch.linalg.eigh(0.5 * (gram + gram.transpose(-1, -2)))
    cut = rcond * vals.abs().amax(-1, keepdim=True).clamp_min(1e-300)
    inv = torch.where(vals > cut, 1.0 / torch.where(vals > cut, vals, torch.ones_like(vals)), torch.zeros_like(vals))
    return ((rhs @ vecs) * inv[..., None, :]) @ vecs.transpose(-1, -2)


def _balance(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Give the three columns of every component the same norm (product unchanged; zero columns left alone)."""
    norms = torch.stack([c.norm(dim=1), a.norm(dim=1), b.norm(dim=1)])  # (3, T, R)
    ok = (norms > 0).all(0)
    target = norms.prod(0) ** (1 / 3)
    safe = torch.where(ok, norms, torch.ones_like(norms))
    scale = torch.where(ok, target / safe, torch.ones_like(norms))
    return c * scale[0][:, None], a * scale[1][:, None], b * scale[2][:, None]


def _recon(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.einsum("tsr,thr,twr->tshw", c, a, b)


def _mode_basis(unf: torch.Tensor) -> torch.Tensor:
    """Batched complete left singular basis (descending) of (T, k, m) unfoldings, from the k x k Gram."""
    _, vecs = torch.linalg.eigh(unf @ unf.transpose(-1, -2))
    return vecs.flip(-1)


def _init_svd(x: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Deterministic HOSVD start per filter, exact at R = R_max.

    The two smaller modes of the (S, H, W) filter are rotated to their left singular bases; each of the
    ``R_max`` fibres of the largest mode in that basis is a rank-one term (exact sum), and the R fibres of
    largest norm are kept.
    """
    t, s, h, w = x.shape
    dims = [s, h, w]
    big = max(range(3), key=lambda i: (dims[i], -i))  # the largest mode, S first on ties
    small = [i for i in range(3) if i != big]
    perm = [0, 1 + big, 1 + small[0], 1 + small[1]]
    y = x.permute(*perm)  # (T, big, m1, m2)
    m1, m2 = y.shape[2], y.shape[3]
    q1 = _mode_basis(y.permute(0, 2, 1, 3).reshape(t, m1, -1))  # (T, m1, m1)
    q2 = _mode_basis(y.permute(0, 3, 1, 2).reshape(t, m2, -1))  # (T, m2, m2)
    rot = torch.einsum("tbij,tik,tjl->tbkl", y, q1, q2).reshape(t, y.shape[1], m1 * m2)  # fibres (T, big, m1 m2)
    order = torch.argsort(rot.norm(dim=1), dim=1, descending=True, stable=True)[:, :rank]  # (T, R)
    k1, k2 = order // m2, order % m2
    fib = torch.gather(rot, 2, order[:, None, :].expand(-1, y.shape[1], -1))  # (T, big, R)
    f1 = torch.gather(q1, 2, k1[:, None, :].expand(-1, m1, -1))
    f2 = torch.gather(q2, 2, k2[:, None, :].expand(-1, m2, -1))
    by_mode = {big: fib, small[0]: f1, small[1]: f2}
    return by_mode[0], by_mode[1], by_mode[2]


def _init_random(shape, rank: int, generator: torch.Generator | None, device) -> tuple[torch.Tensor, ...]:
    t, s, h, w = shape
    out = []
    for d in (s, h, w):
        g = torch.randn(t, d, rank, generator=generator, dtype=F64)
        out.append((g / g.norm(dim=1, keepdim=True).clamp_min(1e-300)).to(device))
    return tuple(out)


def _check_rank(shape, rank) -> int:
    r_max = filter_cp_max_rank(shape)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= r_max:
        raise ValueError(f"rank must be an int in [1, {r_max}] (the per-filter maximum rank of a (S, H, W)="
                         f"{tuple(shape[1:])} filter, paper eq. 8), got {rank!r}")
    return rank


def _rel_filters(sq_err: torch.Tensor, sq_norm: torch.Tensor) -> torch.Tensor:
    return torch.where(sq_norm > 0, (sq_err.clamp_min(0) / sq_norm.clamp_min(1e-300)).sqrt(), torch.zeros_like(sq_err))


def _layer_rel(sq_err: torch.Tensor, sq_norm: torch.Tensor) -> float:
    den = float(sq_norm.sum())
    return math.sqrt(max(float(sq_err.sum()), 0.0) / den) if den > 0 else 0.0


# ------------------------------------------------------------------------------------------------- Frobenius


def _frob_steps(x: torch.Tensor, c: torch.Tensor, a: torch.Tensor, b: torch.Tensor):
    """One ALS sweep C, A, B (each an exact batched least-squares solve); yields the factors after each step."""
    rhs = torch.einsum("tshw,thr,twr->tsr", x, a, b)
    c = _pinv_solve((a.mT @ a) * (b.mT @ b), rhs)
    yield c, a, b
    rhs = torch.einsum("tshw,tsr,twr->thr", x, c, b)
    a = _pinv_solve((c.mT @ c) * (b.mT @ b), rhs)
    yield c, a, b
    rhs = torch.einsum("tshw,tsr,thr->twr", x, c, a)
    b = _pinv_solve((c.mT @ c) * (a.mT @ a), rhs)
    yield c, a, b


def filter_cp_als(
    kernel: torch.Tensor,
    rank: int,
    *,
    max_iter: int = 200,
    tol: float = 1e-8,
    init: str = "svd",
    generator: torch.Generator | None = None,
    callback: Callable[[int, float], None] | None = None,
) -> FilterCPResult:
    """Rank-R CP of every filter under the Frobenius norm (``norton-cp``; paper eq. 2), batched float64 ALS.

    Parameters
    ----------
    kernel : torch.Tensor, shape (T, S, H, W)
    rank : int
        ``1 <= R <= R_max = S H W / max(S, H, W)`` (paper eq. 8).
    max_iter : int
        Maximum sweeps (C, A, B updates of all filters).
    tol : float
        Stop when the relative decrease of the layer's rel_frob_err over a sweep falls below ``tol``.
    init : {"svd", "random"}
        ``"svd"``: deterministic HOSVD start, exact at R_max; ``"random"``: Gaussian factors from ``generator``
        (the public code's ``parafac(init='random')``, seeded here).
    generator : torch.Generator, optional
    callback : callable, optional
        ``callback(sweep, rel_frob_err)`` after the initialization (0) and every sweep.

    Returns
    -------
    FilterCPResult
        Balanced factors in the kernel's dtype and device; ``errors`` = layer rel_frob_err per sweep
        (non-increasing), ``filter_errors`` = per-filter rel_frob_err.
    """
    t, s, h, w = check_kernel(kernel)
    rank = _check_rank((t, s, h, w), rank)
    check_init(init)
    if max_iter < 0 or not tol >= 0:
        raise ValueError(f"max_iter must be >= 0 and tol >= 0, got {max_iter}, {tol}")
    tic = time.perf_counter()
    x = kernel.detach().to(F64)
    norm2 = (x * x).sum((1, 2, 3))
    c, a, b = _init_svd(x, rank) if init == "svd" else _init_random(x.shape, rank, generator, x.device)
    if init == "random":  # scale the random start by one C solve
        c = next(_frob_steps(x, c, a, b))[0]
    c, a, b = _balance(c, a, b)
    sq = ((x - _recon(c, a, b)) ** 2).sum((1, 2, 3))
    errors = [_layer_rel(sq, norm2)]
    if callback is not None:
        callback(0, errors[0])
    converged = False
    for sweep in range(1, max_iter + 1):
        for c_new, a_new, b_new in _frob_steps(x, c, a, b):
            pass
        c_new, a_new, b_new = _balance(c_new, a_new, b_new)
        sq_new = ((x - _recon(c_new, a_new, b_new)) ** 2).sum((1, 2, 3))
        # Per filter, keep the better iterate: only rounding can make an exact block minimization worse.
        better = sq_new <= sq
        c = torch.where(better[:, None, None], c_new, c)
        a = torch.where(better[:, None, None], a_new, a)
        b = torch.where(better[:, None, None], b_new, b)
        sq = torch.where(better, sq_new, sq)
        errors.append(_layer_rel(sq, norm2))
        if callback is not None:
            callback(sweep, errors[-1])
        if errors[-2] - errors[-1] <= tol * max(errors[-2], 1e-300):
            converged = True
            break
    cast = {"dtype": kernel.dtype if kernel.dtype.is_floating_point else F64, "device": kernel.device}
    return FilterCPResult(u_s=c.to(**cast), u_h=a.to(**cast), u_w=b.to(**cast), rank=rank, errors=tuple(errors),
                          filter_errors=tuple(_rel_filters(sq, norm2).tolist()), converged=converged,
                          method="norton-cp", metric="rel_frob_err",
                          info={"init": init, "sweeps": len(errors) - 1, "seconds": time.perf_counter() - tic})


# ------------------------------------------------------------------------------------------------- Sigma


@dataclass(frozen=True)
class FilterCPSigmaConfig:
    """Settings of :func:`filter_cp_als_sigma`.

    Attributes
    ----------
    max_iter : int
        Maximum sweeps.
    tol : float
        Stop when the relative decrease of the layer's rel_sigma_err over a sweep falls below ``tol``.
    ridge : float
        ``ridge * mean(diag(Sigma))`` is added to Sigma's diagonal (dead channels make Sigma singular); the
        reported errors use the ridged Sigma, as in ``cp_als_sigma``.
    frob_max_iter : int
        Sweeps of the Frobenius ALS that gives the start (``start="frobenius"``).
    chunk_bytes : int
        Memory cap of the per-chunk (filters, n, S, R) temporary of the C update.
    """

    max_iter: int = 50
    tol: float = 1e-6
    ridge: float = 1e-10
    frob_max_iter: int = 200
    chunk_bytes: int = _SIGMA_CHUNK_BYTES

    def __post_init__(self) -> None:
        if self.max_iter < 0 or not self.tol >= 0 or not self.ridge >= 0 or self.frob_max_iter < 0:
            raise ValueError(f"max_iter, frob_max_iter, tol and ridge must be >= 0, got {self}")
        if self.chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be >= 1, got {self.chunk_bytes}")


def _spd_solve(normal: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Batched ``normal^{-1} rhs`` (normal (B, m, m) PSD, rhs (B, m, 1)): Cholesky, pseudo-inverse where it fails."""
    normal = 0.5 * (normal + normal.mT)
    chol, info = torch.linalg.cholesky_ex(normal)
    out = torch.cholesky_solve(rhs, chol)
    bad = info != 0
    if bool(bad.any()):
        out[bad] = _pinv_solve(normal[bad], rhs[bad].mT).mT
    return out


class _SigmaLayer:
    """Per-layer constants: ridged Sigma (n, n) with its (S, P, S, P) view, kernel rows and ``K1 Sigma``."""

    def __init__(self, kernel: torch.Tensor, sigma: torch.Tensor, ridge: float):
        t, s, h, w = kernel.shape
        self.shape = (t, s, h, w)
        sig = sigma.to(F64)
        sig = 0.5 * (sig + sig.T)
        if ridge > 0:
            sig = sig + ridge * float(sig.diagonal().mean()) * torch.eye(sig.shape[0], dtype=F64, device=sig.device)
        self.sigma = sig
        self.k = kernel.to(device=sig.device, dtype=F64).reshape(t, -1)
        self.ksig = self.k @ sig  # (T, n)
        self.norm2 = (self.ksig * self.k).sum(1)

    def sq_err(self, c, a, b) -> torch.Tensor:
        d = self.k - _recon(c, a, b).reshape(self.k.shape)
        return ((d @ self.sigma) * d).sum(1).clamp_min(0)


def _chunks(t: int, per_filter_bytes: int, cap: int) -> list[slice]:
    step = max(1, cap // max(per_filter_bytes, 1))
    return [slice(i, min(i + step, t)) for i in range(0, t, step)]


def _step_c_sigma(layer: _SigmaLayer, c, a, b, chunk_bytes: int) -> torch.Tensor:
    """Exact C_t (S, R) of every filter for fixed (A_t, B_t) under the Sigma norm.

    ``k~_t = M_t vec(C_t)`` with ``M_t[(s,p), (s',r)] = delta_{ss'} E_t[p, r]``, ``E_t = A_t kr B_t`` (P, R); the
    normal matrix ``M_t^T Sigma M_t`` is ``sum_{p,q} E_t[p,r] Sigma[(s,p),(s',q)] E_t[q,r']`` ((S R)^2, rows (s, r))
    and the right-hand side ``M_t^T Sigma k_t``.
    """
    t, s, h, w = layer.shape
    p = h * w
    r = c.shape[2]
    e = (a[:, :, None, :] * b[:, None, :, :]).reshape(t, p, r)  # (T, P, R), rows h*W + w
    sig4 = layer.sigma.reshape(s, p, s, p)
    rhs = torch.einsum("tsp,tpr->tsr", layer.ksig.reshape(t, s, p), e).reshape(t, s * r, 1)
    out = torch.empty(t, s * r, 1, dtype=F64, device=c.device)
    for sl in _chunks(t, s * p * s * r * 8, chunk_bytes):
        tmp = torch.einsum("spSq,tqR->tspSR", sig4, e[sl])
        normal = torch.einsum("tspSR,tpr->tsrSR", tmp, e[sl]).reshape(-1, s * r, s * r)
        out[sl] = _spd_solve(normal, rhs[sl])
    return out.reshape(t, s, r)


def _psi(layer: _SigmaLayer, c: torch.Tensor) -> torch.Tensor:
    """``Psi_t[a, p, b, q] = sum_{s,s'} C_t[s,a] Sigma[(s,p),(s',q)] C_t[s',b]``, shape (T, R, P, R, P)."""
    t, s, h, w = layer.shape
    p = h * w
    sig = layer.sigma.reshape(s, p * s * p)
    x = torch.einsum("tsa,sm->tam", c, sig).reshape(t, c.shape[2], p, s, p)
    psi = torch.einsum("tapsq,tsb->tapbq", x, c)
    return 0.5 * (psi + psi.permute(0, 3, 4, 1, 2))


def _step_spatial_sigma(layer: _SigmaLayer, c, a, b, psi: torch.Tensor, mode: str) -> torch.Tensor:
    """Exact A_t (``mode="h"``) or B_t (``"w"``) of every filter for the other two factors fixed (Sigma norm)."""
    t, s, h, w = layer.shape
    r = c.shape[2]
    psi6 = psi.reshape(t, r, h, w, r, h, w)
    ks = layer.ksig.reshape(t, s, h, w)
    if mode == "h":
        y = torch.einsum("tahwbHx,txb->tahwbH", psi6, b)
        normal = torch.einsum("tahwbH,twa->tahbH", y, b)
        rhs = torch.einsum("tshw,tsa,twa->tah", ks, c, b)
        k = h
    else:
        y = torch.einsum("tahwbxW,txb->tahwbW", psi6, a)
        normal = torch.einsum("tahwbW,tha->tawbW", y, a)
        rhs = torch.einsum("tshw,tsa,tha->taw", ks, c, a)
        k = w
    x = _spd_solve(normal.reshape(t, r * k, r * k), rhs.reshape(t, r * k, 1))
    return x.reshape(t, r, k).mT.contiguous()


def filter_cp_als_sigma(
    kernel: torch.Tensor,
    sigma: torch.Tensor,
    rank: int,
    *,
    config: FilterCPSigmaConfig = FilterCPSigmaConfig(),
    start: FilterCPResult | str | None = "frobenius",
    generator: torch.Generator | None = None,
    callback: Callable[[int, float], None] | None = None,
) -> FilterCPResult:
    """Rank-R CP of every filter minimizing the layer's output error ``||(K - K~)_(1) Sigma^{1/2}||_F``.

    Beyond the NORTON paper: the objective decouples exactly into ``sum_t (k_t - k~_t)^T Sigma (k_t - k~_t)``
    (the filters share no factor), so this is the exact block-coordinate minimizer of the NORTON block's output MSE.
    Sweeps update C_t, A_t, B_t of all filters by exact Sigma least squares.

    Parameters
    ----------
    kernel : torch.Tensor, shape (T, S, H, W)
    sigma : torch.Tensor, shape (S*H*W, S*H*W)
        Second moment of the layer's input patches; its device is where the computation runs.
    rank : int
        ``1 <= R <= R_max`` (paper eq. 8).
    config : FilterCPSigmaConfig
    start : "frobenius", FilterCPResult, "svd", "random" or None
        ``"frobenius"`` (default): the :func:`filter_cp_als` solution, so the result is never worse than
        ``norton-cp`` on any filter under the Sigma norm; a result to continue from; an init of the Frobenius ALS
        (``"svd"``/``"random"`` with zero Frobenius sweeps); None = ``"svd"``.
    generator : torch.Generator, optional
    callback : callable, optional
        ``callback(sweep, rel_sigma_err)``.

    Returns
    -------
    FilterCPResult
        ``metric="rel_sigma_err"``; ``errors`` non-increasing; ``info["start_filter_errors"]`` holds the start's
        per-filter Sigma errors.

    Notes
    -----
    Cost per sweep: ``T (n^2 R + (S R)^3 / 3)`` for the C updates (n = S H W; the (S R)^2 normal matrix of each
    filter is assembled from Sigma and solved by Cholesky), ``2 T R n^2`` for the Psi contraction shared by the A
    and B updates, and ``2 T n^2`` for the exact error.
    """
    t, s, h, w = check_kernel(kernel)
    rank = _check_rank((t, s, h, w), rank)
    validate_sigma(sigma, s * h * w)
    tic = time.perf_counter()
    if start is None or isinstance(start, str):
        name = "frobenius" if start is None else start
        if name not in ("frobenius", "svd", "random"):
            raise ValueError(f"start must be 'frobenius', 'svd', 'random', a FilterCPResult or None, got {start!r}")
        init = "svd" if name in ("frobenius", "svd") else "random"
        start = filter_cp_als(kernel, rank, max_iter=config.frob_max_iter if name == "frobenius" else 0,
                              init=init, generator=generator)
    if not isinstance(start, FilterCPResult) or tuple(start.kernel_shape) != (t, s, h, w) or start.rank != rank:
        raise ValueError(f"start must be a rank-{rank} FilterCPResult of a {(t, s, h, w)} kernel")
    layer = _SigmaLayer(kernel, sigma, config.ridge)
    dev = layer.sigma.device
    c, a, b = (f.to(device=dev, dtype=F64) for f in start.factors)
    sq = layer.sq_err(c, a, b)
    start_rel = _rel_filters(sq, layer.norm2)
    errors = [_layer_rel(sq, layer.norm2)]
    if callback is not None:
        callback(0, errors[0])
    substeps = []
    converged = False
    for sweep in range(1, config.max_iter + 1):
        c_new = _step_c_sigma(layer, c, a, b, config.chunk_bytes)
        psi = _psi(layer, c_new)
        a_new = _step_spatial_sigma(layer, c_new, a, b, psi, "h")
        b_new = _step_spatial_sigma(layer, c_new, a_new, b, psi, "w")
        c_new, a_new, b_new = _balance(c_new, a_new, b_new)
        sq_new = layer.sq_err(c_new, a_new, b_new)
        better = sq_new <= sq  # per filter: exact minimizations, only rounding can lose
        c = torch.where(better[:, None, None], c_new, c)
        a = torch.where(better[:, None, None], a_new, a)
        b = torch.where(better[:, None, None], b_new, b)
        sq = torch.where(better, sq_new, sq)
        errors.append(_layer_rel(sq, layer.norm2))
        substeps.append(int((~better).sum()))
        if callback is not None:
            callback(sweep, errors[-1])
        if errors[-2] - errors[-1] <= config.tol * max(errors[-2], 1e-300):
            converged = True
            break
    cast = {"dtype": kernel.dtype if kernel.dtype.is_floating_point else F64, "device": kernel.device}
    info = {"start": start.method, "start_errors": start.errors, "start_filter_errors": tuple(start_rel.tolist()),
            "rejected_updates": substeps, "ridge": config.ridge, "seconds": time.perf_counter() - tic}
    return FilterCPResult(u_s=c.to(**cast), u_h=a.to(**cast), u_w=b.to(**cast), rank=rank, errors=tuple(errors),
                          filter_errors=tuple(_rel_filters(sq, layer.norm2).tolist()), converged=converged,
                          method="norton-cp-sigma", metric="rel_sigma_err", info=info)

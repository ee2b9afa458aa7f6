"""Weighted Tucker-2: the FW-LRA and AG-LRA baselines of paper Sec. 5.4 (Tables 3-4).

What the paper says (Sec. 5.4, "Evaluation Against Alternative Data-Informed Baselines"): both baselines "guide the
Tucker2 decomposition by solving a specific Weighted Alternating Least Squares (WALS) problem"

* FW-LRA (Fisher-weighted, after Tu et al. 2016): ``min ||H_fisher (*) (K - K~)||_F^2`` where "the weighting
  tensor H_fisher is derived from the diagonal of the Fisher Information Matrix" -- preserve the weights the loss
  is most sensitive to;
* AG-LRA (activation-guided, after Rhu et al. 2018): ``min ||H_act (*) (K - K~)||_F^2`` where "H_act is calculated
  from the mean absolute activation of each output channel" -- filters with larger mean activation matter more.

``(*)`` is the elementwise product and ``K~`` a Tucker-2 tensor ``G x_1 U_T x_2 U_S`` with ranks (R_T, R_S). The
paper gives neither the map from the Fisher diagonal / activations to H nor the solver details. Here:

* FW-LRA: ``H = sqrt(F)`` with ``F`` the diagonal (empirical) Fisher of the layer's weights, same shape as K, so
  that ``||H (*) (K - K~)||^2 = sum_i F_i (K_i - K~_i)^2`` is the Fisher quadratic form -- the second-order
  estimate of the loss increase used by Fisher pruning. (``H = F`` itself would weight by ``F^2``.) Solved by exact
  weighted ALS (:func:`weighted_tucker2`): every row of ``U_T`` and of ``U_S`` is an independent weighted least
  squares problem (solved exactly, pseudo-inverse of its small normal matrix), and the core is the solution of
  a linear system done by Jacobi-preconditioned CG from a warm start. Each block update is an exact (or, for CG,
  monotone) minimization, so the weighted error never increases. Starts from the Frobenius Tucker-2 solution
  (tensorly HOOI), so it is never worse than Tucker2-ALS in the weighted error.
* AG-LRA: ``H[t, s, h, w] = a_t`` with ``a_t`` the mean ``|output|`` of output channel t over the data (the
  statistic is computed in ``pipeline/``). A weight that depends on the output channel only has a closed-form
  reduction (:func:`row_weighted_tucker2`): with ``D = diag(a)``, ``||D (K - K~)||_F = ||D K - D K~||_F`` and
  ``D K~ = G x_1 (D U_T) x_2 U_S`` ranges over all Tucker-2 tensors with the same ranks when D is invertible, so
  ``K~ = D^{-1} Tucker2(D K)``: a plain Tucker-2 (tensorly HOOI, as the Frobenius baseline) of the row-scaled
  kernel, then unscaled. Uniform weights give exactly Tucker2-ALS.

Weights are normalized to mean 1 (the minimizer does not depend on the scale) and floored at ``min_weight`` times
their mean, so zero Fisher entries or dead channels (``a_t = 0``) keep the problem well posed (D invertible).
The error reported everywhere here is ``rel_weighted_err = ||H (*) (K - K~)||_F / ||H (*) K||_F``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from sigma_core.decompose._checks import check_kernel
from sigma_core.decompose._result import Tucker2Result
from sigma_core.decompose.tucker2_frobenius import tucker2_als
from sigma_core.ranks import validate_tucker2_ranks

__all__ = ["WeightedTucker2Config", "weighted_tucker2", "row_weighted_tucker2", "fw_lra", "ag_lra",
           "weighted_rel_err"]

METRIC = "rel_weighted_err"
# Elements per temporary (rows x rank x columns) when forming the per-row normal matrices: bounds memory.
_CHUNK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class WeightedTucker2Config:
    """Settings of the weighted Tucker-2 solvers.

    Attributes
    ----------
    max_iter : int
        Maximum ALS sweeps (one sweep = U_T rows, U_S rows, core) of :func:`weighted_tucker2`; also the HOOI
        iteration cap of the Frobenius Tucker-2 inside :func:`row_weighted_tucker2` and of the initialization.
    tol : float
        Stop when the relative decrease of rel_weighted_err over a sweep falls below ``tol``.
    init : str
        ``"tucker2"`` (start from the Frobenius Tucker-2 solution, tensorly HOOI) or ``"svd"`` (truncated HOSVD).
    core_cg_steps : int
        Cap on CG iterations of the core update per sweep.
    core_cg_tol : float
        Relative residual at which the core CG stops.
    min_weight : float
        Squared weights ``H^2`` below ``min_weight * mean(H^2)`` are raised to it (zero weights make the
        row-scaling singular and the problem ill posed).
    """

    max_iter: int = 50
    tol: float = 1e-6
    init: str = "tucker2"
    core_cg_steps: int = 25
    core_cg_tol: float = 1e-10
    min_weight: float = 1e-8

    def __post_init__(self) -> None:
        if self.init not in ("tucker2", "svd"):
            raise ValueError(f"init must be 'tucker2' or 'svd', got {self.init!r}")
        if self.max_iter < 0 or self.core_cg_steps < 1:
            raise ValueError(f"max_iter must be >= 0 and core_cg_steps >= 1, got {self.max_iter}, "
                             f"{self.core_cg_steps}")
        if not (self.tol >= 0 and self.core_cg_tol >= 0 and 0 < self.min_weight < 1):
            raise ValueError(f"tol and core_cg_tol must be >= 0 and min_weight in (0, 1), got tol={self.tol}, "
                             f"core_cg_tol={self.core_cg_tol}, min_weight={self.min_weight}")


def _check_kernel(kernel: torch.Tensor, ranks: tuple[int, int]) -> tuple[int, int]:
    return validate_tucker2_ranks(check_kernel(kernel), ranks)


def _normalized_sq_weights(weights: torch.Tensor, shape: torch.Size, min_weight: float,
                           name: str) -> torch.Tensor:
    """``H^2`` broadcast to ``shape``, float64, scaled to mean 1 and floored at ``min_weight``."""
    if not isinstance(weights, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(weights).__name__}")
    try:
        w2 = torch.broadcast_to(weights.detach().to(torch.float64) ** 2, shape)
    except RuntimeError:
        raise ValueError(f"{name} of shape {tuple(weights.shape)} does not broadcast to the kernel shape "
                         f"{tuple(shape)}") from None
    if not torch.isfinite(w2).all() or (weights < 0).any():
        raise ValueError(f"{name} must be finite and >= 0 (they are magnitudes); recompute the statistic")
    mean = float(w2.mean())
    if mean <= 0:
        raise ValueError(f"{name} are all zero: the statistic carries no information for this layer")
    return (w2 / mean).clamp_min(min_weight)


def weighted_rel_err(kernel: torch.Tensor, approx: torch.Tensor, weights: torch.Tensor) -> float:
    """``||H (*) (K - K~)||_F / ||H (*) K||_F`` for weights ``H`` broadcastable to the kernel shape."""
    k = kernel.to(torch.float64)
    h = weights.to(device=k.device, dtype=torch.float64)
    den = float((h * k).norm())
    return float((h * (k - approx.to(k.device, torch.float64))).norm()) / den if den > 0 else 0.0


def _result(core, u_t, u_s, ranks, errors, converged, method, info, kernel) -> Tucker2Result:
    out = {"device": kernel.device, "dtype": kernel.dtype if kernel.is_floating_point() else torch.float64}
    return Tucker2Result(core=core.to(**out), u_t=u_t.to(**out), u_s=u_s.to(**out), ranks=ranks,
                         errors=tuple(errors), converged=converged, method=method, metric=METRIC, info=info)


# ---------------------------------------------------------------------------------------------- row weights


def row_weighted_tucker2(kernel: torch.Tensor, row_weights: torch.Tensor, ranks: tuple[int, int], *,
                         config: WeightedTucker2Config = WeightedTucker2Config(),
                         method: str = "row-weighted-tucker2") -> Tucker2Result:
    """Tucker-2 minimizing ``sum_t h_t^2 ||K[t] - K~[t]||_F^2`` in closed form: ``K~ = D^{-1} Tucker2(D K)``.

    Parameters
    ----------
    kernel : torch.Tensor, shape (T, S, H, W)
    row_weights : torch.Tensor, shape (T,)
        ``h_t >= 0`` per output channel (``H[t, s, h, w] = h_t``).
    ranks : (R_T, R_S)
    config : WeightedTucker2Config
        ``max_iter``/``tol`` go to the inner Frobenius Tucker-2 (tensorly HOOI), ``min_weight`` floors ``h_t^2``.
    method : str
        Name stored in the result.

    Returns
    -------
    Tucker2Result
        Orthonormal ``u_t``/``u_s``; ``errors`` is the HOOI history on ``D K``, which is rel_weighted_err;
        ``metric == "rel_weighted_err"``.
    """
    r_t, r_s = _check_kernel(kernel, ranks)
    if not isinstance(row_weights, torch.Tensor) or row_weights.shape != (kernel.shape[0],):
        raise ValueError(f"row_weights must be a tensor of shape ({kernel.shape[0]},) (one per output channel), "
                         f"got {getattr(row_weights, 'shape', row_weights)}")
    tic = time.perf_counter()
    d = _normalized_sq_weights(row_weights.cpu(), row_weights.shape, config.min_weight, "row_weights").sqrt()
    k = kernel.detach().to("cpu", torch.float64)
    inner = tucker2_als(d[:, None, None, None] * k, (r_t, r_s), n_iter_max=max(config.max_iter, 1),
                        tol=min(config.tol, 1e-6))
    # Unscale: D^{-1} U_T has non-orthonormal columns; QR and fold R into the core (K~ unchanged).
    q, r = torch.linalg.qr(inner.u_t / d[:, None])
    core = torch.einsum("ca,abhw->cbhw", r, inner.core)
    info = {"seconds": time.perf_counter() - tic, "inner_iterations": len(inner.errors)}
    return _result(core, q, inner.u_s, (r_t, r_s), inner.errors, inner.converged, method, info, kernel)


# --------------------------------------------------------------------------------------- elementwise weights


def _row_wls(design: torch.Tensor, w2: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Row-wise weighted least squares: ``x_i = argmin_x sum_m w2[i, m] (target[i, m] - x . design[:, m])^2``.

    design (R, m), w2 and target (N, m) -> x (N, R). Each row's R x R normal matrix is solved by an eigen
    pseudo-inverse: the minimum-norm exact minimizer even when the matrix is singular.
    """
    n_rows, m = w2.shape
    r = design.shape[0]
    chunk = max(1, _CHUNK_ELEMENTS // max(r * m, 1))
    out = torch.empty(n_rows, r, dtype=design.dtype, device=design.device)
    for lo in range(0, n_rows, chunk):
        w = w2[lo:lo + chunk]
        weighted = w[:, None, :] * design[None]  # (c, R, m)
        gram = weighted @ design.T  # (c, R, R)
        rhs = (weighted @ target[lo:lo + chunk, :, None])[..., 0]  # (c, R)
        evals, evecs = torch.linalg.eigh(0.5 * (gram + gram.transpose(1, 2)))
        cutoff = 1e-13 * evals[:, -1:].clamp_min(1e-300)
        inv = torch.where(evals > cutoff, 1.0 / evals, torch.zeros_like(evals))
        out[lo:lo + chunk] = torch.einsum("cij,cj,ckj,ck->ci", evecs, inv, evecs, rhs)
    return out


def _expand(core: torch.Tensor, u_t: torch.Tensor, u_s: torch.Tensor) -> torch.Tensor:
    """``K~[t, s, p] = sum_ab G[a, b, p] U_T[t, a] U_S[s, b]``: (T, S, P)."""
    return torch.einsum("ta,abp,sb->tsp", u_t, core, u_s)


def _project(x: torch.Tensor, u_t: torch.Tensor, u_s: torch.Tensor) -> torch.Tensor:
    """Adjoint of :func:`_expand` in the core: ``sum_ts X[t, s, p] U_T[t, a] U_S[s, b]``, (R_T, R_S, P)."""
    return torch.einsum("tsp,ta,sb->abp", x, u_t, u_s)


def _update_u_t(k: torch.Tensor, w2: torch.Tensor, core: torch.Tensor, u_s: torch.Tensor):
    t = k.shape[0]
    z = torch.einsum("abp,sb->asp", core, u_s).reshape(core.shape[0], -1)  # K~1 = U_T Z
    u_t = _row_wls(z, w2.reshape(t, -1), k.reshape(t, -1))
    q, r = torch.linalg.qr(u_t)
    return q, torch.einsum("ca,abp->cbp", r, core)


def _update_u_s(k: torch.Tensor, w2: torch.Tensor, core: torch.Tensor, u_t: torch.Tensor):
    s = k.shape[1]
    y = torch.einsum("ta,abp->btp", u_t, core).reshape(core.shape[1], -1)  # K~ mode-2 rows: U_S Y
    u_s = _row_wls(y, w2.transpose(0, 1).reshape(s, -1), k.transpose(0, 1).reshape(s, -1))
    q, r = torch.linalg.qr(u_s)
    return q, torch.einsum("cb,abp->acp", r, core)


def _update_core(k, w2, core, u_t, u_s, steps: int, tol: float) -> tuple[torch.Tensor, int]:
    """Weighted least squares in the core by Jacobi-preconditioned CG from the current core (monotone)."""
    rhs = _project(w2 * k, u_t, u_s)
    diag = torch.einsum("tsp,ta,sb->abp", w2, u_t**2, u_s**2).clamp_min(1e-300)

    def normal(g):
        return _project(w2 * _expand(g, u_t, u_s), u_t, u_s)

    x = core.clone()
    r = rhs - normal(x)
    z = r / diag
    d = z.clone()
    rz = float((r * z).sum())
    stop = tol * float(rhs.norm())
    for it in range(steps):
        if float(r.norm()) <= stop or rz <= 0:
            return x, it
        nd = normal(d)
        dnd = float((d * nd).sum())
        if dnd <= 0:
            return x, it
        alpha = rz / dnd
        x.add_(d, alpha=alpha)
        r.sub_(nd, alpha=alpha)
        z = r / diag
        rz_new = float((r * z).sum())
        d = z + (rz_new / rz) * d
        rz = rz_new
    return x, steps


def _init_factors(k4: torch.Tensor, ranks: tuple[int, int], config: WeightedTucker2Config):
    r_t, r_s = ranks
    t, s = k4.shape[:2]
    if config.init == "tucker2":
        res = tucker2_als(k4, ranks, n_iter_max=max(config.max_iter, 1), tol=min(config.tol, 1e-6))
        return res.core.reshape(r_t, r_s, -1), res.u_t, res.u_s
    u_t = torch.linalg.svd(k4.reshape(t, -1), full_matrices=False)[0][:, :r_t]
    u_s = torch.linalg.svd(k4.transpose(0, 1).reshape(s, -1), full_matrices=False)[0][:, :r_s]
    return _project(k4.reshape(t, s, -1), u_t, u_s), u_t, u_s


def weighted_tucker2(kernel: torch.Tensor, weights: torch.Tensor, ranks: tuple[int, int], *,
                     config: WeightedTucker2Config = WeightedTucker2Config(),
                     method: str = "weighted-tucker2") -> Tucker2Result:
    """Tucker-2 minimizing ``||H (*) (K - K~)||_F^2`` for elementwise weights H, by exact weighted ALS.

    One sweep: every row of ``U_T`` (then of ``U_S``) solves its own weighted least-squares problem exactly
    (R_T resp. R_S unknowns); the core ``G`` solves the weighted normal equations by Jacobi-PCG from the
    current core. After each factor update the factor is re-orthonormalized (QR, R folded into G). Every step
    minimizes the same weighted objective over one block, so the error never increases.

    Parameters
    ----------
    kernel : torch.Tensor, shape (T, S, H, W)
    weights : torch.Tensor
        ``H >= 0``, broadcastable to (T, S, H, W) (e.g. (T, 1, 1, 1) for per-output-channel weights).
    ranks : (R_T, R_S)
    config : WeightedTucker2Config
    method : str
        Name stored in the result.

    Returns
    -------
    Tucker2Result
        ``errors``: rel_weighted_err after the initialization and after every sweep (non-increasing);
        ``info``: seconds per sweep and core CG iterations.
    """
    r_t, r_s = _check_kernel(kernel, ranks)
    tic = time.perf_counter()
    t, s, h, w = kernel.shape
    k4 = kernel.detach().to("cpu", torch.float64)
    w2 = _normalized_sq_weights(weights.cpu(), kernel.shape, config.min_weight, "weights").reshape(t, s, h * w)
    k = k4.reshape(t, s, h * w)
    total = float((w2 * k * k).sum())

    def rel(core, u_t, u_s) -> float:
        f = float((w2 * (k - _expand(core, u_t, u_s)) ** 2).sum())
        return (f / total) ** 0.5 if total > 0 else 0.0

    core, u_t, u_s = _init_factors(k4, (r_t, r_s), config)
    errors = [rel(core, u_t, u_s)]
    info: dict = {"init": config.init, "cg_iters": [], "sweep_seconds": []}
    converged = False
    for _ in range(config.max_iter):
        start = time.perf_counter()
        n_u_t, n_core = _update_u_t(k, w2, core, u_s)
        n_u_s, n_core = _update_u_s(k, w2, n_core, n_u_t)
        n_core, iters = _update_core(k, w2, n_core, n_u_t, n_u_s, config.core_cg_steps, config.core_cg_tol)
        err = rel(n_core, n_u_t, n_u_s)
        info["cg_iters"].append(iters)
        info["sweep_seconds"].append(time.perf_counter() - start)
        if err > errors[-1] * (1 + 1e-10):
            converged = True  # only rounding can get here: keep the better iterate
            break
        decrease = (errors[-1] - err) / max(errors[-1], 1e-300)
        core, u_t, u_s = n_core, n_u_t, n_u_s
        errors.append(err)
        if decrease < config.tol:
            converged = True
            break
    info["seconds"] = time.perf_counter() - tic
    return _result(core.reshape(r_t, r_s, h, w), u_t, u_s, (r_t, r_s), errors, converged, method, info, kernel)


# ------------------------------------------------------------------------------------------------- baselines


def fw_lra(kernel: torch.Tensor, fisher: torch.Tensor, ranks: tuple[int, int], *,
           config: WeightedTucker2Config = WeightedTucker2Config()) -> Tucker2Result:
    """FW-LRA (paper Sec. 5.4): Tucker-2 minimizing ``sum_i F_i (K_i - K~_i)^2``, i.e. ``H_fisher = sqrt(F)``.

    Parameters
    ----------
    kernel : torch.Tensor, shape (T, S, H, W)
    fisher : torch.Tensor, shape (T, S, H, W)
        Diagonal Fisher information of the kernel's entries (mean squared per-sample gradient of the loss,
        ``pipeline.fisher``), ``>= 0``.
    ranks : (R_T, R_S)
    config : WeightedTucker2Config

    Returns
    -------
    Tucker2Result
        ``method == "fw-lra"``, ``metric == "rel_weighted_err"`` (weights ``sqrt(F)``).
    """
    if not isinstance(fisher, torch.Tensor) or fisher.shape != kernel.shape:
        raise ValueError(f"fisher must be the diagonal Fisher of the kernel, shape {tuple(kernel.shape)}; got "
                         f"{getattr(fisher, 'shape', fisher)}")
    if (fisher < 0).any():
        raise ValueError("fisher has negative entries: a Fisher diagonal is a mean of squares; recompute it")
    return weighted_tucker2(kernel, fisher.to(torch.float64).sqrt(), ranks, config=config, method="fw-lra")


def ag_lra(kernel: torch.Tensor, activation: torch.Tensor, ranks: tuple[int, int], *,
           config: WeightedTucker2Config = WeightedTucker2Config()) -> Tucker2Result:
    """AG-LRA (paper Sec. 5.4): Tucker-2 minimizing ``||H_act (*) (K - K~)||_F^2`` with ``H_act[t] = a_t``.

    Parameters
    ----------
    kernel : torch.Tensor, shape (T, S, H, W)
    activation : torch.Tensor, shape (T,)
        Mean absolute activation of each output channel over the data (``pipeline.fisher``), ``>= 0``.
    ranks : (R_T, R_S)
    config : WeightedTucker2Config

    Returns
    -------
    Tucker2Result
        Closed form :func:`row_weighted_tucker2`; ``method == "ag-lra"``, ``metric == "rel_weighted_err"``.
    """
    return row_weighted_tucker2(kernel, activation, ranks, config=config, method="ag-lra")

"""Full 4-mode Tucker algebra: unfoldings, mode products, HOSVD and tolerance truncation.

Conventions (TDLRT spec Sec. 1; Zangrando et al. 2023, Sec. 2):

* ``unfold(X, i) = X.movedim(i, 0).reshape(X.shape[i], -1)``: row-major over the remaining modes in increasing
  order, so ``unfold(K, 0)`` is the project's ``K.reshape(T, S*H*W)``; :func:`fold` is its inverse.
* ``mode_product(X, M, i) = X x_i M = fold(M @ unfold(X, i))`` with ``M`` of shape (new, old).
* A Tucker tensor is ``W = C x_1 U_1 x_2 U_2 x_3 U_3 x_4 U_4`` with core ``C`` (r_1, ..., r_d) and factors ``U_i``
  (n_i, r_i) with orthonormal columns. Ranks are *valid Tucker ranks* when ``r_i <= prod_{j != i} r_j`` for every
  mode (otherwise the mode-i unfolding of the core cannot have full row rank).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from sigma_core.decompose._result import TuckerResult, validate_tucker_ranks

__all__ = ["Truncation", "fold", "hosvd", "mode_product", "multi_mode_product", "truncate_tucker",
           "tucker_params", "tucker_to_tensor", "unfold", "validate_tucker_ranks", "TRUNCATION_RULES"]

TRUNCATION_RULES = ("tntorch", "per-mode")
# A mode whose leading singular value is below this is treated as zero (tntorch's special case): rank 1.
_ZERO_SV = 1e-13


def unfold(x: torch.Tensor, mode: int) -> torch.Tensor:
    """Mode-``mode`` unfolding ``Mat_i(X)``, shape ``(n_i, prod_{j != i} n_j)``."""
    return x.movedim(mode, 0).reshape(x.shape[mode], -1)


def fold(matrix: torch.Tensor, mode: int, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`unfold`: ``Ten_i(M)`` of the given full ``shape`` (``shape[mode] == M.shape[0]``)."""
    shape = list(shape)
    rest = [s for k, s in enumerate(shape) if k != mode]
    return matrix.reshape([shape[mode]] + rest).movedim(0, mode)


def mode_product(x: torch.Tensor, matrix: torch.Tensor, mode: int) -> torch.Tensor:
    """``X x_i M`` with ``M`` of shape (new, n_i); the result has ``new`` in place of ``n_i``."""
    shape = list(x.shape)
    shape[mode] = matrix.shape[0]
    return fold(matrix @ unfold(x, mode), mode, shape)


def multi_mode_product(x: torch.Tensor, matrices: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """``X x_1 M_1 x_2 M_2 ...``; a ``None`` entry leaves that mode unchanged."""
    for mode, matrix in enumerate(matrices):
        if matrix is not None:
            x = mode_product(x, matrix, mode)
    return x


def tucker_to_tensor(core: torch.Tensor, factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Dense tensor ``C x_1 U_1 ... x_d U_d``, shape ``(n_1, ..., n_d)``."""
    if len(factors) != core.dim():
        raise ValueError(f"need one factor per core mode ({core.dim()}), got {len(factors)}")
    return multi_mode_product(core, factors)


def tucker_params(shape: Sequence[int], ranks: Sequence[int]) -> int:
    """Parameters of a Tucker tensor, ``prod r_i + sum n_i r_i`` (paper Sec. 2.1; bias not counted)."""
    return math.prod(ranks) + sum(int(n) * int(r) for n, r in zip(shape, ranks))


def _tail_sums(s: torch.Tensor) -> torch.Tensor:
    """``tail[k] = sum_{j >= k} s_j^2`` for k = 0..len(s) (last entry 0)."""
    sq = s.square()
    tail = torch.flip(torch.cumsum(torch.flip(sq, [0]), 0), [0])
    return torch.cat([tail, tail.new_zeros(1)])


@dataclass(frozen=True)
class Truncation:
    """Result of a tolerance truncation of a Tucker core (TDLRT Algorithm 1, lines 10-11).

    Attributes
    ----------
    core : torch.Tensor, shape (r'_1, ..., r'_d)
        Truncated core ``C' = C x_i P_i^T``.
    projections : tuple of torch.Tensor
        ``P_i`` of shape (r_i, r'_i), orthonormal columns (identity-like for untouched modes).
    ranks : tuple of int
        ``(r'_1, ..., r'_d)``, valid Tucker ranks.
    rel_error : float
        ``||C - C' x_i P_i||_F / ||C||_F`` (0 for a zero core).
    tail_sq : tuple of float
        Per mode, the discarded squared singular values at that mode's step (0 for untouched modes).
    budget_sq : tuple of float
        Per mode, the squared error budget ``delta_i^2`` the rule allowed.
    """

    core: torch.Tensor
    projections: tuple[torch.Tensor, ...]
    ranks: tuple[int, ...]
    rel_error: float
    tail_sq: tuple[float, ...]
    budget_sq: tuple[float, ...]


def _mode_budget(rule: str, tol: float, d: int, norm_cur: float, norm_full: float) -> float:
    if rule == "tntorch":
        return (tol / math.sqrt(d) * norm_cur) ** 2
    return (tol * norm_full) ** 2


def _check_rule(rule: str, tol: float, modes: Sequence[int], ndim: int, rmin: int) -> tuple[int, ...]:
    if rule not in TRUNCATION_RULES:
        raise ValueError(f"rule must be one of {TRUNCATION_RULES}, got {rule!r}")
    if not (isinstance(tol, (int, float)) and 0.0 <= tol < 1.0):
        raise ValueError(f"tol (tau) must be a relative tolerance in [0, 1), got {tol!r}")
    modes = tuple(int(m) for m in modes)
    if not modes or len(set(modes)) != len(modes) or not all(0 <= m < ndim for m in modes):
        raise ValueError(f"modes must be distinct mode indices in 0..{ndim - 1}, got {modes!r}")
    if not (isinstance(rmin, int) and rmin >= 1):
        raise ValueError(f"rmin must be an int >= 1, got {rmin!r}")
    return modes


def _make_valid(core: torch.Tensor, projections: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Losslessly shrink modes whose rank exceeds the product of the others (their unfolding is rank-deficient)."""
    changed = True
    while changed:
        changed = False
        for i in range(core.dim()):
            others = math.prod(core.shape[:i] + core.shape[i + 1:])
            if core.shape[i] > others:
                u, _, _ = torch.linalg.svd(unfold(core, i), full_matrices=False)  # u: (r_i, others)
                core = mode_product(core, u.T, i)
                projections[i] = projections[i] @ u
                changed = True
    return core, projections


def truncate_tucker(core: torch.Tensor, tol: float, *, rule: str = "tntorch", modes: Sequence[int] = (0, 1, 2, 3),
                    rmin: int = 1, rmax: Sequence[int] | None = None) -> Truncation:
    """Truncate a Tucker core to relative Frobenius error ``tol`` by sequentially truncated HOSVD.

    Rule ``"tntorch"`` (paper, "as implemented in the tntorch library"): modes are processed from last to first;
    at mode i with current core ``X`` keep the smallest ``k >= rmin`` with
    ``sum_{j >= k} sigma_j(Mat_i X)^2 <= (tol / sqrt(d))^2 ||X||_F^2`` (d = number of truncated modes), so that
    ``||C - C' x_i P_i||_F <= tol ||C||_F``. Rule ``"per-mode"`` uses the budget ``(tol ||C||_F)^2`` at every mode
    (total bound ``sqrt(d) tol ||C||_F``; RobustDLRT-like). Ranks that end up invalid (``r_i`` above the product of
    the others, possible after later modes shrink) are reduced without loss.

    Parameters
    ----------
    core : torch.Tensor, shape (r_1, ..., r_d)
    tol : float
        Relative tolerance tau in [0, 1).
    rule : {"tntorch", "per-mode"}
    modes : sequence of int
        Modes to truncate (paper: all four; RobustDLRT: (0, 1)).
    rmin : int
        Smallest rank kept per truncated mode (clamped to the mode size).
    rmax : sequence of int, optional
        Largest rank per mode (full length d).

    Returns
    -------
    Truncation
    """
    modes = _check_rule(rule, tol, modes, core.dim(), rmin)
    d = len(modes)
    norm_full = float(torch.linalg.norm(core))
    x = core
    projections = [torch.eye(n, dtype=core.dtype, device=core.device) for n in core.shape]
    tails = [0.0] * core.dim()
    budgets = [0.0] * core.dim()
    for i in sorted(modes, reverse=True):
        u, s, _ = torch.linalg.svd(unfold(x, i), full_matrices=False)
        norm_cur = float(torch.linalg.norm(x))
        budget = _mode_budget(rule, tol, d, norm_cur, norm_full)
        tail = _tail_sums(s)
        if s.numel() == 0 or float(s[0]) < _ZERO_SV:
            k = 1
        else:
            ok = torch.nonzero(tail <= budget)
            k = int(ok[0]) if len(ok) else s.numel()
        cap = s.numel() if rmax is None else min(s.numel(), int(rmax[i]))
        k = max(min(k, cap), min(rmin, s.numel()), 1)
        tails[i] = float(tail[k])
        budgets[i] = budget
        projections[i] = u[:, :k]
        x = mode_product(x, u[:, :k].T, i)
    x, projections = _make_valid(x, projections)
    if norm_full > 0:
        rel = float(torch.linalg.norm(tucker_to_tensor(x, projections) - core)) / norm_full
    else:
        rel = 0.0
    return Truncation(core=x, projections=tuple(projections), ranks=tuple(int(n) for n in x.shape), rel_error=rel,
                      tail_sq=tuple(tails), budget_sq=tuple(budgets))


def hosvd(kernel: torch.Tensor, *, ranks: Sequence[int] | None = None, tol: float | None = None,
          rule: str = "tntorch", rmin: int = 1) -> TuckerResult:
    """Tucker decomposition of a 4-D kernel by (truncated) HOSVD (De Lathauwer et al. 2000).

    Exactly one of ``ranks`` (truncated HOSVD: leading left singular vectors of each unfolding of the kernel,
    core ``K x_i U_i^T``) or ``tol`` (full HOSVD, then :func:`truncate_tucker` of the core) must be given.

    Parameters
    ----------
    kernel : torch.Tensor, shape (T, S, H, W)
    ranks : sequence of 4 int, optional
        Valid Tucker ranks.
    tol : float, optional
        Relative Frobenius tolerance in [0, 1).
    rule, rmin
        As in :func:`truncate_tucker` (``tol`` only).

    Returns
    -------
    TuckerResult
        ``method="tucker-hosvd"``, ``metric="rel_frob_err"``, ``errors=(relative error,)``.
    """
    if kernel.dim() != 4 or not kernel.is_floating_point():
        raise ValueError(f"kernel must be a 4-D floating-point tensor (T, S, H, W), got shape "
                         f"{tuple(kernel.shape)} dtype {kernel.dtype}")
    if (ranks is None) == (tol is None):
        raise ValueError("give exactly one of ranks=(r_T, r_S, r_H, r_W) or tol=tau")
    shape = tuple(kernel.shape)
    if ranks is not None:
        ranks = validate_tucker_ranks(tuple(ranks), shape)
        factors = [torch.linalg.svd(unfold(kernel, i), full_matrices=False)[0][:, :r] for i, r in enumerate(ranks)]
    else:
        full = [torch.linalg.svd(unfold(kernel, i), full_matrices=False)[0] for i in range(4)]
        core0 = multi_mode_product(kernel, [u.T for u in full])
        trunc = truncate_tucker(core0, tol, rule=rule, rmin=rmin)
        factors = [u @ p for u, p in zip(full, trunc.projections)]
    core = multi_mode_product(kernel, [u.T for u in factors])
    norm = float(torch.linalg.norm(kernel))
    err = float(torch.linalg.norm(tucker_to_tensor(core, factors) - kernel)) / norm if norm > 0 else 0.0
    return TuckerResult(core=core, u_t=factors[0], u_s=factors[1], u_h=factors[2], u_w=factors[3],
                        ranks=tuple(int(n) for n in core.shape), errors=(err,), converged=True,
                        method="tucker-hosvd", metric="rel_frob_err", info={"tol": tol, "rule": rule})

"""Rank selection: analytic EVBMF on kernel unfoldings and the paper's alpha rule (Eq. 2).

The VBMF rank of a Tucker-2 mode is the rank that the empirical variational Bayesian matrix
factorization (EVBMF, Nakajima, Sugiyama, Babacan & Tomioka 2013, "Global analytic solution of
fully-observed variational Bayesian matrix factorization", JMLR 14) retains on the mode unfolding,
as in Kim et al. 2016 and Astrid et al. 2018. The paper then interpolates between that rank and the
full rank with the "VBMF ratio" alpha (Eq. 2):

    R_alpha = R_VBMF + (1 - alpha) (R_max - R_VBMF),

with R_max = T (or S) for Tucker-2 and R_max = T S H W / max(T, S, H, W) for CP.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from scipy.optimize import minimize_scalar

__all__ = [
    "EVBMFResult",
    "evbmf",
    "tucker2_vbmf_ranks",
    "alpha_rank",
    "cp_max_rank",
    "tucker2_ranks_alpha",
    "ranks_from_fraction",
    "validate_tucker2_ranks",
    "RankRule",
    "cp_vbmf_rank",
    "cp_rank_alpha",
    "cp_rank_from_fraction",
    "validate_cp_rank",
    "svd_rank_alpha",
    "svd_rank_from_fraction",
    "validate_svd_rank",
]

# Constant of the EVB threshold (Nakajima et al. 2013, Theorem 2): tau_ubar = 2.5129 sqrt(alpha) is the
# root of Psi(tau) = log(tau + 1) + alpha log(tau / alpha + 1) - tau for the largest alpha-scaled tau.
_TAU_UBAR_COEF = 2.5129
# Points of the coarse log-spaced scan of the noise objective before the bounded Brent refinement.
_SIGMA2_GRID = 64


# ----------------------------------------------------------------------------------------------------------
# EVBMF
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EVBMFResult:
    """Outcome of analytic EVBMF on one matrix.

    Attributes
    ----------
    rank : int
        Number of retained components (singular values above the EVB threshold); may be 0.
    sigma2 : float
        Noise variance (estimated, or the one given to :func:`evbmf`).
    threshold : float
        EVB truncation threshold ``sqrt(M sigma2 (1 + tau_ubar)(1 + a / tau_ubar))`` on the
        singular values (``a = L / M``, ``L <= M``).
    singular_values : tuple of float
        The ``rank`` retained observed singular values ``gamma_h``, descending.
    shrunk_singular_values : tuple of float
        Their EVB posterior estimates ``gamma_h^EVB`` (Nakajima et al. 2013, Eq. 15), descending.
    shape : tuple of int
        ``(L, M)`` of the matrix as analysed, after transposing to ``L <= M``.
    """

    rank: int
    sigma2: float
    threshold: float
    singular_values: tuple[float, ...]
    shrunk_singular_values: tuple[float, ...]
    shape: tuple[int, int]


def evbmf(y: torch.Tensor | np.ndarray, sigma2: float | None = None, max_rank: int | None = None) -> EVBMFResult:
    """Analytic empirical VB matrix factorization of ``y`` (Nakajima et al. 2013).

    Parameters
    ----------
    y : torch.Tensor or numpy.ndarray, shape (L, M)
        Observed matrix; it is transposed internally so that ``L <= M`` (the solution is symmetric).
        Computation is in float64.
    sigma2 : float, optional
        Known noise variance. When omitted it is estimated by minimizing the 1-D objective
        ``Omega(sigma2)`` of the paper over its bounded interval ``[sigma2_lower, sigma2_upper]``.
    max_rank : int, optional
        Upper bound ``H`` on the rank of the factorization (default ``min(L, M)``).

    Returns
    -------
    EVBMFResult
        Retained rank, noise variance, threshold and retained singular values.

    Notes
    -----
    Follows the public implementation (Nakajima's MATLAB code and its Python port used by Kim et al.
    2016): transposition to ``L <= M``, ``tau_ubar = 2.5129 sqrt(L/M)``, the threshold ``xubar`` and the
    bounds of the noise variance. Two numerical differences, neither of which changes the objective:
    the search runs over ``log(sigma2)`` (a coarse scan, then bounded Brent around the best point), because
    a bounded search in ``sigma2`` with an absolute tolerance cannot resolve small noise variances and can
    stop in a local minimum of this non-convex objective; and the ``-log(gamma_h^2)`` constants are dropped,
    so exactly zero singular values are allowed.
    """
    mat = _as_float64_matrix(y)
    if mat.shape[0] > mat.shape[1]:
        mat = mat.T
    n_rows, n_cols = mat.shape
    h_max = _check_max_rank(max_rank, n_rows)
    svals = np.linalg.svd(mat, compute_uv=False)
    total = float(np.sum(svals**2))
    x_ubar = _x_ubar(n_rows / n_cols)
    if sigma2 is None:
        if total == 0.0:
            return EVBMFResult(0, 0.0, 0.0, (), (), (n_rows, n_cols))
        sigma2 = _estimate_sigma2(svals, total, h_max, n_rows, n_cols, x_ubar)
    elif not (isinstance(sigma2, numbers.Real) and math.isfinite(sigma2) and sigma2 > 0):
        raise ValueError(f"sigma2 must be a positive finite number or None (to estimate it), got {sigma2!r}")
    sigma2 = float(sigma2)
    threshold = math.sqrt(n_cols * sigma2 * x_ubar)
    kept = svals[:h_max][svals[:h_max] > threshold]
    shrunk = _evb_shrinkage(kept, sigma2, n_rows, n_cols)
    return EVBMFResult(
        rank=int(kept.size),
        sigma2=sigma2,
        threshold=threshold,
        singular_values=tuple(float(v) for v in kept),
        shrunk_singular_values=tuple(float(v) for v in shrunk),
        shape=(n_rows, n_cols),
    )


def _as_float64_matrix(y: torch.Tensor | np.ndarray) -> np.ndarray:
    mat = y.detach().to("cpu", torch.float64).numpy() if isinstance(y, torch.Tensor) else np.asarray(y, np.float64)
    if mat.ndim != 2 or mat.size == 0:
        raise ValueError(f"EVBMF needs a non-empty 2-D matrix, got shape {tuple(mat.shape)}")
    if not np.all(np.isfinite(mat)):
        raise ValueError("EVBMF input contains NaN or Inf; check the kernel / matrix passed in")
    return mat


def _check_max_rank(max_rank: int | None, n_rows: int) -> int:
    if max_rank is None:
        return n_rows
    if isinstance(max_rank, bool) or not isinstance(max_rank, numbers.Integral) or max_rank < 1:
        raise ValueError(f"max_rank must be a positive int or None, got {max_rank!r}")
    return min(int(max_rank), n_rows)


def _x_ubar(ratio: float) -> float:
    tau_ubar = _TAU_UBAR_COEF * math.sqrt(ratio)
    return (1.0 + tau_ubar) * (1.0 + ratio / tau_ubar)


def _tau(x: np.ndarray, ratio: float) -> np.ndarray:
    """Solution ``tau(x; a)`` of Nakajima et al. 2013 (Eq. 18), defined for ``x >= (1 + sqrt(a))^2``."""
    shifted = x - (1.0 + ratio)
    return 0.5 * (shifted + np.sqrt(np.maximum(shifted**2 - 4.0 * ratio, 0.0)))


def _sigma2_bounds(svals: np.ndarray, total: float, h_max: int, n_rows: int, n_cols: int,
                   x_ubar: float) -> tuple[float, float]:
    """Interval that contains the EVB noise variance (Nakajima et al. 2013, Theorem 4)."""
    ratio = n_rows / n_cols
    # xi_H = min(ceil(L / (1 + a)) - 1, H) components at most can be retained; the rest bound sigma2 below.
    xi = min(math.ceil(n_rows / (1.0 + ratio)) - 1, h_max)
    tail = svals[xi:]
    upper = total / (n_rows * n_cols)
    lower = max(tail[0] ** 2 / (n_cols * x_ubar), float(np.mean(tail**2)) / n_cols) if tail.size else 0.0
    # An exactly low-rank input has a zero tail; any tiny positive variance then separates signal from noise.
    lower = max(lower, upper * 1e-14)
    return lower, upper


def _evb_objective(log_sigma2: float, svals_h: np.ndarray, total: float, n_rows: int, n_cols: int,
                   x_ubar: float) -> float:
    """``L * Omega(sigma2)`` up to an additive constant, as a function of ``log(sigma2)``.

    Omega = (1/L) [sum_{h<=H} psi(gamma_h^2 / (M sigma2)) + sum_{h>H} psi_0(gamma_h^2 / (M sigma2))]
    with psi_0(x) = x - log x and psi = psi_0 + [x > xubar] psi_1, psi_1(x) = log(tau + 1) + a log(tau/a + 1) - tau.
    Summing psi_0 over all L values gives total / (M sigma2) + L log(sigma2) + const.
    """
    sigma2 = math.exp(log_sigma2)
    ratio = n_rows / n_cols
    x = svals_h**2 / (n_cols * sigma2)
    big = x[x > x_ubar]
    tau = _tau(big, ratio)
    psi1 = np.log1p(tau) + ratio * np.log1p(tau / ratio) - tau
    return total / (n_cols * sigma2) + n_rows * log_sigma2 + float(np.sum(psi1))


def _estimate_sigma2(svals: np.ndarray, total: float, h_max: int, n_rows: int, n_cols: int,
                     x_ubar: float) -> float:
    lower, upper = _sigma2_bounds(svals, total, h_max, n_rows, n_cols, x_ubar)
    if lower >= upper:
        return upper
    args = (svals[:h_max], total, n_rows, n_cols, x_ubar)
    grid = np.linspace(math.log(lower), math.log(upper), _SIGMA2_GRID)
    values = [_evb_objective(t, *args) for t in grid]
    best = int(np.argmin(values))
    lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, grid.size - 1)]
    res = minimize_scalar(_evb_objective, bounds=(lo, hi), args=args, method="bounded",
                          options={"xatol": 1e-10})
    log_sigma2 = float(res.x) if res.fun <= values[best] else float(grid[best])
    return math.exp(log_sigma2)


def _evb_shrinkage(gamma: np.ndarray, sigma2: float, n_rows: int, n_cols: int) -> np.ndarray:
    """EVB estimator of the retained singular values (Nakajima et al. 2013, Eq. 15)."""
    if gamma.size == 0:
        return gamma
    ratio_term = 1.0 - (n_rows + n_cols) * sigma2 / gamma**2
    disc = np.maximum(ratio_term**2 - 4.0 * n_rows * n_cols * sigma2**2 / gamma**4, 0.0)
    return 0.5 * gamma * (ratio_term + np.sqrt(disc))


# ----------------------------------------------------------------------------------------------------------
# Tucker-2 ranks
# ----------------------------------------------------------------------------------------------------------


def _as_kernel(kernel: torch.Tensor | np.ndarray) -> np.ndarray:
    arr = kernel.detach().to("cpu", torch.float64).numpy() if isinstance(kernel, torch.Tensor) \
        else np.asarray(kernel, np.float64)
    if arr.ndim != 4:
        raise ValueError(f"expected a conv kernel of shape (T, S, H, W), got shape {tuple(arr.shape)}")
    return arr


def _check_kernel_shape(kernel_shape: Sequence[int], name: str = "kernel_shape") -> tuple[int, int, int, int]:
    dims = tuple(kernel_shape)
    if len(dims) != 4 or not all(_is_int(d) and d >= 1 for d in dims):
        raise ValueError(f"{name} must be 4 positive ints (T, S, H, W), got {kernel_shape!r}")
    return tuple(int(d) for d in dims)  # type: ignore[return-value]


def _unfolding_rank(arr: np.ndarray, mode: int) -> int:
    """EVBMF rank of the mode-``mode`` unfolding (``dim_mode x rest``) of a (T, S, H, W) kernel ``arr``."""
    return evbmf(np.moveaxis(arr, mode, 0).reshape(arr.shape[mode], -1)).rank


def tucker2_vbmf_ranks(kernel: torch.Tensor | np.ndarray) -> tuple[int, int]:
    """EVBMF ranks of the two channel unfoldings of a conv kernel.

    Parameters
    ----------
    kernel : torch.Tensor or numpy.ndarray, shape (T, S, H, W)
        Conv kernel in PyTorch layout.

    Returns
    -------
    tuple of int
        ``(R_T_vbmf, R_S_vbmf)``: EVBMF ranks of the unfoldings ``T x (S H W)`` and ``S x (T H W)``
        (paper Sec. 3.2). Either may be 0 when the unfolding looks like pure noise.
    """
    arr = _as_kernel(kernel)
    return _unfolding_rank(arr, 0), _unfolding_rank(arr, 1)


def _check_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha (the VBMF ratio of Eq. 2) must be a number in [0, 1] "
                         f"(1 = VBMF rank, 0 = full rank), got {alpha!r}")
    return float(alpha)


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _round_half_up(value: float) -> int:
    return int(math.floor(value + 0.5))


def _clamp_rank(value: float, r_max: int) -> int:
    """``value`` rounded (halves up) into ``[1, r_max]``: a rank-0 factor would remove the layer."""
    return min(max(_round_half_up(value), 1), int(r_max))


def _positive_int(value: object, label: str) -> int:
    """``value`` as a plain int >= 1 (numpy ints accepted, bools rejected)."""
    rank = int(value) if isinstance(value, np.integer) else value
    if not _is_int(rank) or rank < 1:  # type: ignore[operator]
        raise ValueError(f"{label} must be an int >= 1, got {rank!r}")
    return int(rank)  # type: ignore[arg-type]


def _alpha_rule(alpha: float, r_max: int, vbmf_rank: Callable[[], int]) -> int:
    """Eq. 2 for one rank with bound ``r_max``; ``vbmf_rank`` (SVDs) runs only when alpha > 0.

    The VBMF rank is capped at ``r_max``, the range :func:`alpha_rank` accepts.
    """
    if alpha == 0.0:
        return r_max  # Eq. 2 gives R_max whatever VBMF says; skip the SVDs
    return alpha_rank(min(vbmf_rank(), r_max), r_max, alpha)


def _fraction_rank(fraction: float, r_max: int) -> int:
    """``round(fraction * r_max)`` (halves up) in ``[1, r_max]``, ``fraction`` checked to lie in ``(0, 1]``."""
    return _clamp_rank(_check_fraction(fraction) * r_max, r_max)


def alpha_rank(r_vbmf: int, r_max: int, alpha: float) -> int:
    """Interpolated rank of the paper's Eq. 2.

    Parameters
    ----------
    r_vbmf : int
        VBMF rank, ``0 <= r_vbmf <= r_max``.
    r_max : int
        Full rank (``T`` or ``S`` for Tucker-2, :func:`cp_max_rank` for CP), ``>= 1``.
    alpha : float
        VBMF ratio in ``[0, 1]``: 1 gives the VBMF rank, 0 the full rank.

    Returns
    -------
    int
        ``round(R_vbmf + (1 - alpha)(R_max - R_vbmf))`` (halves round up), clamped to ``[1, r_max]``.
    """
    alpha = _check_alpha(alpha)
    if not _is_int(r_max) or r_max < 1:
        raise ValueError(f"r_max must be an int >= 1, got {r_max!r}")
    if not _is_int(r_vbmf) or not 0 <= r_vbmf <= r_max:
        raise ValueError(f"r_vbmf must be an int in [0, r_max={r_max}], got {r_vbmf!r}")
    return _clamp_rank(r_vbmf + (1.0 - alpha) * (r_max - r_vbmf), r_max)


def cp_max_rank(shape: Sequence[int]) -> int:
    """CP rank bound ``R_max = T S H W / max(T, S, H, W)`` (paper Sec. 3.1), for a (T, S, H, W) kernel shape."""
    dims = _check_kernel_shape(shape, "shape")
    return math.prod(dims) // max(dims)


def tucker2_ranks_alpha(kernel: torch.Tensor | np.ndarray, alpha: float) -> tuple[int, int]:
    """Tucker-2 ranks ``(R_T, R_S)`` from EVBMF and the alpha rule (paper Eq. 2, ``R_max`` = T or S).

    Parameters
    ----------
    kernel : torch.Tensor or numpy.ndarray, shape (T, S, H, W)
        Conv kernel.
    alpha : float
        VBMF ratio in ``[0, 1]``.

    Returns
    -------
    tuple of int
        ``(R_T, R_S)`` with ``1 <= R_T <= T`` and ``1 <= R_S <= S``.
    """
    alpha = _check_alpha(alpha)
    arr = _as_kernel(kernel)
    t, s = arr.shape[:2]
    r_t = _alpha_rule(alpha, t, lambda: _unfolding_rank(arr, 0))
    return r_t, _alpha_rule(alpha, s, lambda: _unfolding_rank(arr, 1))


def _check_fraction(fraction: float) -> float:
    if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) or not 0.0 < float(fraction) <= 1.0:
        raise ValueError(f"fraction must be a number in (0, 1] (share of T and of S kept), got {fraction!r}")
    return float(fraction)


def ranks_from_fraction(kernel_shape: Sequence[int], fraction: float) -> tuple[int, int]:
    """Tucker-2 ranks as a fixed fraction of the channel counts.

    Parameters
    ----------
    kernel_shape : sequence of int
        ``(T, S, H, W)``.
    fraction : float
        Share in ``(0, 1]`` of ``T`` and of ``S`` to keep.

    Returns
    -------
    tuple of int
        ``(round(fraction T), round(fraction S))`` (halves round up), each at least 1.
    """
    t, s, _, _ = _check_kernel_shape(kernel_shape)
    return _fraction_rank(fraction, t), _fraction_rank(fraction, s)


def validate_tucker2_ranks(kernel_shape: Sequence[int], ranks: Sequence[int]) -> tuple[int, int]:
    """Check Tucker-2 ranks against a kernel shape.

    Parameters
    ----------
    kernel_shape : sequence of int
        ``(T, S, H, W)``.
    ranks : sequence of int
        ``(R_T, R_S)``.

    Returns
    -------
    tuple of int
        ``(R_T, R_S)`` as plain ints.

    Raises
    ------
    ValueError
        If ``ranks`` is not two ints, or ``R_T`` is outside ``[1, T]`` or ``R_S`` outside ``[1, S]``.
    """
    t, s, _, _ = _check_kernel_shape(kernel_shape)
    r_t, r_s = _check_rank_pair(ranks)
    if r_t > t:
        raise ValueError(f"R_T={r_t} exceeds T={t} output channels of kernel {tuple(kernel_shape)}; use R_T <= {t}")
    if r_s > s:
        raise ValueError(f"R_S={r_s} exceeds S={s} input channels of kernel {tuple(kernel_shape)}; use R_S <= {s}")
    return r_t, r_s


def _check_rank_pair(ranks: Sequence[int]) -> tuple[int, int]:
    if isinstance(ranks, np.ndarray):
        ranks = ranks.tolist()
    if isinstance(ranks, (str, bytes)) or not isinstance(ranks, Sequence) or len(ranks) != 2:
        raise ValueError(f"Tucker-2 ranks must be a pair (R_T, R_S), got {ranks!r}")
    for label, r in zip(("R_T", "R_S"), ranks):
        if not _is_int(r):
            raise ValueError(f"{label} must be an int, got {r!r} ({type(r).__name__}); ranks={tuple(ranks)!r}")
        if r < 1:
            raise ValueError(f"{label} must be >= 1, got {r}; a rank-0 factor would remove the layer")
    return int(ranks[0]), int(ranks[1])


# ----------------------------------------------------------------------------------------------------------
# CP ranks
# ----------------------------------------------------------------------------------------------------------


def cp_vbmf_rank(kernel: torch.Tensor | np.ndarray) -> int:
    """EVBMF rank of a CP decomposition: the maximum over the four mode unfoldings (paper Sec. 4.3).

    As in Astrid et al. 2018: EVBMF is applied to each unfolding ``T x SHW``, ``S x THW``, ``H x TSW`` and
    ``W x TSH`` of the kernel and the largest retained rank is ``R_VBMF``.

    Parameters
    ----------
    kernel : torch.Tensor or numpy.ndarray, shape (T, S, H, W)
        Conv kernel in PyTorch layout (analysed in float64).

    Returns
    -------
    int
        ``R_VBMF`` in ``[0, max(T, S, H, W)]`` (0 when every unfolding looks like pure noise); the spatial
        unfoldings have at most H or W rows, so for 3x3 convs the channel modes decide.
    """
    arr = _as_kernel(kernel)
    return max(_unfolding_rank(arr, mode) for mode in range(4))


def cp_rank_alpha(kernel: torch.Tensor | np.ndarray, alpha: float) -> int:
    """CP rank from EVBMF and the alpha rule (paper Eq. 2 with ``R_max = TSHW / max(T, S, H, W)``).

    Parameters
    ----------
    kernel : torch.Tensor or numpy.ndarray, shape (T, S, H, W)
        Conv kernel.
    alpha : float
        VBMF ratio in ``[0, 1]`` (1 = ``R_VBMF``, 0 = ``R_max``).

    Returns
    -------
    int
        ``R_alpha`` with ``1 <= R_alpha <= cp_max_rank(kernel.shape)``.
    """
    alpha = _check_alpha(alpha)
    arr = _as_kernel(kernel)
    return _alpha_rule(alpha, cp_max_rank(arr.shape), lambda: cp_vbmf_rank(arr))


def cp_rank_from_fraction(kernel_shape: Sequence[int], fraction: float) -> int:
    """CP rank as a fixed fraction of :func:`cp_max_rank`.

    Parameters
    ----------
    kernel_shape : sequence of int
        ``(T, S, H, W)``.
    fraction : float
        Share in ``(0, 1]`` of ``R_max``.

    Returns
    -------
    int
        ``round(fraction R_max)`` (halves round up), clamped to ``[1, R_max]``.
    """
    return _fraction_rank(fraction, cp_max_rank(_check_kernel_shape(kernel_shape)))


def validate_cp_rank(kernel_shape: Sequence[int], rank: int) -> int:
    """Check a CP rank against a kernel shape.

    Ranks above ``R_max = TSHW / max(T, S, H, W)`` are rejected: every kernel has an exact CP decomposition
    with ``R_max`` terms (one per index of all modes but the largest), so a larger rank only adds
    parameters and makes the ALS systems singular.

    Parameters
    ----------
    kernel_shape : sequence of int
        ``(T, S, H, W)``.
    rank : int
        ``R``.

    Returns
    -------
    int
        ``R`` as a plain int.

    Raises
    ------
    ValueError
        If ``rank`` is not an int or lies outside ``[1, R_max]``.
    """
    shape = _check_kernel_shape(kernel_shape)
    if isinstance(rank, np.integer):
        rank = int(rank)
    if not _is_int(rank):
        raise ValueError(f"CP rank must be an int, got {rank!r} ({type(rank).__name__})")
    if rank < 1:
        raise ValueError(f"CP rank must be >= 1, got {rank}; a rank-0 decomposition would remove the layer")
    r_max = cp_max_rank(shape)
    if rank > r_max:
        raise ValueError(f"CP rank {rank} exceeds R_max = TSHW / max(T, S, H, W) = {r_max} for kernel {shape}: "
                         f"an exact CP decomposition with {r_max} terms exists; use a rank <= {r_max}")
    return int(rank)


# ----------------------------------------------------------------------------------------------------------
# SVD ranks (linear layers and 1x1 convs, paper App. E)
# ----------------------------------------------------------------------------------------------------------


def _check_matrix_shape(shape: Sequence[int]) -> tuple[int, int]:
    dims = tuple(shape)
    if len(dims) == 4 and dims[2:] == (1, 1):
        dims = dims[:2]
    if len(dims) != 2 or not all(_is_int(d) and d >= 1 for d in dims):
        raise ValueError(f"SVD ranks need a matrix shape (out, in) or a 1x1 conv kernel shape (T, S, 1, 1), "
                         f"got {shape!r}; use Tucker-2 or CP ranks for larger kernels")
    return int(dims[0]), int(dims[1])


def validate_svd_rank(shape: Sequence[int], rank: int) -> int:
    """Check an SVD rank against a weight shape (out, in) or (T, S, 1, 1): ``1 <= rank <= min(out, in)``."""
    out_f, in_f = _check_matrix_shape(shape)
    rank = _positive_int(rank, "SVD rank")
    if rank > min(out_f, in_f):
        raise ValueError(f"SVD rank {rank} exceeds min(out, in) = {min(out_f, in_f)} of the weight {tuple(shape)}; "
                         f"use a rank <= {min(out_f, in_f)}")
    return rank


def svd_rank_alpha(weight: torch.Tensor | np.ndarray, alpha: float) -> int:
    """SVD rank from EVBMF on the weight matrix and the alpha rule (paper Eq. 2, ``R_max = min(out, in)``).

    Parameters
    ----------
    weight : torch.Tensor or numpy.ndarray, shape (out, in) or (T, S, 1, 1)
    alpha : float
        VBMF ratio in ``[0, 1]`` (1 = EVBMF rank, 0 = full rank).

    Returns
    -------
    int
        Rank in ``[1, min(out, in)]``.
    """
    alpha = _check_alpha(alpha)
    out_f, in_f = _check_matrix_shape(tuple(weight.shape))
    return _alpha_rule(alpha, min(out_f, in_f), lambda: evbmf(weight.reshape(out_f, in_f)).rank)


def svd_rank_from_fraction(shape: Sequence[int], fraction: float) -> int:
    """SVD rank ``round(fraction * min(out, in))`` (halves round up), clamped to ``[1, min(out, in)]``."""
    out_f, in_f = _check_matrix_shape(shape)
    return _fraction_rank(fraction, min(out_f, in_f))


# ----------------------------------------------------------------------------------------------------------
# Rank rule
# ----------------------------------------------------------------------------------------------------------


# What each fixed-rank field of a RankRule holds, and what a method of that field's family accepts, for the error
# raised when a method of one family is handed a fixed rank of another.
_FIXED_RANK_KIND = {"ranks": "holds Tucker-2 ranks (R_T, R_S)", "cp_rank": "is a CP rank", "svd_rank": "is an SVD rank"}
_FAMILY_NEEDS = {
    "ranks": "a Tucker-2 method needs RankRule(ranks=(R_T, R_S)), alpha or fraction",
    "cp_rank": "a CP method needs RankRule(cp_rank=R), alpha or fraction",
    "svd_rank": "an SVD method needs RankRule(svd_rank=r), alpha or fraction",
}


@dataclass(frozen=True)
class RankRule:
    """How to choose a layer's ranks (Tucker-2 pair or CP rank); exactly one field is set.

    Attributes
    ----------
    alpha : float, optional
        VBMF ratio of Eq. 2 in ``[0, 1]`` (EVBMF on the unfoldings, then interpolation to full rank).
    ranks : tuple of int, optional
        Fixed Tucker-2 ``(R_T, R_S)``, each ``>= 1``; checked against the kernel in :meth:`resolve`.
    fraction : float, optional
        Share in ``(0, 1]`` of ``T`` and of ``S`` (see :func:`ranks_from_fraction`), or of ``R_max`` for CP
        (see :func:`cp_rank_from_fraction`).
    cp_rank : int, optional
        Fixed CP rank ``R >= 1``; checked against the kernel in :meth:`resolve_cp`. A separate field (not a
        1-tuple ``ranks``) so that a Tucker-2 pair and a CP rank can never be confused.
    svd_rank : int, optional
        Fixed SVD rank ``r >= 1`` of a linear layer / 1x1 conv (App. E); checked in :meth:`resolve_svd`.
    target : sigma_core.allocate.RankTarget, optional
        A model-level size target (CR, parameters or MAC reduction): the ranks come from budgeted allocation over
        all layers together (``pipeline.allocation``), so a single layer cannot resolve it.

    Notes
    -----
    :meth:`resolve` serves the Tucker-2 methods, :meth:`resolve_cp` the CP methods. Asking a rule made for
    one family (``ranks`` or ``cp_rank``) to resolve the other raises ``ValueError``; ``alpha`` and
    ``fraction`` serve both.
    """

    alpha: float | None = None
    ranks: tuple[int, int] | None = None
    fraction: float | None = None
    cp_rank: int | None = None
    svd_rank: int | None = None
    target: Any = None

    def __post_init__(self) -> None:
        fields = ("alpha", "ranks", "fraction", "cp_rank", "svd_rank", "target")
        given = [name for name in fields if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"RankRule needs exactly one of alpha, ranks, fraction, cp_rank, svd_rank, target; got "
                             f"{given or 'none'}")
        if self.target is not None:
            from sigma_core.allocate import RankTarget

            if not isinstance(self.target, RankTarget):
                raise ValueError(f"target must be a sigma_core.allocate.RankTarget, got {type(self.target).__name__}")
        if self.alpha is not None:
            object.__setattr__(self, "alpha", _check_alpha(self.alpha))
        if self.ranks is not None:
            if isinstance(self.ranks, Sequence) and len(self.ranks) == 1:
                raise ValueError(f"Tucker-2 ranks must be a pair (R_T, R_S), got {tuple(self.ranks)!r}; for a CP "
                                 f"rank use RankRule(cp_rank={self.ranks[0]!r})")
            object.__setattr__(self, "ranks", _check_rank_pair(self.ranks))
        if self.fraction is not None:
            object.__setattr__(self, "fraction", _check_fraction(self.fraction))
        for name in ("cp_rank", "svd_rank"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, _positive_int(getattr(self, name), name))

    def resolve(self, kernel: torch.Tensor | np.ndarray) -> tuple[int, int]:
        """Tucker-2 ranks ``(R_T, R_S)`` for a conv kernel of shape (T, S, H, W).

        ``alpha``: :func:`tucker2_ranks_alpha`; ``ranks``: checked by :func:`validate_tucker2_ranks`; ``fraction``:
        :func:`ranks_from_fraction`. ``cp_rank`` and ``svd_rank`` raise ``ValueError``.
        """
        return self._resolve(kernel, "ranks", tucker2_ranks_alpha, validate_tucker2_ranks, ranks_from_fraction)

    def resolve_cp(self, kernel: torch.Tensor | np.ndarray) -> int:
        """CP rank ``R`` for a conv kernel of shape (T, S, H, W).

        ``alpha``: :func:`cp_rank_alpha`; ``cp_rank``: checked by :func:`validate_cp_rank`; ``fraction``:
        :func:`cp_rank_from_fraction`. Tucker-2 ``ranks`` and ``svd_rank`` raise ``ValueError``.
        """
        return self._resolve(kernel, "cp_rank", cp_rank_alpha, validate_cp_rank, cp_rank_from_fraction)

    def resolve_svd(self, weight: torch.Tensor | np.ndarray) -> int:
        """SVD rank ``r`` of a linear weight (out, in) or 1x1 conv kernel (T, S, 1, 1) (paper App. E).

        ``alpha``: :func:`svd_rank_alpha` (EVBMF on the matrix, ``R_max = min(out, in)``); ``svd_rank``: checked by
        :func:`validate_svd_rank`; ``fraction``: :func:`svd_rank_from_fraction`. Tucker-2 ``ranks`` and
        ``cp_rank`` raise ``ValueError``.
        """
        return self._resolve(weight, "svd_rank", svd_rank_alpha, validate_svd_rank, svd_rank_from_fraction)

    def _resolve(self, tensor: torch.Tensor | np.ndarray, family: str, by_alpha: Callable, validate: Callable,
                 by_fraction: Callable) -> Any:
        """Dispatch on the set field for the rank family whose fixed-rank field is ``family``.

        ``by_alpha(tensor, alpha)``, ``validate(shape, fixed)`` and ``by_fraction(shape, fraction)`` are that
        family's rank functions; a fixed rank of another family raises ``ValueError``.
        """
        self._reject_other_families(family)
        if self.target is not None:
            raise ValueError(f"RankRule({self.target.describe()}) is a model-level budget: one layer cannot resolve it; "
                             "allocate the ranks of all layers first (pipeline.allocation.allocate_ranks)")
        if self.alpha is not None:
            return by_alpha(tensor, self.alpha)
        shape = tuple(tensor.shape)
        fixed = getattr(self, family)
        return by_fraction(shape, self.fraction) if fixed is None else validate(shape, fixed)

    def _reject_other_families(self, family: str) -> None:
        for field, held in _FIXED_RANK_KIND.items():
            value = getattr(self, field)
            if field != family and value is not None:
                # SVD methods have always named every foreign fixed rank alike; callers match on that wording.
                what = "is not an SVD rank" if family == "svd_rank" else held
                raise ValueError(f"RankRule({field}={value}) {what}; {_FAMILY_NEEDS[family]}")

    def describe(self) -> str:
        """One-line human-readable description, e.g. ``"alpha=0.5 (VBMF rule, Eq. 2)"``."""
        if self.alpha is not None:
            return f"alpha={self.alpha:g} (VBMF rule, Eq. 2)"
        if self.ranks is not None:
            return f"fixed ranks (R_T, R_S)={self.ranks}"
        if self.cp_rank is not None:
            return f"fixed CP rank R={self.cp_rank}"
        if self.svd_rank is not None:
            return f"fixed SVD rank r={self.svd_rank}"
        if self.target is not None:
            return self.target.describe()
        return f"fraction={self.fraction:g} of T and S"

"""TT-SVD of a conv kernel (RENE's TT-conv, Aghababaei-Harandi & Amini 2024, Eq. 1 and Eq. 3).

The paper views a kernel ``W (T, S, H, W)`` as the 3-way tensor ``T~[t, p, s] = W[t, s, h, w]`` (``p = h W + w``)
and factorizes it as a 3-core tensor train ``G_t (T, R1) . G_y (R1, H, W, R2) . G_s (R2, S)`` by two truncated
SVDs. That train is exactly a Tucker-2 decomposition with core ``G_y`` (RENE spec Sec. 2.1): the first SVD is the
mode-T truncation of sequentially truncated HOSVD (order T then S), and moving ``diag(s2)`` into the core makes
both factors orthonormal. So the result is a :class:`Tucker2Result` and the layer is :class:`Tucker2Conv`
(``in_proj`` = ``G_s``, ``core`` = ``G_y``, ``out_proj`` = ``G_t``); RENE ties the ranks, ``R1 = R2 = r``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import torch

from sigma_core.decompose._checks import check_kernel
from sigma_core.decompose._result import Tucker2Result

__all__ = ["tt_svd", "tt_svd_ranks", "tt_tied_max_rank", "tt_break_even_rank", "tt_tied_params"]

METHOD = "tt-svd"


def _check_ranks(shape: tuple[int, int, int, int], ranks: Sequence[int]) -> tuple[int, int]:
    t, s, h, w = shape
    pair = tuple(ranks) if isinstance(ranks, (tuple, list)) else None
    if pair is None or len(pair) != 2 or not all(isinstance(r, int) and not isinstance(r, bool) for r in pair):
        raise ValueError(f"TT ranks must be a pair of ints (R1, R2), got {ranks!r}")
    r1, r2 = pair
    if not 1 <= r1 <= min(t, s * h * w):
        raise ValueError(f"TT rank R1={r1} must lie in [1, min(T, S*H*W)] = [1, {min(t, s * h * w)}] for kernel "
                         f"{shape}")
    if not 1 <= r2 <= min(s, r1 * h * w):
        raise ValueError(f"TT rank R2={r2} must lie in [1, min(S, R1*H*W)] = [1, {min(s, r1 * h * w)}] for kernel "
                         f"{shape} and R1={r1}")
    return r1, r2


def _svd(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``a = U diag(s) Vh``; a tall matrix is decomposed through its transpose (LAPACK's tall path in
    torch measured ~6x slower for the (R1 H W, S) reshape of step 2)."""
    if a.shape[0] > a.shape[1]:
        v, s, uh = torch.linalg.svd(a.T, full_matrices=False)
        return uh.T, s, v.T
    return torch.linalg.svd(a, full_matrices=False)


def tt_svd(kernel: torch.Tensor, ranks: Sequence[int]) -> Tucker2Result:
    """TT-SVD (= ST-HOSVD, mode order T then S) of a conv kernel, as a Tucker-2 result.

    Parameters
    ----------
    kernel : torch.Tensor, shape (T, S, H, W)
        Real, finite conv weight.
    ranks : (R1, R2)
        ``1 <= R1 <= min(T, S H W)`` and ``1 <= R2 <= min(S, R1 H W)``; infeasible ranks raise (no silent
        zero padding, unlike the public code).

    Returns
    -------
    Tucker2Result
        ``u_t = U1[:, :R1]`` (T, R1) and ``u_s = V2[:R2]^T`` (S, R2), both orthonormal, ``core`` (R1, R2, H, W)
        ``= (U2 diag(s2))`` reshaped; ``ranks == (R1, R2)``, ``metric == "rel_frob_err"``, ``errors`` holds the
        one relative Frobenius error, ``converged=True`` (closed form); ``info`` has both singular-value spectra
        and the seconds taken. Computed in float64, returned in the kernel's dtype and device.

    Notes
    -----
    Step 1: SVD of the mode-T unfolding ``T~ (T, P S)``, ``M = diag(s1) V1^T`` truncated to ``R1`` rows.
    Step 2: SVD of ``M`` reshaped to ``(R1 P, S)``; ``G_y = U2`` (R1, H, W, R2) and ``G_s = diag(s2) V2^T``.
    """
    return tt_svd_ranks(kernel, [ranks])[0]


def tt_svd_ranks(kernel: torch.Tensor, ranks: Sequence[Sequence[int]]) -> list[Tucker2Result]:
    """:func:`tt_svd` at several rank pairs, sharing the first SVD (RENE builds one branch per candidate rank).

    Returns one :class:`Tucker2Result` per pair of ``ranks``, each equal to ``tt_svd(kernel, pair)``.
    """
    shape = check_kernel(kernel)
    pairs = [_check_ranks(shape, r) for r in ranks]
    t, s, h, w = shape
    start = time.perf_counter()
    k = kernel.detach().to(torch.float64)
    # (T, P, S) with p = h W + w: the paper's / the public code's mode order.
    x = k.permute(0, 2, 3, 1).reshape(t, h * w * s)
    u1, s1, v1t = _svd(x)
    norm = torch.linalg.vector_norm(k).clamp_min(1e-300)
    shared = time.perf_counter() - start
    out = []
    for r1, r2 in pairs:
        tic = time.perf_counter()
        m = (s1[:r1, None] * v1t[:r1]).reshape(r1 * h * w, s)
        u2, s2, v2t = _svd(m)
        core = (u2[:, :r2] * s2[:r2]).reshape(r1, h, w, r2).permute(0, 3, 1, 2)
        u_t, u_s = u1[:, :r1], v2t[:r2].T
        approx = torch.einsum("abhw,ta,sb->tshw", core, u_t, u_s)
        err = float(torch.linalg.vector_norm(k - approx) / norm)

        def back(a: torch.Tensor) -> torch.Tensor:
            return a.contiguous().to(device=kernel.device, dtype=kernel.dtype)

        out.append(Tucker2Result(core=back(core), u_t=back(u_t), u_s=back(u_s), ranks=(r1, r2), errors=(err,),
                                 converged=True, method=METHOD, metric="rel_frob_err",
                                 info={"seconds": shared + time.perf_counter() - tic,
                                       "singular_values_1": s1.tolist(), "singular_values_2": s2.tolist()}))
    return out


def tt_tied_max_rank(shape: Sequence[int]) -> int:
    """Largest feasible tied TT rank of a (T, S, H, W) kernel: ``min(T, S)`` (the public code's clip)."""
    t, s = int(shape[0]), int(shape[1])
    return min(t, s)


def tt_tied_params(shape: Sequence[int], rank: int, bias: bool = False) -> int:
    """Parameters of a tied-rank TT / Tucker-2 conv: ``r (T + S) + r^2 H W`` (+ T for the bias)."""
    t, s, h, w = (int(d) for d in shape)
    return rank * (t + s) + rank * rank * h * w + (t if bias else 0)


def tt_break_even_rank(shape: Sequence[int]) -> int:
    """Largest tied rank ``r <= min(T, S)`` with ``r (T + S) + r^2 H W < T S H W`` (0 if none compresses)."""
    t, s, h, w = (int(d) for d in shape)
    dense = t * s * h * w
    # Positive root of r^2 HW + r (T+S) - dense = 0, then step down to the strict inequality.
    r = int(math.floor((-(t + s) + math.sqrt((t + s) ** 2 + 4 * h * w * dense)) / (2 * h * w)))
    while r > 0 and tt_tied_params(shape, r) >= dense:
        r -= 1
    return min(r, tt_tied_max_rank(shape))

"""NORTON's filter selection: principal angles between subspaces (PABS), the distance matrix (paper eq. 11),
Algorithm 1, and the baselines (L1, random, a bug-compatible replica of the public code's criterion).

Pure math on factors / kernels; the pruning surgery that removes the selected channels lives in
:mod:`sigma_core.pruning`.

Beyond the paper (labelled so): :func:`sigma_metrics` (Sigma-weighted PABS, angles in the data metric) and
:func:`output_correlation_distance` (``1 - |rho_ij|`` of the filters' outputs from ``K~ Sigma K~^T``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from sigma_core.decompose.tucker2_sigma import _chol_psd, kronecker_fit

__all__ = [
    "ANGLES",
    "principal_angles",
    "factor_distance_matrix",
    "check_pabs_weights",
    "algorithm1_select",
    "code_pabs_distance_matrix",
    "code_select",
    "norm_scores",
    "norm_select",
    "random_select",
    "sigma_metrics",
    "output_correlation_distance",
]

F64 = torch.float64
ANGLES = ("max", "chordal", "mean")
_PAIR_CHUNK_FLOATS = 2**24


# ------------------------------------------------------------------------------------------------- angles


def _orth(x: torch.Tensor) -> list[torch.Tensor]:
    """Orthonormal bases of the column spans of a batch (B, n, k), as ``scipy.linalg.orth`` (rank by SVD)."""
    u, s, _ = torch.linalg.svd(x, full_matrices=False)
    tol = s.amax(-1, keepdim=True).clamp_min(0) * torch.finfo(x.dtype).eps * max(x.shape[-2], x.shape[-1])
    num = (s > tol).sum(-1)
    return [u[i, :, : int(num[i])] for i in range(x.shape[0])]


def _angles_of_bases(qa: torch.Tensor, qb: torch.Tensor) -> torch.Tensor:
    """Principal angles (descending) of batched orthonormal bases qa (B, n, ka), qb (B, n, kb).

    scipy's ``subspace_angles`` step for step: cosines from ``svd(Q_A^T Q_B)``, sines from the residual of the
    larger basis, sines where ``cos^2 >= 1/2`` (accurate small angles), arccos elsewhere.
    """
    m = qa.mT @ qb
    sig = torch.linalg.svdvals(m)
    if qa.shape[-1] >= qb.shape[-1]:
        resid = qb - qa @ m
    else:
        resid = qa - qb @ m.mT
    k = sig.shape[-1]
    sines = torch.linalg.svdvals(resid)[..., :k]
    mask = sig**2 >= 0.5
    return torch.where(mask, torch.arcsin(sines.clamp(-1.0, 1.0)), torch.arccos(sig.flip(-1).clamp(-1.0, 1.0)))


def principal_angles(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Principal angles between ``span(x)`` and ``span(y)`` (Bjorck & Golub 1973), descending, in [0, pi/2].

    Equals ``scipy.linalg.subspace_angles(x, y)`` (float64, including rank-deficient and unequal dimensions).

    Parameters
    ----------
    x : torch.Tensor, shape (n, p)
    y : torch.Tensor, shape (n, q)

    Returns
    -------
    torch.Tensor, shape (min(rank x, rank y),), float64
    """
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must be 2-D with the same number of rows, got {tuple(x.shape)}, {tuple(y.shape)}")
    qa, qb = _orth(x.to(F64)[None])[0], _orth(y.to(F64)[None])[0]
    if qa.shape[1] == 0 or qb.shape[1] == 0:
        return torch.zeros(0, dtype=F64)
    return _angles_of_bases(qa[None], qb[None])[0]


def _reduce(theta: torch.Tensor, angle: str) -> torch.Tensor:
    if angle == "max":
        return theta[..., 0]  # MATLAB's subspace(), the paper's phi
    if angle == "chordal":
        return torch.sin(theta).pow(2).sum(-1).sqrt()
    return theta.mean(-1)


def _pair_distances(factor: torch.Tensor, angle: str) -> torch.Tensor:
    """(T, T) distance phi between the spans of ``factor[t]`` (T, n, R), batched by basis rank.

    A filter whose factor is all zero has an empty span: distance 0 to another empty span, pi/2 (``"max"``,
    ``"mean"``) or 1 (``"chordal"``) to anything else.
    """
    bases = _orth(factor.to(F64))
    t = len(bases)
    far = 1.0 if angle == "chordal" else math.pi / 2
    out = torch.full((t, t), far, dtype=F64)
    by_rank: dict[int, list[int]] = {}
    for i, q in enumerate(bases):
        by_rank.setdefault(q.shape[1], []).append(i)
    for ka, ia in by_rank.items():
        for kb, ib in by_rank.items():
            if ka == 0 or kb == 0:
                if ka == kb:
                    out[torch.tensor(ia)[:, None], torch.tensor(ib)[None, :]] = 0.0
                continue
            qa = torch.stack([bases[i] for i in ia])
            qb = torch.stack([bases[i] for i in ib])
            n = qa.shape[1]
            step = max(1, _PAIR_CHUNK_FLOATS // max(1, len(ib) * n * max(ka, kb)))
            for lo in range(0, len(ia), step):
                a = qa[lo:lo + step]
                pa = a[:, None].expand(-1, len(ib), -1, -1).reshape(-1, n, ka)
                pb = qb[None].expand(len(a), -1, -1, -1).reshape(-1, n, kb)
                d = _reduce(_angles_of_bases(pa, pb), angle).reshape(len(a), len(ib))
                out[torch.tensor(ia[lo:lo + step])[:, None], torch.tensor(ib)[None, :]] = d
    out = 0.5 * (out + out.T)
    out.fill_diagonal_(0.0)
    return out


def check_pabs_weights(weights: Sequence[float]) -> tuple[float, float, float]:
    """The (alpha, beta, gamma) weights of eq. 11, normalized to sum 1.

    Raises
    ------
    ValueError
        Not three finite non-negative numbers with a positive sum.
    """
    try:
        w = tuple(float(v) for v in weights)
    except (TypeError, ValueError):
        raise ValueError(f"PABS weights must be three numbers (alpha, beta, gamma), got {weights!r}") from None
    if len(w) != 3 or not all(math.isfinite(v) and v >= 0 for v in w) or sum(w) <= 0:
        raise ValueError(f"PABS weights (alpha: height factor A, beta: width factor B, gamma: channel factor C) must "
                         f"be three finite numbers >= 0 that sum to a positive number, got {weights!r} "
                         "(the paper uses 1/3, 1/3, 1/3)")
    total = sum(w)
    return (w[0] / total, w[1] / total, w[2] / total)


def factor_distance_matrix(factors: Sequence[torch.Tensor], weights: Sequence[float] = (1 / 3, 1 / 3, 1 / 3),
                           angle: str = "max", metrics: Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:
    """Distance matrix of paper eq. 11: ``D_ij = alpha phi(A_i, A_j) + beta phi(B_i, B_j) + gamma phi(C_i, C_j)``.

    Parameters
    ----------
    factors : (u_s, u_h, u_w)
        ``C`` (T, S, R), ``A`` (T, H, R), ``B`` (T, W, R), e.g. ``FilterCPResult.factors`` or ``NortonConv.factors()``.
    weights : (alpha, beta, gamma)
        Weights of the A (height), B (width) and C (channel) terms; normalized to sum 1 (:func:`check_pabs_weights`).
    angle : {"max", "chordal", "mean"}
        ``phi``: the largest principal angle (paper, MATLAB ``subspace``), ``sqrt(sum sin^2)`` or the mean angle.
    metrics : (M_S, M_H, M_W) or None
        Beyond the paper: Cholesky factors of the data metric; phi is then taken between ``span(M^T X)``
        (:func:`sigma_metrics`). ``None`` entries leave that factor in the Euclidean metric.

    Returns
    -------
    torch.Tensor (T, T), float64, symmetric, zero diagonal.
    """
    if angle not in ANGLES:
        raise ValueError(f"angle must be one of {ANGLES}, got {angle!r}")
    alpha, beta, gamma = check_pabs_weights(weights)
    c, a, b = factors
    metrics = metrics or (None, None, None)
    t = c.shape[0]
    total = torch.zeros(t, t, dtype=F64)
    for weight, factor, metric in ((alpha, a, metrics[1]), (beta, b, metrics[2]), (gamma, c, metrics[0])):
        if weight == 0:
            continue
        f = factor.detach().to(F64).cpu()
        if metric is not None:
            f = metric.to(F64).cpu().T @ f
        total += weight * _pair_distances(f, angle)
    return total


# ------------------------------------------------------------------------------------------------- selection


def _check_keep(t: int, keep: int) -> int:
    if isinstance(keep, bool) or not isinstance(keep, int) or not 1 <= keep <= t:
        raise ValueError(f"keep must be an int in [1, {t}] (filters to keep of {t}), got {keep!r}")
    return keep


def _check_d(d: torch.Tensor) -> torch.Tensor:
    if not isinstance(d, torch.Tensor) or d.dim() != 2 or d.shape[0] != d.shape[1] or d.shape[0] < 1:
        raise ValueError(f"D must be a square (T, T) tensor, got {getattr(d, 'shape', type(d).__name__)}")
    if not bool(torch.isfinite(d).all()):
        raise ValueError("D holds NaN/Inf entries")
    return d.detach().to(F64).cpu()


def algorithm1_select(d: torch.Tensor, keep: int) -> tuple[list[int], list[int]]:
    """NORTON Algorithm 1, as the paper states it: greedily remove one filter of the closest pair.

    Repeat ``T - keep`` times over the alive filters: take the pair ``(i, j)``, ``i < j``, of smallest ``D[i, j]``
    (ties: the lexicographically smallest pair); remove ``i`` if ``s_i <= s_j`` else ``j``, with
    ``s_i = sum_{k alive, k != i} D[i, k]`` (the paper deletes rows and columns in step 9, so the sums run over the
    filters still alive): the one closest to the rest goes.

    Parameters
    ----------
    d : torch.Tensor (T, T)
        Symmetric distances (the diagonal is ignored).
    keep : int
        Filters to keep, ``1 <= keep <= T``.

    Returns
    -------
    kept : list of int
        Sorted kept filters.
    order : list of int
        Removed filters, in removal order.
    """
    d = _check_d(d)
    t = d.shape[0]
    keep = _check_keep(t, keep)
    d = 0.5 * (d + d.T)
    d.fill_diagonal_(0.0)
    alive = torch.ones(t, dtype=torch.bool)
    upper = torch.triu(torch.ones(t, t, dtype=torch.bool), diagonal=1)
    order: list[int] = []
    for _ in range(t - keep):
        mask = upper & alive[:, None] & alive[None, :]
        flat = torch.where(mask, d, torch.full_like(d, math.inf)).reshape(-1)
        i, j = divmod(int(torch.argmin(flat)), t)  # argmin returns the first minimum: row-major = lexicographic
        sums = (d * alive[None, :]).sum(1)
        out = i if float(sums[i]) <= float(sums[j]) else j
        alive[out] = False
        order.append(out)
    return torch.nonzero(alive).reshape(-1).tolist(), order


def code_pabs_distance_matrix(factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Replica of the public code's PABS distance (pvti/NORTON ``pruning/saliency.py``), bugs included.

    Documented as buggy; it exists to measure what the bugs cost. Per factor pair (float32, as in torch):
    ``Q_A = qr(A)``, ``Q_B = qr(B)`` (swap so that Q_A has more columns), ``B' = Q_B - Q_A Q_A^T Q_B``,
    ``theta = remainder(|asin(min(1, ||B'||_F))|, pi/2)``: the Frobenius norm instead of the 2-norm, and the
    remainder maps dissimilar subspaces (``||B'||_F >= 1``, the rule for R >= 2) to 0. ``D = head + body + tail``
    (weights 1, 1, 1), diagonal 0.
    """
    c, a, b = (f.detach().to(torch.float32).cpu() for f in factors)
    t = c.shape[0]
    pi = torch.tensor(math.pi, dtype=torch.float32)
    total = torch.zeros(t, t, dtype=torch.float32)
    for f in (c, a, b):
        q = torch.linalg.qr(f).Q  # (T, n, min(n, R))
        qa = q[:, None].expand(-1, t, -1, -1)
        qb = q[None].expand(t, -1, -1, -1)
        resid = qb - qa @ (qa.mT @ qb)  # equal column counts: no swap happens
        theta = torch.asin(torch.minimum(torch.tensor(1.0), torch.linalg.matrix_norm(resid)))
        total += torch.remainder(theta.abs(), pi / 2)
    upper = torch.triu(total, diagonal=1)  # the code fills (i, j), i < j, and mirrors it
    return (upper + upper.T).to(F64)


def code_select(d: torch.Tensor, keep: int) -> list[int]:
    """Replica of the public code's selection (``get_saliency`` + ``prune_factors``), bugs included.

    The diagonal is +inf; T - 1 times: ``pos = where(D == D.min())[0]`` (ROW indices only), ``row, col = pos[0],
    pos[1]``; remove ``row if row_sum < col_sum else col`` (sums over the finite entries) and store the removal
    step in ``saliency[step] = index``; ``saliency`` starts as T - 1 everywhere. Then the kept set is
    ``sort(argsort(saliency)[T - keep:])``: removal steps read as scores, so filter indices and step numbers are
    confused. ``argsort`` is made stable here (torch's default is not, so the code's ties are unreproducible).
    """
    d = _check_d(d).clone()
    t = d.shape[0]
    keep = _check_keep(t, keep)
    saliency = torch.full((t,), t - 1, dtype=torch.long)
    d.fill_diagonal_(math.inf)
    for step in range(t - 1):
        pos = torch.where(d == d.min())[0]
        row, col = int(pos[0]), int(pos[1])
        row_sum = d[row][d[row] != math.inf].sum()
        col_sum = d[:, col][d[:, col] != math.inf].sum()
        index = row if row_sum < col_sum else col
        saliency[step] = index
        d[index, :] = math.inf
        d[:, index] = math.inf
    select = torch.argsort(saliency, stable=True)[t - keep:]
    return sorted(select.tolist())


def norm_scores(kernel: torch.Tensor, p: int = 1) -> torch.Tensor:
    """L_p norm of every filter of a (T, ...) kernel (the L1 baseline of filter pruning, Li et al. 2017)."""
    return kernel.detach().reshape(kernel.shape[0], -1).to(F64).norm(p=p, dim=1)


def norm_select(kernel: torch.Tensor, keep: int, p: int = 1) -> list[int]:
    """Keep the ``keep`` filters of largest L_p norm (ties: lower index), sorted."""
    scores = norm_scores(kernel, p)
    keep = _check_keep(len(scores), keep)
    order = torch.argsort(-scores, stable=True)[:keep]
    return sorted(order.tolist())


def random_select(t: int, keep: int, generator: torch.Generator | None = None) -> list[int]:
    """``keep`` of ``t`` filters uniformly at random (seeded by ``generator``), sorted."""
    keep = _check_keep(t, keep)
    return sorted(torch.randperm(t, generator=generator)[:keep].tolist())


# ------------------------------------------------------------------------------------------------- Sigma extras


def sigma_metrics(sigma: torch.Tensor, s: int, h: int, w: int, iters: int = 20
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Beyond the paper: Cholesky factors ``(L_S, L_H, L_W)`` of the data metric for Sigma-weighted PABS.

    ``Sigma ~ Sigma_S kron Sigma_P`` and ``Sigma_P ~ Sigma_H kron Sigma_W`` (Kronecker fits, flip-flop), each
    ``= L L^T``; :func:`factor_distance_matrix` then measures angles between ``span(L^T X)``: two filters are close
    when their factors act alike on the actual inputs.
    """
    sigma = sigma.to(F64)
    n = s * h * w
    if sigma.shape != (n, n):
        raise ValueError(f"sigma must be ({n}, {n}) for an (S, H, W)=({s}, {h}, {w}) filter, got {tuple(sigma.shape)}")
    sig = sigma + 1e-10 * float(sigma.diagonal().mean()) * torch.eye(n, dtype=F64)
    sigma_s, sigma_p = kronecker_fit(sig, s, h * w, iters=iters)
    sigma_h, sigma_w = kronecker_fit(0.5 * (sigma_p + sigma_p.T), h, w, iters=iters)
    return tuple(_chol_psd(0.5 * (m + m.T)) for m in (sigma_s, sigma_h, sigma_w))


def output_correlation_distance(approx_kernel: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Beyond the paper: ``D_ij = 1 - |rho_ij|``, ``rho = k~_i^T Sigma k~_j / (||k~_i||_Sigma ||k~_j||_Sigma)``.

    With the centered Sigma of the layer's input, ``rho_ij`` is the correlation of the pre-BatchNorm outputs of
    filters i and j, so D measures functional redundancy directly (one T x T Gram). A zero filter is at distance
    0 from everything (it is redundant).
    """
    k = approx_kernel.detach().reshape(approx_kernel.shape[0], -1).to(F64).cpu()
    sig = sigma.to(F64).cpu()
    if sig.shape != (k.shape[1], k.shape[1]):
        raise ValueError(f"sigma must be ({k.shape[1]}, {k.shape[1]}), got {tuple(sig.shape)}")
    gram = k @ sig @ k.T
    gram = 0.5 * (gram + gram.T)
    norms = gram.diagonal().clamp_min(0).sqrt()
    denom = norms[:, None] * norms[None, :]
    rho = torch.where(denom > 0, gram / torch.where(denom > 0, denom, torch.ones_like(denom)), torch.ones_like(gram))
    d = (1.0 - rho.abs()).clamp_min(0.0)
    d.fill_diagonal_(0.0)
    return d

"""SVD-Sigma: best rank-r approximation of a linear weight under the Sigma norm (paper App. E, Eq. 40).

Problem (Eq. 40): ``min_{rank(W~) <= r} ||(W - W~) Sigma^{1/2}||_F`` for a weight ``W`` of shape (out, in) --
a linear layer, or a 1x1 conv kernel (T, S, 1, 1) viewed as the matrix (T, S) acting on channel vectors -- and
``Sigma = E[x x^T]`` (in, in) of the layer's inputs. With any square root ``Sigma = L L^T`` the objective is
``||W L - W~ L||_F``, so by Eckart-Young ``W~ L = [W L]_r``, and for invertible ``L`` the paper's solution is

    W~ = [W L]_r L^{-1} = U_r (S_r V_r^T L^{-1}),        W L = U S V^T (SVD).

The factor needs no inverse: ``S_r V_r^T = U_r^T W L``, hence ``S_r V_r^T L^{-1} = U_r^T W`` and
``W~ = U_r U_r^T W`` -- project the columns of W onto the top-r left singular vectors of ``W L``. This form is also
a minimizer when Sigma is singular (dead ReLU inputs, fewer samples than features): ``W~ L = U_r U_r^T W L =
[W L]_r`` still holds, whereas ``L^{-1}`` does not exist and a jittered Cholesky would amplify rounding by
``1/sqrt(jitter)``. On directions Sigma never sees (its null space) it keeps ``U_r U_r^T W``, the projection of the
original map, instead of an arbitrary value. So ``L`` is an exact square root: the jitter-free Cholesky factor
when Sigma is positive definite, otherwise the eigen factor ``V diag(sqrt(lambda))``
(:func:`sigma_core.covariance.factor_sigma` with ``max_jitter=0``).

The factorized layer is ``x -> second (first x)`` with ``first = U_r^T W`` (r, in) and ``second = U_r`` (out, r)
(paper App. E: "two linear layers (r x in with rows S_r V_r^T L^{-1}, out x r)"). Error:
``rel_sigma_err = sqrt(sum_{i>r} s_i^2 / sum_i s_i^2)`` with ``s`` the singular values of ``W L``.
"""

from __future__ import annotations

import time

import torch

from sigma_core.covariance import check_psd, factor_sigma, validate_sigma
from sigma_core.decompose._checks import as_matrix, check_weight
from sigma_core.decompose._result import LowRankResult

__all__ = ["svd_sigma", "svd_truncated", "as_matrix"]

METHOD_SIGMA = "svd-sigma"
METHOD_PLAIN = "svd"


def _tail_ratio(svals: torch.Tensor, rank: int) -> float:
    """``sqrt(sum_{i >= rank} s_i^2 / sum_i s_i^2)``: the relative error of the rank-``rank`` truncation."""
    sq = svals.double() ** 2
    total = float(sq.sum())
    return (float(sq[rank:].sum()) / total) ** 0.5 if total > 0 else 0.0


def _result(weight: torch.Tensor, u_r: torch.Tensor, w: torch.Tensor, svals: torch.Tensor, rank: int,
            method: str, metric: str, info: dict) -> LowRankResult:
    out = {"device": weight.device, "dtype": weight.dtype if weight.is_floating_point() else w.dtype}
    return LowRankResult(
        first=(u_r.T @ w).to(**out),
        second=u_r.contiguous().to(**out),
        rank=rank,
        errors=(_tail_ratio(svals, rank),),
        converged=True,
        method=method,
        metric=metric,
        shape=tuple(weight.shape),
        info={**info, "singular_values": svals.cpu()},
    )


def svd_sigma(weight: torch.Tensor, sigma: torch.Tensor, rank: int, *,
              dtype: torch.dtype = torch.float64) -> LowRankResult:
    """Rank-``rank`` minimizer of ``||(W - W~) Sigma^{1/2}||_F`` (paper App. E, Eq. 40), in closed form.

    Parameters
    ----------
    weight : torch.Tensor, shape (out, in) or (T, S, 1, 1)
        Linear weight or 1x1 conv kernel.
    sigma : torch.Tensor, shape (in, in)
        Uncentered second moment ``E[x x^T]`` of the layer's input features (for a 1x1 conv: of the channel
        vectors at every output position, as :mod:`sigma_core.covariance` computes it). PSD; may be singular.
        Its device is where the computation runs.
    rank : int
        ``1 <= rank <= min(out, in)``.
    dtype : torch.dtype
        Working precision (float64 recommended: Sigma can be ill-conditioned).

    Returns
    -------
    LowRankResult
        ``first = U_r^T W`` (r, in), ``second = U_r`` (out, r) with ``W L = U S V^T``; in the weight's dtype and
        device. ``errors == (rel_sigma_err,)``; ``info`` has the singular values of ``W L``, the factor method
        (``"cholesky"`` or ``"eigen"`` for singular Sigma) and the seconds taken.

    Raises
    ------
    ValueError
        Weight not (out, in) or (T, S, 1, 1) or not finite, rank outside ``[1, min(out, in)]``, Sigma not
        (in, in), non-finite or not symmetric.
    """
    tic = time.perf_counter()
    w0, rank = check_weight(weight, rank)
    validate_sigma(sigma, w0.shape[1])
    check_psd(sigma)
    # max_jitter=0: an exact square root (Cholesky of Sigma itself, else the eigen factor), so that W~ is the
    # minimizer for Sigma and not for Sigma + jitter I.
    factor = factor_sigma(sigma.to(dtype), max_jitter=0.0)
    w = w0.detach().to(device=sigma.device, dtype=dtype)
    u, svals, _ = torch.linalg.svd(w @ factor.factor, full_matrices=False)
    info = {"factor": factor.method, "seconds": time.perf_counter() - tic}
    return _result(weight, u[:, :rank], w, svals, rank, METHOD_SIGMA, "rel_sigma_err", info)


def svd_truncated(weight: torch.Tensor, rank: int, *, dtype: torch.dtype = torch.float64) -> LowRankResult:
    """Plain truncated SVD (Eckart-Young in the Frobenius norm): the baseline of the paper's hybrid table (App. E).

    Parameters
    ----------
    weight : torch.Tensor, shape (out, in) or (T, S, 1, 1)
    rank : int
        ``1 <= rank <= min(out, in)``.
    dtype : torch.dtype
        Working precision.

    Returns
    -------
    LowRankResult
        ``first = S_r V_r^T = U_r^T W`` (r, in), ``second = U_r`` (out, r); ``errors == (rel_frob_err,)``.

    Raises
    ------
    ValueError
        Weight not (out, in) or (T, S, 1, 1) or not finite, rank outside ``[1, min(out, in)]``.
    """
    tic = time.perf_counter()
    w0, rank = check_weight(weight, rank)
    w = w0.detach().to(dtype)
    u, svals, _ = torch.linalg.svd(w, full_matrices=False)
    return _result(weight, u[:, :rank], w, svals, rank, METHOD_PLAIN, "rel_frob_err",
                   {"seconds": time.perf_counter() - tic})

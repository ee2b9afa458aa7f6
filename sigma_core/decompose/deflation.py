"""Greedy tensor deflation under the Sigma norm (paper Sec. 5.1, the baseline of Table 1).

``W^(k+1) = W^(k) - a_k o b_k o c_k o d_k`` where each rank-one term is the Sigma-norm rank-one approximation of
the current residual ``W^(k)`` (``W^(0) = K``), computed by CP-ALS-Sigma with R = 1: the same exact sub-steps as
:func:`sigma_core.decompose.cp_als_sigma` (U_T closed form, U_S direct/CG, U_H and U_W dense solves). The
approximation is ``K~ = sum_{k <= R} a_k o b_k o c_k o d_k``. Unlike the full ALS, earlier terms are never revised,
which is why it ends with a larger error at the same rank.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from sigma_core.decompose._checks import check_cp_inputs
from sigma_core.decompose._result import CPResult
from sigma_core.decompose.cp_sigma import (
    CPSigmaConfig,
    _als,
    _CP,
    _kr,
    _rel,
    _setup,
    _start,
    _to_result,
)
from sigma_core.decompose.tucker2_sigma import _Layer

__all__ = ["cp_deflation_sigma"]

METHOD = "cp-deflation-sigma"


def _residual_layer(layer: _Layer, k1: torch.Tensor, ksig: torch.Tensor) -> _Layer:
    """The per-layer constants of the residual kernel ``k1`` (T, n) with ``ksig = k1 Sigma``."""
    return _Layer(k1, layer.sigma, ksig, float((ksig * k1).sum()), layer.shape)


def _deflate(layer: _Layer, term: _CP) -> _Layer:
    """Residual minus a rank-one term: ``k1 - a z^T`` and ``k1 Sigma - a (Sigma z)^T``, z = b kr c kr d (n^2 flops)."""
    z = _kr(term.s, _kr(term.h, term.w))[:, 0]
    a = term.t[:, 0]
    return _residual_layer(layer, layer.k1 - torch.outer(a, z), layer.ksig - torch.outer(a, layer.sigma @ z))


def cp_deflation_sigma(
    kernel: torch.Tensor,
    sigma: torch.Tensor,
    rank: int,
    *,
    config: CPSigmaConfig = CPSigmaConfig(),
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    callback: Callable[[int, float, dict], None] | None = None,
) -> CPResult:
    """Rank-R CP by greedy tensor deflation under the Sigma norm (paper Sec. 5.1).

    Parameters
    ----------
    kernel : torch.Tensor, shape (T, S, H, W)
    sigma : torch.Tensor, shape (S*H*W, S*H*W)
    rank : int
        Number of rank-one terms, ``1 <= R <= R_max``.
    config : CPSigmaConfig
        Settings of each rank-one CP-ALS-Sigma run (``max_iter`` and ``tol`` apply per term; ``init="svd"``
        starts each term from the leading singular triplet of the residual's rotated slices).
    generator : torch.Generator, optional
        Used by ``init="random"``.
    dtype : torch.dtype
        Working precision.
    callback : callable, optional
        ``callback(k, rel_sigma_err, info)`` after the k-th term (k = 1..R) is subtracted.

    Returns
    -------
    CPResult
        ``method == "cp-deflation-sigma"``; ``errors[k-1]`` is rel_sigma_err of the sum of the first k terms
        (non-increasing: each term at worst keeps the residual, since its U_T solve can return zero);
        ``converged`` is True when every rank-one run met ``tol``; ``info["sweeps"]`` lists the sweeps per term.

    Raises
    ------
    ValueError
        As :func:`sigma_core.decompose.cp_als_sigma` (bad kernel, rank or Sigma).
    """
    rank = check_cp_inputs(kernel, sigma, rank)
    start_time = time.perf_counter()
    layer, solver, kron = _setup(kernel, sigma, 1, config, dtype)
    residual = layer
    terms: list[_CP] = []
    errors: list[float] = []
    info: dict = {"solver": solver, "sweeps": [], "ridge": config.ridge, "init": config.init}
    all_converged = True
    for k in range(1, rank + 1):
        run = _als(residual, _start(residual, 1, config, generator), config, solver=solver, kron=kron)
        terms.append(run.factors)
        info["sweeps"].append(len(run.sq_errors) - 1)
        all_converged &= run.converged
        residual = _deflate(residual, run.factors)
        # The recomputed residual norm (not the ALS's expanded one) so that rounding cannot accumulate.
        errors.append(_rel(residual.knorm2, layer))
        if callback is not None:
            callback(k, errors[-1], info)
    info["seconds"] = time.perf_counter() - start_time
    factors = _CP(*(torch.cat([getattr(term, name) for term in terms], dim=1) for name in _CP._fields))
    return _to_result(kernel, factors, rank, errors, all_converged, METHOD, info, dtype)

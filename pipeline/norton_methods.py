"""Per-layer adaptors of NORTON's filter CP for the method registry (``pipeline.methods``).

``norton-cp`` (Frobenius, the paper's decomposition) and ``norton-cp-sigma`` (exact per-filter Sigma ALS started
from the Frobenius solution, beyond the paper) build a :class:`sigma_core.NortonConv`; their ranks come from
:func:`filter_cp_ranks` (explicit R, fraction of the per-filter R_max, break-even; alpha is an error).
"""

from __future__ import annotations

import torch

from sigma_core import RankRule, filter_cp_als, filter_cp_als_sigma, filter_cp_rank
from sigma_core.decompose import FilterCPSigmaConfig

__all__ = ["filter_cp_ranks", "norton_frob", "norton_sigma"]


def filter_cp_ranks(rule: RankRule, weight: torch.Tensor) -> tuple[int]:
    """Filter-CP rank of a layer as a 1-tuple ``(R,)`` (:func:`sigma_core.filter_cp_rank`)."""
    return (filter_cp_rank(rule, tuple(weight.shape)),)


def norton_frob(weight, sigma, ranks, options, device):
    gen = torch.Generator().manual_seed(options.seed)
    return filter_cp_als(weight.to(device), ranks[0], max_iter=max(options.max_iter, 200),
                         tol=min(options.tol, 1e-8), init=options.cp_init, generator=gen)


def norton_sigma(weight, sigma, ranks, options, device):
    gen = torch.Generator().manual_seed(options.seed)
    config = FilterCPSigmaConfig(max_iter=options.max_iter, tol=options.tol)
    start = "frobenius" if options.cp_init == "svd" else "random"
    return filter_cp_als_sigma(weight.to(device), sigma.to(device), ranks[0], config=config,
                               start=start if start == "frobenius" else
                               filter_cp_als(weight.to(device), ranks[0], init="random", generator=gen),
                               generator=gen)

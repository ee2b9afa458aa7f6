"""Tucker2-ALS under the Frobenius norm: the paper's baseline, tensorly's ``partial_tucker`` on modes (0, 1)."""

from __future__ import annotations

import time

import tensorly as tl
import torch
from tensorly.decomposition import partial_tucker

from sigma_core.decompose._checks import check_kernel
from sigma_core.decompose._result import Tucker2Result
from sigma_core.ranks import validate_tucker2_ranks

__all__ = ["tucker2_als"]

METHOD = "tucker2-als"


def tucker2_als(
    kernel: torch.Tensor,
    ranks: tuple[int, int],
    *,
    n_iter_max: int = 100,
    tol: float = 1e-8,
    init: str = "svd",
    random_state: int | None = None,
) -> Tucker2Result:
    """Tucker-2 minimizing ``||K - G x_1 U_T x_2 U_S||_F`` (HOOI via tensorly, as the paper's baseline).

    Parameters
    ----------
    kernel : torch.Tensor, shape (T, S, H, W)
    ranks : (R_T, R_S)
    n_iter_max, tol, init, random_state
        Passed to ``tensorly.decomposition.partial_tucker`` (tol is on the absolute change of rel_frob_err).

    Returns
    -------
    Tucker2Result
        ``metric == "rel_frob_err"``; computed in float64 with tensorly's PyTorch backend on the kernel's
        device and returned in the kernel's dtype/device.
    """
    check_kernel(kernel)
    validate_tucker2_ranks(tuple(kernel.shape), ranks)
    r_t, r_s = int(ranks[0]), int(ranks[1])
    start = time.perf_counter()
    k = kernel.detach().to(torch.float64)
    # tensorly's PyTorch backend, scoped to this call: torch's BLAS threads wait passively, whereas numpy's
    # OpenBLAS threads spin and were measured 50x slower on a loaded 2-core machine; it also runs on CUDA.
    with tl.backend_context("pytorch"):
        (core, factors), rec_errors = partial_tucker(
            k, rank=[r_t, r_s], modes=[0, 1], n_iter_max=n_iter_max, tol=tol, init=init, random_state=random_state
        )
    seconds = time.perf_counter() - start

    def back(a: torch.Tensor) -> torch.Tensor:
        return a.contiguous().to(device=kernel.device, dtype=kernel.dtype)

    return Tucker2Result(
        core=back(core),
        u_t=back(factors[0]),
        u_s=back(factors[1]),
        ranks=(r_t, r_s),
        errors=tuple(float(e) for e in rec_errors),
        converged=len(rec_errors) < n_iter_max,
        method=METHOD,
        metric="rel_frob_err",
        info={"seconds": seconds, "iterations": len(rec_errors)},
    )

"""CP-ALS under the Frobenius norm: the paper's baseline, tensorly's ``parafac`` (Sec. 5, "CP-ALS")."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable

import tensorly as tl
import torch
from tensorly.decomposition import parafac

from sigma_core.decompose._checks import check_init, check_kernel
from sigma_core.decompose._result import CPResult
from sigma_core.ranks import validate_cp_rank

__all__ = ["cp_als"]

METHOD = "cp-als"


def cp_als(
    kernel: torch.Tensor,
    rank: int,
    *,
    n_iter_max: int = 100,
    tol: float = 1e-8,
    init: str = "svd",
    random_state: int | None = None,
    callback: Callable[[int, float], bool | None] | None = None,
) -> CPResult:
    """Rank-R CP minimizing ``||K - K~||_F`` by ALS (tensorly ``parafac``, as the paper's baseline).

    Parameters
    ----------
    kernel : torch.Tensor, shape (T, S, H, W)
    rank : int
        ``1 <= R <= R_max = TSHW / max(T, S, H, W)``.
    n_iter_max, tol, init, random_state
        Passed to ``tensorly.decomposition.parafac`` (``tol`` is on the absolute change of rel_frob_err;
        ``init`` is ``"svd"`` -- tensorly fills modes smaller than R with uniform random columns drawn from
        ``random_state`` -- or ``"random"``).
    callback : callable, optional
        ``callback(k, rel_frob_err)`` with k = 0 for the initialization and k = 1, 2, ... after each ALS
        iteration; returning True stops the iteration (e.g. a wall-clock budget).

    Returns
    -------
    CPResult
        ``metric == "rel_frob_err"`` (``errors`` = tensorly's per-iteration reconstruction errors); computed in
        float64 with tensorly's PyTorch backend on the kernel's device and returned balanced, in the kernel's
        dtype, with tensorly's weights folded into the factors.
    """
    check_kernel(kernel)
    rank = validate_cp_rank(tuple(kernel.shape), rank)
    check_init(init)
    start = time.perf_counter()
    k = kernel.detach().to(torch.float64)
    # tensorly's PyTorch backend, scoped to this call (as for the Tucker-2 baseline): numpy's OpenBLAS threads
    # spin on a loaded machine; measured 3x faster here at (128, 128, 3, 3), R = 230, with identical iterates.
    with tl.backend_context("pytorch"), warnings.catch_warnings():
        # R > H, W (always, for 3x3 kernels): tensorly warns once per mode that it pads its SVD init randomly.
        warnings.filterwarnings("ignore", message="Trying to compute SVD with n_eigenvecs", category=UserWarning)
        stopper = None if callback is None else _Counter(callback)
        cp, rec_errors = parafac(k, rank, n_iter_max=n_iter_max, tol=tol, init=init, random_state=random_state,
                                 return_errors=True, callback=stopper)
    seconds = time.perf_counter() - start
    weights, factors = cp
    factors = [torch.as_tensor(f, dtype=torch.float64) for f in factors]
    factors[0] = factors[0] * torch.as_tensor(weights, dtype=torch.float64, device=factors[0].device)[None, :]
    factors = _balanced(factors)

    def back(a: torch.Tensor) -> torch.Tensor:
        return a.contiguous().to(device=kernel.device, dtype=kernel.dtype)

    stopped = stopper is not None and stopper.stopped
    return CPResult(
        u_t=back(factors[0]), u_s=back(factors[1]), u_h=back(factors[2]), u_w=back(factors[3]), rank=rank,
        errors=tuple(float(e) for e in rec_errors), converged=len(rec_errors) < n_iter_max and not stopped,
        method=METHOD, metric="rel_frob_err",
        info={"seconds": seconds, "iterations": len(rec_errors), "init": init, "stopped_by_callback": stopped},
    )


class _Counter:
    """Adapts ``callback(k, err)`` to tensorly's ``callback(cp_tensor, err)`` (called once before the loop)."""

    def __init__(self, callback: Callable[[int, float], bool | None]):
        self.callback = callback
        self.calls = 0
        self.stopped = False

    def __call__(self, cp_tensor: object, rec_error: float) -> bool:
        self.stopped = self.callback(self.calls, float(rec_error)) is True
        self.calls += 1
        return self.stopped


def _balanced(factors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Same column norm in the four factors of every component (product unchanged; zero components kept)."""
    norms = torch.stack([f.norm(dim=0) for f in factors])
    ok = (norms > 0).all(dim=0)
    target = norms.prod(dim=0) ** 0.25
    scale = torch.where(ok, target / torch.where(ok, norms, torch.ones_like(norms)), torch.ones_like(norms))
    return [f * c[None, :] for f, c in zip(factors, scale)]

"""CPU port of the reference Tucker2-ALS-Sigma, ``Tucker_Sigma.py`` of github.com/alpkll/Parafac_Sigma.

Only for ``bench_reference.py`` (timing the reference algorithm against ``sigma_core.tucker2_als_sigma``); not part
of the package. The algorithm, dtypes, tolerances and MINRES settings are the reference's
(``partial_tucker_sigma`` as of the repository's HEAD):

* Input ``sigma`` is the lower Cholesky factor ``L`` of Sigma (``Compute_Covariance.reshape_cholesky``:
  ``torch.linalg.cholesky`` of the float32 matrix, diagonal jitter 1e-9 .. 1e-3 tried in turn if it fails);
  the code works with ``L^T`` ("Take transpose of Sigma"); the kernel is ``(T, S, P)`` moved to ``(S, P, 1, T)``.
* ``init='svd'``: U_S, U_T from the SVDs of the mode unfoldings; the core from ``lstsq`` of the normal equations.
* One iteration = three updates in the order of ``for mode in [0, 3, 4]``:
  U_S by MINRES (float32 ``LinearOperator``, ``tol=1e-10``, ``maxiter=2000``, zero start, no preconditioner) on
  ``(Sigma o (G U_T^T U_T G^T)) vec(U_S) = vec(Sigma K U_T G^T)`` with ``Sigma`` recomputed as ``L L^T`` every
  iteration; U_T by ``torch.linalg.solve`` of its normal equations; the core by ``torch.linalg.solve`` of the
  (R_S P)^2 normal matrix ``(L^T M)^T (L^T M)`` followed by the U_T projection.
* After every iteration the relative Sigma error ``||L^T (K - K~)|| / ||L^T K||`` (float32); from the second
  iteration on, stop when the decrease is negative (revert to the previous iterate) or ``abs(decrease) < tol``
  (``cvg_criterion="abs_rec_error"``, ``tol=1e-6``, ``n_iter_max`` default 100 of the reference's CLI).

Changes (all forced by running on a CPU without CuPy, or by measuring):

1. CuPy -> CPU: ``cupyx.scipy.sparse.linalg.minres`` -> ``scipy.sparse.linalg.minres`` (same algorithm, the
   reference's ``tol=1e-10`` passed as ``rtol``, same ``maxiter=2000``, float32 operator), the mat-vec's
   ``cp.einsum`` -> ``torch.einsum`` on float32 CPU tensors (the same tensors ``A`` (S,P,1,S,P,1) and ``D``
   (R_S,P,1,R_S,P,1), the same contraction ``'ijkumn,qjksmn,us->iq'``), DLPack hand-offs -> ``torch.from_numpy``.
2. The 3-operand einsum is contracted in its cheapest order (``A`` with ``x`` first, ``2 n^2 R_S`` flops, then with
   ``D``): a left-to-right contraction (``A`` with ``D`` first) would cost ``2 S^2 P^2 R_S^2`` flops per mat-vec,
   R_S P / 2 times more, and only make the reference slower. This favours the reference.
3. ``device``: always the CPU (the reference picks CUDA when available).
4. ``print`` -> nothing (``verbose`` dropped); a ``callback(iteration, u_t, core, u_s)`` after each iteration's
   error check (the benchmark stops its clock while it runs) and an optional ``minres_callback`` invoked after
   each MINRES step (the benchmark's time cap raises from there).
5. The kernel is taken in PyTorch layout (T, S, H, W) and reshaped to the reference's (T, S, H*W) input; the
   returned factors are ``(U_T (T, R_T), core (R_T, R_S, H, W), U_S (S, R_S))`` instead of
   ``(core (R_S, P, 1, R_T), [U_T, U_S])`` (a permutation of the same numbers).
6. ``init='random'`` and ``tinit`` are not ported (the benchmark uses the reference's default ``'svd'``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator, minres

__all__ = ["reference_cholesky", "reference_tucker2_sigma"]


def reference_cholesky(sigma: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``Compute_Covariance.reshape_cholesky`` in float32: lower ``L`` with ``Sigma + jitter I = L L^T``.

    Returns ``(L, jitter)``; jitter 0 when the plain Cholesky succeeds, else the first of 1e-9 .. 1e-3 that works.
    """
    s32 = sigma.to(torch.float32)
    try:
        return torch.linalg.cholesky(s32), 0.0
    except RuntimeError:
        pass
    eye = torch.eye(s32.shape[0], dtype=s32.dtype)
    for p in (-9, -8, -7, -6, -5, -4, -3):
        try:
            return torch.linalg.cholesky(s32 + 10.0 ** p * eye), 10.0 ** p
        except RuntimeError:
            pass
    raise RuntimeError("Sigma is not positive definite even with additive diagonal 1e-3")


def _reconstruct(core: torch.Tensor, factors: list[torch.Tensor]) -> torch.Tensor:
    return torch.tensordot(torch.tensordot(factors[0], core, dims=[[1], [0]]), factors[1], dims=[[3], [1]])


def _err(tensor: torch.Tensor, sigma: torch.Tensor, tensor2: torch.Tensor) -> torch.Tensor:
    x_diff = tensor - tensor2
    return torch.norm(torch.matmul(sigma, x_diff.reshape((-1, tensor.size()[3]))))


def _matvec(x: np.ndarray, a: torch.Tensor, d: torch.Tensor) -> np.ndarray:
    """``einsum('ijkumn,qjksmn,us -> iq', A, D, x)`` contracted A-with-x first (change 2)."""
    n1 = a.shape[0]
    r = d.shape[0]
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32).reshape(n1, r))
    ax = torch.einsum("ijkumn,us->ijkmns", a, xt)
    return torch.einsum("ijkmns,qjksmn->iq", ax, d).reshape(-1).numpy()


def _solve_m_b(a: torch.Tensor, d: torch.Tensor, b: torch.Tensor, n: int,
               minres_callback: Callable | None) -> np.ndarray:
    op = LinearOperator((n, n), matvec=lambda v: _matvec(v, a, d), dtype=np.float32)
    x, _ = minres(op, b.numpy(), rtol=1e-10, maxiter=2000, callback=minres_callback)[:2]
    return x.astype(np.float32)


def reference_tucker2_sigma(
    kernel: torch.Tensor,
    rank: tuple[int, int],
    chol: torch.Tensor,
    *,
    n_iter_max: int = 100,
    tol: float = 1e-6,
    callback: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None,
    minres_callback: Callable | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[float]]:
    """The reference ``partial_tucker_sigma(tensorT, rank, sigma, init='svd', n_iter_max, tol)`` on the CPU.

    Parameters
    ----------
    kernel : torch.Tensor, shape (T, S, H, W)
        Cast to float32 (the reference runs in the input's dtype, float32 for conv weights).
    rank : (R_T, R_S)
    chol : torch.Tensor, shape (S*H*W, S*H*W)
        Lower Cholesky factor of Sigma (:func:`reference_cholesky`), float32.
    callback : callable, optional
        ``callback(iteration, u_t (T, R_T), core (R_T, R_S, H, W), u_s (S, R_S))`` after each iteration's
        error check (iteration 0 = the initialization).

    Returns
    -------
    u_t, core, u_s, rec_errors
        The reference's returned iterate (after a possible revert) and its float32 relative errors.
    """
    t_out, s_in, h, w = kernel.shape
    tensor_t = kernel.detach().to(torch.float32).reshape(t_out, s_in, h * w)
    sigma = torch.t(chol.to(torch.float32))
    tensor = torch.moveaxis(tensor_t, 0, -1)
    tensor = tensor[:, :, None, :]
    rank = [rank[1], rank[0]]
    tsize = tensor.size()
    norm_sigma_tensor = torch.norm(torch.flatten(torch.matmul(sigma, tensor.reshape((-1, tsize[3])))))

    def emit(it: int, core: torch.Tensor, factors: list[torch.Tensor]) -> None:
        if callback is not None:
            u_s, u_t = factors
            g = core.reshape(rank[0], h, w, rank[1]).permute(3, 0, 1, 2)  # (R_S, P, 1, R_T) -> (R_T, R_S, H, W)
            callback(it, u_t, g, u_s)

    # init == 'svd'
    u, _, _ = torch.linalg.svd(tensor.reshape((tsize[0], -1)), full_matrices=False)
    factors = [u[:, :rank[0]]]
    u, _, _ = torch.linalg.svd(torch.t(tensor.reshape((-1, tsize[3]))), full_matrices=False)
    factors += [u[:, :rank[1]]]
    sigma2 = sigma.reshape((-1,) + tuple(tsize[i] for i in range(3)))
    sigma2 = torch.tensordot(sigma2, factors[0], dims=[[1], [0]]).moveaxis(-1, 1).reshape((sigma2.size()[0], -1))
    tensor2 = tensor.reshape((-1, tsize[3]))
    sigmatensor = sigma @ tensor2
    dx = torch.linalg.lstsq(torch.t(sigma2) @ sigma2, torch.t(sigma2) @ sigmatensor)[0]
    core = torch.t(torch.linalg.solve(torch.t(factors[1]) @ factors[1], torch.t(factors[1]) @ torch.t(dx))).reshape(
        [rank[0], tsize[1], tsize[2], rank[1]])

    checkpoint = [core, factors]
    rec_errors = [float(_err(tensor, sigma, _reconstruct(core, factors)) / norm_sigma_tensor)]
    emit(0, core, factors)

    for iteration in range(n_iter_max):
        for mode in [0, 3, 4]:
            if mode == 0:
                sts = torch.tensordot(sigma, sigma, dims=[[0], [0]])
                sts_reshaped = sts.reshape(list(tsize[:3]) + list(tsize[:3]))
                core_factor = torch.tensordot(core, factors[1], dims=[[-1], [1]])
                corefactor_2 = torch.tensordot(core_factor, core_factor, dims=[[-1], [-1]])
                tensor_reshaped = tensor.reshape((-1, tsize[3])) @ factors[1]
                sigmatensor = sigma @ tensor_reshaped
                sigma2tensor = torch.tensordot(sigma, sigmatensor, dims=[[0], [0]]).reshape(list(tsize)[:3] + [-1])
                rhs = torch.tensordot(sigma2tensor, core, dims=[[1, 2, 3], [1, 2, 3]]).flatten()
                factor = _solve_m_b(sts_reshaped, corefactor_2, rhs, rhs.size(0), minres_callback)
                factors[0] = torch.from_numpy(factor).reshape(tsize[mode], rank[0])
            elif mode == 3:
                sigma_reshaped = sigma.reshape((-1,) + tuple(tsize[i] for i in range(3)))
                sigma_factor = torch.tensordot(sigma_reshaped, factors[0], dims=[[1], [0]]).moveaxis(-1, 1)
                sigma_factorcore = torch.tensordot(sigma_factor, core, dims=[[1, 2, 3], [0, 1, 2]])
                b = torch.t(sigma_factorcore) @ sigma @ tensor.reshape((-1, tsize[3]))
                factors[1] = torch.t(torch.linalg.solve(torch.t(sigma_factorcore) @ sigma_factorcore, b)).reshape(
                    (-1, rank[1]))
            else:
                sigma_reshaped = sigma.reshape((-1,) + tuple(tsize[i] for i in range(3)))
                sigma_factor = torch.tensordot(sigma_reshaped, factors[0], dims=[[1], [0]]).moveaxis(-1, 1).reshape(
                    (sigma2.size()[0], -1))
                tensor_reshaped = tensor.reshape((-1, tsize[3]))
                sigmatensor = sigma @ tensor_reshaped
                dx = torch.linalg.solve(torch.t(sigma_factor) @ sigma_factor, torch.t(sigma_factor) @ sigmatensor)
                core = torch.t(torch.linalg.solve(torch.t(factors[1]) @ factors[1],
                                                  torch.t(factors[1]) @ torch.t(dx))).reshape(core.size())
        if tol:
            rec_errors.append(float(_err(tensor, sigma, _reconstruct(core, factors)) / norm_sigma_tensor))
            if iteration >= 1:
                decrease = rec_errors[-2] - rec_errors[-1]
                if decrease < 0:
                    core, factors = checkpoint[:]
                    break
                emit(iteration + 1, core, factors)
                if abs(decrease) < tol:
                    break
            else:
                emit(iteration + 1, core, factors)
        checkpoint = [core[:], factors[:]]
    u_s, u_t = factors
    return u_t, core.reshape(rank[0], h, w, rank[1]).permute(3, 0, 1, 2), u_s, rec_errors

"""Input checks shared by the decomposition entry points, so that every method rejects bad input alike.

Each check raises a ``ValueError`` whose message says what is wrong and what to do about it; rank and Sigma
checks are those of :mod:`sigma_core.ranks` and :func:`sigma_core.covariance.validate_sigma`.
"""

from __future__ import annotations

import torch

from sigma_core.covariance import validate_sigma
from sigma_core.ranks import validate_cp_rank, validate_svd_rank, validate_tucker2_ranks

__all__ = [
    "INITS", "check_init", "as_matrix", "check_finite", "check_kernel", "check_weight", "check_tucker2_inputs", "check_cp_inputs",
    "check_solver_settings",
]


# Initializations of the ALS solvers (Tucker-2 and CP, Sigma and Frobenius): deterministic SVD-based or seeded random.
INITS = ("svd", "random")


def check_init(init: str, name: str = "init", allowed: tuple[str, ...] = INITS) -> None:
    """Reject an initialization that is not one of ``allowed`` (default :data:`INITS`; ``name`` is the setting's
    name in messages)."""
    if init not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {init!r}")


def check_finite(x: torch.Tensor, name: str) -> None:
    """Reject a complex, boolean or non-finite tensor ``x`` (a kernel or a weight, named ``name`` in messages).

    Raises
    ------
    ValueError
        If ``x`` is complex or boolean, or holds NaN/Inf (which would reach the SVDs as a ``LinAlgError``).
    """
    if x.is_complex() or x.dtype == torch.bool:
        raise ValueError(f"{name} must be a real tensor, got dtype {x.dtype}")
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise ValueError(f"{name} contains {bad} NaN/Inf entries (of {x.numel()}): only finite weights can be "
                         "decomposed; check the checkpoint or the training run that produced them")


def check_kernel(kernel: torch.Tensor) -> tuple[int, int, int, int]:
    """Check a conv kernel and return its shape.

    Parameters
    ----------
    kernel : torch.Tensor, shape (T, S, H, W)
        Real, finite conv weight in PyTorch layout.

    Returns
    -------
    (T, S, H, W) : tuple of int

    Raises
    ------
    ValueError
        If ``kernel`` is not a 4-D real tensor or holds NaN/Inf.
    """
    if not isinstance(kernel, torch.Tensor) or kernel.dim() != 4:
        got = tuple(kernel.shape) if isinstance(kernel, torch.Tensor) else type(kernel).__name__
        raise ValueError(f"kernel must be a 4-D tensor (T, S, H, W) = (out, in, kh, kw), got {got} "
                         "(a linear weight (out, in) is factorized by svd_sigma)")
    check_finite(kernel, "kernel")
    t, s, h, w = (int(d) for d in kernel.shape)
    return t, s, h, w


def as_matrix(weight: torch.Tensor) -> torch.Tensor:
    """View a linear weight (out, in) or a 1x1 conv kernel (T, S, 1, 1) as a matrix (out, in).

    Raises
    ------
    ValueError
        For any other shape, e.g. a 3x3 conv kernel: SVD factorizes matrices, use a Tucker-2 or CP method there.
    """
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() == 2:
        return weight
    if weight.dim() == 4 and tuple(weight.shape[2:]) == (1, 1):
        return weight.reshape(weight.shape[0], weight.shape[1])
    raise ValueError(
        f"SVD applies to linear weights (out, in) and 1x1 conv kernels (T, S, 1, 1), got shape "
        f"{tuple(weight.shape)}; factorize larger conv kernels with a Tucker-2 or CP method"
    )


def check_weight(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, int]:
    """Check an SVD input: the weight's matrix view (finite) and ``1 <= rank <= min(out, in)``.

    Parameters
    ----------
    weight : torch.Tensor, shape (out, in) or (T, S, 1, 1)
    rank : int

    Returns
    -------
    matrix : torch.Tensor, shape (out, in)
        A view of ``weight``.
    rank : int
    """
    matrix = as_matrix(weight)
    check_finite(matrix, "weight")
    return matrix, validate_svd_rank(tuple(matrix.shape), rank)


def check_tucker2_inputs(kernel: torch.Tensor, sigma: torch.Tensor, ranks: tuple[int, int]) -> tuple[int, int]:
    """Check the inputs of a Tucker-2 Sigma decomposition: kernel, ranks, then Sigma.

    Parameters
    ----------
    kernel : torch.Tensor, shape (T, S, H, W)
    sigma : torch.Tensor, shape (S*H*W, S*H*W)
    ranks : (R_T, R_S)

    Returns
    -------
    (R_T, R_S) : tuple of int
    """
    t, s, h, w = check_kernel(kernel)
    ranks = validate_tucker2_ranks((t, s, h, w), ranks)
    validate_sigma(sigma, s * h * w)
    return ranks


def check_cp_inputs(kernel: torch.Tensor, sigma: torch.Tensor, rank: int) -> int:
    """Check the inputs of a CP Sigma decomposition: kernel, rank (``1 <= R <= R_max``), then Sigma.

    Parameters
    ----------
    kernel : torch.Tensor, shape (T, S, H, W)
    sigma : torch.Tensor, shape (S*H*W, S*H*W)
    rank : int

    Returns
    -------
    int
        The rank as a plain int.
    """
    t, s, h, w = check_kernel(kernel)
    rank = validate_cp_rank((t, s, h, w), rank)
    validate_sigma(sigma, s * h * w)
    return rank


def check_solver_settings(config) -> None:
    """Check the settings shared by ``Tucker2SigmaConfig`` and ``CPSigmaConfig`` (called from their ``__post_init__``).

    Parameters
    ----------
    config : Tucker2SigmaConfig or CPSigmaConfig
        Uses ``solver``, ``init``, ``max_iter``, ``tol``, ``cg_steps``, ``cg_tol``, ``cg_maxiter``, ``kron_iters``
        and ``ridge``.

    Raises
    ------
    ValueError
        Naming the bad setting and its allowed values; NaN counts as bad for the float settings.
    """
    if config.solver not in ("auto", "direct", "cg"):
        raise ValueError(f"solver must be 'auto', 'direct' or 'cg', got {config.solver!r}")
    check_init(config.init, allowed=getattr(config, "INITS", INITS))
    if not (config.max_iter >= 0 and config.tol >= 0) or config.cg_maxiter < 1 or config.kron_iters < 1:
        raise ValueError(f"max_iter and tol must be >= 0, cg_maxiter and kron_iters >= 1, got max_iter="
                         f"{config.max_iter}, tol={config.tol}, cg_maxiter={config.cg_maxiter}, "
                         f"kron_iters={config.kron_iters}")
    if not (config.ridge >= 0 and config.cg_tol >= 0):
        raise ValueError(f"ridge and cg_tol must be >= 0, got ridge={config.ridge}, cg_tol={config.cg_tol} "
                         "(a negative ridge makes Sigma indefinite and the reported errors meaningless)")
    if config.cg_steps is not None and config.cg_steps < 1:
        raise ValueError(f"cg_steps must be None or >= 1, got {config.cg_steps}")

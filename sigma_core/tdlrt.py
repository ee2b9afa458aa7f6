"""One TDLRT step: rank-adaptive training of a conv kernel in Tucker format (Zangrando et al. 2023, Algorithm 1).

State of one layer: core ``C`` (r_1..r_4) and orthonormal factors ``U_i`` (n_i, r_i), plus the core's momentum
buffer. One step from the dense-kernel gradient ``G = dL/dW`` at ``W0 = C x_i U_i`` (TDLRT spec Sec. 3):

1. K-steps (l. 2-4): ``Mat_i(C)^T = Q_i S_i^T``; by Theorem 1 ``grad_{K_i} L = Mat_i(G x_{j!=i} U_j^T) Q_i``.
2. Augmentation (l. 5-7): ``U_i^new = orth([U_i | grad_{K_i} L])`` (U first, ``min(2 r_i, n_i, rmax_i)`` columns);
   since ``span[U_i | K_i(lam)] = span[U_i | grad_{K_i}]`` this is the paper's basis, without the cancellation of
   forming ``U_i S_i - lam grad`` (spec Sec. 3.1, fact 5).
3. Core step (l. 8-9): ``C~ = C x_i (U_i^new^T U_i)`` leaves W unchanged, so the core gradient is
   ``G x_i U_i^new^T`` at the same point (fact 4): one forward/backward per batch is exact (mode A).
   SGD with momentum on the core, the buffer transported like the core (spec Sec. 3.5).
4. Truncation (l. 10-12) of the core to relative tolerance tau (:func:`sigma_core.tucker.truncate_tucker`).

Everything runs in ``linalg_dtype`` (float64 by default) on one thread and is cast back by the caller.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, replace
from typing import Callable, Iterator, Sequence

import torch

from sigma_core.decompose._result import TuckerResult, validate_tucker_ranks
from sigma_core.tucker import TRUNCATION_RULES, multi_mode_product, truncate_tucker, unfold

__all__ = ["StepInfo", "TDLRTStepConfig", "TuckerState", "augment_bases", "k_gradients", "orthonormality_error",
           "tdlrt_step", "tdlrt_step_factorized", "single_thread"]


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run the enclosed small linear algebra on one thread, restoring the caller's setting.

    At LeNet scale the per-step matrices are tiny; a second thread only adds synchronisation (spec Sec. 3.3).
    """
    previous = torch.get_num_threads()
    if previous != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if previous != 1:
            torch.set_num_threads(previous)


@dataclass(frozen=True)
class TDLRTStepConfig:
    """Settings of one TDLRT step.

    Parameters
    ----------
    lr : float
        Step size lambda (> 0).
    tau : float
        Relative truncation tolerance in [0, 1).
    adaptive : bool
        Rank-adaptive integrator (augment + truncate); False: fixed-rank (``U^new = orth(K_i(lam))``).
    momentum : float
        Core momentum mu in [0, 1) (PyTorch semantics, dampening 0).
    modes : tuple of int
        Modes that are K-stepped, augmented and truncated (paper: all four).
    rule : {"tntorch", "per-mode"}
        Truncation rule.
    rmin : int
        Smallest rank after truncation.
    rmax : tuple of int or None
        Largest rank per mode (None: the mode sizes).
    linalg_dtype : torch.dtype
        Precision of the step's linear algebra.
    """

    lr: float
    tau: float
    adaptive: bool = True
    momentum: float = 0.0
    modes: tuple[int, ...] = (0, 1, 2, 3)
    rule: str = "tntorch"
    rmin: int = 1
    rmax: tuple[int, ...] | None = None
    linalg_dtype: torch.dtype = torch.float64

    def __post_init__(self) -> None:
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a finite float > 0, got {self.lr!r}")
        if not (isinstance(self.tau, (int, float)) and 0.0 <= self.tau < 1.0):
            raise ValueError(f"tau must be a relative tolerance in [0, 1), got {self.tau!r}")
        if not (isinstance(self.momentum, (int, float)) and 0.0 <= self.momentum < 1.0):
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}")
        if self.rule not in TRUNCATION_RULES:
            raise ValueError(f"rule must be one of {TRUNCATION_RULES}, got {self.rule!r}")
        modes = tuple(self.modes)
        if not modes or len(set(modes)) != len(modes) or not all(m in (0, 1, 2, 3) for m in modes):
            raise ValueError(f"modes must be distinct values in 0..3, got {self.modes!r}")
        object.__setattr__(self, "modes", modes)
        if not (isinstance(self.rmin, int) and self.rmin >= 1):
            raise ValueError(f"rmin must be an int >= 1, got {self.rmin!r}")


@dataclass(frozen=True)
class StepInfo:
    """Per-step record of one layer.

    Attributes
    ----------
    ranks_before, ranks_augmented, ranks_after : tuple of int
    rel_trunc_err : float
        ``||C~' - C' x_i P_i|| / ||C~'||`` of the truncation (0 when not adaptive).
    tail_sq : tuple of float
        Discarded squared singular values per mode.
    orth_err : float
        ``max_i ||U_i^T U_i - I||_max`` of the new factors.
    """

    ranks_before: tuple[int, ...]
    ranks_augmented: tuple[int, ...]
    ranks_after: tuple[int, ...]
    rel_trunc_err: float
    tail_sq: tuple[float, ...]
    orth_err: float


@dataclass
class TuckerState:
    """Container of one layer's Tucker state (replaced, never modified in place, by a step).

    Attributes
    ----------
    core : torch.Tensor, shape (r_1, r_2, r_3, r_4)
    factors : tuple of torch.Tensor
        ``U_i`` (n_i, r_i), orthonormal columns.
    core_buf : torch.Tensor or None
        Momentum buffer shaped like ``core`` (None before the first momentum step).
    """

    core: torch.Tensor
    factors: tuple[torch.Tensor, ...]
    core_buf: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.factors = tuple(self.factors)
        self.validate()

    @classmethod
    def from_result(cls, result: TuckerResult, dtype: torch.dtype = torch.float64) -> "TuckerState":
        """State at ``result``'s factors (cast to ``dtype``), with an empty momentum buffer."""
        return cls(core=result.core.detach().to(dtype), factors=tuple(f.detach().to(dtype) for f in result.factors))

    def to_result(self, *, errors: tuple[float, ...] = (), info: dict | None = None) -> TuckerResult:
        """Frozen :class:`TuckerResult` of the current state (``method="tdlrt"``)."""
        u_t, u_s, u_h, u_w = self.factors
        return TuckerResult(core=self.core.clone(), u_t=u_t.clone(), u_s=u_s.clone(), u_h=u_h.clone(),
                            u_w=u_w.clone(), ranks=self.ranks, errors=errors, converged=True, method="tdlrt",
                            metric="rel_frob_err", info=dict(info or {}))

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(int(n) for n in self.core.shape)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(u.shape[0]) for u in self.factors)

    def validate(self) -> None:
        """Shapes consistent and ranks valid Tucker ranks; raises ValueError otherwise."""
        if self.core.dim() != 4 or len(self.factors) != 4:
            raise ValueError(f"a Tucker state needs a 4-D core and 4 factors, got core {tuple(self.core.shape)} "
                             f"and {len(self.factors)} factors")
        for i, u in enumerate(self.factors):
            if u.dim() != 2 or u.shape[1] != self.core.shape[i]:
                raise ValueError(f"factor {i} must be (n_{i}, {self.core.shape[i]}), got {tuple(u.shape)}")
        validate_tucker_ranks(self.ranks, self.shape)
        if self.core_buf is not None and self.core_buf.shape != self.core.shape:
            raise ValueError(f"core_buf shape {tuple(self.core_buf.shape)} != core shape {tuple(self.core.shape)}")

    def kernel(self) -> torch.Tensor:
        """Dense kernel ``C x_i U_i`` (n_1, n_2, n_3, n_4)."""
        return multi_mode_product(self.core, self.factors)


def orthonormality_error(factors: Sequence[torch.Tensor]) -> float:
    """``max_i ||U_i^T U_i - I||_max``."""
    return max(float((u.T @ u - torch.eye(u.shape[1], dtype=u.dtype, device=u.device)).abs().max())
               for u in factors)


def _others_projected(g: torch.Tensor, factors: Sequence[torch.Tensor], mode: int) -> torch.Tensor:
    """``G x_{j != mode} U_j^T``."""
    return multi_mode_product(g, [None if j == mode else u.T for j, u in enumerate(factors)])


def k_gradients(core: torch.Tensor, factors: Sequence[torch.Tensor], grad_kernel: torch.Tensor,
                modes: Sequence[int] = (0, 1, 2, 3)) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Theorem 1: ``grad_{K_i} L = Mat_i(G x_{j!=i} U_j^T) Q_i`` with ``Mat_i(C)^T = Q_i S_i^T`` (reduced QR).

    Parameters
    ----------
    core : torch.Tensor, shape (r_1, ..., r_4)
    factors : sequence of 4 torch.Tensor, (n_i, r_i)
    grad_kernel : torch.Tensor, shape (n_1, ..., n_4)
        ``G``, the gradient with respect to the dense kernel at ``C x_i U_i``.
    modes : sequence of int

    Returns
    -------
    dict
        mode -> ``(grad_K (n_i, r_i), S_i (r_i, r_i))``.
    """
    out = {}
    for i in modes:
        q, r = torch.linalg.qr(unfold(core, i).T, mode="reduced")
        out[i] = (unfold(_others_projected(grad_kernel, factors, i), i) @ q, r.T)
    return out


def augment_bases(factors: Sequence[torch.Tensor], directions: dict[int, torch.Tensor],
                  max_ranks: Sequence[int]) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """``U_i^new = Q[:, :min(2 r_i, n_i, rmax_i)]`` with ``Q R = [U_i | D_i]`` (spec Sec. 3.3), U first.

    Parameters
    ----------
    factors : sequence of (n_i, r_i) tensors
    directions : dict mode -> (n_i, r_i) tensor
        New directions (K-gradients, or factor gradients in mode B1); modes absent keep their factor.
    max_ranks : sequence of int
        ``rmax_i`` per mode.

    Returns
    -------
    factors_new : tuple of (n_i, r^_i) tensors
    transfers : tuple of (r^_i, r_i) tensors
        ``M_i = U_i^new^T U_i``.
    """
    new, transfers = [], []
    for i, u in enumerate(factors):
        if i not in directions:
            new.append(u)
            transfers.append(torch.eye(u.shape[1], dtype=u.dtype, device=u.device))
            continue
        d = directions[i]
        scale = torch.linalg.norm(d)
        # The span is scale-free; unit scale keeps the QR's pivots on U's scale.
        d = d / scale if float(scale) > 0 else d
        q, _ = torch.linalg.qr(torch.cat([u, d], 1), mode="reduced")
        k = min(2 * u.shape[1], u.shape[0], max(int(max_ranks[i]), u.shape[1]))
        q = q[:, :k]
        new.append(q)
        transfers.append(q.T @ u)
    return tuple(new), tuple(transfers)


def _core_update(core_t: torch.Tensor, buf: torch.Tensor | None, grad_core: torch.Tensor,
                 cfg: TDLRTStepConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    if cfg.momentum > 0:
        buf = grad_core.clone() if buf is None else cfg.momentum * buf + grad_core
        return core_t - cfg.lr * buf, buf
    return core_t - cfg.lr * grad_core, None


def _finish(state: TuckerState, factors_new: tuple[torch.Tensor, ...], core_t: torch.Tensor,
            buf: torch.Tensor | None, cfg: TDLRTStepConfig) -> tuple[TuckerState, StepInfo]:
    ranks_aug = tuple(int(n) for n in core_t.shape)
    if cfg.adaptive:
        rmax = cfg.rmax if cfg.rmax is not None else state.shape
        trunc = truncate_tucker(core_t, cfg.tau, rule=cfg.rule, modes=cfg.modes, rmin=cfg.rmin, rmax=rmax)
        factors = tuple(u @ p for u, p in zip(factors_new, trunc.projections))
        if buf is not None:
            buf = multi_mode_product(buf, [p.T for p in trunc.projections])
        core, rel, tails = trunc.core, trunc.rel_error, trunc.tail_sq
    else:
        factors, core, rel, tails = factors_new, core_t, 0.0, (0.0,) * 4
    new_state = TuckerState(core=core, factors=factors, core_buf=buf)
    info = StepInfo(ranks_before=state.ranks, ranks_augmented=ranks_aug, ranks_after=new_state.ranks,
                    rel_trunc_err=rel, tail_sq=tails, orth_err=orthonormality_error(factors))
    return new_state, info


def _check_finite(tensor: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(tensor).all()):
        raise FloatingPointError(f"{what} has non-finite entries (a bad batch or a diverging lr); the Tucker "
                                 "state was left unchanged")


def tdlrt_step(state: TuckerState, grad_kernel: torch.Tensor, cfg: TDLRTStepConfig) -> tuple[TuckerState, StepInfo]:
    """One TDLRT step from the dense-kernel gradient (mode A, spec Sec. 3.2; paper Algorithm 1).

    Parameters
    ----------
    state : TuckerState
        Current state (``linalg_dtype``); not modified.
    grad_kernel : torch.Tensor, shape (n_1, ..., n_4)
        ``G = dL/dW`` at ``W0 = state.kernel()`` (any dtype; cast to ``cfg.linalg_dtype``).
    cfg : TDLRTStepConfig

    Returns
    -------
    new_state : TuckerState
    info : StepInfo
    """
    if tuple(grad_kernel.shape) != state.shape:
        raise ValueError(f"grad_kernel shape {tuple(grad_kernel.shape)} != kernel shape {state.shape}")
    _check_finite(grad_kernel, "grad_kernel")
    with single_thread():
        g = grad_kernel.detach().to(cfg.linalg_dtype)
        core = state.core.to(cfg.linalg_dtype)
        factors = tuple(u.to(cfg.linalg_dtype) for u in state.factors)
        kgrads = k_gradients(core, factors, g, cfg.modes)
        rmax = cfg.rmax if cfg.rmax is not None else state.shape
        if cfg.adaptive:
            factors_new, transfers = augment_bases(factors, {i: kg for i, (kg, _) in kgrads.items()}, rmax)
        else:
            factors_new, transfers = _fixed_rank_bases(factors, kgrads, cfg.lr)
        core_t = multi_mode_product(core, transfers)
        buf = state.core_buf
        if buf is not None:
            buf = multi_mode_product(buf.to(cfg.linalg_dtype), transfers)
        grad_core = multi_mode_product(g, [u.T for u in factors_new])
        core_t, buf = _core_update(core_t, buf, grad_core, cfg)
        return _finish(state, factors_new, core_t, buf, cfg)


def _fixed_rank_bases(factors, kgrads, lr):
    """Fixed-rank integrator (Algorithm 1, l. 13-14): ``U_i^new = orth(U_i S_i - lam grad_{K_i})``."""
    new, transfers = [], []
    for i, u in enumerate(factors):
        if i in kgrads:
            kg, s = kgrads[i]
            q, _ = torch.linalg.qr(u @ s - lr * kg, mode="reduced")
            new.append(q)
            transfers.append(q.T @ u)
        else:
            new.append(u)
            transfers.append(torch.eye(u.shape[1], dtype=u.dtype, device=u.device))
    return tuple(new), tuple(transfers)


def tdlrt_step_factorized(state: TuckerState, grad_factors: Sequence[torch.Tensor],
                          core_grad_fn: Callable[[torch.Tensor, tuple[torch.Tensor, ...]], torch.Tensor],
                          cfg: TDLRTStepConfig) -> tuple[TuckerState, StepInfo]:
    """Memory-lean two-pass TDLRT step (mode B1, spec Sec. 3.2): no dense kernel gradient is formed.

    Pass 1 (done by the caller): the ordinary Tucker forward/backward gives ``grad_{U_i}``, which spans the same
    augmentation space as ``grad_{K_i}`` (``grad_{U_i} = grad_{K_i} S_i^T``, fact 2). Pass 2: ``core_grad_fn`` runs
    the forward/backward on the same batch with the augmented bases fixed and returns ``dL/dC~`` at ``C~``.

    Parameters
    ----------
    state : TuckerState
    grad_factors : sequence of 4 tensors (n_i, r_i)
        ``dL/dU_i`` at the current point.
    core_grad_fn : callable
        ``(core_tilde, factors_new) -> dL/dcore_tilde`` (same shape as ``core_tilde``).
    cfg : TDLRTStepConfig
        Must be adaptive (the fixed-rank K-step needs ``S_i^{-1}``; use mode A).

    Returns
    -------
    new_state, info : as :func:`tdlrt_step`.
    """
    if not cfg.adaptive:
        raise ValueError("tdlrt_step_factorized implements the rank-adaptive integrator only; use tdlrt_step "
                         "(gradient_mode='dense') for fixed-rank training")
    with single_thread():
        factors = tuple(u.to(cfg.linalg_dtype) for u in state.factors)
        dirs = {}
        for i in cfg.modes:
            gu = grad_factors[i].detach().to(cfg.linalg_dtype)
            _check_finite(gu, f"grad of factor {i}")
            dirs[i] = gu
        rmax = cfg.rmax if cfg.rmax is not None else state.shape
        factors_new, transfers = augment_bases(factors, dirs, rmax)
        core_t = multi_mode_product(state.core.to(cfg.linalg_dtype), transfers)
        buf = state.core_buf
        if buf is not None:
            buf = multi_mode_product(buf.to(cfg.linalg_dtype), transfers)
    grad_core = core_grad_fn(core_t, factors_new).detach().to(cfg.linalg_dtype)
    _check_finite(grad_core, "core gradient")
    with single_thread():
        core_t, buf = _core_update(core_t, buf, grad_core, cfg)
        return _finish(state, factors_new, core_t, buf, cfg)


def with_lr(cfg: TDLRTStepConfig, lr: float) -> TDLRTStepConfig:
    """``cfg`` with another step size (the plateau schedule changes it per epoch)."""
    return replace(cfg, lr=lr)


__all__ += ["with_lr"]

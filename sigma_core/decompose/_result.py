"""Frozen result dataclasses returned by every decomposition."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


@dataclass(frozen=True)
class Tucker2Result:
    """Tucker-2 factorization of a conv kernel ``K ~ G x_1 U_T x_2 U_S``.

    Attributes
    ----------
    core : torch.Tensor, shape (R_T, R_S, H, W)
        Core tensor ``G``.
    u_t : torch.Tensor, shape (T, R_T)
        Output-channel factor (orthonormal columns).
    u_s : torch.Tensor, shape (S, R_S)
        Input-channel factor (orthonormal columns).
    ranks : tuple of int
        ``(R_T, R_S)``.
    errors : tuple of float
        Error history, one value per evaluation (initial, then one per sweep): rel_sigma_err for the
        Sigma solvers, rel_frob_err for the Frobenius baseline (see ``metric``).
    converged : bool
        Whether the stopping tolerance was met before the iteration cap.
    method : str
        Registered method name (``"tucker2-als-sigma"``, ``"tucker2-als"``).
    metric : str
        What ``errors`` measures: ``"rel_sigma_err"`` or ``"rel_frob_err"``.
    info : dict
        Solver diagnostics (CG iterations per sweep, timings, ...). Not compared for equality.
    """

    core: torch.Tensor
    u_t: torch.Tensor
    u_s: torch.Tensor
    ranks: tuple[int, int]
    errors: tuple[float, ...]
    converged: bool
    method: str
    metric: str = "rel_sigma_err"
    info: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        _check(self.core.dim() == 4, f"core must be 4-D (R_T, R_S, H, W), got shape {tuple(self.core.shape)}")
        r_t, r_s = self.ranks
        _check(self.u_t.dim() == 2 and self.u_t.shape[1] == r_t,
               f"u_t must be (T, {r_t}), got {tuple(self.u_t.shape)}")
        _check(self.u_s.dim() == 2 and self.u_s.shape[1] == r_s,
               f"u_s must be (S, {r_s}), got {tuple(self.u_s.shape)}")
        _check(tuple(self.core.shape[:2]) == (r_t, r_s),
               f"core leading dims {tuple(self.core.shape[:2])} != ranks {(r_t, r_s)}")

    @property
    def kernel_shape(self) -> tuple[int, int, int, int]:
        """Shape ``(T, S, H, W)`` of the approximated kernel."""
        return (self.u_t.shape[0], self.u_s.shape[0], self.core.shape[2], self.core.shape[3])

    def reconstruct(self) -> torch.Tensor:
        """Dense kernel ``K~[t,s,h,w] = sum_ab G[a,b,h,w] U_T[t,a] U_S[s,b]``, shape (T, S, H, W)."""
        return torch.einsum("abhw,ta,sb->tshw", self.core, self.u_t, self.u_s)

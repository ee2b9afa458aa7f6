"""Frozen result of a filter-by-filter CP decomposition (NORTON, Pham et al., eq. 2)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

from sigma_core.decompose._result import CPResult, _check


def _index(keep: Sequence[int] | torch.Tensor, size: int, name: str) -> torch.Tensor:
    """Validated int64 index tensor of ``keep`` (sorted ascending; unique) index tensor of ``keep`` into ``range(size)``."""
    idx = torch.as_tensor(list(keep) if not isinstance(keep, torch.Tensor) else keep, dtype=torch.long).reshape(-1)
    if idx.numel() == 0:
        raise ValueError(f"{name} is empty: keep at least one of the {size} indices")
    if int(idx.min()) < 0 or int(idx.max()) >= size:
        raise ValueError(f"{name} must hold indices in [0, {size}), got min {int(idx.min())}, max {int(idx.max())}")
    if torch.unique(idx).numel() != idx.numel():
        raise ValueError(f"{name} holds duplicate indices: {idx.tolist()}")
    return torch.sort(idx).values


@dataclass(frozen=True)
class FilterCPResult:
    """Rank-R CP of every output filter: ``K[t,s,h,w] ~ sum_r U_S[t,s,r] U_H[t,h,r] U_W[t,w,r]`` (NORTON eq. 2).

    Each filter ``K_t`` (S, H, W) has its own factors ``C_t = U_S[t]`` (S, R), ``A_t = U_H[t]`` (H, R) and
    ``B_t = U_W[t]`` (W, R); nothing is shared across filters and the CP weights are folded into the factors
    (balanced: the three columns of a component have one norm).

    Attributes
    ----------
    u_s : torch.Tensor, shape (T, S, R)
    u_h : torch.Tensor, shape (T, H, R)
    u_w : torch.Tensor, shape (T, W, R)
    rank : int
        ``R`` (one rank for every filter, as in the paper).
    errors : tuple of float
        Layer-level relative error (``metric``) after the initialization and after each sweep; non-increasing.
    filter_errors : tuple of float
        Final relative error of every filter under ``metric`` (length T; 0 for an all-zero filter).
    converged : bool
    method : str
        ``"norton-cp"`` or ``"norton-cp-sigma"``.
    metric : str
        ``"rel_frob_err"`` (``||K_t - K~_t|| / ||K_t||``) or ``"rel_sigma_err"`` (the same under the Sigma norm).
    info : dict
        Diagnostics; not compared for equality.
    """

    u_s: torch.Tensor
    u_h: torch.Tensor
    u_w: torch.Tensor
    rank: int
    errors: tuple[float, ...]
    filter_errors: tuple[float, ...]
    converged: bool
    method: str
    metric: str = "rel_frob_err"
    info: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        _check(isinstance(self.rank, int) and not isinstance(self.rank, bool) and self.rank >= 1,
               f"rank must be an int >= 1, got {self.rank!r}")
        for name in ("u_s", "u_h", "u_w"):
            f = getattr(self, name)
            _check(isinstance(f, torch.Tensor) and f.dim() == 3 and f.shape[2] == self.rank and f.shape[1] >= 1,
                   f"{name} must be a 3-D tensor (T, rows, {self.rank}), got "
                   f"{tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__}")
        t = self.u_s.shape[0]
        _check(t >= 1 and self.u_h.shape[0] == t and self.u_w.shape[0] == t,
               f"u_s, u_h, u_w must share the filter count T, got {self.u_s.shape[0]}, {self.u_h.shape[0]}, "
               f"{self.u_w.shape[0]}")
        _check(len({(f.dtype, f.device) for f in self.factors}) == 1, "u_s, u_h, u_w must share one dtype and device")
        _check(len(self.filter_errors) == t, f"filter_errors must have T={t} entries, got {len(self.filter_errors)}")
        _check(self.metric in ("rel_frob_err", "rel_sigma_err"),
               f"metric must be 'rel_frob_err' or 'rel_sigma_err', got {self.metric!r}")

    @property
    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(U_S, U_H, U_W)``: (T, S, R), (T, H, R), (T, W, R)."""
        return (self.u_s, self.u_h, self.u_w)

    @property
    def ranks(self) -> tuple[int]:
        """``(R,)``, like ``CPResult.ranks``."""
        return (self.rank,)

    @property
    def kernel_shape(self) -> tuple[int, int, int, int]:
        """``(T, S, H, W)``."""
        return (self.u_s.shape[0], self.u_s.shape[1], self.u_h.shape[1], self.u_w.shape[1])

    def reconstruct(self) -> torch.Tensor:
        """Dense kernel ``K~[t,s,h,w] = sum_r U_S[t,s,r] U_H[t,h,r] U_W[t,w,r]``, shape (T, S, H, W)."""
        return torch.einsum("tsr,thr,twr->tshw", self.u_s, self.u_h, self.u_w)

    def select_filters(self, keep: Sequence[int] | torch.Tensor) -> "FilterCPResult":
        """The result restricted to the output filters ``keep`` (pruning the producer, NORTON Sec. II-B)."""
        idx = _index(keep, self.kernel_shape[0], "keep")
        errs = tuple(self.filter_errors[i] for i in idx.tolist())
        dev = self.u_s.device
        return replace(self, u_s=self.u_s[idx.to(dev)], u_h=self.u_h[idx.to(dev)], u_w=self.u_w[idx.to(dev)],
                       filter_errors=errs, info={**self.info, "kept_filters": idx.tolist()})

    def restrict_inputs(self, keep_in: Sequence[int] | torch.Tensor) -> "FilterCPResult":
        """The result on the input channels ``keep_in`` only (pruning the layer before; rows of every C_t).

        ``filter_errors`` and ``errors`` still describe the full-input decomposition (``info["kept_inputs"]``
        records the restriction).
        """
        idx = _index(keep_in, self.kernel_shape[1], "keep_in").to(self.u_s.device)
        return replace(self, u_s=self.u_s[:, idx], info={**self.info, "kept_inputs": idx.tolist()})

    def to_layer_cp(self) -> CPResult:
        """The equal layer CP of rank ``T R`` (NORTON block == CPConv, the test oracle of spec Sec. 2.3).

        ``U_S = [C_1 ... C_T]``, ``U_H = [A_1 ... A_T]``, ``U_W = [B_1 ... B_T]`` (columns ``t R + r``) and the fixed
        0/1 output factor ``U_T = kron(I_T, 1_R^T)``.
        """
        t, s, h, w = self.kernel_shape
        r = self.rank
        cols = lambda f: f.permute(1, 0, 2).reshape(f.shape[1], t * r)  # noqa: E731 -- (T, n, R) -> (n, T R)
        u_t = torch.kron(torch.eye(t, dtype=self.u_s.dtype, device=self.u_s.device),
                         torch.ones(1, r, dtype=self.u_s.dtype, device=self.u_s.device))
        return CPResult(u_t=u_t, u_s=cols(self.u_s), u_h=cols(self.u_h), u_w=cols(self.u_w), rank=t * r,
                        errors=self.errors, converged=self.converged, method=self.method, metric=self.metric,
                        info={"from": "FilterCPResult.to_layer_cp"})

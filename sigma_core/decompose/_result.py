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


@dataclass(frozen=True)
class CPResult:
    """Rank-``R`` CP factorization of a conv kernel ``K ~ sum_r U_T[:, r] o U_S[:, r] o U_H[:, r] o U_W[:, r]``.

    Paper Eq. 1 / Eq. 29; first unfolding ``K~_(1) = U_T (U_S kr U_H kr U_W)^T`` (kr = Khatri-Rao, rows of the
    Khatri-Rao product ordered ``s*H*W + h*W + w`` as the columns of ``K1``).

    Attributes
    ----------
    u_t : torch.Tensor, shape (T, R)
        Output-channel factor.
    u_s : torch.Tensor, shape (S, R)
        Input-channel factor.
    u_h : torch.Tensor, shape (H, R)
        Kernel-height factor.
    u_w : torch.Tensor, shape (W, R)
        Kernel-width factor.
    rank : int
        ``R >= 1``.
    errors : tuple of float
        Error history: rel_sigma_err per ALS sweep (sweep 0 = initialization) for the Sigma solvers, per added
        rank-one term for the deflation, rel_frob_err per iteration for the Frobenius baseline (see ``metric``).
    converged : bool
        Whether the stopping tolerance was met before the iteration cap.
    method : str
        Registered method name (``"cp-als-sigma"``, ``"cp-als"``, ``"cp-deflation-sigma"``).
    metric : str
        What ``errors`` measures: ``"rel_sigma_err"`` or ``"rel_frob_err"``.
    info : dict
        Solver diagnostics (timings, CG iterations, ...). Not compared for equality.

    Notes
    -----
    There is no separate weight vector: the CP weights (column scales) are folded into the factors. The
    solvers return them balanced (in each component the four columns have the same norm), which keeps the
    factorized layer's intermediate activations on the scale of the input.
    """

    u_t: torch.Tensor
    u_s: torch.Tensor
    u_h: torch.Tensor
    u_w: torch.Tensor
    rank: int
    errors: tuple[float, ...]
    converged: bool
    method: str
    metric: str = "rel_sigma_err"
    info: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        _check(isinstance(self.rank, int) and not isinstance(self.rank, bool) and self.rank >= 1,
               f"rank must be an int >= 1, got {self.rank!r}")
        for name in ("u_t", "u_s", "u_h", "u_w"):
            factor = getattr(self, name)
            _check(isinstance(factor, torch.Tensor) and factor.dim() == 2 and factor.shape[1] == self.rank
                   and factor.shape[0] >= 1,
                   f"{name} must be a 2-D tensor (rows, {self.rank}), got "
                   f"{tuple(factor.shape) if isinstance(factor, torch.Tensor) else type(factor).__name__}")
        _check(len({(f.dtype, f.device) for f in self.factors}) == 1,
               "u_t, u_s, u_h, u_w must share one dtype and device")

    @property
    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(U_T, U_S, U_H, U_W)``."""
        return (self.u_t, self.u_s, self.u_h, self.u_w)

    @property
    def ranks(self) -> tuple[int]:
        """``(R,)``: the rank as a tuple, like ``Tucker2Result.ranks``."""
        return (self.rank,)

    @property
    def kernel_shape(self) -> tuple[int, int, int, int]:
        """Shape ``(T, S, H, W)`` of the approximated kernel."""
        return (self.u_t.shape[0], self.u_s.shape[0], self.u_h.shape[0], self.u_w.shape[0])

    def reconstruct(self) -> torch.Tensor:
        """Dense kernel ``K~[t,s,h,w] = sum_r U_T[t,r] U_S[s,r] U_H[h,r] U_W[w,r]``, shape (T, S, H, W)."""
        return torch.einsum("tr,sr,hr,wr->tshw", self.u_t, self.u_s, self.u_h, self.u_w)


@dataclass(frozen=True)
class LowRankResult:
    """Rank-``r`` factorization ``W ~ second @ first`` of a linear weight or a 1x1 conv kernel (paper App. E).

    Attributes
    ----------
    first : torch.Tensor, shape (r, in)
        Weight of the first (input-side) layer: ``S_r V_r^T L^{-1}`` for SVD-Sigma, ``S_r V_r^T`` for plain SVD
        (both equal ``U_r^T W``; see :mod:`sigma_core.decompose.svd_sigma`).
    second : torch.Tensor, shape (out, r)
        Weight of the second (output-side) layer: ``U_r`` (orthonormal columns).
    rank : int
        ``r``.
    errors : tuple of float
        One value: the relative error of the truncation under ``metric``.
    converged : bool
        Always True (closed form).
    method : str
        Registered method name (``"svd-sigma"``, ``"svd"``).
    metric : str
        ``"rel_sigma_err"`` or ``"rel_frob_err"``.
    shape : tuple of int, optional
        Shape of the original weight, ``(out, in)`` or ``(T, S, 1, 1)``; :meth:`reconstruct` returns this shape.
        Defaults to ``(out, in)``.
    info : dict
        Diagnostics (singular values, factor method, seconds). Not compared for equality.
    """

    first: torch.Tensor
    second: torch.Tensor
    rank: int
    errors: tuple[float, ...]
    converged: bool
    method: str
    metric: str = "rel_sigma_err"
    shape: tuple[int, ...] | None = None
    info: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        r = self.rank
        _check(self.first.dim() == 2 and self.first.shape[0] == r,
               f"first must be ({r}, in), got {tuple(self.first.shape)}")
        _check(self.second.dim() == 2 and self.second.shape[1] == r,
               f"second must be (out, {r}), got {tuple(self.second.shape)}")
        matrix = (self.second.shape[0], self.first.shape[1])
        object.__setattr__(self, "shape", matrix if self.shape is None else tuple(int(d) for d in self.shape))
        _check(self.shape[:2] == matrix and all(d == 1 for d in self.shape[2:]),
               f"shape {self.shape} does not match the factors' matrix shape {matrix} (out, in[, 1, 1])")

    @property
    def ranks(self) -> tuple[int]:
        """``(r,)``: the rank as a tuple, like the other results' ``ranks``."""
        return (self.rank,)

    def reconstruct(self) -> torch.Tensor:
        """Dense weight ``second @ first`` in the original weight's shape (``(out, in)`` or ``(T, S, 1, 1)``)."""
        return (self.second @ self.first).reshape(self.shape)


def validate_tucker_ranks(ranks, shape) -> tuple[int, ...]:
    """Check ``1 <= r_i <= n_i`` and ``r_i <= prod_{j != i} r_j``; return the ranks as a tuple of int.

    Raises
    ------
    ValueError
        Naming the offending mode and the valid range.
    """
    import math

    ranks = tuple(ranks)
    shape = tuple(int(n) for n in shape)
    if len(ranks) != len(shape) or not all(isinstance(r, int) and not isinstance(r, bool) for r in ranks):
        raise ValueError(f"ranks must be {len(shape)} ints (one per mode of {shape}), got {ranks!r}")
    for i, (r, n) in enumerate(zip(ranks, shape)):
        if not 1 <= r <= n:
            raise ValueError(f"rank {r} of mode {i} must satisfy 1 <= r <= n_{i}={n} (ranks {ranks}, shape {shape})")
        others = math.prod(ranks[:i] + ranks[i + 1:])
        if r > others:
            raise ValueError(f"ranks {ranks} are not valid Tucker ranks: r_{i}={r} > product of the other ranks "
                             f"{others}; lower r_{i} to <= {others} or raise the other ranks")
    return ranks


@dataclass(frozen=True)
class TuckerResult:
    """Full 4-mode Tucker factorization ``K ~ C x_1 U_T x_2 U_S x_3 U_H x_4 U_W`` of a conv kernel.

    TDLRT spec Sec. 2.3 (Zangrando et al. 2023, Sec. 2.1).

    Attributes
    ----------
    core : torch.Tensor, shape (R_T, R_S, R_H, R_W)
    u_t, u_s, u_h, u_w : torch.Tensor, shapes (T, R_T), (S, R_S), (H, R_H), (W, R_W)
        Orthonormal-column factors.
    ranks : tuple of int
        ``(R_T, R_S, R_H, R_W)``, valid Tucker ranks (``r_i <= prod_{j != i} r_j``).
    errors : tuple of float
        Error history (``metric``).
    converged : bool
    method : str
        ``"tucker-hosvd"``, ``"tdlrt"``, ...
    metric : str
        ``"rel_frob_err"`` or ``"rel_sigma_err"``.
    info : dict
        Diagnostics. Not compared for equality.
    """

    core: torch.Tensor
    u_t: torch.Tensor
    u_s: torch.Tensor
    u_h: torch.Tensor
    u_w: torch.Tensor
    ranks: tuple[int, int, int, int]
    errors: tuple[float, ...]
    converged: bool
    method: str
    metric: str = "rel_frob_err"
    info: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        _check(isinstance(self.core, torch.Tensor) and self.core.dim() == 4,
               f"core must be a 4-D tensor (R_T, R_S, R_H, R_W), got "
               f"{tuple(self.core.shape) if isinstance(self.core, torch.Tensor) else type(self.core).__name__}")
        ranks = tuple(self.ranks)
        _check(len(ranks) == 4, f"ranks must be 4 ints (R_T, R_S, R_H, R_W), got {self.ranks!r}")
        for name, r in zip(("u_t", "u_s", "u_h", "u_w"), ranks):
            factor = getattr(self, name)
            _check(isinstance(factor, torch.Tensor) and factor.dim() == 2 and factor.shape[1] == r,
                   f"{name} must be (rows, {r}), got "
                   f"{tuple(factor.shape) if isinstance(factor, torch.Tensor) else type(factor).__name__}")
        _check(tuple(self.core.shape) == ranks, f"core shape {tuple(self.core.shape)} != ranks {ranks}")
        validate_tucker_ranks(ranks, self.kernel_shape)
        object.__setattr__(self, "ranks", ranks)

    @property
    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(U_T, U_S, U_H, U_W)``."""
        return (self.u_t, self.u_s, self.u_h, self.u_w)

    @property
    def kernel_shape(self) -> tuple[int, int, int, int]:
        """Shape ``(T, S, H, W)`` of the approximated kernel."""
        return tuple(int(f.shape[0]) for f in self.factors)  # type: ignore[return-value]

    def reconstruct(self) -> torch.Tensor:
        """Dense kernel ``K~ = einsum("abcd,ta,sb,hc,wd->tshw")``, shape (T, S, H, W)."""
        return torch.einsum("abcd,ta,sb,hc,wd->tshw", self.core, *self.factors)

    def to_tucker2(self) -> Tucker2Result:
        """Exact Tucker-2 form ``(C x_3 U_H x_4 U_W, U_T, U_S)`` (cheaper when the spatial ranks are full)."""
        core = torch.einsum("abcd,hc,wd->abhw", self.core, self.u_h, self.u_w)
        return Tucker2Result(core=core, u_t=self.u_t, u_s=self.u_s, ranks=ranks_pair(self.ranks),
                             errors=self.errors, converged=self.converged, method=self.method, metric=self.metric,
                             info=dict(self.info))


def ranks_pair(ranks: tuple[int, ...]) -> tuple[int, int]:
    return (int(ranks[0]), int(ranks[1]))

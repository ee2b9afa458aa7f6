"""Pure parts of RENE's learned rank search (Aghababaei-Harandi & Amini 2024, Sec. 4; RENE spec Sec. 3-5, 10.2).

- Candidate grids and the coarse-to-fine refinement of Fig. 3 (as the public code runs it, not Algorithm 1 as
  printed: the bounds use the *current* step, then the step is divided).
- :class:`MixedRankConv`: one dense conv whose kernel is the softmax-mixed sum of independent low-rank branches,
  ``W_mix = sum_r softmax(logits)_r W^(r)`` (Sec. 4.1); by linearity of the conv this equals mixing the branch
  outputs, at the cost of one conv, and it handles every padding mode through the original conv's forward.
- The losses: rank loss (Eq. 5), weight loss (Eq. 6), logit loss (Eq. 7), with the Sigma variant of the
  decomposition term (Proposition 1 of the Sigma paper: the relative mean squared change of the layer output).
- :func:`project_to_budget`: greedy projection of a rank map onto a parameter budget (an extension, spec 10.6).
- Frozen, JSON-able :class:`StageRecord` / :class:`RankSearchResult`.

The paper's softmax weights are called "rank logits" here: in this project ``alpha`` is the VBMF ratio of Eq. 2.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from sigma_core.layers import CPConv, Tucker2Conv

__all__ = [
    "candidate_grid",
    "sanitize",
    "refine",
    "n_stages",
    "MixedRankConv",
    "rank_loss",
    "weight_loss",
    "logit_loss",
    "project_to_budget",
    "StageRecord",
    "RankSearchResult",
    "FAMILIES",
    "DECOMPOSITION_KINDS",
]

FAMILIES = ("tucker2", "cp")
DECOMPOSITION_KINDS = ("frob", "frob_rel", "sigma")


def _int(value: object, name: str, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


# ----------------------------------------------------------------------------------------------------------
# Grids (Fig. 3)
# ----------------------------------------------------------------------------------------------------------


def candidate_grid(lo: int, hi: int, step: int) -> tuple[int, ...]:
    """``(lo, lo + step, ..., <= hi)``: the first-stage candidate ranks (Alg. 1, line 1).

    Raises
    ------
    ValueError
        ``lo < 1``, ``step < 1`` or an inverted / empty range (``hi < lo``).
    """
    lo, hi, step = _int(lo, "rank_min"), _int(hi, "rank_max"), _int(step, "step")
    if hi < lo:
        raise ValueError(f"empty candidate grid: rank_max={hi} < rank_min={lo}; give rank_min <= rank_max")
    return tuple(range(lo, hi + 1, step))


def sanitize(grid: Sequence[int], r_max: int) -> tuple[int, ...]:
    """Candidates clipped to ``[1, r_max]``, deduplicated and sorted (the public code's per-layer sanitation)."""
    r_max = _int(r_max, "r_max")
    if not grid:
        raise ValueError("candidate grid is empty")
    return tuple(sorted({min(max(1, int(r)), r_max) for r in grid}))


def refine(r_bar: int, s: int, f: int) -> tuple[int, int, int, tuple[int, ...]]:
    """One coarse-to-fine step of Fig. 3: ``(lb, ub, s_next, grid)``.

    ``lb = max(1, floor(r_bar - s/2))``, ``ub = ceil(r_bar + s/2)`` with the *current* step ``s``, then
    ``s_next = s // f`` and ``grid = (lb, lb + s_next, ..., <= ub)``. ``s_next == 0`` means the search stops
    (``grid`` is then empty). E.g. ``refine(200, 100, 10)`` -> 150..250 step 10, ``refine(240, 10, 10)`` ->
    235..245 step 1. Algorithm 1 as printed divides ``s`` first (giving [195, 205]); the figure and the code
    do not.
    """
    r_bar, s = _int(r_bar, "r_bar"), _int(s, "step")
    f = _int(f, "factor", 2)
    lb = max(1, math.floor(r_bar - s / 2))
    ub = math.ceil(r_bar + s / 2)
    s_next = s // f
    grid = tuple(range(lb, ub + 1, s_next)) if s_next >= 1 else ()
    return lb, ub, s_next, grid


def n_stages(step: int, factor: int) -> int:
    """Number of search stages: one per step ``s, s // f, ...`` while ``s >= 1`` (Fig. 3)."""
    s, f = _int(step, "step"), _int(factor, "factor", 2)
    count = 0
    while s >= 1:
        count += 1
        s //= f
    return count


# ----------------------------------------------------------------------------------------------------------
# Supernet layer (Sec. 4.1)
# ----------------------------------------------------------------------------------------------------------


class MixedRankConv(nn.Module):
    """A conv whose kernel is the softmax mixture of independent low-rank branches (RENE supernet layer).

    Parameters
    ----------
    conv : nn.Conv2d
        The pretrained conv (groups 1). A frozen copy provides the geometry, the bias and the target kernel.
    branches : sequence of Tucker2Conv or CPConv
        One decomposition of ``conv.weight`` per candidate rank; used only as parameter containers with
        ``reconstructed_kernel()`` (their own forward is never called).
    ranks : sequence of int
        The candidate rank of each branch (strictly increasing).

    Attributes
    ----------
    logits : nn.Parameter, shape (len(ranks),)
        Rank logits (the paper's alpha), initialized to 0 (uniform coefficients).
    target : torch.Tensor (buffer), shape (T, S, H, W)
        The pretrained kernel ``W``, the target of the decomposition term.
    """

    def __init__(self, conv: nn.Conv2d, branches: Sequence[nn.Module], ranks: Sequence[int]) -> None:
        super().__init__()
        if not isinstance(conv, nn.Conv2d) or conv.groups != 1:
            raise ValueError("MixedRankConv needs an nn.Conv2d with groups == 1")
        ranks = tuple(_int(r, "rank") for r in ranks)
        if not ranks or len(ranks) != len(branches):
            raise ValueError(f"need one branch per candidate rank, got {len(branches)} branches for ranks {ranks}")
        if any(b <= a for a, b in zip(ranks, ranks[1:])):
            raise ValueError(f"candidate ranks must be strictly increasing, got {ranks}")
        for branch in branches:
            if not isinstance(branch, (Tucker2Conv, CPConv)):
                raise ValueError(f"branches must be Tucker2Conv or CPConv, got {type(branch).__name__}")
        frozen = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                           padding=conv.padding, dilation=conv.dilation, groups=1, bias=conv.bias is not None,
                           padding_mode=conv.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            frozen.weight.copy_(conv.weight)
            if conv.bias is not None:
                frozen.bias.copy_(conv.bias)
        frozen.requires_grad_(False)
        self._conv = frozen
        self.register_buffer("target", conv.weight.detach().clone())
        self.ranks = ranks
        self.branches = nn.ModuleList(branches)
        for branch in self.branches:  # the bias is the frozen conv's: a branch's own copy is never used
            for name, param in branch.named_parameters():
                if name.endswith("bias"):
                    param.requires_grad_(False)
        self.logits = nn.Parameter(torch.zeros(len(ranks), device=conv.weight.device, dtype=conv.weight.dtype))
        self._frozen: torch.Tensor | None = None

    def p(self) -> torch.Tensor:
        """Coefficients ``softmax(logits)``, shape (n_candidates,)."""
        return torch.softmax(self.logits, dim=0)

    def branch_kernels(self) -> torch.Tensor:
        """Reconstructed kernel of every branch, shape (n_candidates, T, S, H, W)."""
        return torch.stack([b.reconstructed_kernel() for b in self.branches])

    def mixed_kernel(self) -> torch.Tensor:
        """``W_mix = sum_r p_r W^(r)``, shape (T, S, H, W) (branch kernels from :meth:`freeze_branches` if set)."""
        kernels = self._frozen if self._frozen is not None else self.branch_kernels()
        return torch.einsum("r,rtshw->tshw", self.p(), kernels)

    def freeze_branches(self, frozen: bool = True) -> None:
        """Use detached branch kernels until called with ``False``: the logit step differentiates the logits only,
        so rebuilding (and back-propagating through) every branch there is wasted work."""
        with torch.no_grad():
            self._frozen = self.branch_kernels().detach() if frozen else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The original conv with the mixed kernel (every padding mode, stride, dilation of ``conv``)."""
        return self._conv._conv_forward(x, self.mixed_kernel(), self._conv.bias)

    def best_rank(self) -> int:
        """``ranks[argmax p]`` (Alg. 1, line 11); raises ``FloatingPointError`` on non-finite logits."""
        if not bool(torch.isfinite(self.logits).all()):
            raise FloatingPointError(f"rank logits are not finite: {self.logits.detach().tolist()}")
        return self.ranks[int(torch.argmax(self.logits.detach()))]

    def expected_rank(self) -> torch.Tensor:
        """``sum_r p_r r`` (a scalar tensor, differentiable in the logits)."""
        return self.p() @ torch.tensor(self.ranks, dtype=self.logits.dtype, device=self.logits.device)

    def rank_term(self, beta: float) -> torch.Tensor:
        """``(sum_r p_r r / max R)^beta`` of Eq. 5 (the inner expectation clamped at 1e-12, as the code does)."""
        return (self.expected_rank() / max(self.ranks)).clamp_min(1e-12) ** beta

    def decomposition_sq(self, kind: str = "frob", sigma: torch.Tensor | None = None,
                         kernel: torch.Tensor | None = None) -> torch.Tensor:
        """Decomposition term of ``kernel`` (default: the mixed kernel) against the pretrained kernel.

        ``"frob"``: ``||W - W_mix||_F^2`` (Eq. 6, unnormalized); ``"frob_rel"``: divided by ``||W||_F^2``;
        ``"sigma"``: ``tr(D Sigma D^T) / tr(W_(1) Sigma W_(1)^T)`` with ``D = (W - W_mix)_(1)`` (T, S H W) and
        ``sigma`` the layer's input second moment (S H W, S H W): the relative mean squared output change.
        """
        approx = self.mixed_kernel() if kernel is None else kernel
        delta = (self.target - approx).reshape(self.target.shape[0], -1)
        if kind == "frob":
            return (delta * delta).sum()
        if kind == "frob_rel":
            return (delta * delta).sum() / (self.target * self.target).sum().clamp_min(1e-30)
        if kind == "sigma":
            if sigma is None:
                raise ValueError("decomposition kind 'sigma' needs the layer's Sigma")
            n = delta.shape[1]
            if tuple(sigma.shape) != (n, n):
                raise ValueError(f"Sigma must be ({n}, {n}) for kernel {tuple(self.target.shape)}, got "
                                 f"{tuple(sigma.shape)}")
            sig = sigma.to(device=delta.device, dtype=delta.dtype)
            w1 = self.target.reshape(self.target.shape[0], -1)
            denom = ((w1 @ sig) * w1).sum().clamp_min(1e-30)
            return ((delta @ sig) * delta).sum() / denom
        raise ValueError(f"decomposition kind must be one of {DECOMPOSITION_KINDS}, got {kind!r}")

    def branch_parameters(self) -> list[nn.Parameter]:
        """Every branch factor (the weight step's parameters; the branches' bias copies are unused)."""
        return [p for b in self.branches for name, p in b.named_parameters() if not name.endswith("bias")]

    def logit_parameters(self) -> list[nn.Parameter]:
        """``[logits]`` (the logit step's parameters)."""
        return [self.logits]

    def extra_repr(self) -> str:
        return f"ranks={self.ranks}"


# ----------------------------------------------------------------------------------------------------------
# Losses (Eq. 5-7)
# ----------------------------------------------------------------------------------------------------------


def _check_gamma_beta(gamma: float, beta: float) -> None:
    for name, value in (("gamma", gamma), ("beta", beta)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 < float(value) <= 1.0:
            raise ValueError(f"{name} must be a number in (0, 1] (paper: gamma=0.4, beta=0.8), got {value!r}")


def rank_loss(layers: Sequence[MixedRankConv], gamma: float, beta: float) -> torch.Tensor:
    """Eq. 5: ``L_r = gamma sum_i (sum_r p_i^(r) r / max R_i)^beta`` (a scalar tensor)."""
    _check_gamma_beta(gamma, beta)
    if not layers:
        raise ValueError("rank_loss needs at least one MixedRankConv layer")
    return gamma * torch.stack([layer.rank_term(beta) for layer in layers]).sum()


def weight_loss(layers: Sequence[MixedRankConv], gamma: float, beta: float, kind: str = "frob",
                sigmas: Sequence[torch.Tensor | None] | None = None) -> tuple[torch.Tensor, dict]:
    """Eq. 6: ``L_Tw = [sum_i d_i(W_mix,i)] x L_r``; the branch weights' loss (data-free unless ``kind='sigma'``).

    Returns ``(loss, parts)`` with ``parts = {"decomposition": L_d, "rank": L_r, "per_layer": [d_i, ...]}``.
    With the coefficients fixed, ``grad_W L_Tw = L_r grad_W L_d``: the rank loss only rescales the step.
    """
    sigmas = list(sigmas) if sigmas is not None else [None] * len(layers)
    if len(sigmas) != len(layers):
        raise ValueError(f"need one Sigma (or None) per layer: {len(sigmas)} for {len(layers)} layers")
    per_layer = [layer.decomposition_sq(kind, sigma) for layer, sigma in zip(layers, sigmas)]
    l_d = torch.stack(per_layer).sum()
    l_r = rank_loss(layers, gamma, beta)
    return l_d * l_r, {"decomposition": l_d, "rank": l_r, "per_layer": per_layer}


def logit_loss(objective_value: torch.Tensor, layers: Sequence[MixedRankConv], gamma: float,
               beta: float) -> tuple[torch.Tensor, dict]:
    """Eq. 7: ``L_Ta = L_obj x L_r`` (``L_obj``: validation cross-entropy in the paper); ``(loss, parts)``."""
    l_r = rank_loss(layers, gamma, beta)
    return objective_value * l_r, {"objective": objective_value, "rank": l_r}


# ----------------------------------------------------------------------------------------------------------
# Budget projection (extension, spec 10.6)
# ----------------------------------------------------------------------------------------------------------


def project_to_budget(ranks: Mapping[str, int], params: Callable[[str, int], int],
                      error: Callable[[str, int], float], budget: int, *, fixed_params: int = 0,
                      floor: int = 1) -> tuple[dict[str, int], list[dict]]:
    """Lower ranks greedily until ``fixed_params + sum_i params(i, r_i) <= budget``.

    Each step lowers by one the rank of the layer whose step down costs the least error increase per parameter
    saved (``(error(i, r-1) - error(i, r)) / (params(i, r) - params(i, r-1))``). The loop stops at the first
    feasible map, so undoing its last step would exceed the budget.

    Returns
    -------
    ranks : dict of str to int
    changes : list of dict
        One ``{"layer", "from", "to", "params"}`` per step, in order.

    Raises
    ------
    ValueError
        The budget is below the smallest reachable model (every layer at ``floor``).
    """
    budget = _int(budget, "param_budget")
    current = {name: _int(r, f"rank of {name}") for name, r in ranks.items()}
    smallest = fixed_params + sum(params(name, floor) for name in current)
    if smallest > budget:
        raise ValueError(f"param_budget={budget} is below the smallest reachable model ({smallest} parameters with "
                         f"every searched layer at rank {floor}); raise the budget")
    total = fixed_params + sum(params(name, r) for name, r in current.items())
    changes: list[dict] = []
    while total > budget:
        best, best_cost = None, math.inf
        for name, r in current.items():
            if r <= floor:
                continue
            saved = params(name, r) - params(name, r - 1)
            if saved <= 0:
                continue
            cost = (error(name, r - 1) - error(name, r)) / saved
            if cost < best_cost:
                best, best_cost = name, cost
        if best is None:  # pragma: no cover - excluded by the smallest-model check
            raise ValueError(f"param_budget={budget} cannot be met")
        r = current[best]
        total -= params(best, r) - params(best, r - 1)
        current[best] = r - 1
        changes.append({"layer": best, "from": r, "to": r - 1, "params": total})
    return current, changes


# ----------------------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------------------


def _tuple_map(mapping: Mapping[str, Sequence], cast: Callable) -> dict[str, tuple]:
    return {str(k): tuple(cast(v) for v in vals) for k, vals in mapping.items()}


@dataclass(frozen=True)
class StageRecord:
    """One coarse-to-fine stage of the search.

    Attributes
    ----------
    step : int
        Stage index (0 = coarsest).
    s : int
        Candidate spacing of this stage.
    candidates : dict of str to tuple of int
        Per-layer candidate ranks.
    coefficients : dict of str to tuple of float
        Final ``softmax(logits)`` per layer.
    selected : dict of str to int
        ``argmax`` candidate per layer (``r_bar``).
    final_losses : dict of str to float
        ``decomposition``, ``rank``, ``objective`` at the last iteration.
    diagnostics : dict
        Per layer ``max_abs_logit``, ``entropy``, ``p_spread`` (max p - min p), ``mixture_rel_err`` and
        ``branch_rel_err`` (standalone relative Frobenius error of each branch after training).
    seconds : float
    """

    step: int
    s: int
    candidates: dict[str, tuple[int, ...]]
    coefficients: dict[str, tuple[float, ...]]
    selected: dict[str, int]
    final_losses: dict[str, float]
    diagnostics: dict = field(default_factory=dict)
    seconds: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "candidates", _tuple_map(self.candidates, int))
        object.__setattr__(self, "coefficients", _tuple_map(self.coefficients, float))
        object.__setattr__(self, "selected", {str(k): int(v) for k, v in self.selected.items()})
        if set(self.candidates) != set(self.selected) or set(self.coefficients) != set(self.selected):
            raise ValueError("candidates, coefficients and selected must name the same layers")
        for name, r in self.selected.items():
            if r not in self.candidates[name]:
                raise ValueError(f"selected rank {r} of {name} is not among its candidates {self.candidates[name]}")
            if len(self.coefficients[name]) != len(self.candidates[name]):
                raise ValueError(f"{name}: one coefficient per candidate needed")

    def to_dict(self) -> dict:
        return {k: ({n: list(v) for n, v in val.items()} if k in ("candidates", "coefficients") else val)
                for k, val in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "StageRecord":
        return cls(**dict(data))


@dataclass(frozen=True)
class RankSearchResult:
    """Outcome of a RENE search: per-layer ranks and the record of every stage.

    Attributes
    ----------
    ranks : dict of str to tuple of int
        ``(r, r)`` per layer for family ``"tucker2"`` (tied TT ranks), ``(R,)`` for ``"cp"``.
    family : {"tucker2", "cp"}
    stages : tuple of StageRecord
    seconds : float
        Wall time of the search.
    config : dict
        The search configuration (JSON-able).
    projection : list of dict
        Budget projection steps (empty when no budget was set or it was already met).
    """

    ranks: dict[str, tuple[int, ...]]
    family: str
    stages: tuple[StageRecord, ...]
    seconds: float
    config: dict = field(default_factory=dict)
    projection: tuple[dict, ...] = ()

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        ranks = _tuple_map(self.ranks, int)
        width = 2 if self.family == "tucker2" else 1
        bad = {k: v for k, v in ranks.items() if len(v) != width or min(v) < 1}
        if bad:
            raise ValueError(f"{self.family} ranks must be {width}-tuples of ints >= 1, got {bad}")
        object.__setattr__(self, "ranks", ranks)
        object.__setattr__(self, "stages", tuple(s if isinstance(s, StageRecord) else StageRecord.from_dict(s)
                                                 for s in self.stages))
        object.__setattr__(self, "projection", tuple(dict(c) for c in self.projection))

    @property
    def projected(self) -> bool:
        return bool(self.projection)

    def to_dict(self) -> dict:
        return {"ranks": {k: list(v) for k, v in self.ranks.items()}, "family": self.family,
                "stages": [s.to_dict() for s in self.stages], "seconds": self.seconds, "config": dict(self.config),
                "projection": list(self.projection)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RankSearchResult":
        return cls(ranks=data["ranks"], family=data["family"], stages=tuple(data["stages"]),
                   seconds=float(data["seconds"]), config=dict(data.get("config", {})),
                   projection=tuple(data.get("projection", ())))

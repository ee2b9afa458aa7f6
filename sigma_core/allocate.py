"""Budgeted rank allocation: one candidate per layer, least total error, total cost within a budget.

The problem is the multiple-choice knapsack (MCKP)

    min_{j_1..j_L} sum_l e_l(j_l)   subject to   sum_l c_l(j_l) <= B,

with integer costs ``c`` (parameters or MACs, :mod:`sigma_core.costs`) and real errors ``e`` (a per-layer error
proxy: ``rel_sigma_err^2`` -- the relative output MSE of Proposition 1 -- or a measured loss increase).

It is solved exactly by dynamic programming over the Pareto front of partial solutions: after layer ``l`` the
state set holds, for every reachable total cost ``c <= B`` of layers ``1..l``, the least total error -- but only
the states that are not dominated (no other state has a cost ``<=`` and an error ``<``). Adding layer ``l + 1``
forms all (state, candidate) sums, drops those above ``B`` and prunes to the new front; a dominated partial
solution can never complete to a better full one, so the minimum over the last front is the optimum (the
classical Pareto/"list" DP for knapsacks, e.g. Kellerer, Pferschy & Pisinger 2004, Sec. 11.3). Its cost is
``O(sum_l |F_l| |C_l| log)`` with ``|F_l|`` bounded by the number of distinct reachable costs; unlike a DP on a
cost grid it needs no discretization, so it is exact for costs in the millions. ``quantum > 1`` rounds every
cost *up* to a multiple of it (a safe, coarser problem: the budget is still never exceeded) should a front get
too large.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Candidate", "LayerCandidates", "Allocation", "allocate", "reachable_cost", "pareto_prune", "RankTarget"]


@dataclass(frozen=True)
class Candidate:
    """One option for one layer.

    Attributes
    ----------
    ranks : tuple of int
        The ranks handed to the layer's method (``(R_T, R_S)``, ``(R,)``, ``(r,)``); ``()`` means "keep the
        layer dense".
    cost : int
        Parameters or MACs of the layer with these ranks (>= 0).
    error : float
        The error proxy of the layer with these ranks (finite; 0 for the dense layer).
    """

    ranks: tuple[int, ...]
    cost: int
    error: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "ranks", tuple(int(r) for r in self.ranks))
        if isinstance(self.cost, bool) or int(self.cost) != self.cost or self.cost < 0:
            raise ValueError(f"candidate cost must be an int >= 0, got {self.cost!r}")
        object.__setattr__(self, "cost", int(self.cost))
        if not math.isfinite(float(self.error)):
            raise ValueError(f"candidate error must be finite, got {self.error!r} for ranks {self.ranks}")
        object.__setattr__(self, "error", float(self.error))

    @property
    def dense(self) -> bool:
        return self.ranks == ()


@dataclass(frozen=True)
class LayerCandidates:
    """All options of one layer (at least one)."""

    name: str
    candidates: tuple[Candidate, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "candidates", tuple(self.candidates))
        if not self.candidates:
            raise ValueError(f"layer {self.name!r} has no candidate ranks")

    @property
    def min_cost(self) -> int:
        return min(c.cost for c in self.candidates)

    @property
    def max_cost(self) -> int:
        return max(c.cost for c in self.candidates)


@dataclass(frozen=True)
class Allocation:
    """The chosen candidate of every layer.

    Attributes
    ----------
    names : tuple of str
    choices : tuple of Candidate
        ``choices[i]`` for layer ``names[i]``.
    predicted_error : float
        ``sum_l e_l`` of the choices (the minimized objective).
    cost : int
        ``sum_l c_l`` of the choices (exact costs, also when ``quantum > 1``).
    budget : int
    slack : int
        ``budget - cost`` (>= 0).
    front_sizes : tuple of int
        Size of the Pareto front after each layer (diagnostics).
    """

    names: tuple[str, ...]
    choices: tuple[Candidate, ...]
    predicted_error: float
    cost: int
    budget: int
    slack: int
    front_sizes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if len(self.names) != len(self.choices):
            raise ValueError("names and choices differ in length")
        if self.cost > self.budget or self.slack != self.budget - self.cost:
            raise ValueError(f"inconsistent allocation: cost {self.cost}, budget {self.budget}, slack {self.slack}")

    @property
    def ranks(self) -> dict[str, tuple[int, ...]]:
        """Layer -> chosen ranks (``()``: left dense)."""
        return {name: c.ranks for name, c in zip(self.names, self.choices)}


def pareto_prune(candidates: Sequence[Candidate]) -> list[Candidate]:
    """The candidates no other one dominates (cost <= and error <), by increasing cost (ties: first kept)."""
    order = sorted(range(len(candidates)), key=lambda i: (candidates[i].cost, candidates[i].error, i))
    kept, best = [], math.inf
    for i in order:
        if candidates[i].error < best:
            kept.append(candidates[i])
            best = candidates[i].error
    return kept


def reachable_cost(layers: Sequence[LayerCandidates]) -> tuple[int, int]:
    """``(min, max)`` total cost over all choices."""
    return sum(l.min_cost for l in layers), sum(l.max_cost for l in layers)


def _check_int(value, label: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{label} must be an int >= 0, got {value!r}")
    return int(value)


def allocate(layers: Sequence[LayerCandidates] | Mapping[str, Sequence[Candidate]], budget: int, *,
             quantum: int = 1, max_front: int = 2_000_000) -> Allocation:
    """Exact multiple-choice knapsack: least total error with total cost ``<= budget``.

    Parameters
    ----------
    layers : sequence of LayerCandidates, or mapping name -> candidates
    budget : int
        Upper bound on the summed candidate costs (costs of layers that are not allocated are the caller's to
        subtract first).
    quantum : int
        1 (default): exact. ``q > 1``: costs rounded up to multiples of ``q`` inside the DP (never exceeds
        the budget; optimal for the rounded problem only).
    max_front : int
        Refuse (ValueError, suggesting ``quantum``) when one DP step would form more (state, candidate) pairs.

    Returns
    -------
    Allocation
        Ties in total error go to the cheaper solution.

    Raises
    ------
    ValueError
        No layer, a negative budget, or a budget below the cheapest choice (the message gives the reachable range).
    """
    if isinstance(layers, Mapping):
        layers = [LayerCandidates(name, tuple(c)) for name, c in layers.items()]
    layers = list(layers)
    if not layers:
        raise ValueError("allocate needs at least one layer")
    budget = _check_int(budget, "budget")
    quantum = _check_int(quantum, "quantum")
    if quantum < 1:
        raise ValueError("quantum must be >= 1")
    lo, hi = reachable_cost(layers)
    if lo > budget:
        raise ValueError(f"budget {budget} is below the cheapest allocation ({lo}); reachable total costs: "
                         f"[{lo}, {hi}]")
    pruned = [pareto_prune(l.candidates) for l in layers]
    q_budget = budget // quantum
    front_cost = np.zeros(1, dtype=np.int64)
    front_err = np.zeros(1, dtype=np.float64)
    parents: list[np.ndarray] = []
    picks: list[np.ndarray] = []
    sizes = []
    for name, cands in zip((l.name for l in layers), pruned):
        c = np.array([-(-cand.cost // quantum) for cand in cands], dtype=np.int64)
        e = np.array([cand.error for cand in cands], dtype=np.float64)
        if front_cost.size * c.size > max_front:
            raise ValueError(f"the Pareto front at layer {name!r} would form {front_cost.size * c.size} pairs "
                             f"(> max_front={max_front}); pass quantum > 1 (e.g. {max(quantum * 10, 16)}) or "
                             "fewer candidates")
        tot_c = (front_cost[:, None] + c[None, :]).ravel()
        tot_e = (front_err[:, None] + e[None, :]).ravel()
        ok = np.flatnonzero(tot_c <= q_budget)
        order = ok[np.lexsort((tot_e[ok], tot_c[ok]))]
        errs = tot_e[order]
        # Keep a state when its error is strictly below every cheaper state's (running minimum).
        prev_min = np.concatenate([[np.inf], np.minimum.accumulate(errs)[:-1]])
        keep = order[errs < prev_min]
        parents.append(keep // c.size)
        picks.append(keep % c.size)
        front_cost, front_err = tot_c[keep], tot_e[keep]
        sizes.append(int(keep.size))
    best = int(np.argmin(front_err))  # fronts are sorted by cost: the first minimum is the cheapest
    chosen = []
    for parent, pick, cands in zip(reversed(parents), reversed(picks), reversed(pruned)):
        chosen.append(cands[int(pick[best])])
        best = int(parent[best])
    chosen.reverse()
    cost = sum(c.cost for c in chosen)
    return Allocation(tuple(l.name for l in layers), tuple(chosen), float(sum(c.error for c in chosen)), cost,
                      budget, budget - cost, tuple(sizes))


_PROXIES = ("sigma", "loss")


@dataclass(frozen=True)
class RankTarget:
    """A model-level size target for budgeted allocation; exactly one of ``cr``, ``params``, ``mac_reduction``.

    Attributes
    ----------
    cr : float, optional
        Compression rate ``params(original) / params(compressed)`` to reach, ``> 1``.
    params : int, optional
        Total parameters of the compressed model, ``>= 1``.
    mac_reduction : float, optional
        ``MACs(original) / MACs(compressed)`` to reach, ``> 1``.
    proxy : {"sigma", "loss"}
        Per-layer error the allocation minimizes: ``rel_sigma_err^2`` (Proposition 1: relative output MSE) or the
        measured loss increase with only that layer factorized.
    """

    cr: float | None = None
    params: int | None = None
    mac_reduction: float | None = None
    proxy: str = "sigma"

    def __post_init__(self) -> None:
        given = [k for k in ("cr", "params", "mac_reduction") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one target of cr (--target-cr), params (--target-params) and "
                             f"mac_reduction (--target-mac-reduction); got {given or 'none'}")
        for key in ("cr", "mac_reduction"):
            value = getattr(self, key)
            if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                                          and math.isfinite(value) and value > 1):
                raise ValueError(f"target {key} must be a number > 1 (1 is the original model), got {value!r}")
        if self.params is not None:
            if isinstance(self.params, bool) or int(self.params) != self.params or self.params < 1:
                raise ValueError(f"target params must be an int >= 1, got {self.params!r}")
            object.__setattr__(self, "params", int(self.params))
        if self.proxy not in _PROXIES:
            raise ValueError(f"proxy must be one of {_PROXIES}, got {self.proxy!r}")

    @property
    def metric(self) -> str:
        """``"params"`` or ``"macs"``: what the budget counts."""
        return "macs" if self.mac_reduction is not None else "params"

    def total_budget(self, original_total: int) -> int:
        """Largest total (params or MACs) of the whole compressed model that meets the target."""
        if self.params is not None:
            return self.params
        ratio = self.cr if self.cr is not None else self.mac_reduction
        return int(math.floor(original_total / ratio))

    def achieved(self, original_total: int, total: int) -> float:
        """The target's quantity for a model of ``total`` params / MACs (CR, params, or MAC reduction)."""
        return float(total) if self.params is not None else original_total / total

    def describe(self) -> str:
        if self.cr is not None:
            what = f"CR {self.cr:g}"
        elif self.params is not None:
            what = f"params {self.params}"
        else:
            what = f"MAC reduction {self.mac_reduction:g}"
        return f"target {what} (budgeted, {self.proxy} proxy)"

    def label(self) -> str:
        """Short slug label, e.g. ``"cr5-sigma"``."""
        if self.cr is not None:
            return f"cr{self.cr:g}-{self.proxy}"
        if self.params is not None:
            return f"params{self.params}-{self.proxy}"
        return f"macx{self.mac_reduction:g}-{self.proxy}"

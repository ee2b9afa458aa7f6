"""Registry of compression methods accepted by the compress job and the sweeps.

Each method maps a layer (its weight and, when the method is data-aware, its Sigma) and ranks to a result
of ``sigma_core`` and knows how to turn that result into a replacement module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from sigma_core import (
    CPConv,
    CPSigmaConfig,
    RankRule,
    Tucker2Conv,
    Tucker2SigmaConfig,
    cp_als,
    cp_als_sigma,
    cp_deflation_sigma,
    tucker2_als,
    tucker2_als_sigma,
)

from sigma_core import INITS, LowRank1x1Conv, tt_svd, LowRankLinear, WeightedTucker2Config, ag_lra, fw_lra, svd_sigma, svd_truncated

__all__ = ["Method", "METHODS", "get_method", "SolverOptions", "tucker2_ranks", "cp_ranks", "svd_ranks", "STATISTICS"]

# Per-layer data statistics a method can consume (``Method.needs``): the input second moment Sigma, the diagonal
# Fisher of the weight (FW-LRA) or the mean |output| per output channel (AG-LRA); see pipeline.fisher.
STATISTICS = ("sigma", "fisher", "activation")


@dataclass(frozen=True)
class SolverOptions:
    """Iteration settings shared by the ALS methods (see :class:`sigma_core.Tucker2SigmaConfig`)."""

    max_iter: int = 100
    # 1e-4 relative decrease per sweep: measured on the reference ResNet's 128x128 convs, tightening to 1e-6
    # costs ~5-10x the sweeps for a rel_sigma_err change below 0.05 %.
    tol: float = 1e-4
    cg_steps: int | None = None
    solver: str = "auto"
    seed: int = 0
    # CP initialization of cp-als, cp-als-sigma and cp-deflation-sigma: "svd" (deterministic, except tensorly's
    # random fill of modes smaller than R) or "random" (Gaussian factors from ``seed``; the paper's Table 6 runs).
    cp_init: str = "svd"

    def __post_init__(self) -> None:
        if self.cp_init not in INITS:
            raise ValueError(f"cp_init must be one of {INITS}, got {self.cp_init!r}")
        if self.max_iter < 0 or not self.tol >= 0:
            raise ValueError(f"max_iter must be >= 0 and tol >= 0, got max_iter={self.max_iter}, tol={self.tol}")

    def sigma_config(self) -> Tucker2SigmaConfig:
        return Tucker2SigmaConfig(max_iter=self.max_iter, tol=self.tol, cg_steps=self.cg_steps, solver=self.solver)

    def cp_config(self) -> CPSigmaConfig:
        """The same settings for CP-ALS-Sigma (per rank-one term for the deflation)."""
        return CPSigmaConfig(max_iter=self.max_iter, tol=self.tol, cg_steps=self.cg_steps, solver=self.solver,
                             init=self.cp_init)

    def weighted_config(self) -> WeightedTucker2Config:
        """The same sweep cap / tolerance for the weighted-ALS baselines FW-LRA and AG-LRA."""
        return WeightedTucker2Config(max_iter=self.max_iter, tol=self.tol)


def tucker2_ranks(rule: RankRule, weight: torch.Tensor) -> tuple[int, int]:
    """Tucker-2 ranks ``(R_T, R_S)`` of a layer (:meth:`RankRule.resolve`)."""
    return tuple(rule.resolve(weight))


def cp_ranks(rule: RankRule, weight: torch.Tensor) -> tuple[int]:
    """CP rank of a layer as a 1-tuple ``(R,)`` (:meth:`RankRule.resolve_cp`)."""
    return (rule.resolve_cp(weight),)


def svd_ranks(rule: RankRule, weight: torch.Tensor) -> tuple[int]:
    """SVD rank of a linear layer / 1x1 conv as a 1-tuple ``(r,)`` (:meth:`RankRule.resolve_svd`)."""
    return (rule.resolve_svd(weight),)


@dataclass(frozen=True)
class Method:
    """One registered method.

    Attributes
    ----------
    name : str
    family : str
        Rank structure (``"tucker2"``, ``"cp"`` or ``"svd"``).
    needs_sigma : bool
        Whether the decomposition uses the layer's input Sigma.
    decompose : callable
        ``decompose(weight, sigma_or_None, ranks, options, device) -> result``.
    build : callable
        ``build(original_module, result) -> nn.Module``.
    layer_types : tuple of type
        Layers it applies to.
    resolve_ranks : callable
        ``resolve_ranks(rule, weight) -> ranks`` for this family (:func:`tucker2_ranks`, :func:`cp_ranks`,
        :func:`svd_ranks`); its output is what ``decompose`` receives.
    needs : str or None
        The per-layer statistic ``decompose`` receives as its second argument: one of :data:`STATISTICS` or None.
        ``needs_sigma=True`` implies (and is implied by) ``needs == "sigma"``.
    """

    name: str
    family: str
    needs_sigma: bool
    decompose: Callable
    build: Callable[[nn.Module, object], nn.Module]
    layer_types: tuple = field(default=(nn.Conv2d,))
    resolve_ranks: Callable[[RankRule, torch.Tensor], tuple[int, ...]] = tucker2_ranks
    needs: str | None = None

    def __post_init__(self) -> None:
        if self.needs is None and self.needs_sigma:
            object.__setattr__(self, "needs", "sigma")
        if self.needs not in (None, *STATISTICS):
            raise ValueError(f"needs must be None or one of {STATISTICS}, got {self.needs!r}")
        if self.needs_sigma != (self.needs == "sigma"):
            raise ValueError(f"method {self.name}: needs_sigma={self.needs_sigma} contradicts needs={self.needs!r}")


def _tucker2_sigma(weight, sigma, ranks, options: SolverOptions, device):
    gen = torch.Generator().manual_seed(options.seed)
    return tucker2_als_sigma(
        weight.to(device), sigma.to(device), ranks, config=options.sigma_config(), generator=gen
    )


def _tucker2_frob(weight, sigma, ranks, options: SolverOptions, device):
    # tensorly's HOOI stops on an absolute change of rel_frob_err; 1e-6 (tighter than its 1e-4 default) is cheap
    # and makes the baseline fully converged.
    return tucker2_als(weight, ranks, n_iter_max=options.max_iter, tol=1e-6)


def _cp_sigma(weight, sigma, ranks, options: SolverOptions, device):
    gen = torch.Generator().manual_seed(options.seed)
    return cp_als_sigma(weight.to(device), sigma.to(device), ranks[0], config=options.cp_config(), generator=gen)


def _cp_frob(weight, sigma, ranks, options: SolverOptions, device):
    # tensorly parafac (the paper's CP-ALS); with the SVD init, tensorly's random fill of small modes is seeded.
    return cp_als(weight, ranks[0], n_iter_max=options.max_iter, tol=min(options.tol, 1e-8), init=options.cp_init,
                  random_state=options.seed)


def _cp_deflation(weight, sigma, ranks, options: SolverOptions, device):
    gen = torch.Generator().manual_seed(options.seed)
    return cp_deflation_sigma(weight.to(device), sigma.to(device), ranks[0], config=options.cp_config(),
                              generator=gen)


def _svd_sigma(weight, sigma, ranks, options: SolverOptions, device):
    return svd_sigma(weight.to(device), sigma.to(device), ranks[0])


def _svd_plain(weight, sigma, ranks, options: SolverOptions, device):
    return svd_truncated(weight, ranks[0])


def _tt_svd(weight, sigma, ranks, options: SolverOptions, device):
    # RENE(TT)'s per-layer decomposition (closed form; RENE spec Sec. 2.1): TT-SVD == ST-HOSVD, a Tucker2Result.
    return tt_svd(weight, tuple(int(r) for r in ranks))


def _build_low_rank(module: nn.Module, result) -> nn.Module:
    """Two linear layers for an nn.Linear, two 1x1 convs for a 1x1 nn.Conv2d (paper App. E)."""
    if isinstance(module, nn.Linear):
        return LowRankLinear.from_factors(module, result.first, result.second)
    return LowRank1x1Conv.from_result(module, result)


def _fw_lra(weight, fisher, ranks, options: SolverOptions, device):
    return fw_lra(weight, fisher, ranks, config=options.weighted_config())


def _ag_lra(weight, activation, ranks, options: SolverOptions, device):
    return ag_lra(weight, activation, ranks, config=options.weighted_config())


_SVD_LAYERS = (nn.Linear, nn.Conv2d)  # Conv2d: 1x1 only (svd_sigma rejects larger kernels with a clear error)

METHODS: dict[str, Method] = {
    "tucker2-als-sigma": Method("tucker2-als-sigma", "tucker2", True, _tucker2_sigma, Tucker2Conv.from_result),
    "tucker2-als": Method("tucker2-als", "tucker2", False, _tucker2_frob, Tucker2Conv.from_result),
    "cp-als-sigma": Method("cp-als-sigma", "cp", True, _cp_sigma, CPConv.from_result, resolve_ranks=cp_ranks),
    "cp-als": Method("cp-als", "cp", False, _cp_frob, CPConv.from_result, resolve_ranks=cp_ranks),
    "cp-deflation-sigma": Method("cp-deflation-sigma", "cp", True, _cp_deflation, CPConv.from_result,
                                 resolve_ranks=cp_ranks),
    "svd-sigma": Method("svd-sigma", "svd", True, _svd_sigma, _build_low_rank, _SVD_LAYERS, svd_ranks),
    "svd": Method("svd", "svd", False, _svd_plain, _build_low_rank, _SVD_LAYERS, svd_ranks),
    "fw-lra": Method("fw-lra", "tucker2", False, _fw_lra, Tucker2Conv.from_result, needs="fisher"),
    "ag-lra": Method("ag-lra", "tucker2", False, _ag_lra, Tucker2Conv.from_result, needs="activation"),
    "tt-svd": Method("tt-svd", "tucker2", False, _tt_svd, Tucker2Conv.from_result),
}


def get_method(name: str) -> Method:
    """Look up a registered method, with an error listing the valid names."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(sorted(METHODS))}") from None

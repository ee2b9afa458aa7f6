"""Registry of compression methods accepted by the compress job and the sweeps.

Each method maps a layer (its weight and, when the method is data-aware, its Sigma) and ranks to a result
of ``sigma_core`` and knows how to turn that result into a replacement module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from sigma_core import Tucker2Conv, Tucker2SigmaConfig, tucker2_als, tucker2_als_sigma

__all__ = ["Method", "METHODS", "get_method", "SolverOptions"]


@dataclass(frozen=True)
class SolverOptions:
    """Iteration settings shared by the ALS methods (see :class:`sigma_core.Tucker2SigmaConfig`)."""

    max_iter: int = 100
    tol: float = 1e-6
    cg_steps: int | None = None
    solver: str = "auto"
    seed: int = 0

    def sigma_config(self) -> Tucker2SigmaConfig:
        return Tucker2SigmaConfig(max_iter=self.max_iter, tol=self.tol, cg_steps=self.cg_steps, solver=self.solver)


@dataclass(frozen=True)
class Method:
    """One registered method.

    Attributes
    ----------
    name : str
    family : str
        Rank structure (``"tucker2"``): decides how ranks are chosen.
    needs_sigma : bool
        Whether the decomposition uses the layer's input Sigma.
    decompose : callable
        ``decompose(weight, sigma_or_None, ranks, options, device) -> result``.
    build : callable
        ``build(original_module, result) -> nn.Module``.
    layer_types : tuple of type
        Layers it applies to.
    """

    name: str
    family: str
    needs_sigma: bool
    decompose: Callable
    build: Callable[[nn.Module, object], nn.Module]
    layer_types: tuple = field(default=(nn.Conv2d,))


def _tucker2_sigma(weight, sigma, ranks, options: SolverOptions, device):
    gen = torch.Generator().manual_seed(options.seed)
    return tucker2_als_sigma(
        weight.to(device), sigma.to(device), ranks, config=options.sigma_config(), generator=gen
    )


def _tucker2_frob(weight, sigma, ranks, options: SolverOptions, device):
    # tensorly's HOOI stops on an absolute change of rel_frob_err; tighter than its 1e-4 default for a fair baseline.
    return tucker2_als(weight, ranks, n_iter_max=options.max_iter, tol=min(options.tol, 1e-6))


METHODS: dict[str, Method] = {
    "tucker2-als-sigma": Method("tucker2-als-sigma", "tucker2", True, _tucker2_sigma, Tucker2Conv.from_result),
    "tucker2-als": Method("tucker2-als", "tucker2", False, _tucker2_frob, Tucker2Conv.from_result),
}


def get_method(name: str) -> Method:
    """Look up a registered method, with an error listing the valid names."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(sorted(METHODS))}") from None

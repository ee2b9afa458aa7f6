"""NORTON's model-level pruning stage (decompose -> prune -> fine-tune) and the ``dense-prune`` baseline.

:func:`norton_prune` finds the prunable groups of a model (``sigma_core.pruning.prune_groups``), scores each
producer's filters with a criterion and removes them by Algorithm 1 (PABS) or by a baseline rule.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from sigma_core import NortonConv, filter_cp_als, get_module
from sigma_core.pabs import (
    ANGLES,
    algorithm1_select,
    check_pabs_weights,
    code_pabs_distance_matrix,
    code_select,
    factor_distance_matrix,
    norm_select,
    output_correlation_distance,
    random_select,
    sigma_metrics,
)
from sigma_core.pruning import kept_count, prune_channels, prune_groups

__all__ = ["CRITERIA", "PruneConfig", "norton_prune", "DenseResult", "dense_identity", "build_dense"]

# "pabs-sigma" and "output-corr-sigma" are beyond the paper (Sigma-weighted angles, output correlation).
CRITERIA = ("pabs", "pabs-code", "pabs-sigma", "output-corr-sigma", "l1", "random")


@dataclass(frozen=True)
class PruneConfig:
    """Model-level pruning after decomposition (NORTON Sec. II-B).

    Attributes
    ----------
    rate : float or None
        Fraction of filters removed in every prunable group, in [0, 1) (``floor(T (1 - rate))`` kept).
    rates : tuple of (producer, rate)
        Per-producer overrides (the paper's compress_rate lists); a name must be a prunable producer.
    criterion : str
        One of :data:`CRITERIA`. ``pabs``: eq. 11 + Algorithm 1; ``pabs-code``: the public code's criterion and
        selection, bugs included; ``l1``; ``random``; ``pabs-sigma`` / ``output-corr-sigma`` (beyond the paper).
    weights : (alpha, beta, gamma)
        Eq. 11 weights of the A (height), B (width) and C (channel) terms.
    angle : {"max", "chordal", "mean"}
    crit_rank : int
        Filter-CP rank used only for the criterion when the producer is a dense conv (``dense-prune``).
    seed : int
        Seed of ``random``.
    """

    rate: float | None = None
    rates: tuple[tuple[str, float], ...] = ()
    criterion: str = "pabs"
    weights: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3)
    angle: str = "max"
    crit_rank: int = 1
    seed: int = 0
    include_first: bool = False

    def __post_init__(self) -> None:
        if self.criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {CRITERIA}, got {self.criterion!r}")
        if self.angle not in ANGLES:
            raise ValueError(f"angle must be one of {ANGLES}, got {self.angle!r}")
        object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))
        check_pabs_weights(self.weights)
        object.__setattr__(self, "rates", tuple((str(n), float(r)) for n, r in self.rates))
        if self.rate is None and not self.rates:
            raise ValueError("give a prune rate (rate) or per-layer rates")
        for r in ([self.rate] if self.rate is not None else []) + [r for _, r in self.rates]:
            if not 0 <= r < 1:
                raise ValueError(f"prune rate must be a fraction of channels removed in [0, 1), got {r}")

    def label(self) -> str:
        rate = f"{self.rate:g}" if self.rate is not None else "layers"
        return f"prune{rate}-{self.criterion}"

    def identity(self) -> dict:
        return {"rate": self.rate, "rates": [list(x) for x in self.rates], "criterion": self.criterion,
                "weights": list(self.weights), "angle": self.angle, "crit_rank": self.crit_rank, "seed": self.seed,
                "include_first": self.include_first}


def _factors(module: nn.Module, crit_rank: int):
    if isinstance(module, NortonConv):
        return tuple(f.detach() for f in module.factors())
    res = filter_cp_als(module.weight.detach().to(torch.float64), min(crit_rank, _max_rank(module)))
    return res.factors


def _max_rank(conv) -> int:
    from sigma_core import filter_cp_max_rank

    return filter_cp_max_rank(tuple(conv.weight.shape))


def _kernel(module: nn.Module) -> torch.Tensor:
    return module.reconstructed_kernel().detach() if isinstance(module, NortonConv) else module.weight.detach()


def _select(module, keep: int, config: PruneConfig, sigma, centered, gen) -> tuple[list[int], list[int]]:
    t = module.out_channels
    crit = config.criterion
    if crit == "l1":
        return norm_select(_kernel(module), keep, p=1), []
    if crit == "random":
        return random_select(t, keep, gen), []
    if crit == "pabs-code":
        return code_select(code_pabs_distance_matrix(_factors(module, config.crit_rank)), keep), []
    if crit == "output-corr-sigma":
        if centered is None:
            raise ValueError("output-corr-sigma needs the centered Sigma of the producer's input")
        return algorithm1_select(output_correlation_distance(_kernel(module), centered), keep)
    metrics = None
    if crit == "pabs-sigma":
        if sigma is None:
            raise ValueError("pabs-sigma needs the Sigma of the producer's input")
        k = _kernel(module)
        metrics = sigma_metrics(sigma, k.shape[1], k.shape[2], k.shape[3])
    d = factor_distance_matrix(_factors(module, config.crit_rank), config.weights, config.angle, metrics)
    return algorithm1_select(d, keep)


def norton_prune(model: nn.Module, config: PruneConfig, *, input_shape=(1, 28, 28), sigmas=None,
                 centered_sigmas=None) -> tuple[nn.Module, dict]:
    """Prune every prunable group of ``model`` (a copy) by ``config``; returns it and a per-group report.

    ``sigmas`` / ``centered_sigmas`` (producer name -> Sigma of its input) feed the Sigma criteria. Selections use
    the unpruned model's factors of each producer (its input channels are already those kept upstream).

    Raises
    ------
    ValueError
        A ``rates`` name that is not prunable (with the reason), a rate that leaves no channel.
    """
    groups, reasons = prune_groups(model, torch.zeros(1, *input_shape), include_first=config.include_first)
    by_name = {g.producer: g for g in groups}
    for name, _ in config.rates:
        if name not in by_name:
            why = reasons.get(name, "not a conv of this model")
            raise ValueError(f"layer {name!r} is not prunable: {why}; prunable: {sorted(by_name)}")
    rates = dict(config.rates)
    gen = torch.Generator().manual_seed(config.seed)
    report: dict = {"not_prunable": reasons, "groups": {}}
    out = model
    for group in groups:
        rate = rates.get(group.producer, config.rate)
        if not rate:
            continue
        keep_n = kept_count(group.channels, rate)
        module = get_module(out, group.producer)
        kept, order = _select(module, keep_n, config, (sigmas or {}).get(group.producer),
                              (centered_sigmas or {}).get(group.producer), gen)
        fresh, _ = prune_groups(out, torch.zeros(1, *input_shape), include_first=config.include_first)
        current = next(g for g in fresh if g.producer == group.producer)
        out = prune_channels(out, current, kept)
        report["groups"][group.producer] = {"rate": rate, "kept": kept, "removed_order": order,
                                            "bn": group.bn, "consumers": [c[0] for c in group.consumers]}
    if out is model:
        out = __import__("copy").deepcopy(model)
    return out, report


def pruned_module_names(report: dict) -> list[str]:
    """Every module a pruning report changed (producers, BNs, consumers), for ``save_compressed``."""
    names = []
    for producer, g in report["groups"].items():
        names += [producer] + ([g["bn"]] if g["bn"] else []) + g["consumers"]
    return list(dict.fromkeys(names))


# ------------------------------------------------------------------------------------------------ dense-prune


@dataclass(frozen=True)
class DenseResult:
    """The dense kernel itself (``dense-prune``: no decomposition, pruning only)."""

    kernel: torch.Tensor
    errors: tuple[float, ...] = (0.0,)
    converged: bool = True
    method: str = "dense-prune"
    info: dict = field(default_factory=dict, compare=False)

    @property
    def ranks(self) -> tuple[int, ...]:
        return ()

    def reconstruct(self) -> torch.Tensor:
        return self.kernel


def dense_identity(weight, sigma, ranks, options, device):
    return DenseResult(weight)


def dense_ranks(rule, weight) -> tuple[int, ...]:
    return ()


def build_dense(module: nn.Module, result) -> nn.Module:
    """A copy of the dense conv as a :class:`PrunedConv2d` (spec-rebuildable; nothing pruned yet)."""
    from sigma_core.pruning import _slice_conv

    return _slice_conv(module, None, None)

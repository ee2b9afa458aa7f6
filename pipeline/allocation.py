"""Budgeted rank allocation on a real model: candidate curves per layer, a target -> budget, the exact knapsack.

A rank source (design.md, "Where the next methods go"): it turns a :class:`sigma_core.allocate.RankTarget` into a
fixed rank per layer that any registry method consumes, so the point is then compressed by the ordinary path
(:func:`pipeline.compress.compress_model`) at the solver's full tolerance.

Candidate curves: for every layer, a grid of ranks of its method's family (plus the alpha-rule ranks the caller
names, so that a budget equal to the alpha rule's cost can never predict a worse total), each decomposed by the
layer's own registry method with a loose solver setting (a few ALS sweeps from the method's SVD start), priced
exactly (:mod:`sigma_core.costs`) and scored by the error proxy: ``sigma`` = ``rel_sigma_err^2``, ``loss`` = the
loss increase on ``loss_images`` held-out labelled images (disjoint from the Sigma images) with only that layer
swapped. Curves are cached per layer under ``<cache>/alloc/`` keyed by the weights, the layer, its Sigma key, the
method, grid, loose settings and proxy images.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from pipeline._io import atomic_write_text
from pipeline.methods import SolverOptions, get_method
from sigma_core import RankRule, count_macs, count_params, cp_max_rank, get_module, rel_sigma_err
from sigma_core.allocate import Allocation, Candidate, LayerCandidates, RankTarget, allocate, reachable_cost
from sigma_core.costs import LayerGeometry, dense_cost, factorized_cost, layer_geometry

__all__ = ["AllocationConfig", "layer_geometries", "rank_grid", "fixed_rule", "layer_candidates", "allocate_ranks",
           "AllocationOutcome", "held_out_batch", "check_target_config", "budgeted_overrides",
           "target_point_fields", "target_line"]


@dataclass(frozen=True)
class AllocationConfig:
    """How candidate curves are made.

    Attributes
    ----------
    grid : int
        Points per rank mode: ``grid`` geometrically and ``grid`` linearly spaced ranks in ``[1, R_max]``, merged
        (Tucker-2: their product over the two modes).
    loose_iter : int
        ALS sweeps of the candidate solves (the final solve uses the job's solver settings).
    loose_tol : float
        Their stopping tolerance.
    allow_dense : bool
        Offer "keep this layer dense" as a candidate (cost of the dense layer, error 0).
    loss_images : int
        Held-out labelled images of the ``loss`` proxy.
    quantum : int
        Cost rounding of the knapsack (1 = exact, see :func:`sigma_core.allocate.allocate`).
    """

    grid: int = 6
    loose_iter: int = 3
    loose_tol: float = 1e-2
    allow_dense: bool = True
    loss_images: int = 256
    quantum: int = 1

    def __post_init__(self) -> None:
        if self.grid < 1 or self.loose_iter < 0 or self.loss_images < 1 or self.quantum < 1:
            raise ValueError(f"grid, loss_images and quantum must be >= 1 and loose_iter >= 0, got {self}")


def layer_geometries(model: nn.Module, names: Sequence[str], input_shape: Sequence[int]) -> dict[str, LayerGeometry]:
    """Geometry of each named layer for one input image of shape ``input_shape`` (C, H, W), by one forward pass."""
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []

    def hook_for(name: str):
        def hook(module, args) -> None:  # returns None: the input is left as it is
            shapes.setdefault(name, tuple(args[0].shape[1:]))
        return hook

    for name in names:
        handles.append(get_module(model, name).register_forward_pre_hook(hook_for(name)))
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, dtype=dtype, device=device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    missing = [n for n in names if n not in shapes]
    if missing:
        raise ValueError(f"layers {missing} were not called in a forward pass: they cannot be priced")
    return {name: layer_geometry(get_module(model, name), shapes[name]) for name in names}


def _axis(r_max: int, grid: int) -> list[int]:
    geo = np.round(np.geomspace(1, r_max, grid)) if r_max > 1 else np.ones(1)
    lin = np.round(np.linspace(r_max / grid, r_max, grid))
    return sorted({int(min(max(v, 1), r_max)) for v in np.concatenate([geo, lin])})


def rank_grid(family: str, weight_shape: Sequence[int], grid: int) -> list[tuple[int, ...]]:
    """Candidate ranks of a ``family`` layer with weight ``weight_shape``.

    Raises
    ------
    ValueError
        For a family without a grid (a new method family adds one here).
    """
    shape = tuple(int(d) for d in weight_shape)
    if family == "tucker2":
        return [(rt, rs) for rt in _axis(shape[0], grid) for rs in _axis(shape[1], grid)]
    if family == "cp":
        return [(r,) for r in _axis(cp_max_rank(shape), grid)]
    if family == "svd":
        return [(r,) for r in _axis(min(shape[0], shape[1]), grid)]
    raise ValueError(f"no candidate rank grid for rank family {family!r} (tucker2, cp, svd); add one to "
                     "pipeline.allocation.rank_grid")


def fixed_rule(family: str, ranks: Sequence[int]) -> RankRule:
    """The RankRule that makes a ``family`` method use exactly ``ranks``."""
    if family == "tucker2":
        return RankRule(ranks=tuple(ranks))
    if family == "cp":
        return RankRule(cp_rank=int(ranks[0]))
    if family == "svd":
        return RankRule(svd_rank=int(ranks[0]))
    raise ValueError(f"no fixed-rank RankRule for rank family {family!r}; add one to pipeline.allocation.fixed_rule")


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]


class _LossProbe:
    """Held-out loss of the model with one layer swapped (a forward hook returns the replacement's output)."""

    def __init__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, device: str, batch: int = 256):
        self.model, self.device, self.batch = model.eval(), device, batch
        self.images, self.labels = images, labels
        self.base = self.loss(None, None)

    @torch.no_grad()
    def loss(self, name: str | None, replacement: nn.Module | None) -> float:
        handle = None
        if name is not None:
            rep = replacement.to(self.device).eval()
            handle = get_module(self.model, name).register_forward_hook(lambda m, args, out: rep(args[0]))
        try:
            total = 0.0
            for i in range(0, len(self.images), self.batch):
                x = self.images[i:i + self.batch].to(self.device)
                y = self.labels[i:i + self.batch].to(self.device)
                total += float(F.cross_entropy(self.model(x), y, reduction="sum"))
            return total / len(self.images)
        finally:
            if handle is not None:
                handle.remove()


def layer_candidates(
    model: nn.Module,
    name: str,
    method_name: str,
    sigma: torch.Tensor | None,
    geom: LayerGeometry,
    metric: str,
    config: AllocationConfig,
    *,
    extra_ranks: Sequence[tuple[int, ...]] = (),
    proxy: str = "sigma",
    probe: _LossProbe | None = None,
    stat: torch.Tensor | None = None,
    seed: int = 0,
    device: str = "cpu",
    cache_dir: Path | None = None,
    cache_key: Mapping | None = None,
) -> tuple[LayerCandidates, dict]:
    """Candidate curve of one layer: every rank of :func:`rank_grid` (+ ``extra_ranks``), loosely solved and scored.

    Both proxies are stored for every rank (``sigma`` is free once the loose result exists; ``loss`` only when a
    probe is given), so one cache entry serves both.

    Returns
    -------
    LayerCandidates
        Scored by ``proxy``; the dense option included when ``config.allow_dense``.
    info : dict
        ``cached``, ``seconds``, ``points`` (ranks, sigma_err2, loss_increase, seconds).
    """
    method = get_method(method_name)
    module = get_module(model, name)
    weight = module.weight.detach().cpu()
    ranks_list = list(dict.fromkeys([*rank_grid(method.family, weight.shape, config.grid),
                                     *(tuple(int(x) for x in r) for r in extra_ranks)]))
    if sigma is None and proxy == "sigma":
        raise ValueError(f"the sigma proxy needs layer {name}'s Sigma")
    loose = SolverOptions(max_iter=config.loose_iter, tol=config.loose_tol, seed=seed)
    key = {"layer": name, "method": method_name, "grid": config.grid, "loose": asdict(loose),
           "ranks": ranks_list, "loss": probe is not None and {"n": len(probe.images)}, **(cache_key or {})}
    path = Path(cache_dir) / f"{_digest(key)}.json" if cache_dir is not None else None
    points = None
    if path is not None and path.exists():
        saved = json.loads(path.read_text())
        if saved.get("key") == json.loads(json.dumps(key, default=str)):
            points = saved["points"]
    cached = points is not None
    tic = time.perf_counter()
    if points is None:
        points = []
        data = stat if method.needs not in (None, "sigma") else sigma
        for ranks in ranks_list:
            t0 = time.perf_counter()
            result = method.decompose(weight.to(torch.float64), data, ranks, loose, device)
            approx = result.reconstruct().cpu()
            err2 = rel_sigma_err(weight, approx, sigma) ** 2 if sigma is not None else None
            loss = None
            if probe is not None:
                loss = probe.loss(name, method.build(module, result)) - probe.base
            points.append({"ranks": list(ranks), "sigma_err2": err2, "loss_increase": loss,
                           "seconds": time.perf_counter() - t0})
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps({"key": key, "points": points}, default=str))
    field = "sigma_err2" if proxy == "sigma" else "loss_increase"
    cands = [Candidate(tuple(p["ranks"]), factorized_cost(geom, method.family, p["ranks"], metric), p[field])
             for p in points if p[field] is not None]
    if config.allow_dense:
        cands.append(Candidate((), dense_cost(geom, metric), 0.0))
    return LayerCandidates(name, tuple(cands)), {"cached": cached, "seconds": time.perf_counter() - tic,
                                                 "points": points}


@dataclass(frozen=True)
class AllocationOutcome:
    """A target resolved into ranks: the knapsack result and the model-level numbers around it."""

    allocation: Allocation
    target: RankTarget
    metric: str
    original_total: int
    fixed_total: int  # cost of everything the allocation does not choose (other layers, BN, biases of the rest)
    total_budget: int
    predicted_total: int
    reachable: tuple[int, int]
    seconds: float
    cached_layers: tuple[str, ...]

    def overrides(self, layer_methods: Mapping[str, str]) -> dict[str, tuple[str, RankRule]]:
        """Layer -> (method, fixed RankRule) of the factorized layers; layers chosen dense are left out."""
        out = {}
        for name, ranks in self.allocation.ranks.items():
            if ranks:
                method = layer_methods[name]
                out[name] = (method, fixed_rule(get_method(method).family, ranks))
        return out

    def summary(self) -> dict:
        return {"target": self.target.describe(), "metric": self.metric, "total_budget": self.total_budget,
                "predicted_total": self.predicted_total, "slack": self.allocation.slack,
                "predicted_error": self.allocation.predicted_error, "allocation_seconds": self.seconds,
                "ranks": {k: list(v) for k, v in self.allocation.ranks.items()},
                "reachable": list(self.reachable), "cached_layers": list(self.cached_layers)}


def _range_text(target: RankTarget, original: int, lo: int, hi: int) -> str:
    if target.params is not None:
        return f"total params in [{lo}, {hi}]"
    name = "CR" if target.cr is not None else "MAC reduction"
    return f"{name} in [{original / hi:.3g}, {original / lo:.3g}]"


def allocate_ranks(
    model: nn.Module,
    layer_methods: Mapping[str, str],
    sigmas: Mapping[str, torch.Tensor],
    target: RankTarget,
    input_shape: Sequence[int],
    *,
    config: AllocationConfig = AllocationConfig(),
    extra_ranks: Mapping[str, Sequence[tuple[int, ...]]] | None = None,
    loss_data: tuple[torch.Tensor, torch.Tensor] | None = None,
    stats: Mapping[str, torch.Tensor] | None = None,
    seed: int = 0,
    device: str = "cpu",
    cache_dir: str | Path | None = None,
    cache_key: Mapping | None = None,
    progress: bool = True,
) -> AllocationOutcome:
    """Ranks for every layer of ``layer_methods`` that meet ``target`` with the least predicted total error.

    Parameters
    ----------
    layer_methods : mapping layer -> registry method name
        The layers the budget is spread over (the "layer set"); every other parameter / MAC is fixed.
    sigmas : mapping layer -> Sigma
        Needed for the ``sigma`` proxy (and stored for the other).
    target : RankTarget
    input_shape : (C, H, W)
        One input image (for the MAC counts and geometries).
    extra_ranks : mapping layer -> ranks, optional
        Added to the grid (e.g. the alpha rule's ranks).
    loss_data : (images, labels), optional
        Held-out batch of the ``loss`` proxy (required for it).

    Raises
    ------
    ValueError
        The target is outside what this layer set can reach (the message gives the reachable range and the
        layer set), or the proxy lacks its data.
    """
    tic = time.perf_counter()
    names = list(layer_methods)
    metric = target.metric
    geoms = layer_geometries(model, names, input_shape)
    model_cpu = model
    original = count_params(model_cpu) if metric == "params" else count_macs(model_cpu, (1, *input_shape))
    dense = {n: dense_cost(geoms[n], metric) for n in names}
    fixed = original - sum(dense.values())
    total_budget = target.total_budget(original)
    if target.proxy == "loss" and loss_data is None:
        raise ValueError("the loss proxy needs held-out labelled images (loss_data)")
    probe = _LossProbe(model, *loss_data, device) if target.proxy == "loss" else None
    layers, cached = [], []
    cache = Path(cache_dir) if cache_dir is not None else None
    for name in tqdm(names, desc=f"candidates ({target.proxy})", unit="layer", disable=not progress, leave=False):
        lc, info = layer_candidates(model, name, layer_methods[name], sigmas.get(name), geoms[name], metric, config,
                                    extra_ranks=(extra_ranks or {}).get(name, ()), proxy=target.proxy, probe=probe,
                                    stat=(stats or {}).get(name), seed=seed, device=device, cache_dir=cache,
                                    cache_key=cache_key)
        layers.append(lc)
        if info["cached"]:
            cached.append(name)
    lo, hi = reachable_cost(layers)
    reach = (fixed + lo, fixed + hi)
    if total_budget < reach[0] or (target.params is None and total_budget >= original):
        raise ValueError(f"{target.describe()} cannot be met by factorizing the layer set {names}: reachable "
                         f"{_range_text(target, original, *reach)} (original total {original} {metric}); choose a "
                         "target inside that range or factorize more layers")
    if target.params is not None and total_budget > reach[1]:
        raise ValueError(f"{target.describe()} is above the original model ({reach[1]} params with every layer of "
                         f"{names} dense); reachable {_range_text(target, original, *reach)}")
    alloc = allocate(layers, total_budget - fixed, quantum=config.quantum)
    return AllocationOutcome(alloc, target, metric, original, fixed, total_budget, fixed + alloc.cost, reach,
                             time.perf_counter() - tic, tuple(cached))


def held_out_batch(dataset, n_sigma: int, n_loss: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n_loss`` labelled items of ``dataset`` disjoint from the ``n_sigma`` Sigma images of ``sample_subset``.

    ``sample_subset(dataset, n, seed)`` takes the first ``n`` of one seeded permutation; the next ``n_loss`` of the
    same permutation are never among them.
    """
    size = len(dataset)
    if n_sigma + n_loss > size:
        raise ValueError(f"the dataset has {size} items: fewer than {n_sigma} Sigma + {n_loss} loss-proxy images; "
                         "lower loss_images or n_samples")
    perm = torch.randperm(size, generator=torch.Generator().manual_seed(seed))[n_sigma:n_sigma + n_loss]
    items = [dataset[int(i)] for i in perm.sort().values]
    return torch.stack([x for x, _ in items]), torch.as_tensor([int(y) for _, y in items])


# ------------------------------------------------------------------------------------------------ compress job glue


def check_target_config(config) -> None:
    """Reject a :class:`pipeline.runner.CompressConfig` whose target contradicts its other rank settings."""
    if config.target is None:
        return
    if not isinstance(config.target, RankTarget):
        raise ValueError(f"target must be a sigma_core.allocate.RankTarget, got {type(config.target).__name__}")
    fixed = [flag for flag, value in (("--ranks", config.ranks), ("--fraction", config.fraction),
                                      ("--cp-rank", config.cp_rank), ("--svd-rank", config.svd_rank))
             if value is not None]
    if fixed:
        raise ValueError(f"a size target ({config.target.describe()}) chooses every layer's ranks itself; drop "
                         f"{', '.join(fixed)} (or drop the target)")
    if config.finetune is not None:
        raise ValueError("fine-tuning is not combined with a size target yet: run the target without --finetune")


def budgeted_overrides(model, layer_methods: Mapping[str, str], sigmas, layer_stats, config, input_shape,
                       data_cache) -> AllocationOutcome:
    """The allocation of one compress point whose rule is a target (called by :mod:`pipeline.runner`)."""
    from pipeline.data import DatasetSpec  # noqa: F401  (the Sigma dataset builds below)
    from pipeline.sigma_cache import model_fingerprint

    target = config.target
    extra: dict[str, list] = {}
    for name, method in layer_methods.items():
        weight = get_module(model, name).weight.detach().cpu()
        for alpha in config.alphas:
            extra.setdefault(name, []).append(get_method(method).resolve_ranks(RankRule(alpha=alpha), weight))
    loss_data = None
    if target.proxy == "loss":
        dataset = config.sigma.dataset.build(cache_dir=data_cache)
        loss_data = held_out_batch(dataset, config.sigma.n_samples, config.allocation.loss_images, config.sigma.seed)
    cache_key = {"weights": model_fingerprint(model), "sigma": config.sigma.identity(), "proxy": target.proxy,
                 "loss_images": config.allocation.loss_images if target.proxy == "loss" else None}
    return allocate_ranks(model, layer_methods, sigmas, target, input_shape, config=replace(config.allocation),
                          extra_ranks=extra, loss_data=loss_data, stats=layer_stats, seed=config.solver.seed,
                          device=config.device, cache_dir=Path(config.cache_dir) / "alloc", cache_key=cache_key,
                          progress=config.progress)


def target_point_fields(outcome: AllocationOutcome, baseline: Mapping, stats: Mapping) -> dict:
    """Point fields of a target run: the target, the achieved value beside it, and the allocation summary."""
    t = outcome.target
    total = stats["params"] if outcome.metric == "params" else stats["macs"]
    original = baseline["params"] if outcome.metric == "params" else baseline["macs"]
    wanted = t.params if t.params is not None else (t.cr if t.cr is not None else t.mac_reduction)
    return {"target": t.describe(), "target_value": wanted, "achieved_value": t.achieved(original, total),
            "allocation": outcome.summary(), "allocation_seconds": outcome.seconds}


def target_line(point: Mapping) -> str | None:
    """``"<method>: target CR 5 -> achieved 5.02 (budget slack 31 params)"``, or None for a non-target point."""
    if "target" not in point:
        return None
    a = point["allocation"]
    return (f"{point['method']}: {point['target']} -> achieved {point['achieved_value']:.4g} "
            f"(predicted {a['predicted_total']} {a['metric']}, slack {a['slack']}; allocation "
            f"{a['allocation_seconds']:.1f}s)")

"""RENE rank search on a pretrained model (Aghababaei-Harandi & Amini 2024; RENE spec Sec. 5, 10.3).

A rank *source*: it produces a per-layer rank map that any registered per-layer method of the same family consumes
(``compress --rank-search``). The loop is the one the public code runs (spec Sec. 5), not Algorithm 1 as printed:

    R_i = grid(rank_min, rank_max, step) clipped per layer; s = step
    while s >= 1:
        branches of every layer rebuilt from the pretrained W_i at each candidate; rank logits = 0
        for t in 0 .. warmup + iters - 1:
            weight step (Eq. 6), all layers jointly, data-free: (L_d x L_r).backward(), clip, SGD-Nesterov
            if t >= warmup: logit step (Eq. 7) on the next held-out TRAINING batch: (CE x L_r).backward()
        r_bar_i = argmax softmax(logits_i); refine around r_bar_i with the current s; s = s // factor

Every step is checked: a non-finite loss, factor or logit raises ``FloatingPointError`` naming the stage, the
iteration and the layer (the public code silently returns the minimum rank everywhere). The result is cached
content-addressed (model weights, layers, config, the held-out data) and each finished stage is checkpointed, so a
killed search resumes at the stage it was in.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from pipeline._io import atomic_write_text
from pipeline.methods import SolverOptions, get_method
from pipeline.sigma_cache import model_fingerprint
from sigma_core import count_params, cp_max_rank, get_module, replace_modules, tt_break_even_rank, tt_svd_ranks
from sigma_core.rank_search import (
    DECOMPOSITION_KINDS,
    FAMILIES,
    MixedRankConv,
    RankSearchResult,
    StageRecord,
    candidate_grid,
    logit_loss,
    n_stages,
    project_to_budget,
    refine,
    sanitize,
    weight_loss,
)

__all__ = ["ReneConfig", "search_ranks", "cached_search", "search_key", "write_ranks_file", "load_ranks_file",
           "rank_overrides", "layer_param_count", "log_search", "RANKS_FORMAT"]

RANKS_FORMAT = "sigma-compress/rene-ranks/1"
LOGIT_OBJECTIVES = ("val_ce", "frob", "sigma")
BRANCH_INITS = {"tucker2": ("tt-svd", "tucker2-als", "tucker2-als-sigma"), "cp": ("cp-als", "cp-als-sigma")}
RANK_CAPS = ("feasible", "break_even")


@dataclass(frozen=True)
class ReneConfig:
    """Settings of one RENE search (defaults: the paper's CIFAR settings as the public code runs them).

    Parameters
    ----------
    family : {"tucker2", "cp"}
        ``"tucker2"``: RENE(TT), tied Tucker-2 ranks (r, r) (the paper's TT-conv is a tied Tucker-2);
        ``"cp"``: RENE(CP) with the project's 4-factor ``CPConv``.
    rank_min, rank_max, step, factor : int
        First-stage grid ``rank_min, rank_min + step, ... <= rank_max`` and the refinement factor of Fig. 3.
    iters, warmup_iters : int
        Iterations per stage (T) and the leading weight-only ones (code: 100 and 20).
    lr_weights, lr_logits, momentum, nesterov
        SGD settings of the two steps (paper: 1e-3, 0.9, Nesterov).
    logit_optimizer : {"sgd", "adam"}
        ``"adam"`` is a documented deviation for when the logits do not move at the paper's rate (check A6).
    gamma, beta : float
        Rank-loss weights of Eq. 5 (paper 0.4, 0.8).
    grad_clip : float
        Max norm of the branch gradients (0: off). Default 5, the public code README's advice (its default 0
        diverges to NaN with CP).
    val_batch_size : int
        Held-out batch of the logit step.
    weight_objective : {"frob", "frob_rel", "sigma"}
        Decomposition term of Eq. 6; ``"sigma"`` (beyond the paper, E2) is the relative output MSE.
    logit_objective : {"val_ce", "frob", "sigma"}
        ``L_obj`` of Eq. 7: validation CE (paper), the decomposition term (the code's data-free ``recon``) or the
        data-free, label-free Sigma term (beyond the paper, E3).
    branch_init : str
        Registered method initializing every branch: ``"tt-svd"`` (paper), ``"tucker2-als"``,
        ``"tucker2-als-sigma"`` (beyond the paper, E1); ``"cp-als"`` or ``"cp-als-sigma"`` for CP.
    init_max_iter : int
        ALS sweeps of an iterative branch initialization.
    rank_cap : {"feasible", "break_even"}
        Per-layer candidate cap: ``min(T, S)`` (TT) / the CP break-even rank, or the TT break-even rank.
    param_budget : int or None
        Total model parameters to meet after the search by greedy projection (extension, spec 10.6).
    seed : int
        Order of the held-out batches.
    """

    family: str = "tucker2"
    rank_min: int = 10
    rank_max: int = 100
    step: int = 10
    factor: int = 10
    iters: int = 100
    warmup_iters: int = 20
    lr_weights: float = 1e-3
    lr_logits: float = 1e-3
    momentum: float = 0.9
    nesterov: bool = True
    logit_optimizer: str = "sgd"
    gamma: float = 0.4
    beta: float = 0.8
    grad_clip: float = 5.0
    val_batch_size: int = 256
    weight_objective: str = "frob"
    logit_objective: str = "val_ce"
    branch_init: str | None = None
    init_max_iter: int = 10
    rank_cap: str = "feasible"
    param_budget: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        candidate_grid(self.rank_min, self.rank_max, self.step)
        n_stages(self.step, self.factor)
        if self.branch_init is None:
            object.__setattr__(self, "branch_init", BRANCH_INITS[self.family][0])
        if self.branch_init not in BRANCH_INITS[self.family]:
            raise ValueError(f"branch_init for family {self.family} must be one of {BRANCH_INITS[self.family]}, got "
                             f"{self.branch_init!r}")
        for name in ("iters", "val_batch_size", "init_max_iter"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an int >= 1, got {getattr(self, name)!r}")
        if not isinstance(self.warmup_iters, int) or self.warmup_iters < 0:
            raise ValueError(f"warmup_iters must be an int >= 0, got {self.warmup_iters!r}")
        for name in ("lr_weights", "lr_logits"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must lie in [0, 1), got {self.momentum}")
        if not self.grad_clip >= 0:
            raise ValueError(f"grad_clip must be >= 0 (0: off), got {self.grad_clip}")
        if self.logit_optimizer not in ("sgd", "adam"):
            raise ValueError(f"logit_optimizer must be 'sgd' or 'adam', got {self.logit_optimizer!r}")
        if self.weight_objective not in DECOMPOSITION_KINDS:
            raise ValueError(f"weight_objective must be one of {DECOMPOSITION_KINDS}, got {self.weight_objective!r}")
        if self.logit_objective not in LOGIT_OBJECTIVES:
            raise ValueError(f"logit_objective must be one of {LOGIT_OBJECTIVES}, got {self.logit_objective!r}")
        if self.rank_cap not in RANK_CAPS:
            raise ValueError(f"rank_cap must be one of {RANK_CAPS}, got {self.rank_cap!r}")
        for name in ("gamma", "beta"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must lie in (0, 1], got {getattr(self, name)}")
        if self.param_budget is not None and (not isinstance(self.param_budget, int) or self.param_budget < 1):
            raise ValueError(f"param_budget must be an int >= 1 (total model parameters), got {self.param_budget!r}")

    @property
    def needs_sigma(self) -> bool:
        """Whether any switch uses the layers' input Sigma (E1-E3)."""
        return "sigma" in (self.weight_objective, self.logit_objective) or self.branch_init.endswith("-sigma")

    @property
    def needs_data(self) -> bool:
        """Whether the logit step reads held-out images (only the paper's ``val_ce``)."""
        return self.logit_objective == "val_ce"

    def identity(self) -> dict:
        """JSON-able fields (cache key of a search)."""
        return asdict(self)


# ------------------------------------------------------------------------------------------------ per layer


def _rank_cap(shape: tuple[int, ...], config: ReneConfig) -> int:
    t, s, h, w = shape
    if config.family == "tucker2":
        cap = min(t, s) if config.rank_cap == "feasible" else tt_break_even_rank(shape)
    else:
        cap = min(cp_max_rank(shape), (t * s * h * w) // (t + s + h + w))
    return max(1, cap)


def layer_param_count(shape: Sequence[int], family: str, rank: int, bias: bool) -> int:
    """Parameters of a layer factorized at tied TT rank / CP rank ``rank`` (bias included when present)."""
    t, s, h, w = (int(d) for d in shape)
    extra = t if bias else 0
    if family == "tucker2":
        return rank * (t + s) + rank * rank * h * w + extra
    return rank * (t + s + h + w) + extra


def _rank_tuple(family: str, r: int) -> tuple[int, ...]:
    return (r, r) if family == "tucker2" else (r,)


def _branches(conv: nn.Conv2d, ranks: Sequence[int], config: ReneConfig, sigma: torch.Tensor | None
              ) -> list[nn.Module]:
    """One branch per candidate rank, decomposed from the pretrained kernel by ``config.branch_init``."""
    method = get_method(config.branch_init)
    weight = conv.weight.detach().cpu().to(torch.float64)
    if config.branch_init == "tt-svd":  # the first SVD is shared by every candidate
        results = tt_svd_ranks(weight, [_rank_tuple(config.family, r) for r in ranks])
    else:
        options = SolverOptions(max_iter=config.init_max_iter)
        results = [method.decompose(weight, sigma, _rank_tuple(config.family, r), options, "cpu") for r in ranks]
    return [method.build(conv, result) for result in results]


def _check_layers(model: nn.Module, layer_names: Sequence[str]) -> dict[str, nn.Conv2d]:
    if not layer_names:
        raise ValueError("RENE needs at least one layer to search")
    convs = {}
    for name in layer_names:
        module = get_module(model, name)
        if not isinstance(module, nn.Conv2d) or module.groups != 1:
            raise ValueError(f"RENE searches ranks of nn.Conv2d layers with groups == 1; {name} is "
                             f"{type(module).__name__}" + (f" (groups={module.groups})" if isinstance(module, nn.Conv2d)
                                                           else ""))
        convs[name] = module
    return convs


def _diverged(stage: int, iteration: int, where: str, layer: str, what: str) -> FloatingPointError:
    return FloatingPointError(
        f"RENE search diverged in stage {stage}, iteration {iteration} ({where}): layer {layer} has a non-finite "
        f"{what}. Lower lr_weights / lr_logits or keep grad_clip > 0 (default 5); no ranks are returned")


def _check_step(stage: int, it: int, where: str, layers: Mapping[str, MixedRankConv], values: Mapping[str, torch.Tensor],
                what: str, total: torch.Tensor) -> None:
    for name, value in values.items():
        if not bool(torch.isfinite(value).all()):
            raise _diverged(stage, it, where, name, what)
    if not bool(torch.isfinite(total).all()):
        for name, layer in layers.items():
            if not all(bool(torch.isfinite(p).all()) for p in layer.branch_parameters()):
                raise _diverged(stage, it, where, name, "branch factor")
            if not bool(torch.isfinite(layer.logits).all()):
                raise _diverged(stage, it, where, name, "rank logit")
        raise _diverged(stage, it, where, "(all: objective)", what)


def _batches(n: int, batch: int, generator: torch.Generator):
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - batch + 1 if n >= batch else 1, batch):
            yield order[start:start + batch]


def _diagnostics(layers: Mapping[str, MixedRankConv]) -> dict:
    out = {}
    with torch.no_grad():
        for name, layer in layers.items():
            p = layer.p()
            target_sq = (layer.target ** 2).sum()
            branch_err = [float(torch.sqrt(((layer.target - k) ** 2).sum() / target_sq))
                          for k in layer.branch_kernels()]
            out[name] = {"max_abs_logit": float(layer.logits.abs().max()),
                         "entropy": float(-(p * torch.log(p.clamp_min(1e-30))).sum()),
                         "p_spread": float(p.max() - p.min()),
                         "mixture_rel_err": float(torch.sqrt(layer.decomposition_sq("frob_rel"))),
                         "branch_rel_err": branch_err}
    return out


def _run_stage(base: nn.Module, convs: Mapping[str, nn.Conv2d], grids: Mapping[str, tuple[int, ...]],
               config: ReneConfig, stage: int, s: int, val_x: torch.Tensor | None, val_y: torch.Tensor | None,
               sigmas: Mapping[str, torch.Tensor], device: str, bar: tqdm) -> StageRecord:
    tic = time.perf_counter()
    names = list(convs)
    mixed = {n: MixedRankConv(convs[n], _branches(convs[n], grids[n], config, sigmas.get(n)), grids[n]) for n in names}
    supernet = replace_modules(base, mixed).to(device).eval()
    supernet.requires_grad_(False)
    layers = {n: get_module(supernet, n) for n in names}
    w_params = [p for layer in layers.values() for p in layer.branch_parameters()]
    a_params = [layer.logits for layer in layers.values()]
    for p in w_params + a_params:
        p.requires_grad_(True)
    sig = [sigmas[n].to(device) if config.needs_sigma and n in sigmas else None for n in names]
    opt_w = torch.optim.SGD(w_params, lr=config.lr_weights, momentum=config.momentum, nesterov=config.nesterov)
    if config.logit_optimizer == "adam":
        opt_a = torch.optim.Adam(a_params, lr=config.lr_logits)
    else:
        opt_a = torch.optim.SGD(a_params, lr=config.lr_logits, momentum=config.momentum, nesterov=config.nesterov)
    generator = torch.Generator().manual_seed(config.seed * 1000 + stage)
    batches = _batches(len(val_y), config.val_batch_size, generator) if config.needs_data else None
    layer_list = list(layers.values())
    last = {"decomposition": math.nan, "rank": math.nan, "objective": math.nan}
    for it in range(config.warmup_iters + config.iters):
        opt_w.zero_grad(set_to_none=True)
        loss_w, parts = weight_loss(layer_list, config.gamma, config.beta, config.weight_objective, sig)
        _check_step(stage, it, "weight step", layers, dict(zip(names, parts["per_layer"])), "decomposition loss",
                    loss_w)
        loss_w.backward(inputs=w_params)
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(w_params, config.grad_clip)
        opt_w.step()
        last.update(decomposition=parts["decomposition"].item(), rank=parts["rank"].item())
        if it >= config.warmup_iters:
            for layer in layer_list:
                layer.freeze_branches(True)
            if config.logit_objective == "val_ce":
                index = next(batches)
                x, y = val_x[index].to(device), val_y[index].to(device)
                objective = nn.functional.cross_entropy(supernet(x), y)
            else:
                kind = "sigma" if config.logit_objective == "sigma" else config.weight_objective
                objective = torch.stack([layer.decomposition_sq(kind, sg) for layer, sg in zip(layer_list, sig)]).sum()
            for layer in layer_list:
                layer.freeze_branches(False)
            loss_a, lparts = logit_loss(objective, layer_list, config.gamma, config.beta)
            _check_step(stage, it, "logit step", layers, {}, "logit objective", loss_a)
            opt_a.zero_grad(set_to_none=True)
            loss_a.backward(inputs=a_params)
            opt_a.step()
            _check_step(stage, it, "logit step", layers, {n: layer.logits for n, layer in layers.items()},
                        "rank logit", loss_a.detach())
            last["objective"] = lparts["objective"].item()
        bar.set_postfix(stage=stage, s=s, L_d=f"{last['decomposition']:.3g}", refresh=False)
        bar.update()
    final_it = config.warmup_iters + config.iters
    _check_step(stage, final_it, "end of stage", layers, {}, "factor", torch.stack(
        [torch.stack([p.detach().abs().max() for p in layer.branch_parameters()]).max() for layer in layer_list]))
    with torch.no_grad():
        coefficients = {n: tuple(float(v) for v in layer.p()) for n, layer in layers.items()}
    return StageRecord(step=stage, s=s, candidates=dict(grids), coefficients=coefficients,
                       selected={n: layer.best_rank() for n, layer in layers.items()}, final_losses=last,
                       diagnostics=_diagnostics(layers), seconds=time.perf_counter() - tic)


def _projection(model: nn.Module, convs: Mapping[str, nn.Conv2d], ranks: Mapping[str, int], config: ReneConfig,
                check_only: bool = False):
    shapes = {n: tuple(c.weight.shape) for n, c in convs.items()}
    fixed = count_params(model) - sum(count_params(c) for c in convs.values())
    bias = {n: c.bias is not None for n, c in convs.items()}

    def params(name: str, r: int) -> int:
        return layer_param_count(shapes[name], config.family, r, bias[name])

    cache: dict[tuple[str, int], float] = {}

    def error(name: str, r: int) -> float:
        if (name, r) not in cache:
            init = "tt-svd" if config.family == "tucker2" else "cp-als"
            method = get_method(init)
            weight = convs[name].weight.detach().cpu().to(torch.float64)
            res = method.decompose(weight, None, _rank_tuple(config.family, r),
                                   SolverOptions(max_iter=config.init_max_iter), "cpu")
            cache[(name, r)] = float(((weight - res.reconstruct()) ** 2).sum() / (weight ** 2).sum())
        return cache[(name, r)]

    if check_only:
        smallest = fixed + sum(params(n, 1) for n in convs)
        if smallest > config.param_budget:
            raise ValueError(f"param_budget={config.param_budget} is below the smallest reachable model ({smallest} "
                             "parameters with every searched layer at rank 1); raise the budget")
        return None
    return project_to_budget(ranks, params, error, config.param_budget, fixed_params=fixed)


def search_ranks(model: nn.Module, layer_names: Sequence[str], val_x: torch.Tensor | None,
                 val_y: torch.Tensor | None, config: ReneConfig, *, sigmas: Mapping[str, torch.Tensor] | None = None,
                 device: str = "cpu", progress: bool = True, resume: Sequence[StageRecord] = (),
                 on_stage: Callable[[StageRecord], None] | None = None) -> RankSearchResult:
    """Run the RENE search (spec Sec. 5) and return the per-layer ranks with the record of every stage.

    Parameters
    ----------
    model : nn.Module
        Pretrained classifier; not modified (the supernet is a frozen deep copy in eval mode, BN statistics fixed).
    layer_names : sequence of str
        Convs to search (``groups == 1``).
    val_x, val_y : torch.Tensor, shapes (N, C, H, W) and (N,)
        Held-out TRAINING images and labels for the logit step (never the test set); may be None for the
        data-free logit objectives.
    config : ReneConfig
    sigmas : dict of str to torch.Tensor (S H W, S H W), optional
        Input Sigma per layer, needed by the Sigma switches (E1-E3).
    device : str
    progress : bool
        tqdm bar over all iterations of all stages.
    resume : sequence of StageRecord
        Stages already finished (a checkpoint); they are checked against the candidates they imply and skipped.
    on_stage : callable, optional
        Called with each newly finished stage (checkpointing).

    Returns
    -------
    RankSearchResult
        ``ranks`` ``(r, r)`` (tucker2) or ``(R,)`` (cp) per layer, after the budget projection when set.

    Raises
    ------
    FloatingPointError
        A loss, factor or logit became non-finite (message names stage, iteration and layer).
    ValueError
        Bad layers, missing data / Sigma, or a budget below the smallest reachable model.
    """
    tic = time.perf_counter()
    base = copy.deepcopy(model).cpu().eval()
    convs = _check_layers(base, layer_names)
    sigmas = dict(sigmas or {})
    if config.needs_sigma:
        missing = [n for n in convs if n not in sigmas]
        if missing:
            raise ValueError(f"the Sigma switches of this ReneConfig need the Sigma of layers {missing}")
    if config.needs_data:
        if val_x is None or val_y is None or len(val_y) == 0:
            raise ValueError("logit_objective='val_ce' needs held-out training images (val_x, val_y)")
        if len(val_x) != len(val_y):
            raise ValueError(f"val_x has {len(val_x)} images but val_y {len(val_y)} labels")
    if config.param_budget is not None:
        _projection(base, convs, {}, config, check_only=True)
    caps = {n: _rank_cap(tuple(c.weight.shape), config) for n, c in convs.items()}
    grids = {n: sanitize(candidate_grid(config.rank_min, config.rank_max, config.step), caps[n]) for n in convs}
    total = n_stages(config.step, config.factor) * (config.warmup_iters + config.iters)
    stages: list[StageRecord] = []
    s, stage = config.step, 0
    with tqdm(total=total, desc=f"RENE({config.family})", unit="it", disable=not progress, leave=False) as bar:
        while s >= 1:
            if stage < len(resume):
                record = resume[stage]
                if dict(record.candidates) != grids or record.s != s:
                    raise ValueError(f"checkpointed stage {stage} does not match this search (other candidates); "
                                     "delete the partial checkpoint to restart")
                bar.update(config.warmup_iters + config.iters)
            else:
                record = _run_stage(base, convs, grids, config, stage, s, val_x, val_y, sigmas, device, bar)
                if on_stage is not None:
                    on_stage(record)
            stages.append(record)
            next_grids = {}
            for n in convs:
                _, _, s_next, grid = refine(record.selected[n], s, config.factor)
                next_grids[n] = sanitize(grid, caps[n]) if grid else ()
            s, stage, grids = s_next, stage + 1, next_grids
    ranks = dict(stages[-1].selected)
    changes: list[dict] = []
    if config.param_budget is not None:
        ranks, changes = _projection(base, convs, ranks, config)
    return RankSearchResult(ranks={n: _rank_tuple(config.family, r) for n, r in ranks.items()}, family=config.family,
                            stages=tuple(stages), seconds=time.perf_counter() - tic, config=config.identity(),
                            projection=tuple(changes))


# ------------------------------------------------------------------------------------------------ cache


def _tensor_digest(*tensors: torch.Tensor | None) -> str:
    digest = hashlib.sha256()
    for t in tensors:
        if t is None:
            digest.update(b"none")
            continue
        t = t.detach().cpu().contiguous()
        digest.update(f"{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def search_key(model: nn.Module, layer_names: Sequence[str], config: ReneConfig, val_x: torch.Tensor | None,
               val_y: torch.Tensor | None, sigma_key: str | None = None) -> str:
    """Content address (12 hex) of a search: model weights, layers, config, held-out data and Sigma source."""
    blob = json.dumps({"weights": model_fingerprint(model), "layers": list(layer_names), "config": config.identity(),
                       "data": _tensor_digest(val_x, val_y) if config.needs_data else None,
                       "sigma": sigma_key if config.needs_sigma else None, "format": 1},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def cached_search(model: nn.Module, layer_names: Sequence[str], val_x: torch.Tensor | None,
                  val_y: torch.Tensor | None, config: ReneConfig, *, cache_dir: str | Path,
                  sigmas: Mapping[str, torch.Tensor] | None = None, sigma_key: str | None = None,
                  device: str = "cpu", progress: bool = True) -> tuple[RankSearchResult, dict]:
    """:func:`search_ranks` behind ``<cache_dir>/rene/<key>.json``; finished stages go to ``<key>.partial.json``.

    A rerun with the same key loads the result; a killed run resumes after its last finished stage (each stage
    starts from the pretrained weights and zero logits, and its batch order depends on (seed, stage) only, so the
    resumed result equals an uninterrupted one). Returns ``(result, {"key", "cached", "path", "resumed_stages"})``.
    """
    key = search_key(model, layer_names, config, val_x, val_y, sigma_key)
    directory = Path(cache_dir) / "rene"
    path, partial = directory / f"{key}.json", directory / f"{key}.partial.json"
    if path.exists():
        return RankSearchResult.from_dict(json.loads(path.read_text())), {"key": key, "cached": True,
                                                                           "path": str(path), "resumed_stages": 0}
    done = [StageRecord.from_dict(s) for s in json.loads(partial.read_text())] if partial.exists() else []

    def checkpoint(record: StageRecord) -> None:
        done.append(record)
        atomic_write_text(partial, json.dumps([s.to_dict() for s in done], indent=1))

    resumed = len(done)
    result = search_ranks(model, layer_names, val_x, val_y, config, sigmas=sigmas, device=device, progress=progress,
                          resume=list(done), on_stage=checkpoint)
    atomic_write_text(path, json.dumps(result.to_dict(), indent=1))
    partial.unlink(missing_ok=True)
    return result, {"key": key, "cached": False, "path": str(path), "resumed_stages": resumed}


# ------------------------------------------------------------------------------------------------ ranks.json


def write_ranks_file(path: str | Path, result: RankSearchResult, *, model_name: str, fingerprint: str,
                     key: str | None = None, extra: Mapping | None = None) -> Path:
    """Write ``ranks.json``: the rank map plus what it was searched on (model name and weights fingerprint)."""
    path = Path(path)
    blob = {"format": RANKS_FORMAT, "model": model_name, "fingerprint": fingerprint, "family": result.family,
            "key": key, "ranks": {k: list(v) for k, v in result.ranks.items()}, "search": result.to_dict(),
            **(dict(extra) if extra else {})}
    atomic_write_text(path, json.dumps(blob, indent=1))
    return path


def load_ranks_file(path: str | Path) -> dict:
    """Read and check a ``ranks.json`` written by :func:`write_ranks_file`."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"rank map {path} not found: write one with `sigma-compress rene ... --output {path}`")
    try:
        blob = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(blob, dict) or blob.get("format") != RANKS_FORMAT:
        raise ValueError(f"{path} is not a RENE rank map (format {RANKS_FORMAT!r} expected)")
    RankSearchResult(ranks=blob["ranks"], family=blob["family"], stages=(), seconds=0.0)  # validates the ranks
    return blob


def rank_overrides(blob: Mapping, model: nn.Module, method: str) -> dict[str, tuple]:
    """Per-layer ``(method, RankRule)`` overrides for ``method`` from a rank map, after checking that it fits.

    Raises
    ------
    ValueError
        The map was searched on other weights, names layers the model lacks (or that are not convs), or its family
        does not match the method's (a CP map for a Tucker-2 method or vice versa; SVD methods take no map).
    """
    from sigma_core import RankRule

    fingerprint = model_fingerprint(model)
    if blob.get("fingerprint") != fingerprint:
        raise ValueError(f"the rank map was searched on model {blob.get('model')!r} with weights "
                         f"{blob.get('fingerprint')}, but the model to compress has weights {fingerprint}: rerun "
                         "`sigma-compress rene` on this model")
    family = get_method(method).family
    if family != blob["family"]:
        raise ValueError(f"the rank map holds RENE({blob['family']}) ranks but method {method} is a {family} method: "
                         f"{'Tucker-2' if blob['family'] == 'tucker2' else 'CP'} ranks feed only "
                         f"{'tucker2-*, tt-svd, fw-lra, ag-lra' if blob['family'] == 'tucker2' else 'cp-*'} methods")
    names = {n for n, _ in model.named_modules()}
    unknown = [n for n in blob["ranks"] if n not in names]
    if unknown:
        raise ValueError(f"the rank map names layers the model does not have: {unknown}")
    not_conv = [n for n in blob["ranks"] if not isinstance(get_module(model, n), nn.Conv2d)]
    if not_conv:
        raise ValueError(f"the rank map names layers that are not convs: {not_conv}")
    out = {}
    for name, ranks in blob["ranks"].items():
        rule = RankRule(ranks=tuple(ranks)) if family == "tucker2" else RankRule(cp_rank=int(ranks[0]))
        out[name] = (method, rule)
    return out


def rank_map_digest(blob: Mapping) -> str:
    """8-hex digest of a rank map (family + ranks): the ``<method>@rene`` point slug uses it."""
    return hashlib.sha256(json.dumps({"family": blob["family"], "ranks": blob["ranks"]}, sort_keys=True)
                          .encode()).hexdigest()[:8]


# ------------------------------------------------------------------------------------------------ MLflow


def log_search(tracker, result: RankSearchResult, info: Mapping) -> None:
    """Log the config, per-stage selected ranks and diagnostics, ``search_seconds`` and the full record."""
    metrics = {"search_seconds": result.seconds, "search_cached": float(bool(info.get("cached")))}
    for stage in result.stages:
        for name, r in stage.selected.items():
            metrics[f"rene.stage{stage.step}.{name}.rank"] = r
            diag = stage.diagnostics.get(name, {})
            for key in ("p_spread", "entropy", "max_abs_logit", "mixture_rel_err"):
                if key in diag:
                    metrics[f"rene.stage{stage.step}.{name}.{key}"] = diag[key]
        for key, value in stage.final_losses.items():
            metrics[f"rene.stage{stage.step}.{key}"] = value
    for name, ranks in result.ranks.items():
        metrics[f"rene.final.{name}.rank"] = ranks[0]
    tracker.log_metrics(metrics)
    tracker.log_json(result.to_dict(), "rene_search.json")

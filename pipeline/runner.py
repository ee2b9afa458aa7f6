"""The compress job: one model, one Sigma source, a grid of (method, rank rule) points, resumable.

Every finished point is written atomically to ``<output_dir>/points/<slug>.json`` (plus its compressed model);
running the same job again skips the points already on disk, so a killed run loses at most the point in flight.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from pipeline._io import atomic_write_text
from pipeline.compress import (
    SigmaSource,
    accuracy,
    compress_model,
    compute_sigmas,
    load_compressed,
    model_stats,
    outcome_rows,
    save_compressed,
)
from pipeline.data import DatasetSpec, make_loader, sample_subset
from pipeline.finetune import FinetuneConfig, finetune, finetune_data
from pipeline.fisher import compute_layer_stats
from pipeline.methods import SolverOptions, get_method
from pipeline.models import REFERENCE_MODELS, build_model
from pipeline.report import layer_table, method_comparison, plot_accuracy_vs_compression, summary_table
from pipeline.sigma_cache import SigmaCache
from pipeline.tracking import Tracker, default_tracking_uri
from pipeline.train import TrainConfig, load_or_train_reference
from pipeline.allocation import AllocationConfig, budgeted_overrides, check_target_config, target_point_fields
from sigma_core import LayerChoice, RankRule, plan_layers
from sigma_core.allocate import RankTarget

__all__ = ["CompressConfig", "run_compress", "prepare_model"]


@dataclass(frozen=True)
class CompressConfig:
    """Everything the compress job needs; built from CLI flags or YAML at the edge (``jobs/``).

    Sigma comes from ``sigma`` (any dataset view, e.g. digits for a Fashion-MNIST model); accuracy from
    ``eval_dataset``. Rank rules: each alpha of ``alphas`` (paper Eq. 2), or explicit ``ranks`` (R_T, R_S)
    for every layer, or a ``fraction`` of each layer's channels, or an explicit ``cp_rank`` R for every layer
    (CP methods only).

    SVD methods (``"svd-sigma"``, ``"svd"``) factorize linear layers (and 1x1 convs named in ``layers``). Hybrid
    compression (paper App. E, Table 5): ``linear_method`` factorizes the linear layers while the convs use each
    method of ``methods``. SVD layers take ``svd_rank`` when given, else the same alpha / fraction rule. The last
    linear layer (the classifier) stays dense unless ``compress_last_linear``: its output is the logits, so no
    later layer absorbs its error, and with out = num_classes it has few parameters and almost no rank to cut.

    ``finetune`` adds the paper's fine-tuned baseline: for each method of ``finetune_methods``, one more point per
    rank rule, labelled ``"<method>+ft"``, whose compressed model is fine-tuned (:mod:`pipeline.finetune`).
    ``precision`` adds FP32/FP16/INT8 top-1 to every point (:mod:`pipeline.quantize`; INT8 calibrated on
    ``calib_samples`` images of the Sigma dataset). Both reload the point's saved model, so need ``save_models``.
    """

    model: str = "resnet-fmnist"
    weights: str | None = None
    num_classes: int = 10
    train: TrainConfig | None = None
    sigma: SigmaSource = field(default_factory=lambda: SigmaSource(DatasetSpec("fashion-mnist")))
    eval_dataset: DatasetSpec = field(default_factory=lambda: DatasetSpec("fashion-mnist", split="test"))
    eval_limit: int | None = None
    methods: tuple[str, ...] = ("tucker2-als", "tucker2-als-sigma")
    alphas: tuple[float, ...] = (0.8,)
    ranks: tuple[int, int] | None = None
    fraction: float | None = None
    cp_rank: int | None = None
    layers: tuple[str, ...] | None = None
    linear_method: str | None = None
    svd_rank: int | None = None
    compress_last_linear: bool = False
    solver: SolverOptions = field(default_factory=SolverOptions)
    device: str = "cpu"
    batch_size: int = 500
    output_dir: str = "outputs/compress"
    cache_dir: str = "cache"
    tracking_uri: str | None = None
    experiment: str = "sigma-compress"
    track: bool = True
    save_models: bool = True
    retrain_corrupt: bool = False
    progress: bool = True
    finetune: FinetuneConfig | None = None
    finetune_methods: tuple[str, ...] = ("tucker2-als",)
    precision: bool = False
    calib_samples: int = 500
    # Budgeted allocation (pipeline.allocation): a model-level size target replaces the per-layer rank rule; the
    # alphas then only add their ranks to the candidate grid (so the budget of an alpha point is never worse).
    target: RankTarget | None = None
    allocation: AllocationConfig = field(default_factory=AllocationConfig)

    def __post_init__(self) -> None:
        for name in self.methods:
            get_method(name)
        check_target_config(self)
        if not self.methods:
            raise ValueError("methods is empty: choose at least one of the registered methods")
        if self.ranks is None and self.fraction is None and self.cp_rank is None and not self.alphas \
                and self.svd_rank is None:
            raise ValueError("give alphas, explicit ranks, a rank fraction or a CP rank")
        self._check_cp_rank()
        if self.linear_method is not None and get_method(self.linear_method).family != "svd":
            raise ValueError(f"linear_method must be an SVD method (svd-sigma or svd), got {self.linear_method!r}")
        uses_svd = self.linear_method is not None or any(get_method(m).family == "svd" for m in self.methods)
        if uses_svd and self.ranks is not None and self.svd_rank is None:
            raise ValueError("explicit ranks (R_T, R_S) are Tucker-2 ranks; give svd_rank for the SVD layers too")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r} requested but CUDA is not available: use --device cpu")
        self._check_extras()

    def _check_cp_rank(self) -> None:
        cp = [m for m in self.methods if get_method(m).family == "cp"]
        if self.ranks is not None and cp:
            raise ValueError(f"ranks (R_T, R_S) are Tucker-2 ranks; for the CP methods {', '.join(cp)} give "
                             "cp_rank R (--cp-rank R), alphas or a fraction")
        if self.cp_rank is None:
            return
        if self.ranks is not None or self.fraction is not None:
            raise ValueError("give only one of ranks, fraction and cp_rank")
        RankRule(cp_rank=self.cp_rank)  # validates the value
        not_cp = [m for m in self.methods if get_method(m).family != "cp"]
        if not_cp:
            raise ValueError(f"cp_rank is a CP rank but methods {not_cp} are not CP methods; use ranks / fraction "
                             "/ alphas for them, or run them separately")
        if self.linear_method is not None and self.svd_rank is None:
            raise ValueError("cp_rank applies to the convs only: give svd_rank for the linear layers too")

    def _check_extras(self) -> None:
        """Fine-tuning / precision options: they reload saved models and fine-tune on Fashion-MNIST."""
        if self.finetune is not None:
            missing = [m for m in self.finetune_methods if m not in self.methods]
            if missing:
                raise ValueError(f"finetune_methods {missing} are not among methods {list(self.methods)}")
            if self.eval_dataset.name != "fashion-mnist":
                raise ValueError("fine-tuning uses the Fashion-MNIST training set: eval_dataset must be fashion-mnist")
        if (self.finetune is not None or self.precision) and not self.save_models:
            raise ValueError("finetune / precision reload each point's saved model: keep save_models=True")
        if self.calib_samples < 1:
            raise ValueError(f"calib_samples must be >= 1, got {self.calib_samples}")

    def rules(self) -> list[tuple[RankRule, float | None]]:
        """Rank rules of the grid, each with its alpha (None for explicit ranks or fractions)."""
        if self.target is not None:
            return [(RankRule(target=self.target), None)]
        if self.ranks is not None:
            return [(RankRule(ranks=tuple(self.ranks)), None)]
        if self.fraction is not None:
            return [(RankRule(fraction=self.fraction), None)]
        if self.cp_rank is not None:
            return [(RankRule(cp_rank=self.cp_rank), None)]
        if self.svd_rank is not None and all(get_method(m).family == "svd" for m in self.methods):
            return [(RankRule(svd_rank=self.svd_rank), None)]
        return [(RankRule(alpha=a), a) for a in self.alphas]

    def layer_rule(self, method: str, rule: RankRule) -> RankRule:
        """The rule a layer decomposed by ``method`` uses: ``svd_rank`` for SVD layers when given, else ``rule``."""
        if get_method(method).family == "svd" and self.svd_rank is not None:
            return RankRule(svd_rank=self.svd_rank)
        return rule


def prepare_model(config: CompressConfig) -> tuple[nn.Module, dict]:
    """The model to compress: user weights, or the cached reference model (trained on first use)."""
    if config.weights is not None:
        return build_model(config.model, num_classes=config.num_classes, weights=config.weights).eval(), {
            "weights": str(config.weights)}
    if config.model in REFERENCE_MODELS:
        train_cfg = config.train or TrainConfig(model=config.model)
        model, meta = load_or_train_reference(train_cfg, Path(config.cache_dir) / "models",
                                              retrain_corrupt=config.retrain_corrupt, progress=config.progress)
        return model.eval(), meta
    raise ValueError(
        f"model {config.model!r} needs --weights FILE (safetensors or a state_dict): nothing is downloaded; "
        f"without weights only the reference models {', '.join(REFERENCE_MODELS)} can be trained here"
    )


_REASON_LAST_LINEAR = ("final classifier (last nn.Linear): kept dense -- its output is the logits, so no later layer "
                       "absorbs its error, and with out = num_classes there is little to compress "
                       "(compress_last_linear=True or name it to factorize it)")


def _svd_able(choice: LayerChoice) -> bool:
    return choice.kind == "linear" or tuple(choice.weight_shape[2:]) == (1, 1)


def _layer_methods(selected: list[LayerChoice], method: str, config: CompressConfig) -> dict[str, str]:
    """Layer -> method for one point: SVD methods take linear / 1x1 layers, the others convs (+ hybrid linears)."""
    out = {}
    for choice in selected:
        if get_method(method).family == "svd":
            if _svd_able(choice):
                out[choice.name] = method
        elif _svd_able(choice) and config.linear_method is not None:
            out[choice.name] = config.linear_method
        elif choice.kind == "conv" or config.layers is not None:
            out[choice.name] = method
    return out


def plan_points(model: nn.Module, config: CompressConfig) -> tuple[dict[str, dict[str, str]], list[str], list[dict]]:
    """Which layers each method of ``config`` factorizes, and by which method (hybrid: linears by SVD).

    Returns
    -------
    assignment : dict
        ``assignment[method][layer]`` = method that decomposes ``layer`` in that method's points.
    layers : list of str
        Every layer some point factorizes, in module order.
    plan : list of dict
        Every conv / linear layer with why it is (or is not) chosen.
    """
    with_linear = config.linear_method is not None or any(get_method(m).family == "svd" for m in config.methods)
    plan = plan_layers(model, include_linear=with_linear, names=list(config.layers) if config.layers else None)
    linears = [i for i, c in enumerate(plan) if c.kind == "linear"]
    if with_linear and config.layers is None and not config.compress_last_linear and linears:
        plan[linears[-1]] = dataclasses.replace(plan[linears[-1]], selected=False, reason=_REASON_LAST_LINEAR)
    selected = [c for c in plan if c.selected]
    assignment = {m: _layer_methods(selected, m, config) for m in config.methods}
    empty = [m for m, layers in assignment.items() if not layers]
    if empty:
        raise ValueError(f"no layer selected for compression by {empty}: pass layer names explicitly (SVD methods "
                         "factorize linear layers and 1x1 convs, the others convs)")
    layers = [c.name for c in selected if any(c.name in a for a in assignment.values())]
    return assignment, layers, [asdict(c) for c in plan]


def _slug(method: str, rule: RankRule, config: CompressConfig) -> str:
    # Hybrid / SVD settings enter the identity only when set, so that existing points keep their slugs.
    extra = {k: getattr(config, k) for k in ("linear_method", "svd_rank", "compress_last_linear") if getattr(config, k)}
    if rule.target is not None:
        extra["allocation"] = asdict(config.allocation)
        extra["alphas"] = config.alphas  # their ranks join the candidate grid
    solver = asdict(config.solver)
    if solver["cp_init"] == "svd":  # the default, added later: leave it out so that existing slugs stay valid
        del solver["cp_init"]
    ident = json.dumps({"method": method, "rule": rule.describe(), "sigma": config.sigma.identity(),
                        "eval": config.eval_dataset.identity(), "limit": config.eval_limit,
                        "solver": solver, "layers": config.layers, **extra}, sort_keys=True,
                       default=str)
    digest = hashlib.sha256(ident.encode()).hexdigest()[:8]
    if rule.alpha is not None:
        label = f"alpha{rule.alpha:g}"
    elif rule.ranks is not None:
        label = "ranks" + "x".join(map(str, rule.ranks))
    elif rule.fraction is not None:
        label = f"fraction{rule.fraction:g}"
    elif rule.cp_rank is not None:
        label = f"cprank{rule.cp_rank}"
    elif rule.target is not None:
        label = f"target-{rule.target.label()}"
    else:
        label = f"svdrank{rule.svd_rank}"
    return f"{method}-{label}-{digest}"


def _point_metrics(method: str, rule: RankRule, alpha, baseline: dict, stats: dict, acc: dict, layers, secs):
    ok = [row for row in layers if row["error"] is None]

    def mean(key):
        vals = [row[key] for row in ok if row[key] is not None]
        return sum(vals) / len(vals) if vals else None

    return {
        "method": method, "rank_rule": rule.describe(), "alpha": alpha,
        "top1": acc["top1"], "top5": acc["top5"], "top1_drop": baseline["top1"] - acc["top1"],
        "params": stats["params"], "macs": stats["macs"],
        "compression_rate": baseline["params"] / stats["params"], "mac_reduction": baseline["macs"] / stats["macs"],
        "mean_rel_sigma_err": mean("rel_sigma_err"), "mean_rel_frob_err": mean("rel_frob_err"),
        "decompose_seconds": secs, "failed_layers": len(layers) - len(ok), "layers": layers,
    }


def run_compress(config: CompressConfig) -> dict:
    """Run the job; returns ``{"baseline", "points", "table", "layer_table", "plot", "output_dir"}``."""
    out = Path(config.output_dir)
    (out / "points").mkdir(parents=True, exist_ok=True)
    torch_threads = torch.get_num_threads()
    model, model_meta = prepare_model(config)
    assignment, chosen, plan = plan_points(model, config)
    data_cache = Path(config.cache_dir) / "datasets"
    input_shape = tuple(config.eval_dataset.build(cache_dir=data_cache)[0][0].shape)
    tracker = Tracker(config.tracking_uri or default_tracking_uri(out), config.experiment, enabled=config.track)

    needs = {get_method(m).needs for layer_methods in assignment.values() for m in layer_methods.values()}
    sigmas, sigma_info = {}, {"cached": None}
    if "sigma" in needs:
        # Sigma of every chosen layer, so that rel_sigma_err is reported for the other methods too.
        sigmas, sigma_info = compute_sigmas(model, chosen, config.sigma, device=config.device,
                                            cache=SigmaCache(Path(config.cache_dir) / "sigma"),
                                            data_cache_dir=data_cache, progress=config.progress)
    stat_layers = {kind: sorted({layer for a in assignment.values() for layer, m in a.items()
                                 if get_method(m).needs == kind}) for kind in ("fisher", "activation")}
    stats, stats_info = compute_layer_stats(model, stat_layers, config.sigma, device=config.device,
                                            data_cache_dir=data_cache)
    baseline = _baseline(model, config, input_shape, data_cache, out)
    params = {"model": config.model, "sigma_source": json.dumps(config.sigma.identity(), default=str),
              "eval": json.dumps(config.eval_dataset.identity()), "eval_limit": config.eval_limit,
              "layers": ",".join(chosen), "device": config.device, "threads": torch_threads}
    points = []
    with tracker.run(f"compress-{config.model}", params):
        tracker.log_metrics({"baseline_top1": baseline["top1"], "baseline_params": baseline["params"],
                             "sigma_seconds": sigma_info.get("seconds", 0.0)})
        tracker.log_json(plan, "layer_plan.json")
        # Loaded once, by the first fine-tuned point not on disk yet.
        ft_data = functools.cache(lambda: finetune_data(config.finetune, data_cache))
        for rule, alpha in config.rules():
            for method in config.methods:
                points.append(_run_point(model, method, rule, alpha, assignment[method], sigmas, stats, baseline,
                                         config, input_shape, data_cache, out, tracker))
                if config.finetune is not None and method in config.finetune_methods:
                    points.append(_run_finetune_point(points[-1], rule, ft_data, baseline, config, input_shape,
                                                      data_cache, out, tracker))
        if config.precision:
            points = [_add_precision(p, config, data_cache, out) for p in points]
        result = _write_report(baseline, points, plan, config, out, tracker)
    return {**result, "baseline": baseline, "points": points, "plan": plan, "sigma_info": sigma_info,
            "stats_info": stats_info, "model_meta": model_meta, "output_dir": str(out)}


def _baseline(model, config: CompressConfig, input_shape, data_cache, out: Path) -> dict:
    """Accuracy/params/MACs of the original model, cached in the output directory (keyed by the eval view)."""
    path = out / "baseline.json"
    key = json.dumps({"eval": config.eval_dataset.identity(), "limit": config.eval_limit}, sort_keys=True)
    from pipeline.sigma_cache import model_fingerprint

    fingerprint = model_fingerprint(model)
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("key") == key and saved.get("fingerprint") == fingerprint:
            return saved
    acc = accuracy(model, config.eval_dataset, limit=config.eval_limit, batch_size=config.batch_size,
                   device=config.device, data_cache_dir=data_cache, progress=config.progress)
    baseline = {**acc, **model_stats(model.cpu(), input_shape), "key": key, "fingerprint": fingerprint}
    atomic_write_text(path, json.dumps(baseline, indent=2))
    return baseline


def _run_point(model, method, rule, alpha, layer_methods, sigmas, data_stats, baseline, config, input_shape,
               data_cache, out, tracker):
    hybrid = any(m != method for m in layer_methods.values())
    label = f"{method}+{config.linear_method}" if hybrid else method  # paper Table 5: "Tucker2-ALS-Sigma + SVD-Sigma"
    slug = _slug(label, rule, config)
    path = out / "points" / f"{slug}.json"
    if path.exists():
        return json.loads(path.read_text())
    layer_stats = {layer: data_stats[get_method(m).needs][layer] for layer, m in layer_methods.items()
                   if get_method(m).needs in data_stats}
    tic = time.perf_counter()
    allocation = None
    if rule.target is not None:
        allocation = budgeted_overrides(model, layer_methods, sigmas, layer_stats, config, input_shape, data_cache)
        overrides = allocation.overrides(layer_methods)
        layer_methods = {layer: m for layer, m in layer_methods.items() if layer in overrides}
    else:
        overrides = {layer: (m, config.layer_rule(m, rule)) for layer, m in layer_methods.items()}
    compressed, outcomes = compress_model(model, list(layer_methods), sigmas, rule, method, options=config.solver,
                                          device=config.device, progress=config.progress, stats=layer_stats,
                                          overrides=overrides)
    secs = time.perf_counter() - tic
    acc = accuracy(compressed, config.eval_dataset, limit=config.eval_limit, batch_size=config.batch_size,
                   device=config.device, data_cache_dir=data_cache, progress=config.progress)
    stats = model_stats(compressed.cpu(), input_shape)
    point = _point_metrics(label, rule, alpha, baseline, stats, acc, outcome_rows(outcomes), secs)
    point["slug"] = slug
    if allocation is not None:
        point.update(target_point_fields(allocation, baseline, stats))
    with tracker.run(slug, {"method": label, "rank_rule": rule.describe(), "alpha": alpha,
                            "n_samples": config.sigma.n_samples, "sigma_dataset": config.sigma.dataset.name},
                     nested=True):
        tracker.log_metrics({k: v for k, v in point.items() if k != "layers"})
        tracker.log_layers(point["layers"])
        if config.save_models:
            model_dir = save_compressed(out / "models" / slug, config.model, config.num_classes, compressed,
                                        [o.name for o in outcomes if o.ok],
                                        extra={"method": label, "rank_rule": rule.describe()})
            point["model_dir"] = str(model_dir)
            tracker.log_artifact(model_dir, "model")
    atomic_write_text(path, json.dumps(point, indent=2, default=str))
    return point


def _run_finetune_point(base: dict, rule: RankRule, ft_data, baseline: dict, config: CompressConfig, input_shape,
                        data_cache, out: Path, tracker: Tracker) -> dict:
    """Fine-tune the model of point ``base`` (paper's Tucker2-ALS + fine-tuning baseline); cached like any point.

    ``ft_data()`` returns the :class:`pipeline.finetune.FinetuneData`; the reported ``top1`` is on the eval set,
    ``top1_before_ft`` is ``base``'s.
    """
    label = f"{base['method']}+ft"
    digest = hashlib.sha256(json.dumps(config.finetune.identity(), sort_keys=True).encode()).hexdigest()[:8]
    slug = f"{_slug(label, rule, config)}-ft{digest}"
    path = out / "points" / f"{slug}.json"
    if path.exists():
        return json.loads(path.read_text())
    tuned, info = finetune(_point_model(base), config.finetune, ft_data(), device=config.device,
                           progress=config.progress)
    acc = accuracy(tuned, config.eval_dataset, limit=config.eval_limit, batch_size=config.batch_size,
                   device=config.device, data_cache_dir=data_cache, progress=config.progress)
    stats = model_stats(tuned.cpu(), input_shape)
    point = _point_metrics(label, rule, base["alpha"], baseline, stats, acc, base["layers"],
                           base["decompose_seconds"])
    point.update(slug=slug, top1_before_ft=base["top1"], finetune=info, finetune_seconds=info["seconds"])
    with tracker.run(slug, {"method": label, "rank_rule": rule.describe(), "alpha": base["alpha"],
                            "best_lr": info["best_lr"]}, nested=True):
        tracker.log_metrics({k: v for k, v in point.items() if isinstance(v, (int, float)) and v is not None})
        if config.save_models:
            replaced = [row["name"] for row in base["layers"] if row["error"] is None]
            point["model_dir"] = str(save_compressed(out / "models" / slug, config.model, config.num_classes, tuned,
                                                     replaced, extra={"method": label, "rank_rule": rule.describe(),
                                                                      "best_lr": info["best_lr"]}))
    atomic_write_text(path, json.dumps(point, indent=2, default=str))
    return point


def _point_model(point: dict) -> nn.Module:
    """The compressed model saved with ``point`` (fine-tuning and precision start from it)."""
    model_dir = point.get("model_dir")
    if not model_dir or not Path(model_dir).exists():
        raise FileNotFoundError(f"point {point.get('slug')} has no saved model (model_dir={model_dir!r}): delete its "
                                "JSON in <output_dir>/points to recompute it with save_models=True")
    return load_compressed(model_dir)


def _add_precision(point: dict, config: CompressConfig, data_cache, out: Path) -> dict:
    """``point`` with ``precision`` = FP32/FP16/INT8 top-1 (pipeline.quantize), written back to its JSON file."""
    from pipeline.quantize import evaluate_precisions

    if point.get("precision", {}).get("calib_samples") == config.calib_samples:
        return point
    dataset = config.eval_dataset.build(cache_dir=data_cache)
    if config.eval_limit is not None and config.eval_limit < len(dataset):
        dataset = torch.utils.data.Subset(dataset, range(config.eval_limit))
    # INT8 ranges are calibrated on images of the Sigma dataset: the data the user already allows for compression.
    calib_set = config.sigma.dataset.build(cache_dir=data_cache)
    calib = sample_subset(calib_set, min(config.calib_samples, len(calib_set)), config.sigma.seed)
    scores = evaluate_precisions(_point_model(point), make_loader(dataset, config.batch_size),
                                 make_loader(calib, config.batch_size), device=config.device,
                                 progress=config.progress)
    point = {**point, "precision": {**scores, "calib_samples": config.calib_samples},
             **{f"top1_{k}": v for k, v in scores.items()}}
    atomic_write_text(out / "points" / f"{point['slug']}.json", json.dumps(point, indent=2, default=str))
    return point


def _write_report(baseline, points, plan, config: CompressConfig, out: Path, tracker: Tracker) -> dict:
    title = (f"{config.model}: Sigma from {config.sigma.n_samples} {config.sigma.dataset.name} images, "
             f"eval {config.eval_dataset.name}/{config.eval_dataset.split}")
    table = summary_table(baseline, points)
    layers = layer_table(points)
    dense = [f"- `{c['name']}`: {c['reason']}" for c in plan if not c["selected"]]
    md = (f"# {title}\n\n" + summary_table(baseline, points, markdown=True) + "\n\n## Per layer\n\n"
          + layer_table(points, markdown=True) + "\n\n## Layers left dense\n\n" + ("\n".join(dense) or "none")
          + "\n")
    comparison = method_comparison(points)
    if comparison:
        md += "\n## Tucker2-ALS-Sigma vs Tucker2-ALS at equal ranks\n\n" + "\n".join(f"- {c}" for c in comparison) + "\n"
    atomic_write_text(out / "results.md", md)
    atomic_write_text(out / "results.json", json.dumps({"baseline": baseline, "points": points}, indent=2,
                                                      default=str))
    plot = plot_accuracy_vs_compression(baseline, points, out / "accuracy_vs_compression.png", title)
    tracker.log_artifact(plot)
    tracker.log_artifact(out / "results.md")
    return {"table": table, "layer_table": layers, "comparison": comparison, "plot": str(plot),
            "markdown": str(out / "results.md")}

"""One comparison of every method: each brought to the same sizes, with and without one fine-tuning protocol.

For every (method, target) the method's own size control is solved first, without decomposing anything: the
uniform rank ``fraction`` (every layer keeps that share of its rank bound) is bisected on the exact size of the
factorized model, built from empty layers of the method's family (:data:`SIZE_MODELS`) and counted with the
same ``count_params`` / ``count_macs`` as the report. Then the point runs through :func:`pipeline.runner.run_compress`
unchanged, so it is cached, resumable (a killed comparison rerun with the same command skips every finished point)
and logged to MLflow like any compress point. Finally every model is BatchNorm-folded, optionally exported to ONNX,
and all are timed in one interleaved latency run (:mod:`pipeline.latency`), so the speed-ups are ratios measured
side by side. The leaderboard is a pandas table (Markdown + Parquet) with Pareto plots.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from pipeline._io import atomic_write_text
from pipeline.compress import load_compressed, model_stats
from pipeline.finetune import FinetuneConfig
from pipeline.latency import LatencyConfig, measure_many, onnx_runner, torch_runner
from pipeline.methods import METHODS, get_method
from pipeline.runner import CompressConfig, plan_points, prepare_model, run_compress
from pipeline.tracking import Tracker, default_tracking_uri
from sigma_core import CPConv, LowRank1x1Conv, LowRankLinear, RankRule, Tucker2Conv, count_macs, count_params
from sigma_core import replace_modules

__all__ = ["SIZE_MODELS", "CompareConfig", "Target", "fit_fraction", "parse_targets", "run_compare"]

_MIN_FRACTION = 1e-6  # every rank rounds up to 1: the smallest model a fraction reaches


@dataclass(frozen=True)
class Target:
    """A size to reach: ``kind`` ``"cr"`` (params(original) / params) or ``"mac"`` (MACs(original) / MACs)."""

    kind: str
    value: float

    def __post_init__(self) -> None:
        if self.kind not in ("cr", "mac"):
            raise ValueError(f"target kind must be 'cr' (compression rate) or 'mac' (MAC reduction), got {self.kind!r}")
        if not isinstance(self.value, (int, float)) or not self.value > 1.0:
            raise ValueError(f"a target must be a reduction factor > 1 (e.g. cr5 = 5x fewer parameters), got "
                             f"{self.kind}{self.value}")

    @property
    def label(self) -> str:
        return f"{self.kind}{self.value:g}"

    def achieved(self, baseline: dict, params: int, macs: int) -> float:
        return baseline["params"] / params if self.kind == "cr" else baseline["macs"] / macs


def parse_targets(text: str) -> tuple[Target, ...]:
    """``"cr3,cr5,mac2"`` -> targets; a clear error for anything else."""
    targets = []
    for item in (t.strip() for t in text.split(",")):
        m = re.fullmatch(r"(cr|mac)([0-9]*\.?[0-9]+)", item)
        if not m:
            raise ValueError(f"bad target {item!r}: write crX (X-fold fewer parameters) or macX (X-fold fewer "
                             "MACs), comma separated, e.g. cr3,cr5,mac2")
        targets.append(Target(m.group(1), float(m.group(2))))
    if not targets:
        raise ValueError("no target given")
    return tuple(targets)


def _tucker2(module: nn.Module, ranks: tuple[int, ...]) -> nn.Module:
    return Tucker2Conv.empty(module.in_channels, module.out_channels, module.kernel_size, ranks,
                             **Tucker2Conv._conv_kwargs(module))


def _cp(module: nn.Module, ranks: tuple[int, ...]) -> nn.Module:
    return CPConv.empty(module.in_channels, module.out_channels, module.kernel_size, ranks[0],
                        **CPConv._conv_kwargs(module))


def _svd(module: nn.Module, ranks: tuple[int, ...]) -> nn.Module:
    if isinstance(module, nn.Linear):
        return LowRankLinear.empty(module.in_features, module.out_features, ranks[0], bias=module.bias is not None)
    return LowRank1x1Conv.empty(module.in_channels, module.out_channels, ranks[0],
                                **LowRank1x1Conv._conv_kwargs(module))


#: family -> ``structure(original_module, ranks) -> empty factorized module`` of exactly the size the method
#: builds; a new family registers here to get a size control (tests check each against a real decomposition).
SIZE_MODELS: dict[str, Callable[[nn.Module, tuple[int, ...]], nn.Module]] = {"tucker2": _tucker2, "cp": _cp,
                                                                              "svd": _svd}


def _size(model: nn.Module, assignment: dict[str, str], fraction: float, input_shape) -> tuple[int, int]:
    rule = RankRule(fraction=fraction)
    new = {}
    for layer, name in assignment.items():
        method = get_method(name)
        module = model.get_submodule(layer)
        new[layer] = SIZE_MODELS[method.family](module, method.resolve_ranks(rule, module.weight))
    compressed = replace_modules(model, new)
    return count_params(compressed), count_macs(compressed, (1, *input_shape))


@dataclass(frozen=True)
class Fit:
    """The fraction chosen for one (method, target): achieved reduction and whether it is within tolerance."""

    fraction: float | None
    achieved: float | None
    within: bool
    note: str = ""


def fit_fraction(model: nn.Module, assignment: dict[str, str], target: Target, baseline: dict, input_shape,
                 tolerance: float = 0.03, steps: int = 30) -> Fit:
    """Bisect the uniform rank fraction so that the model's reduction meets ``target`` as closely as ranks allow.

    The reduction is non-increasing in the fraction (every rank is). Among the fractions visited, the one whose
    reduction is closest to the target (relative) wins, preferring one that reaches it. ``within`` is
    ``|achieved / target - 1| <= tolerance``; when the target lies outside what a fraction reaches, ``fraction``
    is None and ``note`` names the reachable range.
    """
    def reduction(f: float) -> float:
        params, macs = _size(model, assignment, f, input_shape)
        return target.achieved(baseline, params, macs)

    r_max, r_min = reduction(_MIN_FRACTION), reduction(1.0)
    if target.value > r_max * (1 + tolerance):
        return Fit(None, r_max, False, f"unreachable: the smallest model of this method reaches {target.kind} "
                                       f"{r_max:.2f} (rank 1 in every factorized layer)")
    if target.value < r_min * (1 - tolerance):
        return Fit(None, r_min, False, f"unreachable: at full rank this method's model already has {target.kind} "
                                       f"{r_min:.2f} > target")
    lo, hi = _MIN_FRACTION, 1.0  # reduction(lo) >= target >= reduction(hi)
    best = (abs(r_max / target.value - 1), lo, r_max)
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        r = reduction(mid)
        best = min(best, (abs(r / target.value - 1), mid, r))
        if r >= target.value:
            lo = mid
        else:
            hi = mid
    err, f, r = best
    within = err <= tolerance
    return Fit(f, r, within, "" if within else f"ranks are discrete: the closest reachable {target.kind} is {r:.2f}")


@dataclass(frozen=True)
class CompareConfig:
    """A comparison: one model and data setup (``compress``), methods, targets, fine-tuning, latency.

    ``compress`` is a template: its model, weights, Sigma source, eval set, solver, device, caches and tracking are
    used; its methods and rank rule are replaced per point. ``methods=None`` means every registered per-layer
    method whose family has a size model. ``finetune`` (if given) adds a fine-tuned twin of every point with the
    same protocol for all. ``latency=None`` skips timing; ``onnx`` also exports and times every model in
    onnxruntime.
    """

    compress: CompressConfig
    targets: tuple[Target, ...] = (Target("cr", 3.0), Target("cr", 5.0), Target("cr", 8.0))
    methods: tuple[str, ...] | None = None
    finetune: FinetuneConfig | None = None
    tolerance: float = 0.03
    latency: LatencyConfig | None = field(default_factory=LatencyConfig)
    onnx: bool = True

    def __post_init__(self) -> None:
        if not self.targets:
            raise ValueError("targets is empty: give at least one, e.g. cr3,cr5")
        for name in self.methods or ():
            if get_method(name).family not in SIZE_MODELS:
                raise ValueError(f"method {name!r} (family {get_method(name).family!r}) has no size control for a "
                                 f"comparison; families with one: {sorted(SIZE_MODELS)}")
        if self.methods is not None and not self.methods:
            raise ValueError("methods is empty")
        if not 0 < self.tolerance < 1:
            raise ValueError(f"tolerance must be in (0, 1), got {self.tolerance}")
        if self.finetune is not None and not self.compress.save_models:
            raise ValueError("fine-tuning reloads each point's saved model: keep save_models=True")
        if self.latency is not None and not self.compress.save_models:
            raise ValueError("latency is measured on the saved models: keep save_models=True")

    def method_names(self) -> tuple[str, ...]:
        return self.methods or tuple(n for n, m in METHODS.items() if m.family in SIZE_MODELS)


def _point_config(config: CompareConfig, method: str, fraction: float) -> CompressConfig:
    return dataclasses.replace(config.compress, methods=(method,), alphas=(), ranks=None, fraction=fraction,
                               cp_rank=None, svd_rank=None, linear_method=None, finetune=config.finetune,
                               finetune_methods=(method,), precision=False,
                               output_dir=str(Path(config.compress.output_dir) / "runs"))


def _model_dir(point: dict, out: Path) -> Path | None:
    value = point.get("model_dir")
    if not value:
        return None
    path = Path(value)
    # Older point records hold the path as written (absolute or relative to the working directory), newer ones
    # relative to the output directory of the runs.
    return path if path.is_absolute() or (path / "spec.json").exists() else out / "runs" / path


def run_compare(config: CompareConfig) -> dict:
    """Run (or resume) the comparison; returns ``{"rows", "leaderboard", "markdown", "parquet", "plot"}``."""
    import pandas as pd

    out = Path(config.compress.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, _ = prepare_model(config.compress)
    data_cache = Path(config.compress.cache_dir) / "datasets"
    input_shape = tuple(config.compress.eval_dataset.build(cache_dir=data_cache)[0][0].shape)
    baseline = {**model_stats(model, input_shape)}
    rows: list[dict] = []
    fits: list[tuple[str, Target, Fit]] = []
    for method in config.method_names():
        probe = dataclasses.replace(config.compress, methods=(method,), alphas=(), fraction=0.5, ranks=None,
                                    cp_rank=None, svd_rank=None, linear_method=None, finetune=None)
        try:
            assignment = plan_points(model, probe)[0][method]
        except ValueError as exc:
            fits.extend((method, t, Fit(None, None, False, str(exc))) for t in config.targets)
            continue
        fits.extend((method, t, fit_fraction(model, assignment, t, baseline, input_shape, config.tolerance))
                    for t in config.targets)
    for target in config.targets:
        mine = [(m, f) for m, t, f in fits if t == target]
        if all(f.fraction is None for _, f in mine):
            reach = "; ".join(f"{m}: {f.note}" for m, f in mine)
            raise ValueError(f"no method can reach target {target.label}: {reach}")
    for method, target, fit in fits:
        base_row = {"method": method, "target": target.label, "target_value": target.value,
                    "fraction": fit.fraction, "note": fit.note}
        if fit.fraction is None:
            rows.append({**base_row, "finetuned": False, "achieved": fit.achieved})
            continue
        result = run_compress(_point_config(config, method, fit.fraction))
        baseline.update({k: result["baseline"][k] for k in ("top1", "top5")})
        for point in result["points"]:
            achieved = target.achieved(result["baseline"], point["params"], point["macs"])
            rows.append({**base_row, "finetuned": point["method"].endswith("+ft"), "achieved": achieved,
                         "top1": point["top1"], "top1_drop": point["top1_drop"], "params": point["params"],
                         "macs": point["macs"], "compression_rate": point["compression_rate"],
                         "mac_reduction": point["mac_reduction"],
                         "compress_seconds": point["decompose_seconds"] + point.get("finetune_seconds", 0.0),
                         "slug": point["slug"], "_model_dir": _model_dir(point, out)})
    rows.insert(0, {"method": "original", "target": "-", "target_value": 1.0, "finetuned": False, "top1": baseline.get("top1"),
                    "top1_drop": 0.0 if "top1" in baseline else None, "params": baseline["params"],
                    "macs": baseline["macs"], "compression_rate": 1.0, "mac_reduction": 1.0, "slug": "original",
                    "_model_dir": None})
    if config.latency is not None:
        _add_latency(rows, model, input_shape, config, out)
    frame = pd.DataFrame([{k: v for k, v in r.items() if not k.startswith("_")} for r in rows])
    return _write_leaderboard(frame, baseline, config, out)


def _add_latency(rows: list[dict], model: nn.Module, input_shape, config: CompareConfig, out: Path) -> None:
    """Fold, export and time the original and every point's model in one interleaved run (cols in place)."""
    from pipeline.deploy import export_onnx, prepare_for_export

    models = {"original": model}
    for row in rows:
        if row.get("_model_dir") is not None and row["slug"] not in models:
            models[row["slug"]] = load_compressed(row["_model_dir"])
    runners, example = {}, torch.rand((2, *input_shape), generator=torch.Generator().manual_seed(0))
    for name, m in models.items():
        folded, _ = prepare_for_export(m, fold_bn=True)
        runners[(name, "torch")] = torch_runner(folded, config.latency.device)
        if config.onnx:
            path = out / "onnx" / f"{name}.onnx"
            if not path.exists():
                export_onnx(m, example, path)
            runners[(name, "onnx")] = onnx_runner(path, config.latency.threads)
    stats = measure_many(runners, input_shape, config.latency)
    batches = config.latency.batch_sizes

    def best(name: str, i: int) -> float:
        return min(stats[(name, e)][i].median_ms for e in ("torch", "onnx") if (name, e) in stats)

    for row in rows:
        slug = row.get("slug")
        if slug not in models:
            continue
        for i, b in enumerate(batches):
            row[f"torch_ms_b{b}"] = stats[(slug, "torch")][i].median_ms
            row[f"torch_iqr_ms_b{b}"] = stats[(slug, "torch")][i].iqr_ms
            if config.onnx:
                row[f"onnx_ms_b{b}"] = stats[(slug, "onnx")][i].median_ms
            row[f"speedup_b{b}"] = best("original", i) / best(slug, i)


def _pareto(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not dominated in (larger x, larger y), sorted by x."""
    front = [p for p in points if not any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in points)]
    return sorted(set(front))


def _plot(frame, baseline_top1: float | None, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes_spec = [("compression_rate", "compression rate (params)"), ("mac_reduction", "MAC reduction")]
    speed = [c for c in frame.columns if c.startswith("speedup_b")]
    if speed:
        axes_spec.append((speed[-1], f"measured speed-up (batch {speed[-1][9:]})"))
    fig, axes = plt.subplots(1, len(axes_spec), figsize=(5.2 * len(axes_spec), 4.2), squeeze=False)
    data = frame[frame["method"] != "original"].dropna(subset=["top1"]) if "top1" in frame else frame.iloc[0:0]
    for ax, (col, label) in zip(axes[0], axes_spec):
        for (method, tuned), group in data.groupby(["method", "finetuned"]):
            ax.plot(group[col], group["top1"], marker="o" if not tuned else "s", linestyle="none",
                    fillstyle="full" if not tuned else "none", label=f"{method}{' +ft' if tuned else ''}")
        front = _pareto(list(zip(data[col], data["top1"]))) if len(data) else []
        if front:
            ax.plot(*zip(*front), color="black", linewidth=1, alpha=0.6, label="Pareto front")
        if baseline_top1 is not None:
            ax.axhline(baseline_top1, color="gray", linestyle="--", linewidth=1, label="original")
        ax.set_xlabel(label)
        ax.set_ylabel("top-1 %")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


_COLUMNS = ["method", "finetuned", "target", "achieved", "top1", "top1_drop", "params", "macs", "compression_rate",
            "mac_reduction", "torch_ms_b1", "torch_ms_b64", "onnx_ms_b1", "onnx_ms_b64", "speedup_b1", "speedup_b64",
            "fraction", "compress_seconds", "note"]


def _write_leaderboard(frame, baseline: dict, config: CompareConfig, out: Path) -> dict:
    cols = [c for c in _COLUMNS if c in frame.columns] + [c for c in frame.columns if c not in _COLUMNS]
    frame = frame[cols]
    sort_cols = [c for c in ("target_value", "finetuned", "top1") if c in frame.columns]
    frame = frame.sort_values(sort_cols, ascending=[True, True, False][:len(sort_cols)], kind="stable")
    parquet = out / "leaderboard.parquet"
    tmp = parquet.with_suffix(".parquet.tmp")
    frame.to_parquet(tmp, index=False)
    tmp.replace(parquet)
    title = (f"{config.compress.model}: every method at {', '.join(t.label for t in config.targets)}"
             f"{' (with and without fine-tuning)' if config.finetune else ''}")
    markdown = f"# {title}\n\n" + frame.to_markdown(index=False, floatfmt=".4g") + "\n"
    atomic_write_text(out / "leaderboard.md", markdown)
    plot = _plot(frame, baseline.get("top1"), out / "leaderboard_pareto.png", title)
    tracker = Tracker(config.compress.tracking_uri or default_tracking_uri(out), config.compress.experiment,
                      enabled=config.compress.track)
    with tracker.run(f"compare-{config.compress.model}",
                     {"targets": ",".join(t.label for t in config.targets),
                      "methods": ",".join(config.method_names()), "finetune": config.finetune is not None}):
        for name in ("leaderboard.md", "leaderboard.parquet", "leaderboard_pareto.png"):
            tracker.log_artifact(out / name)
    return {"rows": frame.to_dict("records"), "leaderboard": frame, "markdown": str(out / "leaderboard.md"),
            "parquet": str(parquet), "plot": str(plot)}

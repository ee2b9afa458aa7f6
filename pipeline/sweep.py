"""Ray Tune sweep over the paper's experiment axes: alpha, Sigma source (with resolution matching), N, method, seed.

Two phases:

1. On the driver, once: the model, its baseline accuracy, and every Sigma the missing trials need, computed
   exactly once per (source, N, seed) through the Sigma cache (:attr:`SweepResult.sigma_computed` counts them);
   FW-LRA / AG-LRA points also get their Fisher / activation statistic, once per (source, N, seed), in the same
   cache (:func:`prepare_stats`). Every data-aware point (Sigma or statistic) is run per source, N and seed.
2. One Ray Tune trial per grid point (function trainable, ``tune.with_parameters`` + ``tune.with_resources``,
   ``tune.grid_search`` over the points): load the cached Sigma (never recompute; a missing entry is an error),
   compress, evaluate, log one MLflow run (``setup_mlflow``), write the trial record, ``tune.report``.

Resumability does not rely on Tune's own experiment state. Every grid point has a deterministic trial key (a hash
of its parameters and of everything else that determines its result); a finished trial is recorded atomically as
``<output>/trials/<key>.json``, the last thing the trial does before reporting. A restarted sweep filters the grid
to the keys without a record before building the Tuner, deletes the MLflow runs that unfinished attempts of those
keys left behind, and rebuilds ``<output>/trials.parquet`` (one row per record, so one per trial) from the records.
``<output>/events.jsonl`` is an append-only audit log of trial starts/ends (which invocation ran what).

On a multi-node cluster ``output_dir`` and ``cache_dir`` must be on a filesystem every node mounts at the same path
(e.g. EFS/NFS), and ``tracking_uri`` must be an MLflow server (``http://...``), not a SQLite file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import time
import uuid
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from pipeline._io import atomic_path, atomic_write_text
from pipeline.compress import (
    SigmaSource,
    accuracy,
    compress_model,
    compute_sigmas,
    model_stats,
    outcome_rows,
    save_compressed,
    select_layers,
)
from pipeline.data import DATASET_NAMES, RESAMPLE_MODES, DatasetSpec
from pipeline.methods import SolverOptions, get_method
from pipeline.models import build_model
from pipeline.fisher import compute_layer_stats
from pipeline.sigma_cache import SigmaCache, SigmaKey, model_fingerprint, stats_key
from pipeline.tracking import default_tracking_uri
from pipeline.train import TrainConfig
from sigma_core import RankRule

__all__ = [
    "TRIAL_SCHEMA_FIELDS",
    "SweepConfig",
    "SweepResult",
    "SweepSource",
    "TrialPoint",
    "TrialStore",
    "grid_points",
    "keyed_grid",
    "missing_points",
    "prepare_sigmas",
    "prepare_stats",
    "run_covariance",
    "run_sweep",
    "trial_key",
]

SAVE_MODEL_MODES = ("none", "best", "all")
BACKENDS = ("local", "ray")
KEY_FORMAT = 1


# --------------------------------------------------------------------------- #
# Configuration
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class SweepSource:
    """One Sigma source: a dataset view (its ``image_size``/``resample`` do the resolution matching) and a label.

    Parameters
    ----------
    dataset : DatasetSpec
        E.g. ``DatasetSpec("digits", resample="bicubic")`` or an image folder downsampled to 28 pixels.
    label : str, optional
        Name in tables, plots and MLflow; default derived from the dataset (``digits-bicubic``,
        ``imagefolder:train@64``...).
    """

    dataset: DatasetSpec
    label: str | None = None

    def __post_init__(self) -> None:
        if self.dataset.name not in DATASET_NAMES:
            raise ValueError(f"unknown Sigma dataset {self.dataset.name!r}; valid: {', '.join(DATASET_NAMES)}")
        if self.dataset.resample not in RESAMPLE_MODES:
            raise ValueError(f"resample must be one of {', '.join(RESAMPLE_MODES)}, got {self.dataset.resample!r}")
        if self.dataset.image_size is not None and self.dataset.image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {self.dataset.image_size}")

    @property
    def name(self) -> str:
        """The label, or one derived from the dataset view."""
        if self.label:
            return self.label
        spec = self.dataset
        text = spec.name if spec.root is None or spec.name != "imagefolder" else f"{spec.name}:{Path(spec.root).name}"
        if spec.resample != "bilinear":
            text += f"-{spec.resample}"
        if spec.image_size is not None:
            text += f"@{spec.image_size}"
        return text


@dataclass(frozen=True)
class SweepConfig:
    """Everything a sweep needs; built from YAML at the edge (``jobs/sweep.py``).

    Attributes
    ----------
    model, weights, num_classes, train
        The model to compress: user weights, or a cached/trained reference model (``train`` config).
    sigma_sources : tuple of SweepSource
        Sigma datasets (paper Sec. 5.3: Sigma from other datasets; App. G: resolution matching).
    n_samples : tuple of int
        Sample sizes N for Sigma (App. G).
    alphas : tuple of float
        VBMF ratios of paper Eq. 2, in [0, 1].
    methods : tuple of str
        Registered methods. Methods that do not use Sigma run once per (alpha, seed), not per source and N.
    seeds : tuple of int
        Seeds of the Sigma image subset and of the solver.
    eval_dataset, eval_limit
        Where top-1/top-5 are measured (first ``eval_limit`` images).
    layers : tuple of str, optional
        Layers to compress (default: ``plan_layers``' choice).
    solver : SolverOptions
        ALS settings (its ``seed`` is replaced by each trial's seed).
    output_dir, cache_dir
        Sweep outputs (records, Parquet, models, reports, default MLflow store) and caches (models, Sigma, data).
    sigma_cache : str, optional
        Where Sigmas are cached: a directory or a ``pyarrow.fs`` URI such as ``s3://bucket/sigma`` (default
        ``<cache_dir>/sigma``). Trials read it, so on a cluster it must be reachable from every node.
    storage_path : str, optional
        Ray Tune storage (default ``<output_dir>/ray_results``).
    tracking_uri : str, optional
        MLflow URI; default ``$MLFLOW_TRACKING_URI`` or ``sqlite:///<output_dir>/mlflow.db``.
    save_models : {"none", "best", "all"}
        Compressed models: written to ``<output_dir>/models/<key>`` unless "none"; logged to MLflow for every
        trial ("all") or for the Pareto-best trials of each method ("best", at most ``best_models`` each).
    cpus_per_trial, gpus_per_trial, max_concurrent_trials, max_failures
        Trial resources and Tune's failure handling.
    sigma_backend, compress_backend : {"local", "ray"}
        The seam to the Ray implementations (``pipeline.ray_sigma`` / ``pipeline.ray_tasks``): "local" uses the
        single-process ``compute_sigmas`` / ``compress_model``.
    ray_address : str, optional
        Ray cluster to join; default ``$RAY_ADDRESS`` (set by ``ray job submit``) or a new local instance.
    """

    model: str = "resnet-fmnist"
    weights: str | None = None
    num_classes: int = 10
    train: TrainConfig | None = None
    sigma_sources: tuple[SweepSource, ...] = field(default_factory=lambda: (SweepSource(DatasetSpec("fashion-mnist")),))
    n_samples: tuple[int, ...] = (2000,)
    alphas: tuple[float, ...] = (0.6, 0.8, 1.0)
    methods: tuple[str, ...] = ("tucker2-als", "tucker2-als-sigma")
    seeds: tuple[int, ...] = (0,)
    eval_dataset: DatasetSpec = field(default_factory=lambda: DatasetSpec("fashion-mnist", split="test"))
    eval_limit: int | None = None
    layers: tuple[str, ...] | None = None
    solver: SolverOptions = field(default_factory=SolverOptions)
    centered: bool = False
    sigma_batch_size: int = 250
    batch_size: int = 500
    output_dir: str = "outputs/sweep"
    cache_dir: str = "cache"
    sigma_cache: str | None = None
    storage_path: str | None = None
    tracking_uri: str | None = None
    experiment: str = "sigma-sweep"
    track: bool = True
    save_models: str = "best"
    best_models: int = 3
    report: bool = True
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_concurrent_trials: int | None = None
    max_failures: int = 1
    sigma_backend: str = "local"
    compress_backend: str = "local"
    num_actors: int = 2
    ray_address: str | None = None
    retrain_corrupt: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        _require(bool(self.methods), "methods is empty: choose at least one registered method")
        for name in self.methods:
            get_method(name)  # a clear error listing the registered names
        _require(bool(self.alphas), "alphas is empty: give at least one VBMF ratio")
        for alpha in self.alphas:
            _require(0.0 <= alpha <= 1.0, f"alphas must be in [0, 1] (paper Eq. 2), got {alpha}")
        _require(bool(self.seeds), "seeds is empty: give at least one seed")
        if self.needs_data:
            _require(bool(self.sigma_sources), "a data-aware method (Sigma, FW-LRA, AG-LRA) is selected but "
                     "sigma_sources is empty")
            _require(bool(self.n_samples) and all(n >= 1 for n in self.n_samples),
                     f"n_samples must be a non-empty list of integers >= 1, got {list(self.n_samples)}")
        labels = [s.name for s in self.sigma_sources]
        _require(len(set(labels)) == len(labels), f"Sigma source labels must be unique, got {labels}")
        _require(self.save_models in SAVE_MODEL_MODES,
                 f"save_models must be one of {', '.join(SAVE_MODEL_MODES)}, got {self.save_models!r}")
        for attr in ("sigma_backend", "compress_backend"):
            _require(getattr(self, attr) in BACKENDS,
                     f"{attr} must be one of {', '.join(BACKENDS)}, got {getattr(self, attr)!r}")
        _require(self.cpus_per_trial > 0 and self.gpus_per_trial >= 0,
                 "cpus_per_trial must be > 0 and gpus_per_trial >= 0")
        _require(self.eval_limit is None or self.eval_limit >= 1, "eval_limit must be >= 1")
        _require(self.max_failures >= 0 and self.best_models >= 0, "max_failures and best_models must be >= 0")

    @property
    def needs_data(self) -> bool:
        """Whether a method reads a statistic of the images (Sigma, Fisher diagonal or mean activation)."""
        return any(get_method(m).needs is not None for m in self.methods)

    @property
    def device(self) -> str:
        """Device of trials: CUDA when each trial gets a GPU."""
        return "cuda" if self.gpus_per_trial > 0 else "cpu"

    @property
    def sigma_location(self) -> str:
        return self.sigma_cache or str(Path(self.cache_dir) / "sigma")

    def source(self, label: str) -> SweepSource:
        for src in self.sigma_sources:
            if src.name == label:
                return src
        raise KeyError(f"no Sigma source labelled {label!r}")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


# --------------------------------------------------------------------------- #
# Grid and trial keys
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class TrialPoint:
    """One grid point. ``source``/``n_samples`` are None for methods that do not use Sigma."""

    method: str
    alpha: float
    seed: int
    source: str | None = None
    n_samples: int | None = None

    def params(self) -> dict:
        return asdict(self)

    @property
    def sigma_id(self) -> tuple[str, int, int] | None:
        """(source, N, seed) of the images whose statistics this point reads (Sigma, and the Fisher / activation
        statistic of FW-LRA / AG-LRA), None if it needs none."""
        return None if self.source is None else (self.source, int(self.n_samples), int(self.seed))


def grid_points(config: SweepConfig) -> list[TrialPoint]:
    """Every point of the sweep grid, in a stable order (method, source, N, seed, alpha)."""
    points = []
    for method in config.methods:
        if get_method(method).needs is not None:
            for src in config.sigma_sources:
                for n in config.n_samples:
                    points += [TrialPoint(method, float(a), int(s), src.name, int(n))
                               for s in config.seeds for a in config.alphas]
        else:
            # The result does not depend on Sigma: running it per source and N would repeat identical work.
            points += [TrialPoint(method, float(a), int(s)) for s in config.seeds for a in config.alphas]
    return points


def sweep_identity(config: SweepConfig, fingerprint: str, layers: Sequence[str]) -> dict:
    """Everything besides the point that determines a trial's result (not paths, tracking or resources)."""
    # cp_init at its default is left out: it was added later and existing trial keys must stay valid.
    solver = {k: v for k, v in asdict(config.solver).items()
              if k != "seed" and not (k == "cp_init" and v == "svd")}
    return {"model": config.model, "weights": fingerprint, "layers": sorted(layers),
            "eval": config.eval_dataset.identity(), "eval_limit": config.eval_limit, "solver": solver,
            "centered": config.centered, "format": KEY_FORMAT}


def trial_key(point: TrialPoint, identity: Mapping, sources: Mapping[str, Mapping] | None = None) -> str:
    """Deterministic 16-hex key of a trial: hash of its parameters, its Sigma source's identity and ``identity``.

    The source enters by its dataset identity (not only its label), so relabelling a source keeps its keys and
    changing its resolution or root changes them.
    """
    source = None if point.source is None else (sources or {}).get(point.source, point.source)
    blob = json.dumps({"point": {**point.params(), "source": source}, "identity": dict(identity)},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def keyed_grid(config: SweepConfig, identity: Mapping) -> dict[str, TrialPoint]:
    """Grid points by trial key (insertion order = grid order)."""
    sources = {s.name: s.dataset.identity() for s in config.sigma_sources}
    keyed = {trial_key(p, identity, sources): p for p in grid_points(config)}
    if len(keyed) != len(grid_points(config)):
        raise ValueError("duplicate grid points: alphas, seeds, n_samples and methods must not repeat values")
    return keyed


def missing_points(keyed: Mapping[str, TrialPoint], done: Iterable[str]) -> dict[str, TrialPoint]:
    """The grid points whose key has no finished record."""
    done = set(done)
    return {key: point for key, point in keyed.items() if key not in done}


# --------------------------------------------------------------------------- #
# Trial records, audit log, Parquet table
# --------------------------------------------------------------------------- #
TRIAL_SCHEMA_FIELDS: tuple[tuple[str, str], ...] = (
    ("key", "string"), ("method", "string"), ("alpha", "float64"), ("seed", "int64"),
    ("sigma_source", "string"), ("sigma_dataset", "string"), ("sigma_image_size", "int64"),
    ("sigma_resample", "string"), ("n_samples", "int64"),
    ("top1", "float64"), ("top5", "float64"), ("top1_drop", "float64"),
    ("params", "int64"), ("macs", "int64"), ("compression_rate", "float64"), ("mac_reduction", "float64"),
    ("mean_rel_sigma_err", "float64"), ("mean_rel_frob_err", "float64"), ("failed_layers", "int64"),
    ("decompose_seconds", "float64"), ("eval_seconds", "float64"), ("trial_seconds", "float64"),
    ("baseline_top1", "float64"), ("baseline_top5", "float64"), ("baseline_params", "int64"),
    ("baseline_macs", "int64"), ("model", "string"), ("model_fingerprint", "string"),
    ("eval_dataset", "string"), ("eval_limit", "int64"), ("ranks_json", "string"), ("layers_json", "string"),
    ("model_dir", "string"), ("mlflow_run_id", "string"), ("invocation", "string"), ("finished_at", "float64"),
)


class TrialStore:
    """Finished-trial records (``trials/<key>.json``), the audit log and the Parquet table of one output dir.

    Parameters
    ----------
    output_dir : str or Path
    """

    def __init__(self, output_dir: str | Path):
        self.root = Path(output_dir)
        self.trials_dir = self.root / "trials"
        self.events_path = self.root / "events.jsonl"
        self.parquet_path = self.root / "trials.parquet"

    def record_path(self, key: str) -> Path:
        return self.trials_dir / f"{key}.json"

    def done_keys(self) -> set[str]:
        """Keys with a readable record; an unreadable one (impossible with atomic writes) counts as missing."""
        return {row["key"] for row in self.records()}

    def records(self) -> list[dict]:
        """Every readable record, sorted by key."""
        rows = []
        for path in sorted(self.trials_dir.glob("*.json")):
            try:
                row = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                warnings.warn(f"ignoring unreadable trial record {path} ({exc}); the trial will run again",
                              stacklevel=2)
                continue
            if row.get("key") == path.stem:
                rows.append(row)
        return rows

    def write_record(self, row: Mapping) -> Path:
        """Atomically write one record: from this moment the trial counts as finished."""
        path = self.record_path(row["key"])
        atomic_write_text(path, json.dumps(dict(row), indent=2, default=str))
        return path

    def log_event(self, event: str, key: str, invocation: str, **extra) -> None:
        """Append one line to the audit log (one ``write`` of < 4 KiB with O_APPEND: lines never interleave)."""
        line = json.dumps({"event": event, "key": key, "invocation": invocation, "pid": os.getpid(),
                           "time": time.time(), **extra}, default=str) + "\n"
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.events_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)

    def events(self) -> list[dict]:
        if not self.events_path.exists():
            return []
        return [json.loads(line) for line in self.events_path.read_text().splitlines() if line.strip()]

    def write_parquet(self) -> Path:
        """Rebuild ``trials.parquet`` from the records (one row per key), atomically."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pa.schema([(name, getattr(pa, kind)()) for name, kind in TRIAL_SCHEMA_FIELDS])
        rows = [{name: _coerce(_column(row, name), kind) for name, kind in TRIAL_SCHEMA_FIELDS}
                for row in self.records()]
        table = pa.Table.from_pylist(rows, schema=schema)
        with atomic_path(self.parquet_path) as tmp:
            pq.write_table(table, tmp)
        return self.parquet_path


def _column(row: Mapping, name: str):
    if name == "layers_json" and row.get(name) is None:
        return json.dumps(row.get("layers") or [], default=str)  # per-layer outcomes as one JSON string
    return row.get(name)


def _coerce(value, kind: str):
    if value is None:
        return None
    if kind == "string":
        return value if isinstance(value, str) else json.dumps(value, default=str)
    if kind == "int64":
        return int(value)
    value = float(value)
    return value if math.isfinite(value) else None


# --------------------------------------------------------------------------- #
# Phase 1: model, baseline, Sigmas
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class TrialContext:
    """What every trial needs, shipped once through the object store by ``tune.with_parameters``."""

    model: str
    num_classes: int
    state: dict
    fingerprint: str
    layers: tuple[str, ...]
    input_shape: tuple[int, ...]
    baseline: dict
    identity: dict
    sources: dict
    sigma_keys: dict
    sigma_location: str
    data_cache_dir: str
    eval_dataset: DatasetSpec
    eval_limit: int | None
    batch_size: int
    solver: SolverOptions
    device: str
    threads: int
    output_dir: str
    save_models: str
    compress_backend: str
    tracking_uri: str | None
    experiment_id: str | None
    invocation: str
    stat_keys: dict = field(default_factory=dict)  # "kind|source|N|seed" -> stats cache key (FW-LRA, AG-LRA)


def _sigma_key_id(source: str, n: int, seed: int) -> str:
    return f"{source}|{n}|{seed}"


def prepare_sigmas(
    config: SweepConfig,
    model: torch.nn.Module,
    layers: Sequence[str],
    needed: Iterable[tuple[str, int, int]],
) -> tuple[dict[str, str], dict]:
    """Make sure every needed Sigma is in the cache; compute each missing one exactly once.

    Returns
    -------
    keys : dict
        ``"source|N|seed"`` -> Sigma cache key.
    info : dict
        ``computed`` and ``cached`` counts and the per-Sigma info of ``compute_sigmas``.
    """
    cache = SigmaCache(config.sigma_location)
    keys, details, computed = {}, {}, 0
    needed = sorted(set(needed))
    for source, n, seed in tqdm(needed, desc="Sigma sources", unit="Sigma", disable=not config.progress):
        spec = SigmaSource(config.source(source).dataset, n_samples=n, seed=seed, centered=config.centered,
                           batch_size=config.sigma_batch_size)
        sigmas, info = _compute_sigmas(config, model, layers, spec, cache)
        del sigmas  # trials read the cache; the driver keeps nothing large
        computed += not info.get("cached", False)
        keys[_sigma_key_id(source, n, seed)] = info["key"]
        details[_sigma_key_id(source, n, seed)] = {k: v for k, v in info.items() if k != "patches"}
    return keys, {"computed": computed, "cached": len(needed) - computed, "sigmas": details}


def prepare_stats(config: SweepConfig, model: torch.nn.Module, layers: Sequence[str],
                  needed: Iterable[tuple[str, str, int, int]]) -> tuple[dict[str, str], dict]:
    """Per-layer Fisher / activation statistics (``pipeline.fisher``) of every (kind, source, N, seed) the grid
    needs, in the cache next to the Sigmas; each computed once, on the Sigma's images.

    Returns
    -------
    keys : dict
        ``"kind|source|N|seed"`` -> cache key (:func:`pipeline.sigma_cache.stats_key`).
    info : dict
        ``computed`` and ``cached`` counts.
    """
    cache = SigmaCache(config.sigma_location)
    keys, computed = {}, 0
    fingerprint = model_fingerprint(model)
    for kind, source, n, seed in sorted(set(needed)):
        spec = SigmaSource(config.source(source).dataset, n_samples=n, seed=seed, batch_size=config.sigma_batch_size)
        key = stats_key(SigmaKey(fingerprint, spec.dataset.identity(), n, seed, False), kind, layers)
        if cache.load(key, layers) is None:
            stats, info = compute_layer_stats(model, {kind: list(layers)}, spec, device=config.device,
                                              data_cache_dir=Path(config.cache_dir) / "datasets")
            cache.save_stats(key, stats[kind], {"stat": kind, "source": spec.identity(), **info})
            computed += 1
        keys[_stat_key_id(kind, (source, n, seed))] = key
    return keys, {"computed": computed, "cached": len(keys) - computed}


def _stat_key_id(kind: str, sigma_id: tuple[str, int, int]) -> str:
    return f"{kind}|{_sigma_key_id(*sigma_id)}"


def _stats_needed(points: Iterable[TrialPoint]) -> set[tuple[str, str, int, int]]:
    """(kind, source, N, seed) of every Fisher / activation statistic the points read."""
    return {(get_method(p.method).needs, *p.sigma_id) for p in points
            if p.sigma_id and get_method(p.method).needs not in (None, "sigma")}


def _compute_sigmas(config: SweepConfig, model, layers, source: SigmaSource, cache: SigmaCache):
    data_cache = Path(config.cache_dir) / "datasets"
    if config.sigma_backend == "local":
        return compute_sigmas(model, layers, source, device="cpu", cache=cache, data_cache_dir=data_cache,
                              progress=config.progress)
    from pipeline import ray_sigma  # the Ray Data implementation (pipeline/ray_sigma.py)

    _ensure_ray(config)
    sigmas, info = ray_sigma.ray_compute_sigmas(
        model, list(layers), source, num_actors=config.num_actors, use_gpu=config.gpus_per_trial > 0,
        batch_size=config.sigma_batch_size, cache=cache, progress=config.progress, data_cache_dir=data_cache)
    return sigmas, info  # the whole-set key info["key"] that the trials read resolves (SigmaCache.fetch)


def _baseline(config: SweepConfig, model, fingerprint: str, input_shape, out: Path) -> dict:
    """Accuracy/params/MACs of the original model, computed once and kept in ``<output>/baseline.json``."""
    path = out / "baseline.json"
    key = {"eval": config.eval_dataset.identity(), "limit": config.eval_limit, "fingerprint": fingerprint}
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            return {**saved, "cached": True}
    acc = accuracy(model, config.eval_dataset, limit=config.eval_limit, batch_size=config.batch_size,
                   device="cpu", data_cache_dir=Path(config.cache_dir) / "datasets", progress=config.progress)
    baseline = {**acc, **model_stats(model, input_shape), "key": key}
    atomic_write_text(path, json.dumps(baseline, indent=2))
    return {**baseline, "cached": False}


# --------------------------------------------------------------------------- #
# Phase 2: the trial
# --------------------------------------------------------------------------- #
def sweep_trial(config: dict, ctx: TrialContext) -> None:
    """Tune function trainable: one grid point, from cached Sigma to record + MLflow run + ``tune.report``."""
    from ray import tune
    from threadpoolctl import threadpool_limits

    trial = config["trial"]
    key, point = trial["key"], TrialPoint(**trial["point"])
    store = TrialStore(ctx.output_dir)
    torch.set_num_threads(ctx.threads)
    store.log_event("start", key, ctx.invocation)
    # BLAS pools sized to the trial's CPUs: spin-waiting extra threads made tensorly 30-100x slower under load.
    with threadpool_limits(limits=ctx.threads):
        row, compressed, ok_layers = _run_point(point, key, ctx)
    with _mlflow_trial_run(ctx, key, point) as mlflow:
        row["mlflow_run_id"] = _log_trial(mlflow, ctx, row, compressed, ok_layers, store)
    store.write_record(row)
    store.log_event("done", key, ctx.invocation)
    tune.report(_report_metrics(row))


def _run_point(point: TrialPoint, key: str, ctx: TrialContext):
    tic = time.perf_counter()
    model = build_model(ctx.model, num_classes=ctx.num_classes, weights=ctx.state).eval()
    sigmas = _load_sigmas(point, ctx) if point.sigma_id else {}
    stats = _load_stats(point, ctx)
    options = dataclasses.replace(ctx.solver, seed=point.seed)
    start = time.perf_counter()
    compressed, outcomes = _compress(model, ctx, sigmas, RankRule(alpha=point.alpha), point.method, options, stats)
    decompose_seconds = time.perf_counter() - start
    if not any(o.ok for o in outcomes):  # a failure, never a result (issue 8.5): Tune counts the trial failed
        first = next(o for o in outcomes if not o.ok)
        raise RuntimeError(f"trial {key} ({point.method}, alpha {point.alpha:g}): no layer was compressed "
                           f"({first.name}: {(first.error or '').splitlines()[0]})")
    start = time.perf_counter()
    acc = accuracy(compressed, ctx.eval_dataset, limit=ctx.eval_limit, batch_size=ctx.batch_size,
                   device=ctx.device, data_cache_dir=ctx.data_cache_dir, progress=False)
    eval_seconds = time.perf_counter() - start
    stats = model_stats(compressed.cpu(), ctx.input_shape)
    layers = outcome_rows(outcomes)
    row = _trial_row(point, key, ctx, acc, stats, layers)
    row.update(decompose_seconds=decompose_seconds, eval_seconds=eval_seconds,
               trial_seconds=time.perf_counter() - tic)
    return row, compressed, [o.name for o in outcomes if o.ok]


def _load_sigmas(point: TrialPoint, ctx: TrialContext) -> dict:
    """The Sigmas phase 1 cached for this point; a trial never recomputes them."""
    cache_key = ctx.sigma_keys.get(_sigma_key_id(*point.sigma_id))
    sigmas = None if cache_key is None else SigmaCache(ctx.sigma_location).load(cache_key, ctx.layers)
    if sigmas is None:
        raise RuntimeError(
            f"Sigma for source={point.source} N={point.n_samples} seed={point.seed} is not in the cache "
            f"{ctx.sigma_location} (key {cache_key}); phase 1 computes it before any trial starts and trials never "
            "recompute it: is cache_dir on storage that every node shares?")
    return sigmas


def _load_stats(point: TrialPoint, ctx: TrialContext) -> dict:
    """The Fisher / activation statistic phase 1 cached for an FW-LRA / AG-LRA point ({} for other methods)."""
    kind = get_method(point.method).needs
    if kind in (None, "sigma"):
        return {}
    cache_key = ctx.stat_keys.get(_stat_key_id(kind, point.sigma_id))
    stats = None if cache_key is None else SigmaCache(ctx.sigma_location).load(cache_key, ctx.layers)
    if stats is None:
        raise RuntimeError(f"the {kind} statistic for source={point.source} N={point.n_samples} seed={point.seed} "
                           f"is not in the cache {ctx.sigma_location} (key {cache_key}); phase 1 computes it before "
                           "any trial starts: is cache_dir on storage that every node shares?")
    return stats


def _compress(model, ctx: TrialContext, sigmas, rule: RankRule, method: str, options: SolverOptions, stats=None):
    if ctx.compress_backend == "ray":
        from pipeline import ray_tasks  # per-layer Ray tasks (pipeline/ray_tasks.py)

        return ray_tasks.ray_compress_model(model, list(ctx.layers), sigmas, rule, method, options=options,
                                            use_gpu=ctx.device.startswith("cuda"), progress=False, stats=stats,
                                            strict=False)
    # A trial records its failed layers (failed_layers column) instead of losing the whole trial.
    return compress_model(model, ctx.layers, sigmas, rule, method, options=options, device=ctx.device,
                          progress=False, stats=stats, strict=False)


def _trial_row(point: TrialPoint, key: str, ctx: TrialContext, acc: dict, stats: dict, layers: list) -> dict:
    base = ctx.baseline
    ok = [row for row in layers if row["error"] is None]

    def mean(field_name):
        vals = [row[field_name] for row in ok if row[field_name] is not None]
        return sum(vals) / len(vals) if vals else None

    source = ctx.sources.get(point.source) or {}
    return {
        "key": key, "method": point.method, "alpha": point.alpha, "seed": point.seed,
        "sigma_source": point.source, "sigma_dataset": source.get("name"),
        "sigma_image_size": source.get("image_size"), "sigma_resample": source.get("resample"),
        "n_samples": point.n_samples, "top1": acc["top1"], "top5": acc["top5"],
        "top1_drop": base["top1"] - acc["top1"], "params": stats["params"], "macs": stats["macs"],
        "compression_rate": base["params"] / stats["params"], "mac_reduction": base["macs"] / stats["macs"],
        "mean_rel_sigma_err": mean("rel_sigma_err"), "mean_rel_frob_err": mean("rel_frob_err"),
        "failed_layers": len(layers) - len(ok), "baseline_top1": base["top1"], "baseline_top5": base["top5"],
        "baseline_params": base["params"], "baseline_macs": base["macs"], "model": ctx.model,
        "model_fingerprint": ctx.fingerprint, "eval_dataset": json.dumps(ctx.eval_dataset.identity()),
        "eval_limit": ctx.eval_limit, "ranks_json": json.dumps({r["name"]: r["ranks"] for r in layers}),
        "layers": layers, "invocation": ctx.invocation,
        "finished_at": time.time(), "model_dir": None, "mlflow_run_id": None,
    }


def _report_metrics(row: Mapping) -> dict:
    """Flat numeric metrics for ``tune.report``: the summary plus ``layer.<name>.<error>`` per layer."""
    names = ("top1", "top5", "top1_drop", "compression_rate", "mac_reduction", "params", "macs",
             "mean_rel_sigma_err", "mean_rel_frob_err", "failed_layers", "decompose_seconds", "eval_seconds")
    metrics = {name: row[name] for name in names if row.get(name) is not None}
    for layer in row["layers"]:
        for err in ("rel_sigma_err", "rel_frob_err"):
            if layer.get(err) is not None:
                metrics[f"layer.{layer['name']}.{err}"] = layer[err]
    return {**metrics, "key": row["key"]}


# --------------------------------------------------------------------------- #
# MLflow (one run per trial, through Ray's integration)
# --------------------------------------------------------------------------- #
@contextlib.contextmanager
def _mlflow_trial_run(ctx: TrialContext, key: str, point: TrialPoint) -> Iterator[object | None]:
    """The trial's MLflow run via ``ray.air.integrations.mlflow.setup_mlflow``; None when tracking is off."""
    if ctx.tracking_uri is None:
        yield None
        return
    from ray.air.integrations.mlflow import setup_mlflow

    source = ctx.sources.get(point.source) or {}
    # Named like the Parquet columns; "none"/0 rather than None for the Sigma-free methods (searchable in MLflow).
    params = {"method": point.method, "alpha": point.alpha, "seed": point.seed,
              "sigma_source": point.source or "none", "n_samples": point.n_samples or 0,
              "sigma_dataset": source.get("name", "none"), "sigma_image_size": source.get("image_size"),
              "sigma_resample": source.get("resample"), "trial_key": key, "model": ctx.model,
              "eval_dataset": ctx.eval_dataset.name, "eval_limit": ctx.eval_limit,
              "solver_max_iter": ctx.solver.max_iter}
    name = f"{point.method}-{point.source or 'nosigma'}-N{point.n_samples or 0}-a{point.alpha:g}-s{point.seed}"
    _delete_runs_of(ctx.tracking_uri, ctx.experiment_id, key)  # a failed attempt of this trial, retried by Tune
    mlflow = setup_mlflow(params, tracking_uri=ctx.tracking_uri, experiment_id=ctx.experiment_id, run_name=name,
                          tags={"kind": "trial", "trial_key": key, "invocation": ctx.invocation})
    try:
        yield mlflow
    except BaseException:
        mlflow.end_run(status="FAILED")
        raise
    mlflow.end_run()


def _log_trial(mlflow, ctx: TrialContext, row: dict, compressed, ok_layers: list, store: TrialStore) -> str | None:
    if ctx.save_models != "none":
        row["model_dir"] = str(save_compressed(
            Path(ctx.output_dir) / "models" / row["key"], ctx.model, ctx.num_classes, compressed, ok_layers,
            extra={"method": row["method"], "alpha": row["alpha"], "trial_key": row["key"]}))
    if mlflow is None:
        return None
    mlflow.log_metrics({k: float(v) for k, v in _report_metrics(row).items() if k != "key"})
    mlflow.log_dict(row["layers"], "layers.json")
    plot = _trial_plot(ctx, row, store)
    mlflow.log_artifact(str(plot))
    if ctx.save_models == "all":
        mlflow.log_artifacts(row["model_dir"], artifact_path="model")
    return mlflow.active_run().info.run_id


def _trial_plot(ctx: TrialContext, row: dict, store: TrialStore) -> Path:
    """Accuracy vs compression of this trial among the finished ones of its Sigma (and the Sigma-free ones)."""
    from pipeline.report import plot_accuracy_vs_compression

    same = [r for r in store.records()
            if r["key"] != row["key"] and r.get("sigma_source") in (None, row["sigma_source"])
            and r.get("n_samples") in (None, row["n_samples"]) and r.get("seed") == row["seed"]]
    path = Path(ctx.output_dir) / "plots" / row["key"] / "accuracy_vs_compression.png"
    title = (f"{ctx.model}: Sigma {row['sigma_source'] or '-'}, N={row['n_samples'] or '-'}, "
             f"seed {row['seed']} (trial {row['key']})")
    return plot_accuracy_vs_compression(ctx.baseline, [*same, row], path, title)


def _mlflow_setup(config: SweepConfig, out: Path) -> tuple[str | None, str | None]:
    """Tracking URI and experiment id, creating the experiment on the driver before any trial writes to it."""
    if not config.track:
        return None, None
    import mlflow

    uri = _absolute_sqlite(config.tracking_uri or default_tracking_uri(out))
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name(config.experiment)
    if experiment is not None:
        return uri, experiment.experiment_id
    # A local store's default artifact root is ./mlruns of whatever cwd the trial has: pin it to the output dir.
    location = (out / "mlartifacts").resolve().as_uri() if not uri.startswith(("http:", "https:", "databricks")) \
        else None
    return uri, client.create_experiment(config.experiment, artifact_location=location)


def _absolute_sqlite(uri: str) -> str:
    """``sqlite:///rel.db`` resolved against the driver's cwd: trials run in other directories."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        return prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


def _trial_runs(uri: str, experiment_id: str) -> list:
    """Every live run of the experiment tagged as a trial."""
    from mlflow import MlflowClient

    client, runs, token = MlflowClient(uri), [], None
    while True:
        page = client.search_runs([experiment_id], filter_string="tags.kind = 'trial'", max_results=1000,
                                  page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def _purge_stale_runs(uri: str | None, experiment_id: str | None, keys: Iterable[str]) -> int:
    """Delete runs that unfinished attempts of ``keys`` left behind (killed or failed): one run per trial."""
    if uri is None:
        return 0
    from mlflow import MlflowClient

    keys, client, deleted = set(keys), MlflowClient(uri), 0
    for run in _trial_runs(uri, experiment_id):
        if run.data.tags.get("trial_key") in keys:
            client.delete_run(run.info.run_id)
            deleted += 1
    return deleted


def _delete_runs_of(uri: str, experiment_id: str, key: str) -> None:
    """Delete the runs of ``key``: it has no record, so they are leftovers of attempts that did not finish."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    for run in client.search_runs([experiment_id], filter_string=f"tags.trial_key = '{key}'"):
        client.delete_run(run.info.run_id)


def _pareto_best(records: Sequence[Mapping], per_method: int) -> list[Mapping]:
    """Per method, the trials no other trial beats on both top-1 and compression rate (highest top-1 first)."""
    best = []
    for method in sorted({r["method"] for r in records}):
        rows = [r for r in records if r["method"] == method]
        front = [r for r in rows if not any(
            o["top1"] >= r["top1"] and o["compression_rate"] >= r["compression_rate"]
            and (o["top1"] > r["top1"] or o["compression_rate"] > r["compression_rate"]) for o in rows)]
        best += sorted(front, key=lambda r: (-r["top1"], -r["compression_rate"]))[:per_method]
    return best


def _log_best_models(config: SweepConfig, uri: str | None, records: Sequence[Mapping]) -> list[str]:
    """Log the compressed models of the Pareto-best trials into their runs (once: a tag marks it done)."""
    if uri is None or config.save_models != "best":
        return []
    from mlflow import MlflowClient

    client, logged = MlflowClient(uri), []
    for row in _pareto_best(records, config.best_models):
        run_id, model_dir = row.get("mlflow_run_id"), row.get("model_dir")
        if not run_id or not model_dir or not Path(model_dir).is_dir():
            continue
        if client.get_run(run_id).data.tags.get("best_model_logged") != "true":
            client.log_artifacts(run_id, model_dir, artifact_path="model")
            client.set_tag(run_id, "best_model_logged", "true")
        logged.append(row["key"])
    return logged


# --------------------------------------------------------------------------- #
# Driver
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class SweepResult:
    """What a sweep invocation did.

    Attributes
    ----------
    trials_total : int
        Grid size.
    trials_skipped : int
        Points already recorded before this invocation (not run again).
    trials_run : int
        Points launched by this invocation.
    trials_failed : tuple of str
        Keys launched but without a record afterwards (they run again next time).
    sigma_computed, sigma_cached : int
        Sigmas computed by phase 1 / found in the cache (each (source, N, seed) at most once).
    baseline_cached : bool
    stale_runs_deleted : int
        MLflow runs of unfinished earlier attempts removed before launching.
    """

    output_dir: str
    parquet_path: str
    tracking_uri: str | None
    experiment_id: str | None
    invocation: str
    trials_total: int
    trials_skipped: int
    trials_run: int
    trials_failed: tuple[str, ...]
    sigma_computed: int
    sigma_cached: int
    baseline: dict
    baseline_cached: bool
    stale_runs_deleted: int
    best_models: tuple[str, ...] = ()
    report: dict = field(default_factory=dict)
    seconds: float = 0.0


def run_sweep(config: SweepConfig) -> SweepResult:
    """Run (or resume) the sweep; see the module docstring for the two phases and the resumption rules."""
    tic = time.perf_counter()
    config = _absolute_paths(config)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    store, invocation = TrialStore(out), f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    model, layers, fingerprint, input_shape = _load_model(config)
    keyed = keyed_grid(config, sweep_identity(config, fingerprint, layers))
    done = store.done_keys() & set(keyed)
    todo = missing_points(keyed, done)
    uri, experiment_id = _mlflow_setup(config, out)
    stale = _purge_stale_runs(uri, experiment_id, todo)
    baseline = _baseline(config, model, fingerprint, input_shape, out)
    sigma_keys, sigma_info = prepare_sigmas(config, model, layers, {p.sigma_id for p in todo.values() if p.sigma_id})
    stat_keys, _ = prepare_stats(config, model, layers, _stats_needed(todo.values()))
    ctx = TrialContext(
        model=config.model, num_classes=config.num_classes, state={k: v.clone() for k, v in model.state_dict().items()},
        fingerprint=fingerprint, layers=tuple(layers), input_shape=input_shape, baseline=baseline,
        identity=sweep_identity(config, fingerprint, layers),
        sources={s.name: s.dataset.identity() for s in config.sigma_sources}, sigma_keys=sigma_keys,
        sigma_location=config.sigma_location, data_cache_dir=str(Path(config.cache_dir) / "datasets"),
        eval_dataset=config.eval_dataset, eval_limit=config.eval_limit, batch_size=config.batch_size,
        solver=config.solver, device=config.device, threads=max(1, int(config.cpus_per_trial)), output_dir=str(out),
        save_models=config.save_models, compress_backend=config.compress_backend, tracking_uri=uri,
        experiment_id=experiment_id, invocation=invocation, stat_keys=stat_keys)
    if todo:
        _run_tuner(config, ctx, todo, store)
    store.write_parquet()
    records = [r for r in store.records() if r["key"] in keyed]
    best = _log_best_models(config, uri, records)
    report = _final_report(config, store, uri)
    return SweepResult(
        output_dir=str(out), parquet_path=str(store.parquet_path), tracking_uri=uri, experiment_id=experiment_id,
        invocation=invocation, trials_total=len(keyed), trials_skipped=len(done), trials_run=len(todo),
        trials_failed=tuple(sorted(set(todo) - store.done_keys())), sigma_computed=sigma_info["computed"],
        sigma_cached=sigma_info["cached"], baseline=baseline, baseline_cached=baseline["cached"],
        stale_runs_deleted=stale, best_models=tuple(best), report=report, seconds=time.perf_counter() - tic)


def run_covariance(config: SweepConfig) -> dict:
    """Phase 1 alone (the covariance job): every Sigma (and FW-LRA / AG-LRA statistic) the grid needs lands in
    the cache, each computed once.

    Returns
    -------
    dict
        ``computed``, ``cached``, ``keys`` ("source|N|seed" -> cache key), ``sigmas`` (per-Sigma info),
        ``layers``, ``fingerprint`` and the cache ``location``.
    """
    config = _absolute_paths(config)
    model, layers, fingerprint, _ = _load_model(config)
    points = grid_points(config)
    keys, info = prepare_sigmas(config, model, layers, {p.sigma_id for p in points if p.sigma_id})
    stat_keys, stat_info = prepare_stats(config, model, layers, _stats_needed(points))
    return {**info, "keys": keys, "stat_keys": stat_keys, "stats": stat_info, "layers": list(layers),
            "fingerprint": fingerprint, "location": config.sigma_location}


def _absolute_paths(config: SweepConfig) -> SweepConfig:
    """Trials run in their own working directories (and maybe other nodes): every path must be absolute.

    Source labels are unchanged: a derived label uses the root's last component only.
    """
    def absolute(path):
        return None if path is None else str(Path(path).expanduser().resolve())

    def absolute_or_uri(location):
        return location if location is None or "://" in location else absolute(location)

    def spec(dataset: DatasetSpec) -> DatasetSpec:
        return dataclasses.replace(dataset, root=absolute_or_uri(dataset.root))

    return dataclasses.replace(
        config, output_dir=absolute(config.output_dir), cache_dir=absolute(config.cache_dir),
        weights=absolute(config.weights), storage_path=absolute_or_uri(config.storage_path),
        sigma_cache=absolute_or_uri(config.sigma_cache), eval_dataset=spec(config.eval_dataset),
        sigma_sources=tuple(dataclasses.replace(s, dataset=spec(s.dataset)) for s in config.sigma_sources))


def _load_model(config: SweepConfig):
    from pipeline.runner import CompressConfig, prepare_model

    model, _ = prepare_model(CompressConfig(
        model=config.model, weights=config.weights, num_classes=config.num_classes, train=config.train,
        cache_dir=config.cache_dir, retrain_corrupt=config.retrain_corrupt, progress=config.progress,
        methods=config.methods))
    model = model.cpu().eval()
    layers, _ = select_layers(model, config.layers)
    data_cache = Path(config.cache_dir) / "datasets"
    input_shape = tuple(config.eval_dataset.build(cache_dir=data_cache)[0][0].shape)
    return model, layers, model_fingerprint(model), input_shape


def _run_tuner(config: SweepConfig, ctx: TrialContext, todo: Mapping[str, TrialPoint], store: TrialStore) -> None:
    from ray import tune

    _ensure_ray(config)
    trainable = tune.with_resources(tune.with_parameters(sweep_trial, ctx=ctx),
                                    {"cpu": config.cpus_per_trial, "gpu": config.gpus_per_trial})
    grid = [{"key": key, "point": point.params()} for key, point in todo.items()]
    storage = config.storage_path or str(Path(config.output_dir) / "ray_results")
    tuner = tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search(grid)},
        tune_config=tune.TuneConfig(max_concurrent_trials=config.max_concurrent_trials, reuse_actors=True,
                                    trial_name_creator=_trial_name, trial_dirname_creator=_trial_name),
        run_config=tune.RunConfig(
            name=f"sweep-{ctx.invocation}", storage_path=storage,
            failure_config=tune.FailureConfig(max_failures=config.max_failures, fail_fast=False),
            callbacks=[_progress_callback(str(store.root), len(todo), config.progress)],
            verbose=0))
    tuner.fit()


def _ensure_ray(config: SweepConfig) -> None:
    """Join ``ray_address`` / ``$RAY_ADDRESS`` (set by ``ray job submit``), else start a local instance."""
    import ray

    if ray.is_initialized():
        return
    address = config.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return
    # A local instance runs its workers with this interpreter, which has every dependency. Under `uv run`, Ray's
    # uv hook would instead copy the project and build a second virtualenv for the workers: minutes, for nothing.
    from ray._private import ray_constants

    saved = ray_constants.RAY_ENABLE_UV_RUN_RUNTIME_ENV
    ray_constants.RAY_ENABLE_UV_RUN_RUNTIME_ENV = False
    try:
        ray.init(include_dashboard=False, runtime_env={"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}})
    finally:
        ray_constants.RAY_ENABLE_UV_RUN_RUNTIME_ENV = saved


def _trial_name(trial) -> str:
    return trial.config["trial"]["key"]


def _final_report(config: SweepConfig, store: TrialStore, uri: str | None) -> dict:
    if not config.report or not store.records():
        return {}
    from pipeline.report import run_report
    from pipeline.tracking import Tracker

    tracker = Tracker(uri, config.experiment, enabled=True) if uri else None
    return run_report(store.parquet_path, store.root / "report", tracker)


def _progress_callback(output_dir: str, total: int, progress: bool):
    """Driver-side Tune callback: a tqdm bar over the trials, and the Parquet table kept current.

    Built here rather than at import time so that importing this module does not import Ray Tune.
    """
    from ray.tune import Callback

    class SweepProgress(Callback):
        def __init__(self):
            self._bar = None

        def _tick(self, note: str) -> None:
            if not progress:  # job logs: one line per trial instead of a bar
                self._done = getattr(self, "_done", 0) + 1
                print(f"[sweep] {self._done}/{total} trials: {note}", flush=True)
                return
            if self._bar is None:
                self._bar = tqdm(total=total, desc="trials", unit="trial")
            self._bar.set_postfix_str(note)
            self._bar.update(1)

        def on_trial_complete(self, iteration, trials, trial, **info):
            TrialStore(output_dir).write_parquet()
            result = trial.last_result or {}
            self._tick(f"{trial.config['trial']['key']} top1 {result.get('top1', float('nan')):.2f}% "
                       f"CR {result.get('compression_rate', float('nan')):.2f}")

        def on_trial_error(self, iteration, trials, trial, **info):
            self._tick(f"FAILED {trial.config['trial']['key']}")

        def on_experiment_end(self, trials, **info):
            if self._bar is not None:
                self._bar.close()

    return SweepProgress()

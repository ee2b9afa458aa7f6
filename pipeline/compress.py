"""Compress a model: Sigma per layer -> ranks -> decomposition per layer -> swapped layers -> evaluation.

This module adapts ``sigma_core`` to datasets, caches and files. The per-layer work is a plain function
(:func:`decompose_layer`) so that the Ray pipeline can run it as a task unchanged.
"""

from __future__ import annotations

import hashlib
import json
import time
import traceback
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from pipeline._io import atomic_save_safetensors, atomic_write_text
from pipeline.data import DatasetSpec, make_loader, sample_subset
from pipeline.evaluate import evaluate
from pipeline.methods import SolverOptions, get_method
from pipeline.models import build_model, get_builder
from pipeline.sources import DataSource
from pipeline.sigma_cache import SigmaCache, SigmaKey, fetch_sigmas, model_fingerprint
from sigma_core import (
    RankRule,
    accumulate_sigma,
    count_macs,
    count_params,
    get_module,
    module_from_spec,
    plan_layers,
    rel_frob_err,
    rel_sigma_err,
    replace_modules,
)

__all__ = [
    "CompressionError",
    "LayerOutcome",
    "SigmaSource",
    "compute_sigmas",
    "decompose_layer",
    "check_outcomes",
    "compress_model",
    "failure_reason",
    "model_stats",
    "save_compressed",
    "load_compressed",
    "factorized_layers",
]


@dataclass(frozen=True)
class SigmaSource:
    """Where Sigma comes from: a dataset view, how many images, which random subset."""

    dataset: DatasetSpec
    n_samples: int = 2000
    seed: int = 0
    centered: bool = False
    batch_size: int = 250

    def __post_init__(self) -> None:
        if self.n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {self.n_samples}")

    def identity(self) -> dict:
        return {"dataset": self.dataset.identity(), "n": self.n_samples, "seed": self.seed,
                "centered": self.centered}

    def dataset_identity(self) -> dict:
        """What stands for the images in the Sigma cache key."""
        return self.dataset.identity()

    def key_seed(self) -> int:
        return self.seed

    def batches(self, data_cache_dir: str | Path | None = None):
        """A loader over the ``n_samples`` images drawn with ``seed``."""
        subset = sample_subset(self.dataset.build(cache_dir=data_cache_dir), self.n_samples, self.seed)
        return make_loader(subset, batch_size=self.batch_size, shuffle=False)


def compute_sigmas(
    model: nn.Module,
    layer_names: Sequence[str],
    source: SigmaSource | DataSource,
    *,
    device: str = "cpu",
    cache: SigmaCache | None = None,
    data_cache_dir: str | Path | None = None,
    progress: bool = True,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int | None = None,
) -> tuple[dict[str, torch.Tensor], dict]:
    """Finalized Sigma (float64, CPU) of every layer in ``layer_names``, from the cache when possible.

    With ``checkpoint_dir`` and ``checkpoint_every``, the pass runs in chunks of ``checkpoint_every`` images and
    the merged accumulator states are written there after each chunk (:mod:`pipeline.sigma_checkpoint`), so a
    killed job continues its Sigma pass where the last checkpoint left it; the result is bitwise the one of an
    uninterrupted run with the same chunking.

    The cache is read per layer (a whole-set entry of an older run is used as is): only the layers it lacks are
    captured, in one pass over the images, and written as one entry each; then an index makes the whole-set key
    (``info["key"]``, what sweep trials read) resolve to them (:meth:`SigmaCache.save_index`).

    Returns
    -------
    sigmas : dict of str to torch.Tensor (n, n)
        In the order of ``layer_names``.
    info : dict
        ``cached`` (every layer from the cache), whole-set cache ``key``, ``seconds``, number of ``images``,
        ``cached_layers`` / ``computed_layers`` and ``patches`` per computed layer.
    """
    layer_names = list(layer_names)
    key = SigmaKey(model_fingerprint(model), source.dataset_identity(), source.n_samples, source.key_seed(),
                   source.centered)
    run: dict = {"source": source.identity(), "weights": key.weights_hash}

    def compute(missing: list[str]) -> dict[str, torch.Tensor]:
        tic = time.perf_counter()
        if checkpoint_dir is not None and checkpoint_every is not None and isinstance(source, SigmaSource):
            from pipeline.sigma_checkpoint import accumulate_checkpointed

            subset = sample_subset(source.dataset.build(cache_dir=data_cache_dir), source.n_samples, source.seed)
            accs = accumulate_checkpointed(model.to(device), subset, missing, key=key,
                                           batch_size=source.batch_size, every=checkpoint_every,
                                           directory=checkpoint_dir, device=device, progress=progress)
        else:
            loader = source.batches(data_cache_dir)
            seen = [0]

            def advance(count: int) -> None:
                seen[0] = count
                bar.update(count - bar.n)

            with tqdm(total=source.n_samples, desc="Sigma", unit="img", disable=not progress, leave=False) as bar:
                accs = accumulate_sigma(model.to(device), loader, missing, device=device, max_samples=source.n_samples,
                                        callback=advance)
            if seen[0] < source.n_samples:  # the cache key says n_samples images: never store a Sigma of fewer
                raise ValueError(f"the data gave {seen[0]} images, fewer than n_samples={source.n_samples}: lower "
                                 "n_samples or give more data")
        run.update(seconds=time.perf_counter() - tic, patches={name: acc.count for name, acc in accs.items()})
        return {name: acc.finalize(centered=source.centered).cpu() for name, acc in accs.items()}

    sigmas, computed = fetch_sigmas(cache, key, layer_names, compute, run)
    info = {"key": key.for_layers(layer_names), "images": source.n_samples, "cached": not computed,
            "seconds": run.get("seconds", 0.0), "cached_layers": [n for n in layer_names if n not in computed],
            "computed_layers": computed, "patches": run.get("patches", {})}
    return sigmas, info


@dataclass(frozen=True)
class LayerOutcome:
    """What happened to one layer: ranks, errors under both norms, time, or the error that stopped it."""

    name: str
    method: str
    kernel_shape: tuple[int, ...]
    ranks: tuple[int, ...] | None = None
    rel_sigma_err: float | None = None
    rel_frob_err: float | None = None
    seconds: float = 0.0
    iterations: int = 0
    converged: bool | None = None
    params_before: int = 0
    params_after: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def decompose_layer(
    name: str,
    module: nn.Module,
    sigma: torch.Tensor | None,
    rule: RankRule,
    method_name: str,
    options: SolverOptions = SolverOptions(),
    device: str = "cpu",
    *,
    stat: torch.Tensor | None = None,
) -> tuple[LayerOutcome, nn.Module | None]:
    """Decompose one layer; never raises for a bad layer, the outcome carries the error instead.

    ``sigma`` (the layer's input Sigma, when known) feeds Sigma methods and the reported rel_sigma_err; ``stat`` is
    the layer's Fisher diagonal or mean |activation| for methods whose ``needs`` is ``"fisher"``/``"activation"``.

    Returns
    -------
    outcome : LayerOutcome
    replacement : nn.Module or None
        The factorized layer (on CPU, in the layer's dtype), None if it failed.
    """
    method = get_method(method_name)
    weight = module.weight.detach().cpu()
    base = LayerOutcome(name, method_name, tuple(weight.shape), params_before=count_params(module))
    try:
        data = _method_input(method, name, sigma, stat)
        if not isinstance(module, method.layer_types):
            kinds = "/".join(t.__name__ for t in method.layer_types)
            raise ValueError(f"method {method_name} applies to {kinds} layers; {name} is a {type(module).__name__}")
        ranks = method.resolve_ranks(rule, weight)  # (R_T, R_S) for Tucker-2, (R,) for CP
        tic = time.perf_counter()
        result = method.decompose(weight.to(torch.float64), data, ranks, options, device)
        seconds = time.perf_counter() - tic
        approx = result.reconstruct().cpu()
        replacement = method.build(module.cpu(), result)
    except Exception as exc:  # noqa: BLE001 -- one failing layer must not lose the others
        return _with(base, error=f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}"), None
    return _with(
        base,
        ranks=tuple(int(r) for r in result.ranks),
        rel_sigma_err=rel_sigma_err(weight, approx, sigma) if sigma is not None else None,
        rel_frob_err=rel_frob_err(weight, approx),
        seconds=seconds,
        iterations=max(len(result.errors) - 1, 0),
        converged=bool(result.converged),
        params_after=count_params(replacement),
    ), replacement


def _method_input(method, name: str, sigma: torch.Tensor | None, stat: torch.Tensor | None):
    """What ``method.decompose`` receives: Sigma, the layer's Fisher / activation statistic, or Sigma-or-None."""
    if method.needs == "sigma" and sigma is None:
        raise ValueError(f"method {method.name} needs Sigma for layer {name}")
    if method.needs not in (None, "sigma"):
        if stat is None:
            raise ValueError(f"method {method.name} needs the {method.needs} statistic of layer {name} "
                             "(see pipeline.fisher)")
        return stat
    return sigma


def _with(outcome: LayerOutcome, **changes) -> LayerOutcome:
    return LayerOutcome(**{**asdict(outcome), **changes})


class CompressionError(ValueError):
    """Some chosen layers could not be compressed (raised by :func:`compress_model` with ``strict=True``).

    Attributes
    ----------
    outcomes : list of LayerOutcome
        Every layer's outcome; the failed ones carry ``error``.
    """

    def __init__(self, outcomes: Sequence[LayerOutcome]):
        self.outcomes = list(outcomes)
        failed = [o for o in self.outcomes if not o.ok]
        lines = "\n".join(f"  {o.name}: {failure_reason(o)}" for o in failed)
        super().__init__(f"{len(failed)} of {len(self.outcomes)} chosen layers could not be compressed:\n{lines}\n"
                         "Fix their ranks / method, leave them out of layer_names, or pass strict=False to keep "
                         "them dense and get the reasons in the outcomes.")


def failure_reason(outcome: LayerOutcome) -> str:
    """First line of a failed layer's error (the exception type and message, without the traceback)."""
    return (outcome.error or "").split("\n")[0]


def compress_model(
    model: nn.Module,
    layer_names: Sequence[str],
    sigmas: Mapping[str, torch.Tensor],
    rule: RankRule,
    method_name: str,
    *,
    options: SolverOptions = SolverOptions(),
    device: str = "cpu",
    progress: bool = True,
    callback: Callable[[LayerOutcome], None] | None = None,
    stats: Mapping[str, torch.Tensor] | None = None,
    overrides: Mapping[str, tuple[str, RankRule]] | None = None,
    strict: bool = True,
) -> tuple[nn.Module, list[LayerOutcome]]:
    """Decompose every layer in ``layer_names`` and return a compressed copy of ``model``.

    ``stats`` holds per-layer Fisher / activation statistics for methods that need them; ``overrides`` maps a
    layer name to its own ``(method_name, rule)`` (hybrid compression: linear layers by SVD, convs by
    ``method_name``).

    Parameters
    ----------
    strict : bool, default True
        A layer that cannot be compressed (impossible ranks, missing Sigma, wrong layer type) raises
        :class:`CompressionError` naming every failed layer and why, after all layers were tried. With
        ``strict=False`` failed layers keep their dense weights, a warning lists them, and each failed
        outcome carries the reason in ``error`` (``outcome.ok`` is False).

    Returns
    -------
    model : nn.Module
        Compressed copy (``model`` itself is untouched).
    outcomes : list of LayerOutcome
        One per layer of ``layer_names``, in order.
    """
    stats, overrides = stats or {}, overrides or {}
    outcomes: list[LayerOutcome] = []
    replacements: dict[str, nn.Module] = {}
    for name in tqdm(layer_names, desc=method_name, unit="layer", disable=not progress, leave=False):
        layer_method, layer_rule = overrides.get(name, (method_name, rule))
        outcome, new = decompose_layer(name, get_module(model, name), sigmas.get(name), layer_rule, layer_method,
                                       options, device, stat=stats.get(name))
        outcomes.append(outcome)
        if new is not None:
            replacements[name] = new
        if callback is not None:
            callback(outcome)
    check_outcomes(outcomes, strict)
    return replace_modules(model, replacements), outcomes


def check_outcomes(outcomes: Sequence[LayerOutcome], strict: bool) -> None:
    """Raise :class:`CompressionError` (``strict``) or warn when some layers failed; nothing when all succeeded."""
    failed = [o for o in outcomes if not o.ok]
    if failed and strict:
        raise CompressionError(outcomes)
    if failed:
        warnings.warn(f"{len(failed)} of {len(outcomes)} layers kept dense: "
                      + "; ".join(f"{o.name}: {failure_reason(o)}" for o in failed), RuntimeWarning, stacklevel=3)


def model_stats(model: nn.Module, input_shape: tuple[int, ...]) -> dict:
    """Parameter count and multiply-accumulates for one image of shape ``input_shape`` (C, H, W)."""
    return {"params": count_params(model), "macs": count_macs(model, (1, *input_shape))}


def accuracy(model: nn.Module, dataset_spec: DatasetSpec, *, limit: int | None, batch_size: int, device: str,
             data_cache_dir: str | Path | None = None, progress: bool = True) -> dict:
    """Top-1/top-5 (%) of ``model`` on a dataset view (first ``limit`` items if given)."""
    dataset = dataset_spec.build(cache_dir=data_cache_dir)
    if limit is not None and limit < len(dataset):
        dataset = torch.utils.data.Subset(dataset, range(limit))
    loader = make_loader(dataset, batch_size=batch_size, shuffle=False)
    return evaluate(model.to(device), loader, device=device, progress=progress)


def save_compressed(
    directory: str | Path,
    base_model: str | None = None,
    num_classes: int | None = None,
    model: nn.Module | None = None,
    replaced: Sequence[str] | None = None,
    extra: Mapping | None = None,
) -> Path:
    """Save a compressed model as ``spec.json`` + ``model.safetensors``.

    The spec names the base architecture and every replaced layer's constructor arguments, so
    :func:`load_compressed` rebuilds the model without re-running any decomposition. The two files are bound
    to each other: the weights file's header records the SHA-256 of the spec, so an edited spec (another
    padding, dilation, rank) is refused at load instead of running a different network.

    Parameters
    ----------
    directory : str or Path
        Written atomically (file by file); created if needed.
    base_model : str or None
        How :func:`load_compressed` rebuilds the dense architecture: a registered name
        (:data:`pipeline.models.MODEL_NAMES`), ``"pkg.module:factory"`` or ``"timm:<arch>"`` (see
        :func:`pipeline.models.get_builder`); or None: the architecture is not recorded and the caller of
        :func:`load_compressed` passes ``model=`` (its class is recorded as a hint). Checked here: a name that
        is not registered nor an importable factory, or a builder whose model (with the replaced layers) does
        not have ``model``'s parameters, is a ValueError now rather than at load time.
    num_classes : int, optional
        Passed to the builder (registered names, factories taking ``num_classes``); default: the output size
        of ``model``'s last ``nn.Linear``, else 10.
    model : nn.Module
        The compressed model.
    replaced : sequence of str, optional
        Names of the factorized layers; default: every factorized layer of ``model`` (its ``spec()``-able
        modules, see :func:`sigma_core.module_from_spec`).
    extra : mapping, optional
        More JSON-able entries of the spec (method, rank rule, ...).

    Raises
    ------
    ValueError
        If the model holds NaN/Inf values (nothing is written), or ``base_model`` cannot rebuild it.
    """
    if model is None:
        raise ValueError("save_compressed needs the compressed model: pass model=")
    directory = Path(directory)
    replaced = factorized_layers(model) if replaced is None else list(replaced)
    if num_classes is None:
        num_classes = _output_classes(model)
    _check_finite_state(model.state_dict(), "the model to save")
    spec = {
        "format": "sigma-compress/1",
        "base_model": base_model,
        "num_classes": num_classes,
        "architecture": f"{type(model).__module__}:{type(model).__qualname__}",
        "replacements": {name: get_module(model, name).spec() for name in replaced},
        **(dict(extra) if extra else {}),
    }
    if base_model is not None:
        _check_rebuilds(spec, model)
    text = json.dumps(spec, indent=2, default=str)
    # Spec first, weights last: the weights file (bound to that spec) is what makes the pair valid.
    atomic_write_text(directory / "spec.json", text)
    atomic_save_safetensors(model.state_dict(), directory / "model.safetensors",
                            metadata={"spec_sha256": _spec_digest(text)})
    return directory


def _spec_digest(text: str) -> str:
    """SHA-256 of a spec's content (parsed and re-encoded canonically: whitespace edits do not count)."""
    return hashlib.sha256(json.dumps(json.loads(text), sort_keys=True).encode()).hexdigest()


def _check_finite_state(state: Mapping[str, torch.Tensor], what: str) -> None:
    bad = [name for name, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise ValueError(f"{what} has NaN/Inf values in {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}: "
                         "refusing to use non-finite weights (check the run that produced them)")




def factorized_layers(model: nn.Module) -> list[str]:
    """Names of the factorized layers of ``model`` (outermost only), in module order."""
    from sigma_core.layers import _spec_types

    kinds = tuple(_spec_types().values())
    names: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, kinds) and not any(name.startswith(n + ".") for n in names):
            names.append(name)
    return names


def _output_classes(model: nn.Module) -> int:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if linears:
        return int(linears[-1].out_features)
    from sigma_core import LowRankLinear

    low_rank = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    return int(low_rank[-1].out_features) if low_rank else 10


def _skeleton(spec: Mapping, model: nn.Module | None = None) -> nn.Module:
    """The dense architecture with the spec's factorized layers swapped in (weights still to be loaded)."""
    if model is None:
        if spec.get("base_model") is None:
            raise ValueError(f"the model was saved without a builder (architecture {spec.get('architecture')}): "
                             "pass the dense model, e.g. load_compressed(directory, model=MyNet()), or save with "
                             "base_model='pkg.module:factory'")
        model = build_model(spec["base_model"], num_classes=int(spec["num_classes"]))
    return replace_modules(model, {name: module_from_spec(s) for name, s in spec["replacements"].items()})


def _check_rebuilds(spec: Mapping, model: nn.Module) -> None:
    """Raise now if :func:`load_compressed` could not rebuild ``model`` from ``spec`` (names, shapes)."""
    get_builder(spec["base_model"])  # unknown names and unimportable factories: their own message
    hint = (f"base_model={spec['base_model']!r} (num_classes={spec['num_classes']}) does not rebuild this model: "
            "pass the builder of the dense model (and its num_classes), or base_model=None and model= at load time")
    try:
        try:
            with torch.device("meta"):  # shapes only: no memory, no random initialization
                rebuilt = _skeleton(spec).state_dict()
        except ValueError:
            raise
        except Exception:  # noqa: BLE001 -- a user factory that insists on real tensors
            rebuilt = _skeleton(spec).state_dict()
    except ValueError as exc:
        raise ValueError(f"{hint} ({exc})") from exc
    saved = model.state_dict()
    missing = sorted(set(saved) - set(rebuilt))
    unexpected = sorted(set(rebuilt) - set(saved))
    shapes = [k for k in saved if k in rebuilt and tuple(saved[k].shape) != tuple(rebuilt[k].shape)]
    if missing or unexpected or shapes:
        raise ValueError(f"{hint} ({len(missing)} tensors it lacks {missing[:3]}, {len(unexpected)} extra "
                         f"{unexpected[:3]}, {len(shapes)} shape mismatches {shapes[:3]})")


def load_compressed(directory: str | Path, model: nn.Module | None = None) -> nn.Module:
    """Rebuild a model saved by :func:`save_compressed`.

    Parameters
    ----------
    directory : str or Path
    model : nn.Module, optional
        The dense architecture to rebuild into (its weights are replaced; the module itself is not modified, a
        copy is returned). Default: built from the spec's ``base_model`` (registered name or
        ``"pkg.module:factory"``); required when the model was saved with ``base_model=None``.

    Returns
    -------
    nn.Module
        In eval mode, on CPU.
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    spec_path, weights_path = directory / "spec.json", directory / "model.safetensors"
    for path in (spec_path, weights_path):
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: is {directory} a directory written by save_compressed?")
    from safetensors import safe_open

    text = spec_path.read_text()
    try:
        spec = json.loads(text)
        with safe_open(str(weights_path), framework="pt") as handle:
            bound = (handle.metadata() or {}).get("spec_sha256")
    except Exception as exc:  # noqa: BLE001 -- unreadable spec or weights: one message naming the file
        raise ValueError(f"{directory} is damaged ({type(exc).__name__}: {exc}): save the model again") from None
    # Files of older versions carry no binding; they load as before.
    if bound is not None and bound != _spec_digest(text):
        raise ValueError(f"{spec_path} was modified after {weights_path} was saved (its SHA-256 no longer matches "
                         "the one recorded in the weights): restore it or save the model again")
    rebuilt = _skeleton(spec, model)
    try:
        state = load_file(str(weights_path))
        rebuilt.load_state_dict(state, strict=True)
    except Exception as exc:
        given = "the model passed" if model is not None else f"base_model {spec.get('base_model')!r}"
        raise ValueError(f"{weights_path} does not match {given} with the layers of {spec_path}: {exc}") from exc
    _check_finite_state(state, str(weights_path))
    return rebuilt.eval()


def select_layers(model: nn.Module, names: Sequence[str] | None = None) -> tuple[list[str], list[dict]]:
    """Chosen layer names and the full plan (every conv/linear with why it was or was not chosen)."""
    plan = plan_layers(model, names=list(names) if names else None)
    chosen = [choice.name for choice in plan if choice.selected]
    if not chosen:
        raise ValueError("no layer selected for compression: pass layer names explicitly")
    return chosen, [asdict(choice) for choice in plan]


def outcome_rows(outcomes: Sequence[LayerOutcome]) -> list[dict]:
    """Outcomes as plain dicts (JSON/Parquet friendly)."""
    return [{**asdict(o), "kernel_shape": list(o.kernel_shape), "ranks": list(o.ranks or [])} for o in outcomes]

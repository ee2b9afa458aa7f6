"""Sigma sources beyond one plain dataset: weighted mixtures, shrinkage, BatchNorm calibration, data-free Sigma.

:func:`compute_source_sigmas` is what :func:`pipeline.compress.compute_sigmas` calls for a
:class:`~pipeline.compress.SigmaSource` that is not a plain dataset view. It gets the plain Sigmas it needs from
``base`` (the single-process or the Ray Data computation, each cached under its own key), derives the requested
Sigma from them and caches that too, per layer, under a key that adds the mixture / transform to the identity
(so sweep trials read it like any other Sigma).

* mixture (``DatasetSpec("mixture", components=..., weights=..., counts=...)``):
  ``Sigma = sum_k w_k Sigma_k / sum_k w_k`` with ``Sigma_k`` the Sigma of ``n_k`` images of component k
  (:func:`pipeline.data_views.component_counts`; the same seed for every component). Uncentered only.
* shrinkage (:class:`Shrinkage`, :mod:`sigma_core.shrinkage`): OAS / Ledoit-Wolf toward ``mu I`` or toward the
  Kronecker fit, from Sigma and its patch count (``N x`` output positions of the layer; ``count="images"`` uses N,
  for overlapping patches of one image are far from independent). For a mixture the count is Kish's effective
  size ``(sum w)^2 / sum (w_k^2 / m_k)``.
* calibration ``"bn-scale"`` (beyond the paper): :func:`sigma_core.bn_prior.calibrate_channels` with the
  moments the model's own BatchNorm statistics imply (:func:`layer_input_moments`).
* ``DatasetSpec("bn-prior")``: the data-free Sigma of :func:`sigma_core.bn_prior.data_free_sigma` (no images).
"""

from __future__ import annotations

import math
import operator
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from pipeline.data_views import component_counts, mixture_weights
from pipeline.sigma_cache import SigmaCache, SigmaKey, fetch_sigmas, model_fingerprint
from sigma_core.bn_prior import (
    bn_output_moments,
    calibrate_channels,
    data_free_sigma,
    relu_moments,
    sum_moments,
    tap_overlap,
)
from sigma_core.shrinkage import ESTIMATORS, TARGETS, shrink

__all__ = ["CALIBRATIONS", "COUNTS", "LayerInput", "Shrinkage", "compute_source_sigmas", "is_plain",
           "layer_geometry", "layer_input_moments", "transform_identity"]

CALIBRATIONS = ("bn-scale",)
COUNTS = ("patches", "images")


@dataclass(frozen=True)
class Shrinkage:
    """How a Sigma is shrunk (:func:`sigma_core.shrinkage.shrink`).

    Attributes
    ----------
    estimator : {"oas", "lw"}
        Intensity rule (ignored when ``intensity`` is given).
    target : {"identity", "kronecker"}
    intensity : float, optional
        A fixed lambda in [0, 1] instead of an estimated one.
    count : {"patches", "images"}
        The sample count m of the estimator: patches (N x output positions) or images N.
    """

    estimator: str = "oas"
    target: str = "identity"
    intensity: float | None = None
    count: str = "patches"

    def __post_init__(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"shrinkage estimator must be one of {', '.join(ESTIMATORS)}, got {self.estimator!r}")
        if self.target not in TARGETS:
            raise ValueError(f"shrinkage target must be one of {', '.join(TARGETS)}, got {self.target!r}")
        if self.intensity is not None and not 0.0 <= float(self.intensity) <= 1.0:
            raise ValueError(f"shrinkage intensity must be in [0, 1], got {self.intensity!r}")
        if self.count not in COUNTS:
            raise ValueError(f"shrinkage count must be one of {', '.join(COUNTS)}, got {self.count!r}")

    @classmethod
    def parse(cls, text: str) -> Shrinkage:
        """``"oas"``, ``"lw:kronecker"``, ``"0.3"``, ``"oas:identity:images"`` -> Shrinkage (CLI / YAML)."""
        parts = [p.strip() for p in str(text).split(":") if p.strip()]
        if not parts:
            raise ValueError("empty shrinkage: give e.g. oas, lw, oas:kronecker or a fixed intensity like 0.3")
        kwargs: dict = {}
        try:
            kwargs["intensity"] = float(parts[0])
        except ValueError:
            kwargs["estimator"] = parts[0]
        for part in parts[1:]:
            kwargs["count" if part in COUNTS else "target"] = part
        return cls(**kwargs)

    @property
    def label(self) -> str:
        head = self.estimator if self.intensity is None else f"{self.intensity:g}"
        return ":".join([head] + ([self.target] if self.target != "identity" else [])
                        + ([self.count] if self.count != "patches" else []))


def is_plain(source) -> bool:
    """Whether ``source`` (a SigmaSource) is one dataset view without transform (the plain computation)."""
    return (source.dataset.name not in ("mixture", "bn-prior") and getattr(source, "shrinkage", None) is None
            and getattr(source, "calibration", None) is None)


def transform_identity(source) -> dict | None:
    """The part of the cache identity that shrinkage / calibration add (None when neither is set)."""
    shrinkage, calibration = getattr(source, "shrinkage", None), getattr(source, "calibration", None)
    if shrinkage is None and calibration is None:
        return None
    return {"shrinkage": None if shrinkage is None else asdict(shrinkage), "calibration": calibration,
            "format": 1}


# --------------------------------------------------------------------------- #
# Model structure: what each layer's input is
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class LayerInput:
    """What feeds a layer, as far as BatchNorm statistics tell.

    Attributes
    ----------
    kind : str
        ``"relu-bn"`` (input = ReLU(BN(.)), (B1)-(B2) apply), ``"relu-sum-bn"`` (ReLU of a sum of BN outputs:
        mean exact, variance assuming independent branches), ``"input"`` (the normalized image), ``"pooled"``
        (a pooling of ReLU(BN(.)): moments of the unpooled activation, approximate), ``"unknown"``.
    m1, m2 : torch.Tensor or None, shape (S,)
        E[a_s], E[a_s^2] per input channel (None for ``"unknown"``).
    """

    kind: str
    m1: torch.Tensor | None = None
    m2: torch.Tensor | None = None


_RELU_FUNCS = {torch.relu, torch.nn.functional.relu}
_ADD_FUNCS = {operator.add, operator.iadd, torch.add}


def layer_input_moments(model: nn.Module, layers: Sequence[str]) -> dict[str, LayerInput]:
    """For each layer of ``layers``, the BatchNorm-implied moments of its input (torch.fx trace of ``model``).

    Normalized images (``"input"``) get E[a] = 0, E[a^2] = 1 (inputs normalized with the training set's
    mean/std).
    """
    import torch.fx as fx

    modules = dict(model.named_modules())
    graph = fx.symbolic_trace(model).graph

    def module_of(node):
        return modules.get(node.target) if node.op == "call_module" else None

    def is_relu(node):
        return isinstance(module_of(node), nn.ReLU) or (node.op == "call_function" and node.target in _RELU_FUNCS)

    def bn_moments(node):
        mod = module_of(node)
        return bn_output_moments(mod) if isinstance(mod, nn.BatchNorm2d) else None

    def describe(node) -> LayerInput:
        if node.op == "placeholder":
            return LayerInput("input")  # m1 / m2 filled in by the caller that knows the channel count
        pooled = False
        while isinstance(module_of(node), (nn.MaxPool2d, nn.AvgPool2d, nn.Dropout, nn.Identity)):
            pooled = pooled or not isinstance(module_of(node), (nn.Dropout, nn.Identity))
            node = node.args[0]
        if not is_relu(node):
            return LayerInput("unknown")
        inner = node.args[0]
        moments = bn_moments(inner)
        kind = "relu-bn"
        if moments is None and inner.op == "call_function" and inner.target in _ADD_FUNCS:
            parts = [bn_moments(a) for a in inner.args if isinstance(a, fx.Node)]
            if len(parts) < 2 or any(p is None for p in parts):
                return LayerInput("unknown")  # e.g. an identity shortcut: no Gaussian for that branch
            moments, kind = sum_moments(parts), "relu-sum-bn"
        if moments is None:
            return LayerInput("unknown")
        m1, m2 = relu_moments(*moments)
        return LayerInput("pooled" if pooled else kind, m1, m2)

    out = {}
    wanted = set(layers)
    for node in graph.nodes:
        if node.op == "call_module" and node.target in wanted:
            out[node.target] = describe(node.args[0])
    missing = wanted - set(out)
    if missing:
        raise ValueError(f"layers {sorted(missing)} are not called in the traced model")
    return out


def layer_geometry(model: nn.Module, layers: Sequence[str], input_shape: tuple[int, ...]) -> dict[str, dict]:
    """Input spatial size and output positions per image of each layer (one forward pass of a zero image)."""
    modules = dict(model.named_modules())
    seen: dict[str, dict] = {}
    handles = []
    for name in layers:
        def hook(module, args, output, name=name):
            x = args[0]
            positions = output.shape[2] * output.shape[3] if output.dim() == 4 else 1
            seen[name] = {"in_size": tuple(x.shape[2:]) if x.dim() == 4 else None, "positions": int(positions)}
        handles.append(modules[name].register_forward_hook(hook))
    try:
        was = model.training
        model.eval()
        with torch.inference_mode():
            model(torch.zeros(1, *input_shape, dtype=next(model.parameters()).dtype))
        model.train(was)
    finally:
        for h in handles:
            h.remove()
    return seen


# --------------------------------------------------------------------------- #
# The Sigma of a non-plain source
# --------------------------------------------------------------------------- #
BaseCompute = Callable[..., tuple[dict[str, torch.Tensor], dict]]


def _input_shape(model: nn.Module, spec, data_cache_dir) -> tuple[int, ...]:
    if spec.name == "mixture":
        return _input_shape(model, spec.components[0], data_cache_dir)
    if spec.name == "bn-prior":
        first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
        size = spec.image_size or 28
        return (first.in_channels, size, size)
    return tuple(spec.build(cache_dir=data_cache_dir)[0][0].shape)


def _layer_sigma_bn_prior(module: nn.Module, info: LayerInput, geometry: dict) -> tuple[torch.Tensor, str]:
    from sigma_core import patch_dim

    n = patch_dim(module)
    if not isinstance(module, nn.Conv2d) or info.kind == "unknown":
        return torch.eye(n, dtype=torch.float64), "identity (no BatchNorm statistics describe this input)"
    channels = module.in_channels
    m1 = info.m1 if info.m1 is not None else torch.zeros(channels, dtype=torch.float64)
    m2 = info.m2 if info.m2 is not None else torch.ones(channels, dtype=torch.float64)
    if isinstance(module.padding, str):
        raise ValueError(f"data-free Sigma needs numeric padding, got {module.padding!r}")
    overlap = tap_overlap(geometry["in_size"], module.kernel_size, module.stride, module.padding, module.dilation)
    return data_free_sigma(m1, m2, overlap), info.kind


def compute_source_sigmas(model: nn.Module, layer_names: Sequence[str], source, *, base: BaseCompute,
                          cache: SigmaCache | None = None, data_cache_dir=None,
                          progress: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """Sigma of every layer for a mixture / bn-prior source or a source with shrinkage / calibration.

    Parameters
    ----------
    model : nn.Module
    layer_names : sequence of str
    source : pipeline.compress.SigmaSource
    base : callable
        ``base(model, layer_names, plain_source, cache=..., data_cache_dir=..., progress=...)`` -> (sigmas, info):
        the plain computation (``compute_sigmas`` of a plain source, or the Ray Data one).

    Returns
    -------
    sigmas : dict of str to torch.Tensor
    info : dict
        As ``compute_sigmas``'s, plus ``layer_notes`` (per layer: shrinkage ``intensity``, calibration
        ``input_kind`` and scale range) when computed, and ``components`` for a mixture.
    """
    layer_names = list(layer_names)
    spec = source.dataset
    if spec.name == "mixture" and source.centered:
        raise ValueError("a mixture Sigma is combined from uncentered second moments: centered=True is not "
                         "supported for mixtures")
    identity = spec.identity()
    extra = transform_identity(source)
    if extra is not None:
        identity = {**identity, "sigma_transform": extra}
    key = SigmaKey(model_fingerprint(model), identity, source.n_samples, source.seed, source.centered)
    run: dict = {"source": source.identity(), "weights": key.weights_hash}
    modules = dict(model.named_modules())

    def plain(spec_, n):
        from pipeline.compress import SigmaSource

        return SigmaSource(spec_, n_samples=n, seed=source.seed, centered=source.centered,
                           batch_size=source.batch_size)

    def compute(missing: list[str]) -> dict[str, torch.Tensor]:
        tic = time.perf_counter()
        geometry = layer_geometry(model, missing, _input_shape(model, spec, data_cache_dir))
        notes: dict[str, dict] = {name: {} for name in missing}
        counts: dict[str, float] = {}
        if spec.name == "bn-prior":
            inputs = layer_input_moments(model, missing)
            sigmas = {}
            for name in missing:
                sigmas[name], kind = _layer_sigma_bn_prior(modules[name], inputs[name], geometry[name])
                notes[name]["input_kind"] = kind
                counts[name] = float(source.n_samples * geometry[name]["positions"])
        elif spec.name == "mixture":
            weights = mixture_weights(spec)
            parts = []
            for comp, n_k, w in zip(spec.components, component_counts(spec, source.n_samples), weights):
                if w == 0:
                    continue
                sig_k, _ = base(model, missing, plain(comp, n_k), cache=cache, data_cache_dir=data_cache_dir,
                                progress=progress)
                parts.append((w, n_k, sig_k))
            total = math.fsum(w for w, _, _ in parts)
            sigmas = {name: sum(w / total * s[name] for w, _, s in parts) for name in missing}
            for name in missing:
                per_image = geometry[name]["positions"]
                unit = 1 if source.shrinkage is not None and source.shrinkage.count == "images" else per_image
                counts[name] = total ** 2 / math.fsum(w * w / (n_k * unit) for w, n_k, _ in parts)
            run["components"] = [{"dataset": c.identity(), "n": n} for c, n in
                                 zip(spec.components, component_counts(spec, source.n_samples))]
        else:
            sigmas, _ = base(model, missing, plain(spec, source.n_samples), cache=cache,
                             data_cache_dir=data_cache_dir, progress=progress)
            sigmas = dict(sigmas)
            for name in missing:
                images = source.shrinkage is not None and source.shrinkage.count == "images"
                counts[name] = float(source.n_samples * (1 if images else geometry[name]["positions"]))
        if source.calibration is not None:
            inputs = layer_input_moments(model, missing)
            for name in missing:
                mod, info = modules[name], inputs[name]
                notes[name]["input_kind"] = info.kind
                if not isinstance(mod, nn.Conv2d) or info.kind not in ("relu-bn", "relu-sum-bn"):
                    notes[name]["calibrated"] = False  # no exact moments for this input: left as transferred
                    continue
                sigmas[name], scales = calibrate_channels(sigmas[name], info.m2, mod.kernel_size)
                notes[name].update(calibrated=True, scale_min=float(scales.min()), scale_max=float(scales.max()))
        if source.shrinkage is not None:
            shr = source.shrinkage
            for name in missing:
                mod = modules[name]
                channels = mod.in_channels if isinstance(mod, nn.Conv2d) else None
                res = shrink(sigmas[name], counts[name], estimator=shr.estimator, target=shr.target,
                             intensity=shr.intensity, channels=channels)
                sigmas[name] = res.sigma
                notes[name].update(intensity=res.intensity, count=counts[name])
        run.update(seconds=time.perf_counter() - tic, layer_notes=notes)
        return {name: sigmas[name].to(torch.float64).cpu() for name in missing}

    sigmas, computed = fetch_sigmas(cache, key, layer_names, compute, run)
    info = {"key": key.for_layers(layer_names), "images": source.n_samples, "cached": not computed,
            "seconds": run.get("seconds", 0.0), "cached_layers": [n for n in layer_names if n not in computed],
            "computed_layers": computed, "patches": {}, "layer_notes": run.get("layer_notes", {}),
            "components": run.get("components")}
    return sigmas, info


def shrinkage_counts(model: nn.Module, layers: Sequence[str], input_shape: tuple[int, ...], n_images: int,
                     count: str = "patches") -> dict[str, float]:
    """The sample count m of each layer's Sigma from ``n_images`` images (see :class:`Shrinkage`)."""
    if count not in COUNTS:
        raise ValueError(f"count must be one of {', '.join(COUNTS)}, got {count!r}")
    geometry = layer_geometry(model, layers, input_shape)
    return {name: float(n_images * (1 if count == "images" else geometry[name]["positions"])) for name in layers}


__all__ += ["shrinkage_counts"]

"""Per-layer decomposition as Ray tasks: :func:`pipeline.compress.decompose_layer` unchanged, one task per layer.

Each layer's Sigma goes to the object store once (``ray.put``, one object per layer) and the task reads it from
there; results are gathered with ``ray.wait`` as they finish, so one slow layer does not hold back the progress
bar and one failing layer (an error in its outcome, or a task that died) is reported without losing the others.
The compressed model is assembled exactly as :func:`pipeline.compress.compress_model` does.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Mapping, Sequence

import ray
import torch
from torch import nn
from tqdm.auto import tqdm

from pipeline.compress import LayerOutcome, check_outcomes, decompose_layer
from pipeline.methods import SolverOptions
from sigma_core import RankRule, count_params, get_module, replace_modules

__all__ = ["DEFAULT_GPU_FRACTION", "ray_compress_model"]

# Four layers share a GPU: per-layer solves are small next to a GPU's memory and rarely saturate it.
DEFAULT_GPU_FRACTION = 0.25


def _decompose(name, module, sigma, rule, method_name, options, device, stat):
    """Task body: ``decompose_layer`` with the module returned on CPU (results cross process boundaries)."""
    torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
    kwargs = {"stat": stat} if stat is not None else {}
    return decompose_layer(name, module, sigma, rule, method_name, options, device, **kwargs)


def ray_compress_model(
    model: nn.Module,
    layer_names: Sequence[str],
    sigmas: Mapping[str, torch.Tensor],
    rule: RankRule,
    method_name: str,
    *,
    options: SolverOptions = SolverOptions(),
    use_gpu: bool = False,
    progress: bool = True,
    gpu_fraction: float = DEFAULT_GPU_FRACTION,
    callback: Callable[[LayerOutcome], None] | None = None,
    stats: Mapping[str, torch.Tensor] | None = None,
    overrides: Mapping[str, tuple[str, RankRule]] | None = None,
    strict: bool = True,
) -> tuple[nn.Module, list[LayerOutcome]]:
    """Decompose every layer in ``layer_names`` as a Ray task; return a compressed copy of ``model``.

    Same contract as :func:`pipeline.compress.compress_model`: outcomes in ``layer_names`` order; a layer that
    fails raises :class:`pipeline.compress.CompressionError` once all tasks finished (``strict=True``) or keeps
    its dense weights with the error in its outcome and a warning (``strict=False``).

    Parameters
    ----------
    model : nn.Module
    layer_names : sequence of str
    sigmas : mapping of str to torch.Tensor
        Per-layer Sigma (missing entries are passed as None, for methods that do not need it).
    rule : RankRule
    method_name : str
    options : SolverOptions
    use_gpu : bool
        Run each task on ``gpu_fraction`` of a GPU when the cluster has GPUs (else CPU, with a warning).
    progress : bool
        tqdm bar over finished layers.
    gpu_fraction : float
        Share of one GPU per task.
    callback : callable, optional
        Called with each outcome as its layer finishes (completion order).
    stats, overrides : mapping, optional
        As in ``compress_model``: per-layer Fisher / activation statistics; per-layer ``(method, rule)``.
    strict : bool
        As in ``compress_model``.

    Returns
    -------
    model : nn.Module
        Compressed copy (the input model is not modified).
    outcomes : list of LayerOutcome
    """
    if not ray.is_initialized():
        ray.init()
    stats, overrides = stats or {}, overrides or {}
    task, device = _task(use_gpu, gpu_fraction)
    modules = {name: get_module(model, name) for name in layer_names}
    refs = {}
    for name in layer_names:
        layer_method, layer_rule = overrides.get(name, (method_name, rule))
        sigma = sigmas.get(name)
        stat = stats.get(name)
        refs[task.remote(name, modules[name], ray.put(sigma) if sigma is not None else None, layer_rule,
                         layer_method, options, device, ray.put(stat) if stat is not None else None)] = name
    outcomes: dict[str, LayerOutcome] = {}
    replacements: dict[str, nn.Module] = {}
    pending = list(refs)
    with tqdm(total=len(pending), desc=f"{method_name} (ray)", unit="layer", disable=not progress,
              leave=False) as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            name = refs[done[0]]
            outcome, new = _result(done[0], name, modules[name], overrides.get(name, (method_name,))[0])
            outcomes[name] = outcome
            if new is not None:
                replacements[name] = new
            if callback is not None:
                callback(outcome)
            bar.update(1)
    ordered = [outcomes[name] for name in layer_names]
    check_outcomes(ordered, strict)
    return replace_modules(model, replacements), ordered


def _task(use_gpu: bool, gpu_fraction: float):
    """The remote function with its resources, and the torch device its body uses."""
    if use_gpu and ray.cluster_resources().get("GPU", 0) > 0:
        return ray.remote(num_cpus=1, num_gpus=gpu_fraction, max_retries=1)(_decompose), "cuda"
    if use_gpu:
        import warnings

        warnings.warn("use_gpu=True but the Ray cluster has no GPU: decomposing on CPU", stacklevel=3)
    # One retry covers a lost node; an out-of-memory kill would only repeat itself.
    return ray.remote(num_cpus=1, max_retries=1)(_decompose), "cpu"


def _result(ref, name: str, module: nn.Module, method_name: str) -> tuple[LayerOutcome, nn.Module | None]:
    """The task's (outcome, replacement), or a failed outcome when the task itself died."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayError as exc:  # worker crash, OOM kill, unpicklable result...
        detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        return LayerOutcome(name, method_name, tuple(module.weight.shape), params_before=count_params(module),
                            error=f"Ray task failed: {detail}"), None

"""Fold inference-mode BatchNorm into the conv or factorized layer that feeds it.

In eval mode ``BN(y) = a * y + c`` per channel with ``a = gamma / sqrt(running_var + eps)`` and
``c = beta - a * running_mean``. When ``y`` is the output of a layer whose last operation is a conv (or linear)
with one output channel per BN channel -- a dense ``nn.Conv2d`` / ``nn.Linear`` or the ``_BIAS_LAYER`` child of a
factorized layer (the last 1x1 of Tucker-2 / CP / low-rank layers) -- then ``BN(y)`` is that same layer with
the last weight's output rows scaled by ``a`` and bias ``a * b + c``. That is exact in exact arithmetic; in floating
point it changes the result only by rounding (the tests check 1e-5 in float32).

The pairs are found by tracing the model with :mod:`torch.fx` (factorized layers as leaves), so only a BN whose
single input is such a layer, and which is that layer's only user, is folded; anything else (a BN after an
add, a layer whose output is also used elsewhere, a BN in training mode or without running statistics) is
left alone and reported with the reason.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import fx, nn

__all__ = ["FoldReport", "fold_batchnorm"]

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d)


@dataclass(frozen=True)
class FoldReport:
    """What :func:`fold_batchnorm` did.

    Attributes
    ----------
    folded : tuple of (str, str)
        ``(layer, batchnorm)`` qualified names; each BN is now an ``nn.Identity``.
    skipped : tuple of (str, str)
        ``(batchnorm, reason)`` for the BNs left in place.
    """

    folded: tuple[tuple[str, str], ...]
    skipped: tuple[tuple[str, str], ...]


class _LeafTracer(fx.Tracer):
    """Treats factorized layers (anything with a ``_BIAS_LAYER``) as leaves, like torch's own layers."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        # Subclasses of torch's layers (e.g. the pruned Conv2d / BatchNorm2d) are leaves too: tracing into them
        # would hit BatchNorm's input-dimension check, which fx cannot follow.
        if isinstance(m, (nn.Conv2d, nn.Linear, *_BN_TYPES)):
            return True
        return bool(getattr(m, "_BIAS_LAYER", "")) or super().is_leaf_module(m, module_qualified_name)


def _last_linear_op(module: nn.Module) -> nn.Conv2d | nn.Linear | None:
    """The child whose output is ``module``'s output (``module`` itself for a dense layer), if foldable."""
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        return module
    name = getattr(module, "_BIAS_LAYER", "")
    last = getattr(module, name, None) if name else None
    return last if isinstance(last, (nn.Conv2d, nn.Linear)) else None


def _bn_reason(bn: nn.Module) -> str | None:
    if bn.training:
        return "BatchNorm is in training mode (call model.eval() first: folding uses the running statistics)"
    if bn.running_mean is None or bn.running_var is None:
        return "BatchNorm has no running statistics (track_running_stats=False)"
    return None


def _fold_into(last: nn.Conv2d | nn.Linear, bn: nn.Module) -> None:
    """Scale ``last``'s output rows and set its bias so that ``last`` then ``bn`` equals the new ``last``."""
    with torch.no_grad():
        var = bn.running_var.to(torch.float64)
        mean = bn.running_mean.to(torch.float64)
        gamma = bn.weight.to(torch.float64) if bn.weight is not None else torch.ones_like(var)
        beta = bn.bias.to(torch.float64) if bn.bias is not None else torch.zeros_like(var)
        scale = gamma / torch.sqrt(var + bn.eps)
        old_bias = last.bias.to(torch.float64) if last.bias is not None else torch.zeros_like(var)
        weight = last.weight.to(torch.float64) * scale.reshape(-1, *([1] * (last.weight.dim() - 1)))
        last.weight.copy_(weight.to(last.weight.dtype))
        new_bias = (scale * old_bias + beta - scale * mean).to(last.weight.dtype)
        if last.bias is None:
            last.bias = nn.Parameter(new_bias)
        else:
            last.bias.copy_(new_bias)


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def fold_batchnorm(model: nn.Module, *, inplace: bool = False) -> tuple[nn.Module, FoldReport]:
    """Fold every foldable eval-mode BatchNorm into the layer before it.

    Parameters
    ----------
    model : nn.Module
        In eval mode (the BN running statistics are what gets folded). Must be traceable by
        :func:`torch.fx.symbolic_trace` with factorized layers as leaves.
    inplace : bool
        Modify ``model`` itself instead of a deep copy.

    Returns
    -------
    (nn.Module, FoldReport)
        The model with each folded BN replaced by ``nn.Identity`` (same module tree otherwise), and the report.

    Raises
    ------
    ValueError
        If the model cannot be traced (the message names torch.fx's complaint).
    """
    target = model if inplace else copy.deepcopy(model)
    try:
        graph = _LeafTracer().trace(target)
    except Exception as exc:  # noqa: BLE001 -- fx raises many types; the caller needs one clear error
        raise ValueError(f"cannot trace the model to find conv -> BatchNorm pairs ({type(exc).__name__}: {exc}); "
                         "BatchNorm folding needs a model that torch.fx.symbolic_trace accepts") from exc
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
    folded: list[tuple[str, str]] = []
    skipped: list[tuple[str, str]] = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(target.get_submodule(node.target), _BN_TYPES):
            continue
        bn_name = str(node.target)
        bn = target.get_submodule(bn_name)
        producer = node.args[0] if node.args else None
        if not isinstance(producer, fx.Node) or producer.op != "call_module":
            skipped.append((bn_name, "its input is not the output of a layer (e.g. an add or a function)"))
            continue
        last = _last_linear_op(target.get_submodule(str(producer.target)))
        reason = _bn_reason(bn)
        if reason is None and last is None:
            reason = f"its input comes from {producer.target!r}, which does not end in a conv or linear layer"
        if reason is None and (calls[str(producer.target)] > 1 or calls[bn_name] > 1):
            reason = f"{producer.target!r} or the BatchNorm is called more than once (shared weights)"
        if reason is None and len(producer.users) != 1:
            reason = f"the output of {producer.target!r} is also used elsewhere"
        if reason is None and (last.weight.shape[0] != bn.num_features):
            reason = f"{producer.target!r} has {last.weight.shape[0]} outputs, the BatchNorm {bn.num_features}"
        if reason is not None:
            skipped.append((bn_name, reason))
            continue
        _fold_into(last, bn)
        _set_submodule(target, bn_name, nn.Identity())
        folded.append((str(producer.target), bn_name))
    return target, FoldReport(tuple(folded), tuple(skipped))

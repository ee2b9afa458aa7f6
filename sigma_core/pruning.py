"""Channel-pruning surgery: find producer -> BatchNorm -> consumer groups by tracing, and remove channels.

:func:`prune_groups` traces the model with ``torch.fx`` (convs, factorized layers, BN and linears as leaves) and a
shape probe, and follows every conv's output through BatchNorm and channel-wise ops (ReLU, dropout, identity,
pooling, flatten) to the layers that read it. A group is prunable when nothing on that path mixes it with other
tensors: a residual ``add`` or a ``cat`` makes it not prunable, and the reason is reported. :func:`prune_channels`
removes output channels from the producer (``nn.Conv2d`` or :class:`NortonConv`), its BatchNorm (weight, bias,
running mean and variance) and every consumer (conv / NortonConv input channels, or the column blocks of a Linear
after Flatten).
"""

from __future__ import annotations

import copy
import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from sigma_core.layers import _FactorizedLayer
from sigma_core.layers_norton import NortonConv, PrunedBatchNorm2d, PrunedConv2d, PrunedLinear, _as_index, _compose
from sigma_core.surgery import get_module

__all__ = ["PruneGroup", "prune_groups", "prune_channels", "kept_count"]

_PASS_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Dropout, nn.Dropout2d, nn.Identity,
                 nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_PASS_FUNCTIONS = (F.relu, torch.relu, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.dropout)
_REASON_FIRST = "first conv: skipped by default (include_first=True to prune it)"


@dataclass(frozen=True)
class PruneGroup:
    """A prunable producer and the modules its output channels reach.

    Attributes
    ----------
    producer : str
        Conv2d or NortonConv whose output channels are removed.
    bn : str or None
        The BatchNorm2d right after it.
    consumers : tuple of (name, kind, block)
        ``kind`` is ``"conv"``, ``"norton"`` or ``"linear"``; ``block`` is the number of Linear input columns per
        channel (H * W at the Flatten), 1 for convs.
    channels : int
        Output channels of the producer.
    """

    producer: str
    bn: str | None
    consumers: tuple[tuple[str, str, int], ...]
    channels: int


class _Tracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d, _FactorizedLayer)):
            return True
        return super().is_leaf_module(m, qualname)


def _is_producer(m: nn.Module) -> bool:
    return isinstance(m, NortonConv) or (isinstance(m, nn.Conv2d) and type(m) in (nn.Conv2d, PrunedConv2d))


def _passes(node: torch.fx.Node, modules: dict) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], _PASS_MODULES)
    if node.op == "call_function":
        return node.target in _PASS_FUNCTIONS
    if node.op == "call_method":
        return node.target in ("relu", "relu_", "contiguous")
    return False


def _is_flatten(node: torch.fx.Node, modules: dict) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], nn.Flatten)
    if node.op == "call_function":
        return node.target is torch.flatten
    return node.op == "call_method" and node.target in ("flatten", "view", "reshape")


def _describe(node: torch.fx.Node, modules: dict) -> str:
    if node.op == "call_module":
        return f"{type(modules[node.target]).__name__} {node.target}"
    target = getattr(node.target, "__name__", str(node.target))
    return f"{target} at node {node.name}"


def _why_not(node: torch.fx.Node, modules: dict) -> str:
    t = node.target
    if node.op == "call_function" and t in (operator.add, torch.add, operator.iadd):
        return f"residual add ({_describe(node, modules)}): its channels are tied to another branch"
    if node.op == "call_method" and t in ("add", "add_"):
        return f"residual add ({_describe(node, modules)}): its channels are tied to another branch"
    if node.op == "call_function" and t in (torch.cat, torch.concat):
        return f"concatenation ({_describe(node, modules)}): channel positions shift in the output"
    if node.op == "output":
        return "reaches the model output directly"
    return f"reaches {_describe(node, modules)}, which pruning surgery does not handle"


def prune_groups(model: nn.Module, example_input: torch.Tensor, include_first: bool = False
                 ) -> tuple[list[PruneGroup], dict[str, str]]:
    """Prunable producer -> BN -> consumer groups of ``model`` by tracing, and why the other convs are not.

    Parameters
    ----------
    model : nn.Module
        Traceable by ``torch.fx`` (no data-dependent control flow).
    example_input : torch.Tensor
        A batch for the shape probe (e.g. ``torch.zeros(1, 1, 28, 28)``).
    include_first : bool
        Also offer the first conv (skipped by default, like ``plan_layers``).

    Returns
    -------
    groups : list of PruneGroup
        In module order.
    not_prunable : dict of str to str
        Producer name -> reason (residual add, concatenation, grouped conv, first conv, ...).
    """
    graph_module = torch.fx.GraphModule(model, _Tracer().trace(model))
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            ShapeProp(graph_module).propagate(example_input)
    finally:
        for m, mode in modes.items():
            m.training = mode
    modules = dict(model.named_modules())
    groups, reasons = [], {}
    first = True
    for node in graph_module.graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], (nn.Conv2d, NortonConv)):
            continue
        name, mod = node.target, modules[node.target]
        is_first, first = first, False
        if isinstance(mod, nn.Conv2d) and mod.groups != 1:
            reasons[name] = f"grouped conv (groups={mod.groups}): its filters do not see all input channels"
            continue
        if not _is_producer(mod):
            reasons[name] = f"{type(mod).__name__} is not a prunable producer (Conv2d or NortonConv)"
            continue
        if is_first and not include_first:
            reasons[name] = _REASON_FIRST
            continue
        group, why = _follow(node, modules)
        if group is None:
            reasons[name] = why
        else:
            groups.append(PruneGroup(name, group[0], tuple(group[1]), _channels(mod)))
    return groups, reasons


def _channels(m: nn.Module) -> int:
    return m.out_channels


def _follow(start: torch.fx.Node, modules: dict):
    """(bn, consumers) reached from ``start`` through channel-wise ops, or (None, reason)."""
    bn = None
    users = list(start.users)
    if len(users) == 1 and users[0].op == "call_module" and isinstance(modules[users[0].target], nn.BatchNorm2d):
        bn = users[0].target
        frontier = list(users[0].users)
    else:
        frontier = users
    consumers: list[tuple[str, str, int]] = []
    seen = set()
    while frontier:
        node = frontier.pop(0)
        if node in seen:
            continue
        seen.add(node)
        if _passes(node, modules):
            frontier.extend(node.users)
            continue
        if _is_flatten(node, modules):
            shape = node.args[0].meta["tensor_meta"].shape if isinstance(node.args[0], torch.fx.Node) else None
            if shape is None or len(shape) != 4:
                return None, f"flatten of a non-4-D tensor at {node.name}"
            block = int(shape[2] * shape[3])
            for user in node.users:
                inner = user
                while _passes(inner, modules) and len(inner.users) == 1:
                    inner = next(iter(inner.users))
                if inner.op == "call_module" and isinstance(modules[inner.target], nn.Linear):
                    consumers.append((inner.target, "linear", block))
                else:
                    return None, f"flatten output reaches {_describe(inner, modules)}, not a Linear"
            continue
        if node.op == "call_module":
            m = modules[node.target]
            if isinstance(m, NortonConv):
                consumers.append((node.target, "norton", 1))
                continue
            if isinstance(m, nn.Conv2d):
                if m.groups != 1:
                    return None, f"consumer {node.target} is a grouped conv (groups={m.groups})"
                consumers.append((node.target, "conv", 1))
                continue
            if isinstance(m, nn.Linear):
                consumers.append((node.target, "linear", 1))
                continue
        return None, _why_not(node, modules)
    if not consumers:
        return None, "no consumer found"
    return (bn, consumers), ""


def kept_count(channels: int, rate: float) -> int:
    """Channels kept at prune rate ``rate``: ``floor(T (1 - rate))`` (the public code's ``int(T (1 - rate))``).

    Raises
    ------
    ValueError
        ``rate`` outside [0, 1), or a rate that leaves no channel.
    """
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not (0 <= rate < 1):
        raise ValueError(f"prune rate must be a fraction of channels removed in [0, 1), got {rate!r}")
    keep = math.floor(channels * (1 - rate) + 1e-9)
    if keep < 1:
        raise ValueError(f"prune rate {rate} leaves no channel of {channels} (floor({channels} * (1 - {rate})) = 0): "
                         f"use a rate below {1 - 1 / channels:.4f}")
    return keep


def _slice_conv(conv: nn.Conv2d, keep_out: torch.Tensor | None, keep_in: torch.Tensor | None) -> PrunedConv2d:
    if conv.groups != 1:
        raise ValueError(f"cannot prune a grouped conv (groups={conv.groups}): its filters see only "
                         f"{conv.in_channels // conv.groups} input channels each")
    old = getattr(conv, "_pruning", None)
    pruning = dict(old or {})
    out_idx = torch.arange(conv.out_channels) if keep_out is None else keep_out
    in_idx = torch.arange(conv.in_channels) if keep_in is None else keep_in
    if keep_out is not None:
        pruning["out"] = _compose(old, "out", conv.out_channels, keep_out)
    if keep_in is not None:
        pruning["in"] = _compose(old, "in", conv.in_channels, keep_in)
    w = conv.weight
    new = PrunedConv2d(len(in_idx), len(out_idx), conv.kernel_size, conv.stride, conv.padding, conv.dilation, 1,
                       conv.padding_mode, conv.bias is not None, {k: (v if k == "block" else [v[0], list(v[1])])
                                                                  for k, v in pruning.items()},
                       device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w[out_idx][:, in_idx])
        if conv.bias is not None:
            new.bias.copy_(conv.bias[out_idx])
    return new.train(conv.training)


def _slice_bn(bn: nn.BatchNorm2d, keep: torch.Tensor) -> PrunedBatchNorm2d:
    old = getattr(bn, "_pruning", None)
    orig, kept = _compose(old, "out", bn.num_features, keep)
    ref = bn.weight if bn.weight is not None else bn.running_mean
    new = PrunedBatchNorm2d(len(keep), bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                            {"out": [orig, kept]}, device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        if bn.affine:
            new.weight.copy_(bn.weight[keep])
            new.bias.copy_(bn.bias[keep])
        if bn.track_running_stats:
            new.running_mean.copy_(bn.running_mean[keep])
            new.running_var.copy_(bn.running_var[keep])
            new.num_batches_tracked.copy_(bn.num_batches_tracked)
    return new.train(bn.training)


def _slice_linear(linear: nn.Linear, keep: torch.Tensor, block: int) -> PrunedLinear:
    channels = linear.in_features // block
    if channels * block != linear.in_features:
        raise ValueError(f"Linear with {linear.in_features} inputs is not {block}-column blocks per channel")
    old = getattr(linear, "_pruning", None)
    cols = (keep[:, None] * block + torch.arange(block)[None, :]).reshape(-1)
    orig, kept = _compose(old, "in", channels, keep)
    w = linear.weight
    new = PrunedLinear(len(cols), linear.out_features, linear.bias is not None,
                       {"in": [orig, kept], "block": block}, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w[:, cols])
        if linear.bias is not None:
            new.bias.copy_(linear.bias)
    return new.train(linear.training)


def prune_channels(model: nn.Module, group: PruneGroup, keep: Sequence[int] | torch.Tensor) -> nn.Module:
    """Deep copy of ``model`` with only the output channels ``keep`` of ``group.producer``.

    The producer (Conv2d -> :class:`PrunedConv2d`, NortonConv -> ``NortonConv.pruned``), its BatchNorm (all four
    buffers) and every consumer (input channels; a Linear loses its column blocks) are sliced; ``keep`` is sorted.

    Raises
    ------
    ValueError
        ``keep`` empty, out of range or with duplicates; a grouped conv on the path.
    """
    idx = _as_index(keep, group.channels, "keep")
    repl: dict[str, nn.Module] = {}
    prod = get_module(model, group.producer)
    if isinstance(prod, NortonConv):
        repl[group.producer] = prod.pruned(keep_out=idx)
    elif isinstance(prod, nn.Conv2d):
        repl[group.producer] = _slice_conv(prod, idx, None)
    else:
        raise ValueError(f"producer {group.producer} is a {type(prod).__name__}: prune a Conv2d or NortonConv")
    if group.bn is not None:
        repl[group.bn] = _slice_bn(get_module(model, group.bn), idx)
    for name, kind, block in group.consumers:
        mod = get_module(model, name)
        if kind == "norton":
            repl[name] = mod.pruned(keep_in=idx)
        elif kind == "conv":
            repl[name] = _slice_conv(mod, None, idx)
        else:
            repl[name] = _slice_linear(mod, idx, block)
    result = copy.deepcopy(model)
    for name, new in repl.items():
        parent, _, child = name.rpartition(".")
        setattr(result.get_submodule(parent), child, new)
    return result

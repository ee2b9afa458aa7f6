"""Choosing layers to factorize, swapping modules by name, and counting parameters / MACs."""

from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass
from typing import Iterable, Literal

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = [
    "LayerChoice",
    "plan_layers",
    "get_module",
    "replace_modules",
    "count_params",
    "count_macs",
    "compression_rate",
]

_REASON_FIRST = "first conv: S*H*W is tiny (e.g. 1*3*3=9), little to gain and the input layer is the most sensitive"
_REASON_1X1 = "1x1 conv: Tucker-2 reduces to a low-rank matrix, use SVD"
_REASON_LINEAR = "linear layer: left dense (an SVD method factorizes linear layers, e.g. --linear-method svd-sigma)"
_REASON_NOT_NAMED = "not in the requested names"
_REASON_NAMED = "requested by name"
_REASON_SELECTED = "selected"


@dataclass(frozen=True)
class LayerChoice:
    """Whether one Conv2d / Linear layer of a model is to be factorized, and why.

    Attributes
    ----------
    name : str
        Dotted module name (as in ``model.named_modules()``).
    kind : {"conv", "linear"}
        ``"conv"`` for ``nn.Conv2d``, ``"linear"`` for ``nn.Linear``.
    selected : bool
        Whether the layer is to be factorized.
    reason : str
        Why it is (or is not) selected.
    weight_shape : tuple of int
        (T, S/groups, H, W) for a conv, (out, in) for a linear layer.
    """

    name: str
    kind: Literal["conv", "linear"]
    selected: bool
    reason: str
    weight_shape: tuple[int, ...]


def _grouped_reason(groups: int) -> str:
    return f"grouped conv (groups={groups}): Tucker-2/CP over channels does not apply"


def _candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def _is_1x1(conv: nn.Conv2d) -> bool:
    return tuple(conv.kernel_size) == (1, 1)


def _default_choice(name: str, module: nn.Module, is_first_conv: bool, include_first_conv: bool,
                    include_1x1: bool, include_linear: bool) -> LayerChoice:
    shape = tuple(module.weight.shape)
    if isinstance(module, nn.Linear):
        reason = _REASON_SELECTED if include_linear else _REASON_LINEAR
        return LayerChoice(name, "linear", include_linear, reason, shape)
    if is_first_conv and not include_first_conv:
        return LayerChoice(name, "conv", False, _REASON_FIRST, shape)
    if module.groups != 1:
        return LayerChoice(name, "conv", False, _grouped_reason(module.groups), shape)
    if _is_1x1(module) and not include_1x1:
        return LayerChoice(name, "conv", False, _REASON_1X1, shape)
    return LayerChoice(name, "conv", True, _REASON_SELECTED, shape)


def plan_layers(model: nn.Module, include_first_conv: bool = False, include_1x1: bool = False,
                include_linear: bool = False, names: Iterable[str] | None = None) -> list[LayerChoice]:
    """List every ``nn.Conv2d`` and ``nn.Linear`` of ``model`` in module order, with a selection decision.

    Parameters
    ----------
    model : nn.Module
        Model to inspect (not modified).
    include_first_conv : bool
        Select the first conv too (by default skipped: few input channels, most sensitive layer).
    include_1x1 : bool
        Select 1x1 convs (by default skipped: they are matrices, factorized by SVD rather than Tucker-2).
    include_linear : bool
        Select linear layers.
    names : iterable of str, optional
        Select exactly these layers (the flags are then ignored). Each must name an ``nn.Conv2d``
        (with ``groups == 1``) or an ``nn.Linear`` of the model.

    Returns
    -------
    list of LayerChoice
        One entry per Conv2d / Linear, in ``named_modules()`` order. Grouped / depthwise convs are never
        selected by the default rules.

    Raises
    ------
    ValueError
        A requested name does not exist (close matches are listed), is not a Conv2d / Linear, or is a
        grouped conv.
    """
    candidates = _candidates(model)
    if names is not None:
        return _plan_named(model, candidates, list(names))
    first_conv = next((n for n, m in candidates if isinstance(m, nn.Conv2d)), None)
    return [_default_choice(n, m, n == first_conv, include_first_conv, include_1x1, include_linear)
            for n, m in candidates]


def _plan_named(model: nn.Module, candidates: list[tuple[str, nn.Module]], names: list[str]) -> list[LayerChoice]:
    wanted = set(names)
    for name in names:
        module = get_module(model, name)
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            raise ValueError(f"layer {name!r} is a {type(module).__name__}, not an nn.Conv2d or nn.Linear; "
                             f"name a conv or linear layer instead")
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            raise ValueError(f"layer {name!r} is a {_grouped_reason(module.groups)}; remove it from names")
    present = {n for n, _ in candidates}
    missing = wanted - present
    if missing:
        # A module registered under two names appears once in named_modules(); ask for the listed name.
        raise ValueError(f"layers {sorted(missing)} are shared with another name; use the names "
                         f"{sorted(present & _aliases(model, missing))} instead")
    choices = []
    for name, module in candidates:
        kind = "linear" if isinstance(module, nn.Linear) else "conv"
        selected = name in wanted
        reason = _REASON_NAMED if selected else _REASON_NOT_NAMED
        choices.append(LayerChoice(name, kind, selected, reason, tuple(module.weight.shape)))
    return choices


def _aliases(model: nn.Module, names: set[str]) -> set[str]:
    targets = {id(get_module(model, n)) for n in names}
    return {n for n, m in model.named_modules(remove_duplicate=False) if id(m) in targets}


def get_module(model: nn.Module, name: str) -> nn.Module:
    """Submodule of ``model`` by dotted name (``""`` is the model itself).

    Raises
    ------
    ValueError
        No such submodule; the message lists close matches among the model's module names.
    """
    if not isinstance(name, str):
        raise ValueError(f"module name must be a str, got {name!r}")
    try:
        return model.get_submodule(name)
    except AttributeError:
        known = [n for n, _ in model.named_modules(remove_duplicate=False) if n]
        close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
        hint = f"; close matches: {close}" if close else f"; the model has {len(known)} named modules"
        raise ValueError(f"no module named {name!r} in {type(model).__name__}{hint}") from None


def replace_modules(model: nn.Module, replacements: dict[str, nn.Module]) -> nn.Module:
    """Deep copy of ``model`` with the named submodules swapped; ``model`` itself is left untouched.

    Parameters
    ----------
    model : nn.Module
        Original model.
    replacements : dict of str to nn.Module
        Dotted name -> new module. The new modules are inserted as given (not copied).

    Returns
    -------
    nn.Module
        The modified copy.

    Raises
    ------
    ValueError
        A name does not exist in ``model`` (close matches listed), is ``""``, lies inside another replaced
        module, or the value is not an nn.Module.
    """
    for name, new in replacements.items():
        if name == "":
            raise ValueError("cannot replace the root module (name ''); use the new module directly")
        get_module(model, name)
        if not isinstance(new, nn.Module):
            raise ValueError(f"replacement for {name!r} must be an nn.Module, got {type(new).__name__}")
    nested = sorted(n for n in replacements for m in replacements if m.startswith(n + "."))
    if nested:
        # The outcome would depend on the order of the swaps; the inner replacement would be lost or misplaced.
        raise ValueError(f"replacements {nested} contain other replaced modules; replace either the parent "
                         f"or its children, not both")
    result = copy.deepcopy(model)
    for name, new in replacements.items():
        parent_name, _, child = name.rpartition(".")
        setattr(result.get_submodule(parent_name), child, new)
    return result


def count_params(model: nn.Module) -> int:
    """Number of parameters of ``model`` (each shared parameter counted once, frozen ones included)."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_shape: tuple[int, ...], device: torch.device | str = "cpu") -> int:
    """Multiply-accumulates of one forward pass, from ``torch.utils.flop_counter.FlopCounterMode``.

    Parameters
    ----------
    model : nn.Module
        Model, already on ``device``. Run in eval mode; every module's training flag is restored after.
    input_shape : tuple of int
        Full input shape including the batch dimension, e.g. ``(1, 3, 224, 224)`` for per-image MACs.
    device : torch.device or str
        Device of the all-zeros input.

    Returns
    -------
    int
        FLOPs / 2 as counted by PyTorch (convs, matmuls; bias adds, norms and activations are not counted).
    """
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    x = torch.zeros(tuple(input_shape), device=device, dtype=dtype)
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        for module, training in modes.items():
            module.training = training
    return int(counter.get_total_flops()) // 2


def compression_rate(original: nn.Module, compressed: nn.Module) -> float:
    """``params(original) / params(compressed)`` (paper's compression rate)."""
    n_compressed = count_params(compressed)
    if n_compressed == 0:
        raise ValueError("the compressed model has no parameters; cannot compute a compression rate")
    return count_params(original) / n_compressed

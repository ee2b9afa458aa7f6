"""NORTON's filter-CP layer and the channel-pruned plain layers, all rebuildable from their ``spec()``.

``NortonConv`` (NORTON's "CPDBlock", paper eqs. 4-7) replaces a dense conv whose every filter is its own rank-R CP
by exactly three convs, filter-major channels ``c = t R + r``::

    in_proj : Conv2d(S, T R, 1, bias=False)                          weight[t R + r, s] = C_t[s, r]      (eq. 4)
    depth_h : Conv2d(T R, T R, (K_h, 1), groups=T R)                   weight[t R + r, 0, m, 0] = A_t[m, r] (eq. 6)
    depth_w : Conv2d(T R, T, (1, K_w), groups=T, bias=<orig bias>)      weight[t, r, 0, n] = B_t[n, r]     (eqs. 5, 7)

The grouped ``depth_w`` fuses the sum over the R channels of each filter (eq. 7) into the conv, so FLOP counters
and ONNX see only convs, and pruning filter t removes one contiguous block of channels. The public code's
rank-major layout plus ``view(N, R, T, ...).sum(1)`` computes the same function (tested).

``PrunedConv2d``, ``PrunedBatchNorm2d`` and ``PrunedLinear`` are plain layers whose channels were removed by
pruning surgery; they record the kept indices (provenance, checked against their own sizes) in their spec so that
``load_compressed`` rebuilds a pruned model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Self

import torch
from torch import nn

from sigma_core.decompose._filter_result import FilterCPResult
from sigma_core.layers import _check_kernel_source, _check_rank, _FactorizedLayer, _to_json

__all__ = ["NortonConv", "PrunedConv2d", "PrunedBatchNorm2d", "PrunedLinear", "check_pruning"]


def check_pruning(pruning: dict | None, sizes: dict[str, int], owner: str) -> dict | None:
    """Validate a provenance record ``{"out": (orig, kept), "in": (orig, kept)}`` against the layer's sizes.

    ``sizes`` maps ``"out"``/``"in"`` to the layer's current channel count (for a Linear, ``"in"`` counts kept
    channel blocks times the block). Raises ``ValueError`` naming the entry when the kept indices do not fit.
    """
    if pruning is None:
        return None
    if not isinstance(pruning, dict):
        raise ValueError(f"{owner}: pruning must be a dict or None, got {type(pruning).__name__}")
    out: dict[str, Any] = {}
    for side, value in pruning.items():
        if side == "block":
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{owner}: pruning block must be an int >= 1, got {value!r}")
            out[side] = int(value)
            continue
        if side not in sizes:
            raise ValueError(f"{owner}: unknown pruning entry {side!r}; expected {sorted(sizes)} (+ 'block')")
        try:
            orig, kept = int(value[0]), [int(i) for i in value[1]]
        except (TypeError, ValueError, IndexError):
            raise ValueError(f"{owner}: pruning[{side!r}] must be [original_size, kept_indices], got {value!r}") from None
        block = int(pruning.get("block", 1)) if side == "in" else 1
        if len(kept) * block != sizes[side] or len(set(kept)) != len(kept) or sorted(kept) != kept \
                or (kept and (kept[0] < 0 or kept[-1] >= orig)):
            raise ValueError(f"{owner}: pruning[{side!r}] keeps {len(kept)} indices of {orig} (block {block}) but "
                             f"the layer has {sizes[side]} {side}put channels/features, or the indices are not "
                             f"sorted, unique and in [0, {orig}): the spec does not fit the weights")
        out[side] = (orig, kept)
    return out


def _pruning_json(pruning: dict | None) -> dict | None:
    if pruning is None:
        return None
    return {k: (v if k == "block" else [v[0], list(v[1])]) for k, v in pruning.items()}


def _compose(old: dict | None, side: str, orig_now: int, keep: torch.Tensor) -> tuple[int, list[int]]:
    """Provenance after keeping ``keep`` of the current ``orig_now`` channels, composed with an earlier pruning."""
    if old is not None and side in old:
        orig, prev = old[side]
        return orig, [prev[i] for i in keep.tolist()]
    return orig_now, keep.tolist()


def _as_index(keep, size: int, name: str) -> torch.Tensor:
    idx = torch.as_tensor(list(keep) if not isinstance(keep, torch.Tensor) else keep, dtype=torch.long).reshape(-1)
    if idx.numel() == 0:
        raise ValueError(f"{name} is empty: pruning must keep at least one of the {size} channels")
    if int(idx.min()) < 0 or int(idx.max()) >= size or torch.unique(idx).numel() != idx.numel():
        raise ValueError(f"{name} must be unique indices in [0, {size}), got {idx.tolist()}")
    return torch.sort(idx).values


class NortonConv(_FactorizedLayer):
    """Filter-CP factorized conv of NORTON (the CPDBlock, paper eqs. 4-7), three convs with the sum fused in.

    Equals the dense conv with kernel ``K~[t,s,h,w] = sum_r C_t[s,r] A_t[h,r] B_t[w,r]`` for every stride,
    padding (ints, pairs, ``"same"``/``"valid"``), dilation, padding mode and bias, by the argument of
    :class:`sigma_core.layers.CPConv` (height geometry on ``depth_h``, width geometry on ``depth_w``; the
    bias-free 1x1 commutes with padding).

    Parameters
    ----------
    in_channels, out_channels : int
        ``S`` and ``T``.
    kernel_size : int or (int, int)
    rank : int
        Per-filter CP rank ``R``.
    stride, padding, dilation, padding_mode, bias, device, dtype
        As in :class:`torch.nn.Conv2d`.
    pruning : dict or None
        Provenance of pruned channels (``{"out": [T_orig, kept], "in": [S_orig, kept]}``), checked against the sizes.

    Attributes
    ----------
    in_proj : nn.Conv2d  (T R, S, 1, 1)
    depth_h : nn.Conv2d  (T R, 1, K_h, 1), groups T R
    depth_w : nn.Conv2d  (T, R, 1, K_w), groups T; carries the bias
    """

    _SPEC_FIELDS = ("in_channels", "out_channels", "kernel_size", "rank", "stride", "padding", "dilation",
                    "padding_mode", "pruning")
    _BIAS_LAYER = "depth_w"

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int], rank: int,
                 stride: int | tuple[int, int] = 1, padding: int | str | tuple[int, int] = 0,
                 dilation: int | tuple[int, int] = 1, padding_mode: str = "zeros", bias: bool = True,
                 pruning: dict | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        rank = _check_rank(rank)
        self._set_conv_geometry(in_channels, out_channels, kernel_size, stride, padding, dilation, padding_mode)
        if self.in_channels < 1 or self.out_channels < 1:
            raise ValueError(f"in_channels and out_channels must be >= 1, got {in_channels}, {out_channels}")
        self.rank = rank
        self._pruning = check_pruning(pruning, {"out": self.out_channels, "in": self.in_channels}, "NortonConv")
        t, tr = self.out_channels, self.out_channels * rank
        (k_h, k_w), (s_h, s_w), (d_h, d_w) = self.kernel_size, self.stride, self.dilation
        pad_h, pad_w = (self.padding, self.padding) if isinstance(self.padding, str) else \
            ((self.padding[0], 0), (0, self.padding[1]))
        factory = {"device": device, "dtype": dtype}
        self.in_proj = nn.Conv2d(self.in_channels, tr, 1, bias=False, **factory)
        self.depth_h = nn.Conv2d(tr, tr, (k_h, 1), stride=(s_h, 1), padding=pad_h, dilation=(d_h, 1), groups=tr,
                                 padding_mode=padding_mode, bias=False, **factory)
        self.depth_w = nn.Conv2d(tr, t, (1, k_w), stride=(1, s_w), padding=pad_w, dilation=(1, d_w), groups=t,
                                 padding_mode=padding_mode, bias=bias, **factory)

    @property
    def pruning(self) -> dict | None:
        return _pruning_json(self._pruning)

    @classmethod
    def from_result(cls, conv: nn.Conv2d, result: FilterCPResult) -> "NortonConv":
        """Build the replacement of ``conv`` (groups 1, weight (T, S, H, W)) from a :class:`FilterCPResult`.

        Geometry, bias, device, dtype and training mode come from ``conv``; the factors are cast to its dtype.
        """
        _check_kernel_source(cls, conv, result, FilterCPResult, "a per-filter CP over (S, H, W)")
        t, s, h, w = result.kernel_shape
        r = result.rank
        module = cls.empty(conv.in_channels, conv.out_channels, conv.kernel_size, r, **cls._conv_kwargs(conv))
        c, a, b = result.factors
        return module._fill(conv, [
            (module.in_proj.weight, c.permute(0, 2, 1).reshape(t * r, s)[:, :, None, None]),
            (module.depth_h.weight, a.permute(0, 2, 1).reshape(t * r, h)[:, None, :, None]),
            (module.depth_w.weight, b.permute(0, 2, 1)[:, :, None, :]),
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (B, S, H_in, W_in) -> (B, T, H_out, W_out)."""
        return self.depth_w(self.depth_h(self.in_proj(x)))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(U_S, U_H, U_W)`` = (C, A, B) stacks (T, S, R), (T, H, R), (T, W, R) read from the current weights."""
        t, r = self.out_channels, self.rank
        c = self.in_proj.weight[:, :, 0, 0].reshape(t, r, self.in_channels).permute(0, 2, 1)
        a = self.depth_h.weight[:, 0, :, 0].reshape(t, r, -1).permute(0, 2, 1)
        b = self.depth_w.weight[:, :, 0, :].permute(0, 2, 1)
        return c, a, b

    def reconstructed_kernel(self) -> torch.Tensor:
        """Dense kernel ``K~[t,s,h,w] = sum_r C_t[s,r] A_t[h,r] B_t[w,r]``, shape (T, S, H, W)."""
        c, a, b = self.factors()
        return torch.einsum("tsr,thr,twr->tshw", c, a, b)

    def pruned(self, keep_out: Sequence[int] | torch.Tensor | None = None,
               keep_in: Sequence[int] | torch.Tensor | None = None) -> "NortonConv":
        """A new NortonConv with only the output filters ``keep_out`` and input channels ``keep_in`` (sorted)."""
        t, r = self.out_channels, self.rank
        out_idx = _as_index(range(t) if keep_out is None else keep_out, t, "keep_out")
        in_idx = _as_index(range(self.in_channels) if keep_in is None else keep_in, self.in_channels, "keep_in")
        pruning = dict(self._pruning or {})
        if keep_out is not None:
            pruning["out"] = _compose(self._pruning, "out", t, out_idx)
        if keep_in is not None:
            pruning["in"] = _compose(self._pruning, "in", self.in_channels, in_idx)
        w = self.in_proj.weight
        new = type(self).empty(len(in_idx), len(out_idx), self.kernel_size, r, stride=self.stride,
                               padding=self.padding, dilation=self.dilation, padding_mode=self.padding_mode,
                               bias=self.depth_w.bias is not None, pruning=_pruning_json(pruning) or None,
                               device=w.device, dtype=w.dtype)
        rows = (out_idx[:, None] * r + torch.arange(r)[None, :]).reshape(-1).to(w.device)
        with torch.no_grad():
            new.in_proj.weight.copy_(self.in_proj.weight[rows][:, in_idx.to(w.device)])
            new.depth_h.weight.copy_(self.depth_h.weight[rows])
            new.depth_w.weight.copy_(self.depth_w.weight[out_idx.to(w.device)])
            if self.depth_w.bias is not None:
                new.depth_w.bias.copy_(self.depth_w.bias[out_idx.to(w.device)])
        return new.train(self.training)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, rank={self.rank}, "
                f"stride={self.stride}")


class _PrunedMixin:
    """``spec()`` / ``empty()`` for a plain torch layer subclass (constructor arguments in ``_SPEC_FIELDS``)."""

    _SPEC_FIELDS: tuple[str, ...] = ()

    @classmethod
    def empty(cls, *args: Any, **kwargs: Any) -> Self:
        return cls(*args, **kwargs)

    def spec(self) -> dict[str, Any]:
        spec: dict[str, Any] = {"type": type(self).__name__}
        spec.update((name, _to_json(getattr(self, name))) for name in self._SPEC_FIELDS)
        spec["pruning"] = _pruning_json(self._pruning)
        return spec


class PrunedConv2d(_PrunedMixin, nn.Conv2d):
    """``nn.Conv2d`` with removed output and/or input channels; ``pruning`` records which were kept."""

    _SPEC_FIELDS = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                    "padding_mode", "has_bias")

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, padding_mode: str = "zeros", has_bias: bool = True, pruning: dict | None = None,
                 device=None, dtype=None) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding, dilation=dilation,
                         groups=groups, bias=has_bias, padding_mode=padding_mode, device=device, dtype=dtype)
        self.has_bias = bool(has_bias)
        self._pruning = check_pruning(pruning, {"out": out_channels, "in": in_channels}, "PrunedConv2d")


class PrunedBatchNorm2d(_PrunedMixin, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` over the kept channels (weight, bias, running mean/var copied by the surgery)."""

    _SPEC_FIELDS = ("num_features", "eps", "momentum", "affine", "track_running_stats")

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, pruning: dict | None = None, device=None, dtype=None) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats, device=device, dtype=dtype)
        self._pruning = check_pruning(pruning, {"out": num_features}, "PrunedBatchNorm2d")


class PrunedLinear(_PrunedMixin, nn.Linear):
    """``nn.Linear`` whose input columns were removed in blocks of ``pruning["block"]`` per kept channel."""

    _SPEC_FIELDS = ("in_features", "out_features", "has_bias")

    def __init__(self, in_features: int, out_features: int, has_bias: bool = True, pruning: dict | None = None,
                 device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias=has_bias, device=device, dtype=dtype)
        self.has_bias = bool(has_bias)
        self._pruning = check_pruning(pruning, {"out": out_features, "in": in_features}, "PrunedLinear")


# Registered in ``sigma_core.layers._spec_types`` so that ``module_from_spec`` / ``load_compressed`` rebuild them.
SPEC_TYPES = (NortonConv, PrunedConv2d, PrunedBatchNorm2d, PrunedLinear)

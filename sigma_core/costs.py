"""Exact parameter and MAC counts of a layer before and after factorization, from its geometry alone.

The budgeted allocation (:mod:`sigma_core.allocate`) prices every candidate rank of every layer without building
the layer. The formulas below are those of the layers in :mod:`sigma_core.layers` (tested against
``count_params`` / ``count_macs`` of the built modules); MACs follow ``torch.utils.flop_counter`` (conv and matmul
multiply-accumulates; bias adds, norms and activations are not counted).

Per family, with input grid ``(H_i, W_i)``, output grid ``(H_o, W_o)``, kernel ``(T, S, kh, kw)`` and bias ``b``
(``T`` if the original layer has one, else 0):

=========  ==========================================  ======================================================
family     parameters                                  MACs per image
=========  ==========================================  ======================================================
dense      ``T S kh kw + b``                           ``T S kh kw H_o W_o``
tucker2    ``S R_S + R_T R_S kh kw + T R_T + b``       ``S R_S H_i W_i + R_T R_S kh kw H_o W_o + T R_T H_o W_o``
cp         ``R (S + kh + kw + T) + b``                 ``R (S H_i W_i + kh H_o W_i + kw H_o W_o + T H_o W_o)``
svd        ``r (S + T) + b``                           ``r (S + T) H_o W_o`` (1x1 conv; linear: ``H_o W_o`` = 1)
=========  ==========================================  ======================================================

Tucker-2 and CP project channels at the *input* resolution (their first 1x1 conv has stride 1); the CP height
filter keeps the input width. A linear layer applied to ``(..., in)`` inputs counts each leading position.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

__all__ = ["LayerGeometry", "layer_geometry", "dense_cost", "factorized_cost", "FAMILY_COSTS", "METRICS"]

METRICS = ("params", "macs")


@dataclass(frozen=True)
class LayerGeometry:
    """What the cost formulas need to know about one conv / linear layer.

    Attributes
    ----------
    kind : {"conv", "linear"}
    weight_shape : tuple of int
        ``(T, S, kh, kw)`` for a conv, ``(out, in)`` for a linear layer.
    in_hw : (int, int)
        Input grid of a conv; for a linear layer ``(positions, 1)``: how many input vectors one image feeds it.
    out_hw : (int, int)
        Output grid of a conv (``(positions, 1)`` for a linear layer).
    bias : bool
    """

    kind: str
    weight_shape: tuple[int, ...]
    in_hw: tuple[int, int]
    out_hw: tuple[int, int]
    bias: bool

    def __post_init__(self) -> None:
        if self.kind not in ("conv", "linear"):
            raise ValueError(f"kind must be 'conv' or 'linear', got {self.kind!r}")
        want = 4 if self.kind == "conv" else 2
        if len(self.weight_shape) != want or not all(int(d) >= 1 for d in self.weight_shape):
            raise ValueError(f"a {self.kind} layer needs a weight shape of {want} positive ints, "
                             f"got {self.weight_shape!r}")
        for label, hw in (("in_hw", self.in_hw), ("out_hw", self.out_hw)):
            if len(hw) != 2 or not all(int(d) >= 1 for d in hw):
                raise ValueError(f"{label} must be two positive ints, got {hw!r}")

    @property
    def channels(self) -> tuple[int, int]:
        """``(T, S)``: output and input channels (features)."""
        return int(self.weight_shape[0]), int(self.weight_shape[1])

    @property
    def kernel(self) -> tuple[int, int]:
        """``(kh, kw)`` (``(1, 1)`` for a linear layer)."""
        return (int(self.weight_shape[2]), int(self.weight_shape[3])) if self.kind == "conv" else (1, 1)


def _out_size(size: int, pad: int, kernel: int, stride: int, dilation: int) -> int:
    return (size + pad - dilation * (kernel - 1) - 1) // stride + 1


def layer_geometry(module: nn.Module, input_shape: Sequence[int]) -> LayerGeometry:
    """Geometry of ``module`` for one input of shape ``input_shape`` (without the batch dimension).

    Parameters
    ----------
    module : nn.Conv2d (groups=1) or nn.Linear
    input_shape : sequence of int
        ``(S, H_i, W_i)`` for a conv, ``(..., in)`` for a linear layer (as seen in a forward pass).
    """
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            raise ValueError(f"grouped conv (groups={module.groups}): no factorized cost formula applies")
        if len(input_shape) != 3 or int(input_shape[0]) != module.in_channels:
            raise ValueError(f"conv input shape must be (S={module.in_channels}, H, W), got {tuple(input_shape)}")
        from sigma_core.covariance import _conv_pads

        left, right, top, bottom = _conv_pads(module)
        h_i, w_i = int(input_shape[1]), int(input_shape[2])
        (kh, kw), (sh, sw), (dh, dw) = module.kernel_size, module.stride, module.dilation
        out_hw = (_out_size(h_i, top + bottom, kh, sh, dh), _out_size(w_i, left + right, kw, sw, dw))
        return LayerGeometry("conv", tuple(module.weight.shape), (h_i, w_i), out_hw, module.bias is not None)
    if isinstance(module, nn.Linear):
        if not input_shape or int(input_shape[-1]) != module.in_features:
            raise ValueError(f"linear input shape must end in in_features={module.in_features}, "
                             f"got {tuple(input_shape)}")
        positions = math.prod(int(d) for d in input_shape[:-1])
        return LayerGeometry("linear", tuple(module.weight.shape), (positions, 1), (positions, 1),
                             module.bias is not None)
    raise TypeError(f"cost formulas exist for nn.Conv2d and nn.Linear, got {type(module).__name__}")


def _check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise ValueError(f"cost metric must be one of {METRICS}, got {metric!r}")
    return metric


def dense_cost(geom: LayerGeometry, metric: str) -> int:
    """Parameters or MACs of the original (dense) layer."""
    t, s = geom.channels
    kh, kw = geom.kernel
    weights = t * s * kh * kw
    if _check_metric(metric) == "params":
        return weights + (t if geom.bias else 0)
    return weights * geom.out_hw[0] * geom.out_hw[1]


def _tucker2(geom: LayerGeometry, ranks: Sequence[int], metric: str) -> int:
    t, s = geom.channels
    kh, kw = geom.kernel
    r_t, r_s = (int(r) for r in ranks)
    if metric == "params":
        return s * r_s + r_t * r_s * kh * kw + t * r_t + (t if geom.bias else 0)
    (hi, wi), (ho, wo) = geom.in_hw, geom.out_hw
    return s * r_s * hi * wi + r_t * r_s * kh * kw * ho * wo + t * r_t * ho * wo


def _cp(geom: LayerGeometry, ranks: Sequence[int], metric: str) -> int:
    t, s = geom.channels
    kh, kw = geom.kernel
    (r,) = (int(x) for x in ranks)
    if metric == "params":
        return r * (s + kh + kw + t) + (t if geom.bias else 0)
    (hi, wi), (ho, wo) = geom.in_hw, geom.out_hw
    return r * (s * hi * wi + kh * ho * wi + kw * ho * wo + t * ho * wo)


def _svd(geom: LayerGeometry, ranks: Sequence[int], metric: str) -> int:
    t, s = geom.channels
    if geom.kernel != (1, 1):
        raise ValueError(f"SVD factorizes linear layers and 1x1 convs, not a {geom.kernel} kernel")
    (r,) = (int(x) for x in ranks)
    if metric == "params":
        return r * (s + t) + (t if geom.bias else 0)
    return r * (s + t) * geom.out_hw[0] * geom.out_hw[1]


# Family -> cost(geometry, ranks, metric). A new rank family (e.g. a NORTON or TT layer) adds its formula here
# with one line, next to its registry Method, and gets budgeted allocation for free.
FAMILY_COSTS: dict[str, Callable[[LayerGeometry, Sequence[int], str], int]] = {
    "tucker2": _tucker2,
    "cp": _cp,
    "svd": _svd,
}


_RANK_LEN = {"tucker2": 2, "cp": 1, "svd": 1}


def factorized_cost(geom: LayerGeometry, family: str, ranks: Sequence[int], metric: str) -> int:
    """Parameters or MACs of the layer of geometry ``geom`` factorized by a ``family`` method at ``ranks``.

    Raises
    ------
    ValueError
        Unknown family (the message lists :data:`FAMILY_COSTS`), metric, or ranks of the wrong length.
    """
    _check_metric(metric)
    try:
        fn = FAMILY_COSTS[family]
    except KeyError:
        raise ValueError(f"no cost formula for rank family {family!r}; known: {sorted(FAMILY_COSTS)} "
                         "(add one to sigma_core.costs.FAMILY_COSTS)") from None
    want = _RANK_LEN.get(family)
    if want is not None and len(tuple(ranks)) != want:
        raise ValueError(f"{family} ranks must have {want} entries, got {tuple(ranks)!r}")
    return int(fn(geom, tuple(ranks), metric))

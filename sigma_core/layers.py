"""Factorized layers built from decomposition results.

``Tucker2Conv`` replaces a dense conv by three convs (Kim et al. 2016; paper Sec. 3.2),
``LowRankLinear`` replaces a dense linear layer by two and ``LowRank1x1Conv`` a 1x1 conv by two
1x1 convs (paper App. E), ``CPConv`` a dense conv by 1x1 -> Hx1 depthwise -> 1xW depthwise -> 1x1
(Lebedev et al. 2015; paper Sec. 3.1). Each is built from the original
layer plus the factors, reproduces the dense layer with the reconstructed weight exactly (up to float
rounding), and can be rebuilt empty from its JSON-able :meth:`spec` before loading a state dict.
"""

from __future__ import annotations

import numbers
from typing import Any, Sequence, Self

import torch
from torch import nn

from sigma_core.decompose._result import CPResult, LowRankResult, Tucker2Result

__all__ = ["Tucker2Conv", "LowRankLinear", "LowRank1x1Conv", "CPConv", "module_from_spec"]

_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _pair(value: int | tuple[int, ...] | list[int], name: str) -> tuple[int, int]:
    if _is_int(value):
        return (int(value), int(value))  # type: ignore[arg-type]
    if not isinstance(value, (tuple, list)):  # bool, float, None: not iterable or not meant as a pair
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    items = tuple(value)
    if len(items) != 2 or not all(_is_int(v) for v in items):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return (int(items[0]), int(items[1]))


def _padding_arg(padding: int | str | tuple[int, ...] | list[int]) -> str | tuple[int, int]:
    if isinstance(padding, str):
        if padding not in ("same", "valid"):
            raise ValueError(f"padding string must be 'same' or 'valid', got {padding!r}")
        return padding
    return _pair(padding, "padding")


def _to_json(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _check_rank(rank: int) -> int:
    if not _is_int(rank) or rank < 1:
        raise ValueError(f"rank must be an int >= 1, got {rank!r}")
    return int(rank)


def _check_result_type(result: object, result_type: type) -> None:
    if not isinstance(result, result_type):
        raise ValueError(f"result must be a {result_type.__name__}, got {type(result).__name__}")


class _FactorizedLayer(nn.Module):
    """Shared machinery of the factorized layers: argument checks, weight filling and the spec round trip.

    A subclass lists its constructor arguments in ``_SPEC_FIELDS`` (signature order, without ``bias`` and the
    allocation arguments; each is stored under the same attribute name) and names the child layer carrying
    the original bias in ``_BIAS_LAYER``. :meth:`spec` writes exactly those arguments, so
    :func:`module_from_spec` can pass them back to :meth:`empty`.
    """

    _SPEC_FIELDS: tuple[str, ...] = ()
    _BIAS_LAYER: str = ""

    @classmethod
    def empty(cls, *args: Any, **kwargs: Any) -> Self:
        """Module with the given structure and arbitrary weights, to be filled by ``load_state_dict``.

        Takes the constructor's arguments (including ``device`` and ``dtype``).
        """
        return cls(*args, **kwargs)

    def spec(self) -> dict[str, Any]:
        """JSON-able constructor arguments plus ``"type"``; see :func:`module_from_spec`."""
        spec: dict[str, Any] = {"type": type(self).__name__}
        spec.update((name, _to_json(getattr(self, name))) for name in self._SPEC_FIELDS)
        spec["bias"] = getattr(self, self._BIAS_LAYER).bias is not None
        return spec

    def _set_conv_geometry(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int] | None,
                           stride: int | tuple[int, int], padding: int | str | tuple[int, int],
                           dilation: int | tuple[int, int], padding_mode: str) -> None:
        """Check and store the channels and geometry of the original conv (``kernel_size=None``: fixed 1x1)."""
        if padding_mode not in _PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {_PADDING_MODES}, got {padding_mode!r}")
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        if kernel_size is not None:
            self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride = _pair(stride, "stride")
        self.padding = _padding_arg(padding)
        self.dilation = _pair(dilation, "dilation")
        self.padding_mode = padding_mode

    @staticmethod
    def _conv_kwargs(conv: nn.Conv2d) -> dict[str, Any]:
        """Keyword arguments that carry ``conv``'s geometry, bias flag, device and dtype over to :meth:`empty`."""
        weight = conv.weight
        return {"stride": conv.stride, "padding": conv.padding, "dilation": conv.dilation,
                "padding_mode": conv.padding_mode, "bias": conv.bias is not None, "device": weight.device,
                "dtype": weight.dtype}

    def _fill(self, source: nn.Module, weights: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> Self:
        """Copy ``(parameter, factor)`` pairs and ``source``'s bias into this module; take ``source``'s training mode.

        The factors are cast to the source weight's dtype and device: solvers typically return float64.
        """
        cast = {"device": source.weight.device, "dtype": source.weight.dtype}
        with torch.no_grad():
            for param, value in weights:
                param.copy_(value.detach().to(**cast))
            if source.bias is not None:
                getattr(self, self._BIAS_LAYER).bias.copy_(source.bias.detach())
        return self.train(source.training)


def _check_kernel_source(layer: type, conv: nn.Module, result: Tucker2Result | CPResult, result_type: type,
                         factorization: str) -> None:
    """Checks shared by the layers that factorize a full (T, S, H, W) kernel (Tucker-2, CP)."""
    name = layer.__name__
    if not isinstance(conv, nn.Conv2d):
        raise ValueError(f"{name}.from_result needs an nn.Conv2d, got {type(conv).__name__}")
    if conv.groups != 1:
        raise ValueError(
            f"{name} does not apply to grouped/depthwise convs (groups={conv.groups}): its kernel "
            f"{tuple(conv.weight.shape)} does not mix all input channels, so {factorization} is not "
            f"defined; leave this layer out of the plan")
    _check_result_type(result, result_type)
    if tuple(result.kernel_shape) != tuple(conv.weight.shape):
        raise ValueError(f"result kernel shape {tuple(result.kernel_shape)} does not match the conv weight shape "
                         f"{tuple(conv.weight.shape)}; decompose this layer's own kernel")
    if not conv.weight.is_floating_point():
        raise ValueError(f"conv weight must be floating point, got {conv.weight.dtype}")


class Tucker2Conv(_FactorizedLayer):
    """Tucker-2 factorized 2-D convolution (paper Sec. 3.2, Kim et al. 2016).

    ``x -> conv1x1(U_S^T) -> conv_HxW(G, original stride/padding/dilation) -> conv1x1(U_T) + bias``,
    which equals the dense conv with kernel ``K~ = G x_1 U_T x_2 U_S`` of shape (T, S, H, W).

    Parameters
    ----------
    in_channels, out_channels : int
        ``S`` and ``T`` of the original conv.
    kernel_size : int or tuple of int
        ``(H, W)``.
    ranks : tuple of int
        ``(R_T, R_S)`` with ``1 <= R_T <= T`` and ``1 <= R_S <= S``.
    stride, padding, dilation, padding_mode
        As in :class:`torch.nn.Conv2d`; applied by the core conv only.
    bias : bool
        Whether the last 1x1 conv carries the original bias.
    device, dtype : optional
        Where and how the (uninitialized) weights are allocated.

    Attributes
    ----------
    in_proj : nn.Conv2d
        1x1, S -> R_S, no bias, weight (R_S, S, 1, 1) = ``U_S^T``.
    core : nn.Conv2d
        HxW, R_S -> R_T, no bias, weight (R_T, R_S, H, W) = ``G``.
    out_proj : nn.Conv2d
        1x1, R_T -> T, weight (T, R_T, 1, 1) = ``U_T``, bias = original bias.

    Notes
    -----
    Every padding mode of the original conv is exact here, although the core conv pads the projected
    input rather than the input: a 1x1 conv without bias acts on each pixel by the same linear map,
    so it commutes with padding that copies pixels (reflect, replicate, circular) and with zero padding
    (it maps 0 to 0). That is why ``in_proj`` must not have a bias.
    """

    _SPEC_FIELDS = ("in_channels", "out_channels", "kernel_size", "ranks", "stride", "padding", "dilation",
                    "padding_mode")
    _BIAS_LAYER = "out_proj"

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
                 ranks: tuple[int, int], stride: int | tuple[int, int] = 1,
                 padding: int | str | tuple[int, int] = 0, dilation: int | tuple[int, int] = 1,
                 padding_mode: str = "zeros", bias: bool = True, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        r_t, r_s = _check_ranks(ranks, out_channels, in_channels)
        self._set_conv_geometry(in_channels, out_channels, kernel_size, stride, padding, dilation, padding_mode)
        self.ranks = (r_t, r_s)
        factory = {"device": device, "dtype": dtype}
        self.in_proj = nn.Conv2d(in_channels, r_s, 1, bias=False, **factory)
        self.core = nn.Conv2d(r_s, r_t, self.kernel_size, stride=self.stride, padding=self.padding,
                              dilation=self.dilation, padding_mode=padding_mode, bias=False, **factory)
        self.out_proj = nn.Conv2d(r_t, out_channels, 1, bias=bias, **factory)

    @classmethod
    def from_result(cls, conv: nn.Conv2d, result: Tucker2Result) -> "Tucker2Conv":
        """Build the factorized replacement of ``conv`` from a Tucker-2 result.

        Parameters
        ----------
        conv : nn.Conv2d
            The original conv, ``groups == 1``, weight (T, S, H, W). Its stride, padding, dilation,
            padding mode and bias are carried over.
        result : Tucker2Result
            Factors with ``result.kernel_shape == conv.weight.shape``. They are cast to the conv
            weight's dtype and device (solvers typically return float64).

        Returns
        -------
        Tucker2Conv
            Module on the conv's device and dtype, in the conv's training mode.
        """
        _check_kernel_source(cls, conv, result, Tucker2Result, "a channel factorization over (T, S)")
        module = cls.empty(conv.in_channels, conv.out_channels, conv.kernel_size, result.ranks,
                           **cls._conv_kwargs(conv))
        return module._fill(conv, [(module.in_proj.weight, result.u_s.T[:, :, None, None]),
                                   (module.core.weight, result.core),
                                   (module.out_proj.weight, result.u_t[:, :, None, None])])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the three convs; ``x`` (B, S, H_in, W_in) -> (B, T, H_out, W_out)."""
        return self.out_proj(self.core(self.in_proj(x)))

    def reconstructed_kernel(self) -> torch.Tensor:
        """Dense kernel ``K~[t,s,h,w] = sum_ab G[a,b,h,w] U_T[t,a] U_S[s,b]``, shape (T, S, H, W)."""
        u_s_t = self.in_proj.weight[:, :, 0, 0]
        u_t = self.out_proj.weight[:, :, 0, 0]
        return torch.einsum("abhw,ta,bs->tshw", self.core.weight, u_t, u_s_t)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, ranks={self.ranks}"


def _check_ranks(ranks: tuple[int, int] | list[int], t: int, s: int) -> tuple[int, int]:
    pair = tuple(ranks)
    if len(pair) != 2 or not all(_is_int(r) for r in pair):
        raise ValueError(f"ranks must be a pair of ints (R_T, R_S), got {ranks!r}")
    r_t, r_s = int(pair[0]), int(pair[1])
    pair = (r_t, r_s)
    if not (1 <= r_t <= t and 1 <= r_s <= s):
        raise ValueError(f"ranks (R_T, R_S)={pair} must satisfy 1 <= R_T <= T={t} and 1 <= R_S <= S={s}")
    return r_t, r_s


class LowRankLinear(_FactorizedLayer):
    """Rank-``r`` factorized linear layer ``Linear(in -> r, no bias) -> Linear(r -> out, bias)`` (paper App. E).

    Parameters
    ----------
    in_features, out_features : int
        Sizes of the original layer.
    rank : int
        ``r >= 1``.
    bias : bool
        Whether ``second`` carries the original bias.
    device, dtype : optional
        Where and how the (uninitialized) weights are allocated.

    Attributes
    ----------
    first : nn.Linear
        Weight (r, in).
    second : nn.Linear
        Weight (out, r), bias (out,).
    """

    _SPEC_FIELDS = ("in_features", "out_features", "rank")
    _BIAS_LAYER = "second"

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.rank = _check_rank(rank)
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        factory = {"device": device, "dtype": dtype}
        self.first = nn.Linear(in_features, self.rank, bias=False, **factory)
        self.second = nn.Linear(self.rank, out_features, bias=bias, **factory)

    @classmethod
    def from_factors(cls, linear: nn.Linear, first_weight: torch.Tensor,
                     second_weight: torch.Tensor) -> "LowRankLinear":
        """Build the replacement of ``linear`` with ``W~ = second_weight @ first_weight``.

        Parameters
        ----------
        linear : nn.Linear
            Original layer, weight (out, in); its bias is carried over.
        first_weight : torch.Tensor, shape (r, in)
        second_weight : torch.Tensor, shape (out, r)
            Cast to the linear weight's dtype and device.
        """
        _check_linear_factors(linear, first_weight, second_weight)
        module = cls.empty(linear.in_features, linear.out_features, first_weight.shape[0],
                           bias=linear.bias is not None, device=linear.weight.device, dtype=linear.weight.dtype)
        return module._fill(linear, [(module.first.weight, first_weight), (module.second.weight, second_weight)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (..., in) -> (..., out)."""
        return self.second(self.first(x))

    def reconstructed_weight(self) -> torch.Tensor:
        """Dense weight ``second.weight @ first.weight``, shape (out, in)."""
        return self.second.weight @ self.first.weight

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, rank={self.rank}"


def _check_linear_factors(linear: nn.Module, first: torch.Tensor, second: torch.Tensor) -> None:
    if not isinstance(linear, nn.Linear):
        raise ValueError(f"LowRankLinear.from_factors needs an nn.Linear, got {type(linear).__name__}")
    out_f, in_f = linear.weight.shape
    if first.dim() != 2 or second.dim() != 2 or first.shape[1] != in_f or second.shape[0] != out_f \
            or first.shape[0] != second.shape[1]:
        raise ValueError(f"factors must be first (r, in={in_f}) and second (out={out_f}, r) with the same r; "
                         f"got first {tuple(first.shape)}, second {tuple(second.shape)}")


class LowRank1x1Conv(_FactorizedLayer):
    """Rank-``r`` factorized 1x1 convolution: two 1x1 convs ``S -> r -> T`` (paper App. E applied per pixel).

    A 1x1 conv is the linear map ``W`` (T, S) applied to the channel vector at every output position, so its
    SVD / SVD-Sigma factorization ``W~ = second @ first`` gives ``x -> conv1x1(second) (conv1x1(first) x)``.

    Parameters
    ----------
    in_channels, out_channels : int
        ``S`` and ``T`` of the original conv.
    rank : int
        ``r >= 1``.
    stride, padding, dilation, padding_mode
        As in :class:`torch.nn.Conv2d`; applied by the first conv only (the second runs on its output grid).
    bias : bool
        Whether the second conv carries the original bias.
    device, dtype : optional
        Where and how the (uninitialized) weights are allocated.

    Attributes
    ----------
    first : nn.Conv2d
        1x1, S -> r, no bias, original stride/padding, weight (r, S, 1, 1).
    second : nn.Conv2d
        1x1, r -> T, weight (T, r, 1, 1), bias = original bias.

    Notes
    -----
    Padding of the original 1x1 conv is exact in the first conv because it has no bias: padded pixels map to 0
    (zeros) or to the image of copied pixels (reflect/replicate/circular), as in the dense conv.
    """

    _SPEC_FIELDS = ("in_channels", "out_channels", "rank", "stride", "padding", "dilation", "padding_mode")
    _BIAS_LAYER = "second"

    def __init__(self, in_channels: int, out_channels: int, rank: int, stride: int | tuple[int, int] = 1,
                 padding: int | str | tuple[int, int] = 0, dilation: int | tuple[int, int] = 1,
                 padding_mode: str = "zeros", bias: bool = True, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        rank = _check_rank(rank)
        self._set_conv_geometry(in_channels, out_channels, None, stride, padding, dilation, padding_mode)
        self.rank = rank
        factory = {"device": device, "dtype": dtype}
        self.first = nn.Conv2d(in_channels, self.rank, 1, stride=self.stride, padding=self.padding,
                               dilation=self.dilation, padding_mode=padding_mode, bias=False, **factory)
        self.second = nn.Conv2d(self.rank, out_channels, 1, bias=bias, **factory)

    @classmethod
    def from_result(cls, conv: nn.Conv2d, result: LowRankResult) -> "LowRank1x1Conv":
        """Build the factorized replacement of a 1x1 ``conv`` from an SVD / SVD-Sigma result.

        Parameters
        ----------
        conv : nn.Conv2d
            Original 1x1 conv, ``groups == 1``, weight (T, S, 1, 1); stride, padding, dilation, padding mode and
            bias are carried over.
        result : LowRankResult
            ``first`` (r, S), ``second`` (T, r); cast to the conv weight's dtype and device.

        Raises
        ------
        ValueError
            ``conv`` is not a 1x1 ``nn.Conv2d`` with ``groups == 1`` or the factors do not fit its weight.
        """
        _check_1x1_source(conv, result)
        module = cls.empty(conv.in_channels, conv.out_channels, result.rank, **cls._conv_kwargs(conv))
        return module._fill(conv, [(module.first.weight, result.first[:, :, None, None]),
                                   (module.second.weight, result.second[:, :, None, None])])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (B, S, H_in, W_in) -> (B, T, H_out, W_out)."""
        return self.second(self.first(x))

    def reconstructed_kernel(self) -> torch.Tensor:
        """Dense kernel ``second @ first``, shape (T, S, 1, 1)."""
        return (self.second.weight[:, :, 0, 0] @ self.first.weight[:, :, 0, 0])[:, :, None, None]

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, rank={self.rank}, stride={self.stride}"


def _check_1x1_source(conv: nn.Module, result: LowRankResult) -> None:
    if not isinstance(conv, nn.Conv2d) or tuple(conv.kernel_size) != (1, 1):
        kind = f"{tuple(conv.kernel_size)} conv" if isinstance(conv, nn.Conv2d) else type(conv).__name__
        raise ValueError(f"LowRank1x1Conv.from_result needs a 1x1 nn.Conv2d, got a {kind}; "
                         "factorize larger kernels with Tucker2Conv / a CP layer")
    if conv.groups != 1:
        raise ValueError(f"LowRank1x1Conv does not apply to grouped 1x1 convs (groups={conv.groups}): the weight "
                         f"{tuple(conv.weight.shape)} is block-diagonal over channels, not one (T, S) matrix; "
                         "leave this layer out of the plan")
    _check_result_type(result, LowRankResult)
    t, s = conv.out_channels, conv.in_channels
    if tuple(result.first.shape) != (result.rank, s) or tuple(result.second.shape) != (t, result.rank):
        raise ValueError(f"factors first {tuple(result.first.shape)} / second {tuple(result.second.shape)} do not "
                         f"fit the conv weight {tuple(conv.weight.shape)}; decompose this layer's own weight")


class CPConv(_FactorizedLayer):
    """Rank-R CP factorized 2-D convolution (Lebedev et al. 2015; paper Sec. 3.1).

    ``x -> conv1x1(U_S^T) -> depthwise Hx1 (U_H) -> depthwise 1xW (U_W) -> conv1x1(U_T) + bias``, which equals the
    dense conv with kernel ``K~[t,s,h,w] = sum_r U_T[t,r] U_S[s,r] U_H[h,r] U_W[w,r]`` of shape (T, S, H, W).

    Parameters
    ----------
    in_channels, out_channels, kernel_size, bias, device, dtype
        As for :class:`Tucker2Conv`.
    rank : int
        ``R >= 1``.
    stride, padding, dilation, padding_mode
        As in :class:`torch.nn.Conv2d`; the height components go to ``depth_h``, the width components to
        ``depth_w``.

    Attributes
    ----------
    in_proj : nn.Conv2d
        1x1, S -> R, no bias, weight (R, S, 1, 1) = ``U_S^T``.
    depth_h : nn.Conv2d
        (H, 1) depthwise (``groups=R``), no bias, weight (R, 1, H, 1) = ``U_H^T``; stride ``(s_h, 1)``, padding
        ``(p_h, 0)``, dilation ``(d_h, 1)``.
    depth_w : nn.Conv2d
        (1, W) depthwise, no bias, weight (R, 1, 1, W) = ``U_W^T``; stride ``(1, s_w)``, padding ``(0, p_w)``,
        dilation ``(1, d_w)``.
    out_proj : nn.Conv2d
        1x1, R -> T, weight (T, R, 1, 1) = ``U_T``, bias = original bias.

    Notes
    -----
    Splitting the padding between the two depthwise convs is exact for every padding mode, not only zeros:
    ``reflect``, ``replicate`` and ``circular`` padding of a 2-D image map each padded index ``(i, j)`` to the
    source pixel ``(f_H(i), f_W(j))`` with one index map per axis, so padding rows and then columns gives the
    same image (corners included) as padding both at once. ``depth_h`` pads rows of the projected input, and
    as it acts on every column separately, padding its output's columns equals running it on the
    column-padded input. The bias-free 1x1 ``in_proj`` commutes with any pixel-copying or zero padding, as
    for :class:`Tucker2Conv`. The tests check all four modes against the dense conv, with strides,
    dilations, asymmetric padding and ``padding="same"``.
    """

    _SPEC_FIELDS = ("in_channels", "out_channels", "kernel_size", "rank", "stride", "padding", "dilation",
                    "padding_mode")
    _BIAS_LAYER = "out_proj"

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int], rank: int,
                 stride: int | tuple[int, int] = 1, padding: int | str | tuple[int, int] = 0,
                 dilation: int | tuple[int, int] = 1, padding_mode: str = "zeros", bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        rank = _check_rank(rank)
        self._set_conv_geometry(in_channels, out_channels, kernel_size, stride, padding, dilation, padding_mode)
        self.rank = rank
        (k_h, k_w), (s_h, s_w), (d_h, d_w) = self.kernel_size, self.stride, self.dilation
        pad_h, pad_w = (self.padding, self.padding) if isinstance(self.padding, str) else \
            ((self.padding[0], 0), (0, self.padding[1]))
        factory = {"device": device, "dtype": dtype}
        self.in_proj = nn.Conv2d(in_channels, rank, 1, bias=False, **factory)
        self.depth_h = nn.Conv2d(rank, rank, (k_h, 1), stride=(s_h, 1), padding=pad_h, dilation=(d_h, 1),
                                 groups=rank, padding_mode=padding_mode, bias=False, **factory)
        self.depth_w = nn.Conv2d(rank, rank, (1, k_w), stride=(1, s_w), padding=pad_w, dilation=(1, d_w),
                                 groups=rank, padding_mode=padding_mode, bias=False, **factory)
        self.out_proj = nn.Conv2d(rank, out_channels, 1, bias=bias, **factory)

    @classmethod
    def from_result(cls, conv: nn.Conv2d, result: CPResult) -> "CPConv":
        """Build the factorized replacement of ``conv`` from a CP result.

        ``conv`` and the returned module are as for :meth:`Tucker2Conv.from_result`; ``result`` is a
        :class:`CPResult` with ``result.kernel_shape == conv.weight.shape``.
        """
        _check_kernel_source(cls, conv, result, CPResult, "a CP over (T, S, H, W)")
        module = cls.empty(conv.in_channels, conv.out_channels, conv.kernel_size, result.rank,
                           **cls._conv_kwargs(conv))
        return module._fill(conv, [(module.in_proj.weight, result.u_s.T[:, :, None, None]),
                                   (module.depth_h.weight, result.u_h.T[:, None, :, None]),
                                   (module.depth_w.weight, result.u_w.T[:, None, None, :]),
                                   (module.out_proj.weight, result.u_t[:, :, None, None])])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the four convs; ``x`` (B, S, H_in, W_in) -> (B, T, H_out, W_out)."""
        return self.out_proj(self.depth_w(self.depth_h(self.in_proj(x))))

    def reconstructed_kernel(self) -> torch.Tensor:
        """Dense kernel ``K~[t,s,h,w] = sum_r U_T[t,r] U_S[s,r] U_H[h,r] U_W[w,r]``, shape (T, S, H, W)."""
        return torch.einsum("tr,rs,rh,rw->tshw", self.out_proj.weight[:, :, 0, 0], self.in_proj.weight[:, :, 0, 0],
                            self.depth_h.weight[:, 0, :, 0], self.depth_w.weight[:, 0, 0, :])

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, rank={self.rank}"


def _spec_types() -> dict[str, type[_FactorizedLayer]]:
    from sigma_core import layers_norton  # NORTON layers + pruned plain layers (imports this module)
    from sigma_core.layers_tucker import TuckerConv  # its own module; imported here to avoid an import cycle

    return {cls.__name__: cls for cls in (Tucker2Conv, LowRankLinear, LowRank1x1Conv, CPConv, TuckerConv,
                                          *layers_norton.SPEC_TYPES)}


def module_from_spec(spec: dict[str, Any], device: torch.device | str | None = None,
                     dtype: torch.dtype | None = None) -> nn.Module:
    """Rebuild an empty factorized module from its :meth:`spec` dict (weights to be loaded after).

    Parameters
    ----------
    spec : dict
        Output of the ``spec()`` of any layer of this module (possibly after a JSON round trip).
    device, dtype : optional
        Allocation of the weights; use the dtype of the state dict you will load.

    Raises
    ------
    ValueError
        Unknown ``"type"`` or arguments that do not fit the type's constructor.
    """
    types = _spec_types()
    if not isinstance(spec, dict) or "type" not in spec:
        raise ValueError(f"spec must be a dict with a 'type' key (one of {sorted(types)}), got {spec!r}")
    kind = spec["type"]
    if kind not in types:
        raise ValueError(f"unknown layer type {kind!r} in spec; known types: {sorted(types)}")
    args = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.items() if k != "type"}
    try:
        return types[kind].empty(**args, device=device, dtype=dtype)
    except TypeError as exc:
        raise ValueError(f"spec arguments {sorted(args)} do not fit {kind}.empty: {exc}") from exc

"""Full 4-mode Tucker convolution (TDLRT spec Sec. 2; Zangrando et al. 2023, Sec. 2.1).

``W * Z = C x_{2,3,4} [(U_S (x) U_H (x) U_W) * Z] x_1 U_T``, run as
``1x1 conv (U_S^T) -> HxW conv with G = C x_3 U_H x_4 U_W (original geometry) -> 1x1 conv (U_T) + bias``:
the Tucker2Conv scheme with its core stored factored, so the parameter count is the Tucker count
``prod r_i + sum n_i r_i`` (+ bias).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sigma_core.covariance import _PAD_MODES, _conv_pads
from sigma_core.decompose._result import TuckerResult, validate_tucker_ranks
from sigma_core.layers import _FactorizedLayer, _check_kernel_source, _is_int

__all__ = ["TuckerConv"]


class TuckerConv(_FactorizedLayer):
    """Tucker factorized 2-D convolution with all four modes factored.

    Parameters
    ----------
    in_channels, out_channels : int
        ``S`` and ``T`` of the original conv.
    kernel_size : int or tuple of int
        ``(H, W)``.
    ranks : tuple of 4 int
        ``(R_T, R_S, R_H, R_W)``, valid Tucker ranks for the kernel ``(T, S, H, W)``.
    stride, padding, dilation, padding_mode
        As in :class:`torch.nn.Conv2d`; applied by the core conv only.
    bias : bool
        Whether ``out_proj`` carries the original bias.
    device, dtype : optional
        Allocation of the (uninitialized) weights.

    Attributes
    ----------
    in_proj : nn.Conv2d
        1x1, S -> R_S, no bias, weight (R_S, S, 1, 1) = ``U_S^T``.
    core : nn.Parameter, shape (R_T, R_S, R_H, R_W)
        Tucker core ``C``.
    u_h, u_w : nn.Parameter, shapes (H, R_H), (W, R_W)
        Spatial factors.
    out_proj : nn.Conv2d
        1x1, R_T -> T, weight (T, R_T, 1, 1) = ``U_T``, bias = original bias.

    Notes
    -----
    Every padding mode is exact for the reason given in :class:`sigma_core.layers.Tucker2Conv`: the bias-free
    ``in_proj`` commutes with zero and pixel-copying padding. The core conv pads like ``nn.Conv2d`` does
    (``F.pad`` for non-zero modes, then an unpadded conv). MACs per image:
    ``H_in W_in S R_S + H' W' R_T R_S H W + H' W' T R_T``.
    """

    _SPEC_FIELDS = ("in_channels", "out_channels", "kernel_size", "ranks", "stride", "padding", "dilation",
                    "padding_mode")
    _BIAS_LAYER = "out_proj"

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
                 ranks: tuple[int, int, int, int], stride: int | tuple[int, int] = 1,
                 padding: int | str | tuple[int, int] = 0, dilation: int | tuple[int, int] = 1,
                 padding_mode: str = "zeros", bias: bool = True, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self._set_conv_geometry(in_channels, out_channels, kernel_size, stride, padding, dilation, padding_mode)
        ranks = tuple(ranks)
        if len(ranks) != 4 or not all(_is_int(r) for r in ranks):
            raise ValueError(f"ranks must be 4 ints (R_T, R_S, R_H, R_W), got {ranks!r}")
        shape = (self.out_channels, self.in_channels, *self.kernel_size)
        self.ranks = validate_tucker_ranks(tuple(int(r) for r in ranks), shape)
        r_t, r_s, r_h, r_w = self.ranks
        factory = {"device": device, "dtype": dtype}
        self.in_proj = nn.Conv2d(in_channels, r_s, 1, bias=False, **factory)
        self.core = nn.Parameter(torch.empty(self.ranks, **factory))
        self.u_h = nn.Parameter(torch.empty(self.kernel_size[0], r_h, **factory))
        self.u_w = nn.Parameter(torch.empty(self.kernel_size[1], r_w, **factory))
        self.out_proj = nn.Conv2d(r_t, out_channels, 1, bias=bias, **factory)
        with torch.no_grad():  # deterministic placeholders; from_result / load_state_dict overwrite them
            for p in (self.core, self.u_h, self.u_w):
                p.zero_()

    @classmethod
    def from_result(cls, conv: nn.Conv2d, result: TuckerResult) -> "TuckerConv":
        """Build the replacement of ``conv`` from a :class:`TuckerResult` (cast to the conv's dtype/device).

        Raises
        ------
        ValueError
            ``conv`` is not an ``nn.Conv2d`` with ``groups == 1``, or the result does not fit its kernel.
        """
        _check_kernel_source(cls, conv, result, TuckerResult, "a Tucker decomposition over (T, S, H, W)")
        module = cls.empty(conv.in_channels, conv.out_channels, conv.kernel_size, result.ranks,
                           **cls._conv_kwargs(conv))
        return module._fill(conv, [(module.in_proj.weight, result.u_s.T[:, :, None, None]),
                                   (module.core, result.core), (module.u_h, result.u_h), (module.u_w, result.u_w),
                                   (module.out_proj.weight, result.u_t[:, :, None, None])])

    def core_kernel(self) -> torch.Tensor:
        """``G = C x_3 U_H x_4 U_W``, shape (R_T, R_S, H, W)."""
        return torch.einsum("abcd,hc,wd->abhw", self.core, self.u_h, self.u_w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (B, S, H_in, W_in) -> (B, T, H_out, W_out)."""
        z = self.in_proj(x)
        kernel = self.core_kernel()
        if self.padding_mode != "zeros":
            pads = _conv_pads(self)  # type: ignore[arg-type]
            z = F.pad(z, pads, mode=_PAD_MODES[self.padding_mode])
            z = F.conv2d(z, kernel, None, self.stride, 0, self.dilation)
        else:
            z = F.conv2d(z, kernel, None, self.stride, self.padding, self.dilation)
        return self.out_proj(z)

    def reconstructed_kernel(self) -> torch.Tensor:
        """Dense kernel ``C x_1 U_T x_2 U_S x_3 U_H x_4 U_W``, shape (T, S, H, W)."""
        return torch.einsum("abcd,ta,bs,hc,wd->tshw", self.core, self.out_proj.weight[:, :, 0, 0],
                            self.in_proj.weight[:, :, 0, 0], self.u_h, self.u_w)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, ranks={self.ranks}"

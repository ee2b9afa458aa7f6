"""Sigma moments implied by a trained network's BatchNorm statistics (transfer calibration; beyond the paper).

A BatchNorm layer in eval mode maps its input x to ``z = gamma (x - m) / sqrt(v + eps) + beta`` with the running
mean m and variance v of x over the training distribution, so over that distribution z has mean ``beta`` and
variance ``gamma^2 v / (v + eps)``. Modelling z as Gaussian, the next conv's input ``a = ReLU(z)`` has (with
``t = mu / sigma``, Phi / phi the standard normal cdf / pdf)

    E[a]   = mu Phi(t) + sigma phi(t),                                                           (B1)
    E[a^2] = (mu^2 + sigma^2) Phi(t) + mu sigma phi(t).                                          (B2)

After a residual sum ``ReLU(BN_1(.) + BN_2(.))`` the pre-activation mean is ``beta_1 + beta_2`` exactly, but its
variance ``var_1 + var_2 + 2 cov`` needs the (unknown) covariance of the two branches: :func:`sum_moments` assumes
independent branches (cov = 0). An identity shortcut or a pooling layer in between gives no Gaussian to use; those
layers are left alone (``pipeline.transfer`` reports which).

Two uses (``pipeline.transfer``):

* calibration -- rescale a transferred Sigma per input channel s, ``Sigma' = D Sigma D``,
  ``D = diag(c_s)`` over the (s, p) rows, ``c_s = sqrt(E[a_s^2] / Sigma_{(s,c),(s,c)})`` with c the kernel's
  centre tap (never padded for odd kernels with padding k // 2), so that the diagonal matches (B2);
* data-free Sigma -- channels and positions independent:
  ``Sigma_{(s,p),(t,q)} = F_pq (E[a_s] E[a_t] + delta_st delta_pq Var[a_s])`` with ``F_pq`` the share of output
  positions at which taps p and q both fall inside the (unpadded) input.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["bn_output_moments", "calibrate_channels", "data_free_sigma", "relu_moments", "sum_moments",
           "tap_overlap"]


def bn_output_moments(bn: torch.nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of an eval-mode BatchNorm's output over its training distribution, shapes (C,), (C,)."""
    if bn.running_var is None or bn.running_mean is None:
        raise ValueError("BatchNorm without running statistics (track_running_stats=False): no moments to use")
    var = bn.running_var.detach().to(torch.float64)
    gamma = bn.weight.detach().to(torch.float64) if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias.detach().to(torch.float64) if bn.bias is not None else torch.zeros_like(var)
    return beta.clone(), gamma * gamma * var / (var + bn.eps)


def sum_moments(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of a sum of branches, assuming independent branches (the covariance is unknown)."""
    mean = sum(m for m, _ in parts)
    var = sum(v for _, v in parts)
    return mean, var


def relu_moments(mean: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B1), (B2): E[ReLU(z)] and E[ReLU(z)^2] for z ~ N(mean, var), elementwise (var = 0 allowed)."""
    mean = mean.to(torch.float64)
    std = var.to(torch.float64).clamp_min(0).sqrt()
    safe = torch.where(std > 0, std, torch.ones_like(std))
    t = mean / safe
    cdf = 0.5 * torch.erfc(-t / math.sqrt(2.0))
    pdf = torch.exp(-0.5 * t * t) / math.sqrt(2.0 * math.pi)
    m1 = torch.where(std > 0, mean * cdf + std * pdf, mean.clamp_min(0))
    m2 = torch.where(std > 0, (mean * mean + std * std) * cdf + mean * std * pdf, mean.clamp_min(0) ** 2)
    return m1, m2


def calibrate_channels(sigma: torch.Tensor, target_m2: torch.Tensor, kernel: tuple[int, int], *,
                       max_scale: float = 10.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``D Sigma D`` with per-channel scales matching the centre-tap diagonal to ``target_m2``.

    Parameters
    ----------
    sigma : torch.Tensor, shape (S*kh*kw, S*kh*kw)
        Rows in (s, kh, kw) order.
    target_m2 : torch.Tensor, shape (S,)
        E[a_s^2] of (B2).
    kernel : (kh, kw)
    max_scale : float
        Scales are clipped to [1/max_scale, max_scale]; a channel the transferred data never activates
        (zero diagonal) keeps scale 1.

    Returns
    -------
    sigma : torch.Tensor, shape like ``sigma``
    scales : torch.Tensor, shape (S,)
    """
    kh, kw = kernel
    taps = kh * kw
    channels = target_m2.shape[0]
    if sigma.shape[0] != channels * taps:
        raise ValueError(f"Sigma is {tuple(sigma.shape)} but S*kh*kw = {channels}*{kh}*{kw}")
    centre = (kh // 2) * kw + kw // 2
    diag = sigma.diagonal().reshape(channels, taps)[:, centre]
    ok = diag > 0
    scales = torch.where(ok, (target_m2.to(sigma.dtype) / torch.where(ok, diag, torch.ones_like(diag))).sqrt(),
                         torch.ones_like(diag)).clamp(1.0 / max_scale, max_scale)
    d = scales.repeat_interleave(taps)
    out = sigma * d[:, None] * d[None, :]
    return torch.triu(out) + torch.triu(out, 1).T, scales


def tap_overlap(in_size: tuple[int, int], kernel: tuple[int, int], stride: tuple[int, int],
                padding: tuple[int, int], dilation: tuple[int, int] = (1, 1)) -> torch.Tensor:
    """F of the data-free Sigma: share of output positions where taps p and q are both unpadded, (P, P)."""
    ones = torch.ones(1, 1, *in_size, dtype=torch.float64)
    cols = F.unfold(ones, kernel, dilation=dilation, padding=padding, stride=stride)[0]  # (P, L)
    return cols @ cols.T / cols.shape[1]


def data_free_sigma(m1: torch.Tensor, m2: torch.Tensor, overlap: torch.Tensor) -> torch.Tensor:
    """Data-free Sigma (channels and positions independent), shape (S*P, S*P), rows (s, p).

    Parameters
    ----------
    m1, m2 : torch.Tensor, shape (S,)
        E[a_s], E[a_s^2].
    overlap : torch.Tensor, shape (P, P)
        :func:`tap_overlap`.
    """
    m1, m2 = m1.to(torch.float64), m2.to(torch.float64)
    var = (m2 - m1 * m1).clamp_min(0)
    out = torch.kron(torch.outer(m1, m1), overlap) + torch.kron(torch.diag(var), torch.diag(overlap.diagonal()))
    return torch.triu(out) + torch.triu(out, 1).T

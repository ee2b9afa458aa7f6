"""Approximation errors used everywhere (design.md): the Sigma norm of Proposition 1 and Frobenius."""

from __future__ import annotations

import torch

__all__ = ["sigma_norm_sq", "rel_sigma_err", "rel_frob_err"]


def _flat(kernel: torch.Tensor) -> torch.Tensor:
    """First unfolding K_(1): (T, S*H*W) for a conv kernel, (out, in) for a linear weight."""
    return kernel.reshape(kernel.shape[0], -1)


def sigma_norm_sq(kernel: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``||K_(1) Sigma^{1/2}||_F^2 = tr(K_(1) Sigma K_(1)^T)`` (paper Eq. 4), in float64.

    Parameters
    ----------
    kernel : torch.Tensor, shape (T, S, H, W) or (out, in)
    sigma : torch.Tensor, shape (n, n), n = S*H*W or in
    """
    k1 = _flat(kernel).to(device=sigma.device, dtype=torch.float64)
    if k1.shape[1] != sigma.shape[0]:
        raise ValueError(f"kernel unfolds to {tuple(k1.shape)} but Sigma is {tuple(sigma.shape)}")
    return ((k1 @ sigma.to(torch.float64)) * k1).sum()


def rel_sigma_err(kernel: torch.Tensor, approx: torch.Tensor, sigma: torch.Tensor) -> float:
    """``||(K - K~)_(1) L||_F / ||K_(1) L||_F`` with ``L L^T = Sigma``."""
    if kernel.shape != approx.shape:
        raise ValueError(f"kernel {tuple(kernel.shape)} and approximation {tuple(approx.shape)} differ in shape")
    diff = kernel.to(torch.float64) - approx.to(kernel.device, torch.float64)
    num = sigma_norm_sq(diff, sigma).clamp_min(0)
    den = sigma_norm_sq(kernel, sigma)
    return float((num / den).sqrt()) if float(den) > 0 else float("nan")


def rel_frob_err(kernel: torch.Tensor, approx: torch.Tensor) -> float:
    """``||K - K~||_F / ||K||_F``."""
    if kernel.shape != approx.shape:
        raise ValueError(f"kernel {tuple(kernel.shape)} and approximation {tuple(approx.shape)} differ in shape")
    k = kernel.to(torch.float64)
    return float((k - approx.to(k.device, torch.float64)).norm() / k.norm())

"""Small shared helpers for the Sigma / Tucker-2 tests: real Fashion-MNIST images, Sigmas, explicit algebra.

Kept independent of ``pipeline/`` on purpose: images are read straight from the raw IDX files.
"""

from __future__ import annotations

import functools
import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


@functools.lru_cache(maxsize=4)
def _read_idx_images(path: str, count: int) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        header = fh.read(16)
        magic, n, rows, cols = (int.from_bytes(header[i:i + 4], "big") for i in range(0, 16, 4))
        assert magic == 2051, f"not an IDX image file: magic {magic}"
        count = min(count, n)
        data = np.frombuffer(fh.read(count * rows * cols), dtype=np.uint8)
    return data.reshape(count, 1, rows, cols)


def fmnist_images(count: int = 256, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The first ``count`` Fashion-MNIST training images, (count, 1, 28, 28) in [0, 1]; skips if absent."""
    path = FMNIST_DIR / "train-images-idx3-ubyte.gz"
    if not path.exists():
        pytest.skip(f"Fashion-MNIST not found at {path}")
    return torch.from_numpy(_read_idx_images(str(path), count).copy()).to(dtype) / 255.0


def feature_conv(s: int, seed: int = 0) -> nn.Conv2d:
    """A float64 conv 1 -> s (3x3, padding 1) with seeded random weights: makes real S-channel activations."""
    torch.manual_seed(seed)
    return nn.Conv2d(1, s, 3, padding=1).double()


@functools.lru_cache(maxsize=8)
def _real_sigma(s: int, kh: int, kw: int, n_images: int, seed: int) -> torch.Tensor:
    x = torch.relu(feature_conv(s, seed)(fmnist_images(n_images))).detach()
    cols = F.unfold(x, (kh, kw))  # (B, s*kh*kw, L): rows s*kh*kw + h*kw + w
    u = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    sigma = u.T @ u / u.shape[0]
    return 0.5 * (sigma + sigma.T)


def real_sigma(s: int, kh: int = 3, kw: int = 3, n_images: int = 64, seed: int = 0) -> torch.Tensor:
    """Uncentered Sigma (float64) of kh x kw patches of real FMNIST images through ReLU(random conv 1 -> s).

    Computed with ``F.unfold`` and a dense Gram matrix, independently of ``sigma_core.covariance``.
    """
    return _real_sigma(s, kh, kw, n_images, seed).clone()


def random_orthogonal(n: int, gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def spd_with_condition(n: int, cond: float, gen: torch.Generator) -> torch.Tensor:
    """Random SPD matrix with log-spaced eigenvalues from 1 down to 1/cond (random eigenvectors)."""
    q = random_orthogonal(n, gen)
    evals = torch.logspace(0, -np.log10(cond), n, dtype=torch.float64)
    sigma = (q * evals) @ q.T
    return 0.5 * (sigma + sigma.T)


def sigma_sq_err(k1: torch.Tensor, approx1: torch.Tensor, sigma: torch.Tensor) -> float:
    """``tr((K1 - A1) Sigma (K1 - A1)^T)`` computed directly (no sigma_core code)."""
    d = (k1 - approx1).reshape(k1.shape[0], -1).to(torch.float64)
    return float(torch.trace(d @ sigma @ d.T))


def tucker2_unfold(u_t: torch.Tensor, core: torch.Tensor, u_s: torch.Tensor) -> torch.Tensor:
    """``K~1 = U_T G1 (U_S kron I_P)^T`` built with an explicit Kronecker product, shape (T, S*P)."""
    r_t, r_s = core.shape[:2]
    p = core[0, 0].numel()
    g1 = core.reshape(r_t, r_s * p)
    eye = torch.eye(p, dtype=u_s.dtype)
    m = (u_s[:, None, :, None] * eye[None, :, None, :]).reshape(u_s.shape[0] * p, u_s.shape[1] * p)
    return u_t @ g1 @ m.T


def rel_close(a: torch.Tensor | float, b: torch.Tensor | float) -> float:
    """Relative difference ``|a - b| / |b|`` (norms for tensors)."""
    a = torch.as_tensor(a, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).norm() / b.norm().clamp_min(1e-300))

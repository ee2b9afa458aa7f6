"""Shrinkage of a sample Sigma toward a structured target, from Sigma and the sample count alone.

A Sigma estimated from few patches is noisy in its small eigenvalues -- exactly the directions the Sigma norm
weights least and a low-rank fit is most tempted to use. Shrinkage replaces it by

    Sigma_shrunk = (1 - lambda) Sigma + lambda T,                                              (S1)

with T a scaled identity ``mu I`` (``mu = tr(Sigma) / p``) or the Kronecker fit ``Sigma_S kron Sigma_P`` of
:func:`sigma_core.decompose.kronecker_fit` (the preconditioner of Tucker2-ALS-Sigma, design.md Step B), and an
intensity lambda in [0, 1]:

* ``"oas"`` (Oracle-Approximating Shrinkage, Chen, Wiesel, Eldar & Hero 2010, Eq. 23 as in scikit-learn):

      lambda = min(1, (||Sigma||_F^2 + tr(Sigma)^2) / ((m + 1) ||Sigma - T||_F^2)).                 (S2)

  For ``T = mu I`` this is scikit-learn's ``OAS(assume_centered=True)`` on the m patches exactly (the denominator
  ``||Sigma - mu I||_F^2 = ||Sigma||_F^2 - tr(Sigma)^2 / p``). For the Kronecker target (S2) is the same Gaussian
  oracle approximation with T in place of ``mu I`` (an extension, not in Chen et al.).
* ``"lw"`` (Ledoit & Wolf 2004): ``lambda = min(b, d) / d`` with ``d = ||Sigma - T||_F^2`` and
  ``b = (E||u||^4 - ||Sigma||_F^2) / m``, the summed variance of the entries of Sigma.                 (S3)
  With the fourth moment ``E||u||^4`` given, this is scikit-learn's ``ledoit_wolf_shrinkage(assume_centered=True)``
  exactly; from Sigma alone it is replaced by its Gaussian value ``tr(Sigma)^2 + 2 ||Sigma||_F^2``.

Sigma here is the uncentered second moment E[u u^T] of the project (design.md), so "the patches" of the
scikit-learn comparison are taken as centered (``assume_centered=True``). The result is PSD (a convex combination
of PSD matrices), exactly symmetric, and passes :func:`sigma_core.validate_sigma`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["ESTIMATORS", "TARGETS", "ShrinkageResult", "shrink", "shrinkage_intensity", "shrinkage_target"]

ESTIMATORS = ("oas", "lw")
TARGETS = ("identity", "kronecker")


@dataclass(frozen=True)
class ShrinkageResult:
    """A shrunk Sigma and how it was made.

    Attributes
    ----------
    sigma : torch.Tensor, shape (p, p)
        (S1), exactly symmetric.
    intensity : float
        lambda in [0, 1].
    target : str
        ``"identity"`` or ``"kronecker"``.
    estimator : str
        ``"oas"``, ``"lw"`` or ``"fixed"`` (intensity given).
    """

    sigma: torch.Tensor
    intensity: float
    target: str
    estimator: str


def shrinkage_target(sigma: torch.Tensor, target: str = "identity", *, channels: int | None = None,
                     kron_iters: int = 20) -> torch.Tensor:
    """The target T of (S1).

    Parameters
    ----------
    sigma : torch.Tensor, shape (p, p)
    target : {"identity", "kronecker"}
        ``mu I`` with ``mu = tr(Sigma) / p``, or ``Sigma_S kron Sigma_P`` (maximum-likelihood flip-flop fit).
    channels : int, optional
        S of the Kronecker split ``p = S * P`` (rows ordered (s, p) as in ``K.reshape(T, S*H*W)``). Required for
        ``"kronecker"``; with P = 1 (a 1x1 conv or linear layer) the fit is Sigma itself.
    kron_iters : int
        Flip-flop iterations of :func:`sigma_core.decompose.kronecker_fit`.

    Returns
    -------
    torch.Tensor, shape (p, p)
    """
    p = sigma.shape[0]
    if target == "identity":
        return torch.eye(p, dtype=sigma.dtype, device=sigma.device) * (torch.trace(sigma) / p)
    if target == "kronecker":
        if channels is None or channels < 1 or p % channels:
            raise ValueError(f"channels must divide the Sigma size {p} (S of p = S*H*W) for the Kronecker "
                             f"target, got {channels!r}")
        spatial = p // channels
        if spatial == 1 or channels == 1:
            return sigma.clone()
        from sigma_core.decompose import kronecker_fit

        # Jitter relative to the scale keeps the flip-flop's Cholesky factors defined for a singular Sigma
        # (fewer patches than p); it perturbs T by 1e-10 of its scale.
        eye = torch.eye(p, dtype=sigma.dtype, device=sigma.device)
        sigma_s, sigma_p = kronecker_fit(sigma + 1e-10 * (torch.trace(sigma) / p) * eye, channels, spatial,
                                         iters=kron_iters)
        t = torch.kron(sigma_s, sigma_p)
        return 0.5 * (t + t.T)
    raise ValueError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")


def shrinkage_intensity(sigma: torch.Tensor, n_samples: float, target: torch.Tensor, estimator: str = "oas", *,
                        fourth_moment: float | None = None) -> float:
    """lambda of (S2) / (S3).

    Parameters
    ----------
    sigma : torch.Tensor, shape (p, p)
        Sample second moment of ``n_samples`` patches.
    n_samples : float
        Number of (independent) patches m behind Sigma, > 0.
    target : torch.Tensor, shape (p, p)
        From :func:`shrinkage_target`.
    estimator : {"oas", "lw"}
    fourth_moment : float, optional
        ``E||u||^4`` over the same patches ("lw" only; default: its Gaussian value from Sigma).

    Returns
    -------
    float
        In [0, 1].
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {', '.join(ESTIMATORS)}, got {estimator!r}")
    if not n_samples > 0:
        raise ValueError(f"n_samples must be > 0 (the patch count behind Sigma), got {n_samples!r}")
    p = sigma.shape[0]
    if p == 1:
        return 0.0  # scikit-learn's convention: one feature, nothing to shrink
    s = sigma.to(torch.float64)
    frob2 = float((s * s).sum())
    tr = float(torch.trace(s))
    dist2 = float(((s - target.to(torch.float64)) ** 2).sum())
    if estimator == "oas":
        if dist2 == 0.0:
            return 1.0  # scikit-learn's convention (Sigma already equals the target: lambda does not matter)
        return min((frob2 + tr * tr) / ((n_samples + 1.0) * dist2), 1.0)
    m4 = tr * tr + 2.0 * frob2 if fourth_moment is None else float(fourth_moment)
    beta = min((m4 - frob2) / n_samples, dist2)
    return 0.0 if beta <= 0.0 or dist2 == 0.0 else beta / dist2


def shrink(sigma: torch.Tensor, n_samples: float | None = None, *, estimator: str = "oas",
           target: str = "identity", intensity: float | None = None, channels: int | None = None,
           fourth_moment: float | None = None) -> ShrinkageResult:
    """Shrunk Sigma (S1) with the intensity of ``estimator`` (or the given ``intensity``).

    Parameters
    ----------
    sigma : torch.Tensor, shape (p, p)
        Symmetric PSD second moment (validated).
    n_samples : float, optional
        Patches behind Sigma (required unless ``intensity`` is given).
    estimator : {"oas", "lw"}
    target : {"identity", "kronecker"}
    intensity : float, optional
        Use this lambda instead of estimating one; must be in [0, 1].
    channels : int, optional
        S of ``p = S * P``, for the Kronecker target.
    fourth_moment : float, optional
        ``E||u||^4`` (Ledoit-Wolf only).

    Returns
    -------
    ShrinkageResult

    Raises
    ------
    ValueError
        Intensity outside [0, 1], unknown estimator/target, missing n_samples, malformed Sigma.
    """
    from sigma_core.covariance import validate_sigma

    validate_sigma(sigma)
    if intensity is not None:
        lam = float(intensity)
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"shrinkage intensity must be in [0, 1], got {intensity!r}")
        how = "fixed"
    elif n_samples is None:
        raise ValueError("n_samples (patches behind Sigma) is required to estimate the intensity; or pass "
                         "intensity=")
    else:
        how = estimator
    t = shrinkage_target(sigma, target, channels=channels)
    if target == "kronecker" and channels is not None and channels in (1, sigma.shape[0]) and intensity is None:
        return ShrinkageResult(sigma.clone(), 0.0, target, how)  # Sigma is its own Kronecker fit: nothing to do
    if intensity is None:
        lam = shrinkage_intensity(sigma, n_samples, t, estimator, fourth_moment=fourth_moment)
    out = (1.0 - lam) * sigma + lam * t
    out = torch.triu(out) + torch.triu(out, 1).T  # exactly symmetric on every BLAS
    validate_sigma(out)
    return ShrinkageResult(out, float(lam), target, how)

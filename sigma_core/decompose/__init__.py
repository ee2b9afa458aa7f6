"""Decompositions of conv kernels; each returns a frozen result dataclass."""

from sigma_core.decompose._result import Tucker2Result
from sigma_core.decompose.tucker2_frobenius import tucker2_als
from sigma_core.decompose.tucker2_sigma import Tucker2SigmaConfig, kronecker_fit, tucker2_als_sigma

__all__ = ["Tucker2Result", "Tucker2SigmaConfig", "kronecker_fit", "tucker2_als", "tucker2_als_sigma"]

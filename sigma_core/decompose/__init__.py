"""Decompositions of conv kernels; each returns a frozen result dataclass."""

from sigma_core.decompose._checks import INITS
from sigma_core.decompose._result import CPResult, LowRankResult, Tucker2Result
from sigma_core.decompose.cp_frobenius import cp_als
from sigma_core.decompose.cp_sigma import CPSigmaConfig, cp_als_sigma
from sigma_core.decompose.deflation import cp_deflation_sigma
from sigma_core.decompose.svd_sigma import svd_sigma, svd_truncated
from sigma_core.decompose.tucker2_frobenius import tucker2_als
from sigma_core.decompose.tt_svd import tt_break_even_rank, tt_svd, tt_svd_ranks, tt_tied_max_rank, tt_tied_params
from sigma_core.decompose.tucker2_sigma import Tucker2SigmaConfig, kronecker_fit, tucker2_als_sigma
from sigma_core.decompose.weighted import (
    WeightedTucker2Config,
    ag_lra,
    fw_lra,
    row_weighted_tucker2,
    weighted_rel_err,
    weighted_tucker2,
)

__all__ = ["Tucker2Result", "Tucker2SigmaConfig", "kronecker_fit", "tucker2_als", "tucker2_als_sigma"]
__all__ += ["LowRankResult", "svd_sigma", "svd_truncated"]
__all__ += ["WeightedTucker2Config", "ag_lra", "fw_lra", "row_weighted_tucker2", "weighted_rel_err", "weighted_tucker2"]
__all__ += ["INITS"]
__all__ += ["CPResult", "CPSigmaConfig", "cp_als", "cp_als_sigma", "cp_deflation_sigma"]
__all__ += ["tt_svd", "tt_svd_ranks", "tt_tied_max_rank", "tt_break_even_rank", "tt_tied_params"]

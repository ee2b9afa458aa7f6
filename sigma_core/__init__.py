"""Pure math of data-aware (Sigma-norm) low-rank compression: torch/numpy/scipy/tensorly only."""

from sigma_core.covariance import (
    SigmaAccumulator,
    SigmaCapture,
    SigmaFactor,
    accumulate_sigma,
    conv_patches,
    factor_sigma,
    layer_patches,
    patch_dim,
    validate_sigma,
)
from sigma_core.decompose import Tucker2Result, Tucker2SigmaConfig, kronecker_fit, tucker2_als, tucker2_als_sigma
from sigma_core.decompose import LowRankResult, svd_sigma, svd_truncated
from sigma_core.decompose import WeightedTucker2Config, ag_lra, fw_lra, weighted_tucker2
from sigma_core.decompose import CPResult, CPSigmaConfig, cp_als, cp_als_sigma, cp_deflation_sigma
from sigma_core.decompose import INITS
from sigma_core.decompose import tt_break_even_rank, tt_svd, tt_svd_ranks, tt_tied_max_rank, tt_tied_params
from sigma_core.layers import CPConv, LowRank1x1Conv, LowRankLinear, Tucker2Conv, module_from_spec
from sigma_core.metrics import rel_frob_err, rel_sigma_err, sigma_norm_sq
from sigma_core.ranks import (
    EVBMFResult,
    RankRule,
    alpha_rank,
    cp_max_rank,
    cp_rank_alpha,
    cp_rank_from_fraction,
    cp_vbmf_rank,
    evbmf,
    ranks_from_fraction,
    tucker2_ranks_alpha,
    tucker2_vbmf_ranks,
    validate_cp_rank,
    validate_tucker2_ranks,
)
from sigma_core.surgery import (
    LayerChoice,
    compression_rate,
    count_macs,
    count_params,
    get_module,
    plan_layers,
    replace_modules,
)

__all__ = [
    "LowRank1x1Conv",
    "LowRankResult",
    "WeightedTucker2Config",
    "ag_lra",
    "fw_lra",
    "svd_sigma",
    "svd_truncated",
    "weighted_tucker2",
    "EVBMFResult",
    "LayerChoice",
    "LowRankLinear",
    "RankRule",
    "SigmaAccumulator",
    "SigmaCapture",
    "SigmaFactor",
    "Tucker2Conv",
    "Tucker2Result",
    "Tucker2SigmaConfig",
    "accumulate_sigma",
    "alpha_rank",
    "compression_rate",
    "conv_patches",
    "count_macs",
    "count_params",
    "cp_max_rank",
    "evbmf",
    "factor_sigma",
    "get_module",
    "kronecker_fit",
    "layer_patches",
    "module_from_spec",
    "patch_dim",
    "plan_layers",
    "ranks_from_fraction",
    "rel_frob_err",
    "rel_sigma_err",
    "replace_modules",
    "sigma_norm_sq",
    "tucker2_als",
    "tucker2_als_sigma",
    "tucker2_ranks_alpha",
    "tucker2_vbmf_ranks",
    "validate_sigma",
    "validate_tucker2_ranks",
]
__all__ += ["CPConv", "CPResult", "CPSigmaConfig", "cp_als", "cp_als_sigma", "cp_deflation_sigma",
            "cp_rank_alpha", "cp_rank_from_fraction", "cp_vbmf_rank", "validate_cp_rank"]
__all__ += ["INITS"]
__all__ += ["tt_svd", "tt_svd_ranks", "tt_tied_max_rank", "tt_break_even_rank", "tt_tied_params"]
from sigma_core.rank_search import (  # noqa: E402  (RENE rank search, pure parts)
    MixedRankConv,
    RankSearchResult,
    StageRecord,
    candidate_grid,
    logit_loss,
    project_to_budget,
    rank_loss,
    refine,
    weight_loss,
)

__all__ += ["MixedRankConv", "RankSearchResult", "StageRecord", "candidate_grid", "logit_loss", "project_to_budget",
            "rank_loss", "refine", "weight_loss"]

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
from sigma_core.layers import LowRankLinear, Tucker2Conv, module_from_spec
from sigma_core.metrics import rel_frob_err, rel_sigma_err, sigma_norm_sq
from sigma_core.ranks import (
    EVBMFResult,
    RankRule,
    alpha_rank,
    cp_max_rank,
    evbmf,
    ranks_from_fraction,
    tucker2_ranks_alpha,
    tucker2_vbmf_ranks,
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

__all__ = [name for name in dir() if not name.startswith("_") and name[0].isupper() or name in {
    "accumulate_sigma", "conv_patches", "factor_sigma", "layer_patches", "patch_dim", "validate_sigma",
    "kronecker_fit", "tucker2_als", "tucker2_als_sigma", "module_from_spec", "rel_frob_err", "rel_sigma_err",
    "sigma_norm_sq", "alpha_rank", "cp_max_rank", "evbmf", "ranks_from_fraction", "tucker2_ranks_alpha",
    "tucker2_vbmf_ranks", "validate_tucker2_ranks", "compression_rate", "count_macs", "count_params",
    "get_module", "plan_layers", "replace_modules",
}]

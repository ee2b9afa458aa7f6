"""The method registry's solver options: validation and the CP initialization reaching both CP solvers."""

from __future__ import annotations

import pytest
import torch

from pipeline.methods import SolverOptions, get_method
from sigma_core import RankRule


def test_solver_options_reject_bad_values():
    with pytest.raises(ValueError, match="cp_init"):
        SolverOptions(cp_init="hosvd")
    with pytest.raises(ValueError, match="max_iter"):
        SolverOptions(max_iter=-1)
    with pytest.raises(ValueError, match="tol"):
        SolverOptions(tol=float("nan"))


def test_cp_init_reaches_the_cp_solvers():
    assert SolverOptions().cp_config().init == "svd"
    assert SolverOptions(cp_init="random").cp_config().init == "random"


@pytest.mark.parametrize("name", ["cp-als", "cp-als-sigma"])
def test_random_cp_init_depends_on_the_seed(name):
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(8, 6, 3, 3, generator=gen, dtype=torch.float64)
    u = torch.randn(200, 54, generator=gen, dtype=torch.float64)
    sigma = u.T @ u / 200
    method = get_method(name)
    ranks = method.resolve_ranks(RankRule(cp_rank=5), weight)

    def run(init: str, seed: int) -> torch.Tensor:
        options = SolverOptions(max_iter=2, cp_init=init, seed=seed)
        return method.decompose(weight, sigma, ranks, options, "cpu").reconstruct()

    assert not torch.allclose(run("random", 0), run("random", 1))
    torch.testing.assert_close(run("random", 4), run("random", 4))
    # CP-ALS-Sigma's SVD start: R = 5 <= H * W * min(T, S) triplets exist, no random fill, so no seed dependence.
    # (tensorly's SVD init fills modes smaller than R -- H, W = 3 < 5 -- with seeded random columns.)
    if name == "cp-als-sigma":
        torch.testing.assert_close(run("svd", 0), run("svd", 1))

"""SVD-Sigma (paper App. E): optimality under the Sigma norm, singular Sigma, layers, ranks, compress job."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sigma_core import (
    LowRank1x1Conv,
    LowRankLinear,
    LowRankResult,
    RankRule,
    evbmf,
    module_from_spec,
    svd_sigma,
    svd_truncated,
)
from tests._helpers import feature_conv, fmnist_images, real_sigma, sigma_sq_err


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _min_objective(w: torch.Tensor, sigma: torch.Tensor, r: int) -> float:
    """Independent optimum: ``sum_{i>r} lambda_i(W Sigma W^T)`` (Eckart-Young on W Sigma^{1/2}, via eigenvalues)."""
    evals = torch.linalg.eigvalsh(w @ sigma @ w.T).flip(0).clamp_min(0)
    return float(evals[r:].sum())


def _assert_locally_optimal(w, sigma, approx, r, *, trials=40, seed=0):
    """No random rank-r perturbation ``(second + dU)(first + dF)`` of the factorization does better."""
    u, s, vh = torch.linalg.svd(approx)
    a, b = u[:, :r] * s[:r], vh[:r]
    best = sigma_sq_err(w, approx, sigma)
    gen = torch.Generator().manual_seed(seed)
    for i in range(trials):
        eps = 10.0 ** -(1 + i % 4)
        da = torch.randn(a.shape, generator=gen, dtype=torch.float64) * eps * a.norm()
        db = torch.randn(b.shape, generator=gen, dtype=torch.float64) * eps * b.norm()
        assert sigma_sq_err(w, (a + da) @ (b + db), sigma) >= best * (1 - 1e-12) - 1e-14


@pytest.mark.parametrize("out_f, channels, k, r", [(10, 4, 2, 3), (20, 1, 3, 5), (16, 4, 2, 16)])
def test_svd_sigma_is_the_minimizer(out_f, channels, k, r):
    sigma = real_sigma(channels, k, k)  # real FMNIST patches: in = channels * k * k
    in_f = sigma.shape[0]
    w = _rand(out_f, in_f)
    res = svd_sigma(w, sigma, r)
    approx = res.reconstruct()
    assert isinstance(res, LowRankResult) and res.rank == r and res.ranks == (r,) and res.converged
    assert res.first.shape == (r, in_f) and res.second.shape == (out_f, r) and res.metric == "rel_sigma_err"
    # Paper App. E: W~ = [W L]_r L^{-1}, first = S_r V_r^T L^{-1}, second = U_r.
    chol = torch.linalg.cholesky(sigma)
    u, s, vh = torch.linalg.svd(w @ chol, full_matrices=False)
    paper_first = torch.linalg.solve_triangular(chol, (s[:r, None] * vh[:r]), upper=False, left=False)
    torch.testing.assert_close(res.first, paper_first, rtol=1e-8, atol=1e-10 * float(paper_first.abs().max()))
    torch.testing.assert_close(res.second.abs(), u[:, :r].abs())
    # Optimal value from an independent computation, and the reported error matches it.
    f_min = _min_objective(w, sigma, r)
    assert sigma_sq_err(w, approx, sigma) == pytest.approx(f_min, rel=1e-9, abs=1e-12)
    assert res.errors[0] == pytest.approx((f_min / sigma_sq_err(w, 0 * w, sigma)) ** 0.5, rel=1e-8, abs=1e-12)
    _assert_locally_optimal(w, sigma, approx, r)
    # Rank r at most.
    assert torch.linalg.matrix_rank(approx) <= r


def test_svd_sigma_beats_alternating_least_squares():
    """Alternating least squares over all rank-r pairs ``A B`` under the Sigma norm never gets below the closed form."""
    sigma = real_sigma(3, 2, 2)  # n = 12
    w = _rand(8, 12, seed=3)
    r = 3
    best = sigma_sq_err(w, svd_sigma(w, sigma, r).reconstruct(), sigma)
    for seed in range(3):
        b = _rand(r, 12, seed=10 + seed)
        for _ in range(300):
            a = w @ sigma @ b.T @ torch.linalg.inv(b @ sigma @ b.T)  # exact in A for fixed B
            b = torch.linalg.solve(a.T @ a, a.T @ w)  # exact in B for fixed A (Sigma invertible)
        found = sigma_sq_err(w, a @ b, sigma)
        assert best * (1 - 1e-9) <= found <= best * 1.001  # ALS reaches the optimum, never beats it


def test_svd_sigma_rank_deficient_sigma():
    """Singular Sigma (dead channels, fewer samples than features): still the exact minimizer, finite factors."""
    x = _rand(6, 14, seed=1) ** 2  # 6 samples of 14 features: rank 6
    x[:, 3] = 0.0  # a dead input
    sigma = x.T @ x / x.shape[0]
    w = _rand(9, 14, seed=2)
    for r in (2, 5, 7):  # 7 > rank(Sigma): the tail is zero
        res = svd_sigma(w, sigma, r)
        assert res.info["factor"] == "eigen"
        assert torch.isfinite(res.first).all() and torch.isfinite(res.second).all()
        f = sigma_sq_err(w, res.reconstruct(), sigma)
        scale = sigma_sq_err(w, 0 * w, sigma)
        assert f == pytest.approx(_min_objective(w, sigma, r), rel=1e-8, abs=1e-12 * scale)
        _assert_locally_optimal(w, sigma, res.reconstruct(), r)
    # Jittered Sigma converges to the same optimum value (continuity check, independent of the eigen path).
    jittered = svd_sigma(w, sigma + 1e-9 * torch.eye(14, dtype=torch.float64), 2)
    assert sigma_sq_err(w, jittered.reconstruct(), sigma) == pytest.approx(_min_objective(w, sigma, 2), rel=1e-5)


def test_svd_sigma_vs_plain_svd_and_input_checks():
    sigma = real_sigma(4, 2, 2)
    w = _rand(12, 16, seed=7)
    sig, plain = svd_sigma(w, sigma, 4), svd_truncated(w, 4)
    assert plain.metric == "rel_frob_err" and plain.method == "svd" and sig.method == "svd-sigma"
    torch.testing.assert_close(plain.reconstruct(), torch.linalg.svd(w)[0][:, :4] @ torch.linalg.svd(w)[0][:, :4].T @ w)
    assert sigma_sq_err(w, sig.reconstruct(), sigma) < sigma_sq_err(w, plain.reconstruct(), sigma)
    assert (w - plain.reconstruct()).norm() <= (w - sig.reconstruct()).norm()
    with pytest.raises(ValueError, match="Tucker-2 or CP"):
        svd_sigma(_rand(4, 4, 3, 3), sigma, 2)
    with pytest.raises(ValueError, match="exceeds min"):
        svd_sigma(w, sigma, 13)
    with pytest.raises(ValueError, match="this layer needs"):
        svd_sigma(w, real_sigma(2, 2, 2), 2)
    res32 = svd_sigma(w.float(), sigma, 4)
    assert res32.first.dtype == torch.float32 and res32.reconstruct().shape == (12, 16)


def test_1x1_conv_layer_equals_dense_and_proposition_1():
    """Sigma of 1x1 patches = channel second moment; LowRank1x1Conv == dense conv with W~; MSE == Sigma error."""
    s_ch, t_ch, r = 6, 10, 3
    sigma = real_sigma(s_ch, 1, 1, n_images=32)
    x = torch.relu(feature_conv(s_ch)(fmnist_images(32))).detach()
    conv = nn.Conv2d(s_ch, t_ch, 1, bias=True).double()
    res = svd_sigma(conv.weight.detach(), sigma, r)
    assert res.reconstruct().shape == (t_ch, s_ch, 1, 1)
    layer = LowRank1x1Conv.from_result(conv, res)
    dense = F.conv2d(x, res.reconstruct(), conv.bias)
    torch.testing.assert_close(layer(x), dense)
    # Proposition 1: mean over positions of the squared output change = ||(W - W~) L||_F^2.
    mse = float(((conv(x) - layer(x)) ** 2).sum(1).mean().detach())
    assert mse == pytest.approx(sigma_sq_err(conv.weight.detach(), res.reconstruct(), sigma), rel=1e-9)
    # Stride and padding of the original 1x1 conv are kept (first conv), reflect padding included.
    for kwargs in ({"stride": 2, "padding": 1}, {"padding": 2, "padding_mode": "reflect", "bias": False}):
        c = nn.Conv2d(s_ch, t_ch, 1, **kwargs).double()
        lr = LowRank1x1Conv.from_result(c, svd_sigma(c.weight.detach(), sigma, r))
        ref = nn.Conv2d(s_ch, t_ch, 1, **kwargs).double()
        with torch.no_grad():
            ref.weight.copy_(lr.reconstructed_kernel())
            if c.bias is not None:
                ref.bias.copy_(c.bias)
        torch.testing.assert_close(lr(x[:4]), ref(x[:4]))
        # spec round trip: rebuild empty, load, same output
        again = module_from_spec(lr.spec(), dtype=torch.float64)
        again.load_state_dict(lr.state_dict())
        torch.testing.assert_close(again(x[:4]), lr(x[:4]))
    with pytest.raises(ValueError, match="grouped"):
        LowRank1x1Conv.from_result(nn.Conv2d(6, 10, 1, groups=2).double(),
                                   svd_sigma(_rand(10, 6, 1, 1), sigma, r))
    with pytest.raises(ValueError, match="1x1"):
        LowRank1x1Conv.from_result(nn.Conv2d(6, 10, 3).double(), res)


def test_decompose_layer_on_a_strided_1x1_conv_with_covariance_sigma():
    """pipeline.decompose_layer: sigma_core.covariance's Sigma of a strided 1x1 conv feeds SVD-Sigma; the
    replacement is a LowRank1x1Conv whose output error is the reported Sigma error (Proposition 1)."""
    from pipeline.compress import decompose_layer
    from sigma_core import accumulate_sigma

    x = torch.relu(feature_conv(5)(fmnist_images(16))).detach()
    model = nn.Sequential(nn.Conv2d(5, 8, 1, stride=2, bias=True)).double()
    sigma = accumulate_sigma(model, [x[:8], x[8:]], ["0"])["0"].finalize()
    outcome, new = decompose_layer("0", model[0], sigma, RankRule(svd_rank=2), "svd-sigma")
    assert outcome.ok and outcome.ranks == (2,) and isinstance(new, LowRank1x1Conv) and new.stride == (2, 2)
    w = model[0].weight.detach()
    with torch.no_grad():
        mse = float(((model(x) - new(x)) ** 2).sum(1).mean())
        err_sq = sigma_sq_err(w, new.reconstructed_kernel(), sigma)
    assert mse == pytest.approx(err_sq, rel=1e-9)
    assert outcome.rel_sigma_err == pytest.approx((err_sq / sigma_sq_err(w, 0 * w, sigma)) ** 0.5, rel=1e-9)
    assert outcome.params_after < outcome.params_before


def test_linear_layer_equals_dense():
    lin = nn.Linear(16, 12).double()
    x = _rand(32, 16, seed=9)
    sigma = x.T @ x / 32
    res = svd_sigma(lin.weight.detach(), sigma, 5)
    layer = LowRankLinear.from_factors(lin, res.first, res.second)
    torch.testing.assert_close(layer(x), F.linear(x, res.reconstruct(), lin.bias))
    mse = float(((lin(x) - layer(x)) ** 2).sum(1).mean().detach())
    assert mse == pytest.approx(sigma_sq_err(lin.weight.detach(), res.reconstruct(), sigma), rel=1e-9)


def test_rank_rule_resolve_svd():
    gen = torch.Generator().manual_seed(0)
    planted = torch.randn(40, 4, generator=gen) @ torch.randn(4, 60, generator=gen) * 10
    w = planted + 0.01 * torch.randn(40, 60, generator=gen)
    assert evbmf(w).rank == 4
    assert RankRule(alpha=1.0).resolve_svd(w) == 4
    assert RankRule(alpha=0.0).resolve_svd(w) == 40
    assert RankRule(alpha=0.5).resolve_svd(w) == 22  # 4 + 0.5 * (40 - 4)
    assert RankRule(fraction=0.25).resolve_svd(w) == 10
    assert RankRule(svd_rank=7).resolve_svd(w) == 7
    assert RankRule(svd_rank=3).resolve_svd(w.reshape(40, 60, 1, 1)) == 3
    assert "r=7" in RankRule(svd_rank=7).describe()
    with pytest.raises(ValueError, match="exceeds min"):
        RankRule(svd_rank=41).resolve_svd(w)
    with pytest.raises(ValueError, match="not an SVD rank"):
        RankRule(ranks=(2, 2)).resolve_svd(w)
    with pytest.raises(ValueError, match="SVD rank"):
        RankRule(svd_rank=2).resolve(torch.zeros(4, 4, 3, 3))
    with pytest.raises(ValueError, match="exactly one"):
        RankRule(svd_rank=2, alpha=0.5)
    with pytest.raises(ValueError, match="Tucker-2 or CP ranks"):
        RankRule(alpha=0.5).resolve_svd(torch.zeros(4, 4, 3, 3))


# ------------------------------------------------------------------------------------------ compress job




def _job_config(tmp_path, weights, **overrides):
    from pipeline.compress import SigmaSource
    from pipeline.data import DatasetSpec
    from pipeline.methods import SolverOptions
    from pipeline.runner import CompressConfig

    base = dict(model="vgg-fmnist", weights=str(weights) if weights else None, eval_limit=64, batch_size=64,
                progress=False, sigma=SigmaSource(DatasetSpec("fashion-mnist"), n_samples=48, batch_size=24),
                cache_dir=str(tmp_path / "cache"), output_dir=str(tmp_path / "out"), track=False,
                solver=SolverOptions(max_iter=4))
    return CompressConfig(**{**base, **overrides})


def test_plan_points_hybrid_and_last_linear(tmp_path):
    from pipeline.models import build_model
    from pipeline.runner import plan_points

    vgg = build_model("vgg-fmnist")
    assignment, layers, plan = plan_points(vgg, _job_config(tmp_path, None, methods=("svd-sigma",), svd_rank=4))
    assert assignment == {"svd-sigma": {"classifier.1": "svd-sigma"}} and layers == ["classifier.1"]
    last = next(c for c in plan if c["name"] == "classifier.4")
    assert not last["selected"] and "final classifier" in last["reason"]
    hybrid = _job_config(tmp_path, None, methods=("tucker2-als", "tucker2-als-sigma"), linear_method="svd")
    assignment, layers, _ = plan_points(vgg, hybrid)
    convs = ["features.4", "features.7", "features.11", "features.14"]  # features.0 (first conv) stays dense
    for method in hybrid.methods:
        assert assignment[method] == {**dict.fromkeys(convs, method), "classifier.1": "svd"}
    assert layers == [*convs, "classifier.1"]
    everything = _job_config(tmp_path, None, methods=("svd",), svd_rank=4, compress_last_linear=True)
    assert list(plan_points(vgg, everything)[0]["svd"]) == ["classifier.1", "classifier.4"]
    with pytest.raises(ValueError, match="no layer selected"):
        plan_points(build_model("resnet-fmnist"), _job_config(tmp_path, None, methods=("svd-sigma",)))
    with pytest.raises(ValueError, match="SVD method"):
        _job_config(tmp_path, None, linear_method="tucker2-als")
    with pytest.raises(ValueError, match="svd_rank"):
        _job_config(tmp_path, None, methods=("svd-sigma",), ranks=(2, 2))


def test_compress_job_svd_and_hybrid(tmp_path, vgg_weights):
    from pipeline.compress import load_compressed
    from pipeline.runner import run_compress
    from sigma_core import Tucker2Conv, get_module

    # One job, three points: SVD-Sigma and SVD alone (they take the linear layer only), and the hybrid of paper
    # Table 5 (the conv by Tucker2-ALS-Sigma, the linear layer by SVD-Sigma); alpha rule for every layer.
    config = _job_config(tmp_path, vgg_weights, methods=("svd-sigma", "svd", "tucker2-als-sigma"),
                         linear_method="svd-sigma", alphas=(0.9,), layers=("features.4", "classifier.1"))
    points = {p["method"]: p for p in run_compress(config)["points"]}
    assert set(points) == {"svd-sigma", "svd", "tucker2-als-sigma+svd-sigma"}
    assert all(p["failed_layers"] == 0 and p["compression_rate"] > 1 for p in points.values())
    rows = {m: {row["name"]: row for row in p["layers"]} for m, p in points.items()}
    assert set(rows["svd"]) == set(rows["svd-sigma"]) == {"classifier.1"}
    sig, plain = rows["svd-sigma"]["classifier.1"], rows["svd"]["classifier.1"]
    assert sig["ranks"] == plain["ranks"] and len(sig["ranks"]) == 1
    assert sig["rel_sigma_err"] < plain["rel_sigma_err"] and sig["rel_frob_err"] > plain["rel_frob_err"]
    hybrid = rows["tucker2-als-sigma+svd-sigma"]
    assert {n: r["method"] for n, r in hybrid.items()} == {"features.4": "tucker2-als-sigma",
                                                          "classifier.1": "svd-sigma"}
    assert hybrid["classifier.1"]["ranks"] == sig["ranks"]
    rebuilt = load_compressed(Path(config.output_dir) / points["tucker2-als-sigma+svd-sigma"]["model_dir"])
    assert isinstance(get_module(rebuilt, "features.4"), Tucker2Conv)
    assert isinstance(get_module(rebuilt, "classifier.1"), LowRankLinear)

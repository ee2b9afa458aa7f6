"""FW-LRA / AG-LRA weighted Tucker-2 baselines (paper Sec. 5.4) and their data statistics (pipeline.fisher)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.fisher import fisher_diagonal, mean_abs_activation
from sigma_core import WeightedTucker2Config, ag_lra, fw_lra, tucker2_als, weighted_tucker2
from sigma_core.decompose.weighted import _row_wls, row_weighted_tucker2, weighted_rel_err
from tests._helpers import fmnist_images


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _fisher_like(*shape: int, seed: int = 1) -> torch.Tensor:
    """Positive weights spanning several orders of magnitude, like a Fisher diagonal."""
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) ** 4 + 1e-6


def test_fw_lra_error_never_increases_and_beats_frobenius():
    k = _rand(12, 10, 3, 3)
    fisher = _fisher_like(12, 10, 3, 3)
    res = fw_lra(k, fisher, (5, 4), config=WeightedTucker2Config(max_iter=25, tol=0))
    errs = np.array(res.errors)
    assert res.method == "fw-lra" and res.metric == "rel_weighted_err" and res.ranks == (5, 4)
    assert np.all(np.diff(errs) <= 1e-12 * errs[:-1])
    assert errs[-1] < 0.9 * errs[0]  # the weighting matters: clearly better than its Frobenius start
    approx = res.reconstruct()
    assert weighted_rel_err(k, approx, fisher.sqrt()) == pytest.approx(errs[-1], rel=1e-10)
    frob = tucker2_als(k, (5, 4))
    assert errs[-1] < weighted_rel_err(k, frob.reconstruct(), fisher.sqrt())
    # Orthonormal factors (re-orthonormalized every update).
    torch.testing.assert_close(res.u_t.T @ res.u_t, torch.eye(5, dtype=torch.float64))
    torch.testing.assert_close(res.u_s.T @ res.u_s, torch.eye(4, dtype=torch.float64))


def test_row_wls_is_exact_weighted_least_squares():
    """Each factor row solves its weighted least-squares problem exactly (vs. numpy lstsq on sqrt-weighted rows)."""
    design, w2, target = _rand(4, 30, seed=2), _fisher_like(7, 30), _rand(7, 30, seed=3)
    design[3] = design[2]  # singular normal matrix: the pseudo-inverse still gives an exact minimizer
    x = _row_wls(design, w2, target)
    for i in range(7):
        sw = w2[i].sqrt().numpy()
        ref = np.linalg.lstsq((design.numpy() * sw).T, target[i].numpy() * sw, rcond=None)[0]
        np.testing.assert_allclose(x[i].numpy(), ref, rtol=1e-8, atol=1e-10)


def test_weighted_als_reaches_a_stationary_point():
    """At convergence the gradient of the weighted objective w.r.t. every factor vanishes (relative to the start)."""
    k, fisher = _rand(8, 6, 3, 3, seed=4), _fisher_like(8, 6, 3, 3, seed=5)
    res = fw_lra(k, fisher, (3, 3), config=WeightedTucker2Config(max_iter=400, tol=1e-13, core_cg_steps=200))
    start = tucker2_als(k, (3, 3))

    def grad_norm(r):
        core, u_t, u_s = (t.clone().requires_grad_() for t in (r.core, r.u_t, r.u_s))
        approx = torch.einsum("abhw,ta,sb->tshw", core, u_t, u_s)
        (fisher * (k - approx) ** 2).sum().backward()
        return sum(float(t.grad.norm()) for t in (core, u_t, u_s))

    assert grad_norm(res) < 1e-3 * grad_norm(start)


def test_row_weights_closed_form():
    """Output-channel weights: K~ = D^{-1} Tucker2(D K), the same optimum as the generic weighted ALS."""
    k = _rand(10, 8, 3, 3, seed=6)
    act = torch.rand(10, generator=torch.Generator().manual_seed(7), dtype=torch.float64) + 0.05
    res = ag_lra(k, act, (4, 3))
    assert res.method == "ag-lra" and res.metric == "rel_weighted_err"
    d = act[:, None, None, None]
    # The reduction: K~ = D^{-1} Tucker2(D K) (weights scaled to mean square 1), whose weighted error is the
    # Frobenius Tucker-2 error of D K.
    d_n = d / act.pow(2).mean().sqrt()
    inner = tucker2_als(d_n * k, (4, 3), n_iter_max=50, tol=1e-6)  # the inner HOOI's settings (default config)
    torch.testing.assert_close(res.reconstruct(), inner.reconstruct() / d_n)
    err = weighted_rel_err(k, res.reconstruct(), d)
    assert err == pytest.approx(inner.errors[-1], rel=1e-9)
    assert err == pytest.approx(res.errors[-1], rel=1e-9)
    generic = weighted_tucker2(k, d, (4, 3), config=WeightedTucker2Config(init="svd", max_iter=400, tol=1e-12))
    assert generic.errors[-1] == pytest.approx(err, rel=1e-5)
    # A dead channel (a_t = 0) is floored, not divided by: finite factors.
    dead = act.clone()
    dead[2] = 0.0
    assert torch.isfinite(ag_lra(k, dead, (4, 3)).reconstruct()).all()


def test_uniform_weights_reduce_to_plain_tucker2():
    k = _rand(9, 7, 3, 3, seed=8)
    plain = tucker2_als(k, (4, 3), n_iter_max=50, tol=1e-6)  # the inner HOOI's settings (default config)
    rows = ag_lra(k, torch.full((9,), 3.0, dtype=torch.float64), (4, 3))
    torch.testing.assert_close(rows.reconstruct(), plain.reconstruct())
    uniform = weighted_tucker2(k, torch.ones(1, dtype=torch.float64), (4, 3),
                               config=WeightedTucker2Config(init="svd", max_iter=500, tol=1e-13))
    assert uniform.errors[-1] == pytest.approx(plain.errors[-1], rel=1e-5)


def test_input_checks():
    k = _rand(6, 5, 3, 3)
    with pytest.raises(ValueError, match="shape"):
        fw_lra(k, torch.ones(6, 5), (2, 2))
    with pytest.raises(ValueError, match="negative"):
        fw_lra(k, -torch.ones(6, 5, 3, 3), (2, 2))
    with pytest.raises(ValueError, match="all zero"):
        ag_lra(k, torch.zeros(6), (2, 2))
    with pytest.raises(ValueError, match="one per output channel"):
        row_weighted_tucker2(k, torch.ones(5), (2, 2))
    with pytest.raises(ValueError, match="R_T=7 exceeds"):
        ag_lra(k, torch.ones(6), (7, 2))
    with pytest.raises(ValueError, match="init"):
        WeightedTucker2Config(init="random")


# ---------------------------------------------------------------------------------------- data statistics


def test_fisher_diagonal_matches_hand_computation():
    """Linear classifier: per-sample gradient of the cross-entropy is (softmax(W x + b) - e_y) x^T."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).double()
    x = _rand(10, 1, 2, 2, seed=9)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 2])
    fisher = fisher_diagonal(model, [(x[:6], y[:6]), (x[6:], y[6:])], ["1"])["1"]
    w, b = model[1].weight.detach(), model[1].bias.detach()
    feats = x.reshape(10, 4)
    resid = torch.softmax(feats @ w.T + b, dim=1) - F.one_hot(y, 3).double()
    hand = torch.einsum("no,ni->noi", resid, feats).pow(2).mean(0)
    torch.testing.assert_close(fisher, hand, rtol=1e-10, atol=1e-14)
    # max_samples truncates mid-batch.
    part = fisher_diagonal(model, [(x[:6], y[:6]), (x[6:], y[6:])], ["1"], max_samples=8)["1"]
    torch.testing.assert_close(part, torch.einsum("no,ni->noi", resid[:8], feats[:8]).pow(2).mean(0))


def test_fisher_diagonal_of_a_conv_matches_a_per_sample_loop():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(inplace=True),
                          nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(12, 4)).double()
    model.train()
    model(_rand(8, 1, 6, 6, seed=10))  # non-trivial BatchNorm statistics
    x, y = _rand(5, 1, 6, 6, seed=11), torch.tensor([0, 3, 1, 2, 3])
    fisher = fisher_diagonal(model, [(x, y)], ["0", "5"])
    assert model.training  # training flag restored
    model.eval()
    ref = {name: 0 for name in ("0", "5")}
    for i in range(5):
        grads = torch.autograd.grad(F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]),
                                    [model[0].weight, model[5].weight])
        for name, g in zip(("0", "5"), grads):
            ref[name] = ref[name] + g**2 / 5
    for name in ref:
        torch.testing.assert_close(fisher[name], ref[name])


def test_mean_abs_activation_matches_hand_computation():
    conv = nn.Conv2d(1, 4, 3).double()
    model = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.LazyLinear(3).double())
    x = fmnist_images(6) - 0.5
    model(x)  # materialize the lazy layer
    act = mean_abs_activation(model, [x[:4], (x[4:], torch.zeros(2))], ["0", "3"])
    cols = F.unfold(x, 3)  # (B, 9, L)
    out = torch.einsum("tk,bkl->btl", conv.weight.reshape(4, 9), cols) + conv.bias[None, :, None]
    torch.testing.assert_close(act["0"], out.abs().mean(dim=(0, 2)).detach())
    lin_out = model(x).detach()
    torch.testing.assert_close(act["3"], lin_out.abs().mean(0))
    assert act["0"].shape == (4,) and act["3"].shape == (3,)


def test_compress_job_with_fw_lra_and_ag_lra(tmp_path):
    from safetensors.torch import save_file

    from pipeline.compress import SigmaSource
    from pipeline.data import DatasetSpec
    from pipeline.methods import SolverOptions
    from pipeline.models import build_model
    from pipeline.runner import CompressConfig, run_compress

    torch.manual_seed(0)
    model = build_model("vgg-fmnist")
    weights = tmp_path / "vgg.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    config = CompressConfig(model="vgg-fmnist", weights=str(weights), methods=("fw-lra", "ag-lra"),
                            sigma=SigmaSource(DatasetSpec("fashion-mnist"), n_samples=16, batch_size=8),
                            eval_limit=32, batch_size=32, alphas=(0.8,), layers=("features.4",),
                            output_dir=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"), track=False,
                            save_models=False, progress=False, solver=SolverOptions(max_iter=3))
    result = run_compress(config)
    points = {p["method"]: p for p in result["points"]}
    assert set(points) == {"fw-lra", "ag-lra"}
    assert points["fw-lra"]["layers"][0]["ranks"] == points["ag-lra"]["layers"][0]["ranks"]
    assert all(p["failed_layers"] == 0 and p["compression_rate"] > 1 for p in points.values())
    assert {"fisher_seconds", "activation_seconds"} <= set(result["stats_info"])
    assert result["sigma_info"]["cached"] is None  # neither baseline needs Sigma

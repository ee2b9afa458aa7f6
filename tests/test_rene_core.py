"""RENE pure parts: TT-SVD (A1), the supernet layer (A2), the Fig. 3 schedule (A3), the losses (A4)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from pipeline.methods import get_method
from sigma_core import CPConv, Tucker2Conv, cp_als, tt_svd
from sigma_core.decompose.tt_svd import tt_break_even_rank, tt_tied_params
from sigma_core.rank_search import (
    MixedRankConv,
    RankSearchResult,
    StageRecord,
    candidate_grid,
    logit_loss,
    n_stages,
    project_to_budget,
    rank_loss,
    refine,
    sanitize,
    weight_loss,
)

pytestmark = pytest.mark.usefixtures("single_thread")

CONVS = [
    dict(in_channels=16, out_channels=24, kernel_size=3, padding=1),
    dict(in_channels=32, out_channels=32, kernel_size=3, stride=2, padding=1),
    dict(in_channels=8, out_channels=16, kernel_size=(5, 3), dilation=2, padding=(2, 1)),
    dict(in_channels=8, out_channels=12, kernel_size=3, padding=1, padding_mode="reflect"),
]


def _conv(kwargs, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Conv2d(**kwargs).to(dtype)


# ---------------------------------------------------------------- A1
@pytest.mark.parametrize("kwargs", CONVS)
def test_tt_layer_equals_dense_conv_of_reconstruction(kwargs):
    conv = _conv(kwargs)
    t, s = conv.out_channels, conv.in_channels
    result = tt_svd(conv.weight.detach(), (max(1, t // 2), max(1, s // 3)))
    layer = Tucker2Conv.from_result(conv, result)
    x = torch.randn(2, s, 13, 11)
    ref = conv._conv_forward(x, result.reconstruct(), conv.bias)
    torch.testing.assert_close(layer(x), ref, atol=1e-5, rtol=1e-5)


def _eq3(kernel, r1, r2):
    """Independent TT-SVD by numpy-style steps and the Eq. 3 contraction of (G_t, G_y, G_s)."""
    t, s, h, w = kernel.shape
    u1, s1, v1 = torch.linalg.svd(kernel.permute(0, 2, 3, 1).reshape(t, -1), full_matrices=False)
    g_t = u1[:, :r1]
    m = (torch.diag(s1[:r1]) @ v1[:r1]).reshape(r1 * h * w, s)
    u2, s2, v2 = torch.linalg.svd(m, full_matrices=False)
    g_y = u2[:, :r2].reshape(r1, h, w, r2)
    g_s = torch.diag(s2[:r2]) @ v2[:r2]
    return torch.einsum("ta,ahwb,bs->tshw", g_t, g_y, g_s)


@pytest.mark.parametrize("kwargs", CONVS)
def test_tt_svd_matches_eq3_orthonormal_and_exact_at_full_rank(kwargs):
    kernel = _conv(kwargs, dtype=torch.float64).weight.detach()
    t, s, h, w = kernel.shape
    r1, r2 = max(1, t // 2), max(1, s // 2)
    result = tt_svd(kernel, (r1, r2))
    torch.testing.assert_close(result.reconstruct(), _eq3(kernel, r1, r2), atol=1e-10, rtol=0)
    torch.testing.assert_close(result.u_t.T @ result.u_t, torch.eye(r1, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(result.u_s.T @ result.u_s, torch.eye(r2, dtype=torch.float64), atol=1e-10, rtol=0)
    full = tt_svd(kernel, (min(t, s * h * w), s))
    assert full.errors[0] < 1e-10
    errs = [tt_svd(kernel, (min(r, t), min(r, s))).errors[0] for r in range(1, max(t, s) + 1)]
    assert all(b <= a + 1e-12 for a, b in zip(errs, errs[1:]))
    assert result.method == "tt-svd" and result.metric == "rel_frob_err" and result.converged


def test_tt_svd_rejects_infeasible_ranks_and_method_is_registered():
    kernel = torch.randn(8, 4, 3, 3)
    for bad in [(0, 2), (9, 2), (4, 5), (2,), (2.0, 2)]:
        with pytest.raises(ValueError):
            tt_svd(kernel, bad)
    with pytest.raises(ValueError, match="R2"):
        tt_svd(torch.randn(8, 16, 1, 1), (1, 2))  # R2 <= R1*H*W = 1
    method = get_method("tt-svd")
    assert method.family == "tucker2" and not method.needs_sigma
    res = method.decompose(kernel.double(), None, (3, 3), None, "cpu")
    assert res.ranks == (3, 3)


def test_tt_break_even_matches_spec_table():
    assert tt_break_even_rank((32, 32, 3, 3)) == 28
    assert tt_break_even_rank((64, 64, 3, 3)) == 57
    assert tt_break_even_rank((128, 128, 3, 3)) == 114
    assert tt_tied_params((32, 32, 3, 3), 32) == 11_264


# ---------------------------------------------------------------- A2
def _mixed(kwargs, ranks=(2, 4, 6), family="tucker2", seed=0):
    conv = _conv(kwargs, seed)
    w = conv.weight.detach()
    if family == "tucker2":
        branches = [Tucker2Conv.from_result(conv, tt_svd(w, (min(r, conv.out_channels), min(r, conv.in_channels))))
                    for r in ranks]
    else:
        branches = [CPConv.from_result(conv, cp_als(w.double(), r, n_iter_max=5)) for r in ranks]
    return conv, MixedRankConv(conv, branches, ranks)


@pytest.mark.parametrize("kwargs", CONVS)
def test_mixed_conv_one_hot_and_uniform(kwargs):
    conv, mixed = _mixed(kwargs)
    x = torch.randn(2, conv.in_channels, 12, 10)
    with torch.no_grad():
        mixed.logits.copy_(torch.tensor([0.0, 50.0, 0.0]))
        torch.testing.assert_close(mixed(x), mixed.branches[1](x), atol=1e-5, rtol=1e-5)
        assert mixed.best_rank() == 4
        mixed.logits.zero_()
        mean_kernel = mixed.branch_kernels().mean(0)
        torch.testing.assert_close(mixed(x), conv._conv_forward(x, mean_kernel, conv.bias), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["tucker2", "cp"])
def test_mixed_conv_gradients_finite_nonzero(family):
    conv, mixed = _mixed(CONVS[0], family=family)
    x = torch.randn(2, conv.in_channels, 9, 9)
    loss = mixed(x).square().mean() * rank_loss([mixed], 0.4, 0.8) + weight_loss([mixed], 0.4, 0.8)[0]
    loss.backward()
    for param in [mixed.logits, *mixed.branch_parameters()]:
        assert param.grad is not None and torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in mixed._conv.parameters())


def test_mixed_conv_rejects_bad_input_and_nan_logits():
    conv, mixed = _mixed(CONVS[0])
    with pytest.raises(ValueError, match="increasing"):
        MixedRankConv(conv, list(mixed.branches), (4, 2, 6))
    with pytest.raises(ValueError, match="one branch"):
        MixedRankConv(conv, list(mixed.branches)[:2], (2, 4, 6))
    with torch.no_grad():
        mixed.logits[0] = float("nan")
    with pytest.raises(FloatingPointError):
        mixed.best_rank()


# ---------------------------------------------------------------- A3
def test_fig3_schedule():
    lb, ub, s_next, grid = refine(200, 100, 10)
    assert (lb, ub, s_next) == (150, 250, 10) and grid == tuple(range(150, 251, 10))
    lb, ub, s_next, grid = refine(240, 10, 10)
    assert (lb, ub, s_next) == (235, 245, 1) and grid == tuple(range(235, 246))
    assert refine(240, 1, 10)[2] == 0 and refine(240, 1, 10)[3] == ()
    assert n_stages(10, 10) == 2 and n_stages(100, 10) == 3 and n_stages(4, 4) == 2
    assert candidate_grid(10, 100, 10) == tuple(range(10, 101, 10))
    assert sanitize((10, 20, 30, 40, 50), 32) == (10, 20, 30, 32)
    assert sanitize((30, 40, 50), 32) == (30, 32)
    assert refine(3, 10, 10)[0] == 1


@pytest.mark.parametrize("call", [lambda: candidate_grid(10, 5, 1), lambda: candidate_grid(0, 5, 1),
                                  lambda: candidate_grid(1, 5, 0), lambda: refine(10, 0, 2),
                                  lambda: refine(10, 4, 1), lambda: refine(10, 4, 0), lambda: n_stages(4, 1),
                                  lambda: sanitize((), 4)])
def test_grid_bad_input(call):
    with pytest.raises(ValueError):
        call()


# ---------------------------------------------------------------- A4
def test_rank_loss_value_and_monotone():
    conv = _conv(CONVS[0])
    w = conv.weight.detach()
    branches = [Tucker2Conv.from_result(conv, tt_svd(w, (r, r))) for r in (8, 16)]
    mixed = MixedRankConv(conv, branches, (8, 16))
    with torch.no_grad():
        mixed.logits.copy_(torch.log(torch.tensor([0.2, 0.8])))
    assert abs(rank_loss([mixed], 0.4, 0.8).item() - 0.4 * (0.2 * 0.5 + 0.8 * 1) ** 0.8) < 1e-6
    assert abs(0.4 * (0.2 * 0.5 + 0.8 * 1) ** 0.8 - 0.3677) < 1e-4
    high = rank_loss([mixed], 0.4, 0.8).item()
    with torch.no_grad():
        mixed.logits.copy_(torch.log(torch.tensor([0.8, 0.2])))
    assert rank_loss([mixed], 0.4, 0.8).item() < high
    for bad in [(0.0, 0.8), (0.4, 1.5), (True, 0.8)]:
        with pytest.raises(ValueError):
            rank_loss([mixed], *bad)


def test_gradient_identities():
    conv, mixed = _mixed(CONVS[0])
    with torch.no_grad():
        mixed.logits.copy_(torch.tensor([0.3, -0.2, 0.5]))
    params = mixed.branch_parameters()
    loss, parts = weight_loss([mixed], 0.4, 0.8)
    g_tw = torch.autograd.grad(loss, params)
    l_r = rank_loss([mixed], 0.4, 0.8).item()
    g_d = torch.autograd.grad(weight_loss([mixed], 0.4, 0.8)[1]["decomposition"], params)
    for a, b in zip(g_tw, g_d):
        torch.testing.assert_close(a, l_r * b, atol=1e-6, rtol=1e-5)
    x = torch.randn(4, conv.in_channels, 8, 8)
    grads = []
    for gamma in (0.4, 1.0):
        objective = mixed(x).square().mean()
        grads.append(torch.autograd.grad(logit_loss(objective, [mixed], gamma, 0.8)[0], mixed.logits)[0])
    cos = torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0)
    assert cos >= 1 - 1e-6


def test_sigma_decomposition_term_is_relative_output_mse():
    conv, mixed = _mixed(CONVS[0])
    x = torch.randn(64, conv.in_channels, 6, 6, dtype=torch.float64)
    cols = torch.nn.functional.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, conv.in_channels * 9)
    sigma = cols.T @ cols / cols.shape[0]
    d = mixed.decomposition_sq("sigma", sigma).item()
    target = mixed.target.double().reshape(mixed.target.shape[0], -1)
    approx = mixed.mixed_kernel().detach().double().reshape(target.shape)
    expected = float(((cols @ (target - approx).T) ** 2).sum() / ((cols @ target.T) ** 2).sum())
    assert abs(d - expected) < 1e-4 * expected
    with pytest.raises(ValueError, match="Sigma"):
        mixed.decomposition_sq("sigma", None)
    with pytest.raises(ValueError):
        mixed.decomposition_sq("bogus")


def test_budget_projection():
    ranks = {"a": 10, "b": 10}
    params = lambda n, r: r * (10 if n == "a" else 1)  # noqa: E731
    error = lambda n, r: 1.0 / r  # noqa: E731
    new, changes = project_to_budget(ranks, params, error, 60)
    total = sum(params(n, r) for n, r in new.items())
    assert total <= 60 and changes
    last = changes[-1]
    assert total + params(last["layer"], last["from"]) - params(last["layer"], last["to"]) > 60
    with pytest.raises(ValueError, match="smallest reachable"):
        project_to_budget(ranks, params, error, 5)
    assert project_to_budget(ranks, params, error, 1000) == (ranks, [])


def test_results_round_trip_json():
    stage = StageRecord(0, 4, {"a": (4, 8)}, {"a": (0.4, 0.6)}, {"a": 8}, {"rank": 0.3}, {"a": {"entropy": 0.6}})
    result = RankSearchResult({"a": (8, 8)}, "tucker2", (stage,), 1.5, {"gamma": 0.4})
    back = RankSearchResult.from_dict(json.loads(json.dumps(result.to_dict())))
    assert back == result
    with pytest.raises(ValueError):
        RankSearchResult({"a": (8,)}, "tucker2", (), 0.0)
    with pytest.raises(ValueError):
        StageRecord(0, 4, {"a": (4, 8)}, {"a": (0.4, 0.6)}, {"a": 5}, {})
    with pytest.raises(ValueError):
        RankSearchResult({"a": (8,)}, "tt", (), 0.0)
    assert not math.isnan(back.seconds)


def test_tt_svd_ranks_equals_single_calls_and_frozen_branches_same_forward():
    from sigma_core import tt_svd_ranks

    kernel = torch.randn(12, 8, 3, 3, dtype=torch.float64)
    for many, pair in zip(tt_svd_ranks(kernel, [(2, 2), (5, 4), (12, 8)]), [(2, 2), (5, 4), (12, 8)]):
        torch.testing.assert_close(many.reconstruct(), tt_svd(kernel, pair).reconstruct(), atol=1e-12, rtol=0)
    conv, mixed = _mixed(CONVS[0])
    x = torch.randn(2, conv.in_channels, 7, 7)
    live = mixed(x)
    mixed.freeze_branches(True)
    torch.testing.assert_close(mixed(x), live, atol=1e-6, rtol=1e-6)
    mixed(x).sum().backward()
    assert mixed.logits.grad is not None and all(p.grad is None for p in mixed.branch_parameters())
    mixed.freeze_branches(False)

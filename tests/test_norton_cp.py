"""NORTON filter CP: batched ALS (Frobenius and Sigma), rank rules, NortonConv against the dense conv, the CPConv
oracle and a replica of the public code's rank-major CPDBlock, pruning slices, counts and the spec round trip
(spec Sec. 9, gates 1-3 and 7)."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _helpers import real_sigma
from sigma_core import count_macs, count_params, module_from_spec, rel_sigma_err
from sigma_core.decompose import (
    FilterCPResult,
    FilterCPSigmaConfig,
    filter_cp_als,
    filter_cp_als_sigma,
    filter_cp_breakeven_rank,
    filter_cp_max_rank,
    filter_cp_rank,
    filter_nmse,
)
from sigma_core.decompose.filter_cp import BreakEvenRule, _psi, _SigmaLayer, _step_c_sigma, _step_spatial_sigma
from sigma_core.layers import CPConv
from sigma_core.layers_norton import NortonConv
from sigma_core.ranks import RankRule

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("single_thread")


def _random_result(t, s, h, w, r, seed=0, dtype=F64) -> FilterCPResult:
    g = torch.Generator().manual_seed(seed)
    f = [torch.randn(t, d, r, generator=g, dtype=dtype) for d in (s, h, w)]
    return FilterCPResult(*f, rank=r, errors=(0.0,), filter_errors=(0.0,) * t, converged=True, method="norton-cp")


def _planted(t, s, h, w, r, seed=0):
    return _random_result(t, s, h, w, r, seed).reconstruct()


def _spd(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * n, n, generator=g, dtype=F64) @ torch.randn(n, n, generator=g, dtype=F64)
    return x.T @ x / (4 * n)


def _code_cpdblock(x, res: FilterCPResult, conv: nn.Conv2d):
    """Replica of pvti/NORTON decomposition/CPDBlock.py: rank-major channels c = r T + t, then view-sum."""
    c, a, b = res.factors
    t, s, h, w = res.kernel_shape
    r = res.rank
    pw = c.permute(2, 0, 1).reshape(r * t, s)[:, :, None, None]  # row r*T + t
    ver = a.permute(2, 0, 1).reshape(r * t, h)[:, None, :, None]
    hor = b.permute(2, 0, 1).reshape(r * t, w)[:, None, None, :]
    pad = conv.padding
    y = F.conv2d(x, pw.to(x.dtype))
    if isinstance(pad, str):
        y = F.conv2d(y, ver.to(x.dtype), stride=(conv.stride[0], 1), padding=pad, dilation=(conv.dilation[0], 1),
                     groups=r * t)
        y = F.conv2d(y, hor.to(x.dtype), stride=(1, conv.stride[1]), padding=pad, dilation=(1, conv.dilation[1]),
                     groups=r * t)
    else:
        y = F.conv2d(y, ver.to(x.dtype), stride=(conv.stride[0], 1), padding=(pad[0], 0),
                     dilation=(conv.dilation[0], 1), groups=r * t)
        y = F.conv2d(y, hor.to(x.dtype), stride=(1, conv.stride[1]), padding=(0, pad[1]),
                     dilation=(1, conv.dilation[1]), groups=r * t)
    y = y.view(y.shape[0], r, t, *y.shape[2:]).sum(1)
    return y if conv.bias is None else y + conv.bias[None, :, None, None]


def _dense(conv: nn.Conv2d, x, kernel):
    dense = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                      padding=conv.padding, dilation=conv.dilation, padding_mode=conv.padding_mode,
                      bias=conv.bias is not None, dtype=x.dtype)
    with torch.no_grad():
        dense.weight.copy_(kernel)
        if conv.bias is not None:
            dense.bias.copy_(conv.bias)
    return dense(x)


# ---------------------------------------------------------------- gate 1: block equivalence


_GRID = list(itertools.product((1, 2), (0, 1, (1, 0), "same"), (1, 2), ("zeros", "reflect", "replicate", "circular"),
                               (True, False)))


@pytest.mark.parametrize("rank", [1, 3, 9])
def test_norton_conv_equals_dense_cpconv_and_code_block_over_the_grid(rank):
    checked = 0
    for stride, padding, dilation, mode, bias in _GRID:
        if padding == "same" and stride != 1:
            continue  # torch rejects 'same' with stride > 1 for the dense conv as well
        for dtype, tol in ((F64, 1e-10), (torch.float32, 1e-5)):
            torch.manual_seed(checked)
            conv = nn.Conv2d(3, 4, 3, stride=stride, padding=padding, dilation=dilation, padding_mode=mode,
                             bias=bias, dtype=dtype)
            res = _random_result(4, 3, 3, 3, rank, seed=checked)
            layer = NortonConv.from_result(conv, res)
            x = torch.randn(2, 3, 9, 8, dtype=dtype)
            ref = _dense(conv, x, res.reconstruct().to(dtype))
            out = layer(x)
            assert out.shape == ref.shape
            scale = ref.abs().max().item()
            assert (out - ref).abs().max().item() <= tol * scale, (stride, padding, dilation, mode, bias, dtype)
            if dtype == F64:
                oracle = CPConv.from_result(conv, res.to_layer_cp())(x)
                assert (out - oracle).abs().max().item() <= tol * scale
                if mode == "zeros":  # the public code pads with zeros only
                    assert (out - _code_cpdblock(x, res, conv)).abs().max().item() <= tol * scale
            checked += 1
    assert checked >= 100


def test_norton_conv_rectangular_kernel_and_reconstructed_kernel():
    conv = nn.Conv2d(5, 6, (3, 2), padding=(1, 0), dtype=F64)
    res = _random_result(6, 5, 3, 2, 2)
    layer = NortonConv.from_result(conv, res)
    assert torch.allclose(layer.reconstructed_kernel(), res.reconstruct(), atol=1e-12)
    c, a, b = layer.factors()
    assert torch.allclose(c, res.u_s) and torch.allclose(a, res.u_h) and torch.allclose(b, res.u_w)
    x = torch.randn(2, 5, 7, 7, dtype=F64)
    assert torch.allclose(layer(x), _dense(conv, x, res.reconstruct()), atol=1e-10)


def test_norton_conv_rejects_grouped_and_wrong_result():
    res = _random_result(4, 2, 3, 3, 1)
    with pytest.raises(ValueError, match="grouped"):
        NortonConv.from_result(nn.Conv2d(4, 4, 3, groups=2), res)
    with pytest.raises(ValueError, match="does not match"):
        NortonConv.from_result(nn.Conv2d(3, 4, 3), res)
    with pytest.raises(ValueError, match="FilterCPResult"):
        NortonConv.from_result(nn.Conv2d(2, 4, 3), res.to_layer_cp())


# ---------------------------------------------------------------- pruning slices, spec, counts


def test_pruned_equals_sliced_dense_and_spec_round_trip():
    conv = nn.Conv2d(6, 5, 3, padding=1, dtype=F64)
    res = _random_result(5, 6, 3, 3, 2)
    layer = NortonConv.from_result(conv, res)
    keep_out, keep_in = [0, 2, 4], [1, 3, 4, 5]
    small = layer.pruned(keep_out=keep_out, keep_in=keep_in)
    x = torch.randn(2, 6, 7, 7, dtype=F64)
    ref = F.conv2d(x[:, keep_in], res.reconstruct()[keep_out][:, keep_in], conv.bias[keep_out], padding=1)
    assert torch.allclose(small(x[:, keep_in]), ref, atol=1e-10)
    spec = json.loads(json.dumps(small.spec()))
    assert spec["pruning"] == {"out": [5, keep_out], "in": [6, keep_in]}
    again = module_from_spec(spec, dtype=F64)
    again.load_state_dict(small.state_dict())
    assert torch.equal(again(x[:, keep_in]), small(x[:, keep_in]))
    # a second pruning composes the provenance with the first
    twice = small.pruned(keep_out=[1, 2])
    assert twice.pruning["out"] == [5, [2, 4]]


def test_spec_with_kept_indices_that_do_not_fit_is_an_error():
    conv = nn.Conv2d(6, 5, 3)
    spec = NortonConv.from_result(conv, _random_result(5, 6, 3, 3, 2)).pruned(keep_out=[0, 1]).spec()
    spec["pruning"]["out"][1] = [0, 1, 2]
    with pytest.raises(ValueError, match="does not fit the weights"):
        module_from_spec(spec)
    spec["pruning"]["out"] = [5, [0, 7]]
    with pytest.raises(ValueError, match="does not fit the weights"):
        module_from_spec(spec)


@pytest.mark.parametrize("stride", [1, 2])
def test_counts_equal_the_formulas(stride):
    t, s, r, h_in = 8, 6, 3, 10
    conv = nn.Conv2d(s, t, 3, stride=stride, padding=1)
    layer = NortonConv.from_result(conv, _random_result(t, s, 3, 3, r, dtype=torch.float32))
    h_out = (h_in + 2 - 2 - 1) // stride + 1
    assert count_params(layer) == t * r * (s + 3 + 3) + t
    assert count_macs(layer, (1, s, h_in, h_in)) == t * r * (s * h_in * h_in + 3 * h_out * h_in + 3 * h_out * h_out)


# ---------------------------------------------------------------- gate 2: exactness, recovery, monotone


@pytest.mark.parametrize("shape", [(6, 8, 3, 3), (4, 1, 3, 3), (3, 2, 3, 3), (4, 5, 3, 2)])
def test_exact_at_the_per_filter_maximum_rank(shape):
    g = torch.Generator().manual_seed(1)
    k = torch.randn(*shape, generator=g, dtype=F64)
    r_max = filter_cp_max_rank(shape)
    assert r_max == {(6, 8, 3, 3): 9, (4, 1, 3, 3): 3, (3, 2, 3, 3): 6, (4, 5, 3, 2): 6}[shape]
    res = filter_cp_als(k, r_max)
    assert res.errors[-1] < 1e-8
    sig = _spd(shape[1] * shape[2] * shape[3])
    res_s = filter_cp_als_sigma(k, sig, r_max)
    assert res_s.errors[-1] < 1e-8


@pytest.mark.parametrize("planted,rank", [(1, 1), (2, 2), (2, 3)])
def test_planted_recovery_and_monotone_errors(planted, rank):
    k = _planted(5, 12, 3, 3, planted, seed=planted)
    res = filter_cp_als(k, rank, max_iter=3000, tol=1e-15)
    assert res.errors[-1] < 1e-6
    assert all(b <= a for a, b in zip(res.errors, res.errors[1:]))
    sig = _spd(12 * 9, seed=3)
    res_s = filter_cp_als_sigma(k, sig, rank, config=FilterCPSigmaConfig(max_iter=300, tol=1e-15))
    assert res_s.errors[-1] < 1e-6
    assert all(b <= a for a, b in zip(res_s.errors, res_s.errors[1:]))


def test_random_init_is_seeded_and_converges_downhill():
    k = torch.randn(4, 6, 3, 3, dtype=F64)
    a = filter_cp_als(k, 2, init="random", generator=torch.Generator().manual_seed(0))
    b = filter_cp_als(k, 2, init="random", generator=torch.Generator().manual_seed(0))
    assert a.errors == b.errors
    assert all(y <= x for x, y in zip(a.errors, a.errors[1:]))


# ---------------------------------------------------------------- gate 3: Sigma filter CP


def test_sigma_is_never_worse_per_filter_than_frobenius_start():
    sig = real_sigma(8, 3, 3, seed=0) if "seed" in real_sigma.__code__.co_varnames else real_sigma(8, 3, 3)
    k = torch.randn(10, 8, 3, 3, dtype=F64)
    frob = filter_cp_als(k, 2)
    res = filter_cp_als_sigma(k, sig, 2, start=frob)
    layer = _SigmaLayer(k, sig, FilterCPSigmaConfig().ridge)
    e_frob = layer.sq_err(*frob.factors)
    e_sig = layer.sq_err(*res.factors)
    assert bool((e_sig <= e_frob * (1 + 1e-12)).all())
    assert e_sig.sum() < e_frob.sum()


def test_sigma_identity_equals_frobenius_objective():
    k = torch.randn(6, 5, 3, 3, dtype=F64)
    eye = torch.eye(45, dtype=F64)
    res = filter_cp_als_sigma(k, eye, 2, config=FilterCPSigmaConfig(ridge=0.0))
    approx = res.reconstruct()
    frob = ((k - approx).reshape(6, -1).norm(dim=1) / k.reshape(6, -1).norm(dim=1))
    assert torch.allclose(torch.tensor(res.filter_errors, dtype=F64), frob, atol=1e-8)


def test_layer_sigma_error_decouples_into_filters():
    sig = _spd(4 * 9, seed=5)
    k = torch.randn(7, 4, 3, 3, dtype=F64)
    res = filter_cp_als_sigma(k, sig, 2, config=FilterCPSigmaConfig(ridge=0.0))
    d = (k - res.reconstruct()).reshape(7, -1)
    per_filter = ((d @ sig) * d).sum(1)
    k1 = k.reshape(7, -1)
    total = float(((k1 @ sig) * k1).sum())
    assert abs(rel_sigma_err(k, res.reconstruct(), sig) ** 2 - float(per_filter.sum()) / total) < 1e-10
    assert abs(res.errors[-1] ** 2 - float(per_filter.sum()) / total) < 1e-10


def _brute_force(sig, k_t, design):
    """argmin_x (k - D x)^T Sigma (k - D x) by lstsq on the L^T-whitened system."""
    low = torch.linalg.cholesky(sig)
    return torch.linalg.lstsq(low.T @ design, low.T @ k_t).solution


def test_substeps_equal_brute_force_lstsq():
    t, s, h, w, r = 3, 4, 3, 3, 2
    sig = _spd(s * h * w, seed=2)
    k = torch.randn(t, s, h, w, dtype=F64)
    g = torch.Generator().manual_seed(4)
    c, a, b = (torch.randn(t, d, r, generator=g, dtype=F64) for d in (s, h, w))
    layer = _SigmaLayer(k, sig, 0.0)
    c_new = _step_c_sigma(layer, c, a, b, 2**20)
    psi = _psi(layer, c_new)
    a_new = _step_spatial_sigma(layer, c_new, a, b, psi, "h")
    b_new = _step_spatial_sigma(layer, c_new, a_new, b, psi, "w")
    for i in range(t):
        kt = k[i].reshape(-1)
        # C: columns (s', r) of the design = e_{s'} o A[:, r] o B[:, r]
        cols = [torch.einsum("s,h,w->shw", torch.eye(s, dtype=F64)[q], a[i][:, j], b[i][:, j]).reshape(-1)
                for q in range(s) for j in range(r)]
        x = _brute_force(sig, kt, torch.stack(cols, 1)).reshape(s, r)
        assert torch.allclose(c_new[i], x, atol=1e-8)
        cols = [torch.einsum("s,h,w->shw", c_new[i][:, j], torch.eye(h, dtype=F64)[q], b[i][:, j]).reshape(-1)
                for q in range(h) for j in range(r)]
        x = _brute_force(sig, kt, torch.stack(cols, 1)).reshape(h, r)
        assert torch.allclose(a_new[i], x, atol=1e-8)
        cols = [torch.einsum("s,h,w->shw", c_new[i][:, j], a_new[i][:, j], torch.eye(w, dtype=F64)[q]).reshape(-1)
                for q in range(w) for j in range(r)]
        x = _brute_force(sig, kt, torch.stack(cols, 1)).reshape(w, r)
        assert torch.allclose(b_new[i], x, atol=1e-8)


# ---------------------------------------------------------------- result type and rank rules


def test_result_select_restrict_and_layer_cp_oracle():
    res = _random_result(5, 4, 3, 3, 2)
    sel = res.select_filters([4, 1])
    assert torch.equal(sel.u_s, res.u_s[[1, 4]])
    assert torch.allclose(sel.reconstruct(), res.reconstruct()[[1, 4]])
    sub = res.restrict_inputs([0, 3])
    assert torch.allclose(sub.reconstruct(), res.reconstruct()[:, [0, 3]])
    cp = res.to_layer_cp()
    assert cp.rank == 10 and torch.allclose(cp.reconstruct(), res.reconstruct(), atol=1e-12)
    with pytest.raises(ValueError, match="indices in"):
        res.select_filters([5])
    with pytest.raises(ValueError, match="empty"):
        res.select_filters([])


def test_rank_rules_and_errors():
    shape = (64, 32, 3, 3)
    assert filter_cp_max_rank(shape) == 9 and filter_cp_max_rank((8, 1, 3, 3)) == 3
    assert filter_cp_rank(RankRule(cp_rank=4), shape) == 4
    assert filter_cp_rank(RankRule(fraction=0.5), shape) == 5
    # break-even R < S H W / (S + H + W): spec Sec. 2.4
    assert [filter_cp_breakeven_rank((1, s, 3, 3)) for s in (1, 3, 16, 32, 48, 64)] == [1, 2, 6, 7, 7, 8]
    assert filter_cp_rank(BreakEvenRule(), shape) == 7
    with pytest.raises(ValueError, match="no alpha"):
        filter_cp_rank(RankRule(alpha=0.5), shape)
    with pytest.raises(ValueError, match="per-filter maximum rank R_max=9"):
        filter_cp_rank(RankRule(cp_rank=10), shape)
    with pytest.raises(ValueError, match=r"rank must be an int in \[1, 3\]"):
        filter_cp_als(torch.randn(2, 1, 3, 3), 4)


def test_filter_nmse_is_the_code_definition():
    k = torch.randn(4, 3, 3, 3, dtype=F64)
    approx = k * 0.5
    assert abs(filter_nmse(k, approx) - 0.25) < 1e-12

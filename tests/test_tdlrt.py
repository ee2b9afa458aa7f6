"""TDLRT (spec checks A1-A8, A10, resume and bad input): Tucker algebra, TuckerConv, the step, the training loop."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.compress import load_compressed, save_compressed
from pipeline.tdlrt import (CheckpointMismatchError, TDLRTConfig, TDLRTConv, TDLRTData, conv_compression_percent,
                            load_tdlrt_data, train_tdlrt)
from sigma_core.decompose._result import TuckerResult
from sigma_core.layers import module_from_spec
from sigma_core.layers_tucker import TuckerConv
from sigma_core.tdlrt import (TDLRTStepConfig, TuckerState, augment_bases, k_gradients, orthonormality_error,
                              tdlrt_step, tdlrt_step_factorized)
from sigma_core.tucker import fold, hosvd, mode_product, truncate_tucker, tucker_params, tucker_to_tensor, unfold

D = torch.float64


def _orth(n, r, g):
    return torch.linalg.qr(torch.randn(n, r, generator=g, dtype=D))[0]


def _random_state(shape, ranks, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return TuckerState(torch.randn(ranks, generator=g, dtype=D) * scale, [_orth(n, r, g) for n, r in zip(shape, ranks)])


# ----------------------------------------------------------------------------- algebra
def test_unfold_fold_and_mode_product_conventions():
    x = torch.randn(4, 3, 2, 5, dtype=D)
    assert torch.equal(unfold(x, 0), x.reshape(4, -1))
    for i in range(4):
        assert torch.equal(fold(unfold(x, i), i, x.shape), x)
    m = torch.randn(6, 3, dtype=D)
    assert torch.allclose(mode_product(x, m, 1), torch.einsum("ab,tbhw->tahw", m, x), atol=1e-13)


# ----------------------------------------------------------------------------- A1
_GEOMETRIES = [dict(stride=s, dilation=d, padding=p, padding_mode=pm, bias=b)
               for s in (1, 2) for d in (1, 2) for p in (0, 1, "same", (1, 2))
               for pm in ("zeros", "reflect", "replicate", "circular") for b in (True, False)
               if not (p == "same" and s != 1)]


@pytest.mark.parametrize("geo", _GEOMETRIES, ids=lambda g: "-".join(map(str, g.values())))
def test_a1_tucker_conv_equals_dense_conv_of_reconstruction(geo):
    torch.manual_seed(0)
    conv = nn.Conv2d(5, 8, 3, **geo).to(D)
    res = hosvd(conv.weight.detach(), ranks=(3, 2, 2, 3))
    layer = TuckerConv.from_result(conv, res)
    dense = nn.Conv2d(5, 8, 3, **geo).to(D)
    with torch.no_grad():
        dense.weight.copy_(res.reconstruct())
        if conv.bias is not None:
            dense.bias.copy_(conv.bias)
    x = torch.randn(2, 5, 9, 10, dtype=D)
    y, ref = layer(x), dense(x)
    assert y.shape == ref.shape
    assert (y - ref).abs().max() <= 1e-12 * ref.abs().max()
    rebuilt = module_from_spec(layer.spec(), dtype=D)
    rebuilt.load_state_dict(layer.state_dict())
    assert torch.equal(rebuilt(x), y)
    assert sum(p.numel() for p in layer.parameters()) == tucker_params((8, 5, 3, 3), (3, 2, 2, 3)) + 8 * geo["bias"]


def test_a1_compression_counting_matches_paper():
    assert round(conv_compression_percent([(384, 192, 3, 3)], [(115, 57, 3, 3)]), 2) == 82.80
    shapes = [(64, 3, 3, 3), (192, 64, 3, 3), (384, 192, 3, 3), (256, 384, 3, 3), (256, 256, 3, 3)]
    r06 = [(25, 3, 3, 3), (76, 25, 3, 3), (153, 76, 3, 3), (102, 153, 3, 3), (102, 102, 3, 3)]
    r07 = [(19, 3, 3, 3), (57, 19, 3, 3), (115, 57, 3, 3), (76, 115, 3, 3), (76, 76, 3, 3)]
    assert round(conv_compression_percent(shapes, r06), 2) == 74.01
    assert round(conv_compression_percent(shapes, r07), 2) == 83.51


# ----------------------------------------------------------------------------- A2 / A3
def _setup_loss(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, shape[1], 9, 9, generator=g, dtype=D)
    head = torch.randn(3, shape[0], generator=g, dtype=D)
    y = torch.randint(0, 3, (4,), generator=g)

    def loss(w):
        return F.cross_entropy(F.conv2d(x, w, padding=1).mean((2, 3)) @ head.T, y)
    return loss


def test_a2_theorem1_k_gradient_and_factor_gradient_identities():
    shape, ranks = (10, 6, 5, 5), (4, 3, 3, 2)
    st = _random_state(shape, ranks)
    loss = _setup_loss(shape)
    w0 = st.kernel().requires_grad_(True)
    (g,) = torch.autograd.grad(loss(w0), w0)
    kg = k_gradients(st.core, st.factors, g)
    for i in range(4):
        q, r = torch.linalg.qr(unfold(st.core, i).T)
        k = (st.factors[i] @ r.T).requires_grad_(True)
        facs = [u if j != i else k for j, u in enumerate(st.factors)]
        (gk,) = torch.autograd.grad(loss(tucker_to_tensor(fold(q.T, i, ranks), facs)), k)
        assert (gk - kg[i][0]).abs().max() <= 1e-12
        u = st.factors[i].clone().requires_grad_(True)
        (gu,) = torch.autograd.grad(loss(tucker_to_tensor(st.core, [f if j != i else u for j, f in
                                                                    enumerate(st.factors)])), u)
        assert (gu - kg[i][0] @ kg[i][1].T).abs().max() <= 1e-12


@pytest.mark.parametrize("shape,ranks", [((10, 6, 5, 5), (4, 3, 3, 2)), ((20, 1, 5, 5), (4, 1, 2, 2))])
def test_a3_augmentation_keeps_w_and_core_gradient_identity(shape, ranks):
    st = _random_state(shape, ranks)
    loss = _setup_loss(shape)
    w0 = st.kernel().requires_grad_(True)
    (g,) = torch.autograd.grad(loss(w0), w0)
    kg = k_gradients(st.core, st.factors, g)
    new, transfers = augment_bases(st.factors, {i: d for i, (d, _) in kg.items()}, shape)
    assert tuple(u.shape[1] for u in new) == tuple(min(2 * r, n) for n, r in zip(shape, ranks))
    ct = tucker_to_tensor(st.core, transfers)
    w = tucker_to_tensor(ct, new)
    assert (w - w0.detach()).norm() <= 1e-12 * w0.norm()
    for u, un in zip(st.factors, new):
        assert (u - un @ (un.T @ u)).abs().max() <= 1e-12
    ct_leaf = ct.clone().requires_grad_(True)
    (gc,) = torch.autograd.grad(loss(tucker_to_tensor(ct_leaf, new)), ct_leaf)
    assert (gc - tucker_to_tensor(g, [u.T for u in new])).abs().max() <= 1e-12


# ----------------------------------------------------------------------------- A5
@pytest.mark.parametrize("kind", ["random", "decaying"])
def test_a5_truncation_bound_minimality_monotone(kind):
    g = torch.Generator().manual_seed(3)
    core = torch.randn(6, 5, 4, 4, generator=g, dtype=D)
    if kind == "decaying":
        core = tucker_to_tensor(core, [torch.diag(0.5 ** torch.arange(n, dtype=D)) for n in core.shape])
    prev = None
    for tau in [i * 0.05 for i in range(11)]:
        tr = truncate_tucker(core, tau)
        assert tr.rel_error <= tau * (1 + 1e-12) + 1e-14
        for i in range(4):
            assert tr.tail_sq[i] <= tr.budget_sq[i] * (1 + 1e-12) + 1e-300
        if prev is not None:
            assert all(a <= b for a, b in zip(tr.ranks, prev))
        prev = tr.ranks
        # minimality: redo the sequential pass and check that rank-1 at each mode breaks its criterion
        x = core
        for i in (3, 2, 1, 0):
            s = torch.linalg.svdvals(unfold(x, i))
            k = tr.projections[i].shape[1]
            budget = (tau / 2 * torch.linalg.norm(x)) ** 2
            if k > 1 and k <= len(s):
                assert float((s[k - 1:] ** 2).sum()) > budget
            u = torch.linalg.svd(unfold(x, i), full_matrices=False)[0][:, :tr.projections[i].shape[1]]
            x = mode_product(x, u.T, i)
    assert truncate_tucker(core, 0.0).ranks == tuple(core.shape)


# ----------------------------------------------------------------------------- A6
def test_a6_full_rank_tau0_equals_dense_sgd_momentum():
    torch.manual_seed(1)
    n = (6, 4, 3, 3)
    w0 = torch.randn(n, dtype=D)
    a, y = torch.randn(50, math.prod(n), dtype=D), torch.randn(50, dtype=D)

    def grad(w):
        return (a.T @ torch.tanh(a @ w.reshape(-1) - y)).reshape(n)
    st = TuckerState.from_result(hosvd(w0, ranks=n))
    cfg = TDLRTStepConfig(lr=0.05 / 50, tau=0.0, momentum=0.1)
    wd = w0.clone().requires_grad_(True)
    opt = torch.optim.SGD([wd], lr=0.05 / 50, momentum=0.1)
    for _ in range(20):
        st, _ = tdlrt_step(st, grad(st.kernel()), cfg)
        wd.grad = grad(wd.detach())
        opt.step()
        assert (st.kernel() - wd.detach()).norm() <= 1e-10 * wd.norm()


# ----------------------------------------------------------------------------- A7
def test_a7_factorized_two_pass_equals_dense_mode():
    shape, ranks = (10, 6, 5, 5), (3, 2, 2, 2)
    st = _random_state(shape, ranks, seed=4)
    loss = _setup_loss(shape, seed=5)
    cfg = TDLRTStepConfig(lr=0.5, tau=0.1)
    w0 = st.kernel().requires_grad_(True)
    (g,) = torch.autograd.grad(loss(w0), w0)
    a, info_a = tdlrt_step(st, g, cfg)
    facs = [u.clone().requires_grad_(True) for u in st.factors]
    grads = torch.autograd.grad(loss(tucker_to_tensor(st.core, facs)), facs)

    def core_grad(ct, new):
        leaf = ct.clone().requires_grad_(True)
        return torch.autograd.grad(loss(tucker_to_tensor(leaf, new)), leaf)[0]
    b, info_b = tdlrt_step_factorized(st, grads, core_grad, cfg)
    assert info_a.ranks_after == info_b.ranks_after
    assert (a.kernel() - b.kernel()).norm() <= 1e-10 * a.kernel().norm()


# ----------------------------------------------------------------------------- A8 (+A4 float64)
def test_a8_descent_and_exact_rank_recovery():
    g = torch.Generator().manual_seed(1)
    nt, rt = (8, 6, 3, 3), (2, 2, 2, 2)
    core = torch.zeros(rt, dtype=D)  # core singular values well separated from 0
    core[0, 0, 0, 0], core[1, 1, 1, 1], core[0, 1, 1, 0] = 3.0, 2.0, 0.5
    w_star = tucker_to_tensor(core, [_orth(n, r, g) for n, r in zip(nt, rt)])
    st = _random_state(nt, (4, 3, 3, 3), seed=7, scale=0.3)
    cfg = TDLRTStepConfig(lr=0.1, tau=1e-6)
    loss = lambda w: 0.5 * float(((w - w_star) ** 2).sum())  # noqa: E731
    prev = loss(st.kernel())
    for _ in range(300):
        c = float(st.core.norm())
        st, info = tdlrt_step(st, st.kernel() - w_star, cfg)
        assert info.orth_err <= 1e-12
        cur = loss(st.kernel())
        assert cur <= prev + (1e-6 * c) ** 2 + 1e-14
        prev = cur
    assert (st.kernel() - w_star).norm() / w_star.norm() <= 1e-5
    assert st.ranks == rt


# ----------------------------------------------------------------------------- bad input
def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="tau"):
        TDLRTConfig(tau=-0.1)
    with pytest.raises(ValueError, match="tau"):
        TDLRTConfig(tau=1.0)
    with pytest.raises(ValueError, match="tau"):
        TDLRTStepConfig(lr=0.1, tau=1.5)
    with pytest.raises(ValueError, match="not valid Tucker ranks"):
        TuckerConv(1, 20, 5, (10, 1, 2, 2))
    with pytest.raises(ValueError, match="not valid Tucker ranks"):
        hosvd(torch.randn(20, 1, 5, 5, dtype=D), ranks=(5, 1, 2, 2))
    with pytest.raises(ValueError, match="mode 1"):
        TuckerResult(torch.zeros(2, 9, 2, 2), torch.zeros(4, 2), torch.zeros(3, 9), torch.zeros(2, 2),
                     torch.zeros(2, 2), (2, 9, 2, 2), (), True, "x")
    grouped = nn.Conv2d(4, 4, 3, groups=2)
    with pytest.raises(ValueError, match="grouped"):
        TDLRTConv(grouped, TuckerState.from_result(hosvd(grouped.weight.detach().to(D), ranks=(2, 1, 2, 2))))
    with pytest.raises(ValueError, match="grouped"):
        TuckerConv.from_result(grouped, hosvd(grouped.weight.detach().to(D), ranks=(2, 1, 2, 2)))


# ----------------------------------------------------------------------------- training loop
def _tiny_data(n_train=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda n: (torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g))  # noqa: E731
    (a, b), (c, d), (e, f) = mk(n_train), mk(128), mk(128)
    return TDLRTData(a, b, c, d, e, f)


def test_resume_after_kill_mid_epoch_equals_uninterrupted(tmp_path):
    data = _tiny_data()
    cfg = TDLRTConfig(epochs=3, batch_size=64, tau=0.15, num_threads=1)
    _, full = train_tdlrt(cfg, data=data, output_dir=tmp_path / "a", progress=False)

    class Kill(Exception):
        pass

    def killer(epoch, step):
        if epoch == 1 and step == 3:
            raise Kill
    with pytest.raises(Kill):
        train_tdlrt(cfg, data=data, output_dir=tmp_path / "b", progress=False, on_step=killer)
    _, resumed = train_tdlrt(cfg, data=data, output_dir=tmp_path / "b", progress=False)
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert strip(resumed["history"]) == strip(full["history"])
    # a changed config on the same run directory, and a foreign checkpoint, are clear errors
    with pytest.raises(CheckpointMismatchError, match="rule"):
        train_tdlrt(TDLRTConfig(epochs=3, batch_size=64, tau=0.15, rule="per-mode"), data=data,
                    output_dir=tmp_path / "b", progress=False)
    other = tmp_path / "b" / "lenet5-fmnist" / "tdlrt-tau0.15-seed0" / "checkpoint.pt"
    torch.save({"format": "something-else"}, other)
    with pytest.raises(CheckpointMismatchError, match="not a TDLRT checkpoint"):
        train_tdlrt(cfg, data=data, output_dir=tmp_path / "b", progress=False)


def test_a10_smoke_one_epoch_real_data_save_load(tmp_path):
    cfg = TDLRTConfig(epochs=1, tau=0.15, train_subset=6400, test_subset=2000, val_size=2000, num_threads=2)
    model, info = train_tdlrt(cfg, data=load_tdlrt_data(cfg), output_dir=tmp_path, progress=False)
    row = info["final"]
    assert math.isfinite(row["train_loss"]) and row["test_top1"] >= 50.0
    assert row["orth_err_max"] <= 1e-6
    for name, ranks in row["ranks"].items():
        TuckerConv(*{"conv1": (1, 20), "conv2": (20, 50)}[name], 5, tuple(ranks))  # valid Tucker ranks
    save_compressed(tmp_path / "saved", "lenet5-fmnist", 10, model, info["layers"])
    loaded = load_compressed(tmp_path / "saved")
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))

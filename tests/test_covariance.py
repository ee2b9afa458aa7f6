"""Sigma = E[u u^T] over im2col patches (sigma_core/covariance.py): Proposition 1 on real activations,
patch ordering, mergeable accumulation, multi-layer capture, and the factor L."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _helpers import fmnist_images, rel_close, spd_with_condition
from sigma_core import covariance
from sigma_core.covariance import (
    SigmaAccumulator,
    SigmaCapture,
    accumulate_sigma,
    conv_patches,
    factor_sigma,
    layer_patches,
    validate_sigma,
)

S_IN, T_OUT = 8, 6

# padding='same' with an even kernel is a deliberate case (asymmetric padding), not a mistake.
pytestmark = [pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning"),
              pytest.mark.usefixtures("single_thread")]  # small kernels on a shared 2-core machine

# Conv-under-test variants (8 -> 6): every padding mode, 'same' (odd and even kernels), stride, dilation.
CONV_VARIANTS = {
    "stride2": dict(kernel_size=3, stride=2),
    "padding1": dict(kernel_size=3, padding=1),
    "dilation2": dict(kernel_size=3, dilation=2, padding=1),
    "reflect": dict(kernel_size=3, padding=1, padding_mode="reflect"),
    "replicate": dict(kernel_size=(3, 5), padding=(1, 2), padding_mode="replicate"),
    "circular": dict(kernel_size=3, padding=2, stride=2, padding_mode="circular"),
    "same": dict(kernel_size=3, padding="same"),
    "same_even_kernel": dict(kernel_size=(2, 4), padding="same"),
    "same_reflect_dilated": dict(kernel_size=(3, 4), padding="same", dilation=(2, 1), padding_mode="reflect"),
    "valid": dict(kernel_size=3, padding="valid"),
    "nonsquare_3x5": dict(kernel_size=(3, 5), stride=(2, 1), padding=(1, 2)),
}



@pytest.fixture(scope="module")
def features() -> torch.Tensor:
    """Real activations: 64 FMNIST images through ReLU(conv 1 -> 8, 3x3, pad 1), float64, (64, 8, 28, 28)."""
    torch.manual_seed(0)
    conv1 = nn.Conv2d(1, S_IN, 3, padding=1).double()
    with torch.no_grad():
        return torch.relu(conv1(fmnist_images(64)))


def _conv_under_test(seed: int = 1, bias: bool = True, **kwargs) -> nn.Conv2d:
    torch.manual_seed(seed)
    return nn.Conv2d(S_IN, T_OUT, bias=bias, **kwargs).double()


def _perturbed(layer: nn.Module, seed: int = 2) -> tuple[nn.Module, torch.Tensor]:
    """A copy of ``layer`` with weight K + dK (random dK), and dK."""
    gen = torch.Generator().manual_seed(seed)
    dk = 0.3 * torch.randn(layer.weight.shape, generator=gen, dtype=torch.float64)
    other = copy.deepcopy(layer)
    with torch.no_grad():
        other.weight += dk
    return other, dk


def _sigma_of(layer: nn.Module, x: torch.Tensor, chunks: int = 3, via: str = "patches") -> torch.Tensor:
    """Sigma of ``layer``'s input ``x`` fed in ``chunks`` batches, as im2col rows or as the raw input."""
    acc = SigmaAccumulator.for_layer(layer)
    for part in x.chunk(chunks):
        if via == "patches":
            acc.update(layer_patches(part, layer))
        else:
            acc.update_input(part, layer)
    return acc.finalize()


def _check_prop1(layer: nn.Module, x: torch.Tensor, out_positions: int, via: str = "patches") -> tuple[float, float]:
    """Relative errors of ||dK1 L||^2 and tr(dK1 Sigma dK1^T) vs the mean squared output change."""
    sigma = _sigma_of(layer, x, via=via)
    other, dk = _perturbed(layer)
    with torch.no_grad():
        diff = other(x) - layer(x)
    measured = float((diff**2).sum()) / out_positions
    dk1 = dk.reshape(dk.shape[0], -1)
    fac = factor_sigma(sigma)
    # L L^T = Sigma + jitter I (jitter is 0 for a PD Sigma; subtracting it keeps the identity exact).
    via_l = float(((dk1 @ fac.factor) ** 2).sum()) - fac.jitter * float((dk1**2).sum())
    via_trace = float(torch.trace(dk1 @ sigma @ dk1.T))
    return abs(via_l - measured) / measured, abs(via_trace - measured) / measured


@pytest.mark.parametrize("via", ["patches", "input"])
@pytest.mark.parametrize("variant", list(CONV_VARIANTS))
def test_proposition1_conv_real_activations(features, variant, via):
    """mean over (images x output positions) of ||Conv_K~(x) - Conv_K(x)||^2 = ||dK1 L||^2 = tr(dK1 Sigma dK1^T).

    ``via="input"`` feeds the raw conv input to ``update_input`` (one-pass NHWC gather, (kh, kw, s) internal order).
    """
    conv = _conv_under_test(**CONV_VARIANTS[variant])
    with torch.no_grad():
        out = conv(features)
    err_l, err_tr = _check_prop1(conv, features, out.shape[0] * out.shape[2] * out.shape[3], via=via)
    print(f"prop1 {variant} via {via}: rel err via L {err_l:.2e}, via trace {err_tr:.2e}")
    assert err_l < 1e-8 and err_tr < 1e-8


@pytest.mark.parametrize("layout", ["flat_features", "channels_last_positions"])
def test_proposition1_linear_real_activations(features, layout):
    """Linear layer: Sigma = E[x x^T] of its input features (also on (B, H, W, C) inputs, per position)."""
    if layout == "flat_features":
        x = F.adaptive_avg_pool2d(features, 2).flatten(1)  # (64 samples, 32 features)
    else:
        x = features.permute(0, 2, 3, 1)  # (64, 28, 28, 8): one 8-vector per position
    torch.manual_seed(3)
    lin = nn.Linear(x.shape[-1], 5).double()
    err_l, err_tr = _check_prop1(lin, x, x[..., 0].numel())
    print(f"prop1 linear {layout}: rel err via L {err_l:.2e}, via trace {err_tr:.2e}")
    assert err_l < 1e-8 and err_tr < 1e-8


@pytest.mark.parametrize("variant", list(CONV_VARIANTS))
def test_conv_patches_match_conv_output(variant):
    """``patches @ K1^T`` reshaped to (B, T, H_out, W_out) is the conv output: same order as F.unfold / K1."""
    conv = _conv_under_test(bias=False, **CONV_VARIANTS[variant])
    x = torch.randn(2, S_IN, 11, 13, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    with torch.no_grad():
        expected = conv(x)
        patches = conv_patches(x, conv)
    b, t, ho, wo = expected.shape
    assert patches.shape == (b * ho * wo, conv.weight[0].numel())
    got = (patches @ conv.weight.detach().reshape(t, -1).T).reshape(b, ho, wo, t).permute(0, 3, 1, 2)
    assert rel_close(got, expected) < 1e-13


def test_conv_patches_zero_padding_equals_unfold():
    """For zero padding conv_patches is exactly F.unfold's (B, n, L) transposed to rows."""
    conv = _conv_under_test(kernel_size=(3, 2), padding=(1, 2), stride=(1, 2), dilation=(2, 1))
    x = torch.randn(3, S_IN, 9, 10, dtype=torch.float64)
    cols = F.unfold(x, (3, 2), dilation=(2, 1), padding=(1, 2), stride=(1, 2))
    assert torch.equal(conv_patches(x, conv), cols.transpose(1, 2).reshape(-1, cols.shape[1]))


def _real_patches(features: torch.Tensor) -> torch.Tensor:
    return conv_patches(features, _conv_under_test(kernel_size=3, padding=1))


def test_merge_three_unequal_chunks_equals_single_pass(features):
    """Accumulators over 3 unequal shards, merged (also after a state_dict round trip), equal one pass."""
    u = _real_patches(features)
    sizes = [u.shape[0] // 10, u.shape[0] // 3]
    parts = torch.split(u, [sizes[0], sizes[1], u.shape[0] - sum(sizes)])
    one = SigmaAccumulator(u.shape[1])
    one.update(u)
    shards = []
    for part in parts:
        acc = SigmaAccumulator(u.shape[1])
        for sub in part.split(997):  # uneven batches within a shard as well
            acc.update(sub)
        shards.append(acc)
    merged = SigmaAccumulator(u.shape[1])
    for acc in shards:
        merged.merge(acc)
    # state_dict -> bytes -> from_state_dict, as when shipping partial sums between processes.
    shipped = []
    for acc in shards:
        buf = io.BytesIO()
        torch.save(acc.state_dict(), buf)
        buf.seek(0)
        shipped.append(SigmaAccumulator.from_state_dict(torch.load(buf)))
    tree = shipped[0].merge(shipped[1]).merge(shipped[2])
    direct = u.T @ u / u.shape[0]
    for acc in (merged, tree):
        assert acc.count == one.count == u.shape[0]
        gram_err = rel_close(acc.gram, one.gram)
        fin_err = rel_close(acc.finalize(), one.finalize())
        print(f"merge: gram rel err {gram_err:.2e}, finalize rel err {fin_err:.2e}")
        assert gram_err < 1e-12 and fin_err < 1e-12
        assert rel_close(acc.mean(), u.mean(0)) < 1e-12
        assert rel_close(acc.finalize(centered=True), one.finalize(centered=True)) < 1e-12
    assert rel_close(one.finalize(), direct) < 1e-12


def test_float32_compute_close_to_float64(features):
    u = _real_patches(features)
    acc64, acc32 = SigmaAccumulator(u.shape[1]), SigmaAccumulator(u.shape[1], compute_dtype=torch.float32)
    for part in u.split(5000):
        acc64.update(part)
        acc32.update(part)
    assert acc32.gram.dtype == torch.float64
    err = rel_close(acc32.finalize(), acc64.finalize())
    print(f"float32 compute vs float64: rel err {err:.2e}")
    assert err < 1e-5


def test_centered_option_equals_direct_covariance(features):
    u = _real_patches(features)
    acc = SigmaAccumulator(u.shape[1])
    for part in u.split(3001):
        acc.update(part)
    mu = u.mean(0)
    direct = (u - mu).T @ (u - mu) / u.shape[0]
    assert rel_close(acc.finalize(centered=True), direct) < 1e-11
    # The same thing as E[uu^T] - mu mu^T, and the uncentered Sigma is the default.
    assert rel_close(acc.finalize(centered=True), u.T @ u / u.shape[0] - torch.outer(mu, mu)) < 1e-11
    assert rel_close(acc.finalize(), u.T @ u / u.shape[0]) < 1e-12


def test_accumulator_rejects_bad_input():
    acc = SigmaAccumulator(4)
    with pytest.raises(ValueError, match="no patches"):
        acc.finalize()
    with pytest.raises(ValueError, match=r"\(m, 4\)"):
        acc.update(torch.zeros(3, 5))
    with pytest.raises(ValueError, match="same patch dimension"):
        acc.merge(SigmaAccumulator(5))
    with pytest.raises(ValueError, match="compute_dtype"):
        SigmaAccumulator(4, compute_dtype=torch.float16)


# ---------------------------------------------------------------- fast path: NHWC gather + block-triangular Gram
# Each case: (in channels S, conv kwargs, input (B, H, W)). n = S*kh*kw is never a multiple of the block count.
ODD_SHAPES = {
    "stride2": (5, dict(kernel_size=3, stride=2, padding=1), (3, 9, 10)),
    "dilation2": (5, dict(kernel_size=3, dilation=2, padding=2), (2, 11, 9)),
    "reflect": (7, dict(kernel_size=3, padding=1, padding_mode="reflect"), (2, 8, 7)),
    "circular_stride2": (5, dict(kernel_size=3, padding=2, stride=2, padding_mode="circular"), (2, 9, 9)),
    "replicate_3x5": (3, dict(kernel_size=(3, 5), padding=(1, 2), padding_mode="replicate"), (2, 6, 9)),
    "nonsquare_2x4_same": (7, dict(kernel_size=(2, 4), padding="same"), (2, 7, 8)),
    "nonsquare_5x3_dil_stride": (3, dict(kernel_size=(5, 3), dilation=(1, 2), stride=(2, 1)), (2, 12, 10)),
    "batch_of_1": (5, dict(kernel_size=3, padding=1), (1, 6, 5)),
    "1x1_stride2": (9, dict(kernel_size=1, stride=2), (2, 7, 7)),
}


def _odd_case(case: str, seed: int = 0) -> tuple[nn.Conv2d, torch.Tensor]:
    s, kwargs, (b, h, w) = ODD_SHAPES[case]
    torch.manual_seed(seed)
    conv = nn.Conv2d(s, 4, bias=False, **kwargs).double()
    x = torch.randn(b, s, h, w, dtype=torch.float64).clamp_min(0)
    return conv, x


def _unfold_rows(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """Brute-force im2col, independent of sigma_core: ``F.pad`` from ``conv.padding`` / ``padding_mode``, then
    ``F.unfold``; rows (B * L, n) in (s, kh, kw) column order."""
    kh, kw = conv.kernel_size
    if conv.padding == "same":
        pads = []
        for d, k in zip(reversed(conv.dilation), reversed(conv.kernel_size)):
            pads += [d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2]
    else:
        pads = [conv.padding[1], conv.padding[1], conv.padding[0], conv.padding[0]]
    mode = {"zeros": "constant"}.get(conv.padding_mode, conv.padding_mode)
    xp = F.pad(x, pads, mode=mode)
    cols = F.unfold(xp, (kh, kw), dilation=conv.dilation, stride=conv.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


@pytest.fixture(params=["small_blocks", "default_blocks"])
def block_cols(request, monkeypatch):
    """Column-block width of the block-triangular Gram: tiny (4 uneven blocks even at n = 27) or the default."""
    if request.param == "small_blocks":
        monkeypatch.setattr(covariance, "_BLOCK_COLS", 5)
    return request.param


@pytest.mark.parametrize("case", list(ODD_SHAPES))
def test_update_input_equals_unfold_gram(case, block_cols):
    """``update_input`` (NHWC gather, (kh, kw, s) internal order, upper blocks) = the F.unfold Gram, sums, count."""
    conv, x = _odd_case(case)
    u = _unfold_rows(x, conv)
    with torch.no_grad():
        assert u.shape[0] == conv(x)[:, 0].numel()  # as many patches as output positions
    acc = SigmaAccumulator.for_layer(conv)
    for part in x.split(1):  # one image per update: batch-of-1 updates everywhere
        acc.update_input(part, conv)
    assert acc.count == u.shape[0]
    assert rel_close(acc.gram, u.T @ u) < 1e-14
    assert torch.equal(acc.gram, acc.gram.T)  # mirrored, not only symmetric to rounding
    assert rel_close(acc.total, u.sum(0)) < 1e-14
    assert rel_close(acc.finalize(), u.T @ u / u.shape[0]) < 1e-14
    assert rel_close(acc.finalize(centered=True), torch.cov(u.T, correction=0)) < 1e-12


def test_block_edges_cover_uneven_n():
    """k = min(4, n // 288) blocks of sizes differing by at most 1, for n not divisible by k."""
    for n, k in ((1, 1), (287, 1), (577, 2), (1179, 4), (4608, 4)):
        edges = covariance._block_edges(n)
        sizes = [b - a for a, b in zip(edges[:-1], edges[1:])]
        assert edges[0] == 0 and edges[-1] == n and len(sizes) == k and max(sizes) - min(sizes) <= 1


def test_update_input_default_blocks_real_size():
    """n = 131*3*3 = 1179 (4 blocks of 294-295 columns, as in real layers), batch of 1, stride 2, reflect."""
    torch.manual_seed(6)
    conv = nn.Conv2d(131, 2, 3, stride=2, padding=1, padding_mode="reflect", bias=False).double()
    x = torch.randn(1, 131, 9, 8, dtype=torch.float64).clamp_min(0)
    acc = SigmaAccumulator.for_layer(conv)
    assert len(acc._edges) == 5 and conv.weight[0].numel() % 4 != 0
    acc.update_input(x, conv)
    u = _unfold_rows(x, conv)
    assert rel_close(acc.gram, u.T @ u) < 1e-14 and rel_close(acc.total, u.sum(0)) < 1e-14


@pytest.mark.parametrize("layer", ["linear", "linear_positions", "conv1x1"])
def test_update_input_linear_and_1x1(layer):
    """Linear layers and 1x1 convs: update_input = update(layer_patches) (channel order needs no reordering)."""
    gen = torch.Generator().manual_seed(7)
    if layer == "conv1x1":
        mod, x = nn.Conv2d(6, 3, 1).double(), torch.randn(3, 6, 5, 4, generator=gen, dtype=torch.float64)
    else:
        mod = nn.Linear(6, 3).double()
        x = torch.randn(*((4, 6) if layer == "linear" else (2, 3, 5, 6)), generator=gen, dtype=torch.float64)
    fast, ref = SigmaAccumulator.for_layer(mod), SigmaAccumulator(6)
    fast.update_input(x, mod)
    ref.update(layer_patches(x, mod))
    assert fast.count == ref.count and rel_close(fast.gram, ref.gram) < 1e-15
    assert rel_close(fast.total, ref.total) < 1e-15


@pytest.mark.parametrize("flush_rows", [1 << 16, 100])
def test_float32_update_input_within_float32_tolerance(features, flush_rows, monkeypatch):
    """float32 compute (float32 partial Gram, flushed into float64 every ``flush_rows`` patches and on read)
    agrees with the float64 F.unfold Gram to float32 rounding; the sums stay float64."""
    monkeypatch.setattr(covariance, "_FLUSH_ROWS", flush_rows)
    conv = _conv_under_test(kernel_size=3, padding=1, padding_mode="reflect")
    u = _unfold_rows(features, conv)
    acc32 = SigmaAccumulator.for_layer(conv, compute_dtype=torch.float32)
    for part in features.float().split(7):
        acc32.update_input(part, conv)
    assert acc32.gram.dtype == acc32.total.dtype == torch.float64
    err = rel_close(acc32.finalize(), u.T @ u / u.shape[0])
    err_mu = rel_close(acc32.mean(), u.mean(0))
    print(f"float32 update_input (flush every {flush_rows}): rel err {err:.2e}, mean {err_mu:.2e}")
    assert err < 1e-5 and err_mu < 1e-6
    assert err > 1e-12  # really computed in float32


def test_float32_pending_sums_reach_state_and_merge(monkeypatch):
    """Patches still in the float32 partial Gram are counted by gram, state_dict, merge and finalize."""
    monkeypatch.setattr(covariance, "_FLUSH_ROWS", 50)
    conv, x = _odd_case("stride2")
    u = _unfold_rows(x, conv)  # 75 patches: one flush after the 2nd image, the 3rd stays pending
    a = SigmaAccumulator.for_layer(conv, compute_dtype=torch.float32)
    for part in x.split(1):
        a.update_input(part, conv)
    assert a._pending > 0
    assert rel_close(SigmaAccumulator.from_state_dict(a.state_dict()).gram, u.T @ u) < 1e-6
    b = SigmaAccumulator.for_layer(conv).merge(a)
    assert b.count == u.shape[0] and rel_close(b.finalize(), u.T @ u / u.shape[0]) < 1e-6


def _legacy_state(u: torch.Tensor) -> dict:
    """A partial state as the pre-block-triangular code wrote it: full u^T u and sums in (s, kh, kw) order."""
    return {"n": u.shape[1], "count": u.shape[0], "gram": u.T @ u, "total": u.sum(0)}


def test_state_dict_round_trip_is_exact():
    conv, x = _odd_case("nonsquare_5x3_dil_stride")
    acc = SigmaAccumulator.for_layer(conv)
    acc.update_input(x, conv)
    state = acc.state_dict()
    assert set(state) == {"n", "count", "gram", "total"}  # the format older code wrote and reads
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf)
    for kwargs in ({}, {"kernel": acc._kernel}):  # plain and kernel-ordered internal layouts
        back = SigmaAccumulator.from_state_dict(loaded, **kwargs).state_dict()
        assert back["n"] == state["n"] and back["count"] == state["count"]
        assert torch.equal(back["gram"], state["gram"]) and torch.equal(back["total"], state["total"])
    # gram/total are copies: writing to them does not touch the sums.
    acc.gram.zero_()
    acc.total.zero_()
    assert torch.equal(acc.gram, state["gram"]) and torch.equal(acc.total, state["total"])


@pytest.mark.parametrize("as_numpy", [False, True])
def test_merge_with_old_format_state(block_cols, as_numpy):
    """An old-format state (full Gram, numpy arrays as Ray ships them) merges with new accumulators in every
    direction and layout, and elementwise sums of states (ray_sigma.merge_states) stay valid."""
    conv, x = _odd_case("reflect")
    u_old, u_new = _unfold_rows(x[:1], conv), _unfold_rows(x[1:], conv)
    u = torch.cat([u_old, u_new])
    old = _legacy_state(u_old)
    if as_numpy:
        old = {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in old.items()}
    new = SigmaAccumulator.for_layer(conv)
    new.update_input(x[1:], conv)
    merged = [
        SigmaAccumulator.for_layer(conv).merge(SigmaAccumulator.from_state_dict(old)).merge(new),
        SigmaAccumulator.from_state_dict(old).merge(new),
        SigmaAccumulator.from_state_dict(old, kernel=new._kernel).merge(new),
        SigmaAccumulator.from_state_dict({k: v + w for k, v, w in ((k, torch.as_tensor(old[k]), new.state_dict()[k])
                                                                   for k in ("count", "gram", "total"))}
                                         | {"n": new.n}),
    ]
    for acc in merged:
        assert acc.count == u.shape[0]
        assert rel_close(acc.gram, u.T @ u) < 1e-14 and rel_close(acc.total, u.sum(0)) < 1e-14
        assert rel_close(acc.finalize(centered=True), torch.cov(u.T, correction=0)) < 1e-12


def test_merge_mixed_layouts_equals_single_pass(features):
    """Plain (s, kh, kw)-ordered accumulators and kernel-ordered ones merge into each other exactly."""
    conv = _conv_under_test(kernel_size=(3, 5), stride=(2, 1), padding=(1, 2))
    parts = features.split([10, 25, 29])
    one = SigmaAccumulator.for_layer(conv)
    one.update_input(features, conv)
    plain, kernel_ordered = SigmaAccumulator(one.n), SigmaAccumulator.for_layer(conv)
    plain.update(conv_patches(parts[0], conv))
    kernel_ordered.update_input(parts[1], conv)
    kernel_ordered.update(conv_patches(parts[2], conv))
    for acc in (copy.deepcopy(plain).merge(kernel_ordered), copy.deepcopy(kernel_ordered).merge(plain)):
        assert acc.count == one.count
        assert rel_close(acc.finalize(), one.finalize()) < 1e-13
        assert rel_close(acc.mean(), one.mean()) < 1e-13


def test_update_input_rejects_mismatched_layers():
    acc = SigmaAccumulator.for_layer(nn.Conv2d(4, 2, 3))
    with pytest.raises(ValueError, match=r"\(B, 4, H, W\)"):
        acc.update_input(torch.zeros(1, 3, 5, 5), nn.Conv2d(4, 2, 3))
    with pytest.raises(ValueError, match=r"\(m, 36\)"):
        acc.update_input(torch.zeros(1, 2, 5, 5), nn.Conv2d(2, 2, 3))
    with pytest.raises(ValueError, match="dimension 5"):
        SigmaAccumulator(4).update_input(torch.zeros(1, 5, 3, 3), nn.Conv2d(5, 2, 1))
    with pytest.raises(ValueError, match="smaller than"):
        acc.update_input(torch.zeros(1, 4, 2, 2), nn.Conv2d(4, 2, 3))
    with pytest.raises(ValueError, match="gram"):
        SigmaAccumulator.from_state_dict({"n": 3, "count": 1, "gram": torch.zeros(2, 2), "total": torch.zeros(3)})


# ---------------------------------------------------------------- capture of several layers in one pass


class _Counter(nn.Module):
    """Identity that counts its calls: shows whether the forward pass got past the captured layers."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2)
        self.fc = nn.Linear(6 * 4, 10)
        self.unused = nn.Linear(3, 3)
        self.tail = _Counter()

    def stages(self, x):
        """Inputs of conv1, conv2 and fc, computed by hand."""
        h = torch.relu(self.conv1(x))
        g = F.adaptive_avg_pool2d(torch.relu(self.conv2(h)), 2).flatten(1)
        return x, h, g

    def forward(self, x):
        return self.tail(self.fc(self.stages(x)[2]))


def _expected_sigmas(net: _Net, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-layer Sigma from hand-computed layer inputs and F.unfold (no sigma_core code)."""
    with torch.no_grad():
        x0, h, g = net.stages(x)
    u1 = F.unfold(x0, 3, padding=1).transpose(1, 2).reshape(-1, 9)
    u2 = F.unfold(h, 3, stride=2).transpose(1, 2).reshape(-1, 36)
    return {name: u.T @ u / u.shape[0] for name, u in (("conv1", u1), ("conv2", u2), ("fc", g))}


@pytest.fixture(scope="module")
def net_and_images():
    return _Net().double(), fmnist_images(40)


@pytest.mark.parametrize("stop_early", [True, False])
def test_capture_several_layers_one_pass(net_and_images, stop_early):
    net, x = net_and_images
    names = ["conv1", "conv2", "fc"]
    net.tail.calls = 0
    with SigmaCapture(net, names, stop_early=stop_early) as cap:
        for batch in x.split(16):
            cap.feed(batch)
    expected = _expected_sigmas(net, x)
    for name in names:
        assert rel_close(cap.accumulators[name].finalize(), expected[name]) < 1e-12, name
    assert cap.accumulators["conv2"].count == 40 * 13 * 13
    # stop_early aborts the forward right after the last captured layer's input is seen.
    assert net.tail.calls == (0 if stop_early else 3)
    # Hooks are removed on exit.
    assert all(not layer._forward_pre_hooks for layer in cap.layers.values())


def test_float32_capture_reads_outside_inference_mode(net_and_images):
    """SigmaCapture feeds under torch.inference_mode; the float32 partial Gram must still flush outside it."""
    net, x = net_and_images
    accs = accumulate_sigma(net, x.split(16), ["conv1", "conv2", "fc"], compute_dtype=torch.float32)
    expected = _expected_sigmas(net, x)
    for name, acc in accs.items():
        state = acc.state_dict()  # flushes the pending float32 sums
        assert state["count"] == acc.count and not torch.is_inference(state["gram"])
        assert rel_close(acc.finalize(), expected[name]) < 1e-5, name
        other = SigmaAccumulator(acc.n, compute_dtype=torch.float32)
        other.merge(acc)
        assert rel_close(other.finalize(), expected[name]) < 1e-5, name


def test_accumulate_sigma_max_samples_and_tuples(net_and_images):
    net, x = net_and_images
    net.train()
    batches = [(b, torch.zeros(len(b))) for b in x.split(10)]
    progress: list[int] = []
    accs = accumulate_sigma(net, batches, ["conv2", "conv1"], max_samples=25, callback=progress.append)
    assert progress == [10, 20, 25]
    assert net.training  # the training flag is restored
    expected = _expected_sigmas(net, x[:25])
    assert accs["conv1"].count == 25 * 28 * 28
    for name in ("conv1", "conv2"):
        assert rel_close(accs[name].finalize(), expected[name]) < 1e-12, name


def test_capture_layer_that_never_runs(net_and_images):
    net, x = net_and_images
    with SigmaCapture(net, ["conv1", "unused"]) as cap:
        with pytest.raises(RuntimeError, match="unused"):
            cap.feed(x[:4])
    with pytest.raises(RuntimeError, match="not called"):
        accumulate_sigma(net, [x[:4]], ["unused"])


def test_capture_unknown_layer_name(net_and_images):
    net, _ = net_and_images
    with pytest.raises(ValueError, match="conv9"):
        SigmaCapture(net, ["conv1", "conv9"])
    with pytest.raises(ValueError, match="empty"):
        SigmaCapture(net, [])


def test_grouped_conv_rejected():
    with pytest.raises(ValueError, match="grouped"):
        SigmaAccumulator.for_layer(nn.Conv2d(4, 4, 3, groups=2))


# ---------------------------------------------------------------- factor L


def _rel_reconstruction(fac) -> float:
    n = fac.sigma.shape[0]
    target = fac.sigma + fac.jitter * torch.eye(n, dtype=torch.float64)
    return rel_close(fac.factor @ fac.factor.T, target)


def test_factor_pd_sigma_is_plain_cholesky():
    sigma = spd_with_condition(30, 1e4, torch.Generator().manual_seed(0))
    fac = factor_sigma(sigma)
    assert fac.method == "cholesky" and fac.jitter == 0.0
    assert torch.equal(fac.factor, torch.tril(fac.factor))
    assert rel_close(fac.factor @ fac.factor.T, sigma) < 1e-13


def _few_samples_sigma() -> torch.Tensor:
    u = torch.randn(20, 50, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return u.T @ u / 20  # rank 20 < n = 50


def _dead_channel_sigma(features: torch.Tensor) -> torch.Tensor:
    feats = features.clone()
    feats[:, 3] = 0.0  # a dead ReLU channel: its 9 patch coordinates are always 0
    return _sigma_of(_conv_under_test(kernel_size=3), feats)


@pytest.mark.parametrize("case", ["few_samples", "dead_channel"])
def test_factor_rank_deficient_sigma(features, case):
    sigma = _few_samples_sigma() if case == "few_samples" else _dead_channel_sigma(features)
    fac = factor_sigma(sigma)
    print(f"factor {case}: method {fac.method}, jitter {fac.jitter:.2e}, rel err {_rel_reconstruction(fac):.2e}")
    assert fac.jitter > 0 or fac.method == "eigen"
    assert fac.jitter <= 1e-4 * float(sigma.diagonal().mean())
    assert _rel_reconstruction(fac) < 1e-9


def test_factor_eigen_fallback_forced():
    """With no jitter allowed the eigen path runs: L = V sqrt(max(lambda, 0)) still has L L^T = Sigma."""
    sigma = _few_samples_sigma()
    fac = factor_sigma(sigma, start_jitter=1e-10, max_jitter=1e-11)
    assert fac.method == "eigen" and fac.jitter == 0.0 and fac.min_eig is not None
    assert rel_close(fac.factor @ fac.factor.T, sigma) < 1e-12


def test_factor_rejects_non_psd():
    sigma = torch.diag(torch.tensor([1.0, 2.0, -0.5], dtype=torch.float64))
    with pytest.raises(ValueError, match="positive semi-definite"):
        factor_sigma(sigma)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_factor_rejects_nan_inf(bad):
    sigma = torch.eye(4, dtype=torch.float64)
    sigma[1, 2] = sigma[2, 1] = bad
    with pytest.raises(ValueError, match="NaN/Inf"):
        factor_sigma(sigma)


def test_factor_rejects_non_symmetric():
    sigma = torch.eye(4, dtype=torch.float64)
    sigma[0, 1] = 0.1
    with pytest.raises(ValueError, match="not symmetric"):
        factor_sigma(sigma)


def test_validate_sigma_wrong_size_names_needed_size():
    with pytest.raises(ValueError, match=r"needs \(72, 72\)"):
        validate_sigma(torch.eye(36, dtype=torch.float64), 72)
    with pytest.raises(ValueError, match="square"):
        validate_sigma(torch.zeros(3, 4, dtype=torch.float64))
    validate_sigma(torch.eye(72, dtype=torch.float64), 72)  # the right size passes

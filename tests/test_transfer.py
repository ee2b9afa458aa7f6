"""Sigma sources beyond one dataset: class subsets, down-then-up, mixtures, shrinkage, BN calibration, data-free."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.compress import SigmaSource, compute_sigmas
from pipeline.data import DatasetSpec, sample_subset
from pipeline.sigma_cache import SigmaCache, SigmaKey, model_fingerprint
from pipeline.transfer import Shrinkage, layer_input_moments
from sigma_core import conv_patches, validate_sigma
from sigma_core.bn_prior import data_free_sigma, relu_moments, tap_overlap
from sigma_core.shrinkage import shrink


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.short = nn.Conv2d(4, 4, 1, bias=False)
        self.bns = nn.BatchNorm2d(4)
        self.conv3 = nn.Conv2d(4, 3, 3, stride=2, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.conv4 = nn.Conv2d(4, 3, 3, padding=1, bias=False)

    def forward(self, x):
        a = torch.relu(self.bn1(self.conv1(x)))
        b = torch.relu(self.bn2(self.conv2(a)) + self.bns(self.short(a)))
        return self.conv3(b).mean() + self.conv4(self.pool(a)).mean()


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    model = _Net().eval()
    for bn in (model.bn1, model.bn2, model.bns):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.5, 0.5)
    return model


def _hand_sigma(model, layer, images):
    """Uncentered E[u u^T] over the patches of ``layer``'s input, from a plain forward hook (no accumulator)."""
    grabbed = []
    handle = dict(model.named_modules())[layer].register_forward_pre_hook(lambda m, a: grabbed.append(a[0]))
    with torch.no_grad():
        model(images)
    handle.remove()
    u = conv_patches(grabbed[0], dict(model.named_modules())[layer]).to(torch.float64)
    return u.T @ u / u.shape[0]


# ----------------------------------------------------------------------------- class subsets and mixtures
def test_class_subset_sigma_equals_hand_computed(net, tmp_path):
    spec = DatasetSpec("digits", classes=("3", 7))
    sigmas, _ = compute_sigmas(net, ["conv2"], SigmaSource(spec, n_samples=20, seed=1), progress=False,
                               cache=SigmaCache(tmp_path))
    full = DatasetSpec("digits").build()
    chosen = [i for i in range(len(full)) if int(full.targets[i]) in (3, 7)]
    picked = sample_subset(torch.utils.data.Subset(full, chosen), 20, 1)
    images = torch.stack([picked[i][0] for i in range(20)])
    assert set(int(full.targets[chosen[j]]) for j in picked.indices) <= {3, 7}
    torch.testing.assert_close(sigmas["conv2"], _hand_sigma(net, "conv2", images), rtol=0, atol=1e-12)


def test_mixture_sigma_equals_weighted_hand_sigmas(net, tmp_path):
    a, b = DatasetSpec("digits"), DatasetSpec("digits", classes=(0,))
    mix = DatasetSpec("mixture", components=(a, b), weights=(3.0, 1.0), counts=(12, 5))
    sigmas, _ = compute_sigmas(net, ["conv1", "conv3"], SigmaSource(mix, n_samples=17, seed=2), progress=False,
                               cache=SigmaCache(tmp_path))
    for layer in ("conv1", "conv3"):
        parts = []
        for spec, n in ((a, 12), (b, 5)):
            sub = sample_subset(spec.build(), n, 2)
            parts.append(_hand_sigma(net, layer, torch.stack([sub[i][0] for i in range(n)])))
        torch.testing.assert_close(sigmas[layer], 0.75 * parts[0] + 0.25 * parts[1], rtol=0, atol=1e-12)


def _key(spec, model, n=10):
    return SigmaKey(model_fingerprint(model), spec.identity(), n, 0, False).for_layers(["conv1"])


def test_cache_key_changes_iff_subset_or_weights_change(net):
    base = _key(DatasetSpec("fashion-mnist", classes=("Bag", "Trouser")), net)
    assert base == _key(DatasetSpec("fashion-mnist", classes=(1, 8)), net)  # names == indices, any order
    assert base == _key(DatasetSpec("fashion-mnist", classes=(8, "Trouser", 8)), net)
    assert base != _key(DatasetSpec("fashion-mnist", classes=(1,)), net)
    assert base != _key(DatasetSpec("fashion-mnist"), net)
    assert _key(DatasetSpec("fashion-mnist"), net) == SigmaKey(
        model_fingerprint(net), {"name": "fashion-mnist", "root": None, "split": "train", "image_size": None,
                                 "resample": "bilinear"}, 10, 0, False).for_layers(["conv1"])  # old keys unchanged
    comps = (DatasetSpec("digits"), DatasetSpec("fashion-mnist"))
    mix = _key(DatasetSpec("mixture", components=comps, weights=(2.0, 1.0)), net)
    assert mix == _key(DatasetSpec("mixture", components=comps, weights=(4.0, 2.0)), net)  # same ratios
    assert mix != _key(DatasetSpec("mixture", components=comps, weights=(1.0, 1.0)), net)
    assert mix != _key(DatasetSpec("mixture", components=comps, weights=(2.0, 1.0), counts=(5, 5)), net)
    assert _key(DatasetSpec("digits", down_size=4), net) != _key(DatasetSpec("digits"), net)


@pytest.mark.parametrize("kwargs, match", [
    (dict(name="fashion-mnist", classes=("Cat",)), "unknown class 'Cat'"),
    (dict(name="fashion-mnist", classes=(10,)), "out of range"),
    (dict(name="digits", classes=()), "classes is empty"),
    (dict(name="mixture", components=(DatasetSpec("digits"),), weights=(-1.0,)), ">= 0"),
    (dict(name="mixture", components=(DatasetSpec("digits"), DatasetSpec("digits")), weights=(0.0, 0.0)),
     "sum to zero"),
    (dict(name="mixture", components=()), "needs components"),
    (dict(name="digits", down_size=29), "larger than"),
    (dict(name="fashion-mnist", image_size=20, down_size=21), "larger than"),
])
def test_bad_views_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DatasetSpec(**kwargs)


def test_down_up_changes_images_and_keeps_shape():
    plain = DatasetSpec("digits", resample="bicubic").build()
    down = DatasetSpec("digits", resample="bicubic", down_size=4).build()
    assert down[0][0].shape == plain[0][0].shape == (1, 28, 28)
    assert (down[0][0] - plain[0][0]).abs().max() > 0.1


# ----------------------------------------------------------------------------- shrinkage
@pytest.mark.parametrize("m, p", [(30, 12), (400, 12), (15, 40)])
def test_shrinkage_equals_sklearn(m, p):
    from sklearn.covariance import OAS, ledoit_wolf

    rng = np.random.default_rng(m + p)
    x = rng.standard_normal((m, p)) @ rng.standard_normal((p, p)) + 0.3
    sigma = torch.tensor(x.T @ x / m)
    oas = OAS(assume_centered=True).fit(x)
    got = shrink(sigma, m, estimator="oas")
    assert abs(got.intensity - oas.shrinkage_) < 1e-10
    np.testing.assert_allclose(got.sigma.numpy(), oas.covariance_, rtol=0, atol=1e-10)
    cov, lam = ledoit_wolf(x, assume_centered=True)
    got = shrink(sigma, m, estimator="lw", fourth_moment=float(((x ** 2).sum(1) ** 2).mean()))
    assert abs(got.intensity - lam) < 1e-10
    np.testing.assert_allclose(got.sigma.numpy(), cov, rtol=0, atol=1e-10)


@pytest.mark.parametrize("estimator", ["oas", "lw"])
@pytest.mark.parametrize("target", ["identity", "kronecker"])
def test_shrinkage_is_valid_and_in_range(estimator, target):
    torch.manual_seed(0)
    x = torch.randn(5, 4 * 9, dtype=torch.float64)  # fewer patches than dimensions: singular Sigma
    res = shrink(x.T @ x / 5, 5, estimator=estimator, target=target, channels=4)
    validate_sigma(res.sigma)
    assert 0.0 <= res.intensity <= 1.0
    assert torch.linalg.eigvalsh(res.sigma).min() > 0  # the singular Sigma became definite
    assert res.intensity > 0


def test_shrinkage_intensity_out_of_range():
    sigma = torch.eye(3, dtype=torch.float64)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            shrink(sigma, intensity=bad)
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            Shrinkage(intensity=bad)
    assert Shrinkage.parse("oas:kronecker:images") == Shrinkage("oas", "kronecker", count="images")
    assert Shrinkage.parse("0.25").intensity == 0.25


# ----------------------------------------------------------------------------- BN moments
def test_relu_moments_match_monte_carlo():
    torch.manual_seed(0)
    mean, var = torch.tensor([0.3, -0.5, 1.0]), torch.tensor([1.0, 0.25, 4.0])
    z = mean + var.sqrt() * torch.randn(400_000, 3, dtype=torch.float64)
    m1, m2 = relu_moments(mean, var)
    torch.testing.assert_close(m1, z.clamp_min(0).mean(0), rtol=0, atol=1e-2)
    torch.testing.assert_close(m2, (z.clamp_min(0) ** 2).mean(0), rtol=0, atol=2e-2)


def test_layer_input_kinds(net):
    kinds = {k: v.kind for k, v in layer_input_moments(net, ["conv1", "conv2", "conv3", "conv4"]).items()}
    assert kinds == {"conv1": "input", "conv2": "relu-bn", "conv3": "relu-sum-bn", "conv4": "pooled"}


def test_data_free_sigma_matches_independent_model():
    torch.manual_seed(1)
    m1, m2 = torch.tensor([0.4, 0.1], dtype=torch.float64), torch.tensor([0.5, 0.3], dtype=torch.float64)
    conv = nn.Conv2d(2, 1, 3, padding=1)
    overlap = tap_overlap((5, 5), conv.kernel_size, conv.stride, conv.padding)
    sigma = data_free_sigma(m1, m2, overlap)
    # i.i.d. pixels with these moments (two-point law): the patch Sigma converges to the formula
    p = (m1 ** 2 / m2)
    vals = (m2 / m1)
    x = (torch.rand(20_000, 2, 5, 5, dtype=torch.float64) < p[None, :, None, None]) * vals[None, :, None, None]
    u = conv_patches(x, conv.double())
    torch.testing.assert_close(sigma, u.T @ u / u.shape[0], rtol=0, atol=1e-2)
    validate_sigma(sigma)


def test_calibration_and_data_free_sources_run(net, tmp_path):
    cache = SigmaCache(tmp_path)
    layers = ["conv2", "conv3", "conv4"]
    cal, info = compute_sigmas(net, layers, SigmaSource(DatasetSpec("digits"), 6, calibration="bn-scale"),
                               cache=cache, progress=False)
    plain, _ = compute_sigmas(net, layers, SigmaSource(DatasetSpec("digits"), 6), cache=cache, progress=False)
    notes = info["layer_notes"]
    assert notes["conv2"]["calibrated"] and notes["conv3"]["calibrated"] and not notes["conv4"]["calibrated"]
    torch.testing.assert_close(cal["conv4"], plain["conv4"], rtol=0, atol=0)  # pooled input: left alone
    moments = layer_input_moments(net, ["conv2"])["conv2"]
    centre = torch.arange(4) * 9 + 4
    raw = plain["conv2"].diagonal()[centre]
    free_scale = (raw > 0) & ((moments.m2 / raw).sqrt() - 1).abs().lt(9) & ((moments.m2 / raw).sqrt() > 0.1)
    assert free_scale.any()  # channels whose scale is not clipped (or dead) match the BN moment exactly
    torch.testing.assert_close(cal["conv2"].diagonal()[centre][free_scale], moments.m2[free_scale], rtol=1e-12,
                               atol=0)
    free, _ = compute_sigmas(net, layers, SigmaSource(DatasetSpec("bn-prior"), 1), cache=cache, progress=False)
    for sigma in free.values():
        validate_sigma(sigma)


def test_transfer_sweep_config_parses():
    from jobs.yaml_config import sweep_config_from_yaml

    config = sweep_config_from_yaml("jobs/configs/transfer_fmnist_sweep.yaml")
    by_label = {s.name: s for s in config.sigma_sources}
    assert by_label["fmnist-bag"].dataset.classes == (8,)
    assert by_label["mix-50-50"].dataset.counts == (1000, 16)
    assert by_label["digits-oas-kron"].shrinkage == Shrinkage("oas", "kronecker", count="images")
    assert by_label["digits-cal"].calibration == "bn-scale"
    assert by_label["fmnist"].identity() == DatasetSpec("fashion-mnist").identity()  # plain keys unchanged
    assert "sigma_transform" in by_label["digits-cal"].identity()

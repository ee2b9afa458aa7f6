"""BatchNorm folding (sigma_core.fold): folded == unfolded for every layer type, and what is left alone."""

import pytest
import torch
from torch import nn

from pipeline.models import build_model
from sigma_core import CPConv, LowRank1x1Conv, LowRankLinear, Tucker2Conv
from sigma_core.fold import fold_batchnorm


def _randomize_bn(model: nn.Module, gen: torch.Generator) -> None:
    """Non-trivial running statistics and affine parameters, so that folding has something to fold."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=gen))
                m.running_var.copy_(torch.rand(c, generator=gen) * 2 + 0.1)
                m.weight.copy_(torch.randn(c, generator=gen))
                m.bias.copy_(torch.randn(c, generator=gen))


def _random_params(module: nn.Module, gen: torch.Generator) -> nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return module


def _layer(kind: str, bias: bool) -> tuple[nn.Module, nn.Module, tuple[int, ...]]:
    """(layer, BN, input shape) for each layer type the toolkit makes."""
    geometry = {"stride": 2, "padding": 1, "dilation": 1, "bias": bias}
    if kind == "conv":
        return nn.Conv2d(6, 8, 3, **geometry), nn.BatchNorm2d(8), (3, 6, 9, 9)
    if kind == "tucker2":
        return Tucker2Conv(6, 8, 3, (4, 3), **geometry), nn.BatchNorm2d(8), (3, 6, 9, 9)
    if kind == "cp":
        return CPConv(6, 8, 3, 5, padding_mode="reflect", **geometry), nn.BatchNorm2d(8), (3, 6, 9, 9)
    if kind == "lowrank1x1":
        return LowRank1x1Conv(6, 8, 3, bias=bias), nn.BatchNorm2d(8), (3, 6, 5, 5)
    if kind == "lowrank_linear":
        return LowRankLinear(12, 7, 3, bias=bias), nn.BatchNorm1d(7), (4, 12)
    raise AssertionError(kind)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kind", ["conv", "tucker2", "cp", "lowrank1x1", "lowrank_linear"])
def test_folded_equals_unfolded_every_layer_type(kind, bias):
    gen = torch.Generator().manual_seed(3)
    layer, bn, shape = _layer(kind, bias)
    model = nn.Sequential(_random_params(layer, gen), bn, nn.ReLU())
    _randomize_bn(model, gen)
    model.eval()
    x = torch.randn(shape, generator=gen)
    folded, report = fold_batchnorm(model)
    assert report.folded == (("0", "1"),) and report.skipped == ()
    assert isinstance(folded[1], nn.Identity) and isinstance(model[1], type(bn))  # a copy by default
    ref, out = model(x), folded(x)
    assert (out - ref).abs().max() <= 1e-5 * max(1.0, ref.abs().max())
    if kind != "conv":
        assert folded[0].spec()["bias"] is True  # the folded shift lives in the last layer's bias


def test_folded_resnet_equals_unfolded_and_skips_nothing_silently():
    """The residual reference model: every conv -> BN pair folds, and the logits stay equal to 1e-5."""
    gen = torch.Generator().manual_seed(5)
    model = build_model("resnet-fmnist", 10)
    _randomize_bn(model, gen)
    model.eval()
    x = torch.randn(4, 1, 28, 28, generator=gen)
    folded, report = fold_batchnorm(model)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert len(report.folded) + len(report.skipped) == n_bn and len(report.folded) >= n_bn - 1
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules()) or report.skipped
    ref = model(x)
    assert (folded(x) - ref).abs().max() <= 1e-5 * max(1.0, ref.abs().max())


def test_bn_after_add_or_shared_output_is_skipped_with_reason():
    class AddThenBN(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)
            self.bn = nn.BatchNorm2d(4)
            self.c = nn.Conv2d(3, 4, 1)
            self.bn2 = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.c(x)
            return self.bn(self.a(x) + self.b(x)) + self.bn2(y) + y

    model = AddThenBN().eval()
    folded, report = fold_batchnorm(model)
    reasons = dict(report.skipped)
    assert report.folded == () and set(reasons) == {"bn", "bn2"}
    assert "not the output of a layer" in reasons["bn"] and "used elsewhere" in reasons["bn2"]
    x = torch.randn(2, 3, 5, 5)
    assert torch.allclose(folded(x), model(x))


def test_training_mode_bn_is_not_folded():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))  # training mode
    _, report = fold_batchnorm(model)
    assert report.folded == () and "training mode" in report.skipped[0][1]


def test_untraceable_model_is_a_clear_error():
    class Dynamic(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 1)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
                return self.conv(x)
            return x

    with pytest.raises(ValueError, match="cannot trace the model"):
        fold_batchnorm(Dynamic().eval())

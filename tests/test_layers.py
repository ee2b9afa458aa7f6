"""Factorized layers equal the dense layer with the reconstructed weight."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sigma_core.decompose._result import Tucker2Result
from sigma_core.layers import CPConv, LowRank1x1Conv, LowRankLinear, Tucker2Conv, module_from_spec


# Small kernels on a shared 2-core machine: one torch thread (fixture in conftest.py).
pytestmark = pytest.mark.usefixtures("single_thread")


def _random_result(t: int, s: int, kh: int, kw: int, ranks: tuple[int, int], seed: int = 0,
                   dtype: torch.dtype = torch.float32) -> Tucker2Result:
    gen = torch.Generator().manual_seed(seed)
    r_t, r_s = ranks
    u_t = torch.linalg.qr(torch.randn(t, r_t, generator=gen, dtype=dtype))[0]
    u_s = torch.linalg.qr(torch.randn(s, r_s, generator=gen, dtype=dtype))[0]
    core = torch.randn(r_t, r_s, kh, kw, generator=gen, dtype=dtype)
    return Tucker2Result(core=core, u_t=u_t, u_s=u_s, ranks=ranks, errors=(0.0,), converged=True,
                         method="test")


def _assert_spec_round_trip(layer: nn.Module, x: torch.Tensor) -> dict:
    """Rebuild ``layer`` from its JSON'd spec, load its state dict strictly and check it is the same layer."""
    spec = json.loads(json.dumps(layer.spec()))
    rebuilt = module_from_spec(spec)
    rebuilt.load_state_dict(layer.state_dict())
    torch.testing.assert_close(rebuilt(x), layer(x), atol=0, rtol=0)
    assert rebuilt.spec() == layer.spec()
    return spec


def _dense_conv(conv: nn.Conv2d, x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    if conv.padding_mode != "zeros":
        pad_h, pad_w = conv.padding
        x = F.pad(x, (pad_w, pad_w, pad_h, pad_h), mode=conv.padding_mode)
        return F.conv2d(x, kernel, conv.bias, conv.stride, 0, conv.dilation)
    return F.conv2d(x, kernel, conv.bias, conv.stride, conv.padding, conv.dilation)


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("kernel_size", [(3, 3), (5, 3)])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("padding", [0, 1, (2, 1)])
@pytest.mark.parametrize("dilation", [1, 2])
@pytest.mark.parametrize("bias", [True, False])
def test_tucker2conv_matches_dense(padding_mode, kernel_size, stride, padding, dilation, bias):
    torch.manual_seed(0)
    t, s = 7, 5
    conv = nn.Conv2d(s, t, kernel_size, stride=stride, padding=padding, dilation=dilation,
                     padding_mode=padding_mode, bias=bias)
    result = _random_result(t, s, *kernel_size, ranks=(4, 3))
    layer = Tucker2Conv.from_result(conv, result)
    x = torch.randn(2, s, 13, 12)
    expected = _dense_conv(conv, x, result.reconstruct())
    out = layer(x)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.reconstructed_kernel(), result.reconstruct(), atol=1e-6, rtol=1e-6)


def test_tucker2conv_structure_and_bias():
    conv = nn.Conv2d(6, 8, 3, stride=2, padding=1)
    layer = Tucker2Conv.from_result(conv, _random_result(8, 6, 3, 3, (5, 4)))
    assert layer.in_proj.weight.shape == (4, 6, 1, 1) and layer.in_proj.bias is None
    assert layer.core.weight.shape == (5, 4, 3, 3) and layer.core.bias is None
    assert layer.core.stride == (2, 2) and layer.core.padding == (1, 1)
    assert layer.out_proj.weight.shape == (8, 5, 1, 1)
    torch.testing.assert_close(layer.out_proj.bias, conv.bias)
    assert layer.out_proj.bias.data_ptr() != conv.bias.data_ptr()


def test_tucker2conv_same_padding_and_float64_result_cast():
    conv = nn.Conv2d(4, 6, 3, padding="same", padding_mode="reflect")
    result = _random_result(6, 4, 3, 3, (3, 2), dtype=torch.float64)
    layer = Tucker2Conv.from_result(conv, result)
    assert layer.core.weight.dtype == torch.float32
    x = torch.randn(1, 4, 9, 9)
    expected = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), result.reconstruct().float(), conv.bias)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_tucker2conv_keeps_training_flag():
    conv = nn.Conv2d(4, 6, 3).eval()
    assert not Tucker2Conv.from_result(conv, _random_result(6, 4, 3, 3, (2, 2))).training


def test_grouped_conv_rejected():
    conv = nn.Conv2d(4, 8, 3, groups=2)
    result = _random_result(8, 2, 3, 3, (2, 2))
    with pytest.raises(ValueError, match="grouped"):
        Tucker2Conv.from_result(conv, result)


def test_wrong_kernel_shape_rejected():
    conv = nn.Conv2d(4, 6, 3)
    with pytest.raises(ValueError, match=r"\(6, 5, 3, 3\).*\(6, 4, 3, 3\)"):
        Tucker2Conv.from_result(conv, _random_result(6, 5, 3, 3, (2, 2)))
    with pytest.raises(ValueError, match="Conv2d"):
        Tucker2Conv.from_result(nn.Linear(4, 6), _random_result(6, 4, 3, 3, (2, 2)))


def test_empty_rejects_bad_ranks():
    with pytest.raises(ValueError, match="R_T"):
        Tucker2Conv.empty(4, 6, 3, (7, 2))
    with pytest.raises(ValueError, match="padding_mode"):
        Tucker2Conv.empty(4, 6, 3, (2, 2), padding_mode="mirror")


@pytest.mark.parametrize("padding", [(2, 1), "same"])
def test_tucker2conv_spec_round_trip(padding):
    conv = nn.Conv2d(5, 7, (5, 3), stride=1, padding=padding, dilation=(1, 2), padding_mode="circular")
    layer = Tucker2Conv.from_result(conv, _random_result(7, 5, 5, 3, (4, 3)))
    assert _assert_spec_round_trip(layer, torch.randn(2, 5, 11, 10))["type"] == "Tucker2Conv"


# Saved compressed models (pipeline.compress.save_compressed) hold these spec dicts and state-dict keys: a change to
# either breaks loading the models already written.
_SAVED_FORMATS = [
    (lambda: Tucker2Conv.empty(5, 7, (5, 3), (4, 3), padding="same", dilation=(1, 2), padding_mode="circular"),
     {"type": "Tucker2Conv", "in_channels": 5, "out_channels": 7, "kernel_size": [5, 3], "ranks": [4, 3],
      "stride": [1, 1], "padding": "same", "dilation": [1, 2], "padding_mode": "circular", "bias": True},
     ["in_proj.weight", "core.weight", "out_proj.weight", "out_proj.bias"]),
    (lambda: CPConv.empty(5, 7, 3, 6, stride=2, padding=(2, 1), bias=False),
     {"type": "CPConv", "in_channels": 5, "out_channels": 7, "kernel_size": [3, 3], "rank": 6, "stride": [2, 2],
      "padding": [2, 1], "dilation": [1, 1], "padding_mode": "zeros", "bias": False},
     ["in_proj.weight", "depth_h.weight", "depth_w.weight", "out_proj.weight"]),
    (lambda: LowRank1x1Conv.empty(5, 7, 2, stride=2, padding=1, padding_mode="reflect"),
     {"type": "LowRank1x1Conv", "in_channels": 5, "out_channels": 7, "rank": 2, "stride": [2, 2], "padding": [1, 1],
      "dilation": [1, 1], "padding_mode": "reflect", "bias": True},
     ["first.weight", "second.weight", "second.bias"]),
    (lambda: LowRankLinear.empty(10, 6, 3, bias=False),
     {"type": "LowRankLinear", "in_features": 10, "out_features": 6, "rank": 3, "bias": False},
     ["first.weight", "second.weight"]),
]


@pytest.mark.parametrize("make, spec, keys", _SAVED_FORMATS)
def test_spec_and_state_dict_keys_of_saved_models(make, spec, keys):
    torch.manual_seed(0)
    layer = make()
    assert list(layer.spec().items()) == list(spec.items())
    assert list(layer.state_dict()) == keys
    x = torch.randn(4, 10) if isinstance(layer, LowRankLinear) else torch.randn(2, 5, 11, 10)
    assert _assert_spec_round_trip(layer, x) == spec


def test_module_from_spec_errors():
    with pytest.raises(ValueError, match="unknown layer type 'CPConvX'"):
        module_from_spec({"type": "CPConvX"})
    with pytest.raises(ValueError, match="type"):
        module_from_spec({"in_channels": 3})
    with pytest.raises(ValueError, match="do not fit"):
        module_from_spec({"type": "LowRankLinear", "in_features": 3})


def test_low_rank_linear_equals_dense_product():
    torch.manual_seed(0)
    linear = nn.Linear(10, 6)
    first, second = torch.randn(3, 10), torch.randn(6, 3)
    layer = LowRankLinear.from_factors(linear, first, second)
    x = torch.randn(4, 10)
    torch.testing.assert_close(layer(x), F.linear(x, second @ first, linear.bias), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.reconstructed_weight(), second @ first)
    _assert_spec_round_trip(layer, x)


def test_low_rank_linear_without_bias_and_bad_factors():
    linear = nn.Linear(5, 4, bias=False)
    layer = LowRankLinear.from_factors(linear, torch.randn(2, 5), torch.randn(4, 2))
    assert layer.second.bias is None
    with pytest.raises(ValueError, match="first"):
        LowRankLinear.from_factors(linear, torch.randn(2, 6), torch.randn(4, 2))
    with pytest.raises(ValueError, match="rank"):
        LowRankLinear.empty(5, 4, 0)


@pytest.mark.parametrize("kwargs", [{"dilation": True}, {"stride": 1.5}, {"padding": None}, {"stride": (1, 2, 3)}])
def test_bad_geometry_is_a_value_error(kwargs):
    with pytest.raises(ValueError, match="must be an int or a pair of ints"):
        Tucker2Conv.empty(5, 7, 3, (4, 3), **kwargs)

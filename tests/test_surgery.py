"""Layer planning, module replacement, parameter and MAC counting."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sigma_core.decompose._result import Tucker2Result
from sigma_core.layers import Tucker2Conv
from sigma_core.surgery import (
    LayerChoice,
    compression_rate,
    count_macs,
    count_params,
    get_module,
    plan_layers,
    replace_modules,
)


# Small kernels on a shared 2-core machine: one torch thread (fixture in conftest.py).
pytestmark = pytest.mark.usefixtures("single_thread")


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = nn.Sequential(
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 16, 1),
            nn.Conv2d(16, 16, 3, padding=1, groups=16),
            nn.BatchNorm2d(16),
        )
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block(self.stem(x))
        return self.head(x.mean(dim=(2, 3)))


def _by_name(choices: list[LayerChoice]) -> dict[str, LayerChoice]:
    return {c.name: c for c in choices}


def test_default_plan_skips_first_1x1_grouped_and_linear():
    choices = plan_layers(_Net())
    assert [c.name for c in choices] == ["stem", "block.0", "block.2", "block.3", "head"]
    plan = _by_name(choices)
    assert [c.name for c in choices if c.selected] == ["block.0"]
    assert plan["stem"].reason.startswith("first conv")
    assert "1x1" in plan["block.2"].reason and "SVD" in plan["block.2"].reason
    assert "grouped conv (groups=16)" in plan["block.3"].reason
    assert plan["head"].kind == "linear" and not plan["head"].selected
    assert plan["block.0"].kind == "conv" and plan["block.0"].weight_shape == (16, 8, 3, 3)
    assert plan["head"].weight_shape == (10, 16)


def test_plan_flags():
    plan = _by_name(plan_layers(_Net(), include_first_conv=True, include_1x1=True, include_linear=True))
    assert {n for n, c in plan.items() if c.selected} == {"stem", "block.0", "block.2", "head"}
    assert not plan["block.3"].selected  # grouped convs stay out whatever the flags


def test_plan_with_names_selects_exactly_those():
    plan = _by_name(plan_layers(_Net(), names=["stem", "head"]))
    assert {n for n, c in plan.items() if c.selected} == {"stem", "head"}
    assert len(plan) == 5


def test_plan_with_unknown_name_suggests_close_match():
    with pytest.raises(ValueError, match=r"block\.0"):
        plan_layers(_Net(), names=["block.O"])
    with pytest.raises(ValueError, match="not an nn.Conv2d"):
        plan_layers(_Net(), names=["block.1"])
    with pytest.raises(ValueError, match="grouped"):
        plan_layers(_Net(), names=["block.3"])


def test_get_module():
    model = _Net()
    assert get_module(model, "block.2") is model.block[2]
    assert get_module(model, "") is model
    with pytest.raises(ValueError, match=r"'hed'.*head"):
        get_module(model, "hed")


def test_replace_modules_leaves_original_intact():
    torch.manual_seed(0)
    model = _Net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    old_block0 = model.block[0]
    new = nn.Conv2d(8, 16, 3, padding=1)
    out = replace_modules(model, {"block.0": new, "head": nn.Linear(16, 10)})
    assert out.block[0] is new and model.block[0] is old_block0
    assert out.stem is not model.stem and out.stem.weight.data_ptr() != model.stem.weight.data_ptr()
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
    with pytest.raises(ValueError, match=r"block\.2"):
        replace_modules(model, {"block.22": new})
    with pytest.raises(ValueError, match="root"):
        replace_modules(model, {"": new})
    with pytest.raises(ValueError, match="parent"):
        replace_modules(model, {"block": nn.Identity(), "block.0": new})


def test_count_params_single_conv():
    assert count_params(nn.Conv2d(3, 4, 3)) == 4 * 3 * 3 * 3 + 4
    shared = nn.Linear(5, 5)
    assert count_params(nn.Sequential(shared, shared)) == 30


def test_count_macs_single_conv_and_linear():
    t, s, h, w = 4, 3, 3, 3
    conv = nn.Conv2d(s, t, (h, w))
    assert count_macs(conv, (1, s, 10, 10)) == t * s * h * w * 8 * 8
    assert count_macs(conv, (2, s, 10, 10)) == 2 * t * s * h * w * 8 * 8
    strided = nn.Conv2d(s, t, (h, w), stride=2, padding=1, bias=False)
    assert count_macs(strided, (1, s, 10, 10)) == t * s * h * w * 5 * 5
    assert count_macs(nn.Linear(5, 7), (1, 5)) == 35


def test_count_macs_restores_training_flags():
    model = _Net().train()
    model.block[4].eval()
    count_macs(model, (1, 3, 8, 8))
    assert model.training and model.stem.training and not model.block[4].training


def test_compression_rate_with_tucker2conv():
    torch.manual_seed(0)
    model = _Net()
    conv = model.block[0]
    r_t, r_s = 4, 2
    result = Tucker2Result(core=torch.randn(r_t, r_s, 3, 3), u_t=torch.randn(16, r_t), u_s=torch.randn(8, r_s),
                           ranks=(r_t, r_s), errors=(0.0,), converged=True, method="test")
    compressed = replace_modules(model, {"block.0": Tucker2Conv.from_result(conv, result)})
    saved = (16 * 8 * 9) - (8 * r_s + r_s * r_t * 9 + r_t * 16)
    assert count_params(compressed) == count_params(model) - saved
    assert compression_rate(model, compressed) == pytest.approx(count_params(model) / count_params(compressed))
    assert compression_rate(model, model) == 1.0
    macs = count_macs(compressed, (1, 3, 8, 8))
    assert macs == count_macs(model, (1, 3, 8, 8)) - saved * 8 * 8
    assert compressed(torch.zeros(1, 3, 8, 8)).shape == (1, 10)

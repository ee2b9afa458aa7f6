"""Tests for pipeline.models: reference CNNs, torchvision registry, weights IO."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from pipeline.models import (
    MODEL_NAMES,
    REFERENCE_MODELS,
    TORCHVISION_MODELS,
    build_model,
    load_weights,
    model_input_shape,
    read_state_dict,
)

_NUM_CLASSES = 3


def _state_equal(left: nn.Module, right: nn.Module) -> bool:
    a, b = left.state_dict(), right.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _save_safetensors(model: nn.Module, path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


# --------------------------------------------------------------------------- #
# Reference CNNs
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("name", sorted(REFERENCE_MODELS))
def test_reference_model_shapes(name: str) -> None:
    model = build_model(name).eval()
    assert model_input_shape(name) == (1, 28, 28)
    with torch.inference_mode():
        assert model(torch.zeros(4, 1, 28, 28)).shape == (4, 10)
    assert build_model(name, num_classes=7)(torch.zeros(2, 1, 28, 28)).shape == (2, 7)


@pytest.mark.parametrize("name", sorted(set(REFERENCE_MODELS) - {"lenet5-fmnist"}))  # LeNet5: the TDLRT paper's net
def test_reference_model_is_mostly_wide_convs_with_batchnorm(name: str) -> None:
    model = build_model(name)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    wide = [c for c in convs if c.out_channels >= 64]
    assert len(wide) > len(convs) / 2, "most convs must be worth Tucker-2 compressing"
    assert convs[0].in_channels == 1
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == len(convs)


@pytest.mark.parametrize("name", sorted(REFERENCE_MODELS))
def test_reference_model_init_is_seeded(name: str) -> None:
    torch.manual_seed(5)
    first = build_model(name)
    torch.manual_seed(5)
    assert _state_equal(first, build_model(name))


def test_unknown_model_lists_valid_names() -> None:
    with pytest.raises(ValueError) as info:
        build_model("resnet1000")
    assert all(name in str(info.value) for name in MODEL_NAMES)


# --------------------------------------------------------------------------- #
# torchvision architectures: build and round-trip weights
# --------------------------------------------------------------------------- #
@pytest.fixture(scope="module", params=sorted(TORCHVISION_MODELS))
def tv_model(request: pytest.FixtureRequest) -> tuple[str, nn.Module]:
    torch.manual_seed(0)
    return request.param, build_model(request.param, num_classes=_NUM_CLASSES)


def test_torchvision_model_output_layer(tv_model: tuple[str, nn.Module]) -> None:
    name, model = tv_model
    assert model_input_shape(name) == (3, 224, 224)
    last_linear = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    assert last_linear.out_features == _NUM_CLASSES
    if name == "googlenet":
        assert model.aux1 is None and model.aux2 is None


def test_torchvision_weights_round_trip(tv_model: tuple[str, nn.Module], tmp_path: Path) -> None:
    name, model = tv_model
    safetensors_path = _save_safetensors(model, tmp_path / "w.safetensors")
    torch.save(model.state_dict(), tmp_path / "w.pt")
    for path in (safetensors_path, tmp_path / "w.pt"):
        torch.manual_seed(1)
        loaded = build_model(name, num_classes=_NUM_CLASSES, weights=path)
        assert _state_equal(model, loaded), f"{name} round trip through {path.name}"
        path.unlink()  # the large architectures would otherwise pile up on disk


def test_resnet18_tiny_forward_after_load(tmp_path: Path) -> None:
    model = build_model("resnet18", num_classes=_NUM_CLASSES).eval()
    loaded = build_model("resnet18", _NUM_CLASSES, _save_safetensors(model, tmp_path / "r.safetensors"))
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(loaded.eval()(x), model(x))


# --------------------------------------------------------------------------- #
# State-dict reading variants
# --------------------------------------------------------------------------- #
@pytest.fixture
def small() -> nn.Module:
    torch.manual_seed(0)
    return build_model("vgg-fmnist")


@pytest.mark.parametrize("nest_key", [None, "state_dict", "model"])
def test_nested_and_prefixed_state_dicts(
    small: nn.Module, tmp_path: Path, nest_key: str | None
) -> None:
    state = {f"module.{k}": v for k, v in small.state_dict().items()}
    payload = state if nest_key is None else {nest_key: state, "epoch": 3}
    torch.save(payload, tmp_path / "ckpt.pth")
    assert _state_equal(small, build_model("vgg-fmnist", weights=tmp_path / "ckpt.pth"))


def test_safetensors_detected_without_suffix(small: nn.Module, tmp_path: Path) -> None:
    path = _save_safetensors(small, tmp_path / "weights.data")
    assert read_state_dict(path).keys() == small.state_dict().keys()


def test_in_memory_state_dict_is_copied(small: nn.Module) -> None:
    loaded = build_model("vgg-fmnist", weights=small.state_dict())
    assert _state_equal(small, loaded)
    with torch.no_grad():
        loaded.classifier[4].bias.add_(1.0)
    assert not _state_equal(small, loaded), "the new model must not alias the source tensors"


# --------------------------------------------------------------------------- #
# Errors
# --------------------------------------------------------------------------- #
def test_wrong_num_classes_reports_shape_mismatch(tmp_path: Path) -> None:
    path = _save_safetensors(build_model("resnet18", num_classes=10), tmp_path / "r18.safetensors")
    with pytest.raises(ValueError) as info:
        build_model("resnet18", num_classes=5, weights=path)
    message = str(info.value)
    assert "'resnet18'" in message and str(path) in message
    assert "shape mismatches" in message and "fc.weight: file (10, 512) vs model (5, 512)" in message


def test_wrong_architecture_reports_missing_and_unexpected_keys(
    small: nn.Module, tmp_path: Path
) -> None:
    path = _save_safetensors(small, tmp_path / "vgg.safetensors")
    with pytest.raises(ValueError) as info:
        build_model("resnet-fmnist", weights=path)
    message = str(info.value)
    assert "missing keys" in message and "unexpected keys" in message
    assert "'resnet-fmnist'" in message and "more)" in message  # long lists are truncated


def test_dropped_key_is_reported(small: nn.Module) -> None:
    state = small.state_dict()
    del state["classifier.4.bias"]
    with pytest.raises(ValueError, match=r"1 missing keys \[classifier\.4\.bias\]"):
        load_weights(build_model("vgg-fmnist"), state, arch="vgg-fmnist")


def test_missing_weights_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_model("alexnet", weights=tmp_path / "nope.pt")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_unreadable_weights_file(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"garbage{suffix}"
    path.write_bytes(b"\x00\x01 definitely not a checkpoint" * 10)
    with pytest.raises(ValueError, match="could not read weights file"):
        read_state_dict(path)


def test_non_state_dict_payload(tmp_path: Path) -> None:
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="not a state dict"):
        read_state_dict(tmp_path / "list.pt")
    torch.save({"weight": torch.zeros(1), "note": "hi"}, tmp_path / "mixed.pt")
    with pytest.raises(ValueError, match="non-tensor entries"):
        read_state_dict(tmp_path / "mixed.pt")


def test_loaded_model_is_materialized_and_trainable(small: nn.Module, tmp_path: Path) -> None:
    half = {k: (v.half() if v.is_floating_point() else v) for k, v in small.state_dict().items()}
    path = tmp_path / "half.safetensors"
    save_file(half, str(path))
    loaded = build_model("vgg-fmnist", weights=path)
    path.write_bytes(b"")  # an in-place overwrite must not affect the loaded model
    params = list(loaded.parameters())
    assert all(not p.is_meta and p.dtype == torch.float32 and p.requires_grad for p in params)
    assert all(not b.is_meta for b in loaded.buffers())
    loaded(torch.zeros(2, 1, 28, 28)).sum().backward()
    assert all(p.grad is not None for p in params)

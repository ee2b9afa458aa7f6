"""Tests for pipeline.train (reference-model cache), pipeline.evaluate and pipeline._io."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

import pipeline.train as train_module
from pipeline._io import (
    atomic_path,
    atomic_save_safetensors,
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_text,
    sha256_file,
)
from pipeline.data import DEFAULT_FASHION_MNIST_ROOT
from pipeline.evaluate import evaluate
from pipeline.models import build_model, read_state_dict
from pipeline.train import (
    CorruptCheckpointError,
    TrainConfig,
    load_or_train_reference,
    reference_paths,
    train_reference,
)

needs_fmnist = pytest.mark.skipif(
    not (DEFAULT_FASHION_MNIST_ROOT / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="Debian package dataset-fashion-mnist is not installed",
)
# A tiny run: enough to exercise every code path in a couple of seconds.
TINY = TrainConfig(
    model="vgg-fmnist", epochs=1, batch_size=64, train_subset=256, test_subset=200, num_threads=2
)


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fmnist-cache")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, data_cache: Path) -> tuple[Path, nn.Module, dict]:
    """One tiny training run shared by the cache tests (each copies the cache dir)."""
    cache = tmp_path_factory.mktemp("models")
    model, metadata = train_reference(TINY, cache, progress=False, data_cache_dir=data_cache)
    return cache, model, metadata


@pytest.fixture
def cache_copy(trained: tuple[Path, nn.Module, dict], tmp_path: Path) -> Path:
    source = trained[0]
    for path in source.iterdir():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    return tmp_path


def _forbid_training(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("must load from cache, not train")

    monkeypatch.setattr(train_module, "_fit", fail)


# --------------------------------------------------------------------------- #
# Config
# --------------------------------------------------------------------------- #
def test_config_is_frozen_and_validated() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        TINY.epochs = 3  # type: ignore[misc]
    with pytest.raises(ValueError, match="resnet-fmnist"):
        TrainConfig(model="resnet18")
    with pytest.raises(ValueError, match="adamw"):
        TrainConfig(optimizer="lbfgs")


def test_cache_key_covers_results_not_threads() -> None:
    assert TINY.cache_key() == dataclasses.replace(TINY, num_threads=1).cache_key()
    assert TINY.cache_key() != dataclasses.replace(TINY, seed=1).cache_key()
    explicit_root = dataclasses.replace(TINY, data_root=str(DEFAULT_FASHION_MNIST_ROOT))
    assert TINY.cache_key() == explicit_root.cache_key()
    weights, sidecar = reference_paths(TINY, "/c")
    assert weights == Path(f"/c/vgg-fmnist-{TINY.cache_key()}.safetensors")
    assert sidecar == weights.with_suffix(".json")


def test_augment_keeps_shape_and_is_seeded() -> None:
    images = torch.randn(8, 1, 28, 28)
    first = train_module._augment(images, torch.Generator().manual_seed(0))
    again = train_module._augment(images, torch.Generator().manual_seed(0))
    assert first.shape == images.shape and torch.equal(first, again)
    assert not torch.equal(first, images)


# --------------------------------------------------------------------------- #
# Train, cache, reload
# --------------------------------------------------------------------------- #
@needs_fmnist
def test_training_writes_weights_and_sidecar(trained: tuple[Path, nn.Module, dict]) -> None:
    cache, model, metadata = trained
    weights, sidecar = reference_paths(TINY, cache)
    assert sorted(p.name for p in cache.iterdir()) == sorted([weights.name, sidecar.name])
    stored = json.loads(sidecar.read_text())
    assert stored["weights_sha256"] == sha256_file(weights)
    assert stored["config"] == dataclasses.asdict(TINY)
    assert stored["test_n"] == 200 and stored["train_n"] == 256
    assert 0.0 <= stored["test_top1"] <= 100.0 and stored["train_time_s"] > 0
    assert metadata["source"] == "trained" and not model.training
    assert read_state_dict(weights).keys() == model.state_dict().keys()


@needs_fmnist
def test_second_call_loads_from_cache(
    trained: tuple[Path, nn.Module, dict], cache_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _forbid_training(monkeypatch)
    model, metadata = load_or_train_reference(TINY, cache_copy, progress=False)
    assert metadata["source"] == "cache"
    assert metadata["test_top1"] == trained[2]["test_top1"]
    reference = trained[1].state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())


@needs_fmnist
def test_training_is_deterministic(
    trained: tuple[Path, nn.Module, dict], tmp_path: Path, data_cache: Path
) -> None:
    state = torch.get_rng_state()
    model, _ = train_reference(TINY, tmp_path, progress=False, data_cache_dir=data_cache)
    assert torch.equal(torch.get_rng_state(), state), "global RNG must be left untouched"
    reference = trained[1].state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@needs_fmnist
@pytest.mark.parametrize("damage", [_truncate, _flip_byte], ids=["truncated", "byte-flipped"])
def test_corrupt_cache_raises(cache_copy: Path, damage, monkeypatch: pytest.MonkeyPatch) -> None:
    _forbid_training(monkeypatch)
    weights, sidecar = reference_paths(TINY, cache_copy)
    damage(weights)
    with pytest.raises(CorruptCheckpointError) as info:
        load_or_train_reference(TINY, cache_copy, progress=False)
    message = str(info.value)
    assert str(weights) in message and "--retrain" in message and "sha256" in message
    assert isinstance(info.value, RuntimeError)


@needs_fmnist
def test_weights_that_do_not_fit_are_corrupt(cache_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A checksum-valid file with the wrong tensors must not load silently either."""
    _forbid_training(monkeypatch)
    weights, sidecar = reference_paths(TINY, cache_copy)
    atomic_save_safetensors(build_model("resnet-fmnist").state_dict(), weights)
    metadata = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**metadata, "weights_sha256": sha256_file(weights)}))
    with pytest.raises(CorruptCheckpointError, match="do not load"):
        load_or_train_reference(TINY, cache_copy, progress=False)


@needs_fmnist
@pytest.mark.parametrize("damage", ["sidecar", "missing-weights"])
def test_broken_sidecar_or_missing_weights(cache_copy: Path, damage: str) -> None:
    weights, sidecar = reference_paths(TINY, cache_copy)
    if damage == "sidecar":
        sidecar.write_text("{not json")
    else:
        weights.unlink()
    with pytest.raises(CorruptCheckpointError, match="--retrain"):
        load_or_train_reference(TINY, cache_copy, progress=False)


@needs_fmnist
def test_retrain_corrupt_recovers(cache_copy: Path, data_cache: Path) -> None:
    weights, sidecar = reference_paths(TINY, cache_copy)
    _truncate(weights)
    with pytest.warns(UserWarning, match="Retraining"):
        _, metadata = load_or_train_reference(
            TINY, cache_copy, retrain_corrupt=True, progress=False, data_cache_dir=data_cache
        )
    assert metadata["source"] == "trained"
    assert json.loads(sidecar.read_text())["weights_sha256"] == sha256_file(weights)
    _, again = load_or_train_reference(TINY, cache_copy, progress=False)
    assert again["source"] == "cache"


@pytest.mark.slow
@needs_fmnist
@pytest.mark.parametrize("name", ["resnet-fmnist", "vgg-fmnist"])
def test_full_reference_training_reaches_90_percent(name: str, tmp_path: Path) -> None:
    _, metadata = train_reference(TrainConfig(model=name), tmp_path, progress=False)
    assert metadata["test_n"] == 10000
    assert metadata["test_top1"] >= 90.0


# --------------------------------------------------------------------------- #
# evaluate
# --------------------------------------------------------------------------- #
class _Fixed(nn.Module):
    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits[x.long().flatten()]


def test_evaluate_top1_top5() -> None:
    descending = [9.0, 8, 7, 6, 5, 4]
    logits = torch.tensor([descending, descending, descending, [0.0, 1, 2, 3, 4, 5]])
    labels = torch.tensor([0, 4, 5, 5])
    loader = [(torch.tensor([0.0, 1]), labels[:2]), (torch.tensor([2.0, 3]), labels[2:])]
    model = _Fixed(logits).train()
    scores = evaluate(model, loader)
    assert scores == {"top1": 50.0, "top5": 75.0, "n": 4}
    assert not model.training


def test_evaluate_empty_loader() -> None:
    with pytest.raises(ValueError, match="empty"):
        evaluate(nn.Identity(), [])


# --------------------------------------------------------------------------- #
# _io
# --------------------------------------------------------------------------- #
def test_atomic_writes_and_sha256(tmp_path: Path) -> None:
    atomic_write_bytes(tmp_path / "sub" / "a.bin", b"abc")
    atomic_write_text(tmp_path / "b.txt", "héllo")
    assert (tmp_path / "sub" / "a.bin").read_bytes() == b"abc"
    assert (tmp_path / "b.txt").read_text(encoding="utf-8") == "héllo"
    assert sha256_file(tmp_path / "sub" / "a.bin") == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )
    assert oct((tmp_path / "b.txt").stat().st_mode & 0o777) == "0o644"


def test_atomic_path_keeps_old_file_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "w.pt"
    atomic_torch_save({"x": torch.ones(2)}, target)
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("boom")
    assert torch.equal(torch.load(target, weights_only=True)["x"], torch.ones(2))
    assert os.listdir(tmp_path) == ["w.pt"]


def test_atomic_save_safetensors_handles_views(tmp_path: Path) -> None:
    base = torch.arange(12.0).reshape(3, 4)
    atomic_save_safetensors({"t": base.t(), "row": base[1]}, tmp_path / "v.safetensors", {"k": "v"})
    assert oct((tmp_path / "v.safetensors").stat().st_mode & 0o777) == "0o644"
    loaded = read_state_dict(tmp_path / "v.safetensors")
    assert torch.equal(loaded["t"], base.t()) and torch.equal(loaded["row"], base[1])

"""Tests for pipeline.data: Fashion-MNIST layouts, digits, image folders, sampling."""

from __future__ import annotations

import dataclasses
import gzip
from pathlib import Path

import pytest
import torch
from PIL import Image

from pipeline.data import (
    DATASET_NAMES,
    DEFAULT_FASHION_MNIST_ROOT,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    DatasetSpec,
    DigitsDataset,
    get_dataset,
    load_fashion_mnist_tensors,
    make_loader,
    prepare_fashion_mnist_root,
    sample_subset,
)

_STEMS = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
needs_fmnist = pytest.mark.skipif(
    not (DEFAULT_FASHION_MNIST_ROOT / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="Debian package dataset-fashion-mnist is not installed",
)


@pytest.fixture(scope="module")
def fmnist_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fmnist-cache")


# --------------------------------------------------------------------------- #
# Fashion-MNIST
# --------------------------------------------------------------------------- #
@needs_fmnist
def test_fashion_mnist_debian_layout_loads(fmnist_cache: Path) -> None:
    train = get_dataset("fashion-mnist", "train", cache_dir=fmnist_cache)
    test = get_dataset("fashion-mnist", "test", cache_dir=fmnist_cache)
    assert (len(train), len(test)) == (60000, 10000)
    image, label = train[0]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32
    assert isinstance(label, int) and 0 <= label <= 9
    assert set(test.targets.unique().tolist()) == set(range(10))
    # Normalized pixels: a blank pixel maps to -mean/std.
    assert image.min().item() == pytest.approx(-FASHION_MNIST_MEAN / FASHION_MNIST_STD, abs=1e-5)


@needs_fmnist
def test_debian_layout_is_decompressed_once_into_cache(fmnist_cache: Path) -> None:
    prepared = prepare_fashion_mnist_root(DEFAULT_FASHION_MNIST_ROOT, fmnist_cache)
    raw = prepared / "FashionMNIST" / "raw"
    assert prepared.parent == fmnist_cache
    assert all((raw / stem).is_file() for stem in _STEMS)
    assert (raw / "t10k-labels-idx1-ubyte").stat().st_size == 10008
    mtimes = [(raw / stem).stat().st_mtime_ns for stem in _STEMS]
    assert prepare_fashion_mnist_root(DEFAULT_FASHION_MNIST_ROOT, fmnist_cache) == prepared
    assert [(raw / stem).stat().st_mtime_ns for stem in _STEMS] == mtimes
    assert not list(raw.glob("*.tmp")), "no temporary files may be left behind"


@needs_fmnist
def test_torchvision_layout_is_used_in_place(fmnist_cache: Path, tmp_path: Path) -> None:
    prepared_raw = prepare_fashion_mnist_root(None, fmnist_cache) / "FashionMNIST" / "raw"
    raw = tmp_path / "tv" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for stem in _STEMS:
        (raw / stem).symlink_to(prepared_raw / stem)
    unused_cache = tmp_path / "unused"
    assert prepare_fashion_mnist_root(tmp_path / "tv", unused_cache) == tmp_path / "tv"
    assert not unused_cache.exists()
    assert len(get_dataset("fashion-mnist", "test", root=tmp_path / "tv")) == 10000


@needs_fmnist
def test_gzipped_torchvision_layout_is_decompressed(tmp_path: Path) -> None:
    raw = tmp_path / "tv" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for stem in _STEMS:
        (raw / f"{stem}.gz").symlink_to(DEFAULT_FASHION_MNIST_ROOT / f"{stem}.gz")
    prepared = prepare_fashion_mnist_root(tmp_path / "tv", tmp_path / "cache")
    assert prepared.parent == tmp_path / "cache"


@needs_fmnist
def test_tensor_fast_path_matches_dataset(fmnist_cache: Path) -> None:
    images, labels = load_fashion_mnist_tensors("test", cache_dir=fmnist_cache)
    dataset = get_dataset("fashion-mnist", "test", cache_dir=fmnist_cache)
    assert images.shape == (10000, 1, 28, 28) and labels.shape == (10000,)
    for index in (0, 1234, 9999):
        image, label = dataset[index]
        torch.testing.assert_close(images[index], image)
        assert labels[index].item() == label


@needs_fmnist
def test_fashion_mnist_resize(fmnist_cache: Path) -> None:
    dataset = get_dataset("fashion-mnist", "test", image_size=32, cache_dir=fmnist_cache)
    assert dataset[0][0].shape == (1, 32, 32)


def test_missing_fashion_mnist_names_package_and_option(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as info:
        get_dataset("fashion-mnist", root=missing, cache_dir=tmp_path / "cache")
    message = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in message
    assert "--data-root" in message
    assert str(missing) in message


def test_partial_fashion_mnist_is_reported_missing(tmp_path: Path) -> None:
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        prepare_fashion_mnist_root(tmp_path, tmp_path / "cache")


def test_corrupt_gzip_raises_and_leaves_no_partial_file(tmp_path: Path) -> None:
    source = tmp_path / "flat"
    source.mkdir()
    for stem in _STEMS:
        (source / f"{stem}.gz").write_bytes(gzip.compress(b"\x00" * 1000)[:20])
    with pytest.raises(OSError, match="corrupt"):
        prepare_fashion_mnist_root(source, tmp_path / "cache")
    leftovers = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert leftovers == []


# --------------------------------------------------------------------------- #
# scikit-learn digits
# --------------------------------------------------------------------------- #
def test_digits_are_28x28_normalized_tensors() -> None:
    train = get_dataset("digits", "train")
    test = get_dataset("digits", "test")
    assert len(train) + len(test) == 1797
    image, label = train[0]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32
    assert isinstance(label, int) and 0 <= label <= 9
    assert set(train.targets.tolist()) == set(range(10))
    low, high = -FASHION_MNIST_MEAN / FASHION_MNIST_STD, (1 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    assert train.images.min().item() == pytest.approx(low, abs=1e-5)
    assert train.images.max().item() <= high + 1e-5


def test_digits_split_is_fixed_and_disjoint() -> None:
    first, again = DigitsDataset("test"), DigitsDataset("test")
    torch.testing.assert_close(first.images, again.images)
    train_rows = {tuple(row.tolist()) for row in DigitsDataset("train").images.flatten(1)[:, ::7]}
    overlap = sum(tuple(row.tolist()) in train_rows for row in first.images.flatten(1)[:, ::7])
    # sklearn digits contain a handful of exact duplicates, but not a shared split.
    assert overlap < 5


@pytest.mark.parametrize("resample", ["bilinear", "bicubic"])
def test_digits_resample_modes_and_size(resample: str) -> None:
    dataset = get_dataset("digits", "test", image_size=16, resample=resample)
    assert dataset.images.shape[1:] == (1, 16, 16)
    assert torch.isfinite(dataset.images).all()


def test_unknown_resample_mode() -> None:
    with pytest.raises(ValueError, match="bilinear"):
        get_dataset("digits", resample="nearest")


# --------------------------------------------------------------------------- #
# Image folders
# --------------------------------------------------------------------------- #
def _write_png_tree(root: Path, classes: tuple[str, ...] = ("cat", "dog"), per_class: int = 3) -> None:
    generator = torch.Generator().manual_seed(0)
    for class_index, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            width, height = 40 + 7 * i, 30 + 5 * class_index
            pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
            Image.fromarray(pixels.numpy(), mode="RGB").save(root / name / f"{i}.png")


def test_image_folder_loads_png_tree(tmp_path: Path) -> None:
    _write_png_tree(tmp_path / "imgs")
    dataset = get_dataset("imagefolder", root=tmp_path / "imgs", image_size=32)
    assert len(dataset) == 6
    assert dataset.classes == ["cat", "dog"]
    image, label = dataset[5]
    assert image.shape == (3, 32, 32) and label == 1


def test_image_folder_defaults_to_224_crop(tmp_path: Path) -> None:
    _write_png_tree(tmp_path / "imgs", per_class=1)
    image, _ = get_dataset("imagefolder", root=tmp_path / "imgs")[0]
    assert image.shape == (3, 224, 224)


def test_image_folder_uses_split_subfolders(tmp_path: Path) -> None:
    _write_png_tree(tmp_path / "data" / "train", per_class=2)
    _write_png_tree(tmp_path / "data" / "val", classes=("a", "b", "c"), per_class=1)
    assert len(get_dataset("imagefolder", "train", root=tmp_path / "data", image_size=16)) == 4
    test = get_dataset("imagefolder", "test", root=tmp_path / "data", image_size=16)
    assert len(test) == 3 and test.classes == ["a", "b", "c"]


def test_image_folder_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        get_dataset("imagefolder", root=tmp_path / "absent")


@pytest.mark.parametrize("with_class_dirs", [False, True])
def test_image_folder_empty(tmp_path: Path, with_class_dirs: bool) -> None:
    if with_class_dirs:
        (tmp_path / "cat").mkdir()
        (tmp_path / "cat" / "notes.txt").write_text("no images here")
    with pytest.raises(FileNotFoundError, match="empty"):
        get_dataset("imagefolder", root=tmp_path)


def test_image_folder_requires_root() -> None:
    with pytest.raises(ValueError, match="--sigma-root DIR"):
        get_dataset("imagefolder")


# --------------------------------------------------------------------------- #
# Registry, spec, sampling, loaders
# --------------------------------------------------------------------------- #
def test_unknown_dataset_lists_valid_names() -> None:
    with pytest.raises(ValueError) as info:
        get_dataset("cifar10")
    assert all(name in str(info.value) for name in DATASET_NAMES)


def test_unknown_split() -> None:
    with pytest.raises(ValueError, match="train, test"):
        get_dataset("digits", split="validation")


def test_dataset_spec_identity_and_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    relative = DatasetSpec("imagefolder", root="imgs", split="test", image_size=32)
    absolute = DatasetSpec("imagefolder", root=str(tmp_path / "imgs"), split="test", image_size=32)
    assert relative.identity() == absolute.identity()
    assert relative.identity()["root"] == str(tmp_path.resolve() / "imgs")
    assert DatasetSpec("digits").identity()["root"] is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        relative.split = "train"  # type: ignore[misc]
    assert len({relative, absolute, DatasetSpec("digits")}) == 3
    assert len(DatasetSpec("digits", split="test").build()) == len(DigitsDataset("test"))


@pytest.mark.parametrize(
    "kwargs", [{"name": "mnist"}, {"name": "digits", "split": "val"}, {"name": "digits", "resample": "box"}]
)
def test_dataset_spec_validates_early(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="valid"):
        DatasetSpec(**kwargs)


def test_sample_subset_is_deterministic_without_replacement() -> None:
    dataset = DigitsDataset("train")
    first = sample_subset(dataset, 100, seed=3)
    assert list(first.indices) == list(sample_subset(dataset, 100, seed=3).indices)
    assert list(first.indices) != list(sample_subset(dataset, 100, seed=4).indices)
    assert len(set(first.indices)) == 100
    assert len(sample_subset(dataset, len(dataset), seed=0)) == len(dataset)


@pytest.mark.parametrize("n", [0, -1, 10_000])
def test_sample_subset_rejects_bad_sizes(n: int) -> None:
    with pytest.raises(ValueError, match="without replacement"):
        sample_subset(DigitsDataset("test"), n, seed=0)


def test_make_loader_batches_and_seeded_shuffle() -> None:
    dataset = DigitsDataset("test")
    images, labels = next(iter(make_loader(dataset, batch_size=32)))
    assert images.shape == (32, 1, 28, 28) and labels.shape == (32,)
    order = [make_loader(dataset, 64, shuffle=True, seed=7) for _ in range(2)]
    first, second = (torch.cat([y for _, y in loader]) for loader in order)
    assert torch.equal(first, second)
    assert not torch.equal(first, torch.cat([y for _, y in make_loader(dataset, 64)]))


def test_image_folder_preprocessing_is_configurable_and_keyed(tmp_path: Path) -> None:
    from PIL import Image

    from pipeline.data import DatasetSpec

    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        Image.new("RGB", (40, 30), (200, 100, 50)).save(tmp_path / cls / "x.png")
    plain = DatasetSpec("imagefolder", str(tmp_path), image_size=16)
    custom = DatasetSpec("imagefolder", str(tmp_path), image_size=16, resize_size=20, mean=(0.5, 0.5, 0.5),
                         std=(0.25, 0.25, 0.25))
    assert "mean" not in plain.identity()  # views made before these fields keep their cache keys
    assert custom.identity()["mean"] == [0.5, 0.5, 0.5] and custom.identity() != plain.identity()
    image = custom.build()[0][0]
    assert image.shape == (3, 16, 16)
    torch.testing.assert_close(image[0], torch.full((16, 16), (200 / 255 - 0.5) / 0.25), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="image folders only"):
        DatasetSpec("digits", mean=(0.5,))
    with pytest.raises(ValueError, match="std values must be > 0"):
        DatasetSpec("imagefolder", str(tmp_path), std=(0.0, 1.0, 1.0))

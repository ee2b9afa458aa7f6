"""Datasets used to train reference models and to estimate Sigma.

Three sources are supported, all yielding ``(image, label)`` pairs with
``image`` a float tensor of shape ``(C, H, W)``:

* ``"fashion-mnist"`` -- torchvision's ``FashionMNIST`` read from a local
  directory (never downloaded). Both the Debian ``dataset-fashion-mnist``
  flat layout (gzipped idx files directly in the directory) and torchvision's
  ``<root>/FashionMNIST/raw/`` layout are accepted.
* ``"digits"`` -- scikit-learn's bundled 8x8 digits, upsampled to 28x28 and
  normalized like Fashion-MNIST; a *different* data distribution used as a
  transfer Sigma source.
* ``"imagefolder"`` -- an ImageNet-style ``ImageFolder`` tree.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
import warnings
import shutil
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from pipeline._io import atomic_path, atomic_write_text, sha256_file

__all__ = [
    "DATASET_NAMES",
    "DEFAULT_CACHE_DIR",
    "DEFAULT_FASHION_MNIST_ROOT",
    "DIGITS_SPLIT_SEED",
    "DIGITS_TEST_FRACTION",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DatasetSpec",
    "DigitsDataset",
    "get_dataset",
    "load_fashion_mnist",
    "load_fashion_mnist_tensors",
    "load_image_folder",
    "make_loader",
    "prepare_fashion_mnist_root",
    "sample_subset",
]

DEFAULT_FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "sigma-compress" / "datasets"

# Per-pixel statistics of the Fashion-MNIST training images scaled to [0, 1].
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

DATASET_NAMES = ("fashion-mnist", "digits", "imagefolder")
SPLITS = ("train", "test")
RESAMPLE_MODES = ("bilinear", "bicubic")

# The digits set ships without a split, so a fixed seeded permutation defines one.
DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.2

_FMNIST_STEMS = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


# --------------------------------------------------------------------------- #
# Dataset identity
# --------------------------------------------------------------------------- #
@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """Complete, hashable description of a dataset view.

    Parameters
    ----------
    name : str
        One of :data:`DATASET_NAMES`.
    root : str or None
        Data directory; ``None`` means the dataset's default (only valid for
        ``"fashion-mnist"`` and ``"digits"``).
    split : str
        ``"train"`` or ``"test"``.
    image_size : int or None
        Output side length; ``None`` means the dataset's native size
        (28 for Fashion-MNIST/digits, 224 crop for image folders).
    resample : str
        Interpolation used when resizing: ``"bilinear"`` or ``"bicubic"``.
    """

    name: str
    root: str | None = None
    split: str = "train"
    image_size: int | None = None
    resample: str = "bilinear"
    # Image folders only: shorter-side resize before the center crop (default image_size * 256/224), and the
    # normalization (default ImageNet's). All three enter identity() when set.
    resize_size: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        # Fail when the spec is made (e.g. from CLI flags), not deep inside a job.
        if self.name not in DATASET_NAMES:
            raise ValueError(f"unknown dataset {self.name!r}; valid names: {', '.join(DATASET_NAMES)}")
        _check_split(self.split)
        _check_resample(self.resample)
        custom = {k: getattr(self, k) for k in ("resize_size", "mean", "std") if getattr(self, k) is not None}
        if custom and self.name != "imagefolder":
            raise ValueError(f"{sorted(custom)} apply to image folders only (dataset {self.name!r} has its own "
                             "normalization)")
        for key in ("mean", "std"):
            value = getattr(self, key)
            if value is not None:
                object.__setattr__(self, key, tuple(float(v) for v in value))
                if len(getattr(self, key)) not in (1, 3):
                    raise ValueError(f"{key} must have 1 or 3 values (one per channel), got {value!r}")
        if self.std is not None and min(self.std) <= 0:
            raise ValueError(f"std values must be > 0, got {self.std}")
        for key in ("image_size", "resize_size"):
            value = getattr(self, key)
            if value is not None and int(value) < 1:
                raise ValueError(f"{key} must be >= 1, got {value}")

    def identity(self) -> dict[str, object]:
        """Return a JSON-serializable dict that identifies this view.

        The root is resolved to an absolute path so that equivalent specs
        given with relative paths map to the same cache key.

        Returns
        -------
        dict
            Keys ``name``, ``root``, ``split``, ``image_size``, ``resample``.
        """
        root = None if self.root is None else str(Path(self.root).expanduser().resolve())
        ident = {
            "name": self.name,
            "root": root,
            "split": self.split,
            "image_size": self.image_size,
            "resample": self.resample,
        }
        # Only when set, so that the keys of views made before these fields existed stay valid.
        ident.update({k: list(v) if isinstance(v, tuple) else v for k in ("resize_size", "mean", "std")
                      if (v := getattr(self, k)) is not None})
        return ident

    def build(self, cache_dir: str | os.PathLike[str] | None = None) -> Dataset:
        """Instantiate the dataset described by this spec (see :func:`get_dataset`)."""
        if self.name == "imagefolder":
            if self.root is None:
                raise ValueError("dataset 'imagefolder' needs a root directory (--sigma-root / --eval-root DIR)")
            return load_image_folder(self.root, self.split, self.image_size, self.resize_size, self.resample,
                                     mean=self.mean, std=self.std)
        return get_dataset(
            self.name,
            split=self.split,
            root=self.root,
            image_size=self.image_size,
            resample=self.resample,
            cache_dir=cache_dir,
        )


# --------------------------------------------------------------------------- #
# Fashion-MNIST
# --------------------------------------------------------------------------- #
def _missing_fmnist_error(root: Path) -> FileNotFoundError:
    expected = ", ".join(f"{stem}.gz" for stem in _FMNIST_STEMS)
    return FileNotFoundError(
        f"Fashion-MNIST not found in {root} (looked for {expected}, gzipped or not, either "
        f"directly in that directory or in {root / 'FashionMNIST' / 'raw'}). "
        "Install it with `apt-get install dataset-fashion-mnist` "
        f"(puts it in {DEFAULT_FASHION_MNIST_ROOT}) or pass `--data-root DIR` pointing at a "
        "directory that contains these files."
    )


def _find_fmnist_file(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _locate_fmnist_files(root: Path) -> dict[str, Path] | None:
    """Map each idx stem to an existing (possibly gzipped) file, or None."""
    for directory in (root / "FashionMNIST" / "raw", root):
        found = {stem: _find_fmnist_file(directory, stem) for stem in _FMNIST_STEMS}
        if all(found.values()):
            return found  # type: ignore[return-value]
    return None


def _is_torchvision_ready(files: dict[str, Path], root: Path) -> bool:
    raw = root / "FashionMNIST" / "raw"
    return all(path.parent == raw and path.suffix != ".gz" for path in files.values())


def _source_key(files: dict[str, Path]) -> str:
    # Keyed on the source files' paths, sizes and mtimes so a re-installed or
    # different dataset never reuses a stale decompressed copy.
    digest = hashlib.sha256()
    for stem in _FMNIST_STEMS:
        stat = files[stem].stat()
        digest.update(f"{files[stem].resolve()}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def _materialize(source: Path, target: Path) -> None:
    """Decompress (or copy) one idx file to ``target`` atomically."""
    with atomic_path(target) as tmp:
        try:
            if source.suffix == ".gz":
                with gzip.open(source, "rb") as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst, length=1 << 20)
            else:
                shutil.copyfile(source, tmp)
        except (OSError, EOFError, zlib.error) as exc:
            raise OSError(
                f"could not read Fashion-MNIST file {source} ({exc}); it is probably "
                "truncated or corrupt. Reinstall it with "
                "`apt-get install --reinstall dataset-fashion-mnist` or pass `--data-root DIR`."
            ) from exc


def prepare_fashion_mnist_root(
    root: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Return a directory usable as ``torchvision.datasets.FashionMNIST(root)``.

    If ``root`` already has torchvision's layout with decompressed files it is
    returned as is. Otherwise (Debian flat layout, or gzipped files) the four
    idx files are decompressed once into
    ``<cache_dir>/fashion-mnist-<key>/FashionMNIST/raw/`` (each written
    atomically) and that prepared root is returned; later calls reuse it.

    Parameters
    ----------
    root : str or os.PathLike, optional
        Directory holding the data. Defaults to
        :data:`DEFAULT_FASHION_MNIST_ROOT` (Debian ``dataset-fashion-mnist``).
    cache_dir : str or os.PathLike, optional
        Where to put decompressed copies. Defaults to :data:`DEFAULT_CACHE_DIR`.

    Returns
    -------
    pathlib.Path
        A torchvision-compatible root directory.

    Raises
    ------
    FileNotFoundError
        If the idx files are not found; the message names the searched path,
        the apt package and the ``--data-root`` option.
    """
    root = Path(root if root is not None else DEFAULT_FASHION_MNIST_ROOT).expanduser()
    files = _locate_fmnist_files(root)
    if files is None:
        raise _missing_fmnist_error(root)
    if _is_torchvision_ready(files, root):
        return root
    cache = Path(cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR).expanduser()
    prepared = cache / f"fashion-mnist-{_source_key(files)}"
    raw = prepared / "FashionMNIST" / "raw"
    manifest = _read_manifest(prepared)
    for stem, source in files.items():
        target = raw / stem
        if target.is_file() and _copy_verified(target, manifest.get(stem)):
            continue
        if target.is_file() and stem in manifest:
            warnings.warn(f"prepared Fashion-MNIST file {target} does not match its recorded checksum "
                          "(modified or truncated); decompressing it again from the source", stacklevel=2)
        # Replaced atomically (never unlinked first): other processes may be reading the shared copy.
        _materialize(source, target)
        manifest[stem] = sha256_file(target)
        _write_manifest(prepared, manifest)
    return prepared


_MANIFEST = "manifest.json"
_VERIFIED: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256 checked in this process


def _read_manifest(prepared: Path) -> dict[str, str]:
    try:
        data = json.loads((prepared / _MANIFEST).read_text())
        return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_manifest(prepared: Path, manifest: dict[str, str]) -> None:
    try:
        atomic_write_text(prepared / _MANIFEST, json.dumps(manifest, indent=2, sort_keys=True))
    except OSError as exc:  # the copy itself is fine; it is only verified less next time
        warnings.warn(f"could not write {prepared / _MANIFEST} ({exc})", stacklevel=3)


def _copy_verified(path: Path, expected: str | None) -> bool:
    """Whether a decompressed copy matches its recorded SHA-256 (hashed once per process and file version).

    A copy without a recorded checksum (prepared by an older version) cannot be trusted: it is redone.
    """
    if expected is None:
        return False
    stat = path.stat()
    ident = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if ident not in _VERIFIED:
        _VERIFIED[ident] = sha256_file(path)
    return _VERIFIED[ident] == expected


def _resize_transform(image_size: int | None, native: int, resample: str) -> list:
    from torchvision import transforms

    if image_size is None or image_size == native:
        return []
    return [transforms.Resize((image_size, image_size), interpolation=_interpolation(resample))]


def load_fashion_mnist(
    split: str = "train",
    root: str | os.PathLike[str] | None = None,
    image_size: int | None = None,
    resample: str = "bilinear",
    cache_dir: str | os.PathLike[str] | None = None,
) -> Dataset:
    """Fashion-MNIST as a torchvision dataset of normalized tensors.

    Parameters
    ----------
    split : {"train", "test"}
        60 000 training or 10 000 test images.
    root : str or os.PathLike, optional
        Data directory in Debian or torchvision layout (see
        :func:`prepare_fashion_mnist_root`).
    image_size : int, optional
        Resize to ``image_size x image_size``; default keeps 28x28.
    resample : {"bilinear", "bicubic"}
        Interpolation for resizing.
    cache_dir : str or os.PathLike, optional
        Where a decompressed copy is prepared if needed.

    Returns
    -------
    torchvision.datasets.FashionMNIST
        Items are ``(image, label)`` with ``image`` float32 of shape
        ``(1, S, S)`` normalized by :data:`FASHION_MNIST_MEAN`/``STD`` and
        ``label`` an int in ``0..9``.
    """
    from torchvision import datasets, transforms

    _check_split(split)
    _check_resample(resample)
    prepared = prepare_fashion_mnist_root(root, cache_dir)
    transform = transforms.Compose(
        _resize_transform(image_size, 28, resample)
        + [transforms.ToTensor(), transforms.Normalize((FASHION_MNIST_MEAN,), (FASHION_MNIST_STD,))]
    )
    return datasets.FashionMNIST(
        str(prepared), train=(split == "train"), transform=transform, download=False
    )


def load_fashion_mnist_tensors(
    split: str = "train",
    root: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole Fashion-MNIST split as two in-memory tensors (fast path for training).

    Produces exactly the values of :func:`load_fashion_mnist` at 28x28 but
    skips the per-item PIL round trip, which dominates epoch time on CPU.

    Parameters
    ----------
    split : {"train", "test"}
        Which split.
    root, cache_dir : str or os.PathLike, optional
        As in :func:`load_fashion_mnist`.

    Returns
    -------
    images : torch.Tensor
        Float32, shape ``(N, 1, 28, 28)``, normalized.
    labels : torch.Tensor
        Int64, shape ``(N,)``, values ``0..9``.
    """
    raw = load_fashion_mnist(split, root=root, cache_dir=cache_dir)
    images = raw.data.unsqueeze(1).to(torch.float32).div_(255.0)
    images = images.sub_(FASHION_MNIST_MEAN).div_(FASHION_MNIST_STD)
    return images, raw.targets.to(torch.int64).clone()


# --------------------------------------------------------------------------- #
# scikit-learn digits
# --------------------------------------------------------------------------- #
class DigitsDataset(Dataset):
    """scikit-learn's 8x8 digits upsampled to Fashion-MNIST geometry.

    Pixel values ``0..16`` are scaled to ``[0, 1]``, resized to
    ``image_size x image_size``, clamped (bicubic overshoots) and normalized
    with the Fashion-MNIST mean/std so that the images live on the same input
    scale as the reference models' training data.

    Parameters
    ----------
    split : {"train", "test"}
        Fixed split: a permutation seeded with :data:`DIGITS_SPLIT_SEED` puts
        :data:`DIGITS_TEST_FRACTION` of the 1797 images into ``"test"``.
    image_size : int, default 28
        Output side length.
    resample : {"bilinear", "bicubic"}
        Upsampling interpolation.

    Attributes
    ----------
    images : torch.Tensor
        Float32, shape ``(N, 1, image_size, image_size)``.
    targets : torch.Tensor
        Int64, shape ``(N,)``, values ``0..9``.
    """

    def __init__(self, split: str = "train", image_size: int = 28, resample: str = "bilinear"):
        from sklearn.datasets import load_digits

        _check_split(split)
        mode = _check_resample(resample)
        bunch = load_digits()
        pixels = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
        labels = torch.as_tensor(bunch.target, dtype=torch.int64)
        indices = _digits_split_indices(len(labels), split)
        upsampled = F.interpolate(
            pixels[indices], size=(image_size, image_size), mode=mode, align_corners=False
        ).clamp_(0.0, 1.0)
        self.images = (upsampled - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
        self.targets = labels[indices]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.targets[index])


def _digits_split_indices(n: int, split: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(DIGITS_SPLIT_SEED)
    order = torch.randperm(n, generator=generator)
    n_test = round(n * DIGITS_TEST_FRACTION)
    chosen = order[:n_test] if split == "test" else order[n_test:]
    return chosen.sort().values


# --------------------------------------------------------------------------- #
# ImageNet-style image folders
# --------------------------------------------------------------------------- #
def _has_images(directory: Path) -> bool:
    return any(
        path.is_file() and path.suffix.lower() in _IMAGE_EXTENSIONS for path in directory.rglob("*")
    )


def _image_folder_dir(root: Path, split: str) -> Path:
    # Accept both "root/<class>/..." and "root/{train,val|test}/<class>/...".
    names = ("train",) if split == "train" else ("test", "val")
    for name in names:
        if (root / name).is_dir():
            return root / name
    return root


def _check_image_folder(directory: Path) -> None:
    classes = [entry for entry in sorted(directory.iterdir()) if entry.is_dir()]
    if not any(_has_images(entry) for entry in classes):
        raise FileNotFoundError(
            f"image folder {directory} is empty: expected one subfolder per class holding "
            f"images ({', '.join(_IMAGE_EXTENSIONS)}), e.g. {directory}/<class>/<image>.jpg. "
            "Point --sigma-root / --eval-root at such a directory."
        )


def load_image_folder(
    root: str | os.PathLike[str],
    split: str = "train",
    image_size: int | None = None,
    resize_size: int | None = None,
    resample: str = "bilinear",
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
) -> Dataset:
    """ImageNet-style ``ImageFolder`` with the standard evaluation transform.

    Parameters
    ----------
    root : str or os.PathLike
        Directory of class subfolders, or a directory with ``train/`` and
        ``val/`` (or ``test/``) subfolders of that form, chosen by ``split``.
    split : {"train", "test"}
        Selects the ``train``/``val`` subfolder when present.
    image_size : int, optional
        Center-crop size, default 224.
    resize_size : int, optional
        Shorter-side resize before cropping; default ``image_size * 256/224``.
    resample : {"bilinear", "bicubic"}
        Resize interpolation.
    mean, std : tuple of float, optional
        Per-channel normalization; default ImageNet's (:data:`IMAGENET_MEAN`, :data:`IMAGENET_STD`).

    Returns
    -------
    torchvision.datasets.ImageFolder
        Items are ``(image, label)``, ``image`` float32 of shape
        ``(3, image_size, image_size)`` normalized with ``mean`` / ``std``.

    Raises
    ------
    FileNotFoundError
        If ``root`` does not exist or contains no class subfolders with images.
    """
    from torchvision import datasets, transforms

    _check_split(split)
    base = Path(root).expanduser()
    if not base.is_dir():
        raise FileNotFoundError(
            f"image folder {base} does not exist or is not a directory; pass `--sigma-root DIR` / `--eval-root DIR` "
            "with one subfolder per class (ImageNet/ImageFolder layout)."
        )
    directory = _image_folder_dir(base, split)
    _check_image_folder(directory)
    crop = image_size if image_size is not None else 224
    resize = resize_size if resize_size is not None else round(crop * 256 / 224)
    transform = transforms.Compose(
        [
            transforms.Resize(resize, interpolation=_interpolation(resample)),
            transforms.CenterCrop(crop),
            transforms.ToTensor(),
            transforms.Normalize(mean or IMAGENET_MEAN, std or IMAGENET_STD),
        ]
    )
    return datasets.ImageFolder(str(directory), transform=transform, loader=_load_image_checked)


def _load_image_checked(path: str):
    """torchvision's PIL loader, with a message naming the broken file and the fix (issue 8.9)."""
    from torchvision.datasets.folder import pil_loader

    try:
        return pil_loader(path)
    except (OSError, SyntaxError, ValueError) as exc:  # PIL: UnidentifiedImageError, truncated files, bad headers
        raise OSError(f"cannot read image {path} ({type(exc).__name__}: {exc}): the file is broken or not an "
                      "image; remove or replace it") from None


# --------------------------------------------------------------------------- #
# Registry and sampling helpers
# --------------------------------------------------------------------------- #
def get_dataset(
    name: str,
    split: str = "train",
    root: str | os.PathLike[str] | None = None,
    image_size: int | None = None,
    resample: str = "bilinear",
    cache_dir: str | os.PathLike[str] | None = None,
) -> Dataset:
    """Build a dataset by name.

    Parameters
    ----------
    name : {"fashion-mnist", "digits", "imagefolder"}
        Dataset name.
    split : {"train", "test"}
        Which split.
    root : str or os.PathLike, optional
        Data directory. Required for ``"imagefolder"``; ignored by ``"digits"``
        (bundled with scikit-learn); defaults to the Debian path for
        ``"fashion-mnist"``.
    image_size : int, optional
        Output side length (crop size for image folders).
    resample : {"bilinear", "bicubic"}
        Interpolation used for resizing.
    cache_dir : str or os.PathLike, optional
        Cache for the decompressed Fashion-MNIST copy.

    Returns
    -------
    torch.utils.data.Dataset
        Items ``(image, label)`` with ``image`` of shape ``(C, H, W)``.

    Raises
    ------
    ValueError
        For an unknown name/split/resample mode, or a missing ``root`` for
        ``"imagefolder"``.
    """
    if name == "fashion-mnist":
        return load_fashion_mnist(split, root, image_size, resample, cache_dir)
    if name == "digits":
        return DigitsDataset(split, image_size if image_size is not None else 28, resample)
    if name == "imagefolder":
        if root is None:
            raise ValueError("dataset 'imagefolder' needs a root directory: pass `--sigma-root DIR` (Sigma) or "
                             "`--eval-root DIR` (evaluation).")
        return load_image_folder(root, split, image_size, resample=resample)
    raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)}")


def sample_subset(dataset: Dataset, n: int, seed: int) -> Subset:
    """Deterministically draw ``n`` distinct items of ``dataset``.

    Parameters
    ----------
    dataset : torch.utils.data.Dataset
        Sized dataset.
    n : int
        Number of items, ``1 <= n <= len(dataset)``.
    seed : int
        Seed of the private ``torch.Generator`` (global RNG untouched).

    Returns
    -------
    torch.utils.data.Subset
        Subset whose indices are sorted (sequential access), identical for
        equal ``(len(dataset), n, seed)``.

    Raises
    ------
    ValueError
        If ``n`` is not positive or exceeds ``len(dataset)``.
    """
    size = len(dataset)  # type: ignore[arg-type]
    if n <= 0 or n > size:
        raise ValueError(
            f"cannot sample {n} items from a dataset of {size}: choose 1 <= n <= {size} "
            "(sampling is without replacement)."
        )
    generator = torch.Generator().manual_seed(seed)
    indices = torch.randperm(size, generator=generator)[:n].sort().values
    return Subset(dataset, indices.tolist())


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    num_workers: int = 0,
    drop_last: bool = False,
) -> DataLoader:
    """DataLoader with a private, seeded shuffling generator.

    Parameters
    ----------
    dataset : torch.utils.data.Dataset
        Source dataset.
    batch_size : int
        Batch size.
    shuffle : bool, default False
        Reshuffle every epoch (reproducibly, from ``seed``).
    seed : int, default 0
        Seed of the shuffling generator.
    num_workers : int, default 0
        Worker processes; 0 loads in the main process, best on small machines.
    drop_last : bool, default False
        Drop the last incomplete batch.

    Returns
    -------
    torch.utils.data.DataLoader
        Yields ``(images, labels)`` batches of shape ``(B, C, H, W)``, ``(B,)``.
    """
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        num_workers=num_workers,
        drop_last=drop_last,
    )


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")


def _check_resample(resample: str) -> str:
    if resample not in RESAMPLE_MODES:
        raise ValueError(f"unknown resample mode {resample!r}; valid: {', '.join(RESAMPLE_MODES)}")
    return resample


def _interpolation(resample: str):
    from torchvision.transforms import InterpolationMode

    _check_resample(resample)
    return InterpolationMode.BILINEAR if resample == "bilinear" else InterpolationMode.BICUBIC

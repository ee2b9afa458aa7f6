"""Sigma over Ray Data: images sharded over ``num_actors`` actors, partial sums merged in a tree.

Data flow (design.md)::

    source -> Ray Dataset of records -> streaming_split(num_actors) -> one _SigmaWorker actor per split
        (decode + transform + forward with SigmaCapture, one SigmaAccumulator per layer; nothing leaves per batch)
    -> each actor returns its per-layer partial sums ONCE (one object per layer)
    -> pairwise merge tasks per layer (tree) -> finalize on the driver (+ optional factor_sigma tasks)

Sources
    * :class:`pipeline.compress.SigmaSource` (a :class:`~pipeline.data.DatasetSpec`): ``fashion-mnist`` / ``digits``
      are materialized on the driver with exactly ``sample_subset(dataset, n, seed)``, so the images -- and the cache
      key -- are those of the single-process :func:`pipeline.compress.compute_sigmas`; ``imagefolder`` is read as a
      file list in ImageFolder order with the same evaluation transform.
    * :class:`ImageFolderSource`: a class-per-subfolder tree (or a flat folder, or a CSV labels file listing
      ``path,label``), local or on an object store (any ``pyarrow.fs`` URI).
    * :class:`ParquetSource`: Parquet files with a column of encoded (PNG/JPEG) images; row groups are sharded
      and streamed by the actors (default), or every row is read with ``ray.data.read_parquet``
      (``reader="ray-data"``; see :class:`ParquetSource` for why that is not the default).

Decoding and transforms run in the actors, with :class:`ImageTransform` (PIL + torch, bitwise equal to the
torchvision transforms the single-process datasets use, without importing torchvision in every worker).

Precision note: a float32 forward pass is not guaranteed to be reproducible across batch sizes / thread counts
(single process, reference CNN: up to ~1e-8 relative on Sigma, in the linear layer), so agreement with the
single-process path at the 1e-10 level needs ``ModelSpec(dtype="float64")`` (measured ~2e-16); the sharding and
the tree reduction themselves only reorder float64 sums.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import math
import os
import time
import types
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.fs as pafs
import ray
import torch
from torch import nn
from tqdm.auto import tqdm

from pipeline.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, IMAGENET_MEAN, IMAGENET_STD, sample_subset
from pipeline.models import build_model
from pipeline.sigma_cache import SigmaCache, SigmaKey, fetch_sigmas, model_fingerprint
from sigma_core.covariance import SigmaAccumulator, SigmaCapture, factor_sigma, layer_patches, patch_dim

if TYPE_CHECKING:
    from pipeline.compress import SigmaSource

__all__ = [
    "ImageFolderSource",
    "ImageTransform",
    "MemoryEstimate",
    "ModelSpec",
    "ParquetSource",
    "RaySigmaConfig",
    "SigmaMemoryError",
    "check_memory",
    "estimate_actor_memory",
    "merge_states",
    "ray_compute_sigmas",
    "tree_reduce",
]

# torchvision's IMG_EXTENSIONS: the files ImageFolder accepts, so a folder source lists the same images.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_DTYPES = {"float32": torch.float32, "float64": torch.float64}
_RESAMPLE = {"bilinear": 2, "bicubic": 3}  # PIL.Image.BILINEAR / BICUBIC, what torchvision maps these modes to
# Python + torch + Ray worker baseline that every actor pays before holding any data.
_RUNTIME_OVERHEAD_BYTES = 512 << 20
_MIB = float(1 << 20)


# ============================================================================================== transforms
@dataclass(frozen=True)
class ImageTransform:
    """Decode-side transform: PIL mode conversion, resize, center crop, ToTensor, Normalize.

    Bitwise equal to the torchvision pipeline with the same parameters (``Resize`` -> ``CenterCrop`` ->
    ``ToTensor`` -> ``Normalize`` on a PIL image), which the tests check.

    Parameters
    ----------
    mode : {"L", "RGB"}
        PIL mode the decoded image is converted to (1 or 3 channels).
    resize : int or (int, int), optional
        int: shorter side (torchvision ``Resize(int)``); pair: exact ``(height, width)``.
    crop : int, optional
        Center crop side.
    resample : {"bilinear", "bicubic"}
    mean, std : tuple of float
        Per-channel normalization, one value per channel of ``mode``.
    """

    mode: str = "L"
    resize: int | tuple[int, int] | None = None
    crop: int | None = None
    resample: str = "bilinear"
    mean: tuple[float, ...] = (FASHION_MNIST_MEAN,)
    std: tuple[float, ...] = (FASHION_MNIST_STD,)

    def __post_init__(self) -> None:
        channels = {"L": 1, "RGB": 3}.get(self.mode)
        if channels is None:
            raise ValueError(f"mode must be 'L' or 'RGB', got {self.mode!r}")
        if self.resample not in _RESAMPLE:
            raise ValueError(f"resample must be one of {sorted(_RESAMPLE)}, got {self.resample!r}")
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(f"mode {self.mode} has {channels} channel(s): mean and std need {channels} values, "
                             f"got {len(self.mean)} and {len(self.std)}")
        if isinstance(self.resize, Sequence):
            object.__setattr__(self, "resize", tuple(int(v) for v in self.resize))

    @classmethod
    def fashion_mnist(cls, image_size: int | None = None, resample: str = "bilinear") -> ImageTransform:
        """The transform of :func:`pipeline.data.load_fashion_mnist` (28x28 grey, FMNIST mean/std)."""
        resize = (image_size, image_size) if image_size is not None and image_size != 28 else None
        return cls("L", resize, None, resample, (FASHION_MNIST_MEAN,), (FASHION_MNIST_STD,))

    @classmethod
    def imagenet(cls, image_size: int | None = None, resize_size: int | None = None,
                 resample: str = "bilinear") -> ImageTransform:
        """The evaluation transform of :func:`pipeline.data.load_image_folder` (RGB, resize, crop, ImageNet)."""
        crop = image_size if image_size is not None else 224
        resize = resize_size if resize_size is not None else round(crop * 256 / 224)
        return cls("RGB", resize, crop, resample, IMAGENET_MEAN, IMAGENET_STD)

    def identity(self) -> dict:
        """JSON-serializable description (part of the cache key)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def __call__(self, image) -> torch.Tensor:
        """PIL image -> float32 tensor (C, H, W)."""
        if image.mode != self.mode:
            image = image.convert(self.mode)
        image = self._resize(image)
        image = self._crop(image)
        pixels = torch.from_numpy(np.array(image, np.uint8, copy=True))
        pixels = pixels.view(image.size[1], image.size[0], len(self.mean)).permute(2, 0, 1).contiguous()
        # Same op sequence as ToTensor + Normalize, hence the same float32 rounding.
        x = pixels.to(dtype=torch.float32).div(255)
        mean = torch.as_tensor(self.mean, dtype=torch.float32).view(-1, 1, 1)
        std = torch.as_tensor(self.std, dtype=torch.float32).view(-1, 1, 1)
        return x.sub_(mean).div_(std)

    def _resize(self, image):
        if self.resize is None:
            return image
        w, h = image.size
        if isinstance(self.resize, tuple):
            new_h, new_w = self.resize
        else:  # shorter side, as torchvision's _compute_resized_output_size
            short, long = (w, h) if w <= h else (h, w)
            new_short, new_long = self.resize, int(self.resize * long / short)
            new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        if (new_h, new_w) == (h, w):
            return image
        return image.resize((new_w, new_h), _RESAMPLE[self.resample])

    def _crop(self, image):
        if self.crop is None:
            return image
        w, h = image.size
        if self.crop > w or self.crop > h:
            raise ValueError(f"center crop {self.crop} is larger than the image ({h}x{w}): resize first")
        top, left = round((h - self.crop) / 2.0), round((w - self.crop) / 2.0)  # torchvision's center_crop
        return image.crop((left, top, left + self.crop, top + self.crop))


def decode_image(data: bytes):
    """Encoded image bytes (PNG, JPEG, ...) -> PIL image (fully loaded)."""
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    image.load()
    return image


# ============================================================================================== sources
@dataclass(frozen=True)
class ImageFolderSource:
    """Images in a folder, local or on an object store (``s3://...``, ``gs://...``, ``file://...``).

    Layouts: ``root/<class>/<image>`` (ImageFolder; files listed in ImageFolder order), a flat folder of
    images, or ``labels_file``: a CSV with a header and columns ``path,label`` (paths relative to ``root``).

    Attributes
    ----------
    root : str
    transform : ImageTransform
    n_samples : int, optional
        Images drawn like :func:`pipeline.data.sample_subset` (seeded, without replacement); None: all.
    seed : int
    centered : bool
    labels_file : str, optional
    batch_size : int
    """

    root: str
    transform: ImageTransform = ImageTransform()
    n_samples: int | None = None
    seed: int = 0
    centered: bool = False
    labels_file: str | None = None
    batch_size: int = 250


@dataclass(frozen=True)
class ParquetSource:
    """Parquet file(s) or directory with a column of encoded images (PNG/JPEG bytes), local or remote.

    Attributes
    ----------
    paths : str or tuple of str
        Files and/or directories (all ``*.parquet`` below them), local paths or URIs.
    transform : ImageTransform
    image_column : str
    n_samples : int, optional
        Rows drawn like :func:`pipeline.data.sample_subset` over all rows in file order; None: all rows.
    seed : int
    centered : bool
    batch_size : int
    reader : {"actors", "ray-data"}
        ``"actors"`` (default): the driver reads the Parquet footers, Ray Data shards (file, row group, rows)
        records, and each Sigma actor streams its row groups with pyarrow -- no extra processes, works on any
        cluster size, and supports ``n_samples``. ``"ray-data"``: ``ray.data.read_parquet`` (all rows only). In
        Ray 2.6x that reader starts a 1-CPU ListFiles task plus ``RAY_DATA_PARQUET_FOOTER_NUM_ACTORS`` (default
        32) footer-reader actors before reading: worth it for many files on a big cluster, far too heavy on a
        small node (the actors must leave it a CPU, see ``cpus_per_actor``).
    """

    paths: str | tuple[str, ...]
    transform: ImageTransform = ImageTransform()
    image_column: str = "image"
    n_samples: int | None = None
    seed: int = 0
    centered: bool = False
    batch_size: int = 250
    reader: str = "actors"

    def __post_init__(self) -> None:
        if self.reader not in ("actors", "ray-data"):
            raise ValueError(f"reader must be 'actors' or 'ray-data', got {self.reader!r}")
        if isinstance(self.paths, list):
            object.__setattr__(self, "paths", tuple(self.paths))


# ============================================================================================== model
@dataclass(frozen=True)
class ModelSpec:
    """Picklable recipe for the model each actor builds.

    Attributes
    ----------
    name : str
        Registered architecture (:data:`pipeline.models.MODEL_NAMES`).
    num_classes : int
    weights : str, bytes, mapping, ray.ObjectRef or None
        A weights file path (visible on every node), safetensors bytes, an in-memory state dict, or an
        ObjectRef to a state dict or to safetensors bytes. Bytes and state dicts are put in the object store
        once by :func:`ray_compute_sigmas`, so they are not pickled per actor.
    dtype : {"float32", "float64"}
        Dtype of the forward pass (float64 makes Sigma reproducible to ~1e-15 across shardings).
    """

    name: str
    num_classes: int = 10
    weights: Any = field(default=None, repr=False, hash=False)
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")

    def build(self) -> nn.Module:
        """The model in eval mode, on CPU, in ``dtype``."""
        weights = self.weights
        if isinstance(weights, ray.ObjectRef):
            weights = ray.get(weights)
        if isinstance(weights, (bytes, bytearray, memoryview)):
            from safetensors.torch import load

            weights = load(bytes(weights))
        return build_model(self.name, self.num_classes, weights).to(_DTYPES[self.dtype]).eval()


def _shared_spec(spec: ModelSpec | nn.Module) -> ModelSpec | ray.ObjectRef:
    """What the actors receive: big in-memory weights (or a whole module) go to the object store once."""
    if isinstance(spec, nn.Module):
        return ray.put(spec.cpu().eval())
    if isinstance(spec.weights, (bytes, bytearray, memoryview, Mapping)):
        return dataclasses.replace(spec, weights=ray.put(spec.weights))
    return spec


def _build(spec: ModelSpec | nn.Module | ray.ObjectRef) -> nn.Module:
    """The model a spec describes (a given nn.Module is returned as is: the caller's flags stay untouched)."""
    if isinstance(spec, ray.ObjectRef):
        spec = ray.get(spec)
    return spec if isinstance(spec, nn.Module) else spec.build()


# ============================================================================================== config
@dataclass(frozen=True)
class RaySigmaConfig:
    """Settings of one :func:`ray_compute_sigmas` run (see there)."""

    num_actors: int = 2
    use_gpu: bool = False
    batch_size: int | None = None
    memory_budget_bytes: int | None = None
    compute_dtype: str = "float64"
    cpus_per_actor: float | None = None
    read_cpus: float = 0.25
    factor: bool = False
    progress: bool = True
    poll_seconds: float = 0.5

    def __post_init__(self) -> None:
        if self.num_actors < 1:
            raise ValueError(f"num_actors must be >= 1, got {self.num_actors}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.compute_dtype not in _DTYPES:
            raise ValueError(f"compute_dtype must be one of {sorted(_DTYPES)}, got {self.compute_dtype!r}")
        if self.cpus_per_actor is not None and self.cpus_per_actor <= 0:
            raise ValueError(f"cpus_per_actor must be > 0, got {self.cpus_per_actor}")


# ============================================================================================== memory
class SigmaMemoryError(ValueError):
    """The Sigma sums of the chosen layers do not fit in one actor's memory budget."""


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one Sigma actor needs.

    Attributes
    ----------
    gram_bytes : dict of str to int
        Per layer: the float64 n x n Gram sum plus the n column sums, plus (float32 compute) the float32 n x n
        partial Gram that ``SigmaAccumulator`` flushes into the float64 sum.
    dims : dict of str to int
        Per layer: patch dimension n.
    im2col_bytes : int
        Peak per-batch patch buffers (the largest layer; layers are captured one after the other).
    activation_bytes : int
        Input batch and the largest activations of the forward pass.
    model_bytes : int
    runtime_bytes : int
        Python/torch/Ray worker baseline.
    batch_size : int
    """

    gram_bytes: Mapping[str, int]
    dims: Mapping[str, int]
    im2col_bytes: int
    activation_bytes: int
    model_bytes: int
    runtime_bytes: int
    batch_size: int

    @property
    def total(self) -> int:
        return (sum(self.gram_bytes.values()) + self.im2col_bytes + self.activation_bytes + self.model_bytes
                + self.runtime_bytes)

    def describe(self, top: int = 3) -> str:
        biggest = sorted(self.gram_bytes, key=self.gram_bytes.get, reverse=True)[:top]
        layers = ", ".join(f"{name} (n={self.dims[name]}) {self.gram_bytes[name] / _MIB:.0f} MiB" for name in biggest)
        return (f"{self.total / _MIB:.0f} MiB = Gram sums {sum(self.gram_bytes.values()) / _MIB:.0f} MiB over "
                f"{len(self.gram_bytes)} layer(s) [largest: {layers}] + im2col buffers "
                f"{self.im2col_bytes / _MIB:.0f} MiB at batch_size {self.batch_size} + activations "
                f"{self.activation_bytes / _MIB:.0f} MiB + model {self.model_bytes / _MIB:.0f} MiB + runtime "
                f"{self.runtime_bytes / _MIB:.0f} MiB")


def estimate_actor_memory(
    model: nn.Module,
    layer_names: Sequence[str],
    input_shape: Sequence[int],
    batch_size: int,
    compute_dtype: str = "float64",
) -> MemoryEstimate:
    """Per-actor memory of a Sigma pass, from layer shapes seen in a one-image forward pass.

    Parameters
    ----------
    model : nn.Module
        In the dtype it will run in.
    layer_names : sequence of str
    input_shape : (C, H, W)
    batch_size : int
    compute_dtype : {"float64", "float32"}
    """
    modules = dict(model.named_modules())
    missing = [name for name in layer_names if name not in modules]
    if missing:
        raise ValueError(f"layers not found in the model: {missing}")
    dims = {name: patch_dim(modules[name]) for name in layer_names}
    patches, largest = _probe_shapes(model, {name: modules[name] for name in layer_names}, input_shape)
    act = next(model.parameters()).element_size()
    comp = _DTYPES[compute_dtype].itemsize
    im2col = 0
    for name, n in dims.items():
        m = batch_size * patches[name]
        # SigmaAccumulator.update_input: the padded NHWC copy of the input (at most m x n activations) and one
        # gather copy in the compute dtype; the block Gram products accumulate in place (gram_bytes).
        per = m * n * (act + comp)
        im2col = max(im2col, per)
    in_elems = int(np.prod(input_shape))
    activations = batch_size * (in_elems * (4 + act) + 3 * largest * act)
    model_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    return MemoryEstimate(
        gram_bytes={name: 8 * (n * n + n) + (4 * n * n if comp == 4 else 0) for name, n in dims.items()},
        dims=dims,
        im2col_bytes=int(im2col),
        activation_bytes=int(activations),
        model_bytes=int(model_bytes),
        runtime_bytes=_RUNTIME_OVERHEAD_BYTES,
        batch_size=batch_size,
    )


def _probe_shapes(model: nn.Module, layers: Mapping[str, nn.Module], input_shape) -> tuple[dict[str, int], int]:
    """Patches per image of each layer, and the largest activation (elements per image)."""
    patches: dict[str, int] = {}
    largest = [0]
    handles = []
    for name, layer in layers.items():
        handles.append(layer.register_forward_pre_hook(
            lambda mod, args, name=name: patches.__setitem__(name, layer_patches(args[0], mod).shape[0])))
    for mod in model.modules():
        if not list(mod.children()):
            handles.append(mod.register_forward_hook(
                lambda mod, args, out: largest.__setitem__(0, max(largest[0], out.numel()))
                if isinstance(out, torch.Tensor) else None))
    param = next(model.parameters())
    was_training = model.training
    try:
        model.eval()
        with torch.inference_mode():
            model(torch.zeros(1, *input_shape, dtype=param.dtype, device=param.device))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    unseen = [name for name in layers if name not in patches]
    if unseen:
        raise RuntimeError(f"layers {unseen} were not called in the forward pass: they cannot get a Sigma")
    return patches, largest[0]


def check_memory(estimate: MemoryEstimate, budget_bytes: float, *, compute_dtype: str = "float64") -> None:
    """Raise :class:`SigmaMemoryError` naming the biggest layers and what to change if over budget."""
    if estimate.total <= budget_bytes:
        return
    fixed = estimate.total - sum(estimate.gram_bytes.values())
    passes = _suggest_passes(estimate.gram_bytes, budget_bytes - fixed)
    hints = []
    if passes:
        groups = "; ".join("[" + ", ".join(group) + "]" for group in passes)
        hints.append(f"fewer layers per pass: {len(passes)} calls of ray_compute_sigmas on {groups} fit (the "
                     "per-layer cache lets a later call with all layers reuse them)")
    else:
        hints.append("fewer layers per pass does not suffice: the largest layer alone does not fit")
    hints.append(f"a smaller batch_size (im2col buffers {estimate.im2col_bytes / _MIB:.0f} MiB scale with it)")
    if compute_dtype == "float64":
        hints.append("compute_dtype='float32' (per-batch products in float32; the sums stay float64)")
    hints.append("bigger actors: raise memory_budget_bytes / run on nodes with more memory")
    raise SigmaMemoryError(
        f"a Sigma actor needs about {estimate.describe()}, over its budget of {budget_bytes / _MIB:.0f} MiB. "
        "Options: " + "; ".join(hints) + ".")


def _suggest_passes(gram_bytes: Mapping[str, int], room: float) -> list[list[str]] | None:
    """Greedy first-fit-decreasing grouping of layers into passes that each fit ``room`` bytes, or None."""
    if room <= 0 or max(gram_bytes.values()) > room:
        return None
    groups: list[tuple[float, list[str]]] = []
    for name in sorted(gram_bytes, key=gram_bytes.get, reverse=True):
        for i, (used, names) in enumerate(groups):
            if used + gram_bytes[name] <= room:
                groups[i] = (used + gram_bytes[name], names + [name])
                break
        else:
            groups.append((gram_bytes[name], [name]))
    return [names for _, names in groups]


# ============================================================================================== records
@dataclass(frozen=True)
class _Decoder:
    """Turns one batch of Ray Data records into float image tensors (B, C, H, W), inside the actor.

    kinds: ``tensor`` (column ``data``: already transformed arrays), ``encoded`` (column of image bytes),
    ``file`` (column ``path``: files read through ``filesystem``), ``rowgroup`` (``path``/``row_group``/``rows``
    of a Parquet file: those rows of ``column``, streamed so a big row group never sits decoded in memory).
    """

    kind: str
    transform: ImageTransform | None = None
    column: str = "image"
    filesystem: Any = None

    def iter_images(self, batch: Mapping[str, np.ndarray], batch_size: int) -> Iterable[torch.Tensor]:
        """Image tensors of at most ``batch_size`` images each."""
        if self.kind == "tensor":
            yield from torch.from_numpy(np.require(batch["data"], np.float32, ["C", "W"])).split(batch_size)
        elif self.kind == "encoded":
            yield from self._chunks(batch[self.column], batch_size)
        elif self.kind == "file":
            yield from self._chunks((_read_bytes(self.filesystem, str(p)) for p in batch["path"]), batch_size)
        elif self.kind == "rowgroup":
            for path, group, rows in zip(batch["path"], batch["row_group"], batch["rows"]):
                blobs = _iter_parquet_rows(self.filesystem, str(path), int(group), rows, self.column, batch_size)
                yield from self._chunks(blobs, batch_size)
        else:
            raise ValueError(f"unknown record kind {self.kind!r}")

    def _chunks(self, blobs: Iterable[bytes], batch_size: int) -> Iterable[torch.Tensor]:
        images = []
        for blob in blobs:
            images.append(self.transform(decode_image(bytes(blob))))
            if len(images) == batch_size:
                yield torch.stack(images)
                images = []
        if images:
            yield torch.stack(images)


def _read_bytes(filesystem: pafs.FileSystem, path: str) -> bytes:
    with filesystem.open_input_stream(path) as stream:
        return stream.read()


def _iter_parquet_rows(filesystem, path: str, group: int, rows, column: str, batch_size: int) -> Iterable[bytes]:
    """The values of ``column`` at positions ``rows`` (sorted) of one row group, read in record batches."""
    import pyarrow.parquet as pq

    wanted = np.asarray(rows, dtype=np.int64)
    with filesystem.open_input_file(path) as handle:
        start = 0
        for record_batch in pq.ParquetFile(handle).iter_batches(batch_size=max(batch_size, 64), row_groups=[group],
                                                                columns=[column]):
            stop = start + record_batch.num_rows
            local = wanted[(wanted >= start) & (wanted < stop)] - start
            for value in record_batch.column(0).take(local):
                yield value.as_py()
            start = stop


@dataclass(frozen=True)
class _SourcePlan:
    """Driver-side description of what to read: identity (cache key), N, and the records to shard.

    Exactly one of ``arrays`` (materialized image chunks), ``items`` (file or row-group records) and
    ``parquet_files`` (every row of these files, through ``ray.data.read_parquet``) is set.
    """

    identity: dict
    n_samples: int
    seed: int
    centered: bool
    batch_size: int
    decoder: _Decoder
    probe: torch.Tensor  # one transformed image (C, H, W): input shape for the memory estimate
    arrays: list | None = None
    items: list | None = None
    parquet_files: tuple[str, ...] | None = None
    filesystem: Any = None
    records_per_batch: int | None = None  # None: batch_size

    @property
    def uses_read_tasks(self) -> bool:
        return self.parquet_files is not None

    def make_dataset(self, num_actors: int, read_cpus: float):
        """The Ray Dataset of records (call with Ray initialized)."""
        if self.arrays is not None:
            return ray.data.from_numpy(self.arrays)
        if self.items is not None:
            per_block = self.records_per_batch or self.batch_size
            return ray.data.from_items(self.items, override_num_blocks=_blocks(len(self.items), per_block,
                                                                               num_actors))
        # Read tasks are light (I/O); a fraction of a CPU keeps them schedulable next to the actors.
        return ray.data.read_parquet(list(self.parquet_files), filesystem=self.filesystem,
                                     num_cpus=read_cpus).select_columns([self.decoder.column])


def _subset_indices(size: int, n: int | None, seed: int) -> list[int]:
    """Exactly the indices :func:`pipeline.data.sample_subset` picks (all of them when ``n`` is None)."""
    if n is None:
        return list(range(size))
    return list(sample_subset(range(size), n, seed).indices)


def _blocks(n_records: int, per_batch: int, num_actors: int) -> int:
    # Enough blocks for streaming_split to balance the actors, about one batch each.
    return max(1, min(n_records, max(2 * num_actors, math.ceil(n_records / per_batch))))


def _plan_source(source, batch_size: int | None, data_cache_dir) -> _SourcePlan:
    from pipeline.compress import SigmaSource

    if isinstance(source, SigmaSource):
        if source.dataset.name == "imagefolder":
            return _plan_dataset_folder(source, batch_size)
        return _plan_materialized(source, batch_size, data_cache_dir)
    if isinstance(source, ImageFolderSource):
        return _plan_folder(source, batch_size)
    if isinstance(source, ParquetSource):
        return _plan_parquet(source, batch_size)
    raise TypeError(f"source must be a SigmaSource, ImageFolderSource or ParquetSource, got {type(source).__name__}")


def _plan_materialized(source: SigmaSource, batch_size, data_cache_dir) -> _SourcePlan:
    """Dataset views held in memory (fashion-mnist, digits): the sampled subset is materialized on the driver."""
    dataset = source.dataset.build(cache_dir=data_cache_dir)
    subset = sample_subset(dataset, source.n_samples, source.seed)
    images = torch.stack([subset[i][0] for i in range(len(subset))]).to(torch.float32).numpy()
    bs = batch_size or source.batch_size
    return _SourcePlan(
        identity=source.dataset.identity(), n_samples=source.n_samples, seed=source.seed,
        centered=source.centered, batch_size=bs, decoder=_Decoder("tensor"), probe=torch.from_numpy(images[0]),
        # About one batch per block, so streaming_split can balance the actors.
        arrays=np.array_split(images, max(1, math.ceil(len(images) / bs))))


def _plan_dataset_folder(source: SigmaSource, batch_size) -> _SourcePlan:
    """DatasetSpec('imagefolder'): the files and transform of pipeline.data.load_image_folder, same key."""
    from pipeline.data import _image_folder_dir

    spec = source.dataset
    if spec.root is None:
        raise ValueError("dataset 'imagefolder' needs a root directory")
    root = _image_folder_dir(Path(spec.root).expanduser(), spec.split)
    folder = ImageFolderSource(str(root), ImageTransform.imagenet(spec.image_size, resample=spec.resample),
                               source.n_samples, source.seed, source.centered, batch_size=source.batch_size)
    return dataclasses.replace(_plan_folder(folder, batch_size), identity=spec.identity())


def _filesystem(location: str) -> tuple[pafs.FileSystem, str]:
    if "://" in location:
        fs, path = pafs.FileSystem.from_uri(location)
        return fs, path.rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(location))


def _listing_digest(entries: Iterable[tuple[str, int | None, int | None]]) -> str:
    """SHA-256 of (relative path, size, mtime) rows: the identity of a file set without reading the files."""
    digest = hashlib.sha256()
    for rel, size, mtime in entries:
        digest.update(f"{rel}|{size}|{mtime}\n".encode())
    return digest.hexdigest()[:24]


def _list_folder(fs: pafs.FileSystem, root: str, labels_file: str | None) -> tuple[list[pafs.FileInfo], list[int]]:
    """Image files in ImageFolder order (classes sorted, then directories, then names) and their labels."""
    if labels_file is not None:
        return _list_labels_file(fs, root, labels_file)
    selector = pafs.FileSelector(root, recursive=True)
    files = [info for info in fs.get_file_info(selector)
             if info.type == pafs.FileType.File and info.path.lower().endswith(IMAGE_EXTENSIONS)]
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}")
    prefix = root.rstrip("/") + "/"
    rel = {info.path: info.path.removeprefix(prefix) for info in files}
    classes = sorted({rel[i.path].split("/", 1)[0] for i in files if "/" in rel[i.path]})
    if classes:  # ImageFolder ignores loose files next to the class folders
        files = [i for i in files if "/" in rel[i.path]]
    # ImageFolder: classes sorted; inside a class sorted(os.walk(...)) then sorted names, i.e. by (dir, name).
    files.sort(key=lambda i: (rel[i.path].split("/", 1)[0], rel[i.path].rpartition("/")[0], i.base_name))
    class_index = {name: k for k, name in enumerate(classes)}
    labels = [class_index.get(rel[i.path].split("/", 1)[0], 0) for i in files]
    return files, labels


def _list_labels_file(fs: pafs.FileSystem, root: str, labels_file: str) -> tuple[list[pafs.FileInfo], list[int]]:
    """Files (in the CSV's order) and labels of a ``path,label`` CSV; relative paths are under ``root``."""
    lfs, lpath = _filesystem(labels_file) if "://" in labels_file else (fs, _join(root, labels_file))
    rows = list(csv.DictReader(io.StringIO(_read_bytes(lfs, lpath).decode())))
    if not rows or not {"path", "label"} <= set(rows[0]):
        raise ValueError(f"labels file {labels_file} must be a CSV with a header and columns path,label")
    infos = fs.get_file_info([_join(root, row["path"]) for row in rows])
    absent = [info.path for info in infos if info.type != pafs.FileType.File]
    if absent:
        raise FileNotFoundError(f"{len(absent)} files listed in {labels_file} do not exist, e.g. {absent[:3]}")
    return infos, [int(row["label"]) for row in rows]


def _join(root: str, rel: str) -> str:
    return rel if rel.startswith("/") else f"{root.rstrip('/')}/{rel}"


def _plan_folder(source: ImageFolderSource, batch_size) -> _SourcePlan:
    fs, root = _filesystem(source.root)
    files, labels = _list_folder(fs, root, source.labels_file)
    chosen = _subset_indices(len(files), source.n_samples, source.seed)
    prefix = root.rstrip("/") + "/"
    identity = {
        "kind": "image-folder",
        "root": source.root if "://" in source.root else root,
        "labels_file": source.labels_file,
        "files": len(files),
        "listing": _listing_digest((i.path.removeprefix(prefix), i.size, i.mtime_ns) for i in files),
        "transform": source.transform.identity(),
    }
    decoder = _Decoder("file", source.transform, filesystem=fs)
    items = [{"path": files[k].path, "label": labels[k]} for k in chosen]
    return _SourcePlan(identity=identity, n_samples=len(chosen), seed=source.seed, centered=source.centered,
                       batch_size=batch_size or source.batch_size, decoder=decoder,
                       probe=next(iter(decoder.iter_images({"path": [items[0]["path"]]}, 1)))[0], items=items)


def _parquet_files(paths: str | Sequence[str]) -> tuple[pafs.FileSystem, list[pafs.FileInfo]]:
    paths = [paths] if isinstance(paths, str) else list(paths)
    fs, infos = None, []
    for location in paths:
        this_fs, path = _filesystem(location)
        if fs is None:
            fs = this_fs
        elif type(this_fs) is not type(fs):
            raise ValueError("all Parquet paths must be on the same filesystem")
        info = this_fs.get_file_info(path)
        if info.type == pafs.FileType.Directory:
            found = this_fs.get_file_info(pafs.FileSelector(path, recursive=True))
            infos += sorted((i for i in found if i.type == pafs.FileType.File and i.path.endswith(".parquet")),
                            key=lambda i: i.path)
        elif info.type == pafs.FileType.File:
            infos.append(info)
        else:
            raise FileNotFoundError(f"Parquet path {location} does not exist")
    if not infos:
        raise FileNotFoundError(f"no .parquet files found in {paths}")
    return fs, infos


def _parquet_row_groups(fs, infos, column: str) -> list[tuple[str, int, int, int]]:
    """(path, row group, first global row, rows) of every row group, in file order (metadata only)."""
    import pyarrow.parquet as pq

    groups, total = [], 0
    for info in infos:
        with fs.open_input_file(info.path) as handle:
            meta = pq.ParquetFile(handle).metadata
        if column not in meta.schema.names:
            raise ValueError(f"{info.path} has no column {column!r}; columns: {meta.schema.names}")
        for g in range(meta.num_row_groups):
            rows = meta.row_group(g).num_rows
            groups.append((info.path, g, total, rows))
            total += rows
    return groups


def _plan_parquet(source: ParquetSource, batch_size) -> _SourcePlan:
    fs, infos = _parquet_files(source.paths)
    groups = _parquet_row_groups(fs, infos, source.image_column)
    total = sum(g[3] for g in groups)
    chosen = _subset_indices(total, source.n_samples, source.seed)
    identity = {
        "kind": "parquet",
        "files": [[i.path, i.size, i.mtime_ns] for i in infos],
        "image_column": source.image_column,
        "transform": source.transform.identity(),
    }
    first = next(iter(_iter_parquet_rows(fs, groups[0][0], groups[0][1], [0], source.image_column, 1)))
    common = {"identity": identity, "n_samples": len(chosen), "seed": source.seed, "centered": source.centered,
              "batch_size": batch_size or source.batch_size, "probe": source.transform(decode_image(first)),
              "filesystem": fs}
    if source.reader == "ray-data":
        if len(chosen) != total:
            raise ValueError("reader='ray-data' reads every row (Ray Data has no global row index to sample from); "
                             "use the default reader='actors' with n_samples")
        return _SourcePlan(**common, decoder=_Decoder("encoded", source.transform, source.image_column),
                           parquet_files=tuple(i.path for i in infos))
    # One record per row group holding chosen rows; the actor that gets it streams that group.
    return _SourcePlan(**common, decoder=_Decoder("rowgroup", source.transform, source.image_column, filesystem=fs),
                       items=_row_group_items(groups, chosen), records_per_batch=1)


def _row_group_items(groups, chosen: Sequence[int]) -> list[dict]:
    """Group the chosen global row numbers by (file, row group): one record per group that has any."""
    items, i = [], 0
    for path, g, start, rows in groups:
        picked = []
        while i < len(chosen) and chosen[i] < start + rows:
            picked.append(chosen[i] - start)
            i += 1
        if picked:
            items.append({"path": path, "row_group": g, "rows": picked})
    return items


# ============================================================================================== actor
class _SigmaWorker:
    """One shard's Sigma sums. Plain class (testable without Ray); wrapped with ``ray.remote`` at run time.

    Parameters
    ----------
    model : ModelSpec, nn.Module or ObjectRef to either
    layer_names : sequence of str
    decoder : _Decoder
    device : str
    compute_dtype : {"float64", "float32"}
    threads : int
        torch intra-op threads (the CPUs this actor reserved).
    needed_bytes : int
        Estimated memory; checked against the GPU's memory when ``device`` is CUDA.
    """

    def __init__(self, model, layer_names, decoder, device, compute_dtype, threads, needed_bytes=0):
        tic = time.perf_counter()
        torch.set_num_threads(max(1, int(threads)))
        self.device = torch.device(device)
        if self.device.type == "cuda":
            total = torch.cuda.get_device_properties(self.device).total_memory
            if needed_bytes > total:
                raise SigmaMemoryError(f"a Sigma actor needs about {needed_bytes / _MIB:.0f} MiB but the GPU has "
                                       f"{total / _MIB:.0f} MiB: use fewer layers per pass or a smaller batch_size")
        self.model = _build(model).to(self.device).eval()
        self.dtype = next(self.model.parameters()).dtype
        self.layer_names = list(layer_names)
        self.decoder = decoder
        self.compute_dtype = _DTYPES[compute_dtype]
        self.images = 0
        self.init_seconds = time.perf_counter() - tic

    def progress(self) -> int:
        """Images consumed so far (polled by the driver while :meth:`run` works)."""
        return self.images

    def run(self, shard, batch_size: int, records_per_batch: int | None = None) -> tuple:
        """Consume a shard (a Ray DataIterator or any iterable of record batches) and return its sums once.

        Returns
        -------
        tuple
            One state dict per layer (numpy arrays, see :func:`merge_states`), then an info dict.
        """
        batches = (shard.iter_batches(batch_size=records_per_batch or batch_size, batch_format="numpy")
                   if hasattr(shard, "iter_batches") else shard)
        tic = time.perf_counter()
        capture = SigmaCapture(self.model, self.layer_names, compute_dtype=self.compute_dtype, device=self.device)
        with capture:
            for batch in batches:
                for chunk in self.decoder.iter_images(batch, batch_size):
                    capture.feed(chunk.to(device=self.device, dtype=self.dtype))
                    self.images += int(chunk.shape[0])
        states = tuple(_to_numpy_state(capture.accumulators[name]) for name in self.layer_names)
        return (*states, {"images": self.images, "seconds": time.perf_counter() - tic,
                          "init_seconds": self.init_seconds})


def _to_numpy_state(acc: SigmaAccumulator) -> dict:
    # numpy (not torch) so merge tasks read the object store zero-copy.
    state = acc.state_dict()  # the public (s, kh, kw)-ordered full Gram, whatever the internal layout
    return {"n": int(state["n"]), "count": int(state["count"]), "gram": state["gram"].cpu().numpy(),
            "total": state["total"].cpu().numpy()}


def merge_states(a: Mapping, b: Mapping) -> dict:
    """Sum of two partial states (``SigmaAccumulator.merge`` on numpy state dicts).

    Self-contained (numpy imported inside, no module globals) so that :func:`_merge_task` can ship it by value.
    """
    import numpy

    if int(a["n"]) != int(b["n"]):
        raise ValueError(f"cannot merge partial Sigma sums of dimensions {a['n']} and {b['n']}")
    return {"n": int(a["n"]), "count": int(a["count"]) + int(b["count"]),
            "gram": numpy.add(a["gram"], b["gram"]), "total": numpy.add(a["total"], b["total"])}


def _merge_task():
    """:func:`merge_states` as a Ray task pickled by value (a copy that cloudpickle cannot find by name).

    By reference, each fresh merge worker would import this module, hence torch and sigma_core: ~10 s on a busy
    node, for a task that only adds two numpy arrays.
    """
    copy = types.FunctionType(merge_states.__code__, {}, "merge_states")
    return ray.remote(num_cpus=1)(copy)


def tree_reduce(refs: Sequence, merge) -> Any:
    """Pairwise tree reduction of ObjectRefs with a remote ``merge`` (depth ceil(log2 k)); returns one ref."""
    refs = list(refs)
    if not refs:
        raise ValueError("nothing to reduce")
    while len(refs) > 1:
        merged = [merge.remote(refs[i], refs[i + 1]) for i in range(0, len(refs) - 1, 2)]
        refs = merged + ([refs[-1]] if len(refs) % 2 else [])
    return refs[0]


def _accumulator(state: Mapping) -> SigmaAccumulator:
    return SigmaAccumulator.from_state_dict({
        "n": int(state["n"]), "count": int(state["count"]),
        "gram": torch.from_numpy(np.array(state["gram"])), "total": torch.from_numpy(np.array(state["total"]))})


# ============================================================================================== driver
def ray_compute_sigmas(
    model_spec: ModelSpec | nn.Module,
    layer_names: Sequence[str],
    source: SigmaSource | ImageFolderSource | ParquetSource,
    *,
    num_actors: int = 2,
    use_gpu: bool = False,
    batch_size: int | None = None,
    cache: SigmaCache | str | None = None,
    memory_budget_bytes: int | None = None,
    progress: bool = True,
    compute_dtype: str = "float64",
    cpus_per_actor: float | None = None,
    factor: bool = False,
    data_cache_dir: str | os.PathLike | None = None,
) -> tuple[dict[str, torch.Tensor], dict]:
    """Finalized Sigma (float64, CPU) of every layer, computed by ``num_actors`` Ray actors, cached per layer.

    Mirrors :func:`pipeline.compress.compute_sigmas` (same cache key for the same model and images).

    Parameters
    ----------
    model_spec : ModelSpec or nn.Module
        What each actor builds; an nn.Module is shipped through the object store once.
    layer_names : sequence of str
        nn.Conv2d (groups=1) / nn.Linear layers, all captured in one pass.
    source : SigmaSource, ImageFolderSource or ParquetSource
    num_actors : int
        Actors (shards); 1 CPU each by default (1 GPU each with ``use_gpu`` when the cluster has GPUs).
    use_gpu : bool
        Run the actors on GPUs if the cluster has any (falls back to CPU with a warning).
    batch_size : int, optional
        Images per forward pass (default: the source's ``batch_size``).
    cache : SigmaCache or str, optional
        Cache (or its location: directory or URI). Whole-set entries (as ``compute_sigmas`` writes) and
        per-layer entries are read; computed layers are written per layer.
    memory_budget_bytes : int, optional
        Per-actor budget checked before starting (default: the cluster's free Ray ``memory`` / num_actors).
    progress : bool
        tqdm bar of images consumed.
    compute_dtype : {"float64", "float32"}
        dtype of the per-batch Gram products (sums are float64 either way).
    cpus_per_actor : float, optional
        Ray CPUs reserved per actor (default 1, lowered to leave room for Parquet read tasks on small clusters).
    factor : bool
        Also compute ``factor_sigma`` per layer (Ray tasks); returned as ``info["factors"]``.
    data_cache_dir : path, optional
        Where Fashion-MNIST is decompressed (as in ``compute_sigmas``).

    Returns
    -------
    sigmas : dict of str to torch.Tensor (n, n), float64
    info : dict
        ``cached`` (all layers from the cache), ``key`` (whole-set key), ``seconds``, ``images``, ``patches``,
        ``cached_layers``, ``computed_layers``, ``actors`` (images/seconds per actor), ``images_per_second``,
        ``memory`` (estimate and budget), ``device``.

    Raises
    ------
    SigmaMemoryError
        If the estimated per-actor memory exceeds the budget (message: biggest layers and what to change).
    """
    config = RaySigmaConfig(num_actors=num_actors, use_gpu=use_gpu, batch_size=batch_size,
                            memory_budget_bytes=memory_budget_bytes, compute_dtype=compute_dtype,
                            cpus_per_actor=cpus_per_actor, factor=factor, progress=progress)
    layer_names = list(layer_names)
    if isinstance(cache, (str, os.PathLike)):
        cache = SigmaCache(cache)
    tic = time.perf_counter()
    model = _build(model_spec)
    plan = _plan_source(source, config.batch_size, data_cache_dir)
    key = SigmaKey(model_fingerprint(model), plan.identity, plan.n_samples, plan.seed, plan.centered)
    info: dict = {"key": key.for_layers(layer_names), "images": plan.n_samples}

    def compute(missing: list[str]) -> dict[str, torch.Tensor]:
        estimate = estimate_actor_memory(model, missing, tuple(plan.probe.shape), plan.batch_size,
                                         config.compute_dtype)
        if config.memory_budget_bytes is not None:  # fail before starting anything
            check_memory(estimate, config.memory_budget_bytes, compute_dtype=config.compute_dtype)
        _ensure_ray()
        budget = config.memory_budget_bytes or _default_budget(config.num_actors)
        check_memory(estimate, budget, compute_dtype=config.compute_dtype)
        computed, run_info = _compute(model_spec, missing, plan, config, estimate)  # actors build their own models
        info.update(run_info, memory={"estimate_bytes": estimate.total, "budget_bytes": int(budget),
                                      "describe": estimate.describe()})
        return computed

    description = {"source": plan.identity, "n": plan.n_samples, "seed": plan.seed, "centered": plan.centered,
                   "weights": key.weights_hash, "backend": "ray"}
    sigmas, computed = fetch_sigmas(cache, key, layer_names, compute, description)
    info.update(cached=not computed, cached_layers=[n for n in layer_names if n not in computed],
                computed_layers=computed)
    if config.factor:
        _ensure_ray()
        info["factors"] = _factors(sigmas)
    info["seconds"] = time.perf_counter() - tic
    return sigmas, info


def _ensure_ray() -> None:
    if not ray.is_initialized():
        ray.init()


def _default_budget(num_actors: int) -> float:
    available = ray.available_resources().get("memory")
    if not available:
        import psutil

        available = psutil.virtual_memory().available
    return available / num_actors


def _actor_resources(config: RaySigmaConfig, plan: _SourcePlan) -> tuple[dict, str, int]:
    """(ray actor options, torch device, torch threads) for each actor."""
    cluster = ray.cluster_resources()
    if config.use_gpu and cluster.get("GPU", 0) >= 1:
        cpus = config.cpus_per_actor or 1.0
        return {"num_cpus": cpus, "num_gpus": 1}, "cuda", max(1, int(cpus))
    if config.use_gpu:
        warnings.warn("use_gpu=True but the Ray cluster has no GPU: computing Sigma on CPU", stacklevel=3)
    cpus = config.cpus_per_actor or 1.0
    # ray.data.read_parquet starts with a ListFiles task that always asks for 1 CPU (not configurable in
    # Ray 2.5x/2.6x), then read tasks of ``read_cpus``: actors holding every CPU would wait for data forever.
    reserve = max(1.0, config.read_cpus) if plan.uses_read_tasks else 0.0
    room = cluster.get("CPU", 0) - reserve
    if plan.uses_read_tasks and room <= 0:
        raise RuntimeError(f"the Ray cluster has {cluster.get('CPU', 0):g} CPU(s): reading Parquet through Ray "
                           "Data needs 1 CPU besides the Sigma actors; use a bigger cluster or n_samples < all rows "
                           "(read by row group inside the actors)")
    if config.cpus_per_actor is None and config.num_actors * cpus > room > 0:
        # Reserving a whole CPU per actor on a small cluster would starve the reads (or leave actors pending
        # forever); the reservation is logical, each actor still runs one torch thread.
        cpus = room / config.num_actors
    return {"num_cpus": cpus}, "cpu", max(1, int(cpus))


def _compute(model_spec, layer_names: list[str], plan: _SourcePlan, config: RaySigmaConfig,
             estimate: MemoryEstimate) -> tuple[dict[str, torch.Tensor], dict]:
    """Run the actors over the shards, tree-reduce their partial sums per layer, finalize on the driver."""
    tic = time.perf_counter()
    options, device, threads = _actor_resources(config, plan)
    dataset = plan.make_dataset(config.num_actors, config.read_cpus)
    # Per-dataset context (a copy): our own tqdm reports progress, Ray Data's bars would interleave with it.
    dataset.context.enable_progress_bars = False
    shards = dataset.streaming_split(config.num_actors, equal=False)
    if device == "cpu":
        options["memory"] = int(estimate.total)  # lets Ray place actors where the Gram sums fit
    actors = _start_actors(model_spec, layer_names, plan, config, options, device, threads, estimate.total)
    try:
        results = [actor.run.options(num_returns=len(layer_names) + 1).remote(
            shard, plan.batch_size, plan.records_per_batch) for actor, shard in zip(actors, shards)]
        actor_infos = _wait_with_progress(actors, [r[-1] for r in results], plan.n_samples, config)
    finally:
        for actor in actors:  # their results are owned by this driver and outlive them
            ray.kill(actor)
    images = sum(i["images"] for i in actor_infos)
    if images != plan.n_samples:
        raise RuntimeError(f"the actors saw {images} images, expected {plan.n_samples}")
    t_reduce = time.perf_counter()
    sigmas, patches = _reduce_and_finalize(layer_names, results, plan.centered)
    seconds = time.perf_counter() - tic
    busiest = max(i["seconds"] for i in actor_infos)
    return sigmas, {"patches": patches, "actors": actor_infos, "device": device, "num_actors": config.num_actors,
                    "compute_seconds": seconds, "reduce_seconds": time.perf_counter() - t_reduce,
                    # wall time includes actor start-up (imports, model build); the steady rate excludes it
                    "images_per_second": images / seconds, "steady_images_per_second": images / busiest}


def _start_actors(model_spec, layer_names, plan: _SourcePlan, config: RaySigmaConfig, options: dict, device: str,
                  threads: int, needed_bytes: int) -> list:
    worker_cls = ray.remote(_SigmaWorker).options(
        **options, max_concurrency=2,  # run() and progress() concurrently
        # Spin-waiting OpenMP threads make torch ~40x slower on shared nodes (design.md, Threads).
        runtime_env={"env_vars": {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}})
    shared = _shared_spec(model_spec)
    return [worker_cls.remote(shared, layer_names, plan.decoder, device, config.compute_dtype, threads,
                              needed_bytes) for _ in range(config.num_actors)]


def _reduce_and_finalize(layer_names: list[str], results: list, centered: bool) -> tuple[dict, dict]:
    """Per layer: pairwise merge tasks over the actors' partial sums, then finalize here (one layer at a time)."""
    merge = _merge_task()
    reduced = {name: tree_reduce([r[j] for r in results], merge) for j, name in enumerate(layer_names)}
    sigmas, patches = {}, {}
    for name, ref in reduced.items():
        acc = _accumulator(ray.get(ref))
        patches[name] = acc.count
        sigmas[name] = acc.finalize(centered=centered)
    return sigmas, patches


def _wait_with_progress(actors, info_refs, total: int, config: RaySigmaConfig) -> list[dict]:
    """Wait for every actor's final info, polling their image counters into a tqdm bar.

    Fails fast: a streaming_split consumer that dies can stall the others, so the first error is raised at once.
    """
    pending = list(info_refs)
    with tqdm(total=total, desc="Sigma (ray)", unit="img", disable=not config.progress, leave=False) as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=len(pending), timeout=config.poll_seconds)
            try:
                ray.get(done)
            except ray.exceptions.RayError as exc:
                raise RuntimeError(f"a Sigma actor failed: {exc}") from exc
            if config.progress:
                bar.update(_images_seen(actors, config.poll_seconds * 4) - bar.n)
    return ray.get(list(info_refs))


def _images_seen(actors, timeout: float) -> int:
    try:
        return sum(ray.get([a.progress.remote() for a in actors], timeout=timeout))
    except (ray.exceptions.RayError, TimeoutError):
        return 0  # a dead actor's error surfaces from its result; a busy one is polled again next time


def _factors(sigmas: Mapping[str, torch.Tensor]) -> dict:
    task = ray.remote(num_cpus=1)(factor_sigma)
    refs = {name: task.remote(ray.put(sigma)) for name, sigma in sigmas.items()}
    return {name: ray.get(ref) for name, ref in refs.items()}

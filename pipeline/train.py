"""Train, cache and reload the Fashion-MNIST reference models.

A trained model is cached as ``<cache_dir>/<model>-<config hash>.safetensors``
plus a JSON sidecar ``<model>-<config hash>.json`` holding the config, test
accuracy, train time and the SHA-256 of the weights file. Both are written
atomically, weights first, so a sidecar always describes a complete weights
file; on load the checksum is verified and a mismatch is reported as
:class:`CorruptCheckpointError` instead of silently using the file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import math
import os
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from pipeline._io import atomic_save_safetensors, atomic_write_text, sha256_file
from pipeline.data import DEFAULT_FASHION_MNIST_ROOT, FASHION_MNIST_MEAN, FASHION_MNIST_STD
from pipeline.data import load_fashion_mnist_tensors
from pipeline.evaluate import evaluate
from pipeline.models import REFERENCE_MODELS, build_model

__all__ = [
    "CorruptCheckpointError",
    "TrainConfig",
    "load_or_train_reference",
    "reference_paths",
    "train_reference",
]

# Bump when the architectures or the training procedure change, so that old
# cached weights are never mistaken for the current ones.
CACHE_FORMAT_VERSION = 1
_EVAL_BATCH_SIZE = 1000
_SHIFT_PIXELS = 2
# Pixel value 0 after normalization: the background used when shifting images.
_BACKGROUND = -FASHION_MNIST_MEAN / FASHION_MNIST_STD
_NOT_HASHED = ("num_threads",)


class CorruptCheckpointError(RuntimeError):
    """A cached reference model failed its checksum or does not load."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one reference-model training run.

    Every field except ``num_threads`` enters the cache key.

    Parameters
    ----------
    model : str
        Reference architecture, ``"resnet-fmnist"`` or ``"vgg-fmnist"``.
    epochs : int
        Passes over the training set.
    batch_size : int
        Mini-batch size.
    lr : float
        Peak learning rate of the one-cycle schedule.
    weight_decay : float
        Decoupled (AdamW) or L2 (SGD) weight decay.
    momentum : float
        SGD momentum (Nesterov); unused by AdamW.
    optimizer : {"sgd", "adamw"}
        Optimizer.
    label_smoothing : float
        Cross-entropy label smoothing.
    augment : bool
        Random horizontal flips and shifts of up to 2 pixels. Off by default:
        in a few-epoch schedule it slows convergence more than it regularizes
        (ResNet, 4 epochs: 91.5% with vs 92.6% without).
    seed : int
        Seeds initialization, shuffling, augmentation and dropout.
    data_root : str or None
        Fashion-MNIST directory; ``None`` means the Debian default.
    train_subset : int or None
        Train on this many random training images (tests, smoke runs).
    test_subset : int or None
        Evaluate on this many random test images.
    num_threads : int or None
        CPU threads; ``None`` uses every core available to the process.
    """

    model: str = "resnet-fmnist"
    epochs: int = 3
    batch_size: int = 128
    lr: float = 0.1
    weight_decay: float = 5e-4
    momentum: float = 0.9
    optimizer: str = "sgd"
    label_smoothing: float = 0.0
    augment: bool = False
    seed: int = 0
    data_root: str | None = None
    train_subset: int | None = None
    test_subset: int | None = None
    num_threads: int | None = None

    def __post_init__(self) -> None:
        if self.model not in REFERENCE_MODELS:
            raise ValueError(
                f"unknown reference model {self.model!r}; valid: {', '.join(REFERENCE_MODELS)}"
            )
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"unknown optimizer {self.optimizer!r}; valid: sgd, adamw")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be >= 1")

    def cache_key(self) -> str:
        """Short hash of every result-relevant field.

        Returns
        -------
        str
            12 hex characters; the data root is resolved so that the default
            and an explicit path to the same directory share a key.
        """
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k not in _NOT_HASHED}
        root = self.data_root if self.data_root is not None else DEFAULT_FASHION_MNIST_ROOT
        fields["data_root"] = str(Path(root).expanduser().resolve())
        fields["cache_format_version"] = CACHE_FORMAT_VERSION
        blob = json.dumps(fields, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


def reference_paths(config: TrainConfig, cache_dir: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Paths of the cached weights and JSON sidecar for ``config``.

    Parameters
    ----------
    config : TrainConfig
        Training configuration.
    cache_dir : str or os.PathLike
        Model cache directory.

    Returns
    -------
    weights : pathlib.Path
        ``<cache_dir>/<model>-<hash>.safetensors``.
    sidecar : pathlib.Path
        ``<cache_dir>/<model>-<hash>.json``.
    """
    stem = Path(cache_dir).expanduser() / f"{config.model}-{config.cache_key()}"
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


# --------------------------------------------------------------------------- #
# Training
# --------------------------------------------------------------------------- #
def _available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not available on macOS/Windows
        return os.cpu_count() or 1


def _subset(
    images: torch.Tensor, labels: torch.Tensor, n: int | None, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    if n is None:
        return images, labels
    if not 1 <= n <= len(labels):
        raise ValueError(f"subset size {n} must be in 1..{len(labels)}")
    indices = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[:n]
    return images[indices], labels[indices]


def _augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and shift of a batch ``(B, 1, H, W)``, per sample."""
    batch, _, height, width = images.shape
    flip = torch.rand(batch, generator=generator) < 0.5
    images = torch.where(flip[:, None, None, None], images.flip(3), images)
    pad = _SHIFT_PIXELS
    padded = nn.functional.pad(images, (pad, pad, pad, pad), value=_BACKGROUND)
    dy = torch.randint(0, 2 * pad + 1, (batch, 1), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (batch, 1), generator=generator)
    rows = (dy + torch.arange(height))[:, :, None]
    cols = (dx + torch.arange(width))[:, None, :]
    return padded[torch.arange(batch)[:, None, None], 0, rows, cols].unsqueeze(1)


def _batches(
    images: torch.Tensor, labels: torch.Tensor, batch_size: int, order: torch.Tensor | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    # Slicing in-memory tensors avoids the per-item collate cost of a DataLoader.
    n = len(labels)
    for start in range(0, n, batch_size):
        index = slice(start, start + batch_size) if order is None else order[start : start + batch_size]
        yield images[index], labels[index]


class _TensorBatches:
    """Sized iterable of test batches, so the eval progress bar knows its length."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int):
        self.images, self.labels, self.batch_size = images, labels, batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.labels) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return _batches(self.images, self.labels, self.batch_size)


def _make_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    if config.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(
        model.parameters(),
        lr=config.lr,
        momentum=config.momentum,
        nesterov=True,
        weight_decay=config.weight_decay,
    )


def _train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loss_fn: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
) -> float:
    """One optimizer step on a batch ``(B, 1, 28, 28)`` / ``(B,)``; returns the loss."""
    loss = loss_fn(model(images.contiguous(memory_format=torch.channels_last)), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()
    return loss.item()


def _fit(
    config: TrainConfig, images: torch.Tensor, labels: torch.Tensor, progress: bool
) -> nn.Module:
    """Train a fresh model on ``images`` (N, 1, 28, 28) / ``labels`` (N,)."""
    # channels_last lets oneDNN pick its fastest CPU conv kernels (~25% faster here).
    model = build_model(config.model).to(memory_format=torch.channels_last)
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = _make_optimizer(config, model)
    # Dropping the ragged last batch keeps BatchNorm statistics well-conditioned.
    steps_per_epoch = max(1, len(labels) // config.batch_size)
    total_steps = config.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=total_steps)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    model.train()
    with tqdm(total=total_steps, desc=f"train {config.model}", disable=not progress) as bar:
        for epoch in range(config.epochs):
            order = torch.randperm(len(labels), generator=generator)
            batches = _batches(images, labels, config.batch_size, order)
            for _, (x, y) in zip(range(steps_per_epoch), batches):
                if config.augment:
                    x = _augment(x, generator)
                loss = _train_step(model, optimizer, scheduler, loss_fn, x, y)
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss:.3f}", refresh=False)
                bar.update()
    return model.to(memory_format=torch.contiguous_format)


def _load_split(
    split: str, config: TrainConfig, subset: int | None, data_cache_dir: str | os.PathLike[str] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = load_fashion_mnist_tensors(split, config.data_root, data_cache_dir)
    return _subset(images, labels, subset, config.seed)


@contextlib.contextmanager
def _num_threads(threads: int) -> Iterator[None]:
    # torch's thread count is process-global; restore it for the caller.
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def train_reference(
    config: TrainConfig,
    cache_dir: str | os.PathLike[str],
    progress: bool = True,
    data_cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[nn.Module, dict]:
    """Train a reference model on Fashion-MNIST, evaluate it and cache it.

    Uses SGD (Nesterov) or AdamW with a one-cycle learning-rate schedule on
    all available CPU cores. A rerun with the same ``config.seed`` on the same
    machine, torch build and thread count gives the same weights; another CPU
    (other BLAS kernels, other summation order) gives slightly different weights
    and test accuracies a few tenths of a point apart. The global RNG and thread
    settings are left as they were.

    Parameters
    ----------
    config : TrainConfig
        Training configuration.
    cache_dir : str or os.PathLike
        Model cache directory (created if needed).
    progress : bool, default True
        Show tqdm progress bars.
    data_cache_dir : str or os.PathLike, optional
        Where a decompressed Fashion-MNIST copy is prepared (see
        :func:`pipeline.data.prepare_fashion_mnist_root`).

    Returns
    -------
    model : torch.nn.Module
        Trained model in eval mode; input ``(B, 1, 28, 28)``, logits ``(B, 10)``.
    metadata : dict
        The sidecar content (``config``, ``config_hash``, ``test_top1``,
        ``test_top5``, ``train_time_s`` (wall), ``train_cpu_s`` (all threads),
        ``weights_sha256``, ...) plus
        ``source="trained"``, ``weights_path`` and ``sidecar_path``.
    """
    from pipeline.preflight import check_writable_dir

    weights_path, sidecar_path = reference_paths(config, cache_dir)
    # Before training, not after: a bad cache location must not cost the training run (issue 8.4).
    check_writable_dir(weights_path.parent, "model cache", "--cache-dir")
    train_x, train_y = _load_split("train", config, config.train_subset, data_cache_dir)
    test_x, test_y = _load_split("test", config, config.test_subset, data_cache_dir)
    threads = config.num_threads or _available_cores()
    with _num_threads(threads):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            start, start_cpu = time.perf_counter(), time.process_time()
            model = _fit(config, train_x, train_y, progress)
            train_time = time.perf_counter() - start
            # CPU seconds over all threads: comparable across runs on a shared machine.
            train_cpu = time.process_time() - start_cpu
        test_batches = _TensorBatches(test_x, test_y, _EVAL_BATCH_SIZE)
        scores = evaluate(model, test_batches, progress=progress, desc=f"test {config.model}")

    try:
        atomic_save_safetensors(model.state_dict(), weights_path, metadata={"model": config.model})
    except OSError as exc:
        # The trained model is still good: hand it back instead of losing the training (issue 8.4).
        warnings.warn(f"could not write the trained model to {weights_path} ({exc}); using it from memory, "
                      "the next run trains it again", stacklevel=2)
        return model, {"model": config.model, "config": dataclasses.asdict(config), "config_hash": config.cache_key(),
                       "test_top1": scores["top1"], "test_top5": scores["top5"], "source": "trained (not cached)",
                       "weights_path": None, "sidecar_path": None}
    metadata = {
        "cache_format_version": CACHE_FORMAT_VERSION,
        "model": config.model,
        "config": dataclasses.asdict(config),
        "config_hash": config.cache_key(),
        "test_top1": scores["top1"],
        "test_top5": scores["top5"],
        "test_n": scores["n"],
        "train_n": len(train_y),
        "train_time_s": round(train_time, 2),
        "train_cpu_s": round(train_cpu, 2),
        "num_threads": threads,
        "num_params": sum(p.numel() for p in model.parameters()),
        "weights_file": weights_path.name,
        "weights_sha256": sha256_file(weights_path),
        "torch_version": torch.__version__,
        "created_utc": _utc_now(),
    }
    # Written last: a sidecar on disk implies a complete weights file.
    try:
        atomic_write_text(sidecar_path, json.dumps(metadata, indent=2) + "\n")
    except OSError as exc:
        warnings.warn(f"could not write {sidecar_path} ({exc}); the model is used from memory and trained "
                      "again next time", stacklevel=2)
    return model, _with_paths(metadata, "trained", weights_path, sidecar_path)


# --------------------------------------------------------------------------- #
# Cache loading
# --------------------------------------------------------------------------- #
def _with_paths(metadata: dict, source: str, weights: Path, sidecar: Path) -> dict:
    return {**metadata, "source": source, "weights_path": str(weights), "sidecar_path": str(sidecar)}


def _corrupt(culprit: Path, weights: Path, sidecar: Path, reason: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"cached reference model file {culprit} is corrupt: {reason}. Delete {weights} and "
        f"{sidecar} or pass --retrain to train it again."
    )


def _load_cached(config: TrainConfig, weights: Path, sidecar: Path) -> tuple[nn.Module, dict]:
    """Load and verify a cache entry; raise CorruptCheckpointError on any defect."""
    try:
        metadata = json.loads(sidecar.read_text(encoding="utf-8"))
        expected_sha = metadata["weights_sha256"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise _corrupt(sidecar, weights, sidecar, f"unreadable sidecar ({exc})") from exc
    if metadata.get("config_hash") != config.cache_key():
        raise _corrupt(sidecar, weights, sidecar, "sidecar describes a different config")
    if not weights.is_file():
        raise _corrupt(weights, weights, sidecar, "weights file is missing")
    actual_sha = sha256_file(weights)
    if actual_sha != expected_sha:
        reason = f"sha256 {actual_sha[:12]}... != recorded {expected_sha[:12]}..."
        raise _corrupt(weights, weights, sidecar, reason)
    try:
        model = build_model(config.model, weights=weights)
    except (ValueError, OSError) as exc:
        raise _corrupt(weights, weights, sidecar, f"weights do not load ({exc})") from exc
    return model.eval(), _with_paths(metadata, "cache", weights, sidecar)


def load_or_train_reference(
    config: TrainConfig,
    cache_dir: str | os.PathLike[str],
    retrain_corrupt: bool = False,
    progress: bool = True,
    data_cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[nn.Module, dict]:
    """Return the cached reference model for ``config``, training it if absent.

    Parameters
    ----------
    config : TrainConfig
        Training configuration (its hash selects the cache entry).
    cache_dir : str or os.PathLike
        Model cache directory.
    retrain_corrupt : bool, default False
        Retrain (and overwrite) a corrupt cache entry instead of raising.
    progress : bool, default True
        Show tqdm progress bars while training.
    data_cache_dir : str or os.PathLike, optional
        Passed to :func:`train_reference`.

    Returns
    -------
    model : torch.nn.Module
        Model in eval mode.
    metadata : dict
        Sidecar content plus ``source`` (``"cache"`` or ``"trained"``),
        ``weights_path`` and ``sidecar_path``.

    Raises
    ------
    CorruptCheckpointError
        If the cache entry fails its checksum or does not load and
        ``retrain_corrupt`` is False.
    """
    weights, sidecar = reference_paths(config, cache_dir)
    # Weights without a sidecar are an interrupted run: the sidecar is written last.
    if sidecar.is_file():
        try:
            return _load_cached(config, weights, sidecar)
        except CorruptCheckpointError as exc:
            if not retrain_corrupt:
                raise
            warnings.warn(f"{exc} Retraining because retrain_corrupt=True.", stacklevel=2)
    return train_reference(config, cache_dir, progress=progress, data_cache_dir=data_cache_dir)

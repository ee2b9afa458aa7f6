"""Sigma from the user's own data: any torch ``Dataset`` or ``DataLoader``, cached under a user-given identity.

:class:`pipeline.compress.SigmaSource` describes a dataset the toolkit can rebuild (Fashion-MNIST, digits, an image
folder), so its cache key is derived from the dataset's description. Data the toolkit cannot describe (a custom
``Dataset``, a ``DataLoader`` with its own transforms) enters the cache key through ``identity``: a name the user
chooses and changes whenever the images or their preprocessing change. The model weights, layers, N, seed and
``centered`` are part of the key as always.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import DataLoader, Dataset

from pipeline.data import make_loader, sample_subset

__all__ = ["DataSource"]


@dataclass(frozen=True, eq=False)
class DataSource:
    """Images for Sigma from a torch ``Dataset`` or ``DataLoader`` (any iterable of batches).

    Parameters
    ----------
    data : Dataset or DataLoader or iterable
        A map-style ``Dataset`` of ``(image, label)`` or images ``(C, H, W)``: ``n_samples`` distinct items are
        drawn with ``seed`` (all of them when ``n_samples`` is None) and batched by ``batch_size``. A
        ``DataLoader`` / iterable of batches ``(B, C, H, W)`` or ``(images, labels)``: used as it iterates (the
        first ``n_samples`` images; ``seed`` plays no part), so it should not shuffle, or the cached Sigma will
        not be the one a rerun would compute.
    identity : str
        Names the images and their preprocessing in the Sigma cache key (e.g. ``"shop-photos-v3/val/224"``).
        Change it when the data changes: the cache cannot see inside ``data``.
    n_samples : int, optional
        Images used; default ``len(data)`` (a ``DataLoader``: ``len(data.dataset)``).
    seed : int, default 0
        Subset seed (``Dataset`` input only).
    centered : bool, default False
        Centered covariance instead of E[u u^T].
    batch_size : int, default 250
        Batch size for ``Dataset`` input.
    """

    data: Dataset | DataLoader | Iterable
    identity_name: str
    n_samples: int | None = None
    seed: int = 0
    centered: bool = False
    batch_size: int = 250

    def __init__(self, data, identity: str, n_samples: int | None = None, seed: int = 0, centered: bool = False,
                 batch_size: int = 250):
        if not isinstance(identity, str) or not identity.strip():
            raise ValueError(f"identity must be a non-empty str naming the data for the Sigma cache, got {identity!r}")
        if n_samples is None:
            n_samples = _length(data)
        if n_samples is None:
            raise ValueError("data has no len(): pass n_samples (the number of images to use for Sigma)")
        if int(n_samples) < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for name, value in (("data", data), ("identity_name", identity), ("n_samples", int(n_samples)),
                            ("seed", int(seed)), ("centered", bool(centered)), ("batch_size", int(batch_size))):
            object.__setattr__(self, name, value)

    @property
    def is_dataset(self) -> bool:
        return isinstance(self.data, Dataset) and not isinstance(self.data, DataLoader) and hasattr(self.data,
                                                                                                  "__len__")

    def dataset_identity(self) -> Mapping:
        """What stands for the images in the cache key: the user's identity (and how the data is consumed)."""
        return {"name": "user", "identity": self.identity_name,
                "kind": "dataset-subset" if self.is_dataset else "loader-prefix"}

    def identity(self) -> dict:
        return {"dataset": dict(self.dataset_identity()), "n": self.n_samples,
                "seed": self.seed if self.is_dataset else None, "centered": self.centered}

    def key_seed(self) -> int:
        """The seed in the cache key (0 for loaders, where it plays no part)."""
        return self.seed if self.is_dataset else 0

    def batches(self, data_cache_dir: str | Path | None = None) -> Iterable:
        """Batches of the ``n_samples`` images (a loader may yield more: the consumer stops at ``n_samples``)."""
        if self.is_dataset:
            return make_loader(sample_subset(self.data, self.n_samples, self.seed), batch_size=self.batch_size)
        return self.data


def _length(data) -> int | None:
    if isinstance(data, DataLoader):
        return len(data.dataset) if hasattr(data.dataset, "__len__") else None  # type: ignore[arg-type]
    return len(data) if hasattr(data, "__len__") and isinstance(data, Dataset) else None

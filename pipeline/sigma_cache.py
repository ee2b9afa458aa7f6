"""Content-keyed cache of per-layer Sigma matrices, written atomically with a checksum.

The key hashes everything that determines Sigma: the model weights, the layer names, the dataset identity
(name, root, split, resolution, resampling), the number of images N, the sampling seed and the centered flag.
A corrupt entry (bad checksum, unreadable file, wrong contents) is reported and recomputed, never used.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from pipeline._io import atomic_torch_save, atomic_write_text, sha256_file

__all__ = ["SigmaCache", "model_fingerprint", "sigma_key"]


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 of the model's state dict (names, dtypes, shapes and bytes), 16 hex chars."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def sigma_key(
    weights_hash: str,
    layers: Sequence[str],
    dataset_identity: Mapping,
    n_samples: int,
    seed: int,
    centered: bool,
) -> str:
    """Cache key (24 hex chars) of one Sigma computation."""
    blob = json.dumps(
        {
            "weights": weights_hash,
            "layers": sorted(layers),
            "dataset": dict(dataset_identity),
            "n": int(n_samples),
            "seed": int(seed),
            "centered": bool(centered),
            "format": 1,
        },
        sort_keys=True,
    ).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


class SigmaCache:
    """Directory of ``<key>.pt`` (dict layer -> Sigma) plus ``<key>.json`` (checksum and description)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)

    def _paths(self, key: str) -> tuple[Path, Path]:
        return self.directory / f"{key}.pt", self.directory / f"{key}.json"

    def load(self, key: str, layers: Sequence[str]) -> dict[str, torch.Tensor] | None:
        """The cached Sigmas for ``key``, or None when absent or corrupt (a warning says which)."""
        data, meta = self._paths(key)
        if not data.exists() or not meta.exists():
            return None
        try:
            expected = json.loads(meta.read_text())["sha256"]
            if sha256_file(data) != expected:
                raise ValueError("checksum mismatch")
            sigmas = torch.load(data, map_location="cpu", weights_only=True)
            missing = set(layers) - set(sigmas)
            if missing:
                raise ValueError(f"missing layers {sorted(missing)}")
        except Exception as exc:  # noqa: BLE001 -- any unreadable entry is treated the same: recompute
            warnings.warn(f"Sigma cache entry {data} is corrupt ({exc}); recomputing it", stacklevel=2)
            return None
        return {name: sigmas[name] for name in layers}

    def save(self, key: str, sigmas: Mapping[str, torch.Tensor], description: Mapping) -> Path:
        """Write the entry atomically (data first, then the checksum sidecar that validates it)."""
        data, meta = self._paths(key)
        atomic_torch_save({k: v.detach().cpu() for k, v in sigmas.items()}, data)
        atomic_write_text(meta, json.dumps({"sha256": sha256_file(data), **description}, indent=2, default=str))
        return data

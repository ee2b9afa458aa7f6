"""Content-keyed cache of per-layer Sigma matrices on any ``pyarrow.fs`` filesystem, checksummed.

The key hashes everything that determines Sigma: the model weights, the layer names, the dataset identity
(name, root, split, resolution, resampling / transform), the number of images N, the sampling seed and the
centered flag. A corrupt entry (bad checksum, unreadable file, wrong contents) is reported with a warning and
treated as absent, so the caller recomputes it; it is never used.

Where entries live
    ``SigmaCache("cache/sigma")`` (a local directory, the default), ``SigmaCache("file:///abs/dir")``, or any URI
    that ``pyarrow.fs.FileSystem.from_uri`` understands (``s3://bucket/prefix``, ``gs://bucket/prefix``, ...), or an
    explicit ``filesystem=`` with a path inside it.

Entry layout
    ``<key>.safetensors`` holds one float64 tensor per layer (safetensors: no pickle on load, so a shared bucket
    cannot run code in readers); ``<key>.json`` is the sidecar with the SHA-256 and size of the data file plus a
    free-form description. The sidecar is written *after* the data, so an entry only becomes valid once both
    are complete.

Atomicity
    Local filesystems: temporary name in the same directory, fsync, ``os.replace`` (see :mod:`pipeline._io`);
    an interrupted write leaves nothing behind. Object stores: the data is serialized in memory first and sent
    with a single write (one PUT, or one multipart upload that only becomes visible when complete), then the
    sidecar. A partial object left by a failure is deleted on a best-effort basis; if it survives, it has no
    matching sidecar checksum and is rejected on read.

Per-layer reuse
    :meth:`SigmaCache.load_layers` / :meth:`SigmaCache.save_layers` store one entry per layer (key of that single
    layer, :meth:`SigmaKey.for_layers`), so a run that adds layers recomputes only the new ones. Whole-set entries
    of :meth:`SigmaCache.load` / :meth:`SigmaCache.save` (what ``compute_sigmas`` wrote before it went per layer,
    and what the Ray sweep path still writes) are read too.

Index entries
    :meth:`SigmaCache.save_index` makes the whole-set key of a layer set resolve to its per-layer entries without
    a second copy of the data: ``<key>.json`` only (``"kind": "index"``), holding the layer names and the
    :class:`SigmaKey` fields they were hashed from. :meth:`SigmaCache.load` follows it, after checking that it
    re-hashes to ``<key>``; a missing or corrupt part makes the whole index count as absent (with a warning).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.fs as pafs
import torch

from pipeline._io import atomic_path
from pipeline.fingerprint import weights_fingerprint as model_fingerprint  # the one weights hash (re-exported)

__all__ = ["SigmaCache", "SigmaKey", "fetch_sigmas", "model_fingerprint", "sigma_key", "stats_key"]

_FORMAT = "sigma-cache/2"
_DATA_SUFFIX = ".safetensors"
_META_SUFFIX = ".json"
# Write in chunks so a huge Sigma set does not need a second full-size buffer inside the writer.
_CHUNK_BYTES = 8 << 20




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
        default=str,
    ).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def stats_key(key: SigmaKey, kind: str, layers: Sequence[str]) -> str:
    """Cache key of a per-layer data statistic (``"fisher"``, ``"activation"``) of ``layers``, from the same
    images as the Sigma of ``key`` (``centered`` plays no part)."""
    blob = json.dumps({"stat": kind, "weights": key.weights_hash, "layers": sorted(layers),
                       "dataset": dict(key.dataset_identity), "n": int(key.n_samples), "seed": int(key.seed),
                       "format": 1}, sort_keys=True, default=str).encode()
    return "stats-" + hashlib.sha256(blob).hexdigest()[:24]


@dataclass(frozen=True)
class SigmaKey:
    """Everything :func:`sigma_key` hashes except the layer set, so keys can be made per layer or per set.

    Attributes
    ----------
    weights_hash : str
        :func:`model_fingerprint` of the model as it is run (dtype included).
    dataset_identity : dict
        JSON-serializable description of the images and their transform.
    n_samples, seed : int
    centered : bool
    """

    weights_hash: str
    dataset_identity: Mapping = field(hash=False)
    n_samples: int
    seed: int
    centered: bool

    def for_layers(self, layers: Sequence[str]) -> str:
        """The :func:`sigma_key` of ``layers`` (one layer: a per-layer entry; all layers: a whole-set entry)."""
        return sigma_key(self.weights_hash, layers, self.dataset_identity, self.n_samples, self.seed,
                         self.centered)


def _resolve_location(location: str | os.PathLike, filesystem: pafs.FileSystem | None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, base path inside it) for a directory, a ``file://`` URI or an object-store URI."""
    text = os.fspath(location)
    if filesystem is not None:
        return filesystem, text.rstrip("/")
    if "://" in text:
        fs, path = pafs.FileSystem.from_uri(text)
        return fs, path.rstrip("/")
    # Plain paths (relative ones included, which from_uri rejects) are local directories.
    return pafs.LocalFileSystem(), str(Path(text).expanduser().resolve())


def _write_stream(handle, data: bytes | memoryview) -> None:
    """Write ``data`` to an open file/stream in chunks (a seam for tests that simulate a crash mid-write)."""
    view = memoryview(data)
    for start in range(0, len(view), _CHUNK_BYTES):
        handle.write(view[start:start + _CHUNK_BYTES])


class SigmaCache:
    """Checksummed Sigma entries in a directory of a ``pyarrow.fs`` filesystem (local by default).

    Parameters
    ----------
    location : str or os.PathLike
        Local directory, ``file://`` URI, or object-store URI such as ``s3://bucket/sigma``.
    filesystem : pyarrow.fs.FileSystem, optional
        Use this filesystem with ``location`` as the path inside it (e.g. a configured ``S3FileSystem``).
    """

    def __init__(self, location: str | os.PathLike, *, filesystem: pafs.FileSystem | None = None):
        self.location = os.fspath(location)
        self.filesystem, self.base = _resolve_location(location, filesystem)
        self._local = isinstance(self.filesystem, pafs.LocalFileSystem)

    @property
    def directory(self) -> Path | None:
        """The local directory of the cache, or None when it lives on an object store."""
        return Path(self.base) if self._local else None

    def __repr__(self) -> str:
        return f"SigmaCache({self.location!r}, filesystem={type(self.filesystem).__name__})"

    def _paths(self, key: str) -> tuple[str, str]:
        return f"{self.base}/{key}{_DATA_SUFFIX}", f"{self.base}/{key}{_META_SUFFIX}"

    # ------------------------------------------------------------------------------------------ whole sets
    def load(self, key: str, layers: Sequence[str]) -> dict[str, torch.Tensor] | None:
        """The cached Sigmas of ``layers`` under ``key``, or None when absent or corrupt (a warning says which).

        ``key`` may name a data entry or an index entry (:meth:`save_index`); an index is followed to its parts.
        """
        data_path, meta_path = self._paths(key)
        if not self._exists(meta_path):
            return None
        bad = data_path
        try:
            meta = json.loads(self._read_bytes(meta_path))
            if isinstance(meta, dict) and meta.get("kind") == "index":
                bad = meta_path  # an index has no data file: the JSON itself is what is broken
                parts = self._index_parts(key, meta, layers)
                return self._load_parts(parts, meta_path)
            sigmas = self._read_verified(data_path, meta)
            missing = set(layers) - set(sigmas)
            if missing:
                raise ValueError(f"missing layers {sorted(missing)}")
        except Exception as exc:  # noqa: BLE001 -- any unreadable entry is treated the same: recompute
            warnings.warn(f"Sigma cache entry {self._uri(bad)} is corrupt ({exc}); recomputing it",
                          stacklevel=2)
            return None
        return {name: sigmas[name] for name in layers}

    def save(self, key: str, sigmas: Mapping[str, torch.Tensor], description: Mapping) -> str:
        """Write an entry: the data first, then the checksum sidecar that validates it. Returns the data path."""
        return self._save({name: _as_float64_cpu(name, s) for name, s in sigmas.items()}, key, description)

    def save_stats(self, key: str, stats: Mapping[str, torch.Tensor], description: Mapping) -> str:
        """Write per-layer statistics of any shape (Fisher diagonals, mean activations): an entry of kind
        ``"stats"``, read back by :meth:`load` like a Sigma entry (same checksum), keyed by :func:`stats_key`."""
        tensors = {name: t.detach().to(device="cpu", dtype=torch.float64).contiguous() for name, t in stats.items()}
        return self._save(tensors, key, {**dict(description), "kind": "stats"})

    def _save(self, tensors: Mapping[str, torch.Tensor], key: str, description: Mapping) -> str:
        from safetensors.torch import save

        data_path, meta_path = self._paths(key)
        data = save(dict(tensors))
        meta = {**dict(description), "format": _FORMAT, "sha256": hashlib.sha256(data).hexdigest(),
                "size": len(data), "layers": sorted(tensors)}
        self._put(data_path, data)
        self._put(meta_path, json.dumps(meta, indent=2, default=str).encode())
        return data_path

    # ------------------------------------------------------------------------------------------ per layer
    def load_layers(self, key: SigmaKey, layers: Sequence[str]) -> dict[str, torch.Tensor]:
        """Every layer of ``layers`` that has its own per-layer entry (possibly none; whole-set entries are
        :meth:`fetch`'s business). Corrupt entries are skipped with a warning, so their layers come back missing
        and get recomputed."""
        found = {}
        for name in layers:
            hit = self.load(key.for_layers([name]), [name])
            if hit is not None:
                found[name] = hit[name]
        return found

    def fetch(self, key: SigmaKey, layers: Sequence[str],
              compute: Callable[[list[str]], Mapping[str, torch.Tensor]],
              description: Mapping) -> tuple[dict[str, torch.Tensor], list[str]]:
        """Sigmas of ``layers``: read what the cache has, compute the rest in one call, save it per layer.

        A whole-set entry (of an older run, or an index whose parts are all intact) answers at once. Otherwise
        the per-layer entries found are read, ``compute(missing)`` returns the others, which are written one
        entry each, and an index makes the whole-set key ``key.for_layers(layers)`` resolve to the parts.
        ``description`` is read after ``compute`` returns (so that ``compute`` may add its own facts to it).

        Returns
        -------
        sigmas : dict of str to torch.Tensor
            In the order of ``layers``.
        computed : list of str
            The layers ``compute`` produced (empty when everything came from the cache).
        """
        layers = list(layers)
        whole = self.load(key.for_layers(layers), layers)
        if whole is not None:
            return whole, []
        # One layer: its per-layer key is the whole-set key, just tried.
        cached = self.load_layers(key, layers) if len(layers) > 1 else {}
        missing = [name for name in layers if name not in cached]
        computed = dict(compute(missing)) if missing else {}
        try:
            if computed:
                self.save_layers(key, computed, description)
            self.save_index(key, layers, description)
        except OSError as exc:
            # Disk full, read-only or vanished cache: the computed Sigmas are still good, use them (issue 8.4).
            warnings.warn(f"could not write the Sigma cache {self.location} ({exc}); continuing with the "
                          "Sigmas in memory (the next run computes them again)", stacklevel=2)
        return {name: cached[name] if name in cached else computed[name] for name in layers}, missing

    def save_layers(self, key: SigmaKey, sigmas: Mapping[str, torch.Tensor], description: Mapping) -> list[str]:
        """Write one entry per layer (so later runs with other layer sets reuse them). Returns the data paths."""
        return [self.save(key.for_layers([name]), {name: sigma}, {**dict(description), "layer": name})
                for name, sigma in sigmas.items()]

    def save_index(self, key: SigmaKey, layers: Sequence[str], description: Mapping) -> str | None:
        """Make ``key.for_layers(layers)`` resolve to the per-layer entries of ``layers`` (written before).

        Writes a small JSON index instead of a second copy of the data, so readers of whole-set keys (sweep trials)
        find the set. One layer: nothing to do (its per-layer key *is* the whole-set key); returns None. Otherwise
        returns the index path. A stale data file under the same key (a corrupt old whole-set entry) is removed.
        """
        layers = list(layers)
        if len(layers) < 2:
            return None
        data_path, meta_path = self._paths(key.for_layers(layers))
        meta = {**dict(description), "format": _FORMAT, "kind": "index", "layers": sorted(layers),
                "sigma_key": {"weights_hash": key.weights_hash, "dataset_identity": dict(key.dataset_identity),
                              "n_samples": int(key.n_samples), "seed": int(key.seed), "centered": bool(key.centered)}}
        self._put(meta_path, json.dumps(meta, indent=2, default=str).encode())
        if self._exists(data_path):
            try:
                self.filesystem.delete_file(data_path)
            except Exception:  # noqa: BLE001 -- best effort: an orphan data file is never read through the index
                pass
        return meta_path

    def _index_parts(self, key: str, meta: Mapping, layers: Sequence[str]) -> dict[str, str]:
        """Layer -> per-layer key of an index entry, after checking that the index hashes to ``key``."""
        fields = meta["sigma_key"]
        sigma = SigmaKey(str(fields["weights_hash"]), dict(fields["dataset_identity"]), int(fields["n_samples"]),
                         int(fields["seed"]), bool(fields["centered"]))
        indexed = [str(name) for name in meta["layers"]]
        if len(indexed) < 2:  # save_index writes none for one layer; one would point at itself
            raise ValueError(f"an index must list >= 2 layers, got {indexed}")
        if sigma.for_layers(indexed) != key:
            raise ValueError("index does not hash to its key")
        missing = set(layers) - set(indexed)
        if missing:
            raise ValueError(f"missing layers {sorted(missing)}")
        return {name: sigma.for_layers([name]) for name in layers}

    def _load_parts(self, parts: Mapping[str, str], index_path: str) -> dict[str, torch.Tensor] | None:
        out = {}
        for name, part in parts.items():
            if not self._exists(self._paths(part)[1]):
                warnings.warn(f"Sigma cache index {self._uri(index_path)} refers to a missing entry for layer "
                              f"{name}; recomputing it", stacklevel=3)
                return None
            hit = self.load(part, [name])  # warns itself when the part is corrupt
            if hit is None:
                return None
            out[name] = hit[name]
        return out

    # ------------------------------------------------------------------------------------------ storage
    def _uri(self, path: str) -> str:
        return path if self._local else f"{self.filesystem.type_name}://{path}"

    def _exists(self, path: str) -> bool:
        return self.filesystem.get_file_info(path).type == pafs.FileType.File

    def _read_bytes(self, path: str) -> bytes:
        with self.filesystem.open_input_stream(path) as stream:
            return stream.read()

    def _read_verified(self, data_path: str, meta: Mapping) -> dict[str, torch.Tensor]:
        from safetensors.torch import load

        data = self._read_bytes(data_path)
        if len(data) != meta["size"]:
            raise ValueError(f"size {len(data)} != {meta['size']} recorded in the sidecar (truncated?)")
        if hashlib.sha256(data).hexdigest() != meta["sha256"]:
            raise ValueError("checksum mismatch")
        sigmas = load(data)
        if meta.get("kind") == "stats":
            return sigmas
        for name, sigma in sigmas.items():
            if sigma.dim() != 2 or sigma.shape[0] != sigma.shape[1] or sigma.dtype != torch.float64:
                raise ValueError(f"layer {name}: expected a square float64 matrix, got {sigma.dtype} "
                                 f"{tuple(sigma.shape)}")
        return sigmas

    def _put(self, path: str, data: bytes) -> None:
        if self._local:
            # Temp file + fsync + rename: readers see the old file or the new one, never a prefix.
            with atomic_path(path) as tmp, open(tmp, "wb") as handle:
                _write_stream(handle, data)
            return
        self.filesystem.create_dir(path.rsplit("/", 1)[0], recursive=True)
        try:
            with self.filesystem.open_output_stream(path) as stream:
                _write_stream(stream, data)
        except BaseException:
            # Closing a failed object-store stream may still publish a prefix; remove it if we can. If that
            # fails too, the sidecar (written after the data, never for a failed write) rejects it on read.
            try:
                self.filesystem.delete_file(path)
            except Exception:  # noqa: BLE001 -- best effort; the original error matters
                pass
            raise


def _as_float64_cpu(name: str, sigma: torch.Tensor) -> torch.Tensor:
    if not isinstance(sigma, torch.Tensor) or sigma.dim() != 2 or sigma.shape[0] != sigma.shape[1]:
        shape = tuple(sigma.shape) if isinstance(sigma, torch.Tensor) else type(sigma).__name__
        raise ValueError(f"Sigma of layer {name} must be a square 2-D tensor, got {shape}")
    return sigma.detach().to(device="cpu", dtype=torch.float64).contiguous()


def fetch_sigmas(cache: SigmaCache | None, key: SigmaKey, layers: Sequence[str],
                 compute: Callable[[list[str]], Mapping[str, torch.Tensor]],
                 description: Mapping) -> tuple[dict[str, torch.Tensor], list[str]]:
    """:meth:`SigmaCache.fetch`, or without a cache ``compute(layers)``: the one cache policy of both Sigma paths
    (single process, ``pipeline.compress.compute_sigmas``; Ray Data, ``pipeline.ray_sigma.ray_compute_sigmas``)."""
    layers = list(layers)
    if not layers:
        raise ValueError("layer_names is empty: choose at least one layer")
    if cache is None:
        computed = dict(compute(layers))
        return {name: computed[name] for name in layers}, layers
    return cache.fetch(key, layers, compute, description)

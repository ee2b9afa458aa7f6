"""Cache keys of results that depend on a model: weights fingerprint, result keys, artifact checksums.

Every cached result of the pipeline (Sigma entries, compress points, baselines, Fisher / activation statistics,
fine-tuned points, and the caches added later: rank searches, TDLRT runs, comparisons) must be keyed by
*everything it depends on, model weights included*: a resumed job that finds a result computed for other weights
must not reuse it. The three helpers here are the one way to do that:

``weights_fingerprint(model)``
    SHA-256 (16 hex) of the model's ``state_dict`` -- names, dtypes, shapes and bytes of every parameter and
    buffer (BatchNorm statistics included). Two models with the same fingerprint compute the same function.
``result_key(kind, **deps)``
    A short stable hash of a JSON description of a result: put the architecture name, the weights fingerprint and
    every setting that changes the result into ``deps`` (dataclasses are converted with ``asdict``). Same inputs,
    same key; any change, another key.
``artifact_checksums(root, paths)`` / ``verify_artifacts(root, record)``
    SHA-256 of files written with a result, stored *relative to* ``root`` (the output directory, so that a copied
    folder stays valid), and the check a resumed job runs before it skips that result.

Example (a new cache, e.g. a rank search)::

    from pipeline.fingerprint import result_key, weights_fingerprint

    key = result_key("rank-search", model=config.model, weights=weights_fingerprint(model),
                     sigma=config.sigma.identity(), budget=config.budget, solver=config.solver)
    path = out / "rank_search" / f"{key}.json"
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from pipeline._io import sha256_file

__all__ = ["artifact_checksums", "result_key", "verify_artifacts", "weights_fingerprint"]


def weights_fingerprint(model: nn.Module) -> str:
    """SHA-256 of the model's state dict (names, dtypes, shapes and bytes), 16 hex chars.

    Parameters
    ----------
    model : nn.Module
        Hashed as it is run: a model cast to float64 or moved between devices keeps its fingerprint only if its
        values and dtypes are unchanged.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _default(value):
    """JSON fallback: dataclasses as their fields, anything else (paths, dtypes) as its ``str``."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return str(value)


def result_key(kind: str, length: int = 16, **deps) -> str:
    """Stable hash (``length`` hex chars) of a result of ``kind`` computed from ``deps``.

    ``deps`` must hold everything the result depends on (model name, :func:`weights_fingerprint`, data identity,
    settings); values are JSON-encoded with sorted keys (dataclasses via ``asdict``, other objects via ``str``).
    """
    blob = json.dumps({"kind": kind, **deps}, sort_keys=True, default=_default)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def artifact_checksums(root: str | Path, paths: Iterable[str | Path]) -> dict[str, str]:
    """``{path relative to root: sha256}`` of files (directories: every file inside, recursively)."""
    root = Path(root).resolve()
    out = {}
    for path in paths:
        path = Path(path).resolve()
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            out[file.relative_to(root).as_posix()] = sha256_file(file)
    return out


def verify_artifacts(root: str | Path, record: Mapping[str, str] | None) -> str | None:
    """None when every file of ``record`` (from :func:`artifact_checksums`) is under ``root`` with its checksum;
    else the reason (missing / modified file) in a few words."""
    if not record:
        return "no artifact checksums recorded"
    root = Path(root)
    for rel, sha in record.items():
        path = root / rel
        if not path.is_file():
            return f"{path} is missing"
        if sha256_file(path) != sha:
            return f"{path} does not match its recorded checksum (truncated or modified)"
    return None

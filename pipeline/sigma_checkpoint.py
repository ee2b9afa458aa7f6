"""Checkpointed Sigma pass: a killed job continues its pass over the images instead of starting over (issue 8.11).

The images are read in chunks of ``every`` images; after each chunk the running accumulator states of every
layer (:meth:`sigma_core.SigmaAccumulator.state_dict`: the Gram sum, the column sum and the patch count --
mergeable partial sums) are written atomically to ``<directory>/<key>.safetensors`` together with the number of
images done. A rerun with the same model weights, images, layers, batch size and chunk size loads them and
starts at the next chunk. An uninterrupted run takes the same chunks and merges in the same order, so a killed
and resumed pass gives bitwise the Sigma of an uninterrupted one; the checkpoint is removed when the pass ends.

A checkpoint that does not verify (checksum, layers, counts) is ignored with a warning; one that cannot be
written (disk full) is skipped with a warning: the pass goes on, only the ability to resume is lost.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset, Subset
from tqdm.auto import tqdm

from pipeline._io import atomic_save_safetensors
from pipeline.data import make_loader
from pipeline.fingerprint import result_key
from sigma_core import SigmaAccumulator, accumulate_sigma, get_module

__all__ = ["accumulate_checkpointed", "checkpoint_path"]


def checkpoint_path(directory: str | Path, key, layers: Sequence[str], batch_size: int, every: int) -> Path:
    """Where the checkpoint of one pass lives: keyed by the Sigma key of ``layers`` (weights, images, N, seed)
    plus the batch and chunk sizes, which fix the summation order."""
    name = result_key("sigma-checkpoint", sigma=key.for_layers(list(layers)), layers=sorted(layers),
                      batch_size=int(batch_size), every=int(every))
    return Path(directory) / f"{name}.safetensors"


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _save(path: Path, running: dict[str, SigmaAccumulator], done: int) -> None:
    tensors, counts = {}, {}
    for name, acc in running.items():
        state = acc.state_dict()
        tensors[f"{name}/gram"], tensors[f"{name}/total"] = state["gram"].cpu(), state["total"].cpu()
        counts[name] = int(state["count"])
    meta = {"done": str(done), "counts": json.dumps(counts), "sha256": _digest(tensors)}
    try:
        atomic_save_safetensors(tensors, path, metadata=meta)
    except OSError as exc:
        warnings.warn(f"could not write the Sigma checkpoint {path} ({exc}); the pass continues but a killed run "
                      "will have to start it over", stacklevel=3)


def _load(path: Path, model: nn.Module, layers: Sequence[str], n_images: int,
          device) -> tuple[dict[str, SigmaAccumulator] | None, int]:
    """(running accumulators, images done) from a checkpoint, or (None, 0) when there is none or it is bad."""
    if not path.is_file():
        return None, 0
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        done, counts = int(meta["done"]), json.loads(meta["counts"])
        if _digest(tensors) != meta["sha256"]:
            raise ValueError("checksum mismatch")
        if sorted(counts) != sorted(layers) or not 0 < done < n_images:
            raise ValueError(f"checkpoint of layers {sorted(counts)} after {done} images does not fit this pass")
        running = {}
        for name in layers:
            state = {"n": tensors[f"{name}/total"].shape[0], "count": counts[name],
                     "gram": tensors[f"{name}/gram"], "total": tensors[f"{name}/total"]}
            # Rebuilt in the layer's own internal layout, so later merges take the same path as in a fresh pass.
            running[name] = SigmaAccumulator.for_layer(get_module(model, name), device=device).merge(
                SigmaAccumulator.from_state_dict(state, device=device))
    except Exception as exc:  # noqa: BLE001 -- any unusable checkpoint: start the pass over
        warnings.warn(f"Sigma checkpoint {path} is unusable ({exc}); starting the pass over", stacklevel=3)
        return None, 0
    return running, done


def accumulate_checkpointed(model: nn.Module, images: Dataset, layers: Sequence[str], *, key, batch_size: int,
                            every: int, directory: str | Path, device="cpu",
                            progress: bool = True) -> dict[str, SigmaAccumulator]:
    """Accumulators of ``layers`` over every item of ``images``, checkpointed every ``every`` images.

    Parameters
    ----------
    model : nn.Module
    images : Dataset
        The images of the pass (e.g. the sampled subset), read in order.
    layers : sequence of str
    key : pipeline.sigma_cache.SigmaKey
        Identity of the pass (weights fingerprint, dataset, N, seed): part of the checkpoint's name.
    batch_size, every : int
        Loader batch size and checkpoint interval in images.
    directory : path
        Where the checkpoint is written (e.g. ``<output_dir>/sigma_checkpoint``).

    Returns
    -------
    dict of str to SigmaAccumulator
        Unfinalized, as :func:`sigma_core.accumulate_sigma` returns them.
    """
    if every < 1:
        raise ValueError(f"checkpoint interval must be >= 1 images, got {every}")
    layers = list(layers)
    total = len(images)
    path = checkpoint_path(directory, key, layers, batch_size, every)
    running, done = _load(path, model, layers, total, device)
    with tqdm(total=total, initial=done, desc="Sigma", unit="img", disable=not progress, leave=False) as bar:
        for start in range(done, total, every):
            stop = min(start + every, total)
            loader = make_loader(Subset(images, range(start, stop)), batch_size=batch_size, shuffle=False)
            chunk = accumulate_sigma(model, loader, layers, device=device,
                                     callback=lambda seen, s=start: bar.update(s + seen - bar.n))
            running = chunk if running is None else {name: running[name].merge(chunk[name]) for name in layers}
            if stop < total:
                _save(path, running, stop)
    path.unlink(missing_ok=True)
    return running

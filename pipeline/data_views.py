"""Sigma-source views of a dataset: class subsets, down-then-up resampling, weighted mixtures (paper Sec. 5.3,
App. G, Tables 9-13).

:class:`pipeline.data.DatasetSpec` holds the options; this module checks them (a clear ``ValueError`` naming the
field and the valid range), turns them into the cache identity (present only when set, so the keys of plain views
are unchanged) and applies the class subset. The mixture's Sigma is combined in :mod:`pipeline.transfer`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from torch.utils.data import Dataset, Subset

if TYPE_CHECKING:
    from pipeline.data import DatasetSpec

__all__ = ["check_view", "class_names", "component_counts", "mixture_weights", "select_classes", "view_identity"]

DIGIT_CLASSES = tuple(str(d) for d in range(10))
# Output side of each dataset when image_size is not given (digits are upsampled to Fashion-MNIST's 28).
_DEFAULT_OUT = {"fashion-mnist": 28, "digits": 28, "imagefolder": 224}


def class_names(spec: DatasetSpec) -> tuple[str, ...] | None:
    """Class names of ``spec``'s dataset in label order; None for an image folder (read from disk at build)."""
    from pipeline.data import FASHION_MNIST_CLASSES

    return {"fashion-mnist": FASHION_MNIST_CLASSES, "digits": DIGIT_CLASSES}.get(spec.name)


def _resolve_classes(requested: Sequence[int | str], names: Sequence[str], dataset: str) -> tuple[int, ...]:
    """Label indices of ``requested`` (indices or names), sorted and de-duplicated."""
    out = set()
    for item in requested:
        if isinstance(item, bool):
            raise ValueError(f"classes: {item!r} is not a class index or name")
        if isinstance(item, int):
            if not 0 <= item < len(names):
                raise ValueError(f"classes: index {item} out of range for {dataset}: valid 0..{len(names) - 1}")
            out.add(item)
            continue
        text = str(item)
        if text in names:
            out.add(names.index(text))
        elif text.isdigit() and dataset != "digits" and 0 <= int(text) < len(names):
            out.add(int(text))  # "3" from a command line means index 3 where names are words
        else:
            raise ValueError(f"classes: unknown class {text!r} for {dataset}; valid names: {', '.join(names)} "
                             f"(or indices 0..{len(names) - 1})")
    return tuple(sorted(out))


def check_view(spec: DatasetSpec) -> None:
    """Validate (and normalize in place, the spec being frozen) the view options of ``spec``."""
    if spec.classes is not None:
        if isinstance(spec.classes, (str, int)):
            object.__setattr__(spec, "classes", (spec.classes,))
        if len(spec.classes) == 0:
            raise ValueError("classes is empty: give at least one class (or leave it unset for every class)")
        if spec.name in ("mixture", "bn-prior"):
            raise ValueError(f"classes applies to an image dataset, not to {spec.name!r} (set it on a component)")
        names = class_names(spec)
        if names is not None:
            object.__setattr__(spec, "classes", _resolve_classes(spec.classes, names, spec.name))
        else:
            object.__setattr__(spec, "classes", tuple(sorted(set(spec.classes), key=lambda c: (str(type(c)), c))))
    if spec.down_size is not None:
        if spec.name in ("mixture", "bn-prior"):
            raise ValueError(f"down_size applies to an image dataset, not to {spec.name!r}")
        up = spec.image_size if spec.image_size is not None else _DEFAULT_OUT[spec.name]
        if not isinstance(spec.down_size, int) or spec.down_size < 1:
            raise ValueError(f"down_size must be an integer >= 1, got {spec.down_size!r}")
        if spec.down_size > up:
            raise ValueError(f"down_size {spec.down_size} is larger than the size images are resized up to "
                             f"({up}, image_size): down-then-up needs 1 <= down_size <= {up}")
    _check_mixture(spec)


def _check_mixture(spec: DatasetSpec) -> None:
    mixed = (spec.components, spec.weights, spec.counts)
    if spec.name != "mixture":
        if any(x is not None for x in mixed):
            raise ValueError(f"components / weights / counts are for name='mixture', not {spec.name!r}")
        return
    comps = tuple(spec.components or ())
    object.__setattr__(spec, "components", comps)
    if not comps:
        raise ValueError("a mixture needs components: a list of datasets (e.g. digits and fashion-mnist)")
    for comp in comps:
        if comp.name in ("mixture", "bn-prior"):
            raise ValueError(f"a mixture component must be an image dataset, got {comp.name!r}")
    if spec.weights is None:
        object.__setattr__(spec, "weights", tuple(1.0 for _ in comps))
    weights = tuple(float(w) for w in spec.weights)
    object.__setattr__(spec, "weights", weights)
    if len(weights) != len(comps):
        raise ValueError(f"weights has {len(weights)} entries but there are {len(comps)} components")
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise ValueError(f"mixture weights must be finite and >= 0, got {list(weights)}")
    if sum(weights) <= 0:
        raise ValueError(f"mixture weights sum to zero ({list(weights)}): give at least one positive weight")
    if spec.counts is not None:
        counts = tuple(spec.counts)
        object.__setattr__(spec, "counts", counts)
        if len(counts) != len(comps):
            raise ValueError(f"counts has {len(counts)} entries but there are {len(comps)} components")
        if any(not isinstance(c, int) or isinstance(c, bool) or c < 1 for c in counts):
            raise ValueError(f"mixture counts must be integers >= 1, got {list(counts)}")


def mixture_weights(spec: DatasetSpec) -> tuple[float, ...]:
    """The mixture's weights normalized to sum 1 (what the Sigma and its cache key use)."""
    total = math.fsum(spec.weights)
    return tuple(w / total for w in spec.weights)


def component_counts(spec: DatasetSpec, n_samples: int) -> tuple[int, ...]:
    """Images drawn from each component: ``counts``, or ``n_samples`` split by the weights (largest remainder,
    every component with a positive weight gets at least one)."""
    if spec.counts is not None:
        return tuple(spec.counts)
    shares = [n_samples * w for w in mixture_weights(spec)]
    counts = [math.floor(s) for s in shares]
    for i in sorted(range(len(shares)), key=lambda i: counts[i] - shares[i])[: n_samples - sum(counts)]:
        counts[i] += 1
    return tuple(max(c, 1) if w > 0 else 0 for c, w in zip(counts, spec.weights))


def view_identity(spec: DatasetSpec) -> dict:
    """The identity entries of the view options that are set (none for a plain view)."""
    out: dict = {}
    if spec.classes is not None:
        out["classes"] = list(spec.classes)
    if spec.down_size is not None:
        out["down_size"] = spec.down_size
    if spec.name == "mixture":
        out["components"] = [c.identity() for c in spec.components]
        out["weights"] = [float(w) for w in mixture_weights(spec)]
        out["counts"] = None if spec.counts is None else list(spec.counts)
    return out


def _labels(dataset: Dataset) -> list[int]:
    targets = getattr(dataset, "targets", None)
    if targets is None:
        raise ValueError(f"{type(dataset).__name__} has no labels (targets): a class subset needs them")
    return [int(t) for t in targets]


def select_classes(dataset: Dataset, spec: DatasetSpec) -> Subset:
    """The items of ``dataset`` whose label is in ``spec.classes`` (an image folder's names resolved here)."""
    wanted = spec.classes
    names = class_names(spec)
    if names is None:  # image folder: names are its subfolders
        folder_names = list(getattr(dataset, "classes", []))
        wanted = _resolve_classes(wanted, folder_names, f"image folder {Path(str(spec.root)).name}")
    keep, labels = set(wanted), _labels(dataset)
    indices = [i for i, label in enumerate(labels) if label in keep]
    if not indices:
        raise ValueError(f"classes {list(spec.classes)} select no image of {spec.name} ({spec.split} split)")
    subset = Subset(dataset, indices)
    subset.targets = [labels[i] for i in indices]  # type: ignore[attr-defined]
    return subset

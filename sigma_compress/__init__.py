"""sigma-compress: data-aware low-rank compression of trained CNNs.

The public Python API lives here (``import sigma_compress as sc``; the names of :mod:`pipeline.api`, loaded on
first use so that ``import sigma_compress`` stays cheap). The math alone is the ``sigma_core`` package
(torch/numpy/scipy/tensorly only).
"""

from __future__ import annotations

import importlib
from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("sigma-compress")
except _metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

_API = "pipeline.api"


def __getattr__(name: str):
    api = importlib.import_module(_API)
    if name in api.__all__:
        return getattr(api, name)
    raise AttributeError(f"module 'sigma_compress' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *importlib.import_module(_API).__all__])

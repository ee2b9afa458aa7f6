"""The public Python API of sigma-compress, in one place (re-exported by the ``sigma_compress`` package).

Typical use (the README's quick start runs this; ``tests/test_api.py`` executes it)::

    import sigma_compress as sc

    layers, plan = sc.select_layers(model)                              # convs worth factorizing, and why not others
    source = sc.DataSource(train_loader, identity="my-data-v1", n_samples=512)
    sigmas, info = sc.compute_sigmas(model, layers, source, cache=sc.SigmaCache("cache/sigma"))
    small, outcomes = sc.compress_model(model, layers, sigmas, sc.RankRule(alpha=0.8), "tucker2-als-sigma")
    print(sc.evaluate(small, test_loader)["top1"], sc.compression_rate(model, small))
    sc.save_compressed("out/my-net", base_model=None, model=small)      # or base_model="my_pkg.nets:make_net"
    again = sc.load_compressed("out/my-net", model=MyNet())

Everything here is also importable from its home module (``pipeline.compress``, ``pipeline.sources`` ...);
the names below are the ones whose signatures are kept stable.
"""

from __future__ import annotations

from pipeline.compress import (
    CompressionError,
    LayerOutcome,
    SigmaSource,
    compress_model,
    compute_sigmas,
    factorized_layers,
    load_compressed,
    model_stats,
    save_compressed,
    select_layers,
)
from pipeline.data import DatasetSpec, make_loader
from pipeline.evaluate import evaluate
from pipeline.method_docs import method_summaries
from pipeline.methods import SolverOptions
from pipeline.models import build_model, get_builder
from pipeline.sigma_cache import SigmaCache
from pipeline.sources import DataSource
from sigma_core import RankRule, compression_rate, count_macs, count_params, plan_layers

__all__ = [
    "CompressionError",
    "DataSource",
    "DatasetSpec",
    "LayerOutcome",
    "RankRule",
    "SigmaCache",
    "SigmaSource",
    "SolverOptions",
    "build_model",
    "compress_model",
    "compression_rate",
    "compute_sigmas",
    "count_macs",
    "count_params",
    "evaluate",
    "factorized_layers",
    "get_builder",
    "list_methods",
    "load_compressed",
    "make_loader",
    "model_stats",
    "plan_layers",
    "save_compressed",
    "select_layers",
]


def list_methods() -> dict[str, str]:
    """Registered compression methods (the ``method_name`` of :func:`compress_model`), each with one line."""
    return method_summaries()

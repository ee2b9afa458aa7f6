"""One line per registered compression method, for ``--help``, ``--methods list`` and :func:`method_summaries`.

Kept apart from the registry (:mod:`pipeline.methods`) so that a new method needs no entry here: it is then
described by its own ``summary`` attribute when it has one, else by the first docstring line of its
``decompose`` function, else by its rank family.
"""

from __future__ import annotations

from pipeline.methods import METHODS, Method

__all__ = ["method_summaries", "method_summary"]

_SUMMARIES = {
    "tucker2-als-sigma": "Tucker-2 of each conv minimizing the output error ||(K - K~) Sigma^1/2||_F (paper Alg. 2)",
    "tucker2-als": "Tucker-2 of each conv minimizing the weight error (tensorly partial_tucker; paper baseline)",
    "cp-als-sigma": "CP of each conv, every factor under the Sigma norm (paper Alg. 1)",
    "cp-als": "CP of each conv minimizing the weight error (tensorly parafac)",
    "cp-deflation-sigma": "CP of each conv by greedy rank-1 deflation under the Sigma norm",
    "svd-sigma": "low-rank linear / 1x1 layers minimizing the output error (paper App. E)",
    "svd": "truncated SVD of linear / 1x1 layers (weight error)",
    "fw-lra": "Tucker-2 weighted by the diagonal Fisher of the weights (baseline)",
    "ag-lra": "Tucker-2 weighted by mean |activation| per output channel (baseline)",
}


def method_summary(method: Method) -> str:
    """One line describing ``method`` (what it factorizes, under which error)."""
    own = getattr(method, "summary", None) or _SUMMARIES.get(method.name)
    if own:
        return own
    doc = (getattr(method.decompose, "__doc__", None) or "").strip().splitlines()
    return doc[0].rstrip(".") if doc else f"{method.family} decomposition"


def method_summaries() -> dict[str, str]:
    """Every registered method name -> its one-line summary, in registry order."""
    return {name: method_summary(method) for name, method in METHODS.items()}

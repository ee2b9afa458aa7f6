"""Registry of training methods: data in, trained (factorized) model out (beside the per-layer ``METHODS``).

A per-layer :class:`pipeline.methods.Method` decomposes a trained weight; a :class:`TrainingMethod` trains the
model itself. Each entry maps a :class:`pipeline.tdlrt.TDLRTConfig` (its ``method`` field set to the entry's
name) to ``(model, info)`` via :func:`pipeline.tdlrt.train_tdlrt`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

__all__ = ["TrainingMethod", "TRAINING_METHODS", "get_training_method"]


def _train(name: str) -> Callable:
    def train(config, **kwargs):
        from pipeline.tdlrt import train_tdlrt

        return train_tdlrt(dataclasses.replace(config, method=name), **kwargs)

    return train


@dataclass(frozen=True)
class TrainingMethod:
    """A training method.

    Attributes
    ----------
    name : str
    family : str
        Format of the trained convs: ``"tucker"`` (TuckerConv) or ``"dense"``.
    needs : str or None
        Data statistic it consumes during training (``"sigma"``: refreshed once per epoch) or None.
    train : callable
        ``train(TDLRTConfig, **train_tdlrt kwargs) -> (model, info)``.
    layer_types : tuple of type
        Layers it trains in factorized form.
    description : str
    """

    name: str
    family: str
    needs: str | None
    train: Callable
    layer_types: tuple[type, ...] = (nn.Conv2d,)
    description: str = ""


TRAINING_METHODS: dict[str, TrainingMethod] = {
    "tdlrt": TrainingMethod("tdlrt", "tucker", None, _train("tdlrt"),
                            description="rank-adaptive Tucker training, Frobenius truncation (Zangrando et al. 2023)"),
    "sgd-baseline": TrainingMethod("sgd-baseline", "dense", None, _train("sgd-baseline"), layer_types=(),
                                   description="dense model, the identical protocol (Table 3 baseline row)"),
}


def get_training_method(name: str) -> TrainingMethod:
    """Registered training method by name; ValueError listing the valid names otherwise."""
    if name not in TRAINING_METHODS:
        raise ValueError(f"unknown training method {name!r}; valid: {', '.join(TRAINING_METHODS)}")
    return TRAINING_METHODS[name]

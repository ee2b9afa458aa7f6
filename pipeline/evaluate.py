"""Classification accuracy of a model over a data loader."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

__all__ = ["evaluate"]


def _topk_correct(logits: torch.Tensor, labels: torch.Tensor, k: int) -> int:
    """Count rows of ``logits`` (B, K) whose top-``k`` contains ``labels`` (B,)."""
    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    return int((top == labels.unsqueeze(1)).any(dim=1).sum())


def evaluate(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: str | torch.device = "cpu",
    progress: bool = False,
    desc: str = "eval",
) -> dict[str, float]:
    """Top-1 / top-5 accuracy of ``model`` on ``loader``.

    The model is switched to eval mode (BatchNorm running statistics, no
    dropout) and run under ``torch.inference_mode``; it stays in eval mode.

    Parameters
    ----------
    model : torch.nn.Module
        Classifier mapping ``(B, C, H, W)`` to logits ``(B, K)``.
    loader : iterable of (images, labels)
        Batches ``(B, C, H, W)`` and ``(B,)`` integer labels, e.g. a
        ``DataLoader``.
    device : str or torch.device, default "cpu"
        Device the batches are moved to (the model is expected to be there).
    progress : bool, default False
        Show a tqdm progress bar.
    desc : str, default "eval"
        Progress bar label.

    Returns
    -------
    dict
        ``top1`` and ``top5`` in percent and ``n``, the number of samples.
        With fewer than 5 classes, ``top5`` counts all classes.

    Raises
    ------
    ValueError
        If the loader yields no samples.
    """
    model.eval()
    correct1 = correct5 = total = 0
    total_batches = len(loader) if hasattr(loader, "__len__") else None  # type: ignore[arg-type]
    with torch.inference_mode():
        for images, labels in tqdm(loader, total=total_batches, desc=desc, disable=not progress):
            images, labels = images.to(device), labels.to(device)
            logits = model(images)
            correct1 += _topk_correct(logits, labels, 1)
            correct5 += _topk_correct(logits, labels, 5)
            total += labels.shape[0]
    if total == 0:
        raise ValueError("evaluate() got an empty loader: there are no samples to score.")
    return {"top1": 100.0 * correct1 / total, "top5": 100.0 * correct5 / total, "n": total}

"""Fine-tuning baseline of the paper (Sec. 5.2-5.3, Figures 1-5): Adam, learning rate picked from a grid.

The paper fine-tunes the model compressed by plain (Frobenius) Tucker2-ALS with Adam, tries every learning rate of
a grid and reports the best one. Here the choice is made honestly: each learning rate trains its own copy on the
Fashion-MNIST training set *minus* a held-out split, and the copy with the best held-out top-1 wins; the test set
is only used afterwards, by the caller, to report the winner.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from pipeline.evaluate import evaluate

from math import isfinite as math_isfinite  # noqa: E402

__all__ = ["FinetuneConfig", "FinetuneData", "finetune", "finetune_data"]


@dataclass(frozen=True)
class FinetuneConfig:
    """Settings of the fine-tuning baseline.

    Parameters
    ----------
    epochs : int
        Passes over the fine-tuning subset per learning rate (the paper runs 30 on GPUs; 1-2 fit a CPU).
    lrs : tuple of float
        Adam learning-rate grid; the paper searches 1e-3 ... 1e-7 (CIFAR) or 1e-5 ... 1e-10 (ImageNet).
    batch_size : int
        Mini-batch size.
    train_subset : int or None
        Train on this many random images of the training set minus the held-out split (None: all of them).
    holdout : int
        Size of the held-out split (taken from the training set) that selects the learning rate.
    seed : int
        Seeds the split, the subset, the batch order (identical for every learning rate) and the dropout.
    data_root : str or None
        Fashion-MNIST directory; None means the default one.
    """

    epochs: int = 1
    lrs: tuple[float, ...] = (1e-3, 1e-4, 1e-5)
    batch_size: int = 128
    train_subset: int | None = 10_000
    holdout: int = 5_000
    seed: int = 0
    data_root: str | None = None
    # NORTON's optimizer family (SGD momentum + weight decay + warm-up/cosine), an option; Adam stays the default.
    optimizer: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "constant"
    warmup_epochs: int = 0

    def __post_init__(self) -> None:
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        if self.schedule not in ("constant", "cosine-warmup"):
            raise ValueError(f"schedule must be 'constant' or 'cosine-warmup', got {self.schedule!r}")
        if not (0 <= self.momentum < 1) or self.weight_decay < 0 or not (0 <= self.warmup_epochs <= self.epochs):
            raise ValueError(f"momentum must be in [0, 1), weight_decay >= 0 and 0 <= warmup_epochs <= epochs, got "
                             f"{self.momentum}, {self.weight_decay}, {self.warmup_epochs}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {self.epochs} and {self.batch_size}")
        if not self.lrs or any(lr <= 0 for lr in self.lrs):
            raise ValueError(f"lrs must be a non-empty grid of positive learning rates, got {self.lrs}")
        if self.holdout < 1 or (self.train_subset is not None and self.train_subset < 1):
            raise ValueError("holdout and train_subset must be >= 1")

    def identity(self) -> dict:
        """JSON-able fields that change the result (cache key of a fine-tuned point)."""
        ident = {k: v for k, v in asdict(self).items() if k != "data_root"}
        # The optimizer options were added later: at their defaults they stay out, so existing slugs stay valid.
        defaults = {"optimizer": "adam", "momentum": 0.9, "weight_decay": 0.0, "schedule": "constant",
                    "warmup_epochs": 0}
        return {k: v for k, v in ident.items() if k not in defaults or v != defaults[k]}


@dataclass(frozen=True)
class FinetuneData:
    """In-memory tensors: training images/labels and the held-out split that selects the learning rate."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    held_x: torch.Tensor
    held_y: torch.Tensor

    def __post_init__(self) -> None:
        if len(self.train_x) != len(self.train_y) or len(self.held_x) != len(self.held_y):
            raise ValueError("images and labels differ in length")
        if len(self.train_y) == 0 or len(self.held_y) == 0:
            raise ValueError("fine-tuning needs a non-empty training set and held-out split")


def split_holdout(images: torch.Tensor, labels: torch.Tensor, config: FinetuneConfig) -> FinetuneData:
    """Disjoint held-out split + training subset of ``(images, labels)``, drawn with ``config.seed``."""
    n = len(labels)
    if config.holdout >= n:
        raise ValueError(f"holdout={config.holdout} leaves no training images out of {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed))
    held, rest = order[: config.holdout], order[config.holdout:]
    if config.train_subset is not None:
        if config.train_subset > len(rest):
            raise ValueError(f"train_subset={config.train_subset} exceeds the {len(rest)} images left after the "
                             f"held-out split")
        rest = rest[: config.train_subset]
    return FinetuneData(images[rest], labels[rest], images[held], labels[held])


def finetune_data(config: FinetuneConfig, cache_dir: str | Path | None = None) -> FinetuneData:
    """Fashion-MNIST training set, split into fine-tuning subset and held-out split (see :func:`split_holdout`)."""
    from pipeline.data import load_fashion_mnist_tensors

    images, labels = load_fashion_mnist_tensors("train", config.data_root, cache_dir)
    return split_holdout(images, labels, config)


def _batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, order: torch.Tensor | None = None
             ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for start in range(0, len(y), batch_size):
        index = slice(start, start + batch_size) if order is None else order[start: start + batch_size]
        yield x[index], y[index]


def _held_top1(model: nn.Module, data: FinetuneData, batch_size: int, device: str) -> float:
    return evaluate(model, list(_batches(data.held_x, data.held_y, max(batch_size, 500))), device=device)["top1"]


def _train_one(model: nn.Module, lr: float, data: FinetuneData, config: FinetuneConfig, device: str,
               bar: tqdm) -> nn.Module:
    """Adam on a copy of ``model``; the batch order depends on the seed only, so every lr sees the same batches."""
    model = copy.deepcopy(model).to(device).train()
    if config.optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=config.momentum,
                                    weight_decay=config.weight_decay)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    # A ragged last batch of a few images gives noisy BatchNorm batch statistics: drop it (when there is more).
    steps = max(1, len(data.train_y) // config.batch_size)
    scheduler = None
    if config.schedule == "cosine-warmup":
        import math

        total, warm = config.epochs * steps, config.warmup_epochs * steps

        def factor(step: int) -> float:  # NORTON: linear warm-up from 0.01 lr, then cosine to 0 (per step here)
            if step < warm:
                return 0.01 + 0.99 * step / warm
            return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    for epoch in range(config.epochs):
        order = torch.randperm(len(data.train_y), generator=generator)
        for _, (x, y) in zip(range(steps), _batches(data.train_x, data.train_y, config.batch_size, order)):
            loss = nn.functional.cross_entropy(model(x.to(device)), y.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            if not math_isfinite(loss.item()):
                raise FloatingPointError(f"non-finite fine-tuning loss {loss.item()} at lr={lr} epoch {epoch + 1}")
            bar.set_postfix(lr=f"{lr:g}", epoch=epoch + 1, loss=f"{loss.item():.3f}", refresh=False)
            bar.update()
    return model.eval()


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    # Dropout draws from the global RNG: fork it so that fine-tuning is reproducible and leaves the caller's RNG alone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def finetune(model: nn.Module, config: FinetuneConfig, data: FinetuneData, *, device: str = "cpu",
             progress: bool = True) -> tuple[nn.Module, dict]:
    """Fine-tune a copy of ``model`` per learning rate of ``config.lrs`` and keep the best on the held-out split.

    Parameters
    ----------
    model : torch.nn.Module
        Classifier ``(B, C, H, W) -> (B, K)`` (e.g. a compressed model); not modified.
    config : FinetuneConfig
        Grid, epochs, batch size, seed.
    data : FinetuneData
        Training tensors and the held-out split (:func:`finetune_data` for Fashion-MNIST).
    device : str, default "cpu"
    progress : bool, default True
        tqdm bar over all optimizer steps of all learning rates.

    Returns
    -------
    best_model : torch.nn.Module
        The fine-tuned copy with the highest held-out top-1, in eval mode, on ``device``. Ties go to the earlier
        learning rate of the grid.
    info : dict
        ``best_lr``, ``held_top1_before``, ``held_top1_after``, ``held_top1_by_lr`` (str(lr) -> top-1 %),
        ``seconds``, ``train_n``, ``held_n`` and the config.
    """
    tic = time.perf_counter()
    steps = config.epochs * max(1, len(data.train_y) // config.batch_size) * len(config.lrs)
    before = _held_top1(copy.deepcopy(model).to(device), data, config.batch_size, device)
    scores: dict[str, float] = {}
    best_model, best_lr = None, None
    with tqdm(total=steps, desc="fine-tune", unit="step", disable=not progress, leave=False) as bar:
        for lr in config.lrs:
            with _seeded(config.seed):
                tuned = _train_one(model, lr, data, config, device, bar)
            scores[str(lr)] = _held_top1(tuned, data, config.batch_size, device)
            if best_lr is None or scores[str(lr)] > scores[str(best_lr)]:
                best_model, best_lr = tuned, lr
    info = {"best_lr": best_lr, "held_top1_before": before, "held_top1_after": scores[str(best_lr)],
            "held_top1_by_lr": scores, "seconds": time.perf_counter() - tic, "train_n": len(data.train_y),
            "held_n": len(data.held_y), "config": config.identity()}
    return best_model, info


"""TDLRT training: rank-adaptive low-rank training of convolutions in Tucker format (Zangrando et al. 2023).

The paper's protocol (Appendix A; TDLRT spec Sec. 4): Fashion-MNIST split 50k train / 10k validation (fixed split
seed), batch 128, SGD lr 0.05 with momentum 0.1 (dense parameters: ``torch.optim.SGD``; Tucker cores: the same
update through :func:`sigma_core.tdlrt.tdlrt_step`), lr x0.1 on a validation-loss plateau
(``ReduceLROnPlateau`` defaults), 70 epochs, no augmentation, ragged last batch dropped. The dense baseline
(``method="sgd-baseline"``) runs the identical loop on ordinary convs.

Every finished epoch is checkpointed (``<run dir>/checkpoint.pt``: Tucker states, momentum buffers, dense
weights, optimizer, scheduler, batch-order RNG, history); rerunning the same config resumes at the last finished
epoch with the same results as an uninterrupted run. A checkpoint written by a different config is an error.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from pipeline._io import atomic_torch_save, atomic_write_text
from pipeline.compress import save_compressed
from pipeline.data import load_fashion_mnist_tensors
from pipeline.models import build_model, load_weights
from sigma_core.covariance import _PAD_MODES, _conv_pads
from sigma_core.layers_tucker import TuckerConv
from sigma_core.surgery import get_module, replace_modules
from sigma_core.tdlrt import StepInfo, TDLRTStepConfig, TuckerState, tdlrt_step
from sigma_core.tucker import TRUNCATION_RULES, hosvd, tucker_params

__all__ = ["TDLRTConfig", "TDLRTConv", "TDLRTData", "CheckpointMismatchError", "INITS", "TRAIN_METHODS",
           "load_tdlrt_data", "train_tdlrt", "run_dir", "conv_compression_percent", "initial_state",
           "read_history"]

TRAIN_METHODS = ("tdlrt", "sgd-baseline")
INITS = ("half-rank", "dense-hosvd", "pretrained")
PRETRAINED_METHODS = ("hosvd",)
CHECKPOINT_FORMAT = "sigma-compress/tdlrt-checkpoint/1"
_EVAL_BATCH = 1000
# Fields that may change between a run and its resumption: they do not change the trajectory.
_RESUMABLE_FIELDS = ("epochs", "num_threads")


class CheckpointMismatchError(ValueError):
    """A checkpoint in the run directory was written by another config."""


@dataclass(frozen=True)
class TDLRTConfig:
    """One TDLRT (or dense-baseline) training run.

    Parameters
    ----------
    model : str
        Registered architecture (default the TDLRT paper's LeNet5).
    method : {"tdlrt", "sgd-baseline"}
        Training method (:data:`TRAIN_METHODS`); ``sgd-baseline`` trains the dense model with the same protocol.
    tau : float
        Relative truncation tolerance in [0, 1) (ignored by the baseline).
    epochs, batch_size, lr, momentum, plateau_factor, plateau_patience
        The paper's protocol: 70, 128, 0.05, 0.1, 0.1, 10 (torch's ReduceLROnPlateau default patience).
    val_size : int
        Validation images split off the 60k training set (the rest trains).
    split_seed : int
        Seed of the train/validation split (fixed across runs and seeds).
    seed : int
        Initialization and batch order.
    init : {"half-rank", "dense-hosvd", "pretrained"}
        ``half-rank``: random orthonormal factors at ``floor(n_i/2)`` (clamped to valid Tucker ranks) and a Gaussian
        core with the kaiming-uniform kernel energy; ``dense-hosvd``: exact full-rank HOSVD of the seed's dense init;
        ``pretrained``: decomposition of ``pretrained`` weights by ``init_method`` (fine-tuning entry point).
    pretrained : str or None
        Weights file of the dense model (``init="pretrained"``).
    init_method : {"hosvd"}
        Decomposition of the pretrained kernels (HOSVD to ``init_tau``).
    init_tau : float or None
        Tolerance of the initial HOSVD (``init="pretrained"``, ``init_method="hosvd"``; None: ``tau``).
    rule : {"tntorch", "per-mode"}
        Truncation rule (:func:`sigma_core.tucker.truncate_tucker`).
    modes : tuple of int
        Modes that adapt (paper: all four).
    rmin : int
        Smallest rank after truncation.
    layers : tuple of str or None
        Conv layers trained in Tucker format (None: every ``groups == 1`` conv, the first included).
    train_subset, test_subset : int or None
        First N training / test images (smoke runs and tests).
    data_root : str or None
        Fashion-MNIST directory (None: the Debian default).
    num_threads : int or None
        Torch threads for the forward/backward (not part of the run's identity).
    """

    model: str = "lenet5-fmnist"
    method: str = "tdlrt"
    tau: float = 0.15
    epochs: int = 70
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.1
    plateau_factor: float = 0.1
    plateau_patience: int = 10
    val_size: int = 10_000
    split_seed: int = 0
    seed: int = 0
    init: str = "half-rank"
    pretrained: str | None = None
    init_method: str = "hosvd"
    init_tau: float | None = None
    rule: str = "tntorch"
    modes: tuple[int, ...] = (0, 1, 2, 3)
    rmin: int = 1
    layers: tuple[str, ...] | None = None
    train_subset: int | None = None
    test_subset: int | None = None
    data_root: str | None = None
    num_threads: int | None = None

    def __post_init__(self) -> None:
        if self.method not in TRAIN_METHODS:
            raise ValueError(f"method must be one of {TRAIN_METHODS}, got {self.method!r}")
        if not (isinstance(self.tau, (int, float)) and 0.0 <= self.tau < 1.0):
            raise ValueError(f"tau must be a relative tolerance in [0, 1), got {self.tau!r}")
        for name in ("epochs", "batch_size", "val_size", "plateau_patience"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= (0 if name == "plateau_patience" else 1)):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not self.lr > 0 or not 0 <= self.momentum < 1 or not 0 < self.plateau_factor < 1:
            raise ValueError(f"need lr > 0, momentum in [0, 1) and plateau_factor in (0, 1); got lr={self.lr}, "
                             f"momentum={self.momentum}, plateau_factor={self.plateau_factor}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if self.init == "pretrained" and not self.pretrained:
            raise ValueError("init='pretrained' needs pretrained=<weights file of the dense model>")
        if self.init_method not in PRETRAINED_METHODS:
            raise ValueError(f"init_method must be one of {PRETRAINED_METHODS}, got {self.init_method!r}")
        if self.init_tau is not None and not 0 <= self.init_tau < 1:
            raise ValueError(f"init_tau must be in [0, 1), got {self.init_tau!r}")
        if self.rule not in TRUNCATION_RULES:
            raise ValueError(f"rule must be one of {TRUNCATION_RULES}, got {self.rule!r}")
        if self.method == "sgd-baseline":
            object.__setattr__(self, "tau", 0.0)  # unused; one identity for every baseline run of a seed
        object.__setattr__(self, "modes", tuple(int(m) for m in self.modes))
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(self.layers))
        TDLRTStepConfig(lr=self.lr, tau=self.tau, momentum=self.momentum, modes=self.modes, rule=self.rule,
                        rmin=self.rmin)  # validates modes / rmin

    @property
    def is_baseline(self) -> bool:
        return self.method == "sgd-baseline"

    def identity(self) -> dict:
        """Fields that define the run's trajectory (all but epochs / num_threads), JSON-able."""
        fields = dataclasses.asdict(self)
        for name in _RESUMABLE_FIELDS:
            fields.pop(name)
        fields["modes"] = list(fields["modes"])
        if fields["layers"] is not None:
            fields["layers"] = list(fields["layers"])
        return fields

    def run_name(self) -> str:
        """``<method>-tau<tau>-seed<seed>`` (baseline: ``sgd-baseline-seed<seed>``)."""
        if self.is_baseline:
            return f"sgd-baseline-seed{self.seed}"
        return f"{self.method}-tau{self.tau:g}-seed{self.seed}"


def run_dir(config: TDLRTConfig, output_dir: str | Path) -> Path:
    """``<output_dir>/<model>/<run name>``: checkpoint, history, saved models."""
    return Path(output_dir) / config.model / config.run_name()


# --------------------------------------------------------------------------- #
# Data
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class TDLRTData:
    """In-memory splits, images (N, 1, 28, 28) float32 normalized, labels (N,) int64."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def load_tdlrt_data(config: TDLRTConfig) -> TDLRTData:
    """The paper's split: a fixed random ``val_size`` of the 60k training images validates, the rest trains."""
    images, labels = load_fashion_mnist_tensors("train", config.data_root)
    test_x, test_y = load_fashion_mnist_tensors("test", config.data_root)
    if not 1 <= config.val_size < len(labels):
        raise ValueError(f"val_size must be in 1..{len(labels) - 1}, got {config.val_size}")
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(config.split_seed))
    val_idx, train_idx = perm[: config.val_size], perm[config.val_size:]
    if config.train_subset is not None:
        train_idx = train_idx[: config.train_subset]
    if config.test_subset is not None:
        test_x, test_y = test_x[: config.test_subset], test_y[: config.test_subset]
    return TDLRTData(images[train_idx], labels[train_idx], images[val_idx], labels[val_idx], test_x, test_y)


# --------------------------------------------------------------------------- #
# Training-time layer
# --------------------------------------------------------------------------- #
class TDLRTConv(nn.Module):
    """Training-time Tucker conv: a :class:`TuckerState` (float64) plus the conv's geometry and bias.

    Forward (mode A, spec Sec. 3.2): the dense kernel ``W = C x_i U_i`` is built in the model's dtype and, in
    training, made a leaf that requires grad, so ``loss.backward()`` leaves ``G = dL/dW`` in ``self.kernel_leaf
    .grad``; :meth:`step` then runs :func:`sigma_core.tdlrt.tdlrt_step`. The bias is an ordinary parameter
    (trained by the dense optimizer).
    """

    def __init__(self, conv: nn.Conv2d, state: TuckerState):
        super().__init__()
        if conv.groups != 1:
            raise ValueError(f"TDLRT does not apply to grouped/depthwise convs (groups={conv.groups}): the kernel "
                             f"{tuple(conv.weight.shape)} does not mix all input channels; leave this layer out")
        if tuple(state.shape) != tuple(conv.weight.shape):
            raise ValueError(f"Tucker state shape {state.shape} != conv weight shape {tuple(conv.weight.shape)}")
        self.conv_args = {"stride": conv.stride, "padding": conv.padding, "dilation": conv.dilation,
                          "padding_mode": conv.padding_mode, "in_channels": conv.in_channels,
                          "out_channels": conv.out_channels, "kernel_size": conv.kernel_size}
        self._geometry = conv  # for _conv_pads; not a submodule (its weight is unused)
        self.dtype = conv.weight.dtype
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone())
        self.state = state
        self.kernel_leaf: torch.Tensor | None = None
        self.last_info: StepInfo | None = None

    def __setattr__(self, name, value):  # keep the unused geometry conv out of the module tree
        if name == "_geometry":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def _conv(self, x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
        a = self.conv_args
        if a["padding_mode"] != "zeros":
            x = F.pad(x, _conv_pads(self._geometry), mode=_PAD_MODES[a["padding_mode"]])
            return F.conv2d(x, kernel, self.bias, a["stride"], 0, a["dilation"])
        return F.conv2d(x, kernel, self.bias, a["stride"], a["padding"], a["dilation"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = self.state.kernel().to(self.dtype)
        if self.training and torch.is_grad_enabled():
            kernel = kernel.detach().requires_grad_(True)
            self.kernel_leaf = kernel
        return self._conv(x, kernel)

    def step(self, cfg: TDLRTStepConfig) -> StepInfo:
        """One TDLRT step from the gradient of the last training forward."""
        if self.kernel_leaf is None or self.kernel_leaf.grad is None:
            raise RuntimeError("TDLRTConv.step needs a training forward and loss.backward() first")
        self.state, info = tdlrt_step(self.state, self.kernel_leaf.grad, cfg)
        self.kernel_leaf = None
        self.last_info = info
        return info

    def params_eval(self) -> int:
        return tucker_params(self.state.shape, self.state.ranks)

    def to_tucker_conv(self) -> TuckerConv:
        """Inference :class:`TuckerConv` with the current factors (model dtype)."""
        a = self.conv_args
        conv = nn.Conv2d(a["in_channels"], a["out_channels"], a["kernel_size"], stride=a["stride"],
                         padding=a["padding"], dilation=a["dilation"], padding_mode=a["padding_mode"],
                         bias=self.bias is not None, dtype=self.dtype)
        if self.bias is not None:
            with torch.no_grad():
                conv.bias.copy_(self.bias)
        return TuckerConv.from_result(conv, self.state.to_result())

    def state_tensors(self) -> dict:
        s = self.state
        return {"core": s.core, "factors": list(s.factors), "core_buf": s.core_buf}

    def load_state_tensors(self, blob: dict) -> None:
        self.state = TuckerState(core=blob["core"], factors=tuple(blob["factors"]), core_buf=blob["core_buf"])

    def extra_repr(self) -> str:
        return f"shape={self.state.shape}, ranks={self.state.ranks}"


# --------------------------------------------------------------------------- #
# Initialization
# --------------------------------------------------------------------------- #
def _valid_half_ranks(shape: Sequence[int]) -> tuple[int, ...]:
    ranks = [max(1, n // 2) for n in shape]
    changed = True
    while changed:
        changed = False
        for i in range(len(ranks)):
            others = math.prod(ranks[:i] + ranks[i + 1:])
            if ranks[i] > others:
                ranks[i] = others
                changed = True
    return tuple(ranks)


def _half_rank_state(conv: nn.Conv2d, generator: torch.Generator) -> TuckerState:
    """Random orthonormal factors at half rank, Gaussian core with kaiming-uniform's expected kernel energy."""
    shape = tuple(conv.weight.shape)
    ranks = _valid_half_ranks(shape)
    factors = tuple(torch.linalg.qr(torch.randn(n, r, generator=generator, dtype=torch.float64))[0]
                    for n, r in zip(shape, ranks))
    fan_in = shape[1] * shape[2] * shape[3]
    # nn.Conv2d's default init is U(-b, b), b = 1/sqrt(fan_in): E||W||^2 = numel b^2 / 3; ||W|| = ||C||.
    std = math.sqrt(math.prod(shape) / (3.0 * fan_in * math.prod(ranks)))
    core = torch.randn(ranks, generator=generator, dtype=torch.float64) * std
    return TuckerState(core=core, factors=factors)


def _full_hosvd_state(kernel: torch.Tensor) -> TuckerState:
    return TuckerState.from_result(hosvd(kernel.detach().to(torch.float64), ranks=_full_valid_ranks(kernel.shape)))


def _full_valid_ranks(shape) -> tuple[int, ...]:
    ranks = [int(n) for n in shape]
    for i in range(len(ranks)):
        ranks[i] = min(ranks[i], math.prod(ranks[:i] + ranks[i + 1:]))
    return tuple(ranks)


def initial_state(config: TDLRTConfig, conv: nn.Conv2d, name: str, generator: torch.Generator,
                  sigma: torch.Tensor | None = None) -> TuckerState:
    """Tucker state of one conv at the start of training (see ``TDLRTConfig.init``)."""
    if config.init == "half-rank":
        return _half_rank_state(conv, generator)
    if config.init == "dense-hosvd":
        return _full_hosvd_state(conv.weight)
    # init == "pretrained": HOSVD of the trained kernel to init_tau (default tau), then rank-adaptive fine-tuning.
    tol = config.tau if config.init_tau is None else config.init_tau
    return TuckerState.from_result(hosvd(conv.weight.detach().to(torch.float64), tol=tol, rule=config.rule,
                                         rmin=config.rmin))


def _tdlrt_layer_names(model: nn.Module, config: TDLRTConfig) -> list[str]:
    if config.layers is not None:
        for name in config.layers:
            module = get_module(model, name)
            if not isinstance(module, nn.Conv2d):
                raise ValueError(f"layer {name!r} is a {type(module).__name__}, not an nn.Conv2d; TDLRT trains convs")
            if module.groups != 1:
                raise ValueError(f"layer {name!r} is a grouped conv (groups={module.groups}); TDLRT does not "
                                 "apply to grouped/depthwise convs, remove it from layers")
        return list(config.layers)
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups == 1]


def _build_model(config: TDLRTConfig) -> tuple[nn.Module, list[str]]:
    """The seeded initial model (TDLRTConv layers in place unless baseline) and the TDLRT layer names."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = build_model(config.model)
        if config.pretrained:
            load_weights(model, config.pretrained, arch=config.model)
        generator = torch.Generator().manual_seed(config.seed + 1_000_003)
        if config.is_baseline:
            return model, []
        names = _tdlrt_layer_names(model, config)
        layers = {name: TDLRTConv(get_module(model, name),
                                  initial_state(config, get_module(model, name), name, generator))
                  for name in names}
        return replace_modules(model, layers), names


# --------------------------------------------------------------------------- #
# Counting
# --------------------------------------------------------------------------- #
def conv_compression_percent(shapes: Sequence[Sequence[int]], ranks: Sequence[Sequence[int]]) -> float:
    """Eval CR of the paper's tables: ``100 (1 - sum prod r + sum n r / sum prod n)`` over the convs."""
    dense = sum(math.prod(s) for s in shapes)
    low = sum(tucker_params(s, r) for s, r in zip(shapes, ranks))
    return 100.0 * (1.0 - low / dense)


def _train_memory(info: StepInfo, shape: Sequence[int]) -> int:
    """Assumed train-memory count of one step (spec Sec. 5): K and grads, U, U^new, C~ and grad, M."""
    r, ra = info.ranks_before, info.ranks_augmented
    nr = sum(n * k for n, k in zip(shape, r))
    return 3 * nr + sum(n * k for n, k in zip(shape, ra)) + 2 * math.prod(ra) + sum(a * b for a, b in zip(ra, r))


# --------------------------------------------------------------------------- #
# Loop
# --------------------------------------------------------------------------- #
def _evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(mean cross-entropy, top-1 %) over the whole split."""
    model.eval()
    loss, correct = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(y), _EVAL_BATCH):
            logits = model(x[start:start + _EVAL_BATCH])
            target = y[start:start + _EVAL_BATCH]
            loss += float(F.cross_entropy(logits, target, reduction="sum"))
            correct += int((logits.argmax(1) == target).sum())
    model.train()
    return loss / len(y), 100.0 * correct / len(y)


def _tdlrt_layers(model: nn.Module, names: Sequence[str]) -> dict[str, TDLRTConv]:
    return {name: get_module(model, name) for name in names}


def _dense_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _checkpoint_path(directory: Path) -> Path:
    return directory / "checkpoint.pt"


def _load_checkpoint(path: Path, config: TDLRTConfig) -> dict:
    try:
        blob = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:
        raise CheckpointMismatchError(f"{path} is not a readable TDLRT checkpoint ({type(exc).__name__}: {exc}); "
                                      "delete it or pass restart=True (--restart)") from exc
    if not isinstance(blob, dict) or blob.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointMismatchError(f"{path} is not a TDLRT checkpoint (format {CHECKPOINT_FORMAT!r} expected); "
                                      "point output_dir elsewhere or pass restart=True (--restart)")
    saved, current = blob["config"], config.identity()
    diff = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    if diff:
        detail = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {current.get(k)!r}" for k in diff)
        raise CheckpointMismatchError(f"checkpoint {path} was written by another config ({detail}); rerun with the "
                                      "checkpoint's settings to resume, use another output dir, or pass "
                                      "restart=True (--restart) to discard it")
    return blob


def _save_checkpoint(path: Path, config: TDLRTConfig, epoch: int, model: nn.Module, names: Sequence[str],
                     optimizer, scheduler, generator: torch.Generator, history: list, best: dict | None) -> None:
    layers = _tdlrt_layers(model, names)
    blob = {
        "format": CHECKPOINT_FORMAT,
        "config": config.identity(),
        "epoch": epoch,
        "model": {k: v for k, v in model.state_dict().items()},
        "tucker": {name: layer.state_tensors() for name, layer in layers.items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "generator": generator.get_state(),
        "history": json.dumps(history),
        "best": json.dumps(best),
    }
    atomic_torch_save(blob, path)


def _restore(blob: dict, model: nn.Module, names: Sequence[str], optimizer, scheduler,
             generator: torch.Generator) -> tuple[int, list, dict | None]:
    layers = _tdlrt_layers(model, names)
    for name, layer in layers.items():
        layer.load_state_tensors(blob["tucker"][name])
    model.load_state_dict(blob["model"], strict=True)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    generator.set_state(blob["generator"])
    return int(blob["epoch"]), json.loads(blob["history"]), json.loads(blob["best"])


def inference_model(model: nn.Module, names: Sequence[str]) -> nn.Module:
    """Copy of ``model`` with every :class:`TDLRTConv` replaced by its :class:`TuckerConv` (eval mode)."""
    import copy

    frozen = copy.deepcopy(model)
    frozen = replace_modules(frozen, {name: get_module(frozen, name).to_tucker_conv() for name in names})
    return frozen.eval()


def _save_model(directory: Path, config: TDLRTConfig, model: nn.Module, names: Sequence[str], extra: dict) -> None:
    frozen = inference_model(model, names)
    save_compressed(directory, config.model, 10, frozen, names,
                    extra={"method": config.method, "tau": config.tau, "train_config": dataclasses.asdict(config),
                           **extra})


def read_history(directory: str | Path) -> dict | None:
    """``history.json`` of a run directory (None if absent)."""
    path = Path(directory) / "history.json"
    return json.loads(path.read_text()) if path.is_file() else None


def train_tdlrt(config: TDLRTConfig, *, data: TDLRTData | None = None, output_dir: str | Path | None = None,
                tracker=None, progress: bool = True, resume: bool = True, restart: bool = False,
                on_step: Callable[[int, int], None] | None = None) -> tuple[nn.Module, dict]:
    """Train LeNet5-style models with TDLRT (or the dense baseline) under the paper's protocol.

    Parameters
    ----------
    config : TDLRTConfig
    data : TDLRTData, optional
        Default: :func:`load_tdlrt_data`.
    output_dir : path, optional
        Parent of the run directory (:func:`run_dir`); None keeps nothing on disk (no resume).
    tracker : pipeline.tracking.Tracker, optional
        One MLflow run per (method, tau, seed) with per-epoch metrics.
    progress : bool
        tqdm bar over the steps.
    resume : bool
        Continue from the run directory's checkpoint when there is one.
    restart : bool
        Discard an existing checkpoint (of any config) and start over.
    on_step : callable, optional
        ``on_step(epoch, step)`` after every training step (tests use it to interrupt a run).

    Returns
    -------
    model : nn.Module
        The trained model with :class:`TuckerConv` layers (baseline: dense), eval mode.
    info : dict
        ``history`` (one dict per epoch), ``best`` (the epoch of minimum validation loss), ``final``,
        ``ranks``, ``eval_cr``, ``run_dir``.
    """
    data = data if data is not None else load_tdlrt_data(config)
    threads = config.num_threads or torch.get_num_threads()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _train(config, data, output_dir, tracker, progress, resume, restart, on_step)
    finally:
        torch.set_num_threads(previous_threads)


def _train(config, data, output_dir, tracker, progress, resume, restart, on_step):
    model, names = _build_model(config)
    model.train()
    optimizer = torch.optim.SGD(_dense_parameters(model), lr=config.lr, momentum=config.momentum)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=config.plateau_factor,
                                                           patience=config.plateau_patience)
    generator = torch.Generator().manual_seed(config.seed)
    directory = run_dir(config, output_dir) if output_dir is not None else None
    start_epoch, history, best = 0, [], None
    if directory is not None:
        directory.mkdir(parents=True, exist_ok=True)
        ckpt = _checkpoint_path(directory)
        if ckpt.exists() and restart:
            ckpt.unlink()
        elif ckpt.exists() and resume:
            start_epoch, history, best = _restore(_load_checkpoint(ckpt, config), model, names, optimizer,
                                                  scheduler, generator)
    layers = _tdlrt_layers(model, names)
    shapes = {name: layer.state.shape for name, layer in layers.items()}
    dense_conv = 2 * sum(math.prod(s) for s in shapes.values())
    steps_per_epoch = len(data.train_y) // config.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"{len(data.train_y)} training images are fewer than one batch of {config.batch_size}")
    mlflow_ctx = _mlflow_run(tracker, config, directory)
    with mlflow_ctx:
        bar = tqdm(total=(config.epochs - start_epoch) * steps_per_epoch, desc=config.run_name(),
                   disable=not progress)
        for epoch in range(start_epoch, config.epochs):
            t0 = time.perf_counter()
            order = torch.randperm(len(data.train_y), generator=generator)
            lr = optimizer.param_groups[0]["lr"]
            step_cfg = TDLRTStepConfig(lr=lr, tau=config.tau, momentum=config.momentum, modes=config.modes,
                                       rule=config.rule, rmin=config.rmin)
            losses, trunc_errs, orth, mem = [], [], 0.0, []
            for step in range(steps_per_epoch):
                idx = order[step * config.batch_size:(step + 1) * config.batch_size]
                loss = F.cross_entropy(model(data.train_x[idx]), data.train_y[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise FloatingPointError(f"non-finite training loss at epoch {epoch + 1}, step {step + 1}")
                losses.append(value)
                with torch.no_grad():
                    step_mem = 0
                    for name, layer in layers.items():
                        info = layer.step(step_cfg)
                        trunc_errs.append(info.rel_trunc_err)
                        orth = max(orth, info.orth_err)
                        step_mem += _train_memory(info, shapes[name])
                    if layers:
                        mem.append(100.0 * (1.0 - step_mem / dense_conv))
                bar.update()
                bar.set_postfix(epoch=epoch + 1, loss=f"{value:.3f}", refresh=False)
                if on_step is not None:
                    on_step(epoch, step)
            val_loss, val_top1 = _evaluate(model, data.val_x, data.val_y)
            test_loss, test_top1 = _evaluate(model, data.test_x, data.test_y)
            scheduler.step(val_loss)
            ranks = {name: list(layer.state.ranks) for name, layer in layers.items()}
            row = {"epoch": epoch + 1, "train_loss": sum(losses) / len(losses), "val_loss": val_loss,
                   "val_top1": val_top1, "test_loss": test_loss, "test_top1": test_top1, "lr": lr,
                   "eval_cr": conv_compression_percent([shapes[n] for n in ranks], list(ranks.values()))
                   if layers else 0.0,
                   "train_cr_peak": min(mem) if mem else 0.0, "train_cr_mean": sum(mem) / len(mem) if mem else 0.0,
                   "trunc_err_mean": sum(trunc_errs) / len(trunc_errs) if trunc_errs else 0.0,
                   "trunc_err_max": max(trunc_errs) if trunc_errs else 0.0, "orth_err_max": orth,
                   "ranks": ranks, "seconds": time.perf_counter() - t0}
            history.append(row)
            improved = best is None or val_loss < best["val_loss"]
            if improved:
                best = dict(row)
            if directory is not None:
                if improved:
                    _save_model(directory / "best", config, model, names, {"epoch": epoch + 1, "ranks": ranks})
                _save_checkpoint(_checkpoint_path(directory), config, epoch + 1, model, names, optimizer,
                                 scheduler, generator, history, best)
                atomic_write_text(directory / "history.json",
                                  json.dumps({"config": dataclasses.asdict(config), "history": history,
                                              "best": best}, indent=1) + "\n")
            _log_epoch(tracker, row)
        bar.close()
        final = history[-1] if history else None
        if directory is not None and final is not None:
            _save_model(directory / "final", config, model, names, {"epoch": final["epoch"], "ranks": final["ranks"]})
            if tracker is not None and getattr(tracker, "enabled", False):
                tracker.log_artifact(directory / "final", artifact_path="model")
    frozen = inference_model(model, names)
    info = {"history": history, "best": best, "final": final, "ranks": final["ranks"] if final else {},
            "eval_cr": final["eval_cr"] if final else None, "run_dir": str(directory) if directory else None,
            "layers": list(names)}
    return frozen, info


def _mlflow_run(tracker, config: TDLRTConfig, directory: Path | None):
    import contextlib

    if tracker is None or not getattr(tracker, "enabled", False):
        return contextlib.nullcontext()
    run_id_file = directory / "mlflow_run_id" if directory is not None else None
    run_id = run_id_file.read_text().strip() if run_id_file is not None and run_id_file.is_file() else None

    @contextlib.contextmanager
    def ctx():
        mlflow = tracker._mlflow
        with mlflow.start_run(run_id=run_id, run_name=None if run_id else config.run_name()) as active:
            if run_id is None:
                mlflow.log_params({k: str(v)[:500] for k, v in dataclasses.asdict(config).items()})
                if run_id_file is not None:
                    atomic_write_text(run_id_file, active.info.run_id + "\n")
            yield active

    return ctx()


def _log_epoch(tracker, row: dict) -> None:
    if tracker is None or not getattr(tracker, "enabled", False):
        return
    metrics = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "epoch"}
    for name, ranks in row["ranks"].items():
        for mode, r in zip("TSHW", ranks):
            metrics[f"rank/{name}/{mode}"] = r
    clean = {k.replace("/", "."): float(v) for k, v in metrics.items() if math.isfinite(float(v))}
    tracker._mlflow.log_metrics(clean, step=row["epoch"])

"""Model registry: small Fashion-MNIST reference CNNs and torchvision architectures.

The reference CNNs are trained locally (see :mod:`pipeline.train`); the
torchvision architectures are always built with ``weights=None`` and filled
from a user-supplied weights file, so nothing is ever downloaded.
"""

from __future__ import annotations

import importlib
import inspect
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "MODEL_NAMES",
    "REFERENCE_MODELS",
    "TORCHVISION_MODELS",
    "BasicBlock",
    "ResNetFMNIST",
    "VGGFMNIST",
    "build_model",
    "default_preprocess",
    "get_builder",
    "is_registered",
    "load_weights",
    "model_input_shape",
    "read_state_dict",
]

_STATE_DICT_NESTING_KEYS = ("state_dict", "model")
_PREFIXES_TO_STRIP = ("module.", "_orig_mod.")
_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar")
_MAX_LISTED = 5


# --------------------------------------------------------------------------- #
# Reference CNNs for Fashion-MNIST (input (B, 1, 28, 28), 10 classes)
# --------------------------------------------------------------------------- #
def _conv_bn(in_ch: int, out_ch: int, kernel: int, stride: int) -> list[nn.Module]:
    # Bias is redundant in front of BatchNorm.
    return [
        nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(out_ch),
    ]


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv-BN layers plus a shortcut.

    Parameters
    ----------
    in_channels, out_channels : int
        Channel counts.
    stride : int, default 1
        Stride of the first conv; a 1x1 conv-BN projection shortcut is used
        whenever the shape changes.

    Notes
    -----
    Input ``(B, in_channels, H, W)`` -> output
    ``(B, out_channels, ceil(H / stride), ceil(W / stride))``.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(in_channels, out_channels, 3, stride)
        self.conv2, self.bn2 = _conv_bn(out_channels, out_channels, 3, 1)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(*_conv_bn(in_channels, out_channels, 1, stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNetFMNIST(nn.Module):
    """CIFAR-style ResNet sized for 28x28 grayscale images.

    A 3x3 stem conv at full resolution, then one stage of
    :class:`BasicBlock` per entry of ``widths``; every stage downsamples by 2
    (28 -> 14 -> 7 -> 4), which keeps an epoch near half a minute on 2 CPU cores while
    all but the first stage run at >= 64 channels.

    Parameters
    ----------
    num_classes : int, default 10
        Output logits.
    in_channels : int, default 1
        Input channels.
    widths : sequence of int, default (32, 64, 128)
        Channels of each stage (the stem uses ``widths[0]``).
    blocks : sequence of int, default (1, 1, 1)
        Basic blocks per stage.

    Notes
    -----
    Input ``(B, in_channels, 28, 28)`` -> logits ``(B, num_classes)``.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        widths: Sequence[int] = (32, 64, 128),
        blocks: Sequence[int] = (1, 1, 1),
    ):
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(in_channels, widths[0], 3, 1), nn.ReLU(inplace=True))
        stages, channels = [], widths[0]
        for width, count in zip(widths, blocks, strict=True):
            stage = [BasicBlock(channels, width, stride=2)]
            stage += [BasicBlock(width, width) for _ in range(count - 1)]
            stages.append(nn.Sequential(*stage))
            channels = width
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.stages(self.stem(x))
        return self.fc(torch.flatten(self.pool(features), 1))


class VGGFMNIST(nn.Module):
    """VGG-style CNN for 28x28 grayscale images.

    3x3 conv-BN-ReLU stacks separated by 2x2 max-pools, then a classifier
    with one hidden linear layer. Pooling right after the cheap first conv
    keeps the expensive >= 64-channel convs at 14x14 and 7x7.

    Parameters
    ----------
    num_classes : int, default 10
        Output logits.
    in_channels : int, default 1
        Input channels.
    stages : sequence of sequence of int, default ((32,), (64, 64), (128, 128))
        Conv widths of each stage; each stage ends with a 2x2 max-pool
        (28 -> 14 -> 7 -> 3).
    hidden : int, default 256
        Width of the hidden classifier layer.
    dropout : float, default 0.3
        Dropout before the output layer.

    Notes
    -----
    Input ``(B, in_channels, 28, 28)`` -> logits ``(B, num_classes)``.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        stages: Sequence[Sequence[int]] = ((32,), (64, 64), (128, 128)),
        hidden: int = 256,
        dropout: float = 0.3,
    ):
        super().__init__()
        layers: list[nn.Module] = []
        channels, side = in_channels, 28
        for widths in stages:
            for width in widths:
                layers += [*_conv_bn(channels, width, 3, 1), nn.ReLU(inplace=True)]
                channels = width
            layers.append(nn.MaxPool2d(2))
            side //= 2
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels * side * side, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


# --------------------------------------------------------------------------- #
# Registry
# --------------------------------------------------------------------------- #
def _torchvision_builder(arch: str, **extra: object) -> Callable[[int], nn.Module]:
    def build(num_classes: int) -> nn.Module:
        from torchvision import models

        return getattr(models, arch)(weights=None, num_classes=num_classes, **extra)

    return build


REFERENCE_MODELS: dict[str, Callable[[int], nn.Module]] = {
    "resnet-fmnist": lambda num_classes: ResNetFMNIST(num_classes=num_classes),
    "vgg-fmnist": lambda num_classes: VGGFMNIST(num_classes=num_classes),
}
TORCHVISION_MODELS: dict[str, Callable[[int], nn.Module]] = {
    "resnet18": _torchvision_builder("resnet18"),
    "resnet50": _torchvision_builder("resnet50"),
    "googlenet": _torchvision_builder("googlenet", aux_logits=False, init_weights=False),
    "vgg16": _torchvision_builder("vgg16"),
    "alexnet": _torchvision_builder("alexnet"),
    "mobilenet_v2": _torchvision_builder("mobilenet_v2"),
}
MODEL_NAMES = tuple(REFERENCE_MODELS) + tuple(TORCHVISION_MODELS)


TIMM_PREFIX = "timm:"


def is_registered(name: str) -> bool:
    """Whether ``name`` is one of :data:`MODEL_NAMES` (a reference CNN or a torchvision architecture)."""
    return name in MODEL_NAMES


def get_builder(name: str) -> Callable[[int], nn.Module]:
    """``num_classes -> nn.Module`` for a model name: registered, ``"pkg.module:factory"`` or ``"timm:<arch>"``.

    Parameters
    ----------
    name : str
        One of :data:`MODEL_NAMES`; or ``"pkg.module:factory"``, an importable callable returning an
        ``nn.Module`` (called as ``factory(num_classes=n)`` when it takes a ``num_classes`` argument, else as
        ``factory()``); or ``"timm:<arch>"``, a timm architecture built with ``pretrained=False`` (needs the
        optional ``timm`` extra).

    Raises
    ------
    ValueError
        Unknown name, a factory that cannot be imported or is not callable, timm not installed or not
        knowing the architecture.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"model name must be a non-empty str, got {name!r}")
    if name in MODEL_NAMES:
        return {**REFERENCE_MODELS, **TORCHVISION_MODELS}[name]
    if name.startswith(TIMM_PREFIX):
        return _timm_builder(name[len(TIMM_PREFIX):])
    if ":" in name:
        return _factory_builder(name)
    raise ValueError(f"unknown model {name!r}; valid: {', '.join(MODEL_NAMES)}, 'pkg.module:factory' (a function "
                     "returning your nn.Module) or 'timm:<architecture>'")


def _factory_builder(name: str) -> Callable[[int], nn.Module]:
    module_name, _, attr = name.partition(":")
    if not module_name or not attr:
        raise ValueError(f"model factory {name!r} must read 'pkg.module:function'")
    if module_name == "__main__":
        raise ValueError(f"model factory {name!r} lives in __main__, which another process cannot import: move it "
                         "into an importable module, or save with base_model=None and pass model= to "
                         "load_compressed")
    try:
        target: object = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import module {module_name!r} of model factory {name!r}: {exc}; is it on "
                         "PYTHONPATH (or installed)?") from exc
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ValueError(f"module {module_name!r} has no attribute {attr!r} (model factory {name!r})")
        target = getattr(target, part)
    if not callable(target):
        raise ValueError(f"model factory {name!r} is a {type(target).__name__}, not a callable returning an "
                         "nn.Module")
    factory = target
    try:
        params = inspect.signature(factory).parameters
        takes_classes = "num_classes" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
    except (TypeError, ValueError):  # builtins without a signature
        takes_classes = False

    def build(num_classes: int) -> nn.Module:
        model = factory(num_classes=num_classes) if takes_classes else factory()
        if not isinstance(model, nn.Module):
            raise ValueError(f"model factory {name!r} returned a {type(model).__name__}, not an nn.Module")
        return model

    return build


def _timm():
    try:
        import timm
    except ImportError as exc:
        raise ValueError("timm models need the optional timm package: `uv sync --extra timm` or "
                         "`pip install 'sigma-compress[timm]'`") from exc
    return timm


def _timm_builder(arch: str) -> Callable[[int], nn.Module]:
    timm = _timm()
    if not timm.is_model(arch):
        close = timm.list_models(f"*{arch}*")[:_MAX_LISTED]
        raise ValueError(f"timm does not know the architecture {arch!r}" + (f"; close: {close}" if close else ""))

    def build(num_classes: int) -> nn.Module:
        return timm.create_model(arch, pretrained=False, num_classes=num_classes)

    return build


def default_preprocess(name: str) -> dict | None:
    """The evaluation preprocessing a model was trained with, when timm or torchvision knows it.

    Returns
    -------
    dict or None
        ``resize_size`` (shorter side), ``crop_size``, ``mean``, ``std`` (tuples of floats) and ``resample``
        (``"bilinear"`` / ``"bicubic"``); None when neither library describes the model (reference CNNs,
        factories).
    """
    if name in TORCHVISION_MODELS:
        from torchvision.models import get_model_weights

        # The transform object of the weights enum only describes the preprocessing; nothing is downloaded.
        transform = get_model_weights(name).DEFAULT.transforms()
        return {"resize_size": int(transform.resize_size[0]), "crop_size": int(transform.crop_size[0]),
                "mean": tuple(float(v) for v in transform.mean), "std": tuple(float(v) for v in transform.std),
                "resample": str(transform.interpolation.value)}
    if name.startswith(TIMM_PREFIX):
        timm = _timm()
        cfg = timm.data.resolve_data_config({}, model=timm.create_model(name[len(TIMM_PREFIX):], pretrained=False))
        crop = int(cfg["input_size"][-1])
        return {"resize_size": int(round(crop / cfg.get("crop_pct", 0.875))), "crop_size": crop,
                "mean": tuple(float(v) for v in cfg["mean"]), "std": tuple(float(v) for v in cfg["std"]),
                "resample": cfg.get("interpolation", "bilinear") if cfg.get("interpolation") == "bicubic"
                else "bilinear"}
    return None


def model_input_shape(name: str) -> tuple[int, int, int]:
    """Expected ``(C, H, W)`` of one input image for a registered model.

    Parameters
    ----------
    name : str
        Registered model name.

    Returns
    -------
    tuple of int
        ``(1, 28, 28)`` for the Fashion-MNIST references, ``(3, 224, 224)``
        for torchvision architectures.
    """
    _check_name(name)
    return (1, 28, 28) if name in REFERENCE_MODELS else (3, 224, 224)


def build_model(
    name: str,
    num_classes: int = 10,
    weights: str | os.PathLike[str] | Mapping[str, torch.Tensor] | None = None,
) -> nn.Module:
    """Build a model by name, optionally loading weights.

    Parameters
    ----------
    name : str
        One of :data:`MODEL_NAMES`, ``"pkg.module:factory"`` or ``"timm:<arch>"`` (see :func:`get_builder`).
    num_classes : int, default 10
        Size of the output layer.
    weights : path or state dict, optional
        ``.safetensors`` file, PyTorch state-dict file (see
        :func:`read_state_dict`) or an in-memory state dict. ``None`` keeps
        the random initialization (or, for a factory, whatever it returns); nothing is ever downloaded.

    Returns
    -------
    torch.nn.Module
        The model, on CPU, in training mode.

    Raises
    ------
    ValueError
        Unknown name, or weights that do not fit the architecture.
    FileNotFoundError
        If the weights file does not exist.
    """
    builder = get_builder(name)
    if weights is None:
        return builder(num_classes)
    state, source = _resolve_state(weights)
    if name not in MODEL_NAMES:
        # A user factory may create tensors on an explicit device, so no meta-device skeleton for it.
        return load_weights(builder(num_classes), state, arch=name)
    # Random initialization is wasted work when weights follow (seconds for
    # vgg16), so the skeleton is built on the meta device and the loaded
    # tensors are assigned into it.
    with torch.device("meta"):
        model = builder(num_classes)
    _raise_if_unfit(model, state, name, source)
    expected = model.state_dict()
    state = {key: value.to(expected[key].dtype) for key, value in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    if _has_meta_tensors(model):
        # Non-persistent buffers are absent from state dicts; build them for real.
        model = load_weights(builder(num_classes), state, arch=name)
    return model


def _check_name(name: str) -> None:
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}")


# --------------------------------------------------------------------------- #
# Weights IO
# --------------------------------------------------------------------------- #
def _is_safetensors(path: Path) -> bool:
    if path.suffix == ".safetensors":
        return True
    if path.suffix in _TORCH_SUFFIXES:
        return False
    # safetensors files start with an 8-byte header length followed by JSON.
    with open(path, "rb") as handle:
        return handle.read(9)[8:9] == b"{"


def _read_raw(path: Path) -> object:
    if _is_safetensors(path):
        from safetensors.torch import load_file

        # load_file returns views of a memory-mapped file; a later in-place
        # overwrite of that file (e.g. `cp`) would then crash with SIGBUS.
        return {key: value.clone() for key, value in load_file(str(path), device="cpu").items()}
    return torch.load(path, weights_only=True, map_location="cpu")


def _unnest(obj: object, path: Path) -> dict[str, object]:
    if not isinstance(obj, Mapping):
        raise ValueError(
            f"weights file {path} holds a {type(obj).__name__}, not a state dict; save "
            "`model.state_dict()` (torch.save or safetensors) instead."
        )
    for key in _STATE_DICT_NESTING_KEYS:
        if isinstance(obj.get(key), Mapping):
            return dict(obj[key])
    return dict(obj)


def _strip_prefixes(state: Mapping[str, object]) -> dict[str, object]:
    # Checkpoints saved from DataParallel / torch.compile wrappers carry these prefixes.
    stripped = {}
    for key, value in state.items():
        for prefix in _PREFIXES_TO_STRIP:
            if key.startswith(prefix):
                key = key[len(prefix) :]
        stripped[key] = value
    return stripped


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a state dict from a ``.safetensors`` or PyTorch file.

    PyTorch files are read with ``torch.load(weights_only=True)`` (no
    arbitrary code execution). A dict nesting the state dict under
    ``"state_dict"`` or ``"model"`` is unwrapped, and ``"module."`` /
    ``"_orig_mod."`` key prefixes are stripped.

    Parameters
    ----------
    path : str or os.PathLike
        Weights file.

    Returns
    -------
    dict[str, torch.Tensor]
        Parameter/buffer name -> CPU tensor.

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    ValueError
        If the file cannot be parsed or does not contain a state dict.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist; check the --weights path.")
    try:
        raw = _read_raw(path)
    except Exception as exc:  # safetensors/pickle raise assorted types for corrupt files
        raise ValueError(
            f"could not read weights file {path}: {type(exc).__name__}: {exc}. Expected a "
            "`.safetensors` file or a `torch.save`d state dict; the file may be truncated."
        ) from exc
    return _only_tensors(_strip_prefixes(_unnest(raw, path)), f"weights file {path}")


def _only_tensors(state: Mapping[str, object], source: str) -> dict[str, torch.Tensor]:
    not_tensors = [key for key, value in state.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise ValueError(
            f"{source} has non-tensor entries {_first(not_tensors)}; expected a state dict "
            "of tensors (optionally nested under 'state_dict' or 'model')."
        )
    return dict(state)  # type: ignore[arg-type]


def _first(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    more = f", ... ({len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
    return f"[{shown}{more}]"


def _fit_problems(model: nn.Module, state: Mapping[str, torch.Tensor]) -> list[str]:
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    mismatched = [
        f"{key}: file {tuple(state[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in expected
        if key in state and state[key].shape != expected[key].shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys {_first(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys {_first(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches {_first(mismatched)}")
    return problems


def load_weights(
    model: nn.Module,
    weights: str | os.PathLike[str] | Mapping[str, torch.Tensor],
    arch: str | None = None,
) -> nn.Module:
    """Load weights into ``model`` strictly, with a readable error on mismatch.

    Parameters
    ----------
    model : torch.nn.Module
        Target model (modified in place).
    weights : path or state dict
        Weights file (see :func:`read_state_dict`) or in-memory state dict.
    arch : str, optional
        Architecture name, used only in error messages.

    Returns
    -------
    torch.nn.Module
        ``model``.

    Raises
    ------
    ValueError
        If keys are missing/unexpected or shapes differ; the message lists the
        first few of each and names the architecture and file.
    """
    state, source = _resolve_state(weights)
    _raise_if_unfit(model, state, arch or type(model).__name__, source)
    model.load_state_dict(state, strict=True)
    return model


def _resolve_state(
    weights: str | os.PathLike[str] | Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], str]:
    """Return ``(state dict, description of its source for error messages)``."""
    if isinstance(weights, Mapping):
        # Copies, because build_model assigns these tensors into the new model:
        # it must never alias (or move to CPU) the caller's tensors.
        state = _only_tensors(_strip_prefixes(weights), "the given state dict")
        return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}, "the given state dict"
    return read_state_dict(weights), f"file {Path(weights).expanduser()}"


def _raise_if_unfit(model: nn.Module, state: Mapping[str, torch.Tensor], arch: str, source: str) -> None:
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"weights in {source} hold NaN/Inf values ({', '.join(bad[:5])}"
                         f"{' ...' if len(bad) > 5 else ''}): refusing non-finite weights; check the training run")
    problems = _fit_problems(model, state)
    if problems:
        raise ValueError(
            f"weights in {source} do not fit architecture {arch!r}: {'; '.join(problems)}. "
            "Check that the model name and --num-classes match the checkpoint."
        )


def _has_meta_tensors(model: nn.Module) -> bool:
    tensors = [*model.parameters(), *model.buffers()]
    return any(tensor.is_meta for tensor in tensors)

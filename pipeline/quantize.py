"""Post-training FP16 and INT8 evaluation of a (compressed) model (paper App. H, Table 16).

FP16
    The whole model is cast with ``model.half()`` and fed float16 inputs, on CUDA and on CPU alike: torch 2.13
    runs float16 Conv2d / BatchNorm2d / Linear / ReLU / pooling natively on CPU (checked: every op of the
    reference ResNet / VGG and of the Tucker-2 / CP / low-rank layers produces float16 outputs), so nothing is
    emulated. Weights, activations and accumulation outputs are float16; only the logits are cast back to float32
    for the top-k count.
INT8
    Post-training static quantization with PyTorch's own FX graph mode (``torch.ao.quantization.quantize_fx``:
    ``prepare_fx`` -> calibration -> ``convert_fx``) and the ``"x86"`` backend (fbgemm + oneDNN; per-channel int8
    weights, per-tensor uint8 activations, observers = histogram/min-max of the default x86 qconfig mapping).
    Quantized kernels only exist on CPU, so INT8 is always evaluated on CPU. torch 2.13 marks
    ``torch.ao.quantization`` deprecated in favour of the separate ``torchao`` package, which is not installed
    here; the deprecated module still ships and works, so it is used and its deprecation warnings are silenced.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from pipeline.evaluate import evaluate

__all__ = ["PRECISIONS", "fp16_model", "int8_model", "evaluate_precisions"]

PRECISIONS = ("fp32", "fp16", "int8")
_INT8_BACKEND = "x86"


class _CastInputs:
    """Loader view that casts the image batches to ``dtype`` (labels untouched)."""

    def __init__(self, loader: Iterable, dtype: torch.dtype):
        self.loader, self.dtype = loader, dtype

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __iter__(self):
        return ((x.to(self.dtype), y) for x, y in self.loader)


class _Float32Logits(nn.Module):
    """Runs a float16 model and returns float32 logits (topk on float16 works, but ties differ from float32)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).float()


def fp16_model(model: nn.Module, device: str = "cpu") -> nn.Module:
    """A float16 copy of ``model`` (weights, buffers and activations) returning float32 logits; input must be fp16."""
    return _Float32Logits(copy.deepcopy(model).to(device).half().eval())


@contextlib.contextmanager
def _quant_engine(engine: str) -> Iterator[None]:
    # The quantized engine is process-global: set it for the conversion/evaluation and restore it afterwards.
    if engine not in torch.backends.quantized.supported_engines:
        raise RuntimeError(f"quantized engine {engine!r} not supported by this torch build "
                           f"(supported: {torch.backends.quantized.supported_engines})")
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.ao")
            warnings.filterwarnings("ignore", message=r".*(deprecated|reduce_range).*")
            yield
    finally:
        torch.backends.quantized.engine = previous


def int8_model(model: nn.Module, calib_loader: Iterable, *, max_calib_batches: int | None = None) -> nn.Module:
    """Post-training static INT8 copy of ``model`` (FX graph mode, x86 backend), calibrated on ``calib_loader``.

    Parameters
    ----------
    model : torch.nn.Module
        Float model; must be symbolically traceable by ``torch.fx`` (the reference and factorized models are).
    calib_loader : iterable of (images, labels)
        Batches used to set the activation ranges (e.g. a few hundred training images).
    max_calib_batches : int, optional
        Stop calibrating after this many batches.

    Returns
    -------
    torch.nn.Module
        Quantized ``GraphModule`` taking float32 CPU inputs and returning float32 logits. Evaluate it inside
        the same process (its kernels use the x86 engine, set by :func:`evaluate_precisions`).
    """
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    float_model = copy.deepcopy(model).cpu().float().eval()
    batches = iter(calib_loader)
    first = next(batches, None)
    if first is None:
        raise ValueError("int8_model() got an empty calibration loader")
    with _quant_engine(_INT8_BACKEND):
        prepared = prepare_fx(float_model, get_default_qconfig_mapping(_INT8_BACKEND), example_inputs=(first[0][:1],))
        with torch.inference_mode():
            prepared(first[0])
            for i, (images, _) in enumerate(batches, start=2):
                if max_calib_batches is not None and i > max_calib_batches:
                    break
                prepared(images)
        return convert_fx(prepared).eval()


def evaluate_precisions(model: nn.Module, loader: Iterable, calib_loader: Iterable, *, device: str = "cpu",
                        precisions: tuple[str, ...] = PRECISIONS, progress: bool = False) -> dict[str, float]:
    """Top-1 (%) of ``model`` at FP32, FP16 and INT8 on ``loader``.

    Parameters
    ----------
    model : torch.nn.Module
        Float32 classifier; not modified.
    loader : iterable of (images, labels)
        Float32 evaluation batches (re-iterated once per precision).
    calib_loader : iterable of (images, labels)
        INT8 calibration batches; should not overlap ``loader`` (use training images).
    device : str, default "cpu"
        Device of the FP32 and FP16 evaluations (INT8 always runs on CPU).
    precisions : tuple of str
        Subset of :data:`PRECISIONS`.
    progress : bool, default False

    Returns
    -------
    dict
        ``{"fp32": top1, "fp16": top1, "int8": top1}`` (only the requested keys).
    """
    unknown = set(precisions) - set(PRECISIONS)
    if unknown:
        raise ValueError(f"unknown precision(s) {sorted(unknown)}; valid: {', '.join(PRECISIONS)}")
    out: dict[str, float] = {}
    if "fp32" in precisions:
        fp32 = copy.deepcopy(model).to(device).float()
        out["fp32"] = evaluate(fp32, loader, device=device, progress=progress, desc="fp32")["top1"]
    if "fp16" in precisions:
        out["fp16"] = evaluate(fp16_model(model, device), _CastInputs(loader, torch.float16), device=device,
                               progress=progress, desc="fp16")["top1"]
    if "int8" in precisions:
        quantized = int8_model(model, calib_loader)
        with _quant_engine(_INT8_BACKEND):
            out["int8"] = evaluate(quantized, _CastInputs(loader, torch.float32), device="cpu", progress=progress,
                                   desc="int8")["top1"]
    return out

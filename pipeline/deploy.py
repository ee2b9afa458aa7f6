"""Deployable models: BatchNorm folded, exported to ONNX (torch's dynamo exporter) and ``torch.export``, verified.

Every layer type the toolkit makes is built from stock ``nn.Conv2d`` / ``nn.Linear`` children, so both exporters
see only standard aten convolutions and matmuls; :func:`export_onnx` runs the exported file in onnxruntime on
the example input (and a second batch size, since the batch axis is exported as dynamic) and refuses a file
whose outputs differ from the torch model's by more than ``atol``.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sigma_core.fold import FoldReport, fold_batchnorm

__all__ = ["ExportResult", "export_onnx", "export_program", "onnx_session", "prepare_for_export"]


@dataclass(frozen=True)
class ExportResult:
    """One exported file and how well it matches the torch model.

    Attributes
    ----------
    path : Path
        The written file.
    size_bytes : int
        Its size on disk.
    max_abs_err : float
        max |exported - torch| over the verification inputs (float32 logits).
    fold : FoldReport or None
        The BatchNorm folding applied before export (None if folding was off).
    """

    path: Path
    size_bytes: int
    max_abs_err: float
    fold: FoldReport | None


def prepare_for_export(model: nn.Module, *, fold_bn: bool = True) -> tuple[nn.Module, FoldReport | None]:
    """An eval-mode float32 CPU copy of ``model``, with BatchNorm folded where exact (``fold_bn``)."""
    import copy

    target = copy.deepcopy(model).float().cpu().eval()
    if not fold_bn:
        return target, None
    folded, report = fold_batchnorm(target, inplace=True)
    return folded, report


def _check_example(example: torch.Tensor) -> torch.Tensor:
    if not isinstance(example, torch.Tensor) or example.dim() < 2 or example.shape[0] < 1:
        raise ValueError("example must be an input batch tensor of shape (B, ...) with B >= 1, "
                         f"got {getattr(example, 'shape', type(example).__name__)}")
    return example.detach().float().cpu()


def _atomic_target(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    return Path(tmp)


def onnx_session(path: str | Path, threads: int | None = None):
    """An onnxruntime CPU ``InferenceSession`` for ``path`` (``threads``: intra-op threads, None = default).

    Raises
    ------
    ImportError
        If onnxruntime is not installed (``uv sync --extra deploy``).
    """
    try:
        import onnxruntime as ort
    except ImportError as exc:  # pragma: no cover -- installed with the deploy extra and the dev group
        raise ImportError("onnxruntime is not installed: install the 'deploy' extra "
                          "(uv sync --extra deploy, or pip install 'sigma-compress[deploy]')") from exc
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def _export_verified(model: nn.Module, example: torch.Tensor, path: str | Path, fold_bn: bool, atol: float,
                     what: str, write) -> ExportResult:
    """Shared by the exporters: prepare, ``write(prepared, example, tmp) -> max abs error``, check, move in place.

    The file is written to a temporary name beside ``path`` and moved there only once verified; anything that
    fails leaves nothing behind and becomes one ValueError naming ``what`` and the model.
    """
    example = _check_example(example)
    prepared, report = prepare_for_export(model, fold_bn=fold_bn)
    path = Path(path)
    tmp = _atomic_target(path)
    try:
        err = write(prepared, example, tmp)
        if not err <= atol:
            raise ValueError(f"the {what} differs from the torch model by {err:.3g} > atol={atol:g}")
        os.replace(tmp, path)
    except Exception as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, ValueError):
            raise
        raise ValueError(f"{what} of {type(model).__name__} failed: {type(exc).__name__}: {exc}") from exc
    return ExportResult(path, path.stat().st_size, err, report)


def _write_onnx(prepared: nn.Module, example: torch.Tensor, tmp: Path) -> float:
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(prepared, (example,), str(tmp), dynamo=True, external_data=False,
                          dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    session = onnx_session(tmp)
    err = 0.0
    for x in (example, torch.cat([example, example[:1]])):
        with torch.no_grad():
            ref = prepared(x).numpy()
        out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        err = max(err, float(abs(out - ref).max()))
    return err


def _write_program(prepared: nn.Module, example: torch.Tensor, tmp: Path) -> float:
    program = torch.export.export(prepared, (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    torch.export.save(program, str(tmp))
    loaded = torch.export.load(str(tmp)).module()
    with torch.no_grad():
        x = torch.cat([example, example[:1]])
        return float((loaded(x) - prepared(x)).abs().max())


def export_onnx(model: nn.Module, example: torch.Tensor, path: str | Path, *, fold_bn: bool = True,
                atol: float = 1e-4) -> ExportResult:
    """Export ``model`` to ONNX with a dynamic batch axis and verify it in onnxruntime.

    Parameters
    ----------
    model : nn.Module
        Any model of the toolkit (dense or compressed); it is copied, not changed.
    example : torch.Tensor
        An input batch (B, C, H, W); verification also runs a batch of ``B + 1``.
    path : str or Path
        Where the ``.onnx`` file goes (written atomically).
    fold_bn : bool
        Fold BatchNorm into the layer before it first (exact; see :mod:`sigma_core.fold`).
    atol : float
        Largest accepted max |onnxruntime - torch| on the logits.

    Raises
    ------
    ValueError
        If the exporter fails (its message is kept) or the exported model disagrees with torch beyond ``atol``.
    """
    return _export_verified(model, example, path, fold_bn, atol, "ONNX export", _write_onnx)


def export_program(model: nn.Module, example: torch.Tensor, path: str | Path, *, fold_bn: bool = True,
                   atol: float = 1e-5) -> ExportResult:
    """``torch.export`` the model (dynamic batch axis), save it as ``.pt2``, reload and verify it.

    Parameters and errors as for :func:`export_onnx`.
    """
    return _export_verified(model, example, path, fold_bn, atol, "torch.export", _write_program)

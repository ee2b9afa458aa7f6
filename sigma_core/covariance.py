"""Per-layer input second moments Sigma = E[u u^T] over im2col patches (paper Proposition 1).

The accumulator is mergeable (``update`` / ``merge`` / ``finalize``) so that partial sums computed on
data shards (threads, Ray actors, GPUs) reduce to exactly the single-pass result.

Conventions (design.md): for a conv with kernel K of shape (T, S, H, W), a patch u has n = S*H*W entries
in the order ``s*H*W + h*W + w`` -- the order of ``F.unfold`` and of the columns of ``K.reshape(T, n)``.
For a linear layer u is the input feature vector. Sigma is the *uncentered* second moment, because
Proposition 1 -- ``mean ||Conv_K(x) - Conv_K~(x)||^2 = ||(K - K~)_(1) Sigma^{1/2}||_F^2`` -- needs it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "SigmaAccumulator",
    "SigmaFactor",
    "SigmaCapture",
    "accumulate_sigma",
    "conv_patches",
    "layer_patches",
    "patch_dim",
    "factor_sigma",
    "validate_sigma",
]

_PAD_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate", "circular": "circular"}


def _conv_pads(conv: nn.Conv2d) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) padding that ``conv`` applies, for int, tuple, 'same' and 'valid'."""
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return (0, 0, 0, 0)
        pads: list[int] = []
        # Same split as torch: the extra pixel of an odd total goes right/bottom.
        for d, k in zip(reversed(conv.dilation), reversed(conv.kernel_size)):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return tuple(pads)  # type: ignore[return-value]
    ph, pw = conv.padding
    return (pw, pw, ph, ph)


def patch_dim(layer: nn.Module) -> int:
    """Dimension n of one patch u for ``layer``: S*H*W for a conv, in_features for a linear layer."""
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1:
            raise ValueError(
                f"grouped conv (groups={layer.groups}): a single Sigma over S*H*W patches does not describe it; "
                "grouped/depthwise convs are out of scope for Sigma-norm decompositions"
            )
        return layer.in_channels * layer.kernel_size[0] * layer.kernel_size[1]
    if isinstance(layer, nn.Linear):
        return layer.in_features
    raise TypeError(f"Sigma is defined for nn.Conv2d and nn.Linear layers, got {type(layer).__name__}")


def conv_patches(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """im2col rows of ``x`` exactly as ``conv`` sees them.

    Parameters
    ----------
    x : torch.Tensor, shape (B, S, H_in, W_in)
    conv : nn.Conv2d
        Its padding (any mode, 'same'/'valid'), stride and dilation are honoured.

    Returns
    -------
    torch.Tensor, shape (B * L, n)
        One patch per row, L output positions per image, n = S*H*W in ``K.reshape(T, n)`` column order.
    """
    if x.dim() != 4 or x.shape[1] != conv.in_channels:
        raise ValueError(f"expected input (B, {conv.in_channels}, H, W) for this conv, got {tuple(x.shape)}")
    pads = _conv_pads(conv)
    mode = _PAD_MODES[conv.padding_mode]
    if any(pads):
        x = F.pad(x, pads, mode=mode) if mode != "constant" else F.pad(x, pads)
    cols = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=0, stride=conv.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def layer_patches(x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """Patches (rows u) of ``layer``'s input ``x``: im2col rows for a conv, feature rows for a linear layer.

    Returns
    -------
    torch.Tensor, shape (num_patches, n)
    """
    if isinstance(layer, nn.Conv2d):
        patch_dim(layer)
        return conv_patches(x, layer)
    if isinstance(layer, nn.Linear):
        if x.shape[-1] != layer.in_features:
            raise ValueError(f"expected input (..., {layer.in_features}) for this linear layer, got {tuple(x.shape)}")
        return x.reshape(-1, layer.in_features)
    raise TypeError(f"Sigma is defined for nn.Conv2d and nn.Linear layers, got {type(layer).__name__}")


class SigmaAccumulator:
    """Mergeable running sums for Sigma = E[u u^T] (and E[u], for the centered option).

    Sums are kept in float64 whatever the compute dtype: with ``compute_dtype=torch.float32`` each batch's
    Gram matrix is formed in float32 (fast on GPUs) and added to the float64 running sum, so rounding error
    does not grow with the number of batches.

    Parameters
    ----------
    n : int
        Patch dimension (S*H*W for a conv, in_features for a linear layer).
    device : torch.device or str
        Where the running sums live.
    compute_dtype : torch.dtype
        dtype of the per-batch ``U^T U`` product (float64 default; float32 for speed).
    """

    def __init__(self, n: int, *, device: torch.device | str = "cpu", compute_dtype: torch.dtype = torch.float64):
        if n < 1:
            raise ValueError(f"patch dimension must be >= 1, got {n}")
        if compute_dtype not in (torch.float64, torch.float32):
            raise ValueError(f"compute_dtype must be torch.float64 or torch.float32, got {compute_dtype}")
        self.n = int(n)
        self.compute_dtype = compute_dtype
        self.gram = torch.zeros(n, n, dtype=torch.float64, device=device)
        self.total = torch.zeros(n, dtype=torch.float64, device=device)
        self.count = 0

    @classmethod
    def for_layer(cls, layer: nn.Module, **kwargs) -> "SigmaAccumulator":
        """Accumulator sized for ``layer`` (nn.Conv2d with groups=1, or nn.Linear)."""
        return cls(patch_dim(layer), **kwargs)

    def update(self, patches: torch.Tensor) -> None:
        """Add patches.

        Parameters
        ----------
        patches : torch.Tensor, shape (m, n)
            One patch per row (see :func:`layer_patches`).
        """
        if patches.dim() != 2 or patches.shape[1] != self.n:
            raise ValueError(f"patches must be (m, {self.n}), got {tuple(patches.shape)}")
        if patches.shape[0] == 0:
            return
        u = patches.detach().to(device=self.gram.device, dtype=self.compute_dtype)
        if self.compute_dtype == torch.float64:
            # addmm_ writes into the running sum: no n x n temporary per batch.
            self.gram.addmm_(u.T, u)
            self.total += u.sum(dim=0)
        else:
            self.gram += (u.T @ u).to(torch.float64)
            # A float64-converting sum cost ~20 % of the update; torch's pairwise float32 sum is accurate
            # enough per batch and is promoted into the float64 total.
            self.total += u.sum(dim=0).to(torch.float64)
        self.count += int(u.shape[0])

    def merge(self, other: "SigmaAccumulator") -> "SigmaAccumulator":
        """Add another accumulator's sums into this one (in place) and return self."""
        if not isinstance(other, SigmaAccumulator) or other.n != self.n:
            raise ValueError(f"can only merge accumulators of the same patch dimension {self.n}")
        self.gram += other.gram.to(self.gram.device)
        self.total += other.total.to(self.total.device)
        self.count += other.count
        return self

    def state_dict(self) -> dict:
        """Plain tensors/ints (picklable, safetensors-friendly) to ship partial sums between processes."""
        return {"n": self.n, "count": self.count, "gram": self.gram, "total": self.total}

    @classmethod
    def from_state_dict(cls, state: dict, *, device: torch.device | str = "cpu") -> "SigmaAccumulator":
        """Inverse of :meth:`state_dict`."""
        acc = cls(int(state["n"]), device=device)
        acc.gram.copy_(state["gram"])
        acc.total.copy_(state["total"])
        acc.count = int(state["count"])
        return acc

    def finalize(self, *, centered: bool = False) -> torch.Tensor:
        """Sigma (float64, shape (n, n)): E[u u^T], or E[(u - mu)(u - mu)^T] if ``centered``."""
        if self.count == 0:
            raise ValueError("no patches were accumulated: feed at least one batch before finalize()")
        sigma = self.gram / self.count
        if centered:
            mu = self.total / self.count
            sigma = sigma - torch.outer(mu, mu)
        # Symmetrize: the float64 sums are symmetric up to summation-order rounding only.
        return 0.5 * (sigma + sigma.T)

    def mean(self) -> torch.Tensor:
        """E[u], float64 shape (n,)."""
        if self.count == 0:
            raise ValueError("no patches were accumulated")
        return self.total / self.count


@dataclass(frozen=True)
class SigmaFactor:
    """Sigma and a square root L with ``L L^T = Sigma + jitter * I``.

    Attributes
    ----------
    sigma : torch.Tensor, shape (n, n), float64
    factor : torch.Tensor, shape (n, n)
        Lower-triangular Cholesky factor (``method == "cholesky"``) or ``V diag(sqrt(max(lambda, 0)))``
        from the eigendecomposition (``method == "eigen"``).
    jitter : float
        Absolute diagonal shift that was needed (0.0 if none).
    method : str
        ``"cholesky"`` or ``"eigen"``.
    min_eig : float or None
        Smallest eigenvalue (only computed on the eigen path).
    """

    sigma: torch.Tensor
    factor: torch.Tensor
    jitter: float
    method: str
    min_eig: float | None = None

    def __post_init__(self) -> None:
        n = self.sigma.shape[0]
        if tuple(self.factor.shape) != (n, n):
            raise ValueError(f"factor must be ({n}, {n}), got {tuple(self.factor.shape)}")


def validate_sigma(sigma: torch.Tensor, n: int | None = None, *, sym_tol: float = 1e-8) -> None:
    """Raise a ValueError that says what is wrong with a candidate Sigma (shape, NaN/Inf, symmetry).

    Positive semi-definiteness is checked by :func:`factor_sigma`, where it costs nothing extra.
    """
    if not isinstance(sigma, torch.Tensor) or sigma.dim() != 2 or sigma.shape[0] != sigma.shape[1]:
        shape = tuple(sigma.shape) if isinstance(sigma, torch.Tensor) else type(sigma).__name__
        raise ValueError(f"Sigma must be a square 2-D tensor, got {shape}")
    if n is not None and sigma.shape[0] != n:
        raise ValueError(
            f"Sigma is {tuple(sigma.shape)} but this layer needs ({n}, {n}) (n = S*H*W of the kernel, or "
            "in_features): was it computed for another layer or model?"
        )
    if not torch.isfinite(sigma).all():
        bad = int((~torch.isfinite(sigma)).sum())
        raise ValueError(f"Sigma contains {bad} NaN/Inf entries: recompute it (check the model's activations)")
    scale = sigma.abs().max()
    asym = (sigma - sigma.T).abs().max()
    if asym > sym_tol * max(float(scale), 1e-300):
        raise ValueError(
            f"Sigma is not symmetric (max |Sigma - Sigma^T| = {float(asym):.3g}, max |Sigma| = {float(scale):.3g})"
        )


def factor_sigma(
    sigma: torch.Tensor,
    *,
    start_jitter: float = 1e-10,
    max_jitter: float = 1e-4,
    psd_tol: float = 1e-8,
) -> SigmaFactor:
    """Square root of Sigma for the Sigma norm ``||E L||_F`` (design.md, "Factor L").

    Tries Cholesky of ``Sigma + eps I`` with ``eps = start_jitter * mean(diag)``, growing 10x up to
    ``max_jitter * mean(diag)``; if that still fails (rank-deficient or barely PSD Sigma) falls back to the
    eigendecomposition, clipping eigenvalues at 0.

    Parameters
    ----------
    sigma : torch.Tensor, shape (n, n)
        Symmetric PSD matrix (float64 recommended).

    Raises
    ------
    ValueError
        If Sigma is malformed (see :func:`validate_sigma`) or has an eigenvalue below
        ``-psd_tol * max_eig`` (not PSD).
    """
    validate_sigma(sigma)
    scale = float(sigma.diagonal().mean())
    if scale <= 0:
        raise ValueError("Sigma has a non-positive mean diagonal: it is zero or not a second-moment matrix")
    eye = torch.eye(sigma.shape[0], dtype=sigma.dtype, device=sigma.device)
    factor, info = torch.linalg.cholesky_ex(sigma)
    if int(info) == 0:
        return SigmaFactor(sigma, factor, 0.0, "cholesky")
    eps = start_jitter * scale
    while eps <= max_jitter * scale * (1 + 1e-12):
        factor, info = torch.linalg.cholesky_ex(sigma + eps * eye)
        if int(info) == 0:
            return SigmaFactor(sigma, factor, eps, "cholesky")
        eps *= 10.0
    return _eigen_factor(sigma, psd_tol)


def _eigen_factor(sigma: torch.Tensor, psd_tol: float) -> SigmaFactor:
    evals, evecs = torch.linalg.eigh(sigma)
    lo, hi = float(evals[0]), float(evals[-1])
    if lo < -psd_tol * max(hi, 1e-300):
        raise ValueError(
            f"Sigma is not positive semi-definite: min eigenvalue {lo:.3g} vs max {hi:.3g}. A second-moment "
            "matrix is PSD by construction; recompute it rather than editing it"
        )
    return SigmaFactor(sigma, evecs * evals.clamp_min(0).sqrt(), 0.0, "eigen", min_eig=lo)


class _StopForward(Exception):
    """Raised by a hook once every captured layer has seen the batch: later layers are not needed."""


class SigmaCapture:
    """Forward pre-hooks that feed each chosen layer's input patches to its accumulator.

    All chosen layers are captured in one forward pass. Used as a context manager; hooks are removed on exit.

    Parameters
    ----------
    model : nn.Module
    layer_names : sequence of str
        Dotted names (as in ``model.named_modules()``) of nn.Conv2d (groups=1) / nn.Linear layers.
    compute_dtype : torch.dtype
        See :class:`SigmaAccumulator`.
    device : torch.device or str, optional
        Where the sums live (default: the layer's weight device).
    stop_early : bool
        Abort the forward pass once all chosen layers have seen the batch (saves the tail of the network).
    """

    def __init__(
        self,
        model: nn.Module,
        layer_names: Sequence[str],
        *,
        compute_dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
        stop_early: bool = True,
    ):
        modules = dict(model.named_modules())
        missing = [name for name in layer_names if name not in modules]
        if missing:
            raise ValueError(f"layers not found in the model: {missing}; available e.g. {list(modules)[1:8]}")
        if not layer_names:
            raise ValueError("layer_names is empty: choose at least one layer")
        self.model = model
        self.layers = {name: modules[name] for name in layer_names}
        self.accumulators = {
            name: SigmaAccumulator.for_layer(
                layer,
                compute_dtype=compute_dtype,
                device=device if device is not None else next(layer.parameters()).device,
            )
            for name, layer in self.layers.items()
        }
        self.stop_early = stop_early
        self._seen: set[str] = set()
        self._handles: list = []

    def __enter__(self) -> "SigmaCapture":
        for name, layer in self.layers.items():
            self._handles.append(layer.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            self.accumulators[name].update(layer_patches(args[0], module))
            self._seen.add(name)
            if self.stop_early and len(self._seen) == len(self.layers):
                raise _StopForward

        return hook

    @torch.inference_mode()
    def feed(self, inputs: torch.Tensor) -> None:
        """Run one batch through the model, accumulating every chosen layer's patches."""
        self._seen = set()
        try:
            self.model(inputs)
        except _StopForward:
            pass
        if len(self._seen) != len(self.layers):
            raise RuntimeError(
                f"layers {sorted(set(self.layers) - self._seen)} were not called in the forward pass: "
                "they cannot get a Sigma (unused modules?)"
            )


def accumulate_sigma(
    model: nn.Module,
    batches: Iterable,
    layer_names: Sequence[str],
    *,
    max_samples: int | None = None,
    device: torch.device | str = "cpu",
    compute_dtype: torch.dtype = torch.float64,
    callback: Callable[[int], None] | None = None,
) -> dict[str, SigmaAccumulator]:
    """Accumulate Sigma sums for several layers of ``model`` in one pass over ``batches``.

    Parameters
    ----------
    model : nn.Module
        Put in eval mode for the pass (BatchNorm uses running statistics), training flag restored after.
    batches : iterable of torch.Tensor (B, C, H, W) or (inputs, labels) tuples
    layer_names : sequence of str
    max_samples : int, optional
        Stop after this many images (the last batch is truncated).
    callback : callable, optional
        Called with the number of images consumed so far after each batch (progress reporting).

    Returns
    -------
    dict of str to SigmaAccumulator
        Unfinalized, so that partial results from shards can still be merged.
    """
    was_training = model.training
    model.eval()
    seen = 0
    try:
        with SigmaCapture(model, layer_names, compute_dtype=compute_dtype) as capture:
            for batch in batches:
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                if max_samples is not None:
                    x = x[: max_samples - seen]
                if x.shape[0] == 0:
                    break
                capture.feed(x.to(device))
                seen += int(x.shape[0])
                if callback is not None:
                    callback(seen)
                if max_samples is not None and seen >= max_samples:
                    break
    finally:
        model.train(was_training)
    if seen == 0:
        raise ValueError("no images were seen: the data source is empty")
    return capture.accumulators

"""Per-layer input second moments Sigma = E[u u^T] over im2col patches (paper Proposition 1).

The accumulator is mergeable (``update`` / ``merge`` / ``finalize``) so that partial sums computed on
data shards (threads, Ray actors, GPUs) reduce to exactly the single-pass result.

Conventions (design.md): for a conv with kernel K of shape (T, S, H, W), a patch u has n = S*H*W entries
in the order ``s*H*W + h*W + w`` -- the order of ``F.unfold`` and of the columns of ``K.reshape(T, n)``.
For a linear layer u is the input feature vector. Sigma is the *uncentered* second moment, because
Proposition 1 -- ``mean ||Conv_K(x) - Conv_K~(x)||^2 = ||(K - K~)_(1) Sigma^{1/2}||_F^2`` -- needs it.

Speed (benchmarks/bench_sigma.py): conv patches are gathered in one copy from an NHWC window view, in
(kh, kw, s) column order, and only the upper block triangle of ``U^T U`` is multiplied; the sums are put back
in (s, kh, kw) order and mirrored whenever they are read, so nothing outside this class sees that layout.
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
    "check_psd",
    "PSD_TOL",
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


def _pad_input(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """``x`` padded as ``conv`` pads it (any padding mode), so that patches are then taken without padding."""
    pads = _conv_pads(conv)
    if not any(pads):
        return x
    mode = _PAD_MODES[conv.padding_mode]
    return F.pad(x, pads, mode=mode) if mode != "constant" else F.pad(x, pads)


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
    cols = F.unfold(_pad_input(x, conv), conv.kernel_size, dilation=conv.dilation, padding=0, stride=conv.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _conv_windows(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """All of ``conv``'s input windows as one strided view, channels innermost.

    Parameters
    ----------
    x : torch.Tensor, shape (B, S, H_in, W_in)

    Returns
    -------
    torch.Tensor, shape (B, H_out, W_out, kh, kw, S)
        A view (no copy) of the padded input in NHWC layout: one copy of it is the patch matrix with columns in
        (kh, kw, s) order, the order in which an NHWC tensor keeps each window's S channels contiguous.
    """
    if x.dim() != 4 or x.shape[1] != conv.in_channels:
        raise ValueError(f"expected input (B, {conv.in_channels}, H, W) for this conv, got {tuple(x.shape)}")
    # NHWC: a no-op when the input already is channels_last.
    xp = _pad_input(x, conv).permute(0, 2, 3, 1).contiguous()
    b, hp, wp, s = xp.shape
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    ho, wo = (hp - dh * (kh - 1) - 1) // sh + 1, (wp - dw * (kw - 1) - 1) // sw + 1
    if ho < 1 or wo < 1:
        raise ValueError(f"input {tuple(x.shape)} is smaller than the dilated kernel of this conv (no output)")
    st = xp.stride()
    return xp.as_strided((b, ho, wo, kh, kw, s), (st[0], st[1] * sh, st[2] * sw, st[1] * dh, st[2] * dw, st[3]))


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


# Column blocks of the block-triangular Gram: k = min(4, n // 288). Blocks narrower than ~288 columns make thin
# GEMMs that run well below peak; k = 4 already does (k + 1) / (2 k) = 62.5 % of the full product's flops
# (benchmarks/README.md, "Sigma accumulation").
_BLOCK_COLS = 288
_MAX_BLOCKS = 4
# float32 compute: patches accumulated in the float32 partial Gram before it is added into the float64 sums.
# Adding an n x n float32 product into float64 after every batch cost 8-25 % of an update; 2^16 rows per
# partial sum is what one large batch's float32 GEMM sums anyway, so accuracy stays at float32 rounding.
_FLUSH_ROWS = 1 << 16


def _block_edges(n: int) -> list[int]:
    """Column-block boundaries ``[0, ..., n]`` of the block-triangular Gram (sizes differ by at most 1)."""
    k = min(_MAX_BLOCKS, max(1, n // _BLOCK_COLS))
    return [round(i * n / k) for i in range(k + 1)]


def _add_upper_gram(gram: torch.Tensor, u: torch.Tensor, edges: Sequence[int]) -> None:
    """``gram[I, e_i:] += u[:, I]^T u[:, e_i:]`` for every column block I = [e_i, e_{i+1}).

    Each block row from its diagonal block on: the upper block triangle of ``u^T u`` (a SYRK done with k
    GEMMs, which torch lacks). ``gram`` : (n, n), ``u`` : (m, n); both in the same column order.
    """
    for lo, hi in zip(edges[:-1], edges[1:]):
        gram[lo:hi, lo:].addmm_(u[:, lo:hi].T, u[:, lo:])


def _add_upper(dst: torch.Tensor, src: torch.Tensor, edges: Sequence[int]) -> None:
    """``dst += src`` on the upper block triangle only (the part :func:`_add_upper_gram` writes), shape (n, n)."""
    for lo, hi in zip(edges[:-1], edges[1:]):
        dst[lo:hi, lo:] += src[lo:hi, lo:]


def _mirror_upper(gram: torch.Tensor, edges: Sequence[int]) -> torch.Tensor:
    """Full symmetric matrix (a new tensor) from the upper triangle of ``gram``, shape (n, n).

    Exactly symmetric by construction: every entry below the diagonal is a copy of its mirror above it. The
    diagonal blocks are not symmetric to the last bit (BLAS may sum ``u_i u_j`` and ``u_j u_i`` in different orders,
    as AMD's kernels do), so they are mirrored too rather than trusted. ``edges`` is kept for the callers' layout:
    the upper block triangle written by :func:`_add_upper_gram` contains the whole upper triangle.
    """
    del edges
    return torch.triu(gram) + torch.triu(gram, 1).T


def _swap_order(t: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """Reindex every axis of ``t`` (shape (n,) or (n, n), n = a*b) from (a, b) order to (b, a) order (a copy)."""
    if t.dim() == 1:
        return t.reshape(a, b).T.reshape(a * b)
    return t.reshape(a, b, a, b).permute(1, 0, 3, 2).reshape(a * b, a * b)


def _column_sums(u: torch.Tensor) -> torch.Tensor:
    """Column sums of ``u`` (m, n) in its dtype, shape (n,).

    float64: a GEMV with a ones vector, 2-2.5x faster than ``sum(dim=0)`` at the same accuracy. float32: torch's
    cascade ``sum`` -- a float32 GEMV accumulates ~100x more rounding (~3e-6 vs ~3e-8 relative on real patches),
    which the centered Sigma (``E[uu^T] - mu mu^T``) would inherit, for ~1 % of an update.
    """
    if u.dtype == torch.float64:
        return torch.mv(u.T, torch.ones(u.shape[0], dtype=u.dtype, device=u.device))
    return u.sum(dim=0)


def _kernel_of(layer: nn.Module) -> tuple[int, int, int] | None:
    """(S, kh, kw) of a conv with a spatial kernel (the accumulator's internal patch order); None otherwise."""
    if isinstance(layer, nn.Conv2d) and layer.kernel_size[0] * layer.kernel_size[1] > 1:
        return (layer.in_channels, *layer.kernel_size)
    return None


class SigmaAccumulator:
    """Mergeable running sums for Sigma = E[u u^T] (and E[u], for the centered option).

    Sums are kept in float64 whatever the compute dtype. With ``compute_dtype=torch.float32`` the Gram products
    are formed in float32 (fast on GPUs) into a float32 partial sum that is added into the float64 sum every
    2^16 patches and before any read (``gram``, ``state_dict``, ``merge``, ``finalize``), so rounding error does
    not grow with the number of batches.

    Internally only the upper block triangle of ``sum u u^T`` is computed (see :func:`_add_upper_gram`) and,
    for a conv with a spatial kernel (``kernel`` given, as :meth:`for_layer` does), columns are kept in
    (kh, kw, s) order so that patches can be gathered in one copy from an NHWC view (:meth:`update_input`).
    Everything read from outside -- ``gram``, ``total``, :meth:`state_dict`, :meth:`finalize` -- is full,
    symmetric and in the (s, kh, kw) order of ``K.reshape(T, n)``, the same format older versions stored.

    Parameters
    ----------
    n : int
        Patch dimension (S*H*W for a conv, in_features for a linear layer).
    device : torch.device or str
        Where the running sums live.
    compute_dtype : torch.dtype
        dtype of the per-batch ``U^T U`` product (float64 default; float32 for speed).
    kernel : (S, kh, kw), optional
        Kernel shape of the conv the patches come from (S*kh*kw = n); enables the (kh, kw, s) internal order.
    """

    def __init__(self, n: int, *, device: torch.device | str = "cpu", compute_dtype: torch.dtype = torch.float64,
                 kernel: tuple[int, int, int] | None = None):
        if n < 1:
            raise ValueError(f"patch dimension must be >= 1, got {n}")
        if compute_dtype not in (torch.float64, torch.float32):
            raise ValueError(f"compute_dtype must be torch.float64 or torch.float32, got {compute_dtype}")
        if kernel is not None and kernel[0] * kernel[1] * kernel[2] != n:
            raise ValueError(f"kernel {tuple(kernel)} does not have n = {n} entries")
        self.n = int(n)
        self.compute_dtype = compute_dtype
        # With a 1x1 kernel (kh, kw, s) order is (s) order: nothing to reorder.
        self._kernel = tuple(int(k) for k in kernel) if kernel is not None and kernel[1] * kernel[2] > 1 else None
        self._edges = _block_edges(self.n)
        self._gram = torch.zeros(n, n, dtype=torch.float64, device=device)  # internal order, upper blocks only
        # float32 partial sums not yet in _gram (float32 compute). Allocated here, not lazily: a first update
        # under torch.inference_mode (SigmaCapture) would make it an inference tensor that the in-place flush
        # outside that mode may not touch.
        self._gram32 = (torch.zeros(n, n, dtype=torch.float32, device=device)
                        if compute_dtype == torch.float32 else None)
        self._pending = 0  # patches in _gram32
        self._total = torch.zeros(n, dtype=torch.float64, device=device)  # internal order
        self.count = 0

    @classmethod
    def for_layer(cls, layer: nn.Module, **kwargs) -> "SigmaAccumulator":
        """Accumulator sized for ``layer`` (nn.Conv2d with groups=1, or nn.Linear)."""
        return cls(patch_dim(layer), kernel=_kernel_of(layer), **kwargs)

    @property
    def device(self) -> torch.device:
        """Where the running sums live."""
        return self._gram.device

    # ------------------------------------------------------------------ order conversions
    def _to_internal(self, t: torch.Tensor) -> torch.Tensor:
        """(s, kh, kw)-ordered (n,) or (n, n) tensor in the internal order (a copy unless already internal)."""
        if self._kernel is None:
            return t
        s, kh, kw = self._kernel
        return _swap_order(t, s, kh * kw)

    def _to_canonical(self, t: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`_to_internal` (always a new tensor)."""
        if self._kernel is None:
            return t.clone()
        s, kh, kw = self._kernel
        return _swap_order(t, kh * kw, s)

    # ------------------------------------------------------------------ accumulation
    def update(self, patches: torch.Tensor) -> None:
        """Add patches.

        Parameters
        ----------
        patches : torch.Tensor, shape (m, n)
            One patch per row in (s, kh, kw) order (see :func:`layer_patches`).
        """
        if patches.dim() != 2 or patches.shape[1] != self.n:
            raise ValueError(f"patches must be (m, {self.n}), got {tuple(patches.shape)}")
        if patches.shape[0] == 0:
            return
        p = patches.detach().to(self.device)
        if self._kernel is None:
            self._add_rows(p.to(self.compute_dtype))
            return
        s, kh, kw = self._kernel
        u = torch.empty((p.shape[0], kh * kw, s), dtype=self.compute_dtype, device=self.device)
        u.copy_(p.reshape(-1, s, kh * kw).transpose(1, 2))  # reorder and convert in one copy
        self._add_rows(u.view(-1, self.n))

    def update_input(self, x: torch.Tensor, layer: nn.Module) -> None:
        """Add the patches of ``layer``'s input ``x``: same sums as ``update(layer_patches(x, layer))``, faster.

        For a conv whose kernel matches this accumulator's the patch matrix is gathered in one copy (with the
        dtype conversion) from an NHWC window view, instead of pad + unfold + transpose + convert.

        Parameters
        ----------
        x : torch.Tensor
            (B, S, H_in, W_in) for a conv, (..., in_features) for a linear layer.
        layer : nn.Conv2d or nn.Linear
        """
        # The gather yields (kh, kw, s) columns: usable when that is the internal order (or kh = kw = 1).
        if not isinstance(layer, nn.Conv2d) or _kernel_of(layer) != self._kernel:
            self.update(layer_patches(x, layer))
            return
        if patch_dim(layer) != self.n:  # also rejects grouped convs
            raise ValueError(f"this conv has patches of dimension {patch_dim(layer)}, the accumulator {self.n}")
        windows = _conv_windows(x.detach().to(self.device), layer)
        u = torch.empty(windows.shape, dtype=self.compute_dtype, device=self.device)
        u.copy_(windows)  # the gather and the dtype conversion in one pass
        self._add_rows(u.view(-1, self.n))

    def _add_rows(self, u: torch.Tensor) -> None:
        """Add rows ``u`` (m, n) in internal order and compute dtype to the sums."""
        if self.compute_dtype == torch.float64:
            _add_upper_gram(self._gram, u, self._edges)
        else:
            _add_upper_gram(self._gram32, u, self._edges)
            self._pending += int(u.shape[0])
            if self._pending >= _FLUSH_ROWS:
                self._flush()
        self._total += _column_sums(u)
        self.count += int(u.shape[0])

    def _flush(self) -> None:
        """Move the float32 partial Gram into the float64 sums."""
        if self._pending:
            _add_upper(self._gram, self._gram32, self._edges)
            self._gram32.zero_()
            self._pending = 0

    # ------------------------------------------------------------------ reading, merging, shipping
    @property
    def gram(self) -> torch.Tensor:
        """sum u u^T: float64 (n, n), full, symmetric, in (s, kh, kw) order.

        A new tensor each time (mirrored and reordered from the internal sums): writing to it changes nothing.
        """
        self._flush()
        return self._to_canonical(_mirror_upper(self._gram, self._edges))

    @property
    def total(self) -> torch.Tensor:
        """sum u: float64 (n,), (s, kh, kw) order. A new tensor."""
        return self._to_canonical(self._total)

    def merge(self, other: "SigmaAccumulator") -> "SigmaAccumulator":
        """Add another accumulator's sums into this one (in place) and return self."""
        if not isinstance(other, SigmaAccumulator) or other.n != self.n:
            raise ValueError(f"can only merge accumulators of the same patch dimension {self.n}")
        if other._kernel == self._kernel:  # same internal layout (block edges depend on n only)
            other._flush()
            _add_upper(self._gram, other._gram.to(self.device), self._edges)
            self._total += other._total.to(self.device)
            self.count += other.count
            return self
        return self._add_sums(other.gram, other.total, other.count)

    def _add_sums(self, gram: torch.Tensor, total: torch.Tensor, count: int) -> "SigmaAccumulator":
        """Add full (s, kh, kw)-ordered sums (the :meth:`state_dict` format) into this accumulator."""
        if tuple(gram.shape) != (self.n, self.n) or tuple(total.shape) != (self.n,):
            raise ValueError(f"sums must be gram ({self.n}, {self.n}) and total ({self.n},), "
                             f"got {tuple(gram.shape)} and {tuple(total.shape)}")
        gram = gram.to(device=self.device, dtype=torch.float64)
        _add_upper(self._gram, self._to_internal(gram), self._edges)
        self._total += self._to_internal(total.to(device=self.device, dtype=torch.float64))
        self.count += int(count)
        return self

    def state_dict(self) -> dict:
        """Plain tensors/ints (picklable, safetensors-friendly) to ship partial sums between processes.

        Returns
        -------
        dict
            ``{"n": int, "count": int, "gram": (n, n) float64, "total": (n,) float64}``, full and in (s, kh, kw)
            order whatever the internal layout: the format of every version so far, so states from older code
            load and merge, and ``merge_states``-style elementwise sums of states stay valid.
        """
        return {"n": self.n, "count": self.count, "gram": self.gram, "total": self.total}

    @classmethod
    def from_state_dict(cls, state: dict, *, device: torch.device | str = "cpu", **kwargs) -> "SigmaAccumulator":
        """Inverse of :meth:`state_dict`; ``kwargs`` (``compute_dtype``, ``kernel``) go to the constructor."""
        acc = cls(int(state["n"]), device=device, **kwargs)
        return acc._add_sums(torch.as_tensor(state["gram"]), torch.as_tensor(state["total"]), int(state["count"]))

    def finalize(self, *, centered: bool = False) -> torch.Tensor:
        """Sigma (float64, shape (n, n)): E[u u^T], or E[(u - mu)(u - mu)^T] if ``centered``."""
        if self.count == 0:
            raise ValueError("no patches were accumulated: feed at least one batch before finalize()")
        sigma = self.gram / self.count
        if centered:
            mu = self.total / self.count
            sigma = sigma - torch.outer(mu, mu)
        # Symmetrize: the diagonal blocks are symmetric up to summation-order rounding only.
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


# Relative tolerance of the PSD check: eigenvalues down to -PSD_TOL * lambda_max pass (rounding of a Gram summed
# in float32 chunks stays far below; an edited or wrongly shrunk Sigma is far above).
PSD_TOL = 1e-6


def check_psd(sigma: torch.Tensor, *, tol: float = PSD_TOL) -> None:
    """Raise a ValueError unless Sigma is positive semi-definite to ``tol``: ``lambda_min >= -tol * lambda_max``.

    Cheap: one Cholesky of ``Sigma + tol * max(diag) * I`` (O(n^3 / 3), less than one ALS sweep) proves it in the
    usual case, since ``max(diag) <= lambda_max``; only when that fails are the eigenvalues computed to decide.
    An indefinite Sigma makes every Sigma-norm error meaningless (``||E L||_F^2`` can be negative, e.g. 0
    reported for Sigma = -I), so the decompositions refuse it.

    Parameters
    ----------
    sigma : torch.Tensor, shape (n, n)
        Symmetric (checked by :func:`validate_sigma` first).
    tol : float
        Relative tolerance, default :data:`PSD_TOL`.
    """
    diag = sigma.diagonal()
    fix = ("a second moment E[u u^T] is PSD by construction: recompute it from the layer's inputs "
           "(sigma_core.accumulate_sigma / compute_sigmas) instead of editing it, or clip its negative eigenvalues "
           "if it comes from a shrinkage or transfer step")
    if bool((diag < 0).any()):
        raise ValueError(f"Sigma is not positive semi-definite: {int((diag < 0).sum())} negative diagonal "
                         f"entries (min {float(diag.min()):.3g}); {fix}")
    scale = float(diag.max())
    if scale == 0.0:
        if bool((sigma != 0).any()):
            raise ValueError(f"Sigma is not positive semi-definite: zero diagonal but non-zero entries; {fix}")
        return  # Sigma = 0 (a layer whose inputs are all zero) is PSD
    eye = torch.eye(sigma.shape[0], dtype=sigma.dtype, device=sigma.device)
    _, info = torch.linalg.cholesky_ex(sigma + tol * scale * eye)
    if int(info) == 0:
        return
    evals = torch.linalg.eigvalsh(sigma)
    lo, hi = float(evals[0]), float(evals[-1])
    if lo < -tol * max(hi, 0.0):
        raise ValueError(f"Sigma is not positive semi-definite: min eigenvalue {lo:.3g} vs max {hi:.3g} "
                         f"(tolerance {tol:g} * max); {fix}")


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
            self.accumulators[name].update_input(args[0], module)
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

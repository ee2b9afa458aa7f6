"""Shared helpers for the benchmark scripts (not a test module, not part of the package).

Import this module only *after* setting ``OMP_WAIT_POLICY`` (each script does that on its first lines):
it imports torch.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gzip
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # allow `python benchmarks/bench_x.py` without installing the package
    sys.path.insert(0, str(REPO))

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
FMNIST_MEAN, FMNIST_STD = 0.2860, 0.3530


# ----------------------------------------------------------------------------------------------- setup
def owned_cores() -> int:
    """CPU cores this process may run on (affinity mask), falling back to os.cpu_count()."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="default: cuda if available, else cpu")
    p.add_argument("--quick", action="store_true", help="smaller problem set (smoke run, a few minutes)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: cores owned)")
    return p


def setup(args: argparse.Namespace) -> torch.device:
    """Threads + device. Returns the torch.device to use."""
    torch.set_num_threads(args.threads or owned_cores())
    name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but torch.cuda.is_available() is False")
    return torch.device(name)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn: Callable[[], object], device: torch.device, *, repeats: int = 3, warmup: int = 1) -> float:
    """Best-of-``repeats`` wall time of ``fn()`` in seconds (synchronizing CUDA around each call).

    Best-of (not mean) because the CPU machines these run on are shared: the minimum is the least disturbed run.
    """
    for _ in range(warmup):
        fn()
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def machine_header(device: torch.device) -> str:
    """A few lines describing where and when the benchmark ran."""
    lines = [f"date: {_dt.datetime.now().astimezone().isoformat(timespec='seconds')}"]
    model = platform.processor() or "?"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
                break
    except (OSError, subprocess.SubprocessError):
        pass
    lines.append(f"cpu: {model}; cores owned: {owned_cores()}; torch threads: {torch.get_num_threads()}; "
                 f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    try:
        lines.append("load average at start (1/5/15 min): " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    except OSError:
        pass
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        lines.append(f"gpu: {props.name}, {props.total_memory / 2**30:.0f} GiB; "
                     f"allow_tf32(matmul)={torch.backends.cuda.matmul.allow_tf32}")
    lines.append(f"device: {device}; torch {torch.__version__}; python {platform.python_version()}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- data
def load_fashion_mnist(count: int, *, size: int = 128, path: Path = FASHION_MNIST, offset: int = 0) -> torch.Tensor:
    """``count`` real Fashion-MNIST training images as a normalized float32 tensor (count, 3, size, size).

    Raw IDX gz: 16-byte header (magic, count, rows, cols; big-endian int32) then uint8 28x28 images.
    Grey is replicated to 3 channels and resized bilinearly (no download, no torchvision dataset class).
    """
    with gzip.open(path, "rb") as f:
        header = f.read(16)
        magic, total, rows, cols = np.frombuffer(header, dtype=">i4")
        if magic != 2051:
            raise ValueError(f"{path}: not an IDX image file (magic {magic})")
        if offset + count > total:
            raise ValueError(f"{path} has {total} images, asked for {offset}+{count}")
        f.seek(16 + offset * rows * cols)
        raw = f.read(count * rows * cols)
    x = torch.from_numpy(np.frombuffer(raw, dtype=np.uint8).reshape(count, 1, rows, cols).copy())
    x = x.float().div_(255.0)
    if size != rows:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x - FMNIST_MEAN) / FMNIST_STD
    return x.expand(-1, 3, -1, -1).contiguous()


def batches(x: torch.Tensor, batch_size: int):
    for i in range(0, x.shape[0], batch_size):
        yield x[i: i + batch_size]


# ----------------------------------------------------------------------------------------------- real Sigma
# The 3x3 convs of torchvision's resnet18 whose own kernels and input Sigma the decomposition benchmarks use.
RESNET18_CONV2 = {64: "layer1.0.conv2", 128: "layer2.0.conv2", 256: "layer3.0.conv2", 512: "layer4.0.conv2"}


class RealSigma(NamedTuple):
    """One layer's kernel and real-activation Sigma."""

    name: str  # module name in resnet18
    kernel: torch.Tensor  # (T, S, H, W), float64, on the CPU
    sigma: torch.Tensor  # (S*H*W, S*H*W), float64
    patches: int  # patches accumulated into Sigma
    images: int  # images they came from


def recalibrate_bn(model: torch.nn.Module, images: torch.Tensor, batch: int) -> None:
    """Set every BatchNorm's running statistics to the data's (cumulative average over ``images``).

    With random init the running stats are (mean 0, var 1), which on real images leaves dead ReLU channels
    (rank-deficient Sigma) and drifting activation scales; calibrated BN behaves like a trained network's.
    """
    for mod in model.modules():
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
            mod.reset_running_stats()
            mod.momentum = None
    model.train()
    with torch.no_grad():
        for b in batches(images, batch):
            model(b)
    model.eval()


def reference_model(device: torch.device, *, bn_images: int = 0, image_size: int = 128,
                    batch: int = 100) -> torch.nn.Module:
    """torchvision ``resnet18(weights=None)`` with seed 0 (nothing downloaded), in eval mode on ``device``.

    ``bn_images > 0`` recalibrates BatchNorm on that many Fashion-MNIST images from index 50000 on (disjoint from
    the images Sigma is accumulated over, which start at 0).
    """
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).to(device).eval()
    if bn_images > 0:
        recalibrate_bn(model, load_fashion_mnist(bn_images, size=image_size, offset=50000).to(device), batch)
    return model


def capture_sigmas(model: torch.nn.Module, images_per_layer: Mapping[str, int], *, image_size: int = 128,
                   batch: int = 100, device: torch.device) -> tuple[dict[str, RealSigma], dict[str, float]]:
    """Real Sigma (float64) of the named conv layers of ``model`` on the first Fashion-MNIST training images.

    Layers that ask for the same image count share one pass (``accumulate_sigma``); passes run in increasing
    image count. Returns ``{layer name: RealSigma}`` and ``{pass description: seconds}``.
    """
    from sigma_core import accumulate_sigma

    x = load_fashion_mnist(max(images_per_layer.values()), size=image_size)
    modules = dict(model.named_modules())
    out, timings = {}, {}
    for count in sorted(set(images_per_layer.values())):
        names = [name for name, k in images_per_layer.items() if k == count]
        sync(device)
        t0 = time.perf_counter()
        accs = accumulate_sigma(model, batches(x[:count], batch), names, device=device, compute_dtype=torch.float64,
                                callback=lambda seen, k=count: log(f"  Sigma: {seen}/{k} images")
                                if seen % 500 == 0 else None)
        sync(device)
        timings[f"{'+'.join(names)} ({count} images)"] = time.perf_counter() - t0
        for name in names:
            kernel = modules[name].weight.detach().to(device="cpu", dtype=torch.float64)
            out[name] = RealSigma(name, kernel, accs[name].finalize(), accs[name].count, count)
    return out, timings


def resnet18_sigmas(images_per_channels: Mapping[int, int], *, bn_images: int = 0, image_size: int = 128,
                    batch: int = 100, device: torch.device,
                    cache: str | None = None) -> tuple[dict[int, RealSigma], dict[str, float]]:
    """Kernel and real Sigma of resnet18's ``RESNET18_CONV2`` layers, keyed by channel count.

    Parameters
    ----------
    images_per_channels : {channels: images}
        Which layers (64, 128, 256, 512 channels) and how many images each one's Sigma is accumulated over.
    bn_images : int
        BatchNorm recalibration images (0: keep the init statistics), see :func:`reference_model`.
    cache : str, optional
        ``torch.save`` file: loaded when its settings match, else written after computing.

    Returns
    -------
    sigmas : {channels: RealSigma}
    timings : {step: seconds}
    """
    key = [sorted(images_per_channels.items()), image_size, bn_images]
    if cache and os.path.exists(cache):
        blob = torch.load(cache)
        if blob["key"] == key:
            log(f"Sigma loaded from {cache}")
            return {int(c): RealSigma(*v) for c, v in blob["sigmas"].items()}, {"(loaded from cache)": 0.0}
    t0 = time.perf_counter()
    model = reference_model(device, bn_images=bn_images, image_size=image_size, batch=batch)
    timings = {"bn_calibration": time.perf_counter() - t0} if bn_images > 0 else {}
    per_layer = {RESNET18_CONV2[c]: k for c, k in images_per_channels.items()}
    by_name, pass_timings = capture_sigmas(model, per_layer, image_size=image_size, batch=batch, device=device)
    sigmas = {c: by_name[RESNET18_CONV2[c]] for c in images_per_channels}
    if cache:
        torch.save({"key": key, "sigmas": {c: list(v) for c, v in sigmas.items()}}, cache)
    return sigmas, {**timings, **pass_timings}


# ----------------------------------------------------------------------------------------------- capped solver runs
class TimeUp(Exception):
    """Raised from a solver callback to stop a run at its wall-clock cap."""


@dataclass
class SigmaRun:
    """History of one Sigma-solver run (``tucker2_als_sigma``, ``cp_als_sigma``), recorded by its callback."""

    label: str
    times: list[float] = field(default_factory=list)  # seconds since the call, at each recorded error
    errors: list[float] = field(default_factory=list)
    info: dict = field(default_factory=dict)
    capped: bool = False
    converged: bool = False
    seconds: float = 0.0

    @property
    def final(self) -> float:
        return self.errors[-1]

    @property
    def sweeps(self) -> int:
        return len(self.errors) - 1

    def time_to(self, target: float) -> float | None:
        """First recorded time at which the error was <= ``target``."""
        return next((t for t, e in zip(self.times, self.errors) if e <= target), None)

    @property
    def sweep_seconds(self) -> float | None:
        s = self.info.get("sweep_seconds", [])[: self.sweeps]
        return statistics.median(s) if s else None

    @property
    def cg_per_sweep(self) -> float | None:
        c = self.info.get("cg_iters", [])[: self.sweeps]
        return sum(c) / len(c) if c else None

    def monotone(self) -> bool:
        return all(b <= a * (1 + 1e-12) for a, b in zip(self.errors, self.errors[1:]))


def run_capped(label: str, solve: Callable[[Callable[[int, float, dict], None]], object], *, cap: float,
               max_iter: int, device: torch.device) -> SigmaRun:
    """Run ``solve(callback)`` recording (time, error) at every callback; stop once ``cap`` seconds have passed.

    ``solve`` calls a Sigma solver with ``callback=callback`` and returns its result (with ``converged`` and
    ``info``). The callback raises :class:`TimeUp` past the cap (unless the last sweep, ``max_iter``, is done);
    the history up to then is kept and ``capped`` is set.
    """
    run = SigmaRun(label)
    sync(device)
    t0 = time.perf_counter()

    def callback(sweep: int, err: float, info: dict) -> None:
        sync(device)
        now = time.perf_counter() - t0
        run.times.append(now)
        run.errors.append(err)
        run.info = info
        if now > cap and sweep < max_iter:
            run.capped = True
            raise TimeUp

    try:
        res = solve(callback)
        run.converged, run.info = res.converged, res.info
    except TimeUp:
        pass
    sync(device)
    run.seconds = time.perf_counter() - t0
    return run


# ----------------------------------------------------------------------------------------------- tables
def fmt_t(v: float | None) -> str:
    """Seconds: 3 decimals below 10 s, 1 above; ``-`` for None."""
    return "-" if v is None else (f"{v:.3f}" if v < 10 else f"{v:.1f}")



def fmt(v, spec: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and (v != v):
        return "nan"
    if isinstance(v, str):
        return v
    return format(v, spec) if spec else str(v)


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], *, title: str | None = None) -> str:
    """Plain-text table, right-aligned columns (first column left-aligned)."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = []
    if title:
        out.append(title)
    out.append(line(headers))
    out.append("  ".join("-" * w for w in widths))
    out.extend(line(r) for r in rows)
    return "\n".join(out)


def log(*parts) -> None:
    """Progress messages go to stderr so that stdout holds only the result tables."""
    print(*parts, file=sys.stderr, flush=True)

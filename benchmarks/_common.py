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
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

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


# ----------------------------------------------------------------------------------------------- tables
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

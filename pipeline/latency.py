"""Measured inference latency: fixed threads, warm-up, median and spread of N timed runs, per batch size.

Timing is wall clock (``time.perf_counter``; on CUDA, synchronized before and after each run) of one forward pass
under ``torch.inference_mode``. Several models are best measured with :func:`measure_many`, which interleaves
them run by run, so that a change in the machine's load hits every model alike and the speed-up ratios stay
meaningful on a shared machine.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["LatencyConfig", "LatencyStats", "measure_latency", "measure_many", "onnx_runner", "torch_runner"]


@dataclass(frozen=True)
class LatencyConfig:
    """How latency is measured.

    Attributes
    ----------
    threads : int
        Intra-op threads for torch and onnxruntime during the measurement (restored afterwards).
    batch_sizes : tuple of int
        One measurement per batch size.
    warmup : int
        Untimed runs first (allocator, caches, lazy init).
    runs : int
        Timed runs; the median and the interquartile range are reported.
    device : str
        ``"cpu"`` or ``"cuda"``/``"cuda:N"`` (torch runners only).
    """

    threads: int = 2
    batch_sizes: tuple[int, ...] = (1, 64)
    warmup: int = 5
    runs: int = 30
    device: str = "cpu"
    seed: int = field(default=0)

    def __post_init__(self) -> None:
        if not isinstance(self.threads, int) or self.threads < 1:
            raise ValueError(f"threads must be an int >= 1, got {self.threads!r}")
        if not self.batch_sizes or any(not isinstance(b, int) or b < 1 for b in self.batch_sizes):
            raise ValueError(f"batch_sizes must be ints >= 1, got {self.batch_sizes!r}")
        if self.warmup < 0 or self.runs < 3:
            raise ValueError(f"need warmup >= 0 and runs >= 3, got warmup={self.warmup}, runs={self.runs}")
        check_device(self.device)


@dataclass(frozen=True)
class LatencyStats:
    """Latency of one model at one batch size, in milliseconds per forward pass."""

    batch_size: int
    median_ms: float
    p25_ms: float
    p75_ms: float
    runs: int

    @property
    def iqr_ms(self) -> float:
        return self.p75_ms - self.p25_ms


def check_device(device: str) -> torch.device:
    """``device`` as a torch.device, or a ValueError saying it is not present here."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"unknown device {device!r}: use 'cpu' or 'cuda[:N]'") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} is not present on this machine (torch.cuda.is_available() is "
                             "False): measure latency with device='cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} is not present: this machine has {torch.cuda.device_count()} GPU(s)")
    elif dev.type != "cpu":
        raise ValueError(f"latency is measured on 'cpu' or 'cuda' only, got {device!r}")
    return dev


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


Runner = Callable[[torch.Tensor], object]


def torch_runner(model: nn.Module, device: str = "cpu") -> Runner:
    """A callable timing one forward pass of an eval-mode copy-free ``model`` on ``device``."""
    dev = check_device(device)
    model = model.to(dev).eval()
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def run(x: torch.Tensor) -> None:
        x = x.to(dev)
        sync()
        with torch.inference_mode():
            model(x)
        sync()

    return run


def onnx_runner(path, threads: int) -> Runner:
    """A callable running the ONNX file ``path`` in onnxruntime (CPU, ``threads`` intra-op threads)."""
    from pipeline.deploy import onnx_session

    session = onnx_session(path, threads=threads)
    name = session.get_inputs()[0].name

    def run(x: torch.Tensor) -> None:
        session.run(None, {name: x.numpy()})

    return run


def measure_many(runners: Mapping[str, Runner], input_shape: Sequence[int],
                 config: LatencyConfig = LatencyConfig()) -> dict[str, list[LatencyStats]]:
    """Interleaved latency of several runners on the same random inputs.

    Parameters
    ----------
    runners : mapping of str to callable
        Name -> ``run(x)``, e.g. from :func:`torch_runner` / :func:`onnx_runner`.
    input_shape : sequence of int
        One sample's shape, e.g. ``(1, 28, 28)``; the batch axis is added per batch size.
    config : LatencyConfig

    Returns
    -------
    dict
        Name -> one :class:`LatencyStats` per batch size, in ``config.batch_sizes`` order.
    """
    if not runners:
        raise ValueError("runners is empty: give at least one model to measure")
    gen = torch.Generator().manual_seed(config.seed)
    out: dict[str, list[LatencyStats]] = {name: [] for name in runners}
    with _threads(config.threads):
        for batch in config.batch_sizes:
            x = torch.rand((batch, *input_shape), generator=gen)
            times: dict[str, list[float]] = {name: [] for name in runners}
            for _ in range(config.warmup):
                for run in runners.values():
                    run(x)
            for _ in range(config.runs):
                for name, run in runners.items():
                    start = time.perf_counter()
                    run(x)
                    times[name].append((time.perf_counter() - start) * 1e3)
            for name, samples in times.items():
                q1, q2, q3 = statistics.quantiles(samples, n=4, method="inclusive")
                out[name].append(LatencyStats(batch, q2, q1, q3, len(samples)))
    return out


def measure_latency(model: nn.Module, input_shape: Sequence[int],
                    config: LatencyConfig = LatencyConfig()) -> list[LatencyStats]:
    """Latency of one torch model (see :func:`measure_many`)."""
    return measure_many({"model": torch_runner(model, config.device)}, input_shape, config)["model"]

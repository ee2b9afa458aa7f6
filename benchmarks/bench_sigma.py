"""Sigma accumulation: the ported SigmaAccumulator vs the old algorithm, and vs the machine's GEMM rate.

    python benchmarks/bench_sigma.py [--device cpu|cuda] [--quick] [--inputs random|fmnist] [--no-profile]

For 3x3 convs with n = S*3*3 in {576, 1152, 2304, 4608}, in float64 and float32 compute dtype, times side by side
in one run (interleaved, so both see the same load):

* legacy: ``LegacyAccumulator.update(conv_patches(x, conv))`` -- a verbatim copy of the accumulator as it was before
  the port (pad + unfold + transpose copy + dtype copy, full Gram GEMM, float32 products added per batch);
* new: ``SigmaAccumulator.for_layer(conv).update_input(x, conv)`` -- what SigmaCapture / accumulate_sigma / the Ray
  pipeline now call (one NHWC gather copy, block-triangular Gram, float32 partial Gram flushed into float64);
* new ``update(patches)``: the same accumulator fed the (s, kh, kw)-ordered patch matrix (callers with patches).

and the effective rate of the new update (2 n^2 flops per patch: the full Gram's, whatever the code does) against
the peak GEMM rate of the same dtype. Then breaks the new update into its parts. Prints tables on stdout (progress
on stderr), with the load average at start, after every row and at the end. Not a pytest test.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported: no spin-waiting BLAS threads

import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    base_parser, load_fashion_mnist, log, machine_header, setup, sync, table, timeit,
)

from sigma_core import covariance  # noqa: E402
from sigma_core.covariance import SigmaAccumulator, conv_patches  # noqa: E402

TARGET = 0.50  # acceptance: >= 50 % of the same-dtype peak for n >= 1152
DTYPES = {"float64": torch.float64, "float32": torch.float32}
# (in_channels S, spatial size of the layer input); batch size from --batch
LAYERS = [(64, 16), (128, 16), (256, 8), (512, 8)]
RESNET_LAYERS = ["layer1.0.conv2", "layer2.0.conv2", "layer3.0.conv2", "layer4.0.conv2"]


# ----------------------------------------------------------------------------------------------- old algorithm
class LegacyAccumulator:
    """``SigmaAccumulator.update`` as it was before the port (sigma_core/covariance.py as of commit cbb01c0).

    Fed ``conv_patches(x, conv)`` (pad + unfold + transpose copy); full n x n Gram GEMM per batch; in float32 the
    product is converted and added into the float64 sum per batch. Kept only for the side-by-side ratio.
    """

    def __init__(self, n: int, *, device: torch.device | str = "cpu", compute_dtype: torch.dtype = torch.float64):
        self.n = int(n)
        self.compute_dtype = compute_dtype
        self.gram = torch.zeros(n, n, dtype=torch.float64, device=device)
        self.total = torch.zeros(n, dtype=torch.float64, device=device)
        self.count = 0

    def update(self, patches: torch.Tensor) -> None:
        u = patches.detach().to(device=self.gram.device, dtype=self.compute_dtype)
        if self.compute_dtype == torch.float64:
            self.gram.addmm_(u.T, u)
            self.total += u.sum(dim=0)
        else:
            self.gram += (u.T @ u).to(torch.float64)
            self.total += u.sum(dim=0).to(torch.float64)
        self.count += int(u.shape[0])

    def finalize(self) -> torch.Tensor:
        sigma = self.gram / self.count
        return 0.5 * (sigma + sigma.T)

    def mean(self) -> torch.Tensor:
        return self.total / self.count


# ----------------------------------------------------------------------------------------------- timing
def load1() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def peak_gemm(device: torch.device, dtype: torch.dtype, sizes: list[int], repeats: int) -> dict[int, float]:
    """GFLOP/s of C = A B on square float matrices (2 N^3 flops), best of ``repeats``."""
    out = {}
    for n in sizes:
        a = torch.randn(n, n, dtype=dtype, device=device)
        b = torch.randn(n, n, dtype=dtype, device=device)
        c = torch.empty(n, n, dtype=dtype, device=device)
        t = timeit(lambda: torch.mm(a, b, out=c), device, repeats=repeats)
        out[n] = 2.0 * n**3 / t / 1e9
        del a, b, c
    return out


def once(fn, device: torch.device, before=None) -> float:
    """Wall time of one ``fn()``; ``before()`` runs first, untimed."""
    if before is not None:
        before()
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def flush_per_update(acc: SigmaAccumulator, m: int, device: torch.device) -> float:
    """Share of one float32 flush (float32 partial Gram -> float64 sums, every 2^16 patches) per update of m patches.

    The timed updates below are kept flush-free (a flush before each, untimed) so that best-of timings do not
    depend on where the flush falls; its cost is added back pro rata.
    """
    if acc.compute_dtype != torch.float32 or m >= covariance._FLUSH_ROWS:
        return 0.0  # float64 has no partial sum; with m >= 2^16 every update flushes inside the timed call

    def fake_pending():
        acc._pending = 1

    t = min(once(acc._flush, device, before=fake_pending) for _ in range(3))
    return t * m / covariance._FLUSH_ROWS


def time_side_by_side(legacy, new, new_patches, flops: float, dtype: torch.dtype, device: torch.device,
                      repeats: int, flush: float, flush_before) -> dict:
    """Interleave legacy / new / new-with-patches / a square GEMM of about the same flops, ``repeats`` times.

    Returns best times and the medians of the per-repeat ratios: t_legacy / t_new, and rate(new) / rate(GEMM)
    (each pair runs back to back, so both see the same load: ratios stay meaningful on a shared machine).
    """
    size = int(min(4096 if device.type == "cpu" else 16384, max(1024, round((flops / 2) ** (1 / 3) / 256) * 256)))
    a, b = (torch.randn(size, size, dtype=dtype, device=device) for _ in range(2))
    c = torch.empty(size, size, dtype=dtype, device=device)
    for fn in (legacy, new, new_patches, lambda: torch.mm(a, b, out=c)):
        fn()  # warm-up
    res = {"t_legacy": [], "t_new": [], "t_patches": [], "speedup": [], "paired": [], "gemm": []}
    for _ in range(repeats):
        tg = once(lambda: torch.mm(a, b, out=c), device)
        tl = once(legacy, device)
        tn = once(new, device, before=flush_before) + flush
        tp = once(new_patches, device, before=flush_before) + flush
        gemm_rate = 2.0 * size**3 / tg / 1e9
        for key, val in (("t_legacy", tl), ("t_new", tn), ("t_patches", tp), ("speedup", tl / tn),
                         ("paired", (flops / tn / 1e9) / gemm_rate), ("gemm", gemm_rate)):
            res[key].append(val)
    return {"t_legacy": min(res["t_legacy"]), "t_new": min(res["t_new"]), "t_patches": min(res["t_patches"]),
            "speedup": statistics.median(res["speedup"]), "speedup_min": min(res["speedup"]),
            "speedup_max": max(res["speedup"]), "paired": statistics.median(res["paired"]), "gemm": max(res["gemm"])}


# ----------------------------------------------------------------------------------------------- inputs
def random_inputs(batch: int, device: torch.device) -> list[tuple[str, nn.Conv2d, torch.Tensor]]:
    """ReLU(N(0,1)) activations (half zeros, like post-ReLU feature maps) for 3x3/pad 1 convs."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for s, hw in LAYERS:
        conv = nn.Conv2d(s, s, 3, padding=1, bias=False).to(device)
        x = torch.randn(batch, s, hw, hw, generator=gen).clamp_min_(0).to(device)
        out.append((f"random {s}ch", conv, x))
    return out


def fmnist_inputs(batch: int, device: torch.device, image_size: int) -> list[tuple[str, nn.Conv2d, torch.Tensor]]:
    """Real inputs of ResNet-18's (random init) layerX.0.conv2 on Fashion-MNIST images."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).to(device).eval()
    modules = dict(model.named_modules())
    captured: dict[str, torch.Tensor] = {}
    hooks = [modules[name].register_forward_pre_hook(
        lambda mod, args, name=name: captured.__setitem__(name, args[0].detach().clone())) for name in RESNET_LAYERS]
    images = load_fashion_mnist(batch, size=image_size).to(device)
    with torch.inference_mode():
        model(images)
    for h in hooks:
        h.remove()
    return [(f"resnet18 {name}", modules[name], captured[name]) for name in RESNET_LAYERS]


# ----------------------------------------------------------------------------------------------- one case
def check(conv: nn.Conv2d, x: torch.Tensor, dt: torch.dtype, device: torch.device) -> float:
    """Max relative difference of Sigma and of the mean between the legacy and the new accumulator."""
    n = conv.weight[0].numel()
    old = LegacyAccumulator(n, device=device, compute_dtype=dt)
    old.update(conv_patches(x, conv))
    new = SigmaAccumulator.for_layer(conv, device=device, compute_dtype=dt)
    new.update_input(x, conv)
    s_old = old.finalize()
    diff = float((new.finalize() - s_old).abs().max() / s_old.abs().max())
    mu_diff = float((new.mean() - old.mean()).abs().max() / old.mean().abs().max().clamp_min(1e-300))
    return max(diff, mu_diff)


def profile_new(conv: nn.Conv2d, x: torch.Tensor, dt: torch.dtype, device: torch.device, repeats: int) -> list[float]:
    """The new update's parts timed alone: NHWC gather copy, block-triangular Gram, column sums."""
    n = conv.weight[0].numel()
    windows = covariance._conv_windows(x, conv)
    u = torch.empty(windows.shape, dtype=dt, device=device)
    t_gather = timeit(lambda: u.copy_(covariance._conv_windows(x, conv)), device, repeats=repeats)
    u2 = u.view(-1, n)
    gram = torch.zeros(n, n, dtype=dt, device=device)
    edges = covariance._block_edges(n)
    t_gram = timeit(lambda: covariance._add_upper_gram(gram, u2, edges), device, repeats=repeats)
    t_sum = timeit(lambda: covariance._column_sums(u2), device, repeats=repeats)
    return [t_gather, t_gram, t_sum]


def run_case(label: str, conv: nn.Conv2d, x: torch.Tensor, dname: str, device: torch.device, repeats: int,
             profile: bool) -> dict:
    dt = DTYPES[dname]
    n = conv.weight[0].numel()
    m = conv_patches(x, conv).shape[0]
    flops = 2.0 * n * n * m
    legacy = LegacyAccumulator(n, device=device, compute_dtype=dt)
    new = SigmaAccumulator.for_layer(conv, device=device, compute_dtype=dt)
    new_p = SigmaAccumulator.for_layer(conv, device=device, compute_dtype=dt)
    new.update_input(x, conv)  # allocates the float32 partial Gram that flush_per_update times
    flush = flush_per_update(new, m, device)
    res = time_side_by_side(lambda: legacy.update(conv_patches(x, conv)), lambda: new.update_input(x, conv),
                            lambda: new_p.update(conv_patches(x, conv)), flops, dt, device, repeats, flush,
                            lambda: (new._flush(), new_p._flush()))
    rec = dict(label=label, n=n, hw="x".join(map(str, x.shape[2:])), b=x.shape[0], m=m, dtype=dname,
               rate=flops / res["t_new"] / 1e9, blocks=len(covariance._block_edges(n)) - 1, flush=flush,
               diff=check(conv, x, dt, device), load=load1(), **res)
    if profile:
        rec["parts"] = profile_new(conv, x, dt, device, repeats)
    return rec


# ----------------------------------------------------------------------------------------------- report
def print_tables(recs: list[dict], first: dict, peaks: dict, sizes: list[int], profile: bool) -> None:
    rows = [[name] + [f"{first[name][n]:.1f}" for n in sizes] + [f"{peaks[name]:.1f}"] for name in DTYPES]
    print(table(["dtype"] + [f"GEMM {n}^2 GF/s" for n in sizes] + ["peak GF/s"], rows,
                title="Peak GEMM rate (square C = A B, 2 N^3 flops, best of repeats); peak = max of these and of "
                      "the paired square GEMMs timed next to every row below"))
    print()
    print(table(
        ["layer", "n", "HxW", "B", "patches/upd", "dtype", "legacy ms", "new ms", "speedup", "(min-max)",
         "update(patches) ms", "blocks k", "max rel diff", "load 1m"],
        [[r["label"], str(r["n"]), r["hw"], str(r["b"]), str(r["m"]), r["dtype"], f"{r['t_legacy'] * 1e3:.1f}",
          f"{r['t_new'] * 1e3:.1f}", f"{r['speedup']:.2f}x", f"{r['speedup_min']:.2f}-{r['speedup_max']:.2f}",
          f"{r['t_patches'] * 1e3:.1f}", str(r["blocks"]), f"{r['diff']:.1e}", f"{r['load']:.2f}"] for r in recs],
        title="Legacy vs ported accumulator, same run, interleaved: legacy = LegacyAccumulator.update(conv_patches(x, "
              "conv)) (pre-port code); new = SigmaAccumulator.for_layer(conv).update_input(x, conv); ms = best of "
              "repeats; speedup = median over repeats of t_legacy / t_new (min-max); float32 'new' times include "
              "the float32 -> float64 flush pro rata; max rel diff = legacy vs new Sigma and mean; load 1m = load "
              "average after the row"))
    print()
    main_rows = []
    for r in recs:
        r["frac"] = r["rate"] / peaks[r["dtype"]]
        verdict = ("ok" if r["frac"] >= TARGET else "MISS") if r["n"] >= 1152 else "(n<1152)"
        main_rows.append([r["label"], str(r["n"]), r["dtype"], f"{r['t_new'] * 1e3:.1f}", f"{r['m'] / r['t_new']:.3g}",
                          f"{r['b'] / r['t_new']:.0f}", f"{r['rate']:.1f}", f"{peaks[r['dtype']]:.1f}",
                          f"{100 * r['frac']:.0f}%", f"{100 * r['paired']:.0f}%", verdict])
    print(table(
        ["layer", "n", "dtype", "ms/upd", "patches/s", "images/s", "eff GF/s", "peak GF/s", "% peak", "% paired",
         f">={int(TARGET * 100)}%?"],
        main_rows,
        title="SigmaAccumulator update_input end to end (eff GF/s counts 2 n^2 flops per patch, the full Gram's, so "
              "it can exceed 100% of peak; % paired: median over repeats of (update rate / rate of a square GEMM of "
              "about the same flops timed right before it))"))
    print()
    big = [r for r in recs if r["n"] >= 1152]
    ok = all(r["frac"] >= TARGET for r in big)
    print(f"acceptance (>= {int(TARGET * 100)}% of same-dtype peak for n >= 1152): {'PASS' if ok else 'FAIL'} ("
          + ", ".join(f"{d} min {100 * min(r['frac'] for r in big if r['dtype'] == d):.0f}%" for d in DTYPES) + ")")
    print("speedup new vs legacy (median per row): " + ", ".join(
        f"{d} {min(r['speedup'] for r in recs if r['dtype'] == d):.2f}-"
        f"{max(r['speedup'] for r in recs if r['dtype'] == d):.2f}x" for d in DTYPES))
    if not profile:
        return
    print()
    print(table(
        ["layer", "n", "dtype", "ms/upd", "NHWC gather", "block Gram", "col sums", "f32 flush", "sum parts"],
        [[r["label"], str(r["n"]), r["dtype"], f"{r['t_new'] * 1e3:.1f}"]
         + [f"{100 * q / r['t_new']:.0f}%" for q in (*r["parts"], r["flush"])]
         + [f"{100 * (sum(r['parts']) + r['flush']) / r['t_new']:.0f}%"] for r in recs],
        title="Where the new update's time goes: each part timed alone, as % of its end-to-end time "
              "(f32 flush: pro rata per update)"))


# ----------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--inputs", choices=["random", "fmnist"], default="random",
                        help="random ReLU(N(0,1)) activations at fixed sizes, or real ResNet-18 (random init) "
                             "conv inputs on Fashion-MNIST")
    parser.add_argument("--batch", type=int, default=None, help="images per update (default: 64 CPU, 256 CUDA)")
    parser.add_argument("--image-size", type=int, default=128, help="--inputs fmnist: image side in pixels")
    parser.add_argument("--repeats", type=int, default=None, help="repeats per timing (best-of / median)")
    parser.add_argument("--no-profile", action="store_true", help="skip the breakdown of the new update")
    args = parser.parse_args()
    device = setup(args)
    cpu = device.type == "cpu"
    batch = args.batch or ((16 if args.quick else 64) if cpu else 256)
    repeats = args.repeats or (3 if args.quick else 5)
    sizes = ([1024, 2048] if args.quick else [2048, 4096]) if cpu else [4096, 8192]

    print(machine_header(device))
    print(f"inputs: {args.inputs}; batch {batch} images per update; {repeats} repeats per timing")
    print()

    log("measuring peak GEMM rates ...")
    first = {name: peak_gemm(device, dt, sizes, repeats) for name, dt in DTYPES.items()}
    peaks = {name: max(rates.values()) for name, rates in first.items()}
    cases = (random_inputs(batch, device) if args.inputs == "random"
             else fmnist_inputs(batch, device, args.image_size))
    recs = []
    for label, conv, x in cases:
        for dname in DTYPES:
            log(f"{label}: {dname} ... (load {load1():.2f})")
            recs.append(run_case(label, conv, x, dname, device, repeats, not args.no_profile))
            peaks[dname] = max(peaks[dname], recs[-1]["gemm"])
        del x
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print_tables(recs, first, peaks, sizes, not args.no_profile)
    try:
        print(f"\nload average at end (1/5/15 min): {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    except OSError:
        pass


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    log(f"done in {time.perf_counter() - t0:.0f} s")

"""Sigma accumulation throughput vs the machine's measured GEMM rate.

    python benchmarks/bench_sigma.py [--device cpu|cuda] [--quick] [--inputs random|fmnist]

Times ``SigmaAccumulator.update(conv_patches(x, conv))`` end to end (patch extraction included) for 3x3 convs
with n = S*3*3 in {576, 1152, 2304, 4608}, in float64 and float32 compute dtype, and compares the effective
rate (2 n^2 flops per patch: the full Gram GEMM) with the peak GEMM rate of the same dtype measured first on
square matmuls. Then breaks the time down into its parts and times a prototype of a faster accumulation path
(one-pass gather in (kh, kw, s) order + block-triangular Gram) to show what a fix would buy.
Prints tables on stdout (progress on stderr). Not a pytest test.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported: no spin-waiting BLAS threads

import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    base_parser, load_fashion_mnist, log, machine_header, setup, table, timeit,
)

from sigma_core.covariance import _PAD_MODES, SigmaAccumulator, _conv_pads, conv_patches  # noqa: E402

TARGET = 0.50  # acceptance: >= 50 % of the same-dtype peak for n >= 1152
DTYPES = {"float64": torch.float64, "float32": torch.float32}
# (in_channels S, spatial size of the layer input); batch size from --batch
LAYERS = [(64, 16), (128, 16), (256, 8), (512, 8)]
RESNET_LAYERS = ["layer1.0.conv2", "layer2.0.conv2", "layer3.0.conv2", "layer4.0.conv2"]


# ----------------------------------------------------------------------------------------------- peak
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


def timeit_paired(fn, flops: float, dtype: torch.dtype, device: torch.device, repeats: int):
    """Time ``fn`` (``flops`` of work) next to a square GEMM of about the same flops, ``repeats`` times.

    Returns (best time of fn, median of the per-pair ratios rate(fn) / rate(GEMM), best GEMM GF/s). Each pair
    runs back to back, so both see the same load: the ratio stays meaningful on a shared machine.
    """
    size = int(min(4096 if device.type == "cpu" else 16384, max(1024, round((flops / 2) ** (1 / 3) / 256) * 256)))
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    c = torch.empty(size, size, dtype=dtype, device=device)
    fn()
    torch.mm(a, b, out=c)
    best, best_gemm, ratios = float("inf"), 0.0, []
    for _ in range(repeats):
        tg = timeit(lambda: torch.mm(a, b, out=c), device, repeats=1, warmup=0)
        tf = timeit(fn, device, repeats=1, warmup=0)
        gemm_rate = 2.0 * size**3 / tg / 1e9
        best, best_gemm = min(best, tf), max(best_gemm, gemm_rate)
        ratios.append((flops / tf / 1e9) / gemm_rate)
    return best, statistics.median(ratios), best_gemm


# ----------------------------------------------------------------------------------------------- inputs
def random_inputs(batch: int, device: torch.device, quick: bool) -> list[tuple[str, nn.Conv2d, torch.Tensor]]:
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


# ----------------------------------------------------------------------------------------------- prototype
class ProposedAccumulator:
    """Prototype of a faster ``update`` (NOT in sigma_core; suggested fix, see README).

    1. One-pass patch gather: pad, view the input as NHWC, take an ``as_strided`` window view
       (B, Ho, Wo, kh, kw, S) and copy it once into the compute dtype: the dtype conversion rides on the
       gather copy, and there is no second (transpose) copy. Columns come out in (kh, kw, s) order; the
       n x n sum is permuted to the (s, kh, kw) order of ``K.reshape(T, n)`` once, at finalize.
    2. Block-triangular Gram: only the k(k+1)/2 upper blocks of U^T U are multiplied (a SYRK done with
       GEMMs): ~(k+1)/(2k) of the flops; mirrored at finalize.
    3. Column sums by a GEMV in the compute dtype, added to the float64 total.
    """

    def __init__(self, conv: nn.Conv2d, *, device: torch.device, compute_dtype: torch.dtype, blocks: int | None = None):
        s = conv.in_channels
        kh, kw = conv.kernel_size
        self.conv = conv
        self.n = n = s * kh * kw
        self.compute_dtype = compute_dtype
        k = blocks if blocks is not None else min(4, max(1, n // 288))
        self.edges = [round(i * n / k) for i in range(k + 1)]
        self.gram = torch.zeros(n, n, dtype=torch.float64, device=device)  # (kh, kw, s) order, upper blocks
        self.total = torch.zeros(n, dtype=torch.float64, device=device)
        self.count = 0

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.conv
        pads = _conv_pads(conv)
        mode = _PAD_MODES[conv.padding_mode]
        if any(pads):
            x = F.pad(x, pads, mode=mode) if mode != "constant" else F.pad(x, pads)
        xp = x.permute(0, 2, 3, 1).contiguous()  # NHWC (a no-op copy if the input already is channels_last)
        b, hp, wp, s = xp.shape
        (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
        ho = (hp - dh * (kh - 1) - 1) // sh + 1
        wo = (wp - dw * (kw - 1) - 1) // sw + 1
        st = xp.stride()
        view = xp.as_strided((b, ho, wo, kh, kw, s), (st[0], st[1] * sh, st[2] * sw, st[1] * dh, st[2] * dw, st[3]))
        u = torch.empty((b, ho, wo, kh, kw, s), dtype=self.compute_dtype, device=xp.device)
        u.copy_(view)  # gather + dtype conversion in one pass
        return u.view(b * ho * wo, self.n)

    def update(self, x: torch.Tensor) -> None:
        u = self.patches(x)
        e = self.edges
        for i in range(len(e) - 1):
            ui = u[:, e[i]: e[i + 1]]
            for j in range(i, len(e) - 1):
                blk = self.gram[e[i]: e[i + 1], e[j]: e[j + 1]]
                if self.compute_dtype == torch.float64:
                    blk.addmm_(ui.T, u[:, e[j]: e[j + 1]])
                else:
                    blk += (ui.T @ u[:, e[j]: e[j + 1]]).to(torch.float64)
        ones = torch.ones(1, u.shape[0], dtype=u.dtype, device=u.device)
        self.total += (ones @ u)[0].to(torch.float64)
        self.count += u.shape[0]

    def finalize(self) -> torch.Tensor:
        e, n = self.edges, self.n
        g = self.gram.clone()
        for i in range(len(e) - 1):  # mirror the upper blocks; diagonal blocks are full already
            for j in range(i + 1, len(e) - 1):
                g[e[j]: e[j + 1], e[i]: e[i + 1]] = g[e[i]: e[i + 1], e[j]: e[j + 1]].T
        s = self.conv.in_channels
        kh, kw = self.conv.kernel_size
        # (kh, kw, s) -> (s, kh, kw) on both axes
        g = g.reshape(kh * kw, s, kh * kw, s).permute(1, 0, 3, 2).reshape(n, n)
        sigma = g / self.count
        return 0.5 * (sigma + sigma.T)


# ----------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--inputs", choices=["random", "fmnist"], default="random",
                        help="random ReLU(N(0,1)) activations at fixed sizes, or real ResNet-18 (random init) "
                             "conv inputs on Fashion-MNIST")
    parser.add_argument("--batch", type=int, default=None, help="images per update (default: 64 CPU, 256 CUDA)")
    parser.add_argument("--image-size", type=int, default=128, help="--inputs fmnist: image side in pixels")
    parser.add_argument("--repeats", type=int, default=None, help="best-of repeats per timing")
    parser.add_argument("--no-profile", action="store_true", help="skip the breakdown and the prototype")
    args = parser.parse_args()
    device = setup(args)
    cpu = device.type == "cpu"
    batch = args.batch or ((16 if args.quick else 64) if cpu else 256)
    repeats = args.repeats or (3 if args.quick else 5)
    sizes = ([1024, 2048] if args.quick else [2048, 4096]) if cpu else [4096, 8192]

    print(machine_header(device))
    print(f"inputs: {args.inputs}; batch {batch} images per update; best of {repeats} repeats per timing")
    print()

    log("measuring peak GEMM rates ...")
    first: dict[str, dict[int, float]] = {}
    peaks: dict[str, float] = {}
    for name, dt in DTYPES.items():
        first[name] = peak_gemm(device, dt, sizes, repeats)
        peaks[name] = max(first[name].values())

    cases = (random_inputs(batch, device, args.quick) if args.inputs == "random"
             else fmnist_inputs(batch, device, args.image_size))

    recs = []  # one dict per (layer, dtype); percentages are computed at the end against the final peaks
    for label, conv, x in cases:
        n = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
        m = conv_patches(x, conv).shape[0]
        flops = 2.0 * n * n * m
        for dname, dt in DTYPES.items():
            log(f"{label}: n={n} {dname} ...")
            acc = SigmaAccumulator(n, device=device, compute_dtype=dt)
            t, paired, gemm_rate = timeit_paired(lambda: acc.update(conv_patches(x, conv)), flops, dt, device,
                                                 repeats)
            peaks[dname] = max(peaks[dname], gemm_rate)
            rec = dict(label=label, n=n, hw="x".join(map(str, x.shape[2:])), b=x.shape[0], m=m, dtype=dname, t=t,
                       rate=flops / t / 1e9, paired=paired)
            recs.append(rec)
            if args.no_profile:
                continue

            # --- breakdown of the same update into its parts
            pads = _conv_pads(conv)

            def unfold():
                xx = F.pad(x, pads) if any(pads) else x
                return F.unfold(xx, conv.kernel_size, dilation=conv.dilation, padding=0, stride=conv.stride)

            cols = unfold()
            t_unfold = timeit(unfold, device, repeats=repeats)
            t_copy = timeit(lambda: cols.transpose(1, 2).reshape(-1, n), device, repeats=repeats)
            p = cols.transpose(1, 2).reshape(-1, n)
            t_conv = timeit(lambda: p.to(dt), device, repeats=repeats) if p.dtype != dt else 0.0
            u = p.to(dt)
            gram = torch.zeros(n, n, dtype=torch.float64, device=device)
            if dt == torch.float64:
                t_gemm = timeit(lambda: gram.addmm_(u.T, u), device, repeats=repeats)
                t_up = 0.0
            else:
                t_gemm = timeit(lambda: u.T @ u, device, repeats=repeats)
                g32 = u.T @ u
                t_up = timeit(lambda: gram.add_(g32.to(torch.float64)), device, repeats=repeats)
            # column sums as covariance.py does them (since cbb01c0: in the compute dtype, then to float64)
            t_sum = timeit(lambda: u.sum(dim=0).to(torch.float64), device, repeats=repeats)
            rec["parts"] = [t_unfold, t_copy, t_conv, t_gemm, t_up, t_sum]
            rec["gemm_rate"] = flops / t_gemm / 1e9
            del cols, p, u, gram

            # --- prototype of the fix: same Sigma, fewer copies and ~half the GEMM flops
            proto = ProposedAccumulator(conv, device=device, compute_dtype=dt)
            t_proto = timeit(lambda: proto.update(x), device, repeats=repeats)
            ref = SigmaAccumulator(n, device=device, compute_dtype=dt)
            ref.update(conv_patches(x, conv))
            chk = ProposedAccumulator(conv, device=device, compute_dtype=dt)
            chk.update(x)
            s_ref = ref.finalize()
            diff = float((chk.finalize() - s_ref).abs().max() / s_ref.abs().max())
            mu_diff = float((chk.total.reshape(-1, conv.in_channels).T.reshape(-1) / chk.count - ref.mean())
                            .abs().max() / ref.mean().abs().max().clamp_min(1e-300))
            rec.update(t_proto=t_proto, proto_rate=flops / t_proto / 1e9, blocks=len(proto.edges) - 1,
                       diff=max(diff, mu_diff))
            del proto, ref, chk
        del x
        if device.type == "cuda":
            torch.cuda.empty_cache()

    rows = [[name] + [f"{first[name][n]:.1f}" for n in sizes] + [f"{peaks[name]:.1f}"] for name in DTYPES]
    print(table(["dtype"] + [f"GEMM {n}^2 GF/s" for n in sizes] + ["peak GF/s"], rows,
                title="Peak GEMM rate (square C = A B, 2 N^3 flops, best of repeats); peak = max of these and of "
                      "the paired square GEMMs timed next to every row below"))
    print()

    main_rows = []
    for r in recs:
        frac = r["rate"] / peaks[r["dtype"]]
        r["frac"] = frac
        verdict = ("ok" if frac >= TARGET else "MISS") if r["n"] >= 1152 else "(n<1152)"
        main_rows.append([r["label"], str(r["n"]), r["hw"], str(r["b"]), str(r["m"]), r["dtype"], f"{r['t'] * 1e3:.1f}",
                          f"{r['m'] / r['t']:.3g}", f"{r['b'] / r['t']:.0f}", f"{r['rate']:.1f}",
                          f"{peaks[r['dtype']]:.1f}", f"{100 * frac:.0f}%", f"{100 * r['paired']:.0f}%",
                          verdict])
    print(table(
        ["layer", "n", "HxW", "B", "patches/upd", "dtype", "ms/upd", "patches/s", "images/s", "eff GF/s",
         "peak GF/s", "% peak", "% paired", f">={int(TARGET * 100)}%?"],
        main_rows,
        title="SigmaAccumulator.update(conv_patches(x, conv)), end to end (eff GF/s counts 2 n^2 flops per patch; "
              "% peak is vs the same dtype's peak; % paired: median over repeats of (update rate / rate of a square "
              "GEMM of about the same flops timed right before it), robust to a shared machine's drifting load)"))
    print()
    big = [r for r in recs if r["n"] >= 1152]
    ok = all(r["frac"] >= TARGET for r in big)
    ok_p = all(r["paired"] >= TARGET for r in big)
    print(f"acceptance (>= {int(TARGET * 100)}% of same-dtype peak for n >= 1152): vs best peak "
          f"{'PASS' if ok else 'FAIL'} ("
          + ", ".join(f"{d} min {100 * min(r['frac'] for r in big if r['dtype'] == d):.0f}%" for d in DTYPES)
          + f"); paired {'PASS' if ok_p else 'FAIL'} ("
          + ", ".join(f"{d} min {100 * min(r['paired'] for r in big if r['dtype'] == d):.0f}%" for d in DTYPES)
          + ")")
    by = {(r["n"], r["dtype"]): r for r in recs}
    print("float32 / float64 speed ratio per n: " + ", ".join(
        f"n={n}: {by[(n, 'float64')]['t'] / by[(n, 'float32')]['t']:.2f}" for n in sorted({r['n'] for r in recs})))
    if args.no_profile:
        return
    print()
    prof_rows = []
    for r in recs:
        prof_rows.append([r["label"], str(r["n"]), r["dtype"], f"{r['t'] * 1e3:.1f}"]
                         + [f"{100 * q / r['t']:.0f}%" for q in r["parts"]]
                         + [f"{100 * sum(r['parts']) / r['t']:.0f}%", f"{r['gemm_rate']:.1f}",
                            f"{100 * r['gemm_rate'] / peaks[r['dtype']]:.0f}%"])
    print(table(
        ["layer", "n", "dtype", "ms/upd", "pad+unfold", "transpose copy", "->dtype", "Gram GEMM", "f32->f64 add",
         "col sum", "sum parts", "GEMM-only GF/s", "GEMM-only % peak"],
        prof_rows,
        title="Where the time goes: each part timed alone, as % of the end-to-end update time"))
    print()
    proto_rows = []
    for r in recs:
        proto_rows.append([r["label"], str(r["n"]), r["dtype"], f"{r['t'] * 1e3:.1f}", f"{r['t_proto'] * 1e3:.1f}",
                           f"{r['t'] / r['t_proto']:.2f}x", f"{r['proto_rate']:.1f}",
                           f"{100 * r['proto_rate'] / peaks[r['dtype']]:.0f}%", str(r["blocks"]), f"{r['diff']:.1e}"])
    print(table(
        ["layer", "n", "dtype", "current ms", "proposed ms", "speedup", "eff GF/s", "% peak", "blocks k",
         "max rel diff"],
        proto_rows,
        title="Prototype fix (benchmarks/bench_sigma.py ProposedAccumulator: one-pass NHWC gather with the dtype "
              "conversion, block-triangular Gram, GEMV column sums); eff GF/s still counts 2 n^2 per patch, so "
              "it can exceed 100%"))
    try:
        print(f"\nload average at end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    except OSError:
        pass


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    log(f"done in {time.perf_counter() - t0:.0f} s")

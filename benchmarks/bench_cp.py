"""CP-ALS-Sigma vs tensorly's Frobenius ``parafac`` on real-activation Sigma.

    python benchmarks/bench_cp.py [--device cpu|cuda] [--quick] [--images N] [--time-scale X] [--out FILE]

Sigma comes from REAL activations: torchvision ``resnet18(weights=None)`` (random init, seed 0; nothing is
downloaded) on real Fashion-MNIST training images (grey -> 3 channels, resized, normalized), accumulated with
``sigma_core.accumulate_sigma`` for layer{1,2,3}.0.conv2 (3x3 convs with 64/128/256 channels). Those layers' own
kernels are decomposed at the alpha-rule CP rank (alpha 0.8: EVBMF on the four unfoldings, paper Eq. 2) and at a
fixed fraction (5 %) of R_max = TSHW / max(T, S, H, W).

Per (kernel, rank): tensorly ``parafac`` (tol 1e-8 = its default, max 100 iterations, SVD init, wall-clock cap)
-- time, rel_sigma_err and rel_frob_err of its result -- and CP-ALS-Sigma with U_S by PCG, 10 steps per sweep
("inexact", all kernels) and solved to 1e-8 ("exact", 64 channels only, to keep the run near 10 min): seconds per
sweep, sweeps, CG iterations, time to come within 1 % of the converged error (the best error either Sigma run
reached; runs are capped in wall-clock time) and final error. Prints one table (progress on stderr) and writes
it to ``--out`` (default ``benchmarks/results/cpu-bench_cp.txt`` on CPU). Not a pytest test.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported: no spin-waiting BLAS threads

import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import tensorly  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    REPO, SigmaRun, base_parser, fmt_t, log, machine_header, resnet18_sigmas, run_capped, setup, table,
)

from sigma_core import (  # noqa: E402
    CPSigmaConfig, cp_als, cp_als_sigma, cp_max_rank, cp_rank_alpha, cp_rank_from_fraction,
    cp_vbmf_rank, rel_frob_err, rel_sigma_err,
)

WITHIN = 0.01  # "time to reach within 1 % of the converged rel_sigma_err"
ALPHA = 0.8
FRACTION = 0.05
CAPS = {64: 20.0, 128: 40.0, 256: 60.0}  # wall-clock cap (s) per CP-ALS-Sigma run at --time-scale 1
PARAFAC_CAPS = {64: 120.0, 128: 120.0, 256: 90.0}  # tensorly's ALS is ~6 s/iteration at (256, 256, 3, 3), R=461
EXACT_UP_TO = 64  # exact-PCG runs only up to this many channels (time budget)


def run_sigma(label, kernel, sigma, rank, config: CPSigmaConfig, cap: float, device) -> SigmaRun:
    """cp_als_sigma recording (time, error) after the initial U_T solve and every sweep; stops after ``cap`` s."""
    return run_capped(label, lambda cb: cp_als_sigma(kernel, sigma, rank, config=config, callback=cb),
                      cap=cap, max_iter=config.max_iter, device=device)


def run_parafac(kernel, sigma, rank, cap: float):
    """tensorly parafac via sigma_core.cp_als, stopped after ``cap`` seconds; (s, result, Sigma err, Frob err)."""
    t0 = time.perf_counter()
    res = cp_als(kernel.cpu(), rank, n_iter_max=100, tol=1e-8, random_state=0,
                 callback=lambda k, err: time.perf_counter() - t0 > cap)
    seconds = time.perf_counter() - t0
    approx = res.reconstruct()
    return seconds, res, rel_sigma_err(kernel, approx.to(sigma.device), sigma), rel_frob_err(kernel.cpu(), approx)


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=None, help="images for Sigma (default 500; --quick 200)")
    parser.add_argument("--image-size", type=int, default=128,
                        help="image side (128 -> conv2 inputs of 32/16/8 pixels for 64/128/256 channels)")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--time-scale", type=float, default=1.0, help="multiplies the per-run time caps")
    parser.add_argument("--max-iter", type=int, default=500, help="sweep cap of the Sigma runs")
    parser.add_argument("--out", default=None, help="also write the output here (default benchmarks/results/"
                                                     "<cpu|cuda>-bench_cp.txt)")
    args = parser.parse_args()
    device = setup(args)
    t_start = time.perf_counter()
    channels = [64, 128] if args.quick else [64, 128, 256]
    images = args.images or (200 if args.quick else 500)
    scale = args.time_scale * (0.3 if args.quick else 1.0)
    caps = {c: CAPS[c] * scale for c in channels}
    lines = [machine_header(device),
             f"Sigma: resnet18(weights=None, seed 0) on {images} Fashion-MNIST train images, 3x{args.image_size}x"
             f"{args.image_size}, accumulate_sigma float64; kernels = those layers' own weights (float64)",
             f"CP-ALS-Sigma: init svd, tol 1e-7, max_iter {args.max_iter}, wall-clock cap per run "
             + ", ".join(f"{c}ch {caps[c]:.0f}s" for c in channels) + "; exact PCG only up to "
             + f"{EXACT_UP_TO} channels",
             f"parafac: tensorly {tensorly.__version__} PyTorch backend (float64), init svd (random fill, seed 0), "
             "tol 1e-8, 100 iterations max, wall-clock cap "
             + ", ".join(f"{c}ch {PARAFAC_CAPS[c] * scale:.0f}s" for c in channels)
             + " (s/sweep column = s/iteration)",
             ""]

    log(f"accumulating Sigma over {images} images ...")
    sigmas, timings = resnet18_sigmas({c: images for c in channels}, image_size=args.image_size, batch=args.batch,
                                      device=device)
    lines.append(f"Sigma accumulation for {len(channels)} layers in one pass: {sum(timings.values()):.1f} s")
    rows = []
    for c in channels:
        name, kernel, sigma, count, _ = sigmas[c]
        kernel, sigma = kernel.to(device), sigma.to(device)
        ev = torch.linalg.eigvalsh(sigma)
        r_max, r_vbmf = cp_max_rank(kernel.shape), cp_vbmf_rank(kernel.cpu())
        cond = f"{float(ev[-1] / ev[0]):.2e}" if float(ev[0]) > 0 else "inf (singular; the solvers add a 1e-10 ridge)"
        lines.append(f"{name} {tuple(kernel.shape)}: {count} patches, Sigma eigenvalues [{float(ev[0]):.2e}, "
                     f"{float(ev[-1]):.2e}], cond {cond}; "
                     f"R_max {r_max}, R_VBMF {r_vbmf}")
        for rule, rank in ((f"alpha {ALPHA}", cp_rank_alpha(kernel.cpu(), ALPHA)),
                           (f"{FRACTION:.0%} R_max", cp_rank_from_fraction(kernel.shape, FRACTION))):
            tag = f"{tuple(kernel.shape)} R={rank} ({rule})"
            log(f"{tag}: parafac ...")
            t_pf, r_pf, se_pf, fe_pf = run_parafac(kernel, sigma, rank, PARAFAC_CAPS[c] * scale)
            pf_status = "capped" if r_pf.info["stopped_by_callback"] else ("conv" if r_pf.converged else "max_iter")
            configs = [("PCG 10 steps", CPSigmaConfig(solver="cg", cg_steps=10, tol=1e-7, max_iter=args.max_iter))]
            if c <= EXACT_UP_TO:
                configs.append(("exact PCG", CPSigmaConfig(solver="cg", tol=1e-7, max_iter=args.max_iter)))
            runs = []
            for label, cfg in configs:
                log(f"{tag}: CP-ALS-Sigma {label} ...")
                runs.append(run_sigma(label, kernel, sigma, rank, cfg, caps[c], device))
            ref = min(r.final for r in runs)
            rows.append([tag, "parafac (Frobenius)", fmt_t(t_pf), fmt_t(t_pf / max(r_pf.info["iterations"], 1)),
                         f"{r_pf.info['iterations']} {pf_status}", "-", "-",
                         f"{se_pf:.4f}", f"{fe_pf:.4f}", "1.00", "-"])
            for r in runs:
                t1 = r.time_to(ref * (1 + WITHIN))
                status = "capped" if r.capped else ("conv" if r.converged else "max_iter")
                rows.append([tag, f"Sigma {r.label}", fmt_t(r.seconds), fmt_t(r.sweep_seconds),
                             f"{r.sweeps} {status}", "-" if r.cg_per_sweep is None else f"{r.cg_per_sweep:.0f}",
                             fmt_t(t1), f"{r.final:.4f}", "-", f"{r.final / se_pf:.3f}",
                             "yes" if r.monotone() else "NO"])
            rows.append([""] * 11)
    rows.pop()
    lines += ["", table(
        ["kernel, rank (rule)", "method", "total s", "s/sweep", "sweeps", "CG it/sweep", "t->1% s",
         "rel_sigma_err", "rel_frob_err", "err/err(parafac)", "monotone"], rows,
        title="CP: tensorly parafac (Frobenius) vs CP-ALS-Sigma. t->1%: first time the run's rel_sigma_err <= 1.01 x "
              "the best error of the Sigma runs of that row group (capped runs: best within the cap)"),
        "", f"total benchmark time: {time.perf_counter() - t_start:.0f} s"]
    text = "\n".join(lines)
    print(text)
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / f"{device.type}-bench_cp.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")


if __name__ == "__main__":
    main()

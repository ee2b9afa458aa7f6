"""The reference Tucker2-ALS-Sigma (alpkll/Parafac_Sigma, CPU port) vs sigma_core's, time to the reference's error.

    python benchmarks/bench_reference.py [--cases 64,128,256,512,ill] [--cap S] [--cap-512 S] [--threads 1]
                                         [--state FILE] [--reuse-reference] [--ours-cap S]

Sigma and kernels: resnet18(weights=None, seed 0) layer{1,2,3,4}.0.conv2 on Fashion-MNIST (the set-up of
``bench_tucker2.py``: BatchNorm recalibrated on 500 images, Sigma over 500 images for 64..256 channels, 2000 for
512), ranks (T/2, S/2); ``ill``: the 128-channel Sigma with its eigenvalues re-spread log-uniformly over
[max/1e8, max] (``bench_tucker2.respread_eigenvalues``).

Per case, in one process: our solver settings (each run once), then the reference port
(``_reference_tucker_sigma.py``, its own defaults: float32, MINRES tol 1e-10 / maxiter 2000, tol 1e-6,
n_iter_max 100) capped at ``--cap`` CPU seconds, then our settings again (the faster of the two runs counts).
Every iterate's rel_sigma_err is evaluated in float64 against the float64 Sigma with the clock stopped.

Times are **CPU seconds of this process** (``time.process_time``) with ``torch.set_num_threads(--threads)``
(default 1): the machine is shared, and CPU time of a single-threaded process hardly depends on the load, whereas
wall time does (both are stored; the load average is printed). The reference's target error is the best float64
rel_sigma_err it reached within its cap; "t -> ref" is the first time our run is at or below it; ratio = the
reference's CPU time to that error / ours. partial_tucker = tensorly's Frobenius HOOI (``sigma_core.tucker2_als``,
tol 1e-4 = tensorly's default), timed the same way.

Stop rule columns: our runs are made with tol 0 (up to ``--max-iter`` sweeps or ``--ours-cap`` CPU seconds);
the solver's stopping rule (relative decrease of rel_sigma_err below tol) depends only on the error history, so
"stop@1e-4" / "stop@1e-6" read off where the pipeline default (tol 1e-4) and the API default (1e-6) stop, with
that point's error and time.

``--state FILE`` (default outputs/bench_reference.json) keeps every finished case: a rerun skips them (resume);
``--reuse-reference`` reruns only our settings against the stored reference histories (labelled in the output).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import REPO, log, machine_header, resnet18_sigmas, table  # noqa: E402
from _reference_tucker_sigma import reference_cholesky, reference_tucker2_sigma  # noqa: E402

from sigma_core import Tucker2SigmaConfig, rel_sigma_err, tucker2_als, tucker2_als_sigma  # noqa: E402

# Our solver settings, by label: the old API default (exact PCG), the fixed-step inexact PCG and the current default.
OURS = {
    "exact PCG": dict(cg_steps=None),
    "PCG 10 steps": dict(cg_steps=10),
    "default": dict(),
}
STOP_TOLS = (1e-4, 1e-6)


class Clock:
    """CPU and wall seconds since start, excluding the intervals spent in :meth:`paused`."""

    def __init__(self):
        self.cpu0, self.wall0 = time.process_time(), time.perf_counter()
        self.cpu_paused = self.wall_paused = 0.0

    def now(self) -> tuple[float, float]:
        return time.process_time() - self.cpu0 - self.cpu_paused, time.perf_counter() - self.wall0 - self.wall_paused

    def pause(self):
        return _Pause(self)


class _Pause:
    def __init__(self, clock: Clock):
        self.clock = clock

    def __enter__(self):
        self.c, self.w = time.process_time(), time.perf_counter()

    def __exit__(self, *exc):
        self.clock.cpu_paused += time.process_time() - self.c
        self.clock.wall_paused += time.perf_counter() - self.w


class Stop(Exception):
    pass


def _approx(u_t, core, u_s) -> torch.Tensor:
    return torch.einsum("abhw,ta,sb->tshw", core.double(), u_t.double(), u_s.double())


def run_reference(kernel, sigma, ranks, cap: float) -> dict:
    """Reference port capped at ``cap`` CPU seconds; history of (cpu s, wall s, float64 error, own float32 error)."""
    clock = Clock()
    chol, jitter = reference_cholesky(sigma)
    hist = {"cpu": [], "wall": [], "err": [], "jitter": jitter, "capped": False, "minres_steps": 0}

    def callback(it, u_t, core, u_s):
        cpu, wall = clock.now()
        with clock.pause():
            hist["cpu"].append(cpu)
            hist["wall"].append(wall)
            hist["err"].append(rel_sigma_err(kernel, _approx(u_t, core, u_s), sigma))
            log(f"    reference it {it}: {cpu:.1f} cpu s, rel_sigma_err {hist['err'][-1]:.5f}")

    def minres_callback(_x):
        hist["minres_steps"] += 1
        if clock.now()[0] > cap:
            raise Stop

    try:
        _, _, _, own = reference_tucker2_sigma(kernel, ranks, chol, callback=callback, minres_callback=minres_callback)
        hist["own_final"] = own[-1]
    except Stop:
        hist["capped"] = True
    hist["cpu_total"], hist["wall_total"] = clock.now()
    return hist


def run_ours(kernel, sigma, ranks, settings: dict, cap: float, max_iter: int) -> dict:
    """tucker2_als_sigma with tol 0, history of (cpu s, wall s, error) per sweep; stops at ``cap`` CPU seconds."""
    cfg = Tucker2SigmaConfig(**{**settings, "tol": 0.0, "max_iter": max_iter})
    clock = Clock()
    hist = {"cpu": [], "wall": [], "err": [], "capped": False}

    def callback(sweep, err, info):
        cpu, wall = clock.now()
        hist["cpu"].append(cpu)
        hist["wall"].append(wall)
        hist["err"].append(err)
        if cpu > cap:
            raise Stop

    try:
        res = tucker2_als_sigma(kernel, sigma, ranks, config=cfg, callback=callback)
        hist["solver"] = res.info["solver"]
        # the reported errors must be those of the returned factors (float64 check outside the clock)
        hist["check"] = rel_sigma_err(kernel, res.reconstruct(), sigma)
    except Stop:
        hist["capped"] = True
    return hist


def run_frobenius(kernel, sigma, ranks) -> dict:
    clock = Clock()
    res = tucker2_als(kernel, ranks, tol=1e-4)
    cpu, wall = clock.now()
    return {"cpu": cpu, "wall": wall, "err": rel_sigma_err(kernel, res.reconstruct(), sigma),
            "iters": res.info.get("iterations")}


def time_to(hist: dict, target: float, key: str = "cpu") -> float | None:
    return next((t for t, e in zip(hist[key], hist["err"]) if e <= target * (1 + 1e-12)), None)


def stop_point(hist: dict, tol: float) -> tuple[int, float, float] | None:
    """(sweep, error, cpu s) where the solver's rule ``relative decrease < tol`` stops, or None if not reached."""
    e = hist["err"]
    for k in range(1, len(e)):
        if (e[k - 1] - e[k]) / max(e[k - 1], 1e-300) < tol:
            return k, e[k], hist["cpu"][k]
    return None


def case_data(name: str, sigmas) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    if name == "ill":
        from bench_tucker2 import respread_eigenvalues

        kernel, sigma = sigmas[128].kernel, respread_eigenvalues(sigmas[128].sigma, 1e8)
    else:
        kernel, sigma = sigmas[int(name)].kernel, sigmas[int(name)].sigma
    return kernel, sigma, (kernel.shape[0] // 2, kernel.shape[1] // 2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default="64,128,256,512,ill")
    p.add_argument("--cap", type=float, default=240.0, help="reference CPU-second cap (64..256 and ill)")
    p.add_argument("--cap-512", type=float, default=360.0, help="reference CPU-second cap at 512 channels")
    p.add_argument("--ours-cap", type=float, default=60.0, help="CPU-second cap of each of our runs")
    p.add_argument("--max-iter", type=int, default=100, help="sweep cap of our runs (the API default)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--state", default=str(REPO / "outputs" / "bench_reference.json"))
    p.add_argument("--sigma-cache", default=str(REPO / "outputs" / "sigmas.pt"))
    p.add_argument("--settings", default=",".join(OURS), help="which of our settings to run (labels, comma-separated)")
    p.add_argument("--reuse-reference", action="store_true",
                   help="rerun only our settings; the reference histories come from --state")
    args = p.parse_args()
    for label in list(OURS):
        if label not in args.settings.split(","):
            del OURS[label]
    torch.set_num_threads(args.threads)
    Path(args.state).parent.mkdir(parents=True, exist_ok=True)
    state = json.loads(Path(args.state).read_text()) if Path(args.state).exists() else {}
    cases = args.cases.split(",")
    sigmas, _ = resnet18_sigmas({64: 500, 128: 500, 256: 500, 512: 2000}, bn_images=500, image_size=128,
                                batch=100, device=torch.device("cpu"), cache=args.sigma_cache)
    print(machine_header(torch.device("cpu")))
    print(f"times: CPU seconds of this process, torch threads {args.threads}; reference cap {args.cap:.0f} CPU s "
          f"({args.cap_512:.0f} at 512 ch); our runs tol 0, max_iter {args.max_iter}, cap {args.ours_cap:.0f} CPU s")
    print()
    for name in cases:
        done = state.get(name)
        if done and not args.reuse_reference:
            log(f"case {name}: already in {args.state}")
            continue
        kernel, sigma, ranks = case_data(name, sigmas)
        log(f"case {name}: kernel {tuple(kernel.shape)} R={ranks}")
        entry = {"kernel": list(kernel.shape), "ranks": list(ranks), "ours": {}, "ours2": {}}
        entry["frobenius"] = run_frobenius(kernel, sigma, ranks)
        for label, settings in OURS.items():
            log(f"  ours {label} ...")
            entry["ours"][label] = run_ours(kernel, sigma, ranks, settings, args.ours_cap, args.max_iter)
        if args.reuse_reference:
            if not done:
                log(f"case {name}: no stored reference run, skipped")
                continue
            entry["reference"] = done["reference"]
            entry["reference_reused"] = True
        else:
            log("  reference ...")
            entry["reference"] = run_reference(kernel, sigma, ranks, args.cap_512 if name == "512" else args.cap)
        for label, settings in OURS.items():
            log(f"  ours {label} (again) ...")
            entry["ours2"][label] = run_ours(kernel, sigma, ranks, settings, args.ours_cap, args.max_iter)
        frob2 = run_frobenius(kernel, sigma, ranks)
        if frob2["cpu"] < entry["frobenius"]["cpu"]:
            entry["frobenius"] = frob2
        entry["load_after"] = os.getloadavg()[0]
        state[name] = entry
        tmp = Path(args.state + ".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(args.state)
    print(report(state, [c for c in cases if c in state]))
    print(f"load average at end (1/5/15 min): {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


def _fmt(v: float | None) -> str:
    return "-" if v is None else (f"{v:.2f}" if v < 100 else f"{v:.0f}")


def report(state: dict, cases: list[str]) -> str:
    rows, stops = [], []
    for name in cases:
        e = state[name]
        ref, frob = e["reference"], e["frobenius"]
        tag = f"{'ill-cond ' if name == 'ill' else ''}{tuple(e['kernel'])} R={tuple(e['ranks'])}"
        target = min(ref["err"])
        t_ref = ref["cpu"][ref["err"].index(target)]
        its = len(ref["err"]) - 1
        row = [tag, f"{its}{' capped' if ref['capped'] else ''}, {t_ref:.0f} s -> {target:.4f}"
               + (" *" if e.get("reference_reused") else "")]
        for label in OURS:
            runs = [e["ours"][label], e["ours2"][label]]
            ts = [time_to(r, target) for r in runs]
            ts = [t for t in ts if t is not None]
            t = min(ts) if ts else None
            row += [_fmt(t), "-" if t is None else f"{t_ref / t:.0f}x"]
            best = min(runs, key=lambda r: r["cpu"][-1] / max(len(r["err"]), 1))
            for tol in STOP_TOLS:
                sp = stop_point(best, tol)
                stops.append([tag, label, f"{tol:.0e}", "-" if sp is None else str(sp[0]),
                              "-" if sp is None else f"{sp[1]:.5f}", "-" if sp is None else _fmt(sp[2]),
                              f"{min(best['err']):.5f}",
                              "yes" if all(b <= a * (1 + 1e-12) for a, b in zip(best["err"], best["err"][1:]))
                              else "NO"])
        last = list(OURS)[-1]
        tdef = min(t for t in (time_to(e["ours"][last], target), time_to(e["ours2"][last], target),
                               float("inf")) if t is not None)
        row += [f"{frob['cpu']:.2f} s -> {frob['err']:.3f}",
                "-" if tdef == float("inf") else f"{tdef / frob['cpu']:.2f}"]
        rows.append(row)
    heads = ["case", "reference: its, CPU s -> err"]
    for label in OURS:
        heads += [f"{label} t->ref", "ratio"]
    heads += ["partial_tucker -> Sigma err", f"{list(OURS)[-1]}/PT"]
    out = [table(heads, rows, title="Time (CPU s, 1 thread) to the reference's best rel_sigma_err within its cap; "
                 "ratio = reference time / ours; X/PT = the last settings' time to that error / partial_tucker's "
                 "time (tol 1e-4)")]
    if any(state[c].get("reference_reused") for c in cases):
        out.append("* reference history from an earlier process (--reuse-reference); our runs are from this one")
    out.append("")
    out.append(table(["case", "settings", "tol", "stops at sweep", "rel_sigma_err", "CPU s", "best err in run",
                      "monotone"], stops,
                     title="Where the solver's stopping rule (relative decrease < tol) stops each setting "
                           "(read off the tol-0 history)"))
    return "\n".join(out)


if __name__ == "__main__":
    main()

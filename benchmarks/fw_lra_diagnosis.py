"""Why FW-LRA loses so much top-1 on resnet-fmnist (Tables 3-4): a per-layer diagnosis.

FW-LRA (paper Sec. 5.4) minimizes ``sum_i F_i (K_i - K~_i)^2`` with ``F`` the empirical diagonal Fisher of the
layer's weights: the diagonal second-order estimate of the loss increase. The paper's own Tables 3-4 show it far
below Tucker2-ALS (ResNet18: 36.7 vs 58.9 ... 4.2 vs 30.2). This script checks, on the cached reference model,
whether our FW-LRA is a faithful solver of that objective and where the accuracy goes:

1. Per layer at one alpha: how concentrated the Fisher diagonal is (share of its mass in the top 1 % of entries;
   participation ratio ``(sum F)^2 / (n sum F^2)``, 1 = uniform), and the Fisher-weighted, Sigma and Frobenius
   errors of Tucker2-ALS, FW-LRA and Tucker2-ALS-Sigma. A correct FW-LRA has the lowest Fisher-weighted error.
2. Per layer, test top-1 with only that layer replaced (the rest dense): which per-layer error predicts accuracy.
3. Whole model: FW-LRA top-1 as the floor on the normalized weights (``min_weight``, default 1e-8) is raised
   towards uniform weights (which is Tucker2-ALS).

Usage: ``python benchmarks/fw_lra_diagnosis.py [--alpha 0.8] [--n 2000] [--eval-limit 10000]``. The reference
model must be cached (``sigma-compress train``); Sigma comes from (or goes to) ``cache/sigma``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: spin-waiting threads on shared cores

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._common import log, machine_header, owned_cores, table  # noqa: E402
from pipeline.compress import SigmaSource, accuracy, compute_sigmas, select_layers  # noqa: E402
from pipeline.data import DatasetSpec  # noqa: E402
from pipeline.fisher import compute_layer_stats  # noqa: E402
from pipeline.sigma_cache import SigmaCache  # noqa: E402
from pipeline.train import TrainConfig, load_or_train_reference  # noqa: E402
from sigma_core import (  # noqa: E402
    RankRule,
    Tucker2Conv,
    Tucker2SigmaConfig,
    WeightedTucker2Config,
    fw_lra,
    get_module,
    rel_frob_err,
    rel_sigma_err,
    replace_modules,
    tucker2_als,
    tucker2_als_sigma,
)
from sigma_core.decompose.weighted import weighted_rel_err  # noqa: E402

METHODS = ("tucker2-als", "fw-lra", "tucker2-als-sigma")


def _concentration(fisher: torch.Tensor) -> tuple[float, float]:
    """Share of the Fisher mass in the top 1 % of entries, and the participation ratio (1 = uniform)."""
    f = fisher.flatten().to(torch.float64)
    top = torch.topk(f, max(1, f.numel() // 100)).values.sum()
    return float(top / f.sum()), float(f.sum() ** 2 / (f.numel() * (f**2).sum()))


def _decompose(method: str, weight, sigma, fisher, ranks, floor: float = 1e-8):
    if method == "tucker2-als":
        return tucker2_als(weight, ranks, n_iter_max=100, tol=1e-6)
    if method == "fw-lra":
        return fw_lra(weight, fisher, ranks, config=WeightedTucker2Config(max_iter=100, tol=1e-4, min_weight=floor))
    return tucker2_als_sigma(weight, sigma, ranks, config=Tucker2SigmaConfig(max_iter=100, tol=1e-4),
                             generator=torch.Generator().manual_seed(0))


def _top1(model, args) -> float:
    spec = DatasetSpec("fashion-mnist", split="test")
    return accuracy(model, spec, limit=args.eval_limit, batch_size=500, device="cpu", progress=False)["top1"]


def _swap(model, results: dict) -> torch.nn.Module:
    return replace_modules(model, {name: Tucker2Conv.from_result(get_module(model, name), res)
                                   for name, res in results.items()})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet-fmnist")
    p.add_argument("--alpha", type=float, default=0.8)
    p.add_argument("--n", type=int, default=2000, help="training images for Sigma and the Fisher diagonal")
    p.add_argument("--eval-limit", type=int, default=None, help="first N test images (default: all 10,000)")
    p.add_argument("--floors", default="1e-8,1e-4,1e-2,0.1,0.5", help="FW-LRA min_weight values (part 3)")
    args = p.parse_args()
    torch.set_num_threads(owned_cores())
    print(machine_header(torch.device("cpu")))
    model, _ = load_or_train_reference(TrainConfig(model=args.model), REPO / "cache" / "models", progress=False)
    model = model.eval()
    layers, _ = select_layers(model, None)
    source = SigmaSource(DatasetSpec("fashion-mnist"), n_samples=args.n)
    sigmas, _ = compute_sigmas(model, layers, source, cache=SigmaCache(REPO / "cache" / "sigma"), progress=False)
    tic = time.perf_counter()
    stats, _ = compute_layer_stats(model, {"fisher": layers}, source, data_cache_dir=REPO / "cache")
    fisher = stats["fisher"]
    log(f"Fisher diagonal of {len(layers)} layers from {args.n} images: {time.perf_counter() - tic:.0f} s")
    rule = RankRule(alpha=args.alpha)
    dense = _top1(model, args)
    rows, results = [], {m: {} for m in METHODS}
    weights = {name: get_module(model, name).weight.detach().to(torch.float64) for name in layers}
    ranks_of = {name: tuple(rule.resolve(w)) for name, w in weights.items()}
    for name in layers:
        weight, ranks = weights[name], ranks_of[name]
        top1pc, pr = _concentration(fisher[name])
        row = [name, "x".join(map(str, weight.shape)), f"{ranks[0]},{ranks[1]}", f"{100 * top1pc:.1f}", f"{pr:.3f}"]
        errs = {}
        for method in METHODS:
            res = _decompose(method, weight, sigmas[name], fisher[name], ranks)
            results[method][name] = res
            approx = res.reconstruct()
            errs[method] = (weighted_rel_err(weight, approx, fisher[name].sqrt()),
                            rel_sigma_err(weight, approx, sigmas[name]), rel_frob_err(weight, approx))
        for i in range(3):
            row += [f"{errs[m][i]:.3f}" for m in METHODS]
        for method in METHODS:
            row.append(f"{_top1(_swap(model, {name: results[method][name]}), args):.2f}")
        rows.append(row)
        log(f"{name} done")
    short = {"tucker2-als": "ALS", "fw-lra": "FW", "tucker2-als-sigma": "Sig"}
    headers = ["layer", "kernel", "ranks", "F top1% mass %", "F part. ratio",
               *(f"{kind} {short[m]}" for kind in ("F-err", "Sig-err", "Frob-err") for m in METHODS),
               *(f"top1 only-this {short[m]}" for m in METHODS)]
    print(table(headers, rows, title=f"Part 1-2: per layer, alpha={args.alpha:g}; dense model top-1 {dense:.2f} %; "
                                     f"F-err = ||sqrt(F)(K-K~)|| / ||sqrt(F) K||"))
    full = [[m, f"{_top1(_swap(model, results[m]), args):.2f}"] for m in METHODS]
    print(table(["method", "top-1 % (all layers)"], full, title=f"Whole model, alpha={args.alpha:g}"))
    floor_rows = []
    for floor in (float(x) for x in args.floors.split(",")):
        res = {name: _decompose("fw-lra", weights[name], None, fisher[name], ranks_of[name], floor)
               for name in layers}
        mean_sig = sum(rel_sigma_err(weights[n], r.reconstruct(), sigmas[n]) for n, r in res.items()) / len(res)
        floor_rows.append([f"{floor:g}", f"{mean_sig:.3f}", f"{_top1(_swap(model, res), args):.2f}"])
        log(f"floor {floor:g} done")
    print(table(["FW-LRA min_weight", "mean rel_sigma_err", "top-1 %"], floor_rows,
                title="Part 3: FW-LRA with the Fisher weights floored at min_weight x mean (-> uniform = Tucker2-ALS)"))


if __name__ == "__main__":
    main()

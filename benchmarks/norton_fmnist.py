"""NORTON on vgg-fmnist (spec norton.md Sec. 8): E1 (Table IV analog, R = 1..7, no fine-tuning), E2 (filter vs layer
CP at matched MACs), E3 (matched-MAC budgets, identical fine-tuning), E4 (pruning-criterion ablation).

Every point is a ``run_compress`` point (``outputs/norton_fmnist/<stage>/points/*.json``): a killed run resumes
where it stopped when the same command is run again. Results: ``benchmarks/results/norton_fmnist.txt``.

    nice -n 10 uv run python benchmarks/norton_fmnist.py --stages e1,e2        # ~10-20 min on 2 shared cores
    nice -n 10 uv run python benchmarks/norton_fmnist.py --stages e3,e4        # fine-tuning arms (resumable)
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from pipeline.compress import SigmaSource, load_compressed  # noqa: E402
from pipeline.data import DatasetSpec  # noqa: E402
from pipeline.methods import SolverOptions  # noqa: E402
from pipeline.runner import CompressConfig, prepare_model, run_compress  # noqa: E402
from sigma_core import CPConv, NortonConv, count_macs, filter_nmse, get_module, replace_modules  # noqa: E402



def _layers(model) -> tuple[str, ...]:
    convs = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    return tuple(convs[1:])  # the first conv (1 -> 32) stays dense, as by the project default


def base_config(args, out: str, **kw) -> CompressConfig:
    return CompressConfig(model="vgg-fmnist", sigma=SigmaSource(DatasetSpec("fashion-mnist"), n_samples=2000),
                          output_dir=str(Path(args.out) / out), cache_dir=str(REPO / "cache"), track=False,
                          progress=False, solver=SolverOptions(max_iter=args.max_iter, tol=1e-4), **kw)


def nmse_of(point: dict, model) -> float:
    """NORTON's NMSE (NMSE.py): per layer the mean over filters of ||K_t - K~_t||^2 / ||K_t||^2, mean over layers."""
    compressed = load_compressed(point["model_dir"])
    vals = []
    for row in point["layers"]:
        layer = get_module(compressed, row["name"])
        if hasattr(layer, "reconstructed_kernel"):
            vals.append(filter_nmse(get_module(model, row["name"]).weight.detach(), layer.reconstructed_kernel()))
    return sum(vals) / len(vals)


def e1(args, model, lines):
    lines.append("## E1: Table IV analog on vgg-fmnist, no fine-tuning (Sigma from 2000 train images)\n")
    lines.append("| R | method | params CR % | MACs CR % | NMSE | mean rel_frob_err | mean rel_sigma_err | top-1 |")
    lines.append("|---|---|---|---|---|---|---|---|")
    rows = {}
    for r in range(1, 8):
        res = run_compress(base_config(args, "e1", methods=("norton-cp", "norton-cp-sigma"), cp_rank=r))
        base = res["baseline"]
        for p in res["points"]:
            nm = nmse_of(p, model)
            rows[(r, p["method"])] = p
            lines.append(f"| {r} | {p['method']} | {100 * (1 - p['params'] / base['params']):.2f} | "
                         f"{100 * (1 - p['macs'] / base['macs']):.2f} | {nm:.4f} | {p['mean_rel_frob_err']:.4f} | "
                         f"{p['mean_rel_sigma_err']:.4f} | {p['top1']:.2f} |")
        print(f"E1 R={r} done", flush=True)
    lines.append(f"\nbaseline: top-1 {base['top1']:.2f}, {base['params']} params, {base['macs']} MACs\n")
    for r in (1, 2, 3):
        a, b = rows[(r, "norton-cp-sigma")]["top1"], rows[(r, "norton-cp")]["top1"]
        lines.append(f"- R={r}: norton-cp-sigma {a:.2f} vs norton-cp {b:.2f} -> {'>=' if a >= b else '<'} "
                     f"({a - b:+.2f} points)")
    lines.append("")
    return rows, base


def layer_cp_macs(model, layers, rank: int, input_shape=(1, 1, 28, 28)) -> int:
    repl = {}
    for name in layers:
        conv = get_module(model, name)
        repl[name] = CPConv(conv.in_channels, conv.out_channels, conv.kernel_size, rank, stride=conv.stride,
                            padding=conv.padding, dilation=conv.dilation, bias=conv.bias is not None)
    return count_macs(replace_modules(model, repl), input_shape)


def match_cp_rank(model, layers, target: int) -> int:
    """Global layer-CP rank whose model MACs are closest to ``target`` (bisection on count_macs, monotone in R)."""
    lo, hi = 1, 4096
    while lo < hi:
        mid = (lo + hi) // 2
        if layer_cp_macs(model, layers, mid) < target:
            lo = mid + 1
        else:
            hi = mid
    cands = [r for r in (lo - 1, lo) if r >= 1]
    return min(cands, key=lambda r: abs(layer_cp_macs(model, layers, r) - target))


def e2(args, model, e1_rows, base, lines):
    lines.append("## E2: filter CP vs layer CP at matched MACs, no fine-tuning\n")
    lines.append("| NORTON R | NORTON MACs | method | top-1 | layer-CP rank R_L | layer-CP MACs (ratio) | "
                 "cp-als top-1 | cp-als-sigma top-1 |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for r in (1, 2):
        target = e1_rows[(r, "norton-cp")]["macs"]
        r_l = match_cp_rank(model, _layers(model), target)
        res = run_compress(base_config(args, "e2", methods=("cp-als", "cp-als-sigma"), cp_rank=r_l))
        pts = {p["method"]: p for p in res["points"]}
        macs = pts["cp-als"]["macs"]
        for m in ("norton-cp", "norton-cp-sigma"):
            lines.append(f"| {r} | {target} | {m} | {e1_rows[(r, m)]['top1']:.2f} | {r_l} | {macs} "
                         f"({macs / target:.3f}) | {pts['cp-als']['top1']:.2f} | {pts['cp-als-sigma']['top1']:.2f} |")
        print(f"E2 R={r} done", flush=True)
    lines.append("")


def _ft(args):
    from pipeline.finetune import FinetuneConfig

    # One short protocol for every arm (2 shared CPU cores): Adam, one lr, args.ft_epochs over args.ft_subset images.
    return FinetuneConfig(epochs=args.ft_epochs, lrs=(1e-3,), train_subset=args.ft_subset, holdout=2000, seed=0)


def _arm(args, out, method, prune, **rank):
    from pipeline.norton import PruneConfig  # noqa: F401

    cfg = base_config(args, out, methods=(method,), prune=prune, finetune=_ft(args), finetune_methods=(method,),
                      **rank)
    res = run_compress(cfg)
    before, after = res["points"][0], res["points"][1]
    print(f"arm {after['method']} done: {before['top1']:.2f} -> {after['top1']:.2f}", flush=True)
    return before, after, res["baseline"]


def dense_prune_macs(model, rate: float) -> int:
    from pipeline.norton import PruneConfig, norton_prune

    return count_macs(norton_prune(model, PruneConfig(rate=rate, criterion="l1"))[0], (1, 1, 28, 28))


def match_prune_rate(model, target: int) -> float:
    """Global dense prune rate (2 decimals) whose MACs are closest to ``target`` (bisection; MACs fall with rate)."""
    lo, hi = 0.0, 0.98
    for _ in range(10):
        mid = (lo + hi) / 2
        if dense_prune_macs(model, mid) > target:
            lo = mid
        else:
            hi = mid
    cands = sorted({round(lo, 2), round(hi, 2), round((lo + hi) / 2, 2)})
    return min(cands, key=lambda r: abs(dense_prune_macs(model, r) - target))


def e3_e4(args, model, lines):
    from pipeline.norton import PruneConfig

    ft = _ft(args)
    lines.append(f"## E3 (budget B, ~18x MACs) and E4 (criteria at R=1, p=0.5), identical fine-tuning: Adam lr 1e-3, "
                 f"{ft.epochs} epoch(s) on {ft.train_subset} train images, seed 0 (a SHORT CPU protocol)\n")
    lines.append("| arm | MACs | reduction | params | top-1 no FT | top-1 after FT |")
    lines.append("|---|---|---|---|---|---|")
    rows = []

    def add(before, after, base):
        rows.append(after)
        lines.append(f"| {after['method']} ({after['rank_rule']}) | {after['macs']} | {base['macs'] / after['macs']:.1f}x "
                     f"| {after['params']} | {before['top1']:.2f} | {after['top1']:.2f} |")

    try:
        b, a, base = _arm(args, "e3", "norton-cp", PruneConfig(rate=0.5, criterion="pabs"), cp_rank=1)
        add(b, a, base)
        target = a["macs"]
        rate = match_prune_rate(model, target)
        add(*_arm(args, "e3", "dense-prune", PruneConfig(rate=rate, criterion="l1"), fraction=1.0))
        r_l = match_cp_rank(model, _layers(model), target)
        add(*_arm(args, "e3", "cp-als", None, cp_rank=r_l))
        for crit, seed in (("pabs-code", 0), ("l1", 0), ("random", 0), ("random", 1), ("random", 2)):
            add(*_arm(args, "e3", "norton-cp", PruneConfig(rate=0.5, criterion=crit, seed=seed), cp_rank=1))
        add(*_arm(args, "e3", "norton-cp", PruneConfig(rate=0.65, criterion="pabs"), cp_rank=2))
        add(*_arm(args, "e3", "norton-cp-sigma", PruneConfig(rate=0.5, criterion="pabs"), cp_rank=1))
    finally:
        lines.append(f"\n{len(rows)} arms finished (the rest: rerun the same command, finished points are reused)\n")


def partial_report(args, model, lines):
    """Tables of every point already on disk (no computation): what a killed / unfinished run has measured."""
    base = json.loads((Path(args.out) / "e1" / "baseline.json").read_text())
    lines.append(f"baseline: top-1 {base['top1']:.2f}, {base['params']} params, {base['macs']} MACs\n")
    lines.append("| stage | method | rank rule | params CR % | MACs reduction | NMSE | mean rel_frob_err | "
                 "mean rel_sigma_err | top-1 before FT | top-1 |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    pts = {}
    for stage in ("e1", "e2", "e3"):
        for f in sorted((Path(args.out) / stage / "points").glob("*.json"), key=lambda f: f.stat().st_mtime):
            p = json.loads(f.read_text())
            nm = nmse_of(p, model) if p.get("model_dir") and p["method"].startswith("norton") else float("nan")
            pts[(stage, p["method"], p["rank_rule"])] = p
            lines.append(f"| {stage} | {p['method']} | {p['rank_rule']} | {100 * (1 - p['params'] / base['params']):.2f} "
                         f"| {base['macs'] / p['macs']:.2f}x | {nm:.4f} | {p['mean_rel_frob_err']:.4f} | "
                         f"{(p['mean_rel_sigma_err'] or float('nan')):.4f} | {p.get('top1_before_ft', float('nan')):.2f} "
                         f"| {p['top1']:.2f} |")
    lines.append("")
    for r in (1, 2, 3):
        a = pts.get(("e1", "norton-cp-sigma", f"fixed CP rank R={r}"))
        b = pts.get(("e1", "norton-cp", f"fixed CP rank R={r}"))
        if a and b:
            lines.append(f"- R={r}: norton-cp-sigma {a['top1']:.2f} vs norton-cp {b['top1']:.2f} "
                         f"({a['top1'] - b['top1']:+.2f} points)")
    lines.append("")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", default="e1,e2", help="comma-separated subset of e1,e2,e3,e4; 'partial' tabulates the points on disk only")
    p.add_argument("--out", default=str(REPO / "outputs" / "norton_fmnist"), help="point directory (resumable)")
    p.add_argument("--max-iter", type=int, default=100, help="ALS sweeps cap")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--result", default=str(REPO / "benchmarks" / "results" / "norton_fmnist.txt"))
    p.add_argument("--ft-epochs", type=int, default=1, help="E3/E4 fine-tuning epochs (identical for every arm)")
    p.add_argument("--ft-subset", type=int, default=10_000, help="E3/E4 fine-tuning images")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    stages = set(args.stages.split(","))
    tic = time.time()
    model, _ = prepare_model(base_config(args, "e1", methods=("norton-cp",), cp_rank=1))
    lines = [f"# NORTON on vgg-fmnist (benchmarks/norton_fmnist.py --stages {args.stages})\n",
             f"decomposed layers: {', '.join(_layers(model))} (first conv dense); eval: 10k test images\n"]
    rows = base = None
    if "partial" in stages:
        partial_report(args, model, lines)
    if stages & {"e1", "e2"}:
        rows, base = e1(args, model, lines)
    if "e2" in stages:
        e2(args, model, rows, base, lines)
    if stages & {"e3", "e4"}:
        e3_e4(args, model, lines)
    lines.append(f"total wall time {time.time() - tic:.0f} s (resumed points are read from disk)")
    Path(args.result).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

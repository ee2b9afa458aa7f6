"""Table 3 of the TDLRT paper (LeNet5, Fashion-MNIST) from our run directories, beside the paper's numbers.

Each row reports, per run, the epoch of minimum validation loss (DLRT-Net's convention, pre-registered in the TDLRT
spec Sec. 4): test top-1 and eval CR there, plus how many of the configured epochs the run has finished, so partial
runs are labelled as such.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path

from pipeline.tdlrt import TDLRTConfig, read_history, run_dir

__all__ = ["PAPER_TABLE_3", "tdlrt_table_3"]

# (method, tau) -> (test acc mean, std, eval CR mean, eval CR std); Zangrando et al. 2023, Table 3.
PAPER_TABLE_3 = {
    ("sgd-baseline", None): (90.86, 0.10, 0.0, 0.0),
    ("tdlrt", 0.1): (87.42, 0.73, 94.42, 0.17),
    ("tdlrt", 0.15): (88.89, 0.19, 96.92, 0.11),
    ("tdlrt", 0.2): (88.86, 0.11, 97.00, 0.05),
    ("tdlrt", 0.3): (88.71, 0.04, 97.10, 0.02),
}


def _fmt(values: Sequence[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def tdlrt_table_3(output_dir: str | Path, taus: Sequence[float] = (0.1, 0.15, 0.2, 0.3),
                  seeds: Sequence[int] = (0, 1, 2, 3, 4), epochs: int = 70, base: TDLRTConfig | None = None) -> dict:
    """Collect the runs under ``output_dir`` into Table 3 (markdown text plus rows)."""
    base = base or TDLRTConfig()
    rows = []
    specs = [("sgd-baseline", None)] + [("tdlrt", t) for t in taus]
    for method, tau in specs:
        accs, crs, reached, used, ranks = [], [], [], [], []
        for seed in seeds:
            cfg = TDLRTConfig(**{**base.__dict__, "method": method, "tau": tau if tau is not None else 0.0,
                                 "seed": seed, "epochs": epochs})
            hist = read_history(run_dir(cfg, output_dir))
            if hist is None or not hist["history"]:
                continue
            best = hist["best"]
            accs.append(best["test_top1"])
            crs.append(best["eval_cr"])
            reached.append(len(hist["history"]))
            used.append(seed)
            ranks.append(best["ranks"])
        paper = PAPER_TABLE_3.get((method, tau))
        rows.append({"method": method, "tau": tau, "seeds": used, "epochs_reached": reached, "test_top1": accs,
                     "eval_cr": crs, "ranks_best": ranks, "paper": paper})
    lines = ["| method | τ | seeds run | epochs reached (of %d) | test top-1 [%%] (best val epoch) | paper | "
             "eval CR [%%] | paper | ranks at best epoch (seed %s) |" % (epochs, "first"),
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p = r["paper"]
        paper_acc = f"{p[0]:.2f} ± {p[1]:.2f}" if p else "-"
        paper_cr = f"{p[2]:.2f} ± {p[3]:.2f}" if p else "-"
        name = "Baseline (dense SGD)" if r["method"] == "sgd-baseline" else "TDLRT"
        lines.append(f"| {name} | {'' if r['tau'] is None else r['tau']} | {','.join(map(str, r['seeds'])) or '-'} | "
                     f"{','.join(map(str, r['epochs_reached'])) or '-'} | {_fmt(r['test_top1'])} | {paper_acc} | "
                     f"{_fmt(r['eval_cr']) if r['method'] != 'sgd-baseline' else '0.0'} | {paper_cr} | "
                     f"{r['ranks_best'][0] if r['ranks_best'] else '-'} |")
    return {"rows": rows, "text": "\n".join(lines)}

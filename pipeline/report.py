"""Tables (terminal / Markdown) and the accuracy-vs-compression plot."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pipeline._io import atomic_path

__all__ = [
    "format_table",
    "summary_table",
    "layer_table",
    "plot_accuracy_vs_compression",
    "load_trials",
    "aggregate_trials",
    "plot_sweep_by_source",
    "plot_sweep_by_method",
    "plot_sweep_by_n",
    "sweep_markdown",
    "run_report",
]


# Fixed decimals per column, so that one column never shows 0.9300 beside 1.76.
_COLUMN_DECIMALS = {"top1": 2, "top5": 2, "top1_drop": 2, "compression_rate": 2, "mac_reduction": 2,
                    "mean_rel_sigma_err": 4, "mean_rel_frob_err": 4, "rel_sigma_err": 4, "rel_frob_err": 4,
                    "decompose_seconds": 2, "seconds": 2}


def _fmt(value: object, decimals: int | None = None) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and decimals is not None:
        return f"{value:.{decimals}f}"
    if isinstance(value, float):
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3e}"
        return f"{value:.4f}" if abs(value) < 1 else f"{value:.2f}"
    if isinstance(value, int) and abs(value) >= 10_000:
        return f"{value:,}"
    return str(value)


def format_table(rows: Sequence[dict], columns: Sequence[tuple[str, str]], markdown: bool = False) -> str:
    """Render rows as an aligned text table (or a Markdown table).

    Parameters
    ----------
    rows : sequence of dict
    columns : sequence of (key, header)
    """
    cells = [[_fmt(row.get(key), _COLUMN_DECIMALS.get(key)) for key, _ in columns] for row in rows]
    headers = [header for _, header in columns]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(headers)]
    if markdown:
        lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |",
                 "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
        lines += ["| " + " | ".join(c.rjust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    else:
        lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths)), "  ".join("-" * w for w in widths)]
        lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


SUMMARY_COLUMNS = (
    ("method", "method"),
    ("rank_rule", "ranks"),
    ("top1", "top1 %"),
    ("top1_drop", "drop"),
    ("params", "params"),
    ("macs", "MACs"),
    ("compression_rate", "CR"),
    ("mac_reduction", "MAC red."),
    ("mean_rel_sigma_err", "mean rel_sigma_err"),
    ("mean_rel_frob_err", "mean rel_frob_err"),
    ("decompose_seconds", "decomp s"),
)

LAYER_COLUMNS = (
    ("method", "method"),
    ("rank_rule", "rule"),
    ("name", "layer"),
    ("kernel_shape", "kernel"),
    ("ranks", "ranks"),
    ("rel_sigma_err", "rel_sigma_err"),
    ("rel_frob_err", "rel_frob_err"),
    ("iterations", "iters"),
    ("seconds", "seconds"),
    ("error", "error"),
)


def summary_table(baseline: dict, points: Sequence[dict], markdown: bool = False) -> str:
    """The accuracy-vs-compression table: the original model first, then one row per compressed model."""
    first = {"method": "original", "rank_rule": "-", "top1": baseline["top1"], "top1_drop": 0.0,
             "params": baseline["params"], "macs": baseline["macs"], "compression_rate": 1.0, "mac_reduction": 1.0}
    return format_table([first, *points], SUMMARY_COLUMNS, markdown=markdown)


def layer_table(points: Sequence[dict], markdown: bool = False) -> str:
    """Per-layer errors and timings of every compressed model."""
    rows = []
    for point in points:
        for layer in point["layers"]:
            rows.append({**layer, "method": point["method"], "rank_rule": point["rank_rule"],
                         "kernel_shape": "x".join(map(str, layer["kernel_shape"])),
                         "ranks": ",".join(map(str, layer["ranks"])) or "-",
                         "error": (layer["error"] or "").split("\n")[0][:40] or None})
    return format_table(rows, LAYER_COLUMNS, markdown=markdown)


def plot_accuracy_vs_compression(baseline: dict, points: Sequence[dict], path: str | Path, title: str) -> Path:
    """PNG of top-1 against compression rate, one line per method (paper Figures 1-2 style)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    labelled: set = set()
    for method in sorted({p["method"] for p in points}):
        pts = sorted((p["compression_rate"], p["top1"], p.get("alpha")) for p in points if p["method"] == method)
        xs, ys, alphas = zip(*pts)
        ax.plot(xs, ys, marker="o", label=method)
        for x, y, a in pts:
            if a is not None and (x, a) not in labelled:
                labelled.add((x, a))
                ax.annotate(f"a={a:g}", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.axhline(baseline["top1"], color="gray", linestyle="--", label=f"original ({baseline['top1']:.2f}%)")
    ax.set_xlabel("compression rate (params original / params compressed)")
    ax.set_ylabel("top-1 accuracy (%), no fine-tuning")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save_png(fig, path)


# --------------------------------------------------------------------------- #
# Sweep reports (from the sweep's Parquet table)
# --------------------------------------------------------------------------- #
def load_trials(parquet_path: str | Path) -> list[dict]:
    """Rows of a sweep's ``trials.parquet`` as dicts (one per trial)."""
    import pyarrow.parquet as pq

    path = Path(parquet_path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run the sweep first (it writes <output_dir>/trials.parquet)")
    return pq.read_table(path).to_pylist()


def aggregate_trials(rows: Sequence[dict]) -> list[dict]:
    """Mean (and spread) over seeds of each (method, Sigma source, N, alpha) point, sorted."""
    import statistics

    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["method"], row.get("sigma_source"), row.get("n_samples"), row["alpha"]), []).append(row)
    out = []
    for (method, source, n, alpha), members in groups.items():
        top1 = [m["top1"] for m in members]

        def mean(key, members=members):
            vals = [m[key] for m in members if m.get(key) is not None]
            return sum(vals) / len(vals) if vals else None

        out.append({"method": method, "sigma_source": source, "n_samples": n, "alpha": alpha,
                    "top1": mean("top1"), "top1_std": statistics.stdev(top1) if len(top1) > 1 else 0.0,
                    "top5": mean("top5"), "compression_rate": mean("compression_rate"),
                    "mac_reduction": mean("mac_reduction"), "mean_rel_sigma_err": mean("mean_rel_sigma_err"),
                    "mean_rel_frob_err": mean("mean_rel_frob_err"), "seeds": len(members)})
    return sorted(out, key=lambda r: (r["method"], r["sigma_source"] or "", r["n_samples"] or 0, r["alpha"]))


def _curves(points: Sequence[dict], label_of) -> dict[str, list[dict]]:
    curves: dict[str, list[dict]] = {}
    for p in points:
        curves.setdefault(label_of(p), []).append(p)
    return {k: sorted(v, key=lambda p: p["compression_rate"]) for k, v in sorted(curves.items())}


def _panel_plot(panels: dict[str, dict[str, list[dict]]], baseline_top1: float | None, path: str | Path,
                title: str) -> Path:
    """One subplot per panel, one line (top-1 vs compression rate, seed spread as error bars) per curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, max(1, len(panels)))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.0 * rows), dpi=110, squeeze=False, sharey=True)
    for ax, (panel, curves) in zip(axes.flat, panels.items()):
        for label, pts in curves.items():
            ax.errorbar([p["compression_rate"] for p in pts], [p["top1"] for p in pts],
                        yerr=[p["top1_std"] for p in pts], marker="o", capsize=2, label=label)
        if baseline_top1 is not None:
            ax.axhline(baseline_top1, color="gray", linestyle="--", label=f"original ({baseline_top1:.2f}%)")
        ax.set_title(panel, fontsize=9)
        ax.set_xlabel("compression rate (params original / compressed)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[:, 0]:
        ax.set_ylabel("top-1 accuracy (%), no fine-tuning")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=10)
    return _save_png(fig, path)


def _n_label(p: dict, many_n: bool) -> str:
    return f" N={p['n_samples']}" if many_n and p.get("n_samples") else ""


def plot_sweep_by_source(rows: Sequence[dict], path: str | Path, title: str = "") -> Path:
    """Accuracy vs compression, one panel per Sigma source, one line per method (paper Fig. 2 style).

    Methods that do not use Sigma (no source) are drawn in every panel as the reference.
    """
    agg = aggregate_trials(rows)
    many_n = len({p["n_samples"] for p in agg if p["n_samples"]}) > 1
    sources = sorted({p["sigma_source"] for p in agg if p["sigma_source"]}) or ["(no Sigma)"]
    panels = {f"Sigma from {s}": _curves([p for p in agg if p["sigma_source"] in (s, None)],
                                         lambda p: p["method"] + _n_label(p, many_n)) for s in sources}
    return _panel_plot(panels, _baseline_top1(rows), path, title or "accuracy vs compression per Sigma source")


def plot_sweep_by_method(rows: Sequence[dict], path: str | Path, title: str = "") -> Path:
    """Accuracy vs compression, one panel per method, one line per Sigma source (and N) (paper Fig. 1 style)."""
    agg = aggregate_trials(rows)
    many_n = len({p["n_samples"] for p in agg if p["n_samples"]}) > 1
    panels = {m: _curves([p for p in agg if p["method"] == m],
                         lambda p: (p["sigma_source"] or "no Sigma") + _n_label(p, many_n))
              for m in sorted({p["method"] for p in agg})}
    return _panel_plot(panels, _baseline_top1(rows), path, title or "accuracy vs compression per method")


def plot_sweep_by_n(rows: Sequence[dict], path: str | Path, title: str = "") -> Path | None:
    """Top-1 against the Sigma sample size N (paper App. G), one line per (method, source, alpha).

    Returns None (and writes nothing) when the sweep has a single N.
    """
    import matplotlib

    agg = [p for p in aggregate_trials(rows) if p["n_samples"]]
    if len({p["n_samples"] for p in agg}) < 2:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
    lines: dict[str, list[dict]] = {}
    for p in agg:
        lines.setdefault(f"{p['method']} / {p['sigma_source']} / a={p['alpha']:g}", []).append(p)
    for label, pts in sorted(lines.items()):
        pts = sorted(pts, key=lambda p: p["n_samples"])
        ax.errorbar([p["n_samples"] for p in pts], [p["top1"] for p in pts], yerr=[p["top1_std"] for p in pts],
                    marker="o", capsize=2, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("images used for Sigma (N)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title or "accuracy vs Sigma sample size", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    return _save_png(fig, path)


def _baseline_top1(rows: Sequence[dict]) -> float | None:
    values = [r["baseline_top1"] for r in rows if r.get("baseline_top1") is not None]
    return values[0] if values else None


SWEEP_COLUMNS = (
    ("method", "method"),
    ("sigma_source", "Sigma source"),
    ("n_samples", "N"),
    ("alpha", "alpha"),
    ("top1", "top1 %"),
    ("top1_std", "+-"),
    ("top5", "top5 %"),
    ("compression_rate", "CR"),
    ("mac_reduction", "MAC red."),
    ("mean_rel_sigma_err", "mean rel_sigma_err"),
    ("mean_rel_frob_err", "mean rel_frob_err"),
    ("seeds", "seeds"),
)


def sweep_markdown(rows: Sequence[dict], title: str = "Sweep results") -> str:
    """Markdown summary: the original model, then per Sigma source a table of every (method, N, alpha) point."""
    agg = aggregate_trials(rows)
    first = rows[0] if rows else {}
    lines = [f"# {title}", "",
             (f"{len(rows)} trials; model `{first.get('model', '?')}`; original top-1 "
              f"{_fmt(first.get('baseline_top1'))} %, {_fmt(first.get('baseline_params'))} params, "
              f"{_fmt(first.get('baseline_macs'))} MACs; accuracy without fine-tuning "
              "(mean over seeds, +- their standard deviation)."), ""]
    free = [p for p in agg if not p["sigma_source"]]
    for source in sorted({p["sigma_source"] for p in agg if p["sigma_source"]}):
        lines += [f"## Sigma from {source}", "",
                  format_table([p for p in agg if p["sigma_source"] == source] + free, SWEEP_COLUMNS,
                               markdown=True), ""]
    if not any(p["sigma_source"] for p in agg):
        lines += ["## Results", "", format_table(agg, SWEEP_COLUMNS, markdown=True), ""]
    return "\n".join(lines)


def run_report(parquet_path: str | Path, out_dir: str | Path, tracking=None) -> dict:
    """Plots and Markdown summary of a sweep's Parquet table, logged to MLflow when ``tracking`` is given.

    Parameters
    ----------
    parquet_path : str or Path
        ``<sweep output>/trials.parquet``.
    out_dir : str or Path
        Where ``by_source.png``, ``by_method.png``, ``by_n.png`` (several N only) and ``summary.md`` go.
    tracking : pipeline.tracking.Tracker, optional
        Logs everything (and the Parquet table) as artifacts of one run named ``sweep-report``.

    Returns
    -------
    dict
        Paths of what was written (``by_source``, ``by_method``, ``by_n``, ``markdown``) and ``trials``.
    """
    from pipeline._io import atomic_write_text

    rows = load_trials(parquet_path)
    if not rows:
        raise ValueError(f"{parquet_path} has no trials: nothing to report")
    out = Path(out_dir)
    title = f"{rows[0].get('model', 'model')}: accuracy vs compression rate"
    paths = {"by_source": plot_sweep_by_source(rows, out / "by_source.png", title + " per Sigma source"),
             "by_method": plot_sweep_by_method(rows, out / "by_method.png", title + " per method"),
             "by_n": plot_sweep_by_n(rows, out / "by_n.png")}
    paths["markdown"] = out / "summary.md"
    atomic_write_text(paths["markdown"], sweep_markdown(rows, title))
    if tracking is not None:
        with tracking.run("sweep-report", {"kind": "report", "trials": len(rows), "parquet": str(parquet_path)}):
            for path in paths.values():
                if path is not None:
                    tracking.log_artifact(path, "report")
            tracking.log_artifact(parquet_path, "report")
    return {**{k: (str(v) if v is not None else None) for k, v in paths.items()}, "trials": len(rows)}


def method_comparison(points: Sequence[dict], method: str = "tucker2-als-sigma",
                      reference: str = "tucker2-als") -> list[str]:
    """Lines comparing two methods at each shared rank rule (same ranks, so same compression).

    For every rule: how many layers ``method`` has a rel_sigma_err <= ``reference``'s, and the ratio of
    their top-1 drops (the paper's claim: the Sigma method loses far less accuracy without fine-tuning).
    """
    by_rule: dict[str, dict[str, dict]] = {}
    for point in points:
        by_rule.setdefault(point["rank_rule"], {})[point["method"]] = point
    lines = []
    for rule, pair in by_rule.items():
        if method not in pair or reference not in pair:
            continue
        mine, ref = pair[method], pair[reference]
        errs = [(a["rel_sigma_err"], b["rel_sigma_err"]) for a, b in zip(mine["layers"], ref["layers"])
                if a["rel_sigma_err"] is not None and b["rel_sigma_err"] is not None]
        better = sum(a <= b * (1 + 1e-9) for a, b in errs)
        ratio = mine["top1_drop"] / ref["top1_drop"] if ref["top1_drop"] > 0 else float("nan")
        lines.append(
            f"{rule}: rel_sigma_err {method} <= {reference} on {better}/{len(errs)} layers; top-1 drop "
            f"{mine['top1_drop']:.2f} vs {ref['top1_drop']:.2f} points (ratio {ratio:.2f})"
        )
    return lines


def comparison_summary(points: Sequence[dict], method: str = "tucker2-als-sigma", reference: str = "tucker2-als",
                       big_drop: float = 10.0) -> list[str]:
    """The prose claims of the comparison, computed from ``points`` (the README quotes them as printed).

    One sentence on the first rank rule (in run order) where ``reference`` loses at least ``big_drop`` top-1
    points, one on the rules where ``method`` has the lower Sigma-norm error on every layer, one on the last rule.
    """
    pairs: dict[str, dict[str, dict]] = {}
    for point in points:
        pairs.setdefault(point["rank_rule"], {})[point["method"]] = point
    pairs = {rule: pair for rule, pair in pairs.items() if method in pair and reference in pair}
    if not pairs:
        return []
    lines = []
    big = next(((rule, pair) for rule, pair in pairs.items() if pair[reference]["top1_drop"] >= big_drop), None)
    if big is None:
        lines.append(f"{reference} loses less than {big_drop:g} top-1 points at every rank rule.")
    else:
        rule, pair = big
        mine, ref = pair[method]["top1_drop"], pair[reference]["top1_drop"]
        lines.append(f"At {rule}, the first rank rule where {reference} loses >= {big_drop:g} top-1 points, {method} "
                     f"loses {mine:.2f} points against {ref:.2f} ({mine / ref:.2f}x).")
    every = [rule for rule, pair in pairs.items()
             if all(a["rel_sigma_err"] is not None and b["rel_sigma_err"] is not None
                    and a["rel_sigma_err"] <= b["rel_sigma_err"] * (1 + 1e-9)
                    for a, b in zip(pair[method]["layers"], pair[reference]["layers"]))]
    lines.append(f"{method} has the lower Sigma-norm error on every layer at {len(every)} of {len(pairs)} rank "
                 "rules.")
    rule, pair = list(pairs.items())[-1]
    mine, ref = pair[method], pair[reference]
    ratio = f"{mine['top1_drop'] / ref['top1_drop']:.2f}" if ref["top1_drop"] > 0 else "n/a"
    lines.append(f"At {rule} ({ref['compression_rate']:.2f}x fewer parameters) the drop ratio is {ratio} "
                 f"({mine['top1_drop']:.2f} vs {ref['top1_drop']:.2f} points).")
    return lines


def _save_png(fig, path: str | Path) -> Path:
    """Lay out ``fig``, write it atomically as PNG (a killed run leaves no half-written plot) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path

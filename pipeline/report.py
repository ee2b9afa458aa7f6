"""Tables (terminal / Markdown) and the accuracy-vs-compression plot."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pipeline._io import atomic_path

__all__ = ["format_table", "summary_table", "layer_table", "plot_accuracy_vs_compression"]


def _fmt(value: object) -> str:
    if value is None:
        return "-"
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
    cells = [[_fmt(row.get(key)) for key, _ in columns] for row in rows]
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
    for method in sorted({p["method"] for p in points}):
        pts = sorted((p["compression_rate"], p["top1"], p.get("alpha")) for p in points if p["method"] == method)
        xs, ys, alphas = zip(*pts)
        ax.plot(xs, ys, marker="o", label=method)
        for x, y, a in pts:
            if a is not None:
                ax.annotate(f"a={a:g}", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.axhline(baseline["top1"], color="gray", linestyle="--", label=f"original ({baseline['top1']:.2f}%)")
    ax.set_xlabel("compression rate (params original / params compressed)")
    ax.set_ylabel("top-1 accuracy (%), no fine-tuning")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path

"""The demo's acceptance checks on the real reference model (slow: trains it if it is not cached)."""

from __future__ import annotations

import pytest

from jobs.cli import build_parser, compress_config
from pipeline.runner import run_compress


@pytest.mark.slow
def test_demo_sigma_beats_frobenius(tmp_path):
    args = build_parser().parse_args(["demo", "--no-progress", "--no-mlflow", "--no-save-models",
                                      "--output-dir", str(tmp_path / "demo")])
    result = run_compress(compress_config(args))
    assert result["baseline"]["top1"] >= 90.0
    by_alpha: dict = {}
    for point in result["points"]:
        by_alpha.setdefault(point["alpha"], {})[point["method"]] = point
    big_losses = 0
    for alpha, pair in by_alpha.items():
        sig, frob = pair["tucker2-als-sigma"], pair["tucker2-als"]
        assert sig["params"] == frob["params"]
        for ls, lf in zip(sig["layers"], frob["layers"]):
            assert ls["rel_sigma_err"] <= lf["rel_sigma_err"] * (1 + 1e-9), (alpha, ls["name"])
        assert sig["top1"] >= frob["top1"], alpha
        if frob["top1_drop"] >= 10 and big_losses == 0:
            # The first alpha where the Frobenius baseline loses >= 10 points: Sigma loses at most half.
            assert sig["top1_drop"] <= 0.5 * frob["top1_drop"], (alpha, sig["top1_drop"], frob["top1_drop"])
            big_losses += 1
    assert big_losses == 1, "no alpha made the Frobenius baseline lose >= 10 points"

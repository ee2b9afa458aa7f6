"""The comparison: size control by bisection, resumable points, latency columns, leaderboard files."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd
import pytest
import torch

from pipeline import compare as compare_mod
from pipeline import runner as runner_mod
from pipeline.compare import CompareConfig, Target, _size, fit_fraction, parse_targets, run_compare
from pipeline.compress import SigmaSource
from pipeline.data import DatasetSpec
from pipeline.latency import LatencyConfig
from pipeline.methods import SolverOptions
from pipeline.models import build_model
from pipeline.runner import CompressConfig, plan_points


def _template(tmp_path: Path, weights: Path) -> CompressConfig:
    return CompressConfig(
        model="vgg-fmnist", weights=str(weights), sigma=SigmaSource(DatasetSpec("fashion-mnist"), n_samples=32,
                                                                     batch_size=16),
        eval_limit=64, output_dir=str(tmp_path / "cmp"), cache_dir=str(tmp_path / "cache"), progress=False,
        batch_size=64, solver=SolverOptions(max_iter=4), track=False)


def test_parse_targets_and_bad_input():
    assert parse_targets("cr3, mac2.5") == (Target("cr", 3.0), Target("mac", 2.5))
    for bad, match in (("cr", "bad target"), ("x5", "bad target"), ("cr1", "> 1"), ("cr0.5", "> 1")):
        with pytest.raises(ValueError, match=match):
            parse_targets(bad)


def test_unknown_method_and_empty_targets_are_clear_errors(tmp_path, vgg_weights):
    with pytest.raises(ValueError, match="unknown method"):
        CompareConfig(_template(tmp_path, vgg_weights), methods=("nope",))
    with pytest.raises(ValueError, match="targets is empty"):
        CompareConfig(_template(tmp_path, vgg_weights), targets=())


def test_fit_fraction_meets_target_or_says_why(vgg_weights):
    model = build_model("vgg-fmnist", weights=vgg_weights).eval()
    shape = (1, 28, 28)
    config = CompressConfig(model="vgg-fmnist", methods=("tucker2-als",), fraction=0.5, track=False)
    assignment = plan_points(model, config)[0]["tucker2-als"]
    baseline = {"params": compare_mod.count_params(model), "macs": compare_mod.count_macs(model, (1, *shape))}
    fit = fit_fraction(model, assignment, Target("cr", 1.5), baseline, shape)
    assert fit.within and abs(fit.achieved / 1.5 - 1) <= 0.03
    too_far = fit_fraction(model, assignment, Target("cr", 1e4), baseline, shape)
    assert too_far.fraction is None and "unreachable" in too_far.note and "smallest model" in too_far.note


def test_compare_runs_resumes_and_writes_leaderboard(tmp_path, vgg_weights, monkeypatch):
    config = CompareConfig(_template(tmp_path, vgg_weights), targets=(Target("cr", 1.5), Target("mac", 3.0)),
                           methods=("tucker2-als", "tucker2-als-sigma", "cp-als"), onnx=False,
                           latency=LatencyConfig(threads=1, batch_sizes=(1, 8), warmup=1, runs=3))
    result = run_compare(config)
    frame = pd.read_parquet(result["parquet"])
    assert Path(result["markdown"]).read_text().count("|") > 20 and Path(result["plot"]).stat().st_size > 1000
    points = frame[frame["method"] != "original"]
    assert len(points) == 6 and set(points["target"]) == {"cr1.5", "mac3"}
    model = build_model("vgg-fmnist", weights=vgg_weights).eval()
    for _, row in points.iterrows():
        # achieved within 3 % of the target, and the size control predicted the real model's size exactly
        assert abs(row["achieved"] / row["target_value"] - 1) <= 0.03, row.to_dict()
        assignment = plan_points(model, runner_mod.CompressConfig(methods=(row["method"],), fraction=0.5,
                                                                  track=False))[0][row["method"]]
        assert _size(model, assignment, row["fraction"], (1, 28, 28)) == (row["params"], row["macs"])
        assert row["speedup_b8"] > 0 and row["torch_ms_b1"] > 0
    assert frame[frame["method"] == "original"]["speedup_b1"].item() == 1.0

    calls = []
    monkeypatch.setattr(runner_mod, "compress_model", lambda *a, **k: calls.append(1) or (_ for _ in ()).throw(
        AssertionError("a finished point was recomputed")))
    again = run_compare(dataclasses.replace(config, latency=None))
    assert calls == [] and len(pd.read_parquet(again["parquet"])) == len(frame)


def test_target_no_method_can_reach_is_a_clear_error(tmp_path, vgg_weights):
    config = CompareConfig(_template(tmp_path, vgg_weights), targets=(Target("cr", 50.0),),
                           methods=("tucker2-als",), latency=None)
    with pytest.raises(ValueError, match="no method can reach target cr50: tucker2-als: unreachable"):
        run_compare(config)


def test_cli_compare_flags(tmp_path):
    from jobs.cli import build_parser, compress_config, main
    from jobs.cli_compare import compare_config

    args = build_parser().parse_args(["compare", "--targets", "cr3,mac2", "--methods", "tucker2-als,cp-als",
                                      "--latency-runs", "5", "--no-onnx", "--output-dir", str(tmp_path)])
    config = compare_config(args, compress_config)
    assert config.targets == (Target("cr", 3.0), Target("mac", 2.0)) and config.methods == ("tucker2-als", "cp-als")
    assert config.latency.runs == 5 and not config.onnx and config.compress.output_dir == str(tmp_path)
    assert main(["compare", "--fraction", "0.5", "--output-dir", str(tmp_path)]) == 2  # a clear error, exit 2
    assert main(["compare", "--targets", "cr", "--output-dir", str(tmp_path)]) == 2

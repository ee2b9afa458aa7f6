"""End-to-end compress job on real Fashion-MNIST images (small N, random-init reference architecture)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
import torch

from jobs.cli import build_parser, compress_config, main
from pipeline.compress import SigmaSource, load_compressed
from pipeline.data import DatasetSpec
from pipeline.methods import SolverOptions
from pipeline.runner import CompressConfig, run_compress
from sigma_core import Tucker2Conv, get_module




def _config(tmp_path: Path, weights: Path, **overrides) -> CompressConfig:
    base = dict(
        model="vgg-fmnist", weights=str(weights) if weights else None,
        sigma=SigmaSource(DatasetSpec("fashion-mnist"), n_samples=48, batch_size=16),
        eval_limit=64, alphas=(0.9,), output_dir=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"),
        progress=False, batch_size=64, solver=SolverOptions(max_iter=8),
        # Explicit, so that an MLFLOW_TRACKING_URI left by another test cannot redirect the runs.
        tracking_uri=f"sqlite:///{(tmp_path / 'out' / 'mlflow.db').resolve()}",
    )
    base.update(overrides)
    return CompressConfig(**base)


def test_compress_job_end_to_end(tmp_path, vgg_weights):
    config = _config(tmp_path, vgg_weights)
    result = run_compress(config)
    points = {p["method"]: p for p in result["points"]}
    assert set(points) == {"tucker2-als", "tucker2-als-sigma"}
    sig, frob = points["tucker2-als-sigma"], points["tucker2-als"]
    # Same rank rule -> same architecture and size for both methods.
    assert sig["params"] == frob["params"] and sig["compression_rate"] > 1.0
    assert sig["macs"] < result["baseline"]["macs"]
    for ls, lf in zip(sig["layers"], frob["layers"]):
        assert ls["name"] == lf["name"] and ls["ranks"] == lf["ranks"]
        assert ls["rel_sigma_err"] <= lf["rel_sigma_err"] * (1 + 1e-9)
    out = Path(config.output_dir)
    assert (out / "accuracy_vs_compression.png").stat().st_size > 1000
    assert "tucker2-als-sigma" in (out / "results.md").read_text()

    # The saved model rebuilds without the decomposition and gives the same outputs.
    rebuilt = load_compressed(sig["model_dir"])
    assert isinstance(get_module(rebuilt, sig["layers"][0]["name"]), Tucker2Conv)
    x = torch.randn(4, 1, 28, 28)
    saved_state = rebuilt.state_dict()
    again = load_compressed(sig["model_dir"])
    torch.testing.assert_close(again(x), rebuilt(x))
    assert set(saved_state) == set(again.state_dict())

    # MLflow (SQLite in the output dir): one parent run + one run per point.
    db = out / "mlflow.db"
    with sqlite3.connect(db) as conn:
        runs = conn.execute("select count(*) from runs").fetchone()[0]
        metrics = {r[0] for r in conn.execute("select distinct key from metrics")}
    assert runs == 3
    assert {"top1", "compression_rate", "baseline_top1"} <= metrics
    assert any(k.startswith("layer.") and k.endswith("rel_sigma_err") for k in metrics)


def test_compress_job_resumes(tmp_path, vgg_weights):
    config = _config(tmp_path, vgg_weights, methods=("tucker2-als-sigma",), alphas=(0.9, 1.0), track=False)
    first = run_compress(config)
    points_dir = Path(config.output_dir) / "points"
    files = sorted(points_dir.glob("*.json"))
    assert len(files) == 2
    # Remove one finished point: the rerun recomputes only it (the other file is untouched).
    keep, drop = files
    keep_mtime = keep.stat().st_mtime_ns
    drop.unlink()
    second = run_compress(config)
    assert keep.stat().st_mtime_ns == keep_mtime and drop.exists()
    assert [p["top1"] for p in first["points"]] == [p["top1"] for p in second["points"]]
    assert second["sigma_info"]["cached"] is True


def test_sigma_from_another_dataset(tmp_path, vgg_weights):
    config = _config(tmp_path, vgg_weights, methods=("tucker2-als-sigma",), track=False, save_models=False,
                     sigma=SigmaSource(DatasetSpec("digits"), n_samples=40, batch_size=20))
    result = run_compress(config)
    assert result["points"][0]["failed_layers"] == 0
    assert result["sigma_info"]["images"] == 40


def test_cli_parses_and_reports_bad_input(tmp_path, vgg_weights, capsys):
    args = build_parser().parse_args(["compress", "--model", "vgg-fmnist", "--weights", str(vgg_weights),
                                      "--alpha", "0.7,0.9", "-n", "32", "--layers", "features.4"])
    config = compress_config(args)
    assert config.alphas == (0.7, 0.9) and config.sigma.n_samples == 32 and config.layers == ("features.4",)
    code = main(["compress", "--model", "vgg-fmnist", "--weights", str(vgg_weights), "--layers", "nope.conv",
                 "--output-dir", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "c"), "--no-mlflow",
                 "--no-progress"])
    assert code == 2
    assert "nope.conv" in capsys.readouterr().err


def test_bad_configs(tmp_path, vgg_weights):
    with pytest.raises(ValueError, match="unknown method"):
        _config(tmp_path, vgg_weights, methods=("tucker9",))
    with pytest.raises(ValueError, match="needs --weights"):
        run_compress(_config(tmp_path, None, model="resnet18", track=False))
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        run_compress(_config(tmp_path, vgg_weights, track=False,
                             eval_dataset=DatasetSpec("fashion-mnist", root=str(tmp_path / "none"), split="test")))


def test_rank_too_large_is_reported_per_layer(tmp_path, vgg_weights):
    config = _config(tmp_path, vgg_weights, methods=("tucker2-als-sigma",), ranks=(100, 100), alphas=(),
                     track=False, save_models=False)
    result = run_compress(config)
    layers = result["points"][0]["layers"]
    # Layers with fewer than 100 channels fail with a clear message; the others are compressed.
    failed = [row for row in layers if row["error"]]
    assert failed and all("rank" in row["error"].lower() for row in failed)
    assert result["points"][0]["failed_layers"] == len(failed)
    saved = json.loads(next((Path(config.output_dir) / "points").glob("*.json")).read_text())
    assert saved["failed_layers"] == len(failed)

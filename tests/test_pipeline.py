"""End-to-end compress job on real Fashion-MNIST images (small N, random-init reference architecture)."""

from __future__ import annotations

import json
import sqlite3
import warnings
from pathlib import Path

import pytest
import torch

from jobs.cli import build_parser, compress_config, main
from pipeline.compress import SigmaSource, compute_sigmas, load_compressed
from pipeline.data import DatasetSpec
from pipeline.methods import SolverOptions
from pipeline.models import build_model
from pipeline.runner import CompressConfig, run_compress
from pipeline.sigma_cache import SigmaCache, SigmaKey, model_fingerprint
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
    rebuilt = load_compressed(out / sig["model_dir"])  # relative to the output dir
    assert isinstance(get_module(rebuilt, sig["layers"][0]["name"]), Tucker2Conv)
    x = torch.randn(4, 1, 28, 28)
    saved_state = rebuilt.state_dict()
    again = load_compressed(out / sig["model_dir"])  # relative to the output dir
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


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_sigma_cache_is_per_layer(tmp_path, vgg_weights, monkeypatch):
    from pipeline import compress

    captured: list[list[str]] = []  # the layers of each pass over the images
    real = compress.accumulate_sigma
    monkeypatch.setattr(compress, "accumulate_sigma",
                        lambda model, loader, names, **kw: captured.append(list(names)) or real(model, loader,
                                                                                                  names, **kw))
    model = build_model("vgg-fmnist", weights=vgg_weights).eval()
    source = SigmaSource(DatasetSpec("fashion-mnist"), n_samples=24, batch_size=12)
    a, b, c = "features.4", "features.7", "classifier.1"
    fresh, _ = compute_sigmas(model, [a, b, c], source, progress=False)  # no cache: the reference
    captured.clear()
    cache = SigmaCache(tmp_path / "sigma")
    key = SigmaKey(model_fingerprint(model), source.dataset.identity(), 24, 0, False)

    first, info = compute_sigmas(model, [a, b], source, cache=cache, progress=False)
    assert captured == [[a, b]] and info["computed_layers"] == [a, b] and not info["cached"]
    # One more layer: the two cached ones are loaded, only the new one is captured (and counted).
    second, info = compute_sigmas(model, [a, b, c], source, cache=cache, progress=False)
    assert captured == [[a, b], [c]]
    assert info["cached_layers"] == [a, b] and info["computed_layers"] == [c] and list(info["patches"]) == [c]
    assert list(second) == [a, b, c]
    for name in (a, b, c):
        assert torch.equal(second[name], fresh[name]), name
    # The whole-set key resolves to the per-layer entries (sweep trials read it); a rerun captures nothing.
    assert info["key"] == key.for_layers([a, b, c])
    assert list(cache.load(info["key"], [c, a])) == [c, a]
    third, info = compute_sigmas(model, [c, a, b], source, cache=cache, progress=False)
    assert len(captured) == 2 and info["cached"] and list(third) == [c, a, b]

    # A corrupt per-layer entry is detected, recomputed alone and rewritten.
    _flip_byte(tmp_path / "sigma" / f"{key.for_layers([b])}.safetensors", -100)
    with pytest.warns(UserWarning, match="corrupt"):
        fourth, info = compute_sigmas(model, [a, b, c], source, cache=cache, progress=False)
    assert captured[2:] == [[b]] and info["computed_layers"] == [b]
    assert all(torch.equal(fourth[name], fresh[name]) for name in (a, b, c))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compute_sigmas(model, [a, b, c], source, cache=cache, progress=False)
    assert len(captured) == 3
    # A per-layer entry removed behind the index's back: only that layer is captured again.
    for path in (tmp_path / "sigma").glob(f"{key.for_layers([c])}.*"):
        path.unlink()
    with pytest.warns(UserWarning, match="missing entry for layer classifier.1"):
        fifth, info = compute_sigmas(model, [a, b, c], source, cache=cache, progress=False)
    assert captured[3:] == [[c]] and torch.equal(fifth[c], fresh[c])


def test_whole_set_sigma_entries_of_older_runs_are_used(tmp_path, vgg_weights, monkeypatch):
    from pipeline import compress

    model = build_model("vgg-fmnist", weights=vgg_weights).eval()
    source = SigmaSource(DatasetSpec("fashion-mnist"), n_samples=12, batch_size=12)
    layers = ["features.4", "features.11"]
    want, _ = compute_sigmas(model, layers, source, progress=False)
    cache = SigmaCache(tmp_path)
    key = SigmaKey(model_fingerprint(model), source.dataset.identity(), 12, 0, False).for_layers(layers)
    cache.save(key, want, {"note": "what compute_sigmas wrote before the per-layer cache"})
    monkeypatch.setattr(compress, "accumulate_sigma", lambda *a, **k: pytest.fail("Sigma recomputed"))
    got, info = compute_sigmas(model, layers[::-1], source, cache=cache, progress=False)
    assert info["cached"] and info["key"] == key and list(got) == layers[::-1]
    assert all(torch.equal(got[name], want[name]) for name in layers)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{key}.json", f"{key}.safetensors"]  # left as it was


def test_explicit_cp_rank_and_svd_rank_points(tmp_path, vgg_weights):
    """Explicit ranks outside the alpha rule: a CP rank for every conv, an SVD rank for the linear layers."""
    cp = run_compress(_config(tmp_path, vgg_weights, methods=("cp-als", "cp-als-sigma"), cp_rank=6, alphas=(),
                              layers=("features.4",), save_models=False, track=False))
    for point in cp["points"]:
        assert point["slug"].startswith(f"{point['method']}-cprank6-")
        assert [layer["ranks"] for layer in point["layers"]] == [[6]]
    svd = run_compress(_config(tmp_path, vgg_weights, methods=("svd-sigma",), svd_rank=4, alphas=(),
                               save_models=False, track=False))
    (point,) = svd["points"]
    assert point["slug"].startswith("svd-sigma-svdrank4-")
    assert all(layer["ranks"] == [4] for layer in point["layers"]) and point["compression_rate"] > 1


def test_cp_rank_config_errors(tmp_path):
    with pytest.raises(ValueError, match="not CP methods"):
        _config(tmp_path, None, methods=("tucker2-als",), cp_rank=4)
    with pytest.raises(ValueError, match="only one of"):
        _config(tmp_path, None, methods=("cp-als",), cp_rank=4, fraction=0.5)
    with pytest.raises(ValueError, match="int >= 1"):
        _config(tmp_path, None, methods=("cp-als",), cp_rank=0)


def test_compute_sigmas_needs_layers(vgg_weights):
    model = build_model("vgg-fmnist", weights=vgg_weights).eval()
    with pytest.raises(ValueError, match="layer_names is empty"):
        compute_sigmas(model, [], SigmaSource(DatasetSpec("fashion-mnist"), n_samples=4), progress=False)


def test_tucker2_ranks_for_cp_methods_are_a_config_error(tmp_path):
    with pytest.raises(ValueError, match="Tucker-2 ranks"):
        _config(tmp_path, None, methods=("cp-als-sigma",), ranks=(8, 8))

"""Resume that cannot reuse the wrong result (issue 8.2, 8.3), checkpointed Sigma pass (8.11), MLflow on resume
(8.10, issue 9): every test here failed on main before these fixes."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from pipeline.compress import SigmaSource, compute_sigmas, load_compressed
from pipeline.data import DatasetSpec
from pipeline.fingerprint import result_key, verify_artifacts, weights_fingerprint
from pipeline.methods import SolverOptions
from pipeline.models import build_model
from pipeline.runner import CompressConfig, run_compress

pytestmark = pytest.mark.usefixtures("single_thread")

LAYERS = ("features.4", "features.7")


@pytest.fixture(scope="module")
def dataset_cache(tmp_path_factory):
    """One decompressed Fashion-MNIST copy for the module (each test's cache_dir links to it)."""
    return tmp_path_factory.mktemp("datasets")


@pytest.fixture(scope="module")
def other_vgg(tmp_path_factory):
    """VGG weights other than ``vgg_weights`` (another seed)."""
    from safetensors.torch import save_file

    torch.manual_seed(123)
    model = build_model("vgg-fmnist")
    path = tmp_path_factory.mktemp("w2") / "vgg2.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _cache(tmp_path: Path, dataset_cache: Path) -> Path:
    cache = tmp_path / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    if not (cache / "datasets").exists():
        (cache / "datasets").symlink_to(dataset_cache, target_is_directory=True)
    return cache


def _config(tmp_path, dataset_cache, weights, **overrides) -> CompressConfig:
    base = dict(model="vgg-fmnist", weights=str(weights), layers=LAYERS, methods=("tucker2-als-sigma",),
                sigma=SigmaSource(DatasetSpec("fashion-mnist"), n_samples=32, batch_size=16), eval_limit=48,
                alphas=(0.9,), output_dir=str(tmp_path / "out"), cache_dir=str(_cache(tmp_path, dataset_cache)),
                progress=False, batch_size=48, solver=SolverOptions(max_iter=3), track=False)
    base.update(overrides)
    return CompressConfig(**base)


def _stable(point: dict) -> dict:
    """A point without its timings (what must be equal between an interrupted and an uninterrupted run)."""
    drop = {"decompose_seconds", "seconds"}
    out = {k: v for k, v in point.items() if k not in drop}
    out["layers"] = [{k: v for k, v in row.items() if k not in drop} for row in point["layers"]]
    return out


# --------------------------------------------------------------------------- 8.2: keys hash the weights
def test_points_of_other_weights_are_never_reused(tmp_path, dataset_cache, vgg_weights, other_vgg):
    first = run_compress(_config(tmp_path, dataset_cache, vgg_weights))
    second = run_compress(_config(tmp_path, dataset_cache, other_vgg))  # same output dir, other weights
    fp1 = weights_fingerprint(build_model("vgg-fmnist", weights=vgg_weights))
    fp2 = weights_fingerprint(build_model("vgg-fmnist", weights=other_vgg))
    assert fp1 != fp2
    assert first["points"][0]["weights"] == fp1 and second["points"][0]["weights"] == fp2
    assert first["points"][0]["slug"] != second["points"][0]["slug"]
    assert second["baseline"]["fingerprint"] == fp2
    assert len(list((tmp_path / "out" / "points").glob("*.json"))) == 2


def test_result_key_covers_every_dependency():
    base = dict(model="vgg-fmnist", weights="abc", solver=SolverOptions(max_iter=3), n=10)
    key = result_key("demo", **base)
    assert key == result_key("demo", **dict(reversed(list(base.items()))))  # order-free
    for change in (dict(weights="abd"), dict(model="resnet-fmnist"), dict(solver=SolverOptions(max_iter=4)),
                   dict(n=11)):
        assert result_key("demo", **{**base, **change}) != key, change
    assert result_key("other", **base) != key


def test_fingerprint_sees_buffers_and_dtype(vgg_weights):
    model = build_model("vgg-fmnist", weights=vgg_weights)
    fp = weights_fingerprint(model)
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    bn.running_mean[0] += 1e-6  # a buffer, not a parameter
    assert weights_fingerprint(model) != fp
    bn.running_mean[0] -= 1e-6
    assert weights_fingerprint(model.double()) != fp


# --------------------------------------------------------------------------- 8.3: verified artifacts
@pytest.mark.parametrize("damage", ["truncate", "delete-models", "no-models-first"])
def test_resume_verifies_saved_models(tmp_path, dataset_cache, vgg_weights, damage):
    config = _config(tmp_path, dataset_cache, vgg_weights)
    out = Path(config.output_dir)
    if damage == "no-models-first":
        first = run_compress(_config(tmp_path, dataset_cache, vgg_weights, save_models=False))
        assert "model_dir" not in first["points"][0]
    else:
        first = run_compress(config)
        point = first["points"][0]
        assert not Path(point["model_dir"]).is_absolute()  # relative to the output dir
        weights = out / point["model_dir"] / "model.safetensors"
        if damage == "truncate":
            weights.write_bytes(weights.read_bytes()[:-200])
        else:
            shutil.rmtree(out / "models")
    with pytest.warns(UserWarning, match="recomputing"):
        again = run_compress(config)
    point = again["points"][0]
    assert verify_artifacts(out, point["artifacts"]) is None
    load_compressed(out / point["model_dir"])
    assert _stable(point)["top1"] == _stable(first["points"][0])["top1"]


def test_copied_output_folder_uses_its_own_models(tmp_path, dataset_cache, vgg_weights):
    config = _config(tmp_path, dataset_cache, vgg_weights)
    run_compress(config)
    copy = tmp_path / "copy"
    shutil.copytree(config.output_dir, copy)
    shutil.rmtree(config.output_dir)  # the original is gone: the copy must stand alone
    record = next((copy / "points").glob("*.json"))
    mtime = record.stat().st_mtime_ns
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is found wanting, nothing recomputed
        result = run_compress(_config(tmp_path, dataset_cache, vgg_weights, output_dir=str(copy)))
    assert record.stat().st_mtime_ns == mtime
    load_compressed(copy / result["points"][0]["model_dir"])


# --------------------------------------------------------------------------- kill / resume
def test_compress_killed_between_points_resumes_equal(tmp_path, dataset_cache, vgg_weights, monkeypatch):
    from pipeline import runner

    whole = run_compress(_config(tmp_path / "a", dataset_cache, vgg_weights, alphas=(0.8, 1.0)))
    config = _config(tmp_path / "b", dataset_cache, vgg_weights, alphas=(0.8, 1.0))
    real, calls = runner.compress_model, []

    def dies_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as a kill between points (the first point is on disk)
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "compress_model", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        run_compress(config)
    assert len(list((Path(config.output_dir) / "points").glob("*.json"))) == 1
    monkeypatch.setattr(runner, "compress_model", lambda *a, **k: calls.append(1) or real(*a, **k))
    resumed = run_compress(config)
    assert len(calls) == 3  # only the missing point ran again
    assert [_stable(p) for p in resumed["points"]] == [_stable(p) for p in whole["points"]]


def test_sigma_pass_killed_mid_way_continues_from_its_checkpoint(tmp_path, dataset_cache, vgg_weights,
                                                                 monkeypatch):
    from pipeline import sigma_checkpoint

    model = build_model("vgg-fmnist", weights=vgg_weights).eval()
    source = SigmaSource(DatasetSpec("fashion-mnist"), n_samples=40, batch_size=8)
    kwargs = dict(progress=False, data_cache_dir=dataset_cache, checkpoint_every=16)
    whole, _ = compute_sigmas(model, list(LAYERS), source, checkpoint_dir=tmp_path / "ck_a", **kwargs)

    real, chunks = sigma_checkpoint.accumulate_sigma, []

    def dies_on_third(*args, **kw):
        chunks.append(1)
        if len(chunks) == 3:
            raise KeyboardInterrupt  # killed in the last chunk: 32 of 40 images are checkpointed
        return real(*args, **kw)

    monkeypatch.setattr(sigma_checkpoint, "accumulate_sigma", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        compute_sigmas(model, list(LAYERS), source, checkpoint_dir=tmp_path / "ck_b", **kwargs)
    saved = list((tmp_path / "ck_b").glob("*.safetensors"))
    assert len(saved) == 1
    chunks.clear()
    monkeypatch.setattr(sigma_checkpoint, "accumulate_sigma", lambda *a, **k: chunks.append(1) or real(*a, **k))
    resumed, info = compute_sigmas(model, list(LAYERS), source, checkpoint_dir=tmp_path / "ck_b", **kwargs)
    assert len(chunks) == 1  # only the last chunk was read again
    assert not saved[0].exists()  # removed once the pass is complete
    for name in LAYERS:
        # Same chunks merged in the same order on the same machine: the same sums.
        assert torch.equal(resumed[name], whole[name]), name
    # ... and a checkpointed pass agrees with a single pass to rounding.
    single, _ = compute_sigmas(model, list(LAYERS), source, progress=False, data_cache_dir=dataset_cache)
    for name in LAYERS:
        torch.testing.assert_close(resumed[name], single[name], rtol=1e-10, atol=1e-12)


def test_damaged_sigma_checkpoint_is_ignored(tmp_path, dataset_cache, vgg_weights, monkeypatch):
    from pipeline import sigma_checkpoint

    model = build_model("vgg-fmnist", weights=vgg_weights).eval()
    source = SigmaSource(DatasetSpec("fashion-mnist"), n_samples=24, batch_size=8)
    kwargs = dict(progress=False, data_cache_dir=dataset_cache, checkpoint_every=8,
                  checkpoint_dir=tmp_path / "ck")
    real, chunks = sigma_checkpoint.accumulate_sigma, []

    def dies(*args, **kw):
        chunks.append(1)
        if len(chunks) == 2:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(sigma_checkpoint, "accumulate_sigma", dies)
    with pytest.raises(KeyboardInterrupt):
        compute_sigmas(model, ["features.4"], source, **kwargs)
    (path,) = (tmp_path / "ck").glob("*.safetensors")
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    monkeypatch.setattr(sigma_checkpoint, "accumulate_sigma", real)
    with pytest.warns(UserWarning, match="unusable"):
        got, _ = compute_sigmas(model, ["features.4"], source, **kwargs)
    want, _ = compute_sigmas(model, ["features.4"], source, **{**kwargs, "checkpoint_dir": tmp_path / "ck2"})
    assert torch.equal(got["features.4"], want["features.4"])


# --------------------------------------------------------------------------- 8.10 / issue 9: MLflow
def test_mlflow_one_parent_per_output_dir_and_artifacts_inside(tmp_path, dataset_cache, vgg_weights, monkeypatch):
    from mlflow import MlflowClient

    from pipeline import runner

    out = tmp_path / "out"
    uri = f"sqlite:///{(out / 'mlflow.db').resolve()}"
    config = _config(tmp_path, dataset_cache, vgg_weights, alphas=(0.8, 1.0), track=True, tracking_uri=uri,
                     experiment="resume-test")
    real, calls = runner.compress_model, []

    def dies_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "compress_model", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        run_compress(config)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("resume-test")
    parent_id = json.loads((out / "mlflow_run.json").read_text())["run_id"]
    # A SIGKILL leaves runs RUNNING (the interrupt above ended them): simulate it on the parent and a child.
    client.update_run(parent_id, status="RUNNING")
    stale = client.create_run(exp.experiment_id, tags={"mlflow.parentRunId": parent_id}).info.run_id
    monkeypatch.setattr(runner, "compress_model", real)
    run_compress(config)

    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert [r.info.run_id for r in parents] == [parent_id]  # resumed, not a second parent
    assert client.get_run(parent_id).info.status == "FINISHED"
    assert client.get_run(stale).info.status == "FAILED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id and r.info.status == "FINISHED"]
    assert len(children) == 2
    # Artifacts live in the output directory (not ./mlruns of the cwd).
    assert exp.artifact_location.startswith((out / "mlartifacts").resolve().as_uri())
    assert list((out / "mlartifacts").rglob("model.safetensors"))
    assert not (Path.cwd() / "mlruns").exists() or not any((Path.cwd() / "mlruns").rglob(parent_id))


@pytest.mark.slow  # an MLflow store (~20 s to create on a loaded machine) + a CLI run
def test_copied_output_folder_keeps_its_mlflow_runs_and_artifacts(tmp_path, dataset_cache, vgg_weights):
    from mlflow import MlflowClient

    from pipeline.tracking import relocate_store

    out = tmp_path / "out"
    config = _config(tmp_path, dataset_cache, vgg_weights, track=True, experiment="copy-test",
                     tracking_uri=f"sqlite:///{(out / 'mlflow.db').resolve()}")
    run_compress(config)
    copy = tmp_path / "elsewhere" / "copy"
    shutil.copytree(out, copy)
    shutil.rmtree(out)
    uri = f"sqlite:///{copy / 'mlflow.db'}"
    assert relocate_store(uri, copy / "mlartifacts") > 0
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("copy-test")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 2 and all(r.info.artifact_uri.startswith((copy / "mlartifacts").as_uri()) for r in runs)
    child = next(r for r in runs if "mlflow.parentRunId" in r.data.tags)
    got = client.download_artifacts(child.info.run_id, "model", str(tmp_path / "dl"))
    assert (Path(got) / "model.safetensors").is_file() and (Path(got) / "spec.json").is_file()
    assert relocate_store(uri, copy / "mlartifacts") == 0  # idempotent


@pytest.mark.slow  # an MLflow store (~20 s to create on a loaded machine) + a CLI run
def test_demo_keeps_every_mlflow_artifact_in_its_output_dir(tmp_path, dataset_cache, vgg_weights, monkeypatch):
    from jobs.cli import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # a ./mlruns would appear here if artifacts went to the cwd
    out = tmp_path / "demo"
    code = main(["demo", "--model", "vgg-fmnist", "--weights", str(vgg_weights), "--alpha", "0.9", "-n", "16",
                 "--eval-limit", "32", "--layers", "features.4", "--max-iter", "2", "--no-progress",
                 "--output-dir", str(out), "--cache-dir", str(_cache(tmp_path, dataset_cache))])
    assert code == 0
    names = {p.name for p in (out / "mlartifacts").rglob("*") if p.is_file()}
    assert {"results.md", "accuracy_vs_compression.png", "layer_plan.json", "layers.json", "model.safetensors",
            "spec.json"} <= names
    assert not (tmp_path / "mlruns").exists()

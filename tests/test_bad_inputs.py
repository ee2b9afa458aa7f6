"""Bad inputs across the CLI, YAML, files and the Python API (issue 8): each one a clear error that says what to
fix (or a documented acceptance), raised before expensive work. Cheap: nothing here trains or runs a Sigma pass
over more than a few images."""

from __future__ import annotations

import errno
import gzip
import json
import shutil
from pathlib import Path

import pytest
import torch

from jobs.cli import main
from pipeline.compress import SigmaSource, load_compressed, save_compressed
from pipeline.data import DatasetSpec, load_image_folder, prepare_fashion_mnist_root
from pipeline.methods import SolverOptions
from pipeline.models import build_model
from pipeline.preflight import LocationError, check_tracking_uri, check_writable_dir, describe_os_error
from pipeline.runner import CompressConfig, run_compress
from sigma_core import check_psd, cp_als_sigma, svd_sigma, tucker2_als_sigma

pytestmark = pytest.mark.usefixtures("single_thread")

FMNIST = Path("/usr/share/datasets/fashion-mnist")


def _config(tmp_path, weights, **overrides):
    base = dict(model="vgg-fmnist", weights=str(weights), methods=("tucker2-als-sigma",), layers=("features.4",),
                sigma=SigmaSource(DatasetSpec("fashion-mnist"), n_samples=8, batch_size=8), eval_limit=16,
                alphas=(0.9,), output_dir=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"),
                progress=False, solver=SolverOptions(max_iter=2), track=False)
    base.update(overrides)
    return CompressConfig(**base)


def _cli(tmp_path, *flags):
    return main(["compress", "--output-dir", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "c"),
                 "--no-mlflow", "--no-progress", *flags])


# --------------------------------------------------------------------------- settings that break every layer (8.5)
@pytest.mark.parametrize("kwargs, message", [
    (dict(cg_steps=0), "cg_steps must be None"),
    (dict(cg_steps=-3), "cg_steps must be None"),
    (dict(solver="fast"), "solver must be 'auto', 'direct' or 'cg'"),
    (dict(max_iter=-1), "max_iter must be >= 0"),
    (dict(tol=float("nan")), "tol >= 0"),
])
def test_solver_settings_are_refused_up_front(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SolverOptions(**kwargs)


def test_impossible_ranks_fail_before_any_work(tmp_path, vgg_weights, monkeypatch):
    from pipeline import runner

    monkeypatch.setattr(runner, "compute_sigmas", lambda *a, **k: pytest.fail("Sigma pass started"))
    with pytest.raises(ValueError, match="cannot compress any of its layers.*within"):
        run_compress(_config(tmp_path, vgg_weights, ranks=(10000, 10000), alphas=()))


def test_method_on_a_layer_it_cannot_take_fails_up_front(tmp_path, vgg_weights):
    with pytest.raises(ValueError, match="applies to Conv2d layers, classifier.1 is a Linear"):
        run_compress(_config(tmp_path, vgg_weights, layers=("classifier.1",)))


def test_cli_exits_non_zero_for_settings_that_break_every_layer(tmp_path, vgg_weights, capsys):
    assert _cli(tmp_path, "--model", "vgg-fmnist", "--weights", str(vgg_weights), "--cg-steps", "0") == 2
    assert "cg_steps" in capsys.readouterr().err
    assert _cli(tmp_path, "--model", "vgg-fmnist", "--weights", str(vgg_weights), "--ranks", "10000,10000") == 2
    assert "cannot compress any" in capsys.readouterr().err
    assert _cli(tmp_path, "--model", "vgg-fmnist", "--weights", str(vgg_weights), "--layers", "classifier.1") == 2
    assert "Linear" in capsys.readouterr().err


def test_point_with_no_layer_compressed_is_a_failure_not_a_result(tmp_path, vgg_weights, monkeypatch):
    from pipeline import compress

    monkeypatch.setattr(compress, "_method_input", lambda *a, **k: (_ for _ in ()).throw(ValueError("boom")))
    result = run_compress(_config(tmp_path, vgg_weights, save_models=False))
    assert result["points"] == [] and len(result["failed"]) == 1
    assert "boom" in next(iter(result["failed"][0]["reasons"].values()))
    assert not list((tmp_path / "out" / "points").glob("*.json"))  # never recorded as finished


# --------------------------------------------------------------------------- --num-classes (8.6)
def test_num_classes_is_refused_for_reference_models(tmp_path):
    with pytest.raises(ValueError, match="does not apply to the reference model"):
        CompressConfig(model="resnet-fmnist", num_classes=5)
    with pytest.raises(ValueError, match="num_classes must be >= 1"):
        CompressConfig(model="resnet18", weights="w.pt", num_classes=0)
    assert main(["train", "--num-classes", "5", "--cache-dir", str(tmp_path)]) == 2
    assert main(["paper-tables", "--num-classes", "5", "--output-dir", str(tmp_path / "p")]) == 2


def test_num_classes_with_user_weights_is_applied_and_loads_back(tmp_path):
    model = build_model("vgg-fmnist", num_classes=5)
    saved = save_compressed(tmp_path / "m", "vgg-fmnist", 5, model, [])
    assert load_compressed(saved)(torch.randn(1, 1, 28, 28)).shape == (1, 5)


# --------------------------------------------------------------------------- indefinite Sigma (8.7)
def test_every_sigma_entry_point_refuses_an_indefinite_sigma():
    kernel = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    for sigma in (-torch.eye(36, dtype=torch.float64), _one_negative(36)):
        with pytest.raises(ValueError, match="not positive semi-definite.*recompute"):
            tucker2_als_sigma(kernel, sigma, (2, 2))
        with pytest.raises(ValueError, match="not positive semi-definite"):
            cp_als_sigma(kernel, sigma, 3)
    with pytest.raises(ValueError, match="not positive semi-definite"):
        svd_sigma(torch.randn(5, 36, dtype=torch.float64), _one_negative(36), 2)


def _one_negative(n: int) -> torch.Tensor:
    a = torch.randn(n, 3 * n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    evals, evecs = torch.linalg.eigh(a @ a.T / (3 * n))
    evals[0] = -0.1 * evals[-1]
    s = (evecs * evals) @ evecs.T
    return 0.5 * (s + s.T)


def test_psd_tolerance_accepts_rank_deficient_and_rounding():
    a = torch.randn(40, 5, dtype=torch.float64)
    check_psd(a @ a.T)  # rank 5 of 40: PSD
    evals, evecs = torch.linalg.eigh(a @ a.T)
    evals[0] = -1e-9 * evals[-1]  # below the tolerance of 1e-6 * lambda_max: rounding, accepted
    check_psd((evecs * evals) @ evecs.T)
    check_psd(torch.zeros(4, 4, dtype=torch.float64))  # a layer whose inputs are all zero


# --------------------------------------------------------------------------- files (8.8, 8.9)
def test_doctored_spec_is_refused(tmp_path):
    saved = save_compressed(tmp_path / "m", "vgg-fmnist", 10, build_model("vgg-fmnist"), [])
    spec = json.loads((saved / "spec.json").read_text())
    spec["num_classes"] = 10
    spec["note"] = "edited"
    (saved / "spec.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="spec.json was modified"):
        load_compressed(saved)


def test_whitespace_only_spec_edit_is_accepted(tmp_path):
    saved = save_compressed(tmp_path / "m", "vgg-fmnist", 10, build_model("vgg-fmnist"), [])
    (saved / "spec.json").write_text(json.dumps(json.loads((saved / "spec.json").read_text())))  # reformatted
    load_compressed(saved)


def test_non_finite_weights_are_refused_at_save_and_load(tmp_path):
    from safetensors.torch import save_file

    model = build_model("vgg-fmnist")
    with torch.no_grad():
        model.features[0].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):
        save_compressed(tmp_path / "m", "vgg-fmnist", 10, model, [])
    path = tmp_path / "nan.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    with pytest.raises(ValueError, match="NaN/Inf"):
        build_model("vgg-fmnist", weights=path)


def test_damaged_weights_file_of_a_saved_model(tmp_path):
    saved = save_compressed(tmp_path / "m", "vgg-fmnist", 10, build_model("vgg-fmnist"), [])
    weights = saved / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="damaged"):
        load_compressed(saved)


def test_saved_model_folder_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="written by save_compressed"):
        load_compressed(tmp_path / "nothing")


@pytest.mark.skipif(not FMNIST.is_dir(), reason="needs Debian's dataset-fashion-mnist")
def test_overwritten_dataset_copy_is_detected_and_redone(tmp_path):
    prepared = prepare_fashion_mnist_root(cache_dir=tmp_path)
    target = prepared / "FashionMNIST" / "raw" / "t10k-images-idx3-ubyte"
    good = target.read_bytes()
    damaged = bytearray(good)
    damaged[1000:1000 + 200 * 784] = bytes(200 * 784)  # 200 test images overwritten
    target.write_bytes(bytes(damaged))
    with pytest.warns(UserWarning, match="does not match its recorded checksum"):
        prepare_fashion_mnist_root(cache_dir=tmp_path)
    assert target.read_bytes() == good


@pytest.mark.skipif(not FMNIST.is_dir(), reason="needs Debian's dataset-fashion-mnist")
def test_truncated_gz_gives_one_line(tmp_path, capsys):
    root = tmp_path / "fm"
    root.mkdir()
    for path in FMNIST.glob("*.gz"):
        shutil.copy(path, root / path.name)
    labels = root / "t10k-labels-idx1-ubyte.gz"
    labels.write_bytes(labels.read_bytes()[:50])
    code = main(["train", "--data-root", str(root), "--cache-dir", str(tmp_path / "c"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "truncated or corrupt" in err and "t10k-labels" in err and "Traceback" not in err


def test_broken_jpg_in_image_folder_names_the_file(tmp_path):
    from PIL import Image

    (tmp_path / "cls").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "cls" / "ok.jpg")
    (tmp_path / "cls" / "bad.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    dataset = load_image_folder(tmp_path, image_size=8)
    with pytest.raises(OSError, match=r"cannot read image .*bad\.jpg.*remove or replace it"):
        [dataset[i] for i in range(len(dataset))]


def test_empty_image_folder(tmp_path):
    (tmp_path / "cls").mkdir()
    with pytest.raises(FileNotFoundError, match="is empty"):
        load_image_folder(tmp_path)


def test_missing_weights_file(tmp_path, capsys):
    assert _cli(tmp_path, "--model", "vgg-fmnist", "--weights", str(tmp_path / "none.pt")) == 2
    assert "does not exist" in capsys.readouterr().err


def test_pickle_weights_that_are_not_a_state_dict(tmp_path):
    path = tmp_path / "w.pt"
    torch.save([1, 2, 3], path)
    with pytest.raises(ValueError, match="not a state dict"):
        build_model("vgg-fmnist", weights=path)


def test_weights_of_another_architecture(vgg_weights):
    with pytest.raises(ValueError, match="do not fit architecture"):
        build_model("resnet-fmnist", weights=vgg_weights)


# --------------------------------------------------------------------------- locations (8.4, 8.9)
def test_cache_dir_that_is_a_file_fails_before_training(tmp_path, capsys, monkeypatch):
    from pipeline import train

    monkeypatch.setattr(train, "_fit", lambda *a, **k: pytest.fail("training started"))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["train", "--cache-dir", str(blocker), "--no-progress"]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err
    assert main(["compress", "--cache-dir", str(blocker), "--no-progress", "--no-mlflow",
                 "--output-dir", str(tmp_path / "o")]) == 2
    assert "--cache-dir" in capsys.readouterr().err


def test_output_dir_that_is_a_file(tmp_path, vgg_weights, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code = main(["compress", "--model", "vgg-fmnist", "--weights", str(vgg_weights), "--output-dir",
                 str(blocker / "sub"), "--no-mlflow", "--no-progress"])
    assert code == 2 and "--output-dir" in capsys.readouterr().err


def test_read_only_output_dir(tmp_path):
    import os

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):  # root ignores permissions
            pytest.skip("running as root")
        with pytest.raises(LocationError, match="not writable.*permission denied"):
            check_writable_dir(ro / "out", "output directory", "--output-dir")
    finally:
        ro.chmod(0o700)


@pytest.mark.parametrize("code, text", [(errno.ENOSPC, "disk full"), (errno.EROFS, "read-only"),
                                        (errno.EACCES, "permission denied"), (errno.EPERM, "permission denied")])
def test_os_errors_become_one_line_with_a_fix(code, text):
    line = describe_os_error(OSError(code, "x", "/some/file"))
    assert text in line and "/some/file" in line and "\n" not in line and "--output-dir" in line


def test_disk_full_mid_run_in_the_sigma_cache_warns_and_continues(tmp_path, vgg_weights, monkeypatch):
    from pipeline import sigma_cache
    from pipeline.compress import compute_sigmas

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sigma_cache.SigmaCache, "_put", full)
    model = build_model("vgg-fmnist", weights=vgg_weights).eval()
    with pytest.warns(UserWarning, match="could not write the Sigma cache"):
        sigmas, _ = compute_sigmas(model, ["features.4"], SigmaSource(DatasetSpec("digits"), n_samples=8),
                                   cache=sigma_cache.SigmaCache(tmp_path), progress=False)
    assert sigmas["features.4"].shape == (288, 288)  # kept in memory, not lost


def test_cli_disk_full_is_one_line(tmp_path, vgg_weights, capsys, monkeypatch):
    from pipeline import runner

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "o" / "results.md"))

    monkeypatch.setattr(runner, "_write_report", full)
    code = _cli(tmp_path, "--model", "vgg-fmnist", "--weights", str(vgg_weights), "--layers", "features.4",
                "-n", "8", "--eval-limit", "16", "--sigma-dataset", "digits", "--max-iter", "2")
    err = capsys.readouterr().err
    assert code == 2 and "disk full" in err and "results.md" in err and "Traceback" not in err


def test_unreachable_tracking_uri_fails_fast(tmp_path, vgg_weights, capsys):
    import time

    tic = time.perf_counter()
    with pytest.raises(RuntimeError, match="cannot reach the MLflow tracking server.*--no-mlflow"):
        check_tracking_uri("http://127.0.0.1:9", timeout=2)
    code = main(["compress", "--model", "vgg-fmnist", "--weights", str(vgg_weights), "--tracking-uri",
                 "http://127.0.0.1:9", "--output-dir", str(tmp_path / "o"), "--no-progress"])
    assert code == 2 and "cannot reach" in capsys.readouterr().err
    assert time.perf_counter() - tic < 30
    check_tracking_uri("sqlite:///x.db")  # local stores are not probed


# --------------------------------------------------------------------------- YAML and flags
def test_yaml_compress_with_impossible_ranks_is_one_line(tmp_path, vgg_weights, capsys):
    from jobs.compress import main as compress_main

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: vgg-fmnist\nweights: {vgg_weights}\nranks: [10000, 10000]\nalphas: []\n"
                   f"layers: [features.4]\nmethods: [tucker2-als-sigma]\noutput_dir: {tmp_path / 'o'}\n"
                   f"cache_dir: {tmp_path / 'c'}\ntrack: false\nprogress: false\n")
    assert compress_main(["--config", str(cfg)]) == 2
    assert "cannot compress any" in capsys.readouterr().err


def test_yaml_cg_steps_zero(tmp_path, capsys):
    from jobs.yaml_config import ConfigError, compress_config_from_yaml

    cfg = tmp_path / "c.yaml"
    cfg.write_text("solver: {cg_steps: 0}\n")
    with pytest.raises(ConfigError, match="cg_steps must be None"):
        compress_config_from_yaml(cfg)


def test_yaml_negative_checkpoint_interval(tmp_path):
    from jobs.yaml_config import ConfigError, compress_config_from_yaml

    cfg = tmp_path / "c.yaml"
    cfg.write_text("sigma_checkpoint_every: -5\n")
    with pytest.raises(ConfigError, match="sigma_checkpoint_every"):
        compress_config_from_yaml(cfg)


@pytest.mark.parametrize("flags, message", [
    (["--ranks", "3"], "R_T,R_S"),
    (["--alpha", "a,b"], "comma-separated numbers"),
    (["--cp-rank", "0"], "integer >= 1"),
])
def test_bad_flags_exit_2(flags, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["compress", *flags])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_unknown_dataset_and_split():
    with pytest.raises(ValueError, match="unknown dataset"):
        DatasetSpec("cifar")
    with pytest.raises(ValueError, match="unknown split"):
        DatasetSpec("digits", split="val")


def test_more_sigma_images_than_the_dataset(tmp_path, vgg_weights):
    with pytest.raises(ValueError, match="cannot sample 100000 items"):
        run_compress(_config(tmp_path, vgg_weights, sigma=SigmaSource(DatasetSpec("digits"), n_samples=100000)))


def test_gz_helper_roundtrip_is_real(tmp_path):
    """Documented acceptance: an uncompressed idx copy in torchvision layout is used as is (no checksum: the user
    owns that directory), the Debian .gz layout is decompressed into the cache and verified."""
    if not FMNIST.is_dir():
        pytest.skip("needs Debian's dataset-fashion-mnist")
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for path in FMNIST.glob("*.gz"):
        with gzip.open(path) as src:
            (raw / path.stem).write_bytes(src.read())
    assert prepare_fashion_mnist_root(tmp_path, cache_dir=tmp_path / "c") == tmp_path

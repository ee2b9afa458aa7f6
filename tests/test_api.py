"""The public Python API (``sigma_compress``): a model no registry knows, round trips, loud failures."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import sigma_compress as sc
from _custom_net import make_net

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

pytestmark = pytest.mark.usefixtures("single_thread")


def _env() -> dict:
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(TESTS), env.get("PYTHONPATH", "")])
    return env


def _trained_like_net():
    torch.manual_seed(0)
    model = make_net(num_classes=5)
    # A few BatchNorm-free forward passes are enough: the test is about plumbing, not accuracy.
    return model.eval()


def _user_loader(n: int = 96) -> DataLoader:
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(n, 1, 12, 12, generator=generator)
    labels = torch.randint(0, 5, (n,), generator=generator)
    return DataLoader(TensorDataset(images, labels), batch_size=32)


def test_public_names_in_one_place():
    from pipeline import api

    assert set(api.__all__) <= set(dir(sc))
    for name in api.__all__:
        assert getattr(sc, name) is getattr(api, name)
    assert "tucker2-als-sigma" in sc.list_methods() and all(sc.list_methods().values())
    with pytest.raises(AttributeError):
        sc.no_such_name  # noqa: B018


def test_custom_cnn_round_trips_in_a_fresh_process(tmp_path):
    model = _trained_like_net()
    layers, plan = sc.select_layers(model)
    assert layers == ["left.0", "left.2"]  # stem: first conv; right: grouped; head: linear
    assert {c["name"]: c["selected"] for c in plan}["right"] is False
    source = sc.DataSource(_user_loader(), identity="random-12px-v1", n_samples=64)
    cache = sc.SigmaCache(tmp_path / "sigma")
    sigmas, info = sc.compute_sigmas(model, layers, source, cache=cache, progress=False)
    assert not info["cached"] and set(sigmas) == set(layers)
    again, info2 = sc.compute_sigmas(model, layers, source, cache=cache, progress=False)
    assert info2["cached"] and all(torch.equal(sigmas[k], again[k]) for k in layers)
    other, info3 = sc.compute_sigmas(model, layers, sc.DataSource(_user_loader(), identity="other", n_samples=64),
                                     cache=cache, progress=False)
    assert not info3["cached"]  # the identity is part of the key

    small, outcomes = sc.compress_model(model, layers, sigmas, sc.RankRule(ranks=(8, 6)), "tucker2-als-sigma",
                                        progress=False)
    assert all(o.ok for o in outcomes) and sc.count_params(small) < sc.count_params(model)
    assert sc.factorized_layers(small) == layers
    sc.save_compressed(tmp_path / "factory", base_model="_custom_net:make_net", num_classes=5, model=small)
    sc.save_compressed(tmp_path / "plain", base_model=None, model=small)
    x = torch.randn(4, 1, 12, 12, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.save(small(x), tmp_path / "want.pt")
    torch.save(x, tmp_path / "x.pt")
    script = f"""
import torch
torch.set_num_threads(1)
import sigma_compress as sc
from _custom_net import OddNet
x = torch.load({str(tmp_path / 'x.pt')!r})
with torch.no_grad():
    a = sc.load_compressed({str(tmp_path / 'factory')!r})(x)
    b = sc.load_compressed({str(tmp_path / 'plain')!r}, model=OddNet(num_classes=5))(x)
torch.save((a, b), {str(tmp_path / 'got.pt')!r})
"""
    subprocess.run([sys.executable, "-c", script], check=True, env=_env(), cwd=tmp_path, timeout=300)
    want = torch.load(tmp_path / "want.pt")
    got_factory, got_plain = torch.load(tmp_path / "got.pt")
    assert torch.equal(got_factory, want) and torch.equal(got_plain, want)


def test_unbuildable_names_are_refused_at_save_time(tmp_path):
    small = _trained_like_net()
    with pytest.raises(ValueError, match="unknown model 'mynet'"):
        sc.save_compressed(tmp_path / "a", base_model="mynet", model=small)
    with pytest.raises(ValueError, match="cannot import module"):
        sc.save_compressed(tmp_path / "b", base_model="no_such_module:make", model=small)
    with pytest.raises(ValueError, match="does not rebuild this model"):
        sc.save_compressed(tmp_path / "c", base_model="resnet-fmnist", model=small)
    with pytest.raises(ValueError, match="does not rebuild this model"):  # wrong num_classes
        sc.save_compressed(tmp_path / "d", base_model="_custom_net:make_net", num_classes=7, model=small)
    assert not any((tmp_path / d).exists() for d in "abcd")
    sc.save_compressed(tmp_path / "e", base_model=None, model=small)
    with pytest.raises(ValueError, match="pass the dense model"):
        sc.load_compressed(tmp_path / "e")


def test_impossible_ranks_raise_in_strict_mode_and_are_reported_otherwise():
    model = _trained_like_net()
    layers, _ = sc.select_layers(model)
    rule = sc.RankRule(ranks=(64, 64))  # left.* have 24 channels
    with pytest.raises(sc.CompressionError, match=r"(?s)2 of 2 chosen layers.*left\.0: ValueError: R_T=64") as info:
        sc.compress_model(model, layers, {}, rule, "tucker2-als", progress=False)
    assert [o.name for o in info.value.outcomes if not o.ok] == layers
    with pytest.warns(RuntimeWarning, match="2 of 2 layers kept dense: left.0"):
        same, outcomes = sc.compress_model(model, layers, {}, rule, "tucker2-als", progress=False, strict=False)
    assert [o.ok for o in outcomes] == [False, False] and all("R_T=64" in o.error for o in outcomes)
    assert sc.count_params(same) == sc.count_params(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing failed: no warning
        sc.compress_model(model, layers, {}, sc.RankRule(ranks=(4, 4)), "tucker2-als", progress=False, strict=False)


def test_cli_reports_failed_layers_and_exits_1_when_nothing_was_compressed(tmp_path, capsys, monkeypatch):
    from jobs.cli import main

    monkeypatch.syspath_prepend(str(TESTS))
    flags = ["compress", "--model", "_custom_net:make_net", "--methods", "tucker2-als", "--eval-dataset", "digits",
             "--sigma-dataset", "digits", "--eval-limit", "40", "--no-mlflow", "--no-save-models", "--no-progress",
             "--output-dir", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")]
    # Impossible ranks for every layer: refused (before any work, by the pre-flight check from main) or
    # reported layer by layer; either way a non-zero exit naming the layers.
    assert main([*flags, "--ranks", "64,64"]) in (1, 2)
    err = capsys.readouterr().err
    assert "left.0" in err and "R_T=64" in err
    assert main([*flags, "--ranks", "4,4", "--output-dir", str(tmp_path / "ok")]) == 0


def test_readme_quick_start_runs_as_written(tmp_path):
    readme = (REPO / "README.md").read_text()
    block = re.search(r"<!-- quickstart:begin -->\n```python\n(.*?)```\n<!-- quickstart:end -->", readme, re.S)
    assert block, "README.md lost its quick start block"
    (tmp_path / "quickstart.py").write_text(block.group(1))
    done = subprocess.run([sys.executable, "quickstart.py"], env=_env(), cwd=tmp_path, timeout=600,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"top-1 \d+\.\d\d % -> \d+\.\d\d % at \d+\.\d\dx fewer parameters \(Sigma computed\)",
                     done.stdout), done.stdout
    assert (tmp_path / "outputs" / "digits-net" / "spec.json").exists()

"""The Ray Tune sweep: grid, trial keys, records/Parquet, YAML configs, cluster.yaml (fast) and, with ``-m ray``,
real sweeps on a local Ray cluster: SQLite and server MLflow stores, kill + resume, ``ray job submit``.

Ray tests share one ``ray start --head`` cluster (unique temp dir and ports, loopback MLflow server); everything
they start is stopped by process id at the end. Models are random-init references saved to safetensors, N is
32-48 images, evaluation 64 images and ALS 5 iterations, so each trial takes seconds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.data import DatasetSpec
from pipeline.methods import SolverOptions
from pipeline.sweep import (
    SweepConfig,
    SweepSource,
    TrialPoint,
    TrialStore,
    grid_points,
    keyed_grid,
    missing_points,
    run_sweep,
    sweep_identity,
    trial_key,
)

REPO = Path(__file__).resolve().parents[1]
FMNIST = SweepSource(DatasetSpec("fashion-mnist"))
DIGITS = SweepSource(DatasetSpec("digits"))


@pytest.fixture(autouse=True)
def _no_ambient_tracking_uri(monkeypatch):
    # mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI, which the sweep (rightly) prefers over its default:
    # without this, one test's store would leak into the next test's sweep -- and into later test modules.
    # setenv first, so that monkeypatch restores the variable's state before the test (unset included) even when
    # the test itself sets it through mlflow; mlflow's own in-process URI is put back as well.
    utils = sys.modules.get("mlflow.tracking._tracking_service.utils")
    saved_uri = getattr(utils, "_tracking_uri", None)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    yield
    utils = sys.modules.get("mlflow.tracking._tracking_service.utils")
    if utils is not None and hasattr(utils, "_tracking_uri"):
        utils._tracking_uri = saved_uri


@pytest.fixture(scope="module")
def weights_file(resnet_weights) -> Path:
    return resnet_weights


def _config(out: Path, weights: Path, **overrides) -> SweepConfig:
    base = {"model": "resnet-fmnist", "weights": str(weights), "sigma_sources": (FMNIST, DIGITS),
            "n_samples": (32,), "alphas": (0.6, 0.8, 1.0), "eval_limit": 64, "batch_size": 64,
            "sigma_batch_size": 32, "solver": SolverOptions(max_iter=5), "output_dir": str(out / "out"),
            "cache_dir": str(out / "cache"), "progress": False, "cpus_per_trial": 1.0}
    base.update(overrides)
    return SweepConfig(**base)


def _record(key: str, **extra) -> dict:
    layers = [{"name": "stages.0.0.conv1", "rel_sigma_err": 0.1, "rel_frob_err": 0.2, "ranks": [4, 4], "error": None}]
    row = {"key": key, "method": "tucker2-als-sigma", "alpha": 0.8, "seed": 0, "sigma_source": "fashion-mnist",
           "n_samples": 32, "top1": 80.0, "top5": 99.0, "params": 1000, "macs": 5000, "compression_rate": 2.0,
           "mac_reduction": 1.5, "baseline_top1": 90.0, "baseline_params": 2000, "baseline_macs": 7500,
           "model": "resnet-fmnist", "layers": layers, "layers_json": json.dumps(layers), "finished_at": 1.0}
    row.update(extra)
    return row


# --------------------------------------------------------------------------- #
# Grid, keys, records (no Ray)
# --------------------------------------------------------------------------- #
def test_grid_runs_sigma_free_methods_once_per_alpha(tmp_path, weights_file):
    config = _config(tmp_path, weights_file, n_samples=(32, 48), seeds=(0, 1))
    points = grid_points(config)
    sigma = [p for p in points if p.method == "tucker2-als-sigma"]
    frob = [p for p in points if p.method == "tucker2-als"]
    assert len(sigma) == 3 * 2 * 2 * 2 and len(frob) == 3 * 2
    assert all(p.source is None and p.n_samples is None for p in frob)
    assert {p.sigma_id for p in sigma} == {(s, n, seed) for s in ("fashion-mnist", "digits") for n in (32, 48)
                                           for seed in (0, 1)}


def test_trial_keys_are_deterministic_and_cover_what_determines_a_result(tmp_path, weights_file):
    config = _config(tmp_path, weights_file)
    identity = sweep_identity(config, "abc", ["l1", "l2"])
    keyed = keyed_grid(config, identity)
    assert keyed == keyed_grid(config, sweep_identity(config, "abc", ["l2", "l1"]))
    assert len(keyed) == 9 and len(set(keyed)) == 9
    point = TrialPoint("tucker2-als-sigma", 0.8, 0, "digits", 32)
    sources = {"digits": DatasetSpec("digits").identity()}
    key = trial_key(point, identity, sources)
    # Relabelling a source keeps the key; changing its resolution, the weights, the solver or N does not.
    assert trial_key(TrialPoint("tucker2-als-sigma", 0.8, 0, "dig", 32), identity,
                     {"dig": DatasetSpec("digits").identity()}) == key
    assert trial_key(point, identity, {"digits": DatasetSpec("digits", resample="bicubic").identity()}) != key
    assert trial_key(point, sweep_identity(config, "other", ["l1", "l2"]), sources) != key
    other_solver = _config(tmp_path, weights_file, solver=SolverOptions(max_iter=6))
    assert trial_key(point, sweep_identity(other_solver, "abc", ["l1", "l2"]), sources) != key
    assert trial_key(TrialPoint("tucker2-als-sigma", 0.8, 0, "digits", 48), identity, sources) != key


def test_missing_points_skip_recorded_trials(tmp_path, weights_file):
    config = _config(tmp_path, weights_file)
    keyed = keyed_grid(config, sweep_identity(config, "abc", ["l1"]))
    store = TrialStore(tmp_path / "out")
    done = list(keyed)[:4]
    for key in done:
        store.write_record(_record(key))
    # A half-written temp file (what a crash mid-write leaves) and a corrupt record do not count as done.
    (store.trials_dir / f".{list(keyed)[5]}.json.x.tmp").write_text("{")
    (store.trials_dir / f"{list(keyed)[6]}.json").write_text("{not json")
    with pytest.warns(UserWarning, match="unreadable trial record"):
        todo = missing_points(keyed, store.done_keys())
    assert list(todo) == [k for k in keyed if k not in done]
    assert len(todo) == 5


def test_best_trials_are_the_pareto_front_of_each_method():
    from pipeline.sweep import _pareto_best

    rows = [{"key": k, "method": m, "top1": t, "compression_rate": c} for k, m, t, c in [
        ("a", "x", 90, 2), ("b", "x", 85, 4), ("c", "x", 80, 3), ("d", "x", 70, 8), ("e", "y", 50, 2)]]
    assert [r["key"] for r in _pareto_best(rows, 3)] == ["a", "b", "d", "e"]  # c is beaten by b
    assert [r["key"] for r in _pareto_best(rows, 1)] == ["a", "e"]


def test_sweep_config_rejects_what_it_cannot_run(tmp_path, weights_file):
    with pytest.raises(ValueError, match="data-aware method"):
        _config(tmp_path, weights_file, methods=("fw-lra",), sigma_sources=())
    with pytest.raises(ValueError, match="unknown method"):
        _config(tmp_path, weights_file, methods=("tucker3",))
    with pytest.raises(ValueError, match="labels must be unique"):
        _config(tmp_path, weights_file, sigma_sources=(DIGITS, SweepSource(DatasetSpec("fashion-mnist"), "digits")))
    with pytest.raises(ValueError, match="sigma_backend"):
        _config(tmp_path, weights_file, sigma_backend="spark")


def test_fisher_and_activation_methods_run_as_trials(tmp_path, weights_file):
    """FW-LRA / AG-LRA in a sweep: phase 1 caches their statistics once per (source, N, seed); a trial reads them."""
    from pipeline import sweep

    config = sweep._absolute_paths(_config(tmp_path, weights_file, methods=("ag-lra", "fw-lra", "tucker2-als"),
                                           sigma_sources=(FMNIST,), alphas=(0.8,)))
    points = grid_points(config)
    assert {p.method: p.sigma_id for p in points} == {"ag-lra": ("fashion-mnist", 32, 0),
                                                      "fw-lra": ("fashion-mnist", 32, 0), "tucker2-als": None}
    phase1 = sweep.run_covariance(config)
    assert phase1["stats"] == {"computed": 2, "cached": 0} and len(phase1["stat_keys"]) == 2
    assert sweep.run_covariance(config)["stats"] == {"computed": 0, "cached": 2}
    model, layers, fingerprint, input_shape = sweep._load_model(config)
    ctx = sweep.TrialContext(
        model=config.model, num_classes=config.num_classes, state=model.state_dict(), fingerprint=fingerprint,
        layers=tuple(layers), input_shape=input_shape, baseline={"top1": 10.0, "top5": 50.0, **sweep.model_stats(model, input_shape)},
        identity={}, sources={"fashion-mnist": FMNIST.dataset.identity()}, sigma_keys=phase1["keys"],
        sigma_location=config.sigma_location, data_cache_dir=str(Path(config.cache_dir) / "datasets"),
        eval_dataset=config.eval_dataset, eval_limit=16, batch_size=16, solver=config.solver, device="cpu",
        threads=1, output_dir=config.output_dir, save_models="none", compress_backend="local", tracking_uri=None,
        experiment_id=None, invocation="test", stat_keys=phase1["stat_keys"])
    for point in points:
        if point.method == "tucker2-als":
            continue
        row, _, ok_layers = sweep._run_point(point, "k" * 16, ctx)
        assert row["failed_layers"] == 0 and ok_layers == list(layers), point.method
        assert row["mean_rel_sigma_err"] is not None and row["compression_rate"] > 1
    with pytest.raises(RuntimeError, match="fisher statistic .* is not in the cache"):
        sweep._run_point(next(p for p in points if p.method == "fw-lra"), "k" * 16,
                         dataclasses.replace(ctx, stat_keys={}))


def test_parquet_has_each_trial_once(tmp_path):
    import pyarrow.parquet as pq

    store = TrialStore(tmp_path)
    for key in ("a" * 16, "b" * 16):
        store.write_record(_record(key))
    store.write_record(_record("a" * 16, top1=81.0))  # rewritten (same key): still one row
    table = pq.read_table(store.write_parquet())
    rows = table.to_pylist()
    assert sorted(r["key"] for r in rows) == ["a" * 16, "b" * 16]
    assert {r["key"]: r["top1"] for r in rows}["a" * 16] == 81.0
    assert json.loads(rows[0]["layers_json"])[0]["name"] == "stages.0.0.conv1"
    assert {"top1", "top5", "compression_rate", "macs", "params", "mean_rel_sigma_err"} <= set(table.column_names)


def test_report_from_parquet_logs_to_mlflow(tmp_path):
    import mlflow

    from pipeline.report import run_report
    from pipeline.tracking import Tracker

    store = TrialStore(tmp_path)
    for i, (method, source, n, alpha) in enumerate([
            ("tucker2-als-sigma", "fashion-mnist", 32, 0.8), ("tucker2-als-sigma", "fashion-mnist", 32, 1.0),
            ("tucker2-als-sigma", "digits", 32, 0.8), ("tucker2-als-sigma", "digits", 64, 0.8),
            ("tucker2-als", None, None, 0.8), ("tucker2-als", None, None, 1.0)]):
        store.write_record(_record(f"{i:016d}", method=method, sigma_source=source, n_samples=n, alpha=alpha,
                                   top1=70.0 + i, compression_rate=2.0 + alpha))
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    paths = run_report(store.write_parquet(), tmp_path / "report", Tracker(uri, "report-test"))
    for name in ("by_source", "by_method", "by_n"):
        assert Path(paths[name]).stat().st_size > 5000, name
    text = Path(paths["markdown"]).read_text()
    assert "## Sigma from digits" in text and "tucker2-als" in text
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("report-test").experiment_id])
    assert len(runs) == 1
    logged = {a.path for a in client.list_artifacts(runs[0].info.run_id, "report")}
    assert {"report/by_source.png", "report/by_method.png", "report/summary.md", "report/trials.parquet"} <= logged


# --------------------------------------------------------------------------- #
# YAML configs and the job entrypoints' errors (no Ray)
# --------------------------------------------------------------------------- #
def test_example_configs_parse(tmp_path):
    from jobs.yaml_config import build_config, compress_config_from_yaml, sweep_config_from_yaml

    demo = sweep_config_from_yaml(REPO / "jobs/configs/fmnist_demo_sweep.yaml")
    assert demo.model == "resnet-fmnist" and demo.train.model == "resnet-fmnist" and demo.weights is None
    assert len(demo.alphas) >= 3 and set(demo.methods) == {"tucker2-als", "tucker2-als-sigma"}
    assert [s.name for s in demo.sigma_sources] == ["fashion-mnist", "digits", "digits-bicubic"]
    assert demo.sigma_sources[2].dataset.resample == "bicubic"
    assert len(grid_points(demo)) == 3 * 2 * 6 + 6

    # The ImageNet example names files on a cluster's shared disk: the error says which; with them it parses.
    from jobs.yaml_config import ConfigError

    with pytest.raises(ConfigError, match=r"sweep\.weights: file /mnt/shared/weights/resnet18.safetensors"):
        sweep_config_from_yaml(REPO / "jobs/configs/resnet18_imagenet_folder.yaml")
    data = yaml.safe_load((REPO / "jobs/configs/resnet18_imagenet_folder.yaml").read_text())
    text = json.dumps(data).replace("/mnt/shared", str(tmp_path))
    from pipeline.sweep import SweepConfig as Config

    resnet = build_config(Config, json.loads(text), "resnet18")
    assert resnet.model == "resnet18" and resnet.gpus_per_trial == 1 and resnet.sigma_backend == "ray"
    assert {s.dataset.resample for s in resnet.sigma_sources} == {"bilinear", "bicubic"}
    assert resnet.sigma_sources[2].dataset.image_size == 224

    compress = compress_config_from_yaml(REPO / "jobs/configs/fmnist_compress.yaml")
    assert compress.sigma.n_samples == 2000 and compress.sigma.dataset.name == "fashion-mnist"


@pytest.mark.parametrize("snippet, message", [
    ("alpahs: [0.5]", r"unknown key 'alpahs' \(did you mean alphas\?\)"),
    ("alphas: [0.5, abc]", r"sweep\.alphas\[1\]: expected a number, got 'abc'"),
    ("alphas: [1.5]", r"alphas must be in \[0, 1\]"),
    ("n_samples: [0]", r"n_samples must be"),
    ("methods: [tucker9]", r"unknown method 'tucker9'"),
    ("sigma_sources: [{name: digits, resample: nearest}]", r"sigma_sources\[0\].*nearest"),
    ("sigma_sources: [{name: cifar}]", r"sigma_sources\[0\].*cifar"),
    ("solver: {max_iters: 3}", r"sweep\.solver: unknown key 'max_iters' \(did you mean max_iter\?\)"),
    ("weights: /no/such/file.safetensors", r"sweep\.weights: file /no/such/file\.safetensors not found"),
    ("eval_dataset: {name: imagefolder, root: /no/such/dir}", r"eval_dataset\.root: directory /no/such/dir"),
    ("track: maybe", r"sweep\.track: expected true or false"),
    ("save_models: some", r"save_models must be one of none, best, all"),
    ("- a\n- b", r"top level must be a mapping"),
    ("alphas: [0.5", r"invalid YAML"),
])
def test_yaml_errors_are_clear(tmp_path, snippet, message):
    from jobs.yaml_config import ConfigError, sweep_config_from_yaml

    path = tmp_path / "bad.yaml"
    path.write_text(snippet + "\n")
    with pytest.raises(ConfigError, match=message) as info:
        sweep_config_from_yaml(path)
    assert str(path) in str(info.value)


def test_jobs_exit_2_with_one_line_on_config_errors(tmp_path, capsys, weights_file):
    from jobs import compress, covariance, report, sweep

    for job in (sweep, covariance, report, compress):
        assert job.main(["--config", str(tmp_path / "missing.yaml")]) == 2
        assert "not found" in capsys.readouterr().err
    cfg = tmp_path / "ok.yaml"
    cfg.write_text(f"weights: {weights_file}\nalphas: [0.8, 1.0]\nn_samples: 32\n")
    assert sweep.main(["--config", str(cfg), "--dry-run", "--set", "sigma_sources=[digits]"]) == 0
    assert capsys.readouterr().out.strip().endswith("4 trials")
    assert sweep.main(["--config", str(cfg), "--dry-run", "--set", "alphas"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err


def test_cluster_yaml_passes_ray_validation():
    import copy

    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    assert set(prepared["available_node_types"]) == {"head", "gpu_worker"}
    assert prepared["available_node_types"]["gpu_worker"]["resources"]["GPU"] == 1
    commands = " ".join(config["setup_commands"])
    assert "uv sync --frozen --extra gpu" in commands
    starts = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    assert "MLFLOW_TRACKING_URI" in starts
    # The validator is real: a typo in a node type is rejected.
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu_worker"]["min_wokers"] = 1
    with pytest.raises(Exception, match="min_wokers"):
        validate_config(prepare_config(broken))


# --------------------------------------------------------------------------- #
# Ray: one local cluster for the module, stopped by process id
# --------------------------------------------------------------------------- #
def _free_ports(count: int) -> list[int]:
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]


def _has_dashboard_deps() -> bool:
    try:
        import ray.dashboard.optional_deps  # noqa: F401
    except ImportError:
        return False
    return True


def _processes() -> dict[int, tuple[int, int, bytes]]:
    rows = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        rows[int(entry)] = (int(fields[1]), int(fields[2]), cmd)  # ppid, pgid, cmdline
    return rows


def _pids_of(marker: str) -> set[int]:
    """Processes whose command line names ``marker`` (our unique temp dir), their process groups and children."""
    rows, me = _processes(), {os.getpid(), os.getpgrp()}
    seeds = {pid for pid, (_, _, cmd) in rows.items() if marker.encode() in cmd} - me
    groups = {rows[pid][1] for pid in seeds} - me
    found = seeds | {pid for pid, (_, pgid, _) in rows.items() if pgid in groups}
    while True:
        children = {pid for pid, (ppid, _, _) in rows.items() if ppid in found} - found
        if not children:
            return found - me
        found |= children


def _kill_by_marker(marker: str) -> None:
    """Stop what we started (never ``ray stop``: it would kill every Ray instance on this shared machine)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in _pids_of(marker):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        time.sleep(2)


class LocalCluster:
    def __init__(self):
        self.temp_dir = tempfile.mkdtemp(prefix="rs", dir="/tmp")  # short: Ray's unix sockets live under it
        ports = _free_ports(8)
        self.port, self.dashboard_port = ports[0], ports[1]
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard = _has_dashboard_deps()
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
        self.env = {**env, "RAY_AUTH_MODE": "disabled", "OMP_WAIT_POLICY": "PASSIVE",
                    "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
                    "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
        self.cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--node-ip-address=127.0.0.1",
                    f"--port={self.port}", f"--dashboard-port={self.dashboard_port}", "--dashboard-host=127.0.0.1",
                    f"--node-manager-port={ports[2]}", f"--object-manager-port={ports[3]}",
                    f"--dashboard-agent-listen-port={ports[4]}", f"--dashboard-agent-grpc-port={ports[5]}",
                    f"--runtime-env-agent-port={ports[6]}", f"--metrics-export-port={ports[7]}", "--num-cpus=2",
                    f"--temp-dir={self.temp_dir}", f"--include-dashboard={str(self.dashboard).lower()}",
                    "--disable-usage-stats"]

    def start(self) -> None:
        proc = subprocess.run(self.cmd, env=self.env, capture_output=True, text=True, timeout=240,
                              start_new_session=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"ray start failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")

    def stop(self) -> None:
        _kill_by_marker(self.temp_dir)


@pytest.fixture(scope="module")
def ray_cluster():
    cluster = LocalCluster()
    with pytest.MonkeyPatch.context() as patch:  # restored after the module, not left to later tests
        patch.setenv("RAY_AUTH_MODE", "disabled")
        try:
            cluster.start()
            yield cluster
        finally:
            import ray

            if ray.is_initialized():
                ray.shutdown()
            cluster.stop()


@pytest.fixture
def connected(ray_cluster):
    """This process as a driver of the module's cluster (workers use this interpreter, not `uv run`)."""
    import ray
    from ray._private import ray_constants

    if not ray.is_initialized():
        saved = ray_constants.RAY_ENABLE_UV_RUN_RUNTIME_ENV
        ray_constants.RAY_ENABLE_UV_RUN_RUNTIME_ENV = False
        try:
            ray.init(address=ray_cluster.address)
        finally:
            ray_constants.RAY_ENABLE_UV_RUN_RUNTIME_ENV = saved
    return ray_cluster


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("shared-cache")


def _trial_runs(uri: str, experiment: str) -> list:
    import mlflow

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], filter_string="tags.kind = 'trial'", max_results=1000)


def _check_trial_runs(uri: str, experiment: str, keys: set[str]) -> list:
    import mlflow

    client = mlflow.MlflowClient(uri)
    runs = _trial_runs(uri, experiment)
    assert sorted(r.data.tags["trial_key"] for r in runs) == sorted(keys)  # one run per trial
    for run in runs:
        assert run.info.status == "FINISHED"
        assert {"method", "alpha", "seed", "trial_key", "sigma_source"} <= set(run.data.params)
        assert {"top1", "top5", "compression_rate", "macs", "params"} <= set(run.data.metrics)
        assert any(k.startswith("layer.") and k.endswith(".rel_frob_err") for k in run.data.metrics)
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"accuracy_vs_compression.png", "layers.json"} <= artifacts, artifacts
    return runs


@pytest.mark.ray
def test_local_sweep_counts_sigmas_and_logs_every_trial(tmp_path, weights_file, connected):
    import pyarrow.parquet as pq

    config = _config(tmp_path, weights_file, n_samples=(32, 48))
    tic = time.perf_counter()
    result = run_sweep(config)
    first_seconds = time.perf_counter() - tic
    assert result.trials_total == 15 and result.trials_run == 15 and not result.trials_failed
    assert result.sigma_computed == 4 and result.sigma_cached == 0  # once per (source, N)
    # Per-layer entries, plus one whole-set index per (source, N) that the trials read.
    entries = [json.loads(path.read_text()) for path in (tmp_path / "cache" / "sigma").glob("*.json")]
    assert sum(entry.get("kind") == "index" for entry in entries) == 4
    assert result.baseline_cached is False

    store = TrialStore(config.output_dir)
    keys = {r["key"] for r in store.records()}
    assert len(keys) == 15
    table = pq.read_table(result.parquet_path).to_pylist()
    assert sorted(r["key"] for r in table) == sorted(keys)
    assert all(json.loads(r["layers_json"]) for r in table)
    sigma_rows = [r for r in table if r["method"] == "tucker2-als-sigma"]
    assert {(r["sigma_source"], r["n_samples"]) for r in sigma_rows} == {
        (s, n) for s in ("fashion-mnist", "digits") for n in (32, 48)}
    # Same alpha -> same ranks and size for every method and source; smaller alpha -> bigger model.
    params = {}
    for row in table:
        params.setdefault(row["alpha"], set()).add(row["params"])
    assert all(len(v) == 1 for v in params.values())
    assert params[0.6].pop() > params[1.0].pop()

    runs = _check_trial_runs(result.tracking_uri, config.experiment, keys)
    assert len(runs) == 15 and result.best_models
    models = [r for r in runs if r.data.tags.get("best_model_logged") == "true"]
    assert len(models) == len(result.best_models)
    assert Path(result.report["by_source"]).exists() and Path(result.report["markdown"]).exists()
    events = store.events()
    assert sorted(e["key"] for e in events if e["event"] == "done") == sorted(keys)

    # The same command again: nothing to run, no Sigma recomputed, the table still has each trial once.
    tic = time.perf_counter()
    again = run_sweep(config)
    assert again.trials_run == 0 and again.trials_skipped == 15
    assert again.sigma_computed == 0 and again.baseline_cached is True
    assert len(pq.read_table(again.parquet_path)) == 15
    assert len(_trial_runs(result.tracking_uri, config.experiment)) == 15
    print(f"\n15-trial sweep {first_seconds:.0f}s, rerun {time.perf_counter() - tic:.0f}s")


@contextlib.contextmanager
def _mlflow_server(tmp_path: Path):
    port = _free_ports(1)[0]
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
           f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination", str(tmp_path / "server-artifacts"),
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with open(tmp_path / "mlflow-server.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"mlflow server did not answer: {(tmp_path / 'mlflow-server.log').read_text()}")
            time.sleep(1)
        yield f"http://127.0.0.1:{port}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.ray
def test_sweep_logs_to_an_mlflow_server(tmp_path, weights_file, connected, shared_cache):
    with _mlflow_server(tmp_path) as uri:
        config = _config(tmp_path, weights_file, sigma_sources=(DIGITS,), alphas=(1.0,), tracking_uri=uri,
                         cache_dir=str(shared_cache), experiment="server-sweep", save_models="all")
        result = run_sweep(config)
        assert result.trials_run == 2 and not result.trials_failed and result.tracking_uri == uri
        keys = TrialStore(config.output_dir).done_keys()
        runs = _check_trial_runs(uri, "server-sweep", keys)
        import mlflow

        client = mlflow.MlflowClient(uri)
        for run in runs:
            assert {"model/spec.json", "model/model.safetensors"} <= {
                a.path for a in client.list_artifacts(run.info.run_id, "model")}
    # The artifacts went through the server to its artifact store, not to the sweep's output directory.
    assert list((tmp_path / "server-artifacts").rglob("accuracy_vs_compression.png"))
    assert not (Path(config.output_dir) / "mlflow.db").exists()


def _write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def _count_records(out: Path) -> int:
    return len(list((out / "trials").glob("*.json")))


@pytest.mark.ray
def test_killed_sweep_reruns_only_missing_trials(tmp_path, weights_file, ray_cluster, shared_cache):
    out = tmp_path / "out"
    cfg = _write_yaml(tmp_path / "sweep.yaml", {
        "model": "resnet-fmnist", "weights": str(weights_file), "sigma_sources": ["fashion-mnist"],
        "n_samples": [32], "alphas": [0.8, 1.0], "eval_limit": 64, "batch_size": 64, "sigma_batch_size": 32,
        "solver": {"max_iter": 5}, "output_dir": str(out), "cache_dir": str(shared_cache), "progress": False,
        "max_concurrent_trials": 1, "experiment": "resume"})
    env = {**ray_cluster.env, "RAY_ADDRESS": ray_cluster.address}
    cmd = [sys.executable, "-m", "jobs.sweep", "--config", str(cfg)]

    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        deadline = time.time() + 420
        while _count_records(out) < 1 and first.poll() is None and time.time() < deadline:
            time.sleep(0.5)
        os.killpg(first.pid, signal.SIGKILL)  # the driver and everything it started, mid-sweep
        first.wait()
    killed_after = _count_records(out)
    assert 1 <= killed_after < 4, (tmp_path / "first.log").read_text()[-3000:]
    time.sleep(3)  # let the cluster reap the dead driver's trial actors

    second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert f"4 trials in the grid, {killed_after} already recorded, {4 - killed_after} run now, 0 failed" \
        in second.stdout

    store = TrialStore(out)
    events = store.events()
    invocations = list(dict.fromkeys(e["invocation"] for e in events))
    assert len(invocations) == 2
    done_first = {e["key"] for e in events if e["invocation"] == invocations[0] and e["event"] == "done"}
    started_second = [e["key"] for e in events if e["invocation"] == invocations[1] and e["event"] == "start"]
    assert len(done_first) == killed_after
    assert not done_first & set(started_second)  # no finished trial ran twice
    assert len(started_second) == len(set(started_second)) == 4 - killed_after
    import pyarrow.parquet as pq

    keys = [r["key"] for r in pq.read_table(out / "trials.parquet").to_pylist()]
    assert len(keys) == len(set(keys)) == 4
    _check_trial_runs(f"sqlite:///{out / 'mlflow.db'}", "resume", set(keys))
    print(f"\nkilled after {killed_after} recorded trials; rerun ran {len(started_second)}")


@pytest.mark.ray
@pytest.mark.skipif(not _has_dashboard_deps(), reason="ray job submit needs Ray's dashboard: install ray[default]")
def test_ray_job_submit_runs_the_demo_sweep(tmp_path, weights_file, ray_cluster, shared_cache):
    demo = yaml.safe_load((REPO / "jobs/configs/fmnist_demo_sweep.yaml").read_text())
    demo.pop("train")
    demo.update(weights=str(weights_file), sigma_sources=[{"name": "fashion-mnist", "label": "fmnist"}],
                n_samples=[32], alphas=[1.0], eval_limit=64, batch_size=64, sigma_batch_size=32,
                solver={"max_iter": 5}, output_dir=str(tmp_path / "out"), cache_dir=str(shared_cache),
                save_models="none", progress=False)
    cfg = _write_yaml(tmp_path / "demo.yaml", demo)
    runtime_env = json.dumps({"excludes": [".git", ".venv", "cache", "outputs", "mlruns", "*.db"]})
    cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address",
           f"http://127.0.0.1:{ray_cluster.dashboard_port}", "--working-dir", str(REPO), "--runtime-env-json",
           runtime_env, "--", "python", "-m", "jobs.sweep", "--config", str(cfg)]
    proc = subprocess.run(cmd, env=ray_cluster.env, capture_output=True, text=True, timeout=600, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "succeeded" in output.lower() and "2 trials in the grid" in output
    import pyarrow.parquet as pq

    assert len(pq.read_table(tmp_path / "out" / "trials.parquet")) == 2

"""Fine-tuning baseline, FP16/INT8 evaluation and the paper-table command (tiny models, synthetic or few images)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline.finetune import FinetuneConfig, FinetuneData, finetune, split_holdout
from pipeline.methods import SolverOptions
from pipeline.paper_tables import TABLE_3_4_METHODS, TABLE_6_METHODS, PaperTablesConfig, table_6, tables_3_4
from pipeline.quantize import evaluate_precisions


def _tiny_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 6 * 6, 10))


def _blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """10 classes of 1x12x12 images: a fixed random pattern per class plus unit Gaussian noise."""
    patterns = torch.randn(10, 1, 12, 12, generator=torch.Generator().manual_seed(123))
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=gen)
    return patterns[labels] + torch.randn(n, 1, 12, 12, generator=gen), labels


@pytest.fixture(scope="module")
def data() -> FinetuneData:
    images, labels = _blobs(900, seed=0)
    return split_holdout(images, labels, FinetuneConfig(holdout=300, train_subset=None, seed=0))


@pytest.fixture(scope="module")
def trained(data) -> nn.Module:
    torch.manual_seed(0)
    model, _ = finetune(_tiny_net(), FinetuneConfig(epochs=2, lrs=(1e-2,), batch_size=32), data, progress=False)
    return model


def _batches(x, y, size=100):
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(y), size)]


def test_split_is_disjoint_and_seeded():
    images = torch.arange(100, dtype=torch.float32).reshape(100, 1, 1, 1)
    labels = torch.arange(100)
    cfg = FinetuneConfig(holdout=20, train_subset=50, seed=3)
    a, b = split_holdout(images, labels, cfg), split_holdout(images, labels, cfg)
    assert len(a.held_y) == 20 and len(a.train_y) == 50
    assert not set(a.held_y.tolist()) & set(a.train_y.tolist())
    assert torch.equal(a.train_y, b.train_y)
    with pytest.raises(ValueError, match="exceeds"):
        split_holdout(images, labels, FinetuneConfig(holdout=20, train_subset=90))


def test_finetune_picks_best_lr_and_recovers_perturbed_model(trained, data):
    perturbed = build_perturbed(trained)
    state_before = {k: v.clone() for k, v in perturbed.state_dict().items()}
    cfg = FinetuneConfig(epochs=1, lrs=(1e-9, 3e-3), batch_size=32, seed=1)
    best, info = finetune(perturbed, cfg, data, progress=False)
    scores = info["held_top1_by_lr"]
    assert info["best_lr"] == 3e-3 and scores["0.003"] == max(scores.values()) == info["held_top1_after"]
    assert info["held_top1_after"] > info["held_top1_before"] + 10  # real recovery, not noise
    # The input model is untouched and the result is reproducible with the seed.
    assert all(torch.equal(v, perturbed.state_dict()[k]) for k, v in state_before.items())
    again, _ = finetune(perturbed, cfg, data, progress=False)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in best.state_dict().items())


def build_perturbed(model: nn.Module) -> nn.Module:
    import copy

    noisy = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * p.std() * 1.5)
    return noisy


def test_fp16_matches_fp32_and_int8_is_sensible(trained, data):
    loader = _batches(data.held_x, data.held_y)
    calib = _batches(data.train_x[:200], data.train_y[:200])
    scores = evaluate_precisions(trained, loader, calib)
    assert set(scores) == {"fp32", "fp16", "int8"}
    assert scores["fp32"] > 90
    assert abs(scores["fp16"] - scores["fp32"]) <= 1.0  # 300 images: at most 3 flips
    assert scores["int8"] > scores["fp32"] - 10
    with pytest.raises(ValueError, match="unknown precision"):
        evaluate_precisions(trained, loader, calib, precisions=("int4",))


def test_finetune_config_errors():
    with pytest.raises(ValueError, match="lrs"):
        FinetuneConfig(lrs=())
    with pytest.raises(ValueError, match="epochs"):
        FinetuneConfig(epochs=0)




def _tiny_tables(tmp_path: Path, weights: Path) -> PaperTablesConfig:
    return PaperTablesConfig(
        model="vgg-fmnist", weights=str(weights), alphas=(0.8, 0.9), n_samples=32, eval_limit=48,
        finetune=FinetuneConfig(epochs=1, lrs=(1e-3, 1e-4), batch_size=32, train_subset=64, holdout=32),
        solver=SolverOptions(max_iter=3), cp_alphas=(0.9,), cp_seeds=2, cp_solver=SolverOptions(max_iter=3),
        output_dir=str(tmp_path / "tables"), cache_dir=str(tmp_path / "cache"), batch_size=48, progress=False,
    )


def test_paper_tables_3_4_tiny(tmp_path, vgg_weights):
    cfg = _tiny_tables(tmp_path, vgg_weights)
    result = tables_3_4(cfg)
    keys = [key for key, _ in result["columns"]]
    assert keys == ["alpha", "compression_rate", *TABLE_3_4_METHODS, "tucker2-als+ft", "best_lr"]
    assert [row["alpha"] for row in result["rows"]] == [0.8, 0.9]
    for row in result["rows"]:
        assert row["compression_rate"] > 1 and row["best_lr"] in (1e-3, 1e-4)
        assert all(0 <= row[m] <= 100 for m in (*TABLE_3_4_METHODS, "tucker2-als+ft"))
        assert row["ft_before"] == row["tucker2-als"]
    assert "Tucker2-ALS + FT" in result["text"] and "FW-LRA" in result["text"]


def test_paper_table_6_tiny_and_resume(tmp_path, vgg_weights):
    cfg = dataclasses.replace(_tiny_tables(tmp_path, vgg_weights),
                              cp_solver=SolverOptions(max_iter=3, cp_init="random"))
    six = table_6(cfg)
    (row,) = six["rows"]
    assert len(row["cp-als_runs"]) == 2 and len(row["cp-als-sigma_runs"]) == 2
    assert "±" in row["cp-als-sigma"] and "CP-ALS-Sigma" in six["text"] and "random init" in six["text"]
    # The seed reaches the random initialization of both methods: the two seeds give different decompositions.
    for method in TABLE_6_METHODS:
        errors = {json.loads(f.read_text())["mean_rel_frob_err"]
                  for f in (tmp_path / "tables" / "table_6" / "points").glob(f"{method}-alpha*.json")}
        assert len(errors) == 2, (method, errors)
    # Resumable: a second run reads every point from disk.
    assert table_6(cfg)["rows"] == six["rows"]


def test_compress_job_precision_and_finetune_options(tmp_path, vgg_weights):
    from pipeline.compress import SigmaSource
    from pipeline.data import DatasetSpec
    from pipeline.runner import CompressConfig, run_compress

    config = CompressConfig(
        model="vgg-fmnist", weights=str(vgg_weights), methods=("tucker2-als",), alphas=(0.9,),
        sigma=SigmaSource(DatasetSpec("fashion-mnist"), n_samples=32, batch_size=16), eval_limit=48, batch_size=48,
        solver=SolverOptions(max_iter=3), output_dir=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"),
        progress=False, track=False, precision=True, calib_samples=16,
        finetune=FinetuneConfig(epochs=1, lrs=(1e-4,), batch_size=32, train_subset=32, holdout=16),
    )
    points = run_compress(config)["points"]
    assert [p["method"] for p in points] == ["tucker2-als", "tucker2-als+ft"]
    for p in points:
        assert set(p["precision"]) == {"fp32", "fp16", "int8", "calib_samples"}
        assert p["precision"]["fp32"] == pytest.approx(p["top1"])
        assert abs(p["precision"]["fp16"] - p["top1"]) <= 100 / 48 * 2 + 1e-9  # <= 2 flips of 48
    assert points[1]["top1_before_ft"] == points[0]["top1"]
    with pytest.raises(ValueError, match="finetune_methods"):
        CompressConfig(methods=("tucker2-als-sigma",), finetune=FinetuneConfig())
    with pytest.raises(ValueError, match="save_models"):
        CompressConfig(precision=True, save_models=False)

"""NORTON pruning surgery (spec Sec. 9, gates 6 and 8) and the pruning stage's bad-input errors."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from pipeline.compress import load_compressed, save_compressed
from pipeline.models import build_model
from pipeline.norton import PruneConfig, norton_prune, pruned_module_names
from sigma_core import NortonConv, filter_cp_als, get_module, replace_modules
from sigma_core.pruning import PruneGroup, kept_count, prune_channels, prune_groups

pytestmark = pytest.mark.usefixtures("single_thread")
X = torch.zeros(1, 1, 28, 28)


def _model(name, weights):
    from safetensors.torch import load_file

    m = build_model(name)
    m.load_state_dict(load_file(str(weights)))
    return m.eval()


def _nortonize(model, rank=2):
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)][1:]
    return replace_modules(model, {n: NortonConv.from_result(get_module(model, n),
                                                             filter_cp_als(get_module(model, n).weight.detach()
                                                                           .double(), rank, max_iter=5))
                                   for n in convs})


def _zeroed_logits(model, group: PruneGroup, removed, x):
    where = group.bn or group.producer

    def hook(_m, _i, out):
        out = out.clone()
        out[:, removed] = 0
        return out

    h = get_module(model, where).register_forward_hook(hook)
    try:
        return model(x)
    finally:
        h.remove()


@pytest.mark.parametrize("name,nortonize", [("vgg-fmnist", False), ("vgg-fmnist", True), ("resnet-fmnist", False)])
def test_pruned_logits_equal_channels_zeroed(name, nortonize, vgg_weights, resnet_weights):
    model = _model(name, vgg_weights if name.startswith("vgg") else resnet_weights).double()
    if nortonize:
        model = _nortonize(model).double()
    groups, reasons = prune_groups(model, X.double())
    expected = 4 if name.startswith("vgg") else 3
    assert len(groups) == expected
    if name == "resnet-fmnist":
        assert "residual add" in reasons["stages.0.0.conv2"]
    else:
        assert groups[-1].consumers == (("classifier.1", "linear", 9),)
    x = torch.randn(3, 1, 28, 28, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    for group in groups:
        keep = sorted(torch.randperm(group.channels, generator=g)[: group.channels // 2].tolist())
        removed = [i for i in range(group.channels) if i not in keep]
        pruned = prune_channels(model, group, keep)
        ref = _zeroed_logits(model, group, removed, x)
        assert (pruned(x) - ref).abs().max().item() < 1e-10
        bn_old, bn_new = get_module(model, group.bn), get_module(pruned, group.bn)
        for buf in ("weight", "bias", "running_mean", "running_var"):
            assert torch.equal(getattr(bn_new, buf), getattr(bn_old, buf)[keep])
        if nortonize:
            assert isinstance(get_module(pruned, group.producer), NortonConv)
    # float32
    model32 = model.float()
    group = groups[0]
    keep = list(range(0, group.channels, 3))
    removed = [i for i in range(group.channels) if i not in keep]
    x32 = x.float()
    ref = _zeroed_logits(model32, group, removed, x32)
    assert (prune_channels(model32, group, keep)(x32) - ref).abs().max().item() < 1e-5 * max(1, ref.abs().max())


def test_norton_prune_save_load_bitwise(vgg_weights, tmp_path):
    model = _nortonize(_model("vgg-fmnist", vgg_weights)).float()
    pruned, report = norton_prune(model, PruneConfig(rate=0.5, criterion="pabs"))
    assert set(report["groups"]) == {"features.4", "features.7", "features.11", "features.14"}
    assert all(len(g["kept"]) == get_module(model, p).out_channels // 2 for p, g in report["groups"].items())
    convs = [n for n, m in model.named_modules() if isinstance(m, NortonConv)]
    names = list(dict.fromkeys(convs + pruned_module_names(report)))
    save_compressed(tmp_path, "vgg-fmnist", 10, pruned, names)
    spec = json.loads((tmp_path / "spec.json").read_text())
    types = {s["type"] for s in spec["replacements"].values()}
    assert types == {"NortonConv", "PrunedBatchNorm2d", "PrunedLinear"}
    again = load_compressed(tmp_path)
    x = torch.randn(4, 1, 28, 28)
    assert torch.equal(again(x), pruned.eval()(x))
    # a spec whose kept indices do not fit the weights
    spec["replacements"]["features.5"]["pruning"]["out"][1] = [0, 1, 2]
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    # refused: by the spec.json checksum bound to the weights, or (an unbound older file) by the index check
    with pytest.raises(ValueError, match="was modified after|does not fit the weights"):
        load_compressed(tmp_path)


@pytest.mark.parametrize("criterion", ["pabs-code", "l1", "random"])
def test_criteria_run_on_dense_model(criterion, vgg_weights):
    model = _model("vgg-fmnist", vgg_weights)
    pruned, report = norton_prune(model, PruneConfig(rate=0.25, criterion=criterion))
    assert pruned(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert len(report["groups"]["features.4"]["kept"]) == 48


def test_bad_inputs(resnet_weights):
    for rate in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            PruneConfig(rate=rate)
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            kept_count(8, rate)
    with pytest.raises(ValueError, match="leaves no channel"):
        kept_count(4, 0.8)
    with pytest.raises(ValueError, match="sum to a positive number"):
        PruneConfig(rate=0.5, weights=(0, 0, 0))
    model = _model("resnet-fmnist", resnet_weights)
    with pytest.raises(ValueError, match="not prunable: residual add"):
        norton_prune(model, PruneConfig(rates=(("stages.1.0.conv2", 0.5),)))
    grouped = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2),
                            nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3))
    groups, reasons = prune_groups(grouped, torch.zeros(1, 1, 12, 12), include_first=True)
    assert "grouped conv" in reasons["3"] and "grouped conv" in reasons["0"]
    with pytest.raises(ValueError, match="grouped conv"):
        prune_channels(grouped, PruneGroup("3", "4", (("6", "conv", 1),), 8), [0, 1])


@pytest.mark.slow  # ~2.5 min on the shared 2-core machine (two Sigma-ALS layers sets + 3 evaluations)
def test_compress_job_with_pruning_stage_resumes_and_reloads(tmp_path, vgg_weights):
    from pipeline.compress import SigmaSource
    from pipeline.data import DatasetSpec
    from pipeline.runner import CompressConfig, run_compress

    def cfg(**kw):
        return CompressConfig(model="vgg-fmnist", weights=str(vgg_weights), eval_limit=64, track=False,
                              sigma=SigmaSource(DatasetSpec("fashion-mnist"), n_samples=64), progress=False,
                              output_dir=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"), **kw)

    with pytest.raises(ValueError, match="no alpha"):
        cfg(methods=("norton-cp",))
    config = cfg(methods=("norton-cp", "norton-cp-sigma"), cp_rank=1, prune=PruneConfig(rate=0.5))
    first = run_compress(config)
    labels = [p["method"] for p in first["points"]]
    assert labels == ["norton-cp+prune0.5-pabs", "norton-cp-sigma+prune0.5-pabs"]
    for point in first["points"]:
        model = load_compressed(point["model_dir"])
        assert get_module(model, "features.14").out_channels == 64
        assert get_module(model, "classifier.1").in_features == 64 * 9
    again = run_compress(config)
    assert [p["slug"] for p in again["points"]] == [p["slug"] for p in first["points"]]
    dense = run_compress(cfg(methods=("dense-prune",), fraction=1.0, prune=PruneConfig(rate=0.25, criterion="l1")))
    assert dense["points"][0]["macs"] < dense["baseline"]["macs"]


def test_finetune_sgd_option_keeps_default_identity_and_trains():
    from pipeline.finetune import FinetuneConfig, FinetuneData, finetune

    assert "optimizer" not in FinetuneConfig().identity()  # existing fine-tune slugs stay valid
    cfg = FinetuneConfig(epochs=2, lrs=(0.05,), batch_size=16, train_subset=None, holdout=16, optimizer="sgd",
                         weight_decay=5e-4, schedule="cosine-warmup", warmup_epochs=1)
    assert cfg.identity()["optimizer"] == "sgd"
    with pytest.raises(ValueError, match="optimizer"):
        FinetuneConfig(optimizer="rmsprop")
    with pytest.raises(ValueError, match="warmup_epochs"):
        FinetuneConfig(epochs=1, warmup_epochs=2)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 1, 8, 8, generator=g), torch.randint(0, 3, (64,), generator=g)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3))
    tuned, info = finetune(model, cfg, FinetuneData(x[:48], y[:48], x[48:], y[48:]), progress=False)
    assert info["best_lr"] == 0.05 and not torch.equal(tuned[0].weight, model[0].weight)

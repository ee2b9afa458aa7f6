"""Deployment: ONNX / torch.export of every layer type verified in onnxruntime, latency measurement checks."""

import pytest
import torch
from torch import nn

from pipeline.deploy import export_onnx, export_program, onnx_session
from pipeline.latency import LatencyConfig, measure_latency, measure_many, onnx_runner, torch_runner
from sigma_core import CPConv, LowRank1x1Conv, LowRankLinear, Tucker2Conv
from sigma_core.layers import _spec_types
from sigma_core.layers_norton import NortonConv, PrunedBatchNorm2d, PrunedConv2d, PrunedLinear
from sigma_core.layers_tucker import TuckerConv


def _example_layers() -> dict[str, nn.Module]:
    """One conv-shaped example of every factorized layer type (input (B, 6, 9, 9) -> (B, 8, *, *))."""
    return {
        "Tucker2Conv": Tucker2Conv(6, 8, 3, (4, 3), stride=2, padding=1),
        "CPConv": CPConv(6, 8, 3, 5, padding=1, padding_mode="reflect"),
        "LowRank1x1Conv": LowRank1x1Conv(6, 8, 3),
        "NortonConv": NortonConv(6, 8, 3, 2, padding=1),
        "TuckerConv": TuckerConv(6, 8, 3, (4, 3, 2, 2), padding=1, padding_mode="replicate"),
        "PrunedConv2d": PrunedConv2d(6, 8, 3, padding=1),
    }


class _AllTypes(nn.Module):
    """Every layer type in one model, each followed by a BatchNorm (folded on export) where it applies."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList()
        for layer in _example_layers().values():
            self.blocks.append(nn.Sequential(layer, nn.BatchNorm2d(8), nn.ReLU()))
        self.dense = nn.Sequential(nn.Conv2d(6, 8, 3, padding=1), PrunedBatchNorm2d(8), nn.ReLU())
        self.head = nn.Sequential(nn.Flatten(), PrunedLinear(8, 8), LowRankLinear(8, 5, 2), nn.BatchNorm1d(5))

    def forward(self, x):
        y = sum(b(x).mean(dim=(2, 3)) for b in self.blocks) + self.dense(x).mean(dim=(2, 3))
        return self.head(y[:, :, None, None])


def _model() -> nn.Module:
    gen = torch.Generator().manual_seed(0)
    model = _AllTypes()
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if "num_batches" in name:
                continue
            t.copy_(torch.rand(t.shape, generator=gen) + 0.2 if "running_var" in name else
                    torch.randn(t.shape, generator=gen) * 0.3)
    return model.eval()


def test_every_layer_type_has_an_export_example():
    """A new layer type in the spec registry must get an export example here (so that it is tested)."""
    covered = set(_example_layers()) | {"LowRankLinear", "PrunedLinear", "PrunedBatchNorm2d"}
    assert covered == set(_spec_types()), f"add an export example for {set(_spec_types()) - covered}"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = _model()
    x = torch.randn(3, 6, 9, 9, generator=torch.Generator().manual_seed(1))
    path = tmp_path_factory.mktemp("onnx") / "all.onnx"
    return model, x, export_onnx(model, x, path)


def test_onnx_export_of_every_layer_type_matches_torch(exported):
    model, x, result = exported
    assert result.path.exists() and result.size_bytes == result.path.stat().st_size > 0
    assert result.max_abs_err <= 1e-4
    assert len(result.fold.folded) == 8  # the seven conv-shaped blocks' BNs and the head's BN1d
    session = onnx_session(result.path, threads=1)
    x7 = torch.randn(7, 6, 9, 9)  # the batch axis is dynamic
    out = session.run(None, {session.get_inputs()[0].name: x7.numpy()})[0]
    with torch.no_grad():
        ref = model(x7).numpy()  # the unfolded original
    assert abs(out - ref).max() <= 1e-4 * max(1.0, abs(ref).max())


def test_torch_export_program_round_trip(tmp_path):
    model, x = _model(), torch.randn(2, 6, 9, 9)
    result = export_program(model, x, tmp_path / "all.pt2")
    assert result.max_abs_err <= 1e-5 and result.size_bytes > 0
    loaded = torch.export.load(str(result.path)).module()
    with torch.no_grad():
        assert (loaded(x) - model(x)).abs().max() <= 1e-5


def test_export_without_export_path_is_a_clear_error(tmp_path):
    import scipy.special

    class NumpyLayer(nn.Module):
        def forward(self, x):  # leaves torch for scipy: no exporter can follow it
            return torch.from_numpy(scipy.special.expit(x.detach().numpy()))

    with pytest.raises(ValueError, match="ONNX export of NumpyLayer failed"):
        export_onnx(NumpyLayer(), torch.randn(2, 3, 4, 4), tmp_path / "bad.onnx", fold_bn=False)
    assert not any(tmp_path.iterdir())  # nothing half-written is left


def test_export_bad_example_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="example must be an input batch"):
        export_onnx(_model(), torch.randn(6), tmp_path / "x.onnx")


def test_latency_stats_are_ordered_and_interleaved(exported, tmp_path):
    model, _, result = exported
    config = LatencyConfig(threads=1, batch_sizes=(1, 4), warmup=1, runs=5)
    stats = measure_many({"torch": torch_runner(model), "onnx": onnx_runner(result.path, 1)}, (6, 9, 9), config)
    for rows in stats.values():
        assert [s.batch_size for s in rows] == [1, 4]
        assert all(0 < s.p25_ms <= s.median_ms <= s.p75_ms and s.runs == 5 for s in rows)
    assert len(measure_latency(model, (6, 9, 9), config)) == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_latency_on_absent_device_is_a_clear_error():
    with pytest.raises(ValueError, match="not present on this machine"):
        LatencyConfig(device="cuda")


@pytest.mark.parametrize("kwargs, match", [({"threads": 0}, "threads"), ({"batch_sizes": ()}, "batch_sizes"),
                                           ({"runs": 2}, "runs >= 3"), ({"device": "tpu"}, "device")])
def test_latency_config_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LatencyConfig(**kwargs)

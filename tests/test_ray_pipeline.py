"""Ray pipeline: Sigma over Ray Data (three sources), tree reduction, per-layer Ray tasks; the Sigma cache.

Tests marked ``ray`` start a local Ray cluster (``uv run pytest -m ray tests/test_ray_pipeline.py``); the cache,
transform and planning tests are unmarked and run by default (no Ray cluster).

Reference model: ``vgg-fmnist`` with random weights (a few BatchNorm updates), saved to safetensors. The
2-actor vs single-process comparisons run the forward pass in float64 (``ModelSpec(dtype="float64")``): float32
convolutions are not reproducible across batch sizes / thread counts (~1e-8 relative on Sigma, measured), which
would hide any real sharding bug below that level.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch

from pipeline import sigma_cache as sigma_cache_module
from pipeline.compress import SigmaSource, compress_model, compute_sigmas
from pipeline.data import DatasetSpec, sample_subset
from pipeline.methods import SolverOptions
from pipeline.models import build_model
from pipeline.ray_sigma import (
    ImageFolderSource,
    ImageTransform,
    ModelSpec,
    ParquetSource,
    SigmaMemoryError,
    _list_folder,
    _plan_parquet,
    _SigmaWorker,
    check_memory,
    estimate_actor_memory,
    merge_states,
    ray_compute_sigmas,
)
from pipeline.sigma_cache import SigmaCache, SigmaKey, model_fingerprint
from sigma_core import RankRule, SigmaAccumulator, accumulate_sigma

SIGMA_LAYERS = ["features.0", "features.4", "features.11", "features.14", "classifier.1"]
CONV_LAYERS = ["features.4", "features.7", "features.11", "features.14"]
N_IMAGES, SEED, BATCH = 96, 3, 32
FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")

pytestmark = pytest.mark.skipif(not FMNIST.exists(), reason=f"Fashion-MNIST not found at {FMNIST}")


# ============================================================================================== fixtures
@pytest.fixture(scope="module")
def weights_file(vgg_weights) -> Path:
    return vgg_weights


def _model64(weights: Path) -> torch.nn.Module:
    """The reference model in float64, accepting the float32 images ``compute_sigmas`` feeds it."""
    model = build_model("vgg-fmnist", weights=weights).double().eval()
    model.register_forward_pre_hook(lambda module, args: (args[0].double(),))
    return model


@pytest.fixture(scope="module")
def fmnist_source() -> SigmaSource:
    return SigmaSource(DatasetSpec("fashion-mnist"), n_samples=N_IMAGES, seed=SEED, batch_size=BATCH)


@pytest.fixture(scope="module")
def reference(weights_file, fmnist_source):
    """Single-process Sigmas (compute_sigmas, float64 forward) of the sampled FMNIST subset, and their info."""
    return compute_sigmas(_model64(weights_file), SIGMA_LAYERS, fmnist_source, progress=False)


@pytest.fixture(scope="module")
def subset_pixels(fmnist_source) -> tuple[np.ndarray, np.ndarray]:
    """The raw uint8 pixels (N, 28, 28) and labels of exactly the images ``sample_subset`` picks."""
    dataset = fmnist_source.dataset.build()
    indices = sample_subset(dataset, N_IMAGES, SEED).indices
    return dataset.data[indices].numpy(), dataset.targets[indices].numpy()


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    with pytest.MonkeyPatch.context() as patch:
        # Workers inherit this: Ray's Parquet reader would otherwise start 32 footer-reader actors on 2 CPUs.
        patch.setenv("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
        yield ray
        ray.shutdown()


def _png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(out, format="PNG")
    return out.getvalue()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _assert_same_sigmas(got: dict, want: dict, tol: float = 1e-10) -> None:
    assert list(got) == list(want)
    for name, sigma in want.items():
        assert got[name].dtype == torch.float64
        assert _rel(got[name], sigma) <= tol, (name, _rel(got[name], sigma))


# ============================================================================================== Sigma over Ray
@pytest.mark.ray
def test_two_actors_match_single_process(ray_cluster, weights_file, fmnist_source, reference, tmp_path):
    want, want_info = reference
    spec = ModelSpec("vgg-fmnist", weights=str(weights_file), dtype="float64")
    cache = SigmaCache(tmp_path / "sigma")
    got, info = ray_compute_sigmas(spec, SIGMA_LAYERS, fmnist_source, num_actors=2, cache=cache, progress=False)
    _assert_same_sigmas(got, want)
    assert info["key"] == want_info["key"]  # same cache key semantics as compute_sigmas
    assert info["patches"] == want_info["patches"]
    assert len(info["actors"]) == 2 and sum(a["images"] for a in info["actors"]) == N_IMAGES
    # The whole-set key that sweep trials read resolves through an index, not a second copy of the data.
    whole = cache.load(info["key"], SIGMA_LAYERS)
    assert whole is not None and all(torch.equal(whole[n], got[n]) for n in SIGMA_LAYERS)
    assert not list((tmp_path / "sigma").glob(f"{info['key']}.safetensors"))

    # Per-layer entries: a later run on a subset of the layers starts no actor and returns the same matrices.
    again, info2 = ray_compute_sigmas(spec, SIGMA_LAYERS[1:3], fmnist_source, cache=cache, progress=False)
    assert info2["cached"] and info2["cached_layers"] == SIGMA_LAYERS[1:3]
    for name in SIGMA_LAYERS[1:3]:
        assert torch.equal(again[name], got[name])


@pytest.mark.ray
def test_reads_whole_set_entries_of_compute_sigmas(ray_cluster, weights_file, fmnist_source, reference, tmp_path):
    cache = SigmaCache(tmp_path / "sigma")
    compute_sigmas(_model64(weights_file), SIGMA_LAYERS, fmnist_source, cache=cache, progress=False)
    spec = ModelSpec("vgg-fmnist", weights=str(weights_file), dtype="float64")
    got, info = ray_compute_sigmas(spec, SIGMA_LAYERS, fmnist_source, cache=cache, progress=False)
    assert info["cached"] and not info["computed_layers"]
    _assert_same_sigmas(got, reference[0], tol=0)


@pytest.fixture(scope="module")
def parquet_file(subset_pixels, tmp_path_factory) -> Path:
    """The sampled FMNIST images as PNG bytes + labels, in several row groups."""
    pixels, labels = subset_pixels
    path = tmp_path_factory.mktemp("parquet") / "fmnist.parquet"
    table = pa.table({"image": [_png(p) for p in pixels], "label": labels.astype(np.int64)})
    pq.write_table(table, path, row_group_size=20)
    return path


@pytest.mark.ray
@pytest.mark.parametrize("reader", ["actors", "ray-data"])
def test_parquet_source_matches_single_process(ray_cluster, weights_file, reference, parquet_file, reader):
    spec = ModelSpec("vgg-fmnist", weights=str(weights_file), dtype="float64")
    source = ParquetSource(str(parquet_file), ImageTransform.fashion_mnist(), batch_size=BATCH, reader=reader)
    got, info = ray_compute_sigmas(spec, SIGMA_LAYERS, source, num_actors=2, progress=False)
    _assert_same_sigmas(got, reference[0])
    assert info["images"] == N_IMAGES and sum(a["images"] for a in info["actors"]) == N_IMAGES


@pytest.mark.ray
def test_image_folder_source_matches_single_process(ray_cluster, weights_file, reference, subset_pixels, tmp_path):
    pixels, labels = subset_pixels
    root = tmp_path / "folder"
    for k, (p, label) in enumerate(zip(pixels, labels)):
        (root / f"class{label}").mkdir(parents=True, exist_ok=True)
        (root / f"class{label}" / f"{k:04d}.png").write_bytes(_png(p))
    spec = ModelSpec("vgg-fmnist", weights=weights_file.read_bytes(), dtype="float64")  # weights as bytes
    source = ImageFolderSource(str(root), ImageTransform.fashion_mnist(), batch_size=BATCH)
    got, info = ray_compute_sigmas(spec, SIGMA_LAYERS, source, num_actors=2, progress=False)
    _assert_same_sigmas(got, reference[0])
    assert info["images"] == N_IMAGES


@pytest.mark.ray
def test_memory_budget_error_names_layers_and_remedies(weights_file, fmnist_source):
    spec = ModelSpec("vgg-fmnist", weights=str(weights_file))
    with pytest.raises(SigmaMemoryError) as err:
        ray_compute_sigmas(spec, SIGMA_LAYERS, fmnist_source, memory_budget_bytes=200 << 20, progress=False)
    message = str(err.value)
    # classifier.1 and features.14 (n = 1152) are the largest Gram matrices
    assert "classifier.1 (n=1152)" in message and "features.14 (n=1152)" in message
    assert "fewer layers per pass" in message and "float32" in message and "memory_budget_bytes" in message


@pytest.mark.ray
def test_tree_reduction_of_k_states_equals_one_pass(ray_cluster):
    from pipeline.ray_sigma import _accumulator, _merge_task, tree_reduce

    gen = torch.Generator().manual_seed(0)
    patches = torch.randn(700, 40, generator=gen, dtype=torch.float64).clamp_min(0)
    one = SigmaAccumulator(40)
    one.update(patches)
    merge = _merge_task()
    for k in (1, 2, 5, 8):
        parts = []
        for chunk in patches.tensor_split(k):
            acc = SigmaAccumulator(40)
            acc.update(chunk)
            parts.append({"n": acc.n, "count": acc.count, "gram": acc.gram.numpy(), "total": acc.total.numpy()})
        merged = _accumulator(ray_cluster.get(tree_reduce([ray_cluster.put(p) for p in parts], merge)))
        assert merged.count == one.count
        for centered in (False, True):
            assert _rel(merged.finalize(centered=centered), one.finalize(centered=centered)) < 1e-13


# ============================================================================================== Ray tasks
@pytest.mark.ray
def test_ray_compress_model_equals_compress_model(ray_cluster, weights_file):
    from pipeline.ray_tasks import _result, ray_compress_model

    source = SigmaSource(DatasetSpec("fashion-mnist"), n_samples=48, seed=SEED, batch_size=BATCH)
    sigmas, _ = compute_sigmas(_model64(weights_file), CONV_LAYERS, source, progress=False)
    model = build_model("vgg-fmnist", weights=weights_file).eval()
    # (48, 48) is too large for features.4 (S = 32 input channels) only.
    rule, options = RankRule(ranks=(48, 48)), SolverOptions(max_iter=4)
    want_model, want = compress_model(model, CONV_LAYERS, sigmas, rule, "tucker2-als-sigma", options=options,
                                      progress=False)
    seen = []
    got_model, got = ray_compress_model(model, CONV_LAYERS, sigmas, rule, "tucker2-als-sigma", options=options,
                                        progress=False, callback=seen.append)
    assert [o.name for o in got] == CONV_LAYERS and sorted(o.name for o in seen) == sorted(CONV_LAYERS)
    failed = [o.name for o in got if not o.ok]
    assert failed == ["features.4"] and "rank" in got[0].error.lower()
    for g, w in zip(got, want):
        assert g.ok == w.ok and g.ranks == w.ranks and g.params_after == w.params_after
        if g.ok:
            assert abs(g.rel_sigma_err - w.rel_sigma_err) <= 1e-8 * w.rel_sigma_err
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(got_model.eval()(x), want_model.eval()(x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model(x), build_model("vgg-fmnist", weights=weights_file).eval()(x))

    # A task that dies (not just an outcome error) becomes a failed outcome, not an exception.
    dead = ray_cluster.remote(lambda: 1 / 0).remote()
    outcome, replacement = _result(dead, "features.7", model.features[7], "tucker2-als-sigma")
    assert replacement is None and "ZeroDivisionError" in outcome.error


# ============================================================================================== no Ray needed
def test_memory_estimate_and_pass_suggestion(weights_file):
    model = build_model("vgg-fmnist", weights=weights_file)
    est = estimate_actor_memory(model, SIGMA_LAYERS, (1, 28, 28), batch_size=64)
    assert est.dims == {"features.0": 9, "features.4": 288, "features.11": 576, "features.14": 1152,
                        "classifier.1": 1152}
    assert est.gram_bytes["features.14"] == 8 * (1152 ** 2 + 1152)
    # features.14 sees 7x7 positions -> 49 patches per image, float32 activations, float64 compute
    assert est.im2col_bytes >= 64 * 49 * 1152 * (4 + 8)
    check_memory(est, est.total)  # exactly at budget: fine
    room = est.total - sum(est.gram_bytes.values()) + est.gram_bytes["features.14"] * 1.5
    with pytest.raises(SigmaMemoryError, match=r"fewer layers per pass: \d calls"):
        check_memory(est, room)
    with pytest.raises(SigmaMemoryError, match="largest layer alone does not fit"):
        check_memory(est, est.total - sum(est.gram_bytes.values()) + 1000)
    # float32 compute keeps a float32 partial Gram next to the float64 sum.
    est32 = estimate_actor_memory(model, SIGMA_LAYERS, (1, 28, 28), batch_size=64, compute_dtype="float32")
    assert est32.gram_bytes["features.14"] == 8 * (1152 ** 2 + 1152) + 4 * 1152 ** 2


def test_image_transform_is_bitwise_torchvision(subset_pixels):
    from PIL import Image
    from torchvision import transforms
    from torchvision.transforms import InterpolationMode

    from pipeline.data import load_fashion_mnist
    from pipeline.ray_sigma import decode_image

    pixels, _ = subset_pixels
    for size in (None, 32):
        want = load_fashion_mnist(image_size=size).transform
        mine = ImageTransform.fashion_mnist(size)
        for p in pixels[:4]:
            assert torch.equal(mine(decode_image(_png(p))), want(Image.fromarray(p, mode="L")))
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (45, 61, 3), dtype=np.uint8), mode="RGB")
    for resample, mode in (("bilinear", InterpolationMode.BILINEAR), ("bicubic", InterpolationMode.BICUBIC)):
        want = transforms.Compose([transforms.Resize(32, interpolation=mode), transforms.CenterCrop(28),
                                   transforms.ToTensor(), transforms.Normalize((0.485, 0.456, 0.406),
                                                                               (0.229, 0.224, 0.225))])
        assert torch.equal(ImageTransform.imagenet(28, resample=resample)(rgb), want(rgb))


def test_folder_listing_follows_imagefolder_order(tmp_path, subset_pixels):
    from torchvision.datasets import ImageFolder

    pixels, _ = subset_pixels
    names = ["b/z.png", "b/a.png", "a/sub/c.png", "a/b.png", "a/sub-x/d.png", "c/e.PNG", "c/notes.txt"]
    for k, name in enumerate(names):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(_png(pixels[k]))
    files, labels = _list_folder(pafs.LocalFileSystem(), str(tmp_path), None)
    samples = ImageFolder(str(tmp_path)).samples
    assert [f.path for f in files] == [path for path, _ in samples]
    assert labels == [label for _, label in samples]


def test_parquet_subset_rows_match_sample_subset(tmp_path, weights_file, subset_pixels):
    """The row-group path (a sampled subset of a Parquet file), run through the actor class without Ray."""
    pixels, labels = subset_pixels
    path = tmp_path / "all.parquet"
    pq.write_table(pa.table({"image": [_png(p) for p in pixels], "label": labels}), path, row_group_size=16)
    plan = _plan_parquet(ParquetSource(str(path), ImageTransform.fashion_mnist(), n_samples=40, seed=7), 10)
    chosen = sample_subset(range(N_IMAGES), 40, 7).indices
    assert plan.n_samples == 40
    rows = [item["row_group"] * 16 + r for item in plan.items for r in item["rows"]]
    assert rows == list(chosen)

    spec = ModelSpec("vgg-fmnist", weights=str(weights_file), dtype="float64")
    worker = _SigmaWorker(spec, SIGMA_LAYERS, plan.decoder, "cpu", "float64", threads=1)
    batches = ({key: _object_array(item[key]) for key in item} for item in plan.items)
    *states, info = worker.run(batches, plan.batch_size)
    assert info["images"] == 40
    images = torch.stack([ImageTransform.fashion_mnist()(_pil(pixels[i])) for i in chosen])
    want = accumulate_sigma(_model64(weights_file), [images], SIGMA_LAYERS)
    for name, state in zip(SIGMA_LAYERS, states):
        got = SigmaAccumulator.from_state_dict({k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v
                                                for k, v in state.items()})
        assert _rel(got.finalize(), want[name].finalize()) < 1e-10


def _object_array(value) -> np.ndarray:
    """A one-row numpy column holding ``value`` as one object (what Ray Data's numpy batches look like)."""
    out = np.empty(1, dtype=object)
    out[0] = value
    return out


def _pil(pixels: np.ndarray):
    from PIL import Image

    return Image.fromarray(pixels, mode="L")


def test_merge_states_matches_accumulator_merge():
    gen = torch.Generator().manual_seed(1)
    a, b = SigmaAccumulator(6), SigmaAccumulator(6)
    a.update(torch.randn(10, 6, generator=gen, dtype=torch.float64))
    b.update(torch.randn(7, 6, generator=gen, dtype=torch.float64))
    state = merge_states(*({"n": x.n, "count": x.count, "gram": x.gram.numpy(), "total": x.total.numpy()}
                           for x in (a, b)))
    a.merge(b)
    assert state["count"] == a.count and np.allclose(state["gram"], a.gram.numpy(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="dimensions"):
        merge_states({"n": 3, "count": 1, "gram": 0, "total": 0}, {"n": 4, "count": 1, "gram": 0, "total": 0})


# ============================================================================================== Sigma cache
def _sigmas(*names: str, n: int = 5) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(len(names))
    out = {}
    for name in names:
        u = torch.randn(3 * n, n, generator=gen, dtype=torch.float64)
        out[name] = u.T @ u / u.shape[0]
    return out


def _key() -> SigmaKey:
    return SigmaKey("w" * 16, {"name": "fashion-mnist", "split": "train"}, 64, 0, False)


@pytest.mark.parametrize("kind", ["path", "file-uri", "object-store"])
def test_cache_round_trip(tmp_path, kind):
    if kind == "path":
        cache = SigmaCache(tmp_path / "c")
        assert cache.directory == (tmp_path / "c").resolve()
    elif kind == "file-uri":
        cache = SigmaCache(f"file://{tmp_path}/c")
        assert isinstance(cache.filesystem, pafs.LocalFileSystem)
    else:  # a non-local pyarrow filesystem takes the object-store path (single write, then the sidecar)
        cache = SigmaCache("c", filesystem=pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem()))
        assert cache.directory is None
    sigmas = _sigmas("a.conv", "b.fc")
    assert cache.load("k1", ["a.conv"]) is None
    cache.save("k1", sigmas, {"note": "x"})
    loaded = cache.load("k1", ["b.fc", "a.conv"])
    assert list(loaded) == ["b.fc", "a.conv"]
    for name in sigmas:
        assert torch.equal(loaded[name], sigmas[name])
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["k1.json", "k1.safetensors"]


def test_cache_per_layer_entries_are_reused(tmp_path):
    cache, key = SigmaCache(tmp_path), _key()
    first = _sigmas("l1", "l2")
    cache.save_layers(key, first, {"run": 1})
    found = cache.load_layers(key, ["l1", "l2", "l3"])  # a sweep that adds l3
    assert sorted(found) == ["l1", "l2"]
    assert torch.equal(found["l2"], first["l2"])
    # fetch: per-layer entries are read, only l3 is computed; a whole-set entry of an older run answers at once.
    got, computed = cache.fetch(key, ["l1", "l2", "l3"], lambda missing: _sigmas(*missing), {})
    assert computed == ["l3"] and torch.equal(got["l1"], first["l1"])
    cache.save(key.for_layers(["l4", "l5"]), _sigmas("l4", "l5"), {})
    got, computed = cache.fetch(key, ["l4", "l5"], lambda missing: pytest.fail("recomputed"), {})
    assert computed == [] and sorted(got) == ["l4", "l5"]


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flip", "truncate", "sidecar", "no-data"])
def test_corrupt_cache_entry_is_detected_and_recomputed(tmp_path, weights_file, damage, monkeypatch):
    from pipeline import compress

    calls = []
    real = compress.accumulate_sigma
    monkeypatch.setattr(compress, "accumulate_sigma", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = build_model("vgg-fmnist", weights=weights_file)
    source = SigmaSource(DatasetSpec("fashion-mnist"), n_samples=8, seed=0, batch_size=8)
    cache = SigmaCache(tmp_path)
    first, info = compute_sigmas(model, ["features.4"], source, cache=cache, progress=False)
    second, _ = compute_sigmas(model, ["features.4"], source, cache=cache, progress=False)
    assert len(calls) == 1 and torch.equal(first["features.4"], second["features.4"])

    data, meta = tmp_path / f"{info['key']}.safetensors", tmp_path / f"{info['key']}.json"
    if damage == "flip":
        _flip_byte(data, data.stat().st_size - 100)  # inside the float64 payload: still parses, checksum fails
    elif damage == "truncate":
        data.write_bytes(data.read_bytes()[:-1000])
    elif damage == "sidecar":
        meta.write_text("{not json")
    else:
        data.unlink()
    with pytest.warns(UserWarning, match="corrupt"):
        third, _ = compute_sigmas(model, ["features.4"], source, cache=cache, progress=False)
    assert len(calls) == 2  # recomputed, not used
    assert torch.equal(third["features.4"], first["features.4"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compute_sigmas(model, ["features.4"], source, cache=cache, progress=False)
    assert len(calls) == 2 and not [w for w in caught if "corrupt" in str(w.message)]  # rewritten entry is valid


@pytest.mark.parametrize("kind", ["local", "object-store"])
def test_interrupted_write_leaves_no_partial_file(tmp_path, monkeypatch, kind):
    if kind == "local":
        cache = SigmaCache(tmp_path / "c")
    else:
        cache = SigmaCache("c", filesystem=pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem()))
    cache.save("old", _sigmas("x"), {})
    before = sorted(p.name for p in (tmp_path / "c").iterdir())

    def crash_midway(handle, data):
        handle.write(memoryview(data)[: len(data) // 2])
        raise KeyboardInterrupt("simulated crash mid-write")

    monkeypatch.setattr(sigma_cache_module, "_write_stream", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        cache.save("new", _sigmas("x", "y"), {})
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == before  # no temp file, no prefix, no sidecar
    assert cache.load("new", ["x"]) is None
    monkeypatch.undo()
    cache.save("new", _sigmas("x", "y"), {})
    assert sorted(cache.load("new", ["x", "y"])) == ["x", "y"]


def test_sigma_key_depends_on_content():
    model = build_model("vgg-fmnist")
    key = SigmaKey(model_fingerprint(model), DatasetSpec("fashion-mnist").identity(), 64, 0, False)
    variants = {
        key.for_layers(["a"]),
        key.for_layers(["a", "b"]),
        SigmaKey(key.weights_hash, key.dataset_identity, 65, 0, False).for_layers(["a"]),
        SigmaKey(key.weights_hash, key.dataset_identity, 64, 1, False).for_layers(["a"]),
        SigmaKey(key.weights_hash, key.dataset_identity, 64, 0, True).for_layers(["a"]),
        SigmaKey(key.weights_hash, DatasetSpec("fashion-mnist", image_size=32).identity(), 64, 0,
                 False).for_layers(["a"]),
        SigmaKey(model_fingerprint(model.double()), key.dataset_identity, 64, 0, False).for_layers(["a"]),
    }
    assert len(variants) == 7
    assert key.for_layers(["b", "a"]) == key.for_layers(["a", "b"])

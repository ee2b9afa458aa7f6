"""SVD-Sigma vs plain SVD on the reference models' linear layers: top-1 at equal rank (paper App. E).

For each linear layer (vgg-fmnist: the hidden ``classifier.1`` 1152 -> 256; resnet-fmnist: its only linear layer,
the final classifier ``fc`` 128 -> 10, which the compress job keeps dense by default) and each rank r, the layer
alone is replaced by its rank-r factorization -- SVD-Sigma (Sigma from N Fashion-MNIST training images) or plain
truncated SVD, identical architecture and parameter count -- and the model is evaluated on the full test set.

Evaluation is exact but cheap: the layer's test-set inputs are captured once with a forward hook and only the
layers after it are re-run (checked: the dense tail reproduces the full model's top-1).

Usage: ``python benchmarks/svd_sigma_vs_svd.py [--n 2000] [--models vgg-fmnist,resnet-fmnist]``. The reference
models must already be cached in ``cache/models`` (``sigma-compress train --model all``); nothing is trained here.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: spin-waiting threads on shared cores

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._common import log, machine_header, owned_cores, table  # noqa: E402
from pipeline.compress import SigmaSource, compute_sigmas  # noqa: E402
from pipeline.data import DatasetSpec, make_loader  # noqa: E402
from pipeline.train import TrainConfig, load_or_train_reference, reference_paths  # noqa: E402
from sigma_core import LowRankLinear, RankRule, get_module, rel_frob_err, rel_sigma_err, svd_sigma  # noqa: E402
from sigma_core import svd_truncated  # noqa: E402

# Layer and ranks per reference model; the tail re-run after the layer (both layers end their model).
SETUPS = {
    "vgg-fmnist": ("classifier.1", (2, 4, 6, 8, 12, 16, 32, 64, 128)),
    "resnet-fmnist": ("fc", (2, 3, 4, 6, 8)),
}


def _tail(model: nn.Module, name: str) -> nn.Module:
    """The modules run after layer ``name`` (its later siblings in an nn.Sequential that ends the model)."""
    parent_name, _, child = name.rpartition(".")
    if not parent_name:  # a top-level layer that is the model's last op (resnet-fmnist.fc)
        return nn.Identity()
    parent = get_module(model, parent_name)
    keys = list(parent._modules)
    return nn.Sequential(*[parent._modules[k] for k in keys[keys.index(child) + 1:]])


@torch.inference_mode()
def _capture_inputs(model: nn.Module, layer: nn.Module, loader) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's inputs and the labels over the whole loader."""
    inputs, labels = [], []
    handle = layer.register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach().clone()))
    try:
        for x, y in loader:
            model(x)
            labels.append(y)
    finally:
        handle.remove()
    return torch.cat(inputs), torch.cat(labels)


@torch.inference_mode()
def _top1(layer: nn.Module, tail: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return 100.0 * float((tail(layer(x)).argmax(1) == y).float().mean())


def run_model(name: str, n: int, seed: int) -> str:
    layer_name, ranks = SETUPS[name]
    config = TrainConfig(model=name)
    weights, _ = reference_paths(config, REPO / "cache" / "models")
    if not weights.exists():
        raise SystemExit(f"{weights} not found: train the reference model first (sigma-compress train --model {name})")
    model, meta = load_or_train_reference(config, REPO / "cache" / "models", progress=False)
    model.eval()
    layer = get_module(model, layer_name)
    tic = time.perf_counter()
    sigmas, _ = compute_sigmas(model, [layer_name], SigmaSource(DatasetSpec("fashion-mnist"), n_samples=n, seed=seed),
                               progress=False, data_cache_dir=REPO / "cache" / "datasets")
    sigma = sigmas[layer_name]
    log(f"{name}: Sigma of {layer_name} from {n} images in {time.perf_counter() - tic:.1f}s")
    test = DatasetSpec("fashion-mnist", split="test").build(cache_dir=REPO / "cache" / "datasets")
    x, y = _capture_inputs(model, layer, make_loader(test, batch_size=1000))
    tail = _tail(model, layer_name).eval()
    dense_top1 = _top1(layer, tail, x, y)
    w = layer.weight.detach().double()
    rows = []
    for r in ranks:
        cells = [str(r)]
        for fn in (lambda: svd_sigma(w, sigma, r), lambda: svd_truncated(w, r)):
            res = fn()
            low = LowRankLinear.from_factors(layer, res.first, res.second).eval()
            cells += [f"{_top1(low, tail, x, y):.2f}", f"{rel_sigma_err(w, res.reconstruct(), sigma):.4f}",
                      f"{rel_frob_err(w, res.reconstruct()):.4f}"]
        cells.append(str(sum(p.numel() for p in low.parameters())))
        rows.append(cells)
        log(f"  r={r}: {cells}")
    alpha_ranks = {a: RankRule(alpha=a).resolve_svd(w) for a in (1.0, 0.8, 0.6)}
    title = (f"{name} / {layer_name} weight {tuple(w.shape)}: dense top-1 {dense_top1:.2f}% "
             f"(sidecar {meta.get('test_top1')}%), Sigma from {n} train images (seed {seed}), "
             f"test set {len(y)} images; alpha-rule ranks {alpha_ranks}")
    headers = ["rank", "SVD-Sigma top1", "rel_sigma", "rel_frob", "SVD top1", "rel_sigma", "rel_frob", "params"]
    return table(headers, rows, title=title)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="training images for Sigma")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", default="vgg-fmnist,resnet-fmnist")
    args = parser.parse_args()
    torch.set_num_threads(owned_cores())
    print(machine_header(torch.device("cpu")))
    for name in args.models.split(","):
        print()
        print(run_model(name.strip(), args.n, args.seed))


if __name__ == "__main__":
    main()

"""Sigma throughput over Ray Data: 1 vs 2 actors (vs the single-process path) on the reference model's layers.

    python benchmarks/bench_ray_sigma.py [--quick] [--n 1200] [--actors 1,2] [--use-gpu] [--compute-dtype float32]

Runs :func:`pipeline.ray_sigma.ray_compute_sigmas` on N real Fashion-MNIST images (the sampled subset of the
``fashion-mnist`` train split, as the pipeline uses it) for the layers the pipeline compresses by default
(``select_layers``: features.4/7/11/14 of ``vgg-fmnist``, random init), once per actor count, on a local Ray
cluster sized to the cores this process owns. Reports per run:

* wall: the whole call (actor start-up, i.e. process spawn + imports + model build, the data pipeline, the tree
  reduction and finalize) -- what a one-off Sigma costs;
* steady: the busiest actor's time inside ``run`` (decode + forward + accumulate) -- the throughput that scales
  with N and with the number of actors;
* the agreement with the single-process ``accumulate_sigma`` Sigma of the same images (float32 forward: the
  forward pass itself differs at ~1e-8 between batchings, see pipeline/ray_sigma.py).

The single-process row is ``accumulate_sigma`` in this process with as many torch threads as cores owned.
Prints one table on stdout (progress on stderr). ``--use-gpu`` puts each actor on one GPU (float32 Gram
products recommended there: ``--compute-dtype float32``).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported: no spin-waiting BLAS threads

import argparse  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import log, machine_header, owned_cores, table  # noqa: E402

from pipeline.compress import SigmaSource, select_layers  # noqa: E402
from pipeline.data import DatasetSpec, make_loader, sample_subset  # noqa: E402
from pipeline.models import build_model  # noqa: E402
from pipeline.ray_sigma import ModelSpec, ray_compute_sigmas  # noqa: E402
from sigma_core import accumulate_sigma  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vgg-fmnist", help="reference model (random init unless --weights)")
    p.add_argument("--weights", default=None, help="weights file (default: seeded random init)")
    p.add_argument("--n", type=int, default=None, help="images (default 1200; 300 with --quick)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--actors", default="1,2", help="comma-separated actor counts")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per actor (when the cluster has GPUs)")
    p.add_argument("--compute-dtype", choices=["float64", "float32"], default="float64")
    p.add_argument("--num-cpus", type=float, default=None, help="Ray cluster CPUs (default: cores owned)")
    p.add_argument("--repeats", type=int, default=2, help="runs per configuration; the fastest steady time is kept "
                   "(shared machines: the least disturbed run)")
    p.add_argument("--quick", action="store_true", help="N = 300, one repeat (smoke run)")
    return p.parse_args()


def weights_file(args: argparse.Namespace, workdir: Path) -> str:
    if args.weights:
        return args.weights
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = build_model(args.model)
    path = workdir / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


def single_process(model: torch.nn.Module, layers: list[str], source: SigmaSource,
                   repeats: int) -> tuple[dict, float]:
    """Sigma of the same images in this process (the reference), and its time excluding data loading."""
    dataset = source.dataset.build()
    subset = sample_subset(dataset, source.n_samples, source.seed)
    batches = [x for x, _ in make_loader(subset, batch_size=source.batch_size)]
    best, accs = float("inf"), None
    for _ in range(repeats):
        tic = time.perf_counter()
        accs = accumulate_sigma(model.eval(), batches, layers)
        best = min(best, time.perf_counter() - tic)
    return {name: acc.finalize() for name, acc in accs.items()}, best


def main() -> None:
    args = parse_args()
    import ray

    n = args.n or (300 if args.quick else 1200)
    repeats = 1 if args.quick else args.repeats
    cores = owned_cores()
    torch.set_num_threads(cores)
    counts = [int(c) for c in args.actors.split(",")]
    device = torch.device("cuda" if args.use_gpu and torch.cuda.is_available() else "cpu")
    print(machine_header(device))
    with tempfile.TemporaryDirectory() as tmp:
        weights = weights_file(args, Path(tmp))
        model = build_model(args.model, weights=weights)
        layers, _ = select_layers(model, None)
        source = SigmaSource(DatasetSpec("fashion-mnist"), n_samples=n, seed=0, batch_size=args.batch_size)
        print(f"model {args.model} ({'given weights' if args.weights else 'random init'}), layers {layers}; "
              f"N = {n} Fashion-MNIST train images, batch {args.batch_size}, Gram products in "
              f"{args.compute_dtype}, forward in float32")
        print()

        log("single process ...")
        ref, t_single = single_process(model, layers, source, repeats)
        rows = [["single process", f"{cores} threads", "-", f"{t_single:.1f}", f"{n / t_single:.1f}", "-", "-",
                 "-", "0"]]

        log("starting Ray ...")
        ray.init(num_cpus=args.num_cpus or cores, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
        spec = ModelSpec(args.model, weights=weights)
        steady_by_count = {}
        for count in counts:
            runs = []
            for r in range(repeats):
                log(f"{count} actor(s), run {r + 1}/{repeats} ...")
                runs.append(ray_compute_sigmas(spec, layers, source, num_actors=count, use_gpu=args.use_gpu,
                                               batch_size=args.batch_size, compute_dtype=args.compute_dtype,
                                               progress=False))
            sigmas, info = min(runs, key=lambda run: max(a["seconds"] for a in run[1]["actors"]))
            steady = max(a["seconds"] for a in info["actors"])
            steady_by_count[count] = steady
            diff = max(float((sigmas[k] - ref[k]).norm() / ref[k].norm()) for k in layers)
            shares = "/".join(str(a["images"]) for a in info["actors"])
            rows.append([f"ray, {count} actor(s)", f"{info['device']}, images {shares}", f"{info['seconds']:.1f}",
                         f"{steady:.1f}", f"{n / steady:.1f}", f"{n / info['seconds']:.1f}",
                         f"{info['reduce_seconds']:.1f}",
                         f"{steady_by_count[counts[0]] / steady:.2f}" if count != counts[0] else "1.00",
                         f"{diff:.1e}"])
        ray.shutdown()

    print(table(["run", "where", "wall s", "steady s", "img/s steady", "img/s wall", "reduce s",
                 f"speedup vs {counts[0]} actor", "max rel diff vs single"], rows,
                title=f"Sigma throughput, best of {repeats} run(s) by steady time (wall: whole call incl. actor "
                      "start-up; steady: busiest actor's decode + forward + accumulate)"))
    if len(counts) > 1:
        a, b = counts[0], counts[-1]
        print(f"\nsteady throughput ratio {b} vs {a} actor(s): {steady_by_count[a] / steady_by_count[b]:.2f} "
              f"(ideal {b / a:.1f}); cores owned: {cores}; load average at end: "
              + " ".join(f"{x:.2f}" for x in os.getloadavg()))


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    log(f"done in {time.perf_counter() - t0:.0f} s")

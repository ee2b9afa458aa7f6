"""``sigma-compress compare``: every method at the same targets, with latency, as one leaderboard."""

from __future__ import annotations

import argparse
import dataclasses


def add_parser(sub, add_compress) -> None:
    """Register the ``compare`` subcommand; ``add_compress`` adds the shared model / data / solver flags."""
    p = sub.add_parser("compare", help="every method brought to the same sizes: leaderboard, Pareto plots, latency",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_compress(p, demo=False)
    p.set_defaults(methods="all", output_dir="outputs/compare")
    p.add_argument("--targets", default="cr3,cr5,cr8",
                   help="sizes to reach: crX = X-fold fewer parameters, macX = X-fold fewer MACs, comma separated")
    p.add_argument("--tolerance", type=float, default=0.03, help="accepted relative miss of a target")
    p.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    p.add_argument("--no-onnx", action="store_true", help="time torch only (no ONNX export / onnxruntime)")
    p.add_argument("--latency-threads", type=int, default=2, help="threads for every latency measurement")
    p.add_argument("--latency-runs", type=int, default=30, help="timed runs per model and batch size")
    p.add_argument("--latency-batches", default="1,64", help="batch sizes timed, comma separated")


def compare_config(args, compress_config):
    """A :class:`pipeline.compare.CompareConfig` from parsed flags (``compress_config`` builds the template)."""
    from pipeline.compare import CompareConfig, parse_targets
    from pipeline.latency import LatencyConfig
    from pipeline.methods import METHODS

    for flag in ("ranks", "fraction", "cp_rank", "svd_rank", "linear_method"):
        if getattr(args, flag, None) is not None:
            raise ValueError(f"--{flag.replace('_', '-')} does not apply to compare: each method's ranks are chosen "
                             "to meet --targets")
    methods = None if args.methods == "all" else tuple(m.strip() for m in args.methods.split(",") if m.strip())
    template_args = argparse.Namespace(**{**vars(args), "methods": ",".join(methods or METHODS)})
    template = compress_config(template_args)
    finetune = template.finetune
    template = dataclasses.replace(template, finetune=None, finetune_methods=())
    latency = None if args.no_latency else LatencyConfig(
        threads=args.latency_threads, runs=args.latency_runs, device=args.device,
        batch_sizes=tuple(int(b) for b in args.latency_batches.split(",") if b.strip()))
    return CompareConfig(template, targets=parse_targets(args.targets), methods=methods, finetune=finetune,
                         tolerance=args.tolerance, latency=latency, onnx=not args.no_onnx)


def run(args, compress_config) -> int:
    from pipeline.compare import run_compare

    result = run_compare(compare_config(args, compress_config))
    print(open(result["markdown"]).read())
    print(f"leaderboard: {result['markdown']}, {result['parquet']}; Pareto plot: {result['plot']}")
    return 0

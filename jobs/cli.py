"""Command line: ``sigma-compress {train,compress,demo,sweep,paper-tables} ...`` (also ``python -m jobs.cli``).

Parses flags into the frozen configs of ``pipeline`` and calls it; no algebra here.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# numpy/scipy (EVBMF SVDs) use OpenBLAS, whose worker threads spin: one thread is faster on shared machines.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

DEMO_ALPHAS = (0.6, 0.7, 0.8, 0.9, 1.0)


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _ranks(text: str) -> tuple[int, int]:
    parts = text.split(",")
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"ranks are R_T,R_S (two integers), got {text!r}")
    try:
        return int(parts[0]), int(parts[1])
    except ValueError:
        raise argparse.ArgumentTypeError(f"ranks are R_T,R_S (two integers), got {text!r}") from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


CP_INITS = ("svd", "random")
LINEAR_METHODS = ("svd", "svd-sigma")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="resnet-fmnist", help="resnet-fmnist, vgg-fmnist, or a torchvision arch")
    p.add_argument("--weights", default=None, help="safetensors or state_dict file (required for torchvision archs)")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--data-root", default=None, help="Fashion-MNIST directory (default: Debian's)")
    p.add_argument("--cache-dir", default="cache", help="trained models, Sigma cache, prepared datasets")
    p.add_argument("--retrain", action="store_true", help="retrain a corrupt cached reference model")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--no-progress", action="store_true")


def _add_compress(p: argparse.ArgumentParser, *, demo: bool) -> None:
    _add_common(p)
    p.add_argument("--sigma-dataset", default="fashion-mnist", help="fashion-mnist, digits or imagefolder")
    p.add_argument("--sigma-root", default=None, help="root of the Sigma dataset (imagefolder)")
    p.add_argument("--sigma-split", default="train")
    p.add_argument("--sigma-image-size", type=int, default=None, help="resample Sigma images to this size")
    p.add_argument("--resample", default="bilinear", choices=("bilinear", "bicubic"))
    p.add_argument("-n", "--n-samples", type=int, default=2000, help="images used for Sigma")
    p.add_argument("--sigma-seed", type=int, default=0)
    p.add_argument("--centered", action="store_true", help="centered covariance instead of E[uu^T]")
    p.add_argument("--eval-dataset", default="fashion-mnist")
    p.add_argument("--eval-root", default=None)
    p.add_argument("--eval-limit", type=int, default=None, help="evaluate on the first N test images only")
    p.add_argument("--methods", default="tucker2-als,tucker2-als-sigma" if demo else "tucker2-als-sigma")
    p.add_argument("--alpha", type=_floats, default=None,
                   help=f"VBMF ratio(s) of paper Eq. 2, comma separated (default {DEMO_ALPHAS if demo else (0.8,)})")
    p.set_defaults(default_alpha=DEMO_ALPHAS if demo else (0.8,))
    rank = p.add_mutually_exclusive_group()
    rank.add_argument("--ranks", type=_ranks, default=None, help="explicit Tucker-2 R_T,R_S for every layer")
    rank.add_argument("--fraction", type=float, default=None, help="ranks = fraction of each layer's channels")
    rank.add_argument("--cp-rank", type=_positive_int, default=None, metavar="R",
                      help="explicit CP rank R for every conv (CP methods only: cp-als, cp-als-sigma, "
                           "cp-deflation-sigma)")
    p.add_argument("--svd-rank", type=_positive_int, default=None, metavar="r",
                   help="explicit SVD rank r of the layers factorized by SVD (svd/svd-sigma methods, --linear-method)")
    p.add_argument("--linear-method", default=None, choices=LINEAR_METHODS,
                   help="hybrid compression (paper App. E): linear layers by this SVD method, convs by each of "
                        "--methods")
    p.add_argument("--compress-last-linear", action="store_true",
                   help="also factorize the classifier (last nn.Linear), which SVD methods leave dense by default")
    p.add_argument("--layers", default=None, help="comma-separated layer names (default: plan_layers' choice)")
    p.add_argument("--max-iter", type=int, default=100)
    p.add_argument("--tol", type=float, default=1e-4, help="stop when rel_sigma_err decreases less than this")
    p.add_argument("--cg-steps", type=int, default=None, help="inexact mode: CG steps per sweep")
    p.add_argument("--cp-init", default="svd", choices=CP_INITS,
                   help="initialization of the CP methods: svd (deterministic) or random (Gaussian factors "
                        "from --solver-seed)")
    p.add_argument("--solver-seed", type=int, default=0, help="seed of the random CP initialization")
    p.add_argument("--output-dir", default="outputs/demo" if demo else "outputs/compress")
    p.add_argument("--tracking-uri", default=None, help="MLflow URI (default: sqlite in the output dir)")
    p.add_argument("--experiment", default="sigma-compress")
    p.add_argument("--no-mlflow", action="store_true")
    p.add_argument("--no-save-models", action="store_true")
    _add_finetune(p)
    from jobs.cli_alloc import add_target_flags

    add_target_flags(p)
    p.add_argument("--finetune-methods", default=None,
                   help="methods whose compressed model is fine-tuned (extra point '<method>+ft'); default: "
                        "tucker2-als when among --methods (the paper's baseline), else every method")
    p.add_argument("--precision", action="store_true",
                   help="also report FP16 and INT8 (post-training, x86 backend) top-1 of every point")
    p.add_argument("--calib-samples", type=int, default=500, help="INT8 calibration images (from the Sigma dataset)")


def _add_finetune(p: argparse.ArgumentParser) -> None:
    p.add_argument("--finetune", action="store_true",
                   help="fine-tuned baseline: Adam, best lr of a grid on a held-out split of the training set")
    p.add_argument("--finetune-epochs", type=int, default=1)
    p.add_argument("--finetune-lrs", type=_floats, default=(1e-3, 1e-4, 1e-5), help="Adam lr grid, comma separated")
    p.add_argument("--finetune-subset", type=int, default=10_000,
                   help="training images used for fine-tuning (0: all but the held-out split)")
    p.add_argument("--finetune-holdout", type=int, default=5_000, help="held-out training images choosing the lr")


def _finetune_methods(args) -> tuple[str, ...]:
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    if args.finetune_methods is not None:
        return tuple(m.strip() for m in args.finetune_methods.split(",") if m.strip())
    return ("tucker2-als",) if "tucker2-als" in methods else methods


def _finetune_config(args):
    from pipeline.finetune import FinetuneConfig

    if not args.finetune:
        return None
    return FinetuneConfig(epochs=args.finetune_epochs, lrs=args.finetune_lrs, train_subset=args.finetune_subset or None,
                          holdout=args.finetune_holdout, data_root=args.data_root)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sigma-compress", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train (or load cached) reference CNNs on Fashion-MNIST")
    _add_common(train)
    train.add_argument("--epochs", type=int, default=None)
    compress = sub.add_parser("compress", help="compress a model and print the accuracy/compression table")
    _add_compress(compress, demo=False)
    demo = sub.add_parser("demo", help="reference model, Sigma from 2,000 images, both methods at several alphas")
    _add_compress(demo, demo=True)
    sweep = sub.add_parser("sweep", help="Ray Tune sweep from a YAML config (same as python -m jobs.sweep)")
    sweep.add_argument("--config", required=True, help="YAML file, e.g. jobs/configs/fmnist_demo_sweep.yaml")
    sweep.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    sweep.add_argument("--dry-run", action="store_true", help="print the grid and exit")
    tables = sub.add_parser("paper-tables", help="the paper's Tables 3-4 (Tucker-2 baselines + fine-tuning) or "
                                                 "Table 6 (CP-ALS vs CP-ALS-Sigma over seeds) on Fashion-MNIST")
    _add_common(tables)
    tables.add_argument("--table", default="3-4", choices=("3-4", "6", "all"))
    tables.add_argument("--alpha", type=_floats, default=(0.7, 0.8, 0.9), help="rows of Tables 3-4")
    tables.add_argument("--cp-alpha", type=_floats, default=(0.8, 0.9), help="rows of Table 6")
    tables.add_argument("--cp-seeds", type=int, default=5, help="seeds of Table 6")
    tables.add_argument("--cp-max-iter", type=int, default=50, help="ALS sweep cap of Table 6")
    tables.add_argument("--cp-init", default="random", choices=CP_INITS,
                        help="CP initialization of Table 6 (the paper: random, over --cp-seeds seeds)")
    tables.add_argument("--max-iter", type=int, default=100, help="ALS sweep cap of Tables 3-4")
    tables.add_argument("-n", "--n-samples", type=int, default=2000, help="training images for Sigma")
    tables.add_argument("--eval-limit", type=int, default=None)
    tables.add_argument("--no-finetune", action="store_true", help="leave out the Tucker2-ALS + FT column")
    _add_finetune(tables)
    tables.add_argument("--output-dir", default="outputs/paper_tables")
    tables.add_argument("--save", default=None, metavar="FILE", help="also write the printed table(s) to FILE")
    return parser


def _train_config(args):
    from pipeline.train import TrainConfig

    kwargs = {"model": args.model, "data_root": args.data_root}
    if getattr(args, "epochs", None):
        kwargs["epochs"] = args.epochs
    return TrainConfig(**kwargs)


def compress_config(args):
    """Build a :class:`pipeline.runner.CompressConfig` from parsed flags."""
    from pipeline.compress import SigmaSource
    from pipeline.data import DatasetSpec
    from pipeline.methods import SolverOptions
    from pipeline.models import REFERENCE_MODELS
    from pipeline.runner import CompressConfig

    def root_for(name, root):
        return root if root is not None else (args.data_root if name == "fashion-mnist" else None)

    sigma = SigmaSource(
        DatasetSpec(args.sigma_dataset, root_for(args.sigma_dataset, args.sigma_root), args.sigma_split,
                    args.sigma_image_size, args.resample),
        n_samples=args.n_samples, seed=args.sigma_seed, centered=args.centered,
    )
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    from jobs.cli_alloc import target_kwargs

    args.alpha_given = args.alpha is not None
    args.alpha = args.alpha if args.alpha is not None else args.default_alpha
    return CompressConfig(
        model=args.model, weights=args.weights, num_classes=args.num_classes,
        train=_train_config(args) if args.model in REFERENCE_MODELS and args.weights is None else None,
        sigma=sigma,
        eval_dataset=DatasetSpec(args.eval_dataset, root_for(args.eval_dataset, args.eval_root), "test"),
        eval_limit=args.eval_limit,
        methods=methods,
        alphas=args.alpha, ranks=args.ranks, fraction=args.fraction, cp_rank=args.cp_rank,
        layers=tuple(x.strip() for x in args.layers.split(",")) if args.layers else None,
        linear_method=args.linear_method, svd_rank=args.svd_rank, compress_last_linear=args.compress_last_linear,
        solver=SolverOptions(max_iter=args.max_iter, tol=args.tol, cg_steps=args.cg_steps, seed=args.solver_seed,
                             cp_init=args.cp_init),
        device=args.device, output_dir=args.output_dir, cache_dir=args.cache_dir,
        tracking_uri=args.tracking_uri, experiment=args.experiment, track=not args.no_mlflow,
        save_models=not args.no_save_models, retrain_corrupt=args.retrain, progress=not args.no_progress,
        finetune=_finetune_config(args),
        finetune_methods=_finetune_methods(args),
        precision=args.precision, calib_samples=args.calib_samples,
        **target_kwargs(args),
    )


def _cmd_train(args) -> int:
    from pipeline.train import load_or_train_reference

    names = [args.model] if args.model != "all" else ["resnet-fmnist", "vgg-fmnist"]
    for name in names:
        args.model = name
        _, meta = load_or_train_reference(_train_config(args), Path(args.cache_dir) / "models",
                                          retrain_corrupt=args.retrain, progress=not args.no_progress)
        print(f"{name}: test top-1 {meta.get('test_top1', float('nan')):.2f}%  ({meta.get('weights_path', '')})")
    return 0


def _cmd_compress(args) -> int:
    import time

    from pipeline.runner import run_compress

    tic = time.perf_counter()
    result = run_compress(compress_config(args))
    print("\nPer-layer errors and timings:\n" + result["layer_table"])
    layers = result["plan"]
    skipped = [f"  {c['name']}: {c['reason']}" for c in layers if not c["selected"]]
    if skipped:
        print("\nLayers left dense:\n" + "\n".join(skipped))
    print("\nAccuracy vs compression (no fine-tuning except '+ft' rows):\n" + result["table"])
    from pipeline.allocation import target_line

    targets = [line for line in map(target_line, result["points"]) if line]
    if targets:
        print("\nSize targets:\n" + "\n".join("  " + line for line in targets))
    precision = [p for p in result["points"] if "precision" in p]
    if precision:
        print("\nPost-training precision (top-1 %):\n" + "\n".join(
            f"  {p['method']} {p['rank_rule']}: " + "  ".join(f"{k.upper()} {p['precision'][k]:.2f}"
                                                              for k in ("fp32", "fp16", "int8")) for p in precision))
    if result["comparison"]:
        print("\nAt equal ranks:\n" + "\n".join("  " + line for line in result["comparison"]))
    tracked = " and MLflow runs" if not args.no_mlflow else ""
    sigma = {None: "no Sigma needed", True: "Sigma from cache", False: "Sigma computed"}
    print(f"\nwrote {result['markdown']}, {result['plot']}{tracked} ({sigma[result['sigma_info'].get('cached')]}); "
          f"total {time.perf_counter() - tic:.0f}s")
    return 0


def paper_tables_config(args):
    """Build a :class:`pipeline.paper_tables.PaperTablesConfig` from parsed ``paper-tables`` flags."""
    from pipeline.methods import SolverOptions
    from pipeline.paper_tables import PaperTablesConfig

    args.finetune = not args.no_finetune
    return PaperTablesConfig(
        model=args.model, weights=args.weights, alphas=args.alpha, n_samples=args.n_samples,
        eval_limit=args.eval_limit, finetune=_finetune_config(args), solver=SolverOptions(max_iter=args.max_iter),
        cp_alphas=args.cp_alpha, cp_seeds=args.cp_seeds,
        cp_solver=SolverOptions(max_iter=args.cp_max_iter, cp_init=args.cp_init),
        output_dir=args.output_dir, cache_dir=args.cache_dir, data_root=args.data_root, device=args.device,
        progress=not args.no_progress,
    )


def _cmd_paper_tables(args) -> int:
    from pipeline.paper_tables import table_6, tables_3_4

    config = paper_tables_config(args)
    texts = []
    if args.table in ("3-4", "all"):
        texts.append(tables_3_4(config)["text"])
    if args.table in ("6", "all"):
        texts.append(table_6(config)["text"])
    text = "\n\n".join(texts)
    print(text)
    if args.save:
        Path(args.save).parent.mkdir(parents=True, exist_ok=True)
        Path(args.save).write_text(text + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "train":
            return _cmd_train(args)
        if args.command == "sweep":
            from jobs.sweep import main as sweep_main

            return sweep_main(["--config", args.config, *(f"--set={s}" for s in args.set),
                               *(["--dry-run"] if args.dry_run else [])])
        if args.command == "paper-tables":
            return _cmd_paper_tables(args)
        return _cmd_compress(args)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""``sigma-compress tdlrt``: TDLRT (rank-adaptive Tucker training) runs, resumable per (tau, seed).

Also the ``paper-tables --table tdlrt-3`` handler (TDLRT paper Table 3 beside ours).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["add_tdlrt_parser", "cmd_tdlrt", "add_table_args", "cmd_tdlrt_table"]


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def _seeds(text: str) -> tuple[int, ...]:
    out: list[int] = []
    for part in text.split(","):
        if "-" in part:
            a, b = part.split("-")
            out += range(int(a), int(b) + 1)
        elif part.strip():
            out.append(int(part))
    return tuple(out)


def add_tdlrt_parser(sub) -> None:
    p = sub.add_parser("tdlrt", help="TDLRT: rank-adaptive Tucker training of the convs (LeNet5 / Fashion-MNIST)")
    p.add_argument("--tau", type=_floats, default=(0.15,), help="comma-separated tolerances, e.g. 0.1,0.15,0.2,0.3")
    p.add_argument("--seeds", type=_seeds, default=(0,), help="e.g. 0-4 or 0,2")
    p.add_argument("--epochs", type=int, default=70)
    p.add_argument("--method", default="tdlrt", choices=("tdlrt", "sgd-baseline"))
    p.add_argument("--baseline", action="store_true", help="also run the dense baseline for every seed")
    p.add_argument("--model", default="lenet5-fmnist")
    p.add_argument("--init", default="half-rank", choices=("half-rank", "dense-hosvd", "pretrained"))
    p.add_argument("--from-pretrained", default=None, metavar="WEIGHTS",
                   help="dense weights file: init from its HOSVD (to --init-tau) and fine-tune rank-adaptively")
    p.add_argument("--init-tau", type=float, default=None)
    p.add_argument("--rule", default="tntorch", choices=("tntorch", "per-mode"))
    p.add_argument("--train-subset", type=int, default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--output-dir", default="outputs/tdlrt")
    p.add_argument("--restart", action="store_true", help="discard existing checkpoints")
    p.add_argument("--no-mlflow", action="store_true")
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--no-progress", action="store_true")


def _configs(args):
    from pipeline.tdlrt import TDLRTConfig

    common = {"model": args.model, "epochs": args.epochs, "rule": args.rule, "train_subset": args.train_subset,
              "num_threads": args.threads}
    if args.from_pretrained:
        common.update(init="pretrained", pretrained=args.from_pretrained, init_tau=args.init_tau)
    else:
        common["init"] = args.init
    out = []
    for seed in args.seeds:
        if args.baseline or args.method == "sgd-baseline":
            out.append(TDLRTConfig(method="sgd-baseline", seed=seed, **common))
        if args.method == "tdlrt":
            out += [TDLRTConfig(method="tdlrt", tau=tau, seed=seed, **common) for tau in args.tau]
    return out


def cmd_tdlrt(args) -> int:
    from pipeline.tdlrt import train_tdlrt
    from pipeline.tracking import Tracker, default_tracking_uri

    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    tracker = Tracker(args.tracking_uri or default_tracking_uri(args.output_dir), "tdlrt", enabled=not args.no_mlflow)
    for cfg in _configs(args):
        _, info = train_tdlrt(cfg, output_dir=args.output_dir, tracker=tracker, progress=not args.no_progress,
                              restart=args.restart)
        best = info["best"]
        print(f"{cfg.run_name()}: best val epoch {best['epoch']}: test top-1 {best['test_top1']:.2f} %, eval CR "
              f"{best['eval_cr']:.2f} %, ranks {best['ranks']} ({info['run_dir']})")
    return 0


def add_table_args(tables) -> None:
    tables.add_argument("--tdlrt-dir", default="outputs/tdlrt", help="run directory of `sigma-compress tdlrt`")
    tables.add_argument("--tdlrt-seeds", type=_seeds, default=(0, 1, 2, 3, 4))


def cmd_tdlrt_table(args) -> str:
    from pipeline.tdlrt_table import tdlrt_table_3

    return tdlrt_table_3(args.tdlrt_dir, seeds=args.tdlrt_seeds)["text"]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="sigma-compress")
    add_tdlrt_parser(parser.add_subparsers(dest="command", required=True))
    sys.exit(cmd_tdlrt(parser.parse_args()))

"""CLI flags of NORTON's pruning stage and of the SGD fine-tuning option (hooked into ``jobs/cli.py``)."""

from __future__ import annotations

import argparse
import dataclasses


def _rates(text: str) -> tuple[tuple[str, float], ...]:
    out = []
    for item in text.split(","):
        name, sep, rate = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"--prune-rates takes name=rate,... got {item!r}")
        out.append((name.strip(), float(rate)))
    return tuple(out)


def _weights(text: str) -> tuple[float, float, float]:
    vals = tuple(float(v) for v in text.split(","))
    if len(vals) != 3:
        raise argparse.ArgumentTypeError(f"--pabs-weights takes alpha,beta,gamma, got {text!r}")
    return vals


def add_norton_flags(p: argparse.ArgumentParser) -> None:
    from pipeline.norton import CRITERIA
    from sigma_core.pabs import ANGLES

    g = p.add_argument_group("NORTON pruning (after norton-cp / norton-cp-sigma / dense-prune)")
    g.add_argument("--prune-rate", type=float, default=None,
                   help="fraction of filters removed in every prunable conv group, in [0, 1)")
    g.add_argument("--prune-rates", type=_rates, default=(), metavar="NAME=RATE,...",
                   help="per-producer prune rates (override --prune-rate), e.g. features.4=0.25,features.7=0.5")
    g.add_argument("--prune-criterion", default="pabs", choices=CRITERIA,
                   help="pabs (paper eq. 11 + Algorithm 1), pabs-code (public code, bugs included), l1, random, "
                        "pabs-sigma / output-corr-sigma (beyond the paper)")
    g.add_argument("--pabs-weights", type=_weights, default=(1 / 3, 1 / 3, 1 / 3), metavar="A,B,C",
                   help="eq. 11 weights of the height, width and channel factors (must sum to > 0)")
    g.add_argument("--pabs-angle", default="max", choices=ANGLES,
                   help="phi: largest principal angle (paper), chordal distance or mean angle")
    g.add_argument("--prune-seed", type=int, default=0, help="seed of the random criterion")
    g.add_argument("--finetune-optimizer", default="adam", choices=("adam", "sgd"),
                   help="adam (default) or NORTON's SGD with momentum")
    g.add_argument("--finetune-momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--finetune-weight-decay", type=float, default=0.0, help="weight decay (NORTON: 5e-4)")
    g.add_argument("--finetune-schedule", default="constant", choices=("constant", "cosine-warmup"),
                   help="learning-rate schedule (NORTON: linear warm-up then cosine)")
    g.add_argument("--finetune-warmup-epochs", type=int, default=0, help="warm-up epochs of cosine-warmup")


def apply_norton_flags(config, args):
    """``config`` (CompressConfig) with the pruning stage and the fine-tuning optimizer options of ``args``."""
    from pipeline.norton import PruneConfig

    changes = {}
    if args.prune_rate is not None or args.prune_rates:
        changes["prune"] = PruneConfig(rate=args.prune_rate, rates=args.prune_rates, criterion=args.prune_criterion,
                                       weights=args.pabs_weights, angle=args.pabs_angle, seed=args.prune_seed)
    if config.finetune is not None:
        changes["finetune"] = dataclasses.replace(
            config.finetune, optimizer=args.finetune_optimizer, momentum=args.finetune_momentum,
            weight_decay=args.finetune_weight_decay, schedule=args.finetune_schedule,
            warmup_epochs=args.finetune_warmup_epochs)
    return dataclasses.replace(config, **changes) if changes else config

"""CLI flags of budgeted allocation (``--target-cr`` / ``--target-params`` / ``--target-mac-reduction``).

Hooked into ``sigma-compress compress|demo`` by :func:`add_target_flags`; :func:`target_kwargs` turns the parsed
flags into the ``target`` / ``allocation`` fields of :class:`pipeline.runner.CompressConfig`.
"""

from __future__ import annotations

import argparse

_RANK_FLAGS = (("ranks", "--ranks"), ("fraction", "--fraction"), ("cp_rank", "--cp-rank"), ("svd_rank", "--svd-rank"),
               ("alpha_given", "--alpha"))


def add_target_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("budgeted allocation (a model-level size target instead of a per-layer rank rule)")
    g.add_argument("--target-cr", type=float, default=None, metavar="X",
                   help="compression rate params(original)/params(compressed) to reach (> 1)")
    g.add_argument("--target-params", type=int, default=None, metavar="N", help="total parameters to reach")
    g.add_argument("--target-mac-reduction", type=float, default=None, metavar="X",
                   help="MACs(original)/MACs(compressed) to reach (> 1)")
    g.add_argument("--proxy", default="sigma", choices=("sigma", "loss"),
                   help="per-layer error the allocation minimizes: rel_sigma_err^2 (no extra data pass) or the "
                        "held-out loss increase with only that layer factorized")
    g.add_argument("--alloc-grid", type=int, default=6, help="candidate ranks per mode (geometric + linear)")
    g.add_argument("--alloc-loose-iter", type=int, default=3, help="ALS sweeps of the candidate solves")
    g.add_argument("--loss-images", type=int, default=256, help="held-out images of the loss proxy")
    g.add_argument("--no-dense-candidate", action="store_true", help="never keep an allocated layer dense")


def target_kwargs(args) -> dict:
    """``target`` and ``allocation`` for CompressConfig; a clear ValueError for contradictory flags."""
    from pipeline.allocation import AllocationConfig
    from sigma_core.allocate import RankTarget

    given = [(flag, value) for flag, value in (("--target-cr", args.target_cr), ("--target-params", args.target_params),
                                               ("--target-mac-reduction", args.target_mac_reduction))
             if value is not None]
    if not given:
        return {}
    if len(given) > 1:
        raise ValueError(f"give one size target, not {' and '.join(f for f, _ in given)}")
    clash = [flag for attr, flag in _RANK_FLAGS if getattr(args, attr, None) not in (None, False)]
    if clash:
        raise ValueError(f"{given[0][0]} chooses every layer's ranks itself; drop {', '.join(clash)}")
    key = {"--target-cr": "cr", "--target-params": "params", "--target-mac-reduction": "mac_reduction"}[given[0][0]]
    return {"target": RankTarget(**{key: given[0][1]}, proxy=args.proxy),
            "allocation": AllocationConfig(grid=args.alloc_grid, loose_iter=args.alloc_loose_iter,
                                           loss_images=args.loss_images, allow_dense=not args.no_dense_candidate)}

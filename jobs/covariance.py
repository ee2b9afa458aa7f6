"""Covariance job: ``python -m jobs.covariance --config jobs/configs/fmnist_demo_sweep.yaml``.

Phase 1 of a sweep alone: every Sigma its grid needs (each Sigma source x N x seed), and the Fisher / activation
statistics of FW-LRA / AG-LRA points, are computed once into the Sigma cache (``sigma_backend: ray`` spreads it over Ray actors). A later ``jobs.sweep`` with the same config finds them
all cached.
"""

from __future__ import annotations

import sys

from jobs.yaml_config import job_parser, parse_overrides, run_job, sweep_config_from_yaml


def main(argv: list[str] | None = None) -> int:
    args = job_parser("python -m jobs.covariance", __doc__).parse_args(argv)

    def body() -> int:
        from pipeline.sweep import run_covariance

        info = run_covariance(sweep_config_from_yaml(args.config, **parse_overrides(args.set)))
        for ident, key in sorted(info["keys"].items()):
            detail = info["sigmas"][ident]
            state = "cached" if detail.get("cached") else f"computed in {detail.get('seconds', 0):.1f}s"
            print(f"{ident:40s} {key}  {state}")
        for ident, key in sorted(info["stat_keys"].items()):
            print(f"{ident:40s} {key}")
        print(f"{info['computed']} computed, {info['cached']} from cache, {len(info['layers'])} layers; "
              f"statistics (FW-LRA / AG-LRA): {info['stats']['computed']} computed, {info['stats']['cached']} from "
              f"cache; cache {info['location']}")
        return 0

    return run_job(body)


if __name__ == "__main__":
    sys.exit(main())

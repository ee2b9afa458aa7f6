"""Sweep job: ``python -m jobs.sweep --config jobs/configs/fmnist_demo_sweep.yaml`` (a ``ray job submit`` entrypoint).

Runs (or resumes: finished trials are never run again) the Ray Tune sweep of :mod:`pipeline.sweep`; the same
command after a crash runs only the missing trials. Exit status: 0 all trials recorded, 1 some trials failed
(rerun to retry them), 2 bad config.
"""

from __future__ import annotations

import json
import sys

from jobs.yaml_config import job_parser, parse_overrides, run_job, sweep_config_from_yaml


def main(argv: list[str] | None = None) -> int:
    parser = job_parser("python -m jobs.sweep", __doc__)
    parser.add_argument("--dry-run", action="store_true", help="parse the config, print the grid and exit")
    args = parser.parse_args(argv)

    def body() -> int:
        config = sweep_config_from_yaml(args.config, **parse_overrides(args.set))
        if args.dry_run:
            return _print_grid(config)
        from pipeline.sweep import run_sweep

        result = run_sweep(config)
        print(_summary(result))
        return 1 if result.trials_failed else 0

    return run_job(body)


def _print_grid(config) -> int:
    from pipeline.sweep import grid_points

    points = grid_points(config)
    for point in points:
        print(json.dumps(point.params()))
    print(f"{len(points)} trials")
    return 0


def _summary(result) -> str:
    lines = [
        (f"sweep {result.invocation}: {result.trials_total} trials in the grid, {result.trials_skipped} already "
         f"recorded, {result.trials_run} run now, {len(result.trials_failed)} failed; Sigma computed "
         f"{result.sigma_computed}x, {result.sigma_cached} from cache; {result.seconds:.0f}s"),
        f"table:    {result.parquet_path}",
        f"report:   {result.report.get('markdown', '-')}",
        f"MLflow:   {result.tracking_uri or 'off'} (experiment id {result.experiment_id})",
    ]
    if result.trials_failed:
        lines.append("failed:   " + ", ".join(result.trials_failed) + " (run the same command again to retry)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

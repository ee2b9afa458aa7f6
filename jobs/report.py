"""Report job: ``python -m jobs.report --config jobs/configs/fmnist_demo_sweep.yaml``.

Reads the sweep's ``<output_dir>/trials.parquet`` and writes the paper-style plots (accuracy vs compression rate
per Sigma source and per method, accuracy vs N) and a Markdown summary to ``<output_dir>/report/``, logged to
MLflow (``tracking_uri`` of the config) unless ``track: false``. ``--parquet``/``--out`` report any table.
"""

from __future__ import annotations

import sys
from pathlib import Path

from jobs.yaml_config import job_parser, parse_overrides, run_job, sweep_config_from_yaml


def main(argv: list[str] | None = None) -> int:
    parser = job_parser("python -m jobs.report", __doc__)
    parser.add_argument("--parquet", default=None, help="table to report (default <output_dir>/trials.parquet)")
    parser.add_argument("--out", default=None, help="report directory (default <output_dir>/report)")
    args = parser.parse_args(argv)

    def body() -> int:
        from pipeline.report import run_report
        from pipeline.tracking import Tracker, default_tracking_uri

        config = sweep_config_from_yaml(args.config, **parse_overrides(args.set))
        out = Path(config.output_dir)
        tracker = None
        if config.track:
            tracker = Tracker(config.tracking_uri or default_tracking_uri(out), config.experiment)
        paths = run_report(args.parquet or out / "trials.parquet", args.out or out / "report", tracker)
        for name, path in paths.items():
            print(f"{name:10s} {path}")
        return 0

    return run_job(body)


if __name__ == "__main__":
    sys.exit(main())

"""Compress job: ``python -m jobs.compress --config jobs/configs/fmnist_compress.yaml``.

One model, one Sigma source, a few (method, alpha) points in one process (:func:`pipeline.runner.run_compress`),
resumable; the YAML keys are the fields of :class:`pipeline.runner.CompressConfig`.
"""

from __future__ import annotations

import sys

from jobs.yaml_config import compress_config_from_yaml, job_parser, parse_overrides, run_job


def main(argv: list[str] | None = None) -> int:
    args = job_parser("python -m jobs.compress", __doc__).parse_args(argv)

    def body() -> int:
        from pipeline.runner import run_compress

        result = run_compress(compress_config_from_yaml(args.config, **parse_overrides(args.set)))
        print("Accuracy vs compression (no fine-tuning):\n" + result["table"])
        print(f"wrote {result['markdown']} and {result['plot']}")
        from jobs.cli import _report_failed, report_failures

        return max(report_failures(result["points"]), _report_failed(result.get("failed", [])))

    return run_job(body)


if __name__ == "__main__":
    sys.exit(main())

"""MLflow logging of compression runs (default: a local SQLite store in the output directory)."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

__all__ = ["default_tracking_uri", "Tracker"]


def default_tracking_uri(output_dir: str | Path) -> str:
    """``$MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<output_dir>/mlflow.db``."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{(Path(output_dir).resolve() / 'mlflow.db')}"


def _clean_metrics(metrics: Mapping[str, object]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, (int, float)) and math.isfinite(float(value)):
            out[key] = float(value)
    return out


def _safe_key(text: str) -> str:
    # MLflow keys allow alphanumerics, _ - . / and spaces only.
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in text)


class Tracker:
    """Thin wrapper: one parent run per job, one child run per compressed model.

    Parameters
    ----------
    tracking_uri : str
    experiment : str
    enabled : bool
        False turns every call into a no-op (tests, dry runs).
    """

    def __init__(self, tracking_uri: str, experiment: str, enabled: bool = True):
        self.enabled = enabled
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        if enabled:
            import mlflow

            self._mlflow = mlflow
            mlflow.set_tracking_uri(tracking_uri)
            mlflow.set_experiment(experiment)

    @contextlib.contextmanager
    def run(self, name: str, params: Mapping[str, object] | None = None, nested: bool = False) -> Iterator[None]:
        """Start an MLflow run (nested under the active one if ``nested``)."""
        if not self.enabled:
            yield None
            return
        with self._mlflow.start_run(run_name=name, nested=nested) as active:
            if params:
                self._mlflow.log_params({_safe_key(k): str(v)[:500] for k, v in params.items()})
            yield active

    def log_metrics(self, metrics: Mapping[str, object]) -> None:
        if self.enabled:
            self._mlflow.log_metrics({_safe_key(k): v for k, v in _clean_metrics(metrics).items()})

    def log_layers(self, layers: Sequence[Mapping]) -> None:
        """Per-layer errors/timings as metrics ``layer.<name>.<field>`` and the full list as JSON."""
        if not self.enabled:
            return
        metrics = {}
        for row in layers:
            for field in ("rel_sigma_err", "rel_frob_err", "seconds"):
                if row.get(field) is not None:
                    metrics[f"layer.{row['name']}.{field}"] = row[field]
        self.log_metrics(metrics)
        self.log_json(list(layers), "layers.json")

    def log_json(self, obj: object, name: str) -> None:
        if self.enabled:
            self._mlflow.log_dict(obj, name)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.enabled:
            path = Path(path)
            if path.is_dir():
                self._mlflow.log_artifacts(str(path), artifact_path=artifact_path)
            else:
                self._mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def log_text(self, text: str, name: str) -> None:
        if self.enabled:
            self._mlflow.log_text(text, name)

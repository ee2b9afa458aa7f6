"""MLflow logging of compression runs (default: a local SQLite store in the output directory).

Everything a run writes stays in the output directory: the store (``<output_dir>/mlflow.db``) and, for an
experiment this module creates in a local store, its artifacts (``<output_dir>/mlartifacts``), so a copied
output folder carries its plots and models. One parent run per output directory: its id is kept in
``<output_dir>/mlflow_run.json`` and a resumed job continues that run; runs that a killed process left RUNNING
(the parent and its children) are marked FAILED when the job resumes.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

__all__ = ["default_tracking_uri", "mark_interrupted_failed", "relocate_store", "Tracker"]


def default_tracking_uri(output_dir: str | Path) -> str:
    """``$MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<output_dir>/mlflow.db``."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{(Path(output_dir).resolve() / 'mlflow.db')}"


def _is_local(uri: str) -> bool:
    return not uri.startswith(("http:", "https:", "databricks"))


def _experiment_id(uri: str, experiment: str, artifact_dir: str | Path | None) -> str:
    """Id of ``experiment``, created with its artifacts in ``artifact_dir`` (local stores) when new."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            client.restore_experiment(found.experiment_id)
        return found.experiment_id
    location = Path(artifact_dir).resolve().as_uri() if artifact_dir is not None and _is_local(uri) else None
    return client.create_experiment(experiment, artifact_location=location)


def relocate_store(tracking_uri: str, artifact_dir: str | Path) -> int:
    """Point a copied or moved output folder's runs at its own artifacts; returns the rows changed.

    Applies only to the folder's own store: a ``sqlite:///<dir>/mlflow.db`` next to ``artifact_dir``
    (``<dir>/mlartifacts``). Experiments and runs whose artifact location is another folder's ``mlartifacts``
    (the folder this one was copied from) are rewritten to this one, so ``mlflow ui`` / ``MlflowClient`` on the
    copy read the copy's plots and models. Every ``compress`` / ``demo`` run calls it.
    """
    import sqlite3

    prefix = "sqlite:///"
    artifact_dir = Path(artifact_dir).resolve()
    if not tracking_uri.startswith(prefix):
        return 0
    db = Path(tracking_uri[len(prefix):]).resolve()
    if db.parent != artifact_dir.parent or not db.is_file():
        return 0
    new = artifact_dir.as_uri()
    changed = 0
    with contextlib.closing(sqlite3.connect(db)) as conn:
        try:
            rows = conn.execute("select experiment_id, artifact_location from experiments").fetchall()
        except sqlite3.DatabaseError:
            return 0  # not an MLflow store (yet)
        for exp_id, location in rows:
            old = (location or "").rstrip("/")
            if not old.endswith("/mlartifacts") or old == new:
                continue
            changed += conn.execute("update experiments set artifact_location = ? where experiment_id = ?",
                                    (new, exp_id)).rowcount
            changed += conn.execute("update runs set artifact_uri = ? || substr(artifact_uri, ?) "
                                    "where experiment_id = ? and artifact_uri like ? || '%'",
                                    (new, len(old) + 1, exp_id, old)).rowcount
        conn.commit()
    return changed


def mark_interrupted_failed(client, experiment_id: str, parent_run_id: str) -> list[str]:
    """Mark FAILED every run of the experiment that ``parent_run_id`` (or its children) left RUNNING.

    Called when a job resumes: the process that owned them is gone (killed), so RUNNING is a lie.
    Returns the ids marked.
    """
    marked = []
    runs = client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'")
    for run in [client.get_run(parent_run_id), *runs]:
        if run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, status="FAILED")
            marked.append(run.info.run_id)
    return marked


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

    def __init__(self, tracking_uri: str, experiment: str, enabled: bool = True, *,
                 artifact_dir: str | Path | None = None):
        self.enabled = enabled
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.experiment_id = None
        if enabled:
            from pipeline.preflight import check_tracking_uri

            check_tracking_uri(tracking_uri)  # fail in seconds, not after minutes of retries
            import mlflow

            self._mlflow = mlflow
            mlflow.set_tracking_uri(tracking_uri)
            if artifact_dir is not None:
                relocate_store(tracking_uri, artifact_dir)
            self.experiment_id = _experiment_id(tracking_uri, experiment, artifact_dir)
            mlflow.set_experiment(experiment_id=self.experiment_id)

    @contextlib.contextmanager
    def run(self, name: str, params: Mapping[str, object] | None = None, nested: bool = False, *,
            resume_file: str | Path | None = None) -> Iterator[None]:
        """Start an MLflow run (nested under the active one if ``nested``).

        ``resume_file`` (a parent run): the JSON file that remembers the run id; when it names a run of this
        store, that run is continued (params already logged keep their first value) after marking every run it
        left RUNNING (children of a killed job) FAILED; else a new run is started and its id written there.
        An exception or interrupt inside the block ends the run FAILED.
        """
        if not self.enabled:
            yield None
            return
        run_id = self._resumable(resume_file) if resume_file is not None else None
        with self._mlflow.start_run(run_id=run_id, run_name=None if run_id else name, nested=nested) as active:
            if resume_file is not None and run_id is None:
                from pipeline._io import atomic_write_text

                atomic_write_text(resume_file, json.dumps({"run_id": active.info.run_id,
                                                           "experiment_id": self.experiment_id,
                                                           "tracking_uri": self.tracking_uri}, indent=2))
            if params:
                clean = {_safe_key(k): str(v)[:500] for k, v in params.items()}
                if run_id is not None:
                    known = self._mlflow.MlflowClient().get_run(run_id).data.params
                    clean = {k: v for k, v in clean.items() if k not in known}
                if clean:
                    self._mlflow.log_params(clean)
            yield active

    def _resumable(self, resume_file: str | Path) -> str | None:
        """The run id recorded in ``resume_file`` when it is a live run of this experiment; stale runs it left
        RUNNING are marked FAILED first."""
        path = Path(resume_file)
        if not path.is_file():
            return None
        try:
            run_id = str(json.loads(path.read_text())["run_id"])
            client = self._mlflow.MlflowClient()
            run = client.get_run(run_id)
        except Exception:  # noqa: BLE001 -- unreadable file or a run of another store: start a new parent
            return None
        if run.info.lifecycle_stage != "active" or run.info.experiment_id != self.experiment_id:
            return None
        mark_interrupted_failed(client, self.experiment_id, run_id)
        return run_id

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

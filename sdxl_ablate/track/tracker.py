"""MLflow tracking: one experiment per study, one run per variant, always closed.

Uses `MlflowClient` rather than the fluent API: no process-global active run that could
leak from one sweep job into the next (Hydra runs a sweep's jobs in one process).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlparse

from filelock import FileLock

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode
from mlflow.tracking import MlflowClient

from sdxl_ablate.config import TrackingConfig
from sdxl_ablate.track.latest import LatestMetrics
from sdxl_ablate.track.limits import batches, param_values, tag_values
from sdxl_ablate.track.protocol import RunTracker

log = logging.getLogger(__name__)


def resolve_uri(cfg: TrackingConfig) -> str:
    # Embedded store by default: MLflow 3 refuses the plain ./mlruns file store.
    return cfg.uri or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def connect(uri: str) -> MlflowClient:
    """An MlflowClient on `uri`, safe when many jobs open a fresh store at once.

    MlflowClient creates and migrates an empty sqlite store's tables on construction; two
    processes doing it together fail (`table experiments already exists`, `Online migration
    expected to match one row`). A lock file beside the database serialises that first step
    (and the experiment lookup-or-create, see `get_or_create_experiment`).
    """
    with store_lock(uri):
        return MlflowClient(tracking_uri=uri)


def store_lock(uri: str):
    """An inter-process lock for a local sqlite store (`<db>.lock`); a no-op for any other
    store (a tracking server or a database server serialise their own writes)."""
    db = _sqlite_path(uri)
    if db is None:
        return contextlib.nullcontext()
    db.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(db) + ".lock")


def _sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    return None if path in ("", ":memory:") else Path(path)


def is_server(uri: str) -> bool:
    """A tracking server: it owns the artifact root (`mlflow server --artifacts-destination`)."""
    return urlparse(uri).scheme in ("http", "https", "databricks")


def is_uri(location: str) -> bool:
    # A scheme of two letters or more (`s3://`, `mlflow-artifacts:/`, `file:///`), not `C:\`.
    return len(urlparse(location).scheme) > 1


def artifact_location(uri: str, name: str, artifact_root: str | None) -> str | None:
    """Where a new experiment keeps its artifacts; None lets the store decide.

    - tracking.artifact_root set: `<root>/<experiment>`; a URI (`s3://b/p`, `mlflow-artifacts:/`)
      stays a URI, a path becomes an absolute `file://` URI.
    - unset, against a tracking server: None, so the server's own artifact root applies and
      artifacts go through it (forcing a local path would bypass the server).
    - unset, on a local store: `<cwd>/mlartifacts/<experiment>`.
    """
    if artifact_root:
        if is_uri(artifact_root):
            return f"{artifact_root.rstrip('/')}/{quote(name)}"
        return (Path(artifact_root) / name).resolve().as_uri()
    if is_server(uri):
        return None
    return (Path.cwd() / "mlartifacts" / name).resolve().as_uri()


# MLflow 3's UI opens an experiment in the view its `mlflow.experimentKind` tag names; without it
# the UI guesses, and may open the GenAI view (traces, the Assistant panel). Our runs are model
# training: "custom_model_development" is the UI's "Machine learning" kind (its runs table,
# charts and compare views). The values are the UI's ExperimentKind enum (mlflow/server/js).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def get_or_create_experiment(client: MlflowClient, name: str, artifact_root: str | None) -> str:
    """The experiment's id, created if missing (tagged as model training, EXPERIMENT_KIND); safe
    when many jobs start at once. An experiment without a kind gets it; one whose kind a person
    set is left as it is.

    On a local sqlite store the lookup and the creation happen under the store's lock. Against
    a server, a job that loses the creation race (RESOURCE_ALREADY_EXISTS) reads the winner's.
    """
    uri = client.tracking_uri
    with store_lock(uri):
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            if EXPERIMENT_KIND_TAG not in exp.tags:
                client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
            return exp.experiment_id
        try:
            return client.create_experiment(name, artifact_location=artifact_location(uri, name, artifact_root),
                                            tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except MlflowException as err:
            if err.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                raise
    exp = client.get_experiment_by_name(name)
    if exp is None:
        raise RuntimeError(f"MLflow experiment {name!r} was reported as existing but cannot be read at {uri}")
    return exp.experiment_id


def status_tags(status: str, error: str | None = None) -> dict[str, str]:
    """The tags that say how a variant ended (`status`, and `error` when it failed)."""
    return {"status": status, **({"error": error} if error else {})}


class Tracker(RunTracker):
    """`with Tracker(cfg, experiment, run_name) as t:` -> the run is closed whatever happens.

    The status tag (ok/oom/nan/failed) is the caller's; the MLflow run status follows it.
    """

    def __init__(self, cfg: TrackingConfig, experiment: str, run_name: str, tags: dict[str, str] | None = None,
                 run_id: str | None = None):
        self.uri = resolve_uri(cfg)
        self.client = connect(self.uri)
        self.run_name = run_name
        self._tags = tag_values(tags or {})
        self.run_id: str | None = run_id  # given: reopen that run (a resume, a re-evaluation)
        self.status = "failed"
        self._latest = LatestMetrics()  # what the run's metrics read back as, without asking the store
        if run_id is None:
            self.experiment_id = get_or_create_experiment(self.client, cfg.experiment or experiment, cfg.artifact_root)
        else:
            run = self.client.get_run(run_id)
            self.experiment_id = run.info.experiment_id
            self.status = run.data.tags.get("status", "failed")  # kept unless the caller sets another
            self._latest.seed(run.data.to_proto().metrics)  # the reopened run's history goes on

    def __enter__(self) -> "Tracker":
        if self.run_id is not None:
            # A resumed variant continues its own run: one run, its metric history goes on.
            self.client.update_run(self.run_id, status="RUNNING")
            if self._tags:
                self.set_tags(self._tags)
            return self
        run = self.client.create_run(self.experiment_id, run_name=self.run_name, tags=self._tags)
        self.run_id = run.info.run_id
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None:
            self.set_status("failed", error=f"{type(exc).__name__}: {exc}")
        terminal = "FINISHED" if self.status == "ok" else "FAILED"
        self.client.set_terminated(self.run_id, status=terminal)

    # -- logging ------------------------------------------------------------------------
    def log_params(self, params: dict[str, Any]) -> None:
        for batch in batches([Param(k, v) for k, v in param_values(params).items()]):
            self.client.log_batch(self.run_id, params=batch)

    def log_metrics(self, metrics: dict[str, float], step: int = 0, timestamp_ms: int | None = None) -> None:
        """`timestamp_ms`: the points' time (default now); the journal passes the one it recorded."""
        now = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None and math.isfinite(float(v))]
        for batch in batches(items):
            self.client.log_batch(self.run_id, metrics=batch)
        self._latest.update({m.key: m.value for m in items}, step, now)

    def latest_metrics(self) -> dict[str, float]:
        return self._latest.values()

    def set_tags(self, tags: dict[str, Any]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tag_values(tags).items()])

    def set_status(self, status: str, error: str | None = None) -> None:
        self.status = status
        self.set_tags(status_tags(status, error))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_image(self, image, key: str, step: int) -> None:
        """An image in the run's image history under `key` (the MLflow UI's step slider)."""
        self.client.log_image(self.run_id, image, key=key, step=step)

    def log_dict(self, data: dict, artifact_file: str) -> None:
        self.client.log_text(self.run_id, json.dumps(data, indent=2, sort_keys=True), artifact_file)

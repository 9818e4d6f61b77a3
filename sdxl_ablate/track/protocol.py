"""What a variant's code may call on a tracker, whichever it has: `Tracker` (MLflow),
`JournalingTracker` (MLflow, or a journal while MLflow fails) or, on the ranks other than 0
of a data-parallel run, `distributed.NullTracker` (nothing). Each names this as its base."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Protocol


class RunTracker(Protocol):
    run_id: Optional[str]
    status: str  # the variant's status tag: ok/oom/nan/failed
    uri: Optional[str]  # the tracking store
    client: Any  # an MlflowClient for reading back; None where there is no store

    def __enter__(self) -> "RunTracker": ...

    def __exit__(self, exc_type, exc, tb) -> None: ...

    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None: ...

    def set_tags(self, tags: dict[str, Any]) -> None: ...

    def set_status(self, status: str, error: Optional[str] = None) -> None: ...

    def log_artifact(self, path: str | Path, artifact_path: Optional[str] = None) -> None: ...

    def log_text(self, text: str, artifact_file: str) -> None: ...

    def log_dict(self, data: dict, artifact_file: str) -> None: ...

    def log_image(self, image, key: str, step: int) -> None: ...

    def latest_metrics(self) -> dict[str, float]:
        """The latest value of each metric this tracker was given (MLflow's rule: by step, then
        timestamp; track/latest.py), whether or not the store could be written."""
        ...

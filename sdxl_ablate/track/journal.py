"""Training that survives a lost tracking store: MLflow, or a local journal when MLflow fails.

`JournalingTracker` has `Tracker`'s methods. Each call goes to MLflow; when MLflow cannot be
reached or written (server down, unwritable or locked sqlite file, disk full), the failure is
logged once, loudly, and from then on the run's params, metrics, tags, texts and artifact
references are appended to `<output dir>/tracking_journal/journal.jsonl` instead. Training
goes on. `python -m sdxl_ablate.replay <output dir>` replays the journal into MLflow later.

A failed artifact upload alone (a full artifact disk) journals only that artifact and keeps
using MLflow for the rest. Artifacts are journaled by path (the file stays where the run
wrote it, in its output directory); texts are kept as files in the journal folder.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from sdxl_ablate.config import TrackingConfig
from sdxl_ablate.track.limits import param_values, tag_values
from sdxl_ablate.track.protocol import RunTracker
from sdxl_ablate.track.tracker import Tracker, resolve_uri, status_tags

log = logging.getLogger(__name__)

JOURNAL_DIR = "tracking_journal"
JOURNAL = "journal.jsonl"


def journal_path(output_dir: Path) -> Path:
    return Path(output_dir) / JOURNAL_DIR / JOURNAL


class Journal:
    """Append-only JSON lines, flushed and fsynced per record: a kill loses at most the line
    being written (and replay skips a torn last line)."""

    def __init__(self, output_dir: Path):
        self.dir = Path(output_dir) / JOURNAL_DIR
        self.path = self.dir / JOURNAL
        self.records = 0

    def append(self, op: str, **fields: Any) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"op": op, "time_ms": int(time.time() * 1000), **fields}, default=str)
        with open(self.path, "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.records += 1

    def keep_text(self, text: str, artifact_file: str) -> str:
        """Stores a text artifact beside the journal; returns its name there."""
        name = f"text_{self.records:06d}_{Path(artifact_file).name}"
        (self.dir / "texts").mkdir(parents=True, exist_ok=True)
        (self.dir / "texts" / name).write_text(text)
        return f"texts/{name}"


class JournalingTracker(RunTracker):
    """`with JournalingTracker(...) as t:` behaves as `Tracker`, and never lets a tracking
    failure end the training. `failure` is the first error (None while MLflow works)."""

    def __init__(self, cfg: TrackingConfig, experiment: str, run_name: str, output_dir: Path,
                 tags: dict[str, str] | None = None, run_id: str | None = None):
        self.cfg, self.experiment, self.run_name = cfg, cfg.experiment or experiment, run_name
        self.uri = resolve_uri(cfg)
        self._tags = tag_values(tags or {})
        self.journal = Journal(output_dir)
        self.run_id = run_id
        self.status = "failed"
        self.failure: str | None = None  # MLflow failed: everything goes to the journal
        self.artifact_failures: list[str] = []
        self.tracker: Tracker | None = None
        try:
            self.tracker = Tracker(cfg, experiment, run_name, tags=tags, run_id=run_id)
        except Exception as err:  # noqa: BLE001 - any store failure: journal instead
            self._fail("connecting to the tracking store", err)

    # -- failure handling ----------------------------------------------------------------
    def _open_record(self, why: str) -> None:
        self.journal.append("open", uri=self.uri, experiment=self.experiment, artifact_root=self.cfg.artifact_root,
                            run_name=self.run_name, run_id=self.run_id, tags=self._tags, reason=why)

    def _fail(self, doing: str, err: Exception) -> None:
        self.failure = f"{doing}: {type(err).__name__}: {err}"
        log.error("MLflow tracking failed (%s) at %s. Training goes on; this run's records go to %s. "
                  "Replay them later with: python -m sdxl_ablate.replay %s",
                  self.failure, self.uri, self.journal.path, self.journal.path.parent.parent)
        self._open_record(self.failure)

    def _call(self, op: str, record: dict[str, Any], fn) -> None:
        if self.failure is None:
            try:
                fn()
                return
            except Exception as err:  # noqa: BLE001
                self._fail(op, err)
        self.journal.append(op, **record)

    def _artifact_failed(self, op: str, what: str, err: Exception) -> None:
        """Artifacts may live on another disk than the run's metadata: a failed upload journals
        only this artifact; metadata keep going to MLflow."""
        msg = f"{op} {what}: {type(err).__name__}: {err}"
        log.error("MLflow could not store an artifact (%s). It is kept for replay in %s; replay it later with: "
                  "python -m sdxl_ablate.replay %s", msg, self.journal.dir, self.journal.dir.parent)
        if self.journal.records == 0:
            self._open_record(msg)
        self.artifact_failures.append(msg)

    @property
    def client(self):
        """The MLflow client, for reading back (None when the store could not even be opened)."""
        return None if self.tracker is None else self.tracker.client

    @property
    def journaled(self) -> bool:
        return self.journal.records > 0

    # -- the run -----------------------------------------------------------------------------
    def __enter__(self) -> "JournalingTracker":
        if self.tracker is not None:
            try:
                self.tracker.__enter__()
                self.run_id = self.tracker.run_id
            except Exception as err:  # noqa: BLE001
                self._fail("opening the run", err)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None:
            self.set_status("failed", error=f"{type(exc).__name__}: {exc}")
        terminal = "FINISHED" if self.status == "ok" else "FAILED"
        if self.journaled and self.failure is None:
            # Metadata still work: point the run at what is missing from it.
            self.set_tags({"tracking.journal": str(self.journal.path)})
        self._call("close", {"status": terminal},
                   lambda: self.tracker.client.set_terminated(self.run_id, status=terminal))
        if self.journaled:
            log.error("this run's tracking is incomplete in MLflow (%s); %d records are kept in %s. "
                      "Replay: python -m sdxl_ablate.replay %s", self.failure or "; ".join(self.artifact_failures),
                      self.journal.records, self.journal.path, self.journal.dir.parent)

    # -- Tracker's methods -----------------------------------------------------------------
    def log_params(self, params: dict[str, Any]) -> None:
        self._call("log_params", {"params": param_values(params)},
                   lambda: self.tracker.log_params(params))

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        clean = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
        self._call("log_metrics", {"metrics": clean, "step": step}, lambda: self.tracker.log_metrics(metrics, step))

    def set_tags(self, tags: dict[str, Any]) -> None:
        self._call("set_tags", {"tags": tag_values(tags)}, lambda: self.tracker.set_tags(tags))

    def set_status(self, status: str, error: str | None = None) -> None:
        self.status = status
        self.set_tags(status_tags(status, error))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.failure is None:
            try:
                self.tracker.log_artifact(path, artifact_path)
                return
            except Exception as err:  # noqa: BLE001
                self._artifact_failed("log_artifact", str(path), err)
        # By reference: the file stays where the run wrote it (its output directory).
        self.journal.append("log_artifact", path=str(Path(path).resolve()), artifact_path=artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        if self.failure is None:
            try:
                self.tracker.log_text(text, artifact_file)
                return
            except Exception as err:  # noqa: BLE001
                self._artifact_failed("log_text", artifact_file, err)
        self.journal.append("log_text", file=self.journal.keep_text(text, artifact_file), artifact_file=artifact_file)

    def log_dict(self, data: dict, artifact_file: str) -> None:
        self.log_text(json.dumps(data, indent=2, sort_keys=True), artifact_file)

    def log_image(self, image, key: str, step: int) -> None:
        if self.failure is None:
            try:
                self.tracker.log_image(image, key, step)
                return
            except Exception as err:  # noqa: BLE001
                self._artifact_failed("log_image", f"{key} step {step}", err)
        name = f"images/{self.journal.records:06d}_{key.replace('/', '_')}_{step}.png"
        (self.journal.dir / "images").mkdir(parents=True, exist_ok=True)
        image.save(self.journal.dir / name)
        self.journal.append("log_image", file=name, key=key, step=step)

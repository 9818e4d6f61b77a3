"""Training that survives a lost tracking store: every call is journaled, then sent to MLflow.

`JournalingTracker` has `Tracker`'s methods. Each call is first appended to the run's journal,
`<output dir>/tracking_journal/journal.jsonl` (a write-ahead record of the whole run, from its
`open` to its `close`), then sent to MLflow; when MLflow has it, an `ack` line says so. When
MLflow cannot be reached or written (server down, unwritable or locked sqlite file, disk full),
the failure is logged once, loudly, and from then on the run goes to the journal alone:
training goes on. `python -m sdxl_ablate.replay <output dir>` then puts into the run's own
store only what it lacks (the records without an ack), and into any other store the whole run.
A resumed run's journal starts with the run so far, copied from the attempt it resumes
(`carry_over`): the newest attempt's journal is the whole run.

A failed artifact upload alone (a full artifact disk) leaves that artifact without an ack and
keeps using MLflow for the rest. Artifacts are journaled by path (the file stays where the run
wrote it, in its output directory); texts and images are kept as files in the journal folder.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

from sdxl_ablate.config import TrackingConfig
from sdxl_ablate.track.latest import LatestMetrics
from sdxl_ablate.track.limits import param_values, tag_values
from sdxl_ablate.track.protocol import RunTracker
from sdxl_ablate.track.tracker import Tracker, resolve_uri, status_tags

log = logging.getLogger(__name__)

JOURNAL_DIR = "tracking_journal"
JOURNAL = "journal.jsonl"
ACK = "ack"  # {"op": "ack", "seq": N}: MLflow has record N
# Records only flushed, not fsynced (see Journal.append): the per-step ones.
FLUSHED_ONLY = frozenset({"log_metrics", ACK})


def journal_path(output_dir: Path) -> Path:
    return Path(output_dir) / JOURNAL_DIR / JOURNAL


def _lines(path: Path):
    """(line, record) for each whole record of a journal file; a torn line (a kill mid-write) or
    anything else that is not a record is passed over."""
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            yield line, rec


def unsent_records(output_dir: Path) -> int:
    """How many of the run's journaled records MLflow lacks (no ack): 0 when the journal is gone
    or MLflow holds all of it. Bookkeeping records (`open`, `failure`) do not count."""
    path = journal_path(output_dir)
    if not path.is_file():
        return 0
    pending: set = set()
    unnumbered = 0  # records of journals written before records had numbers: never sent
    for _, rec in _lines(path):
        if rec.get("op") in ("open", "failure"):
            continue
        if rec.get("op") == ACK:
            pending.discard(rec.get("seq"))
        elif "seq" in rec:
            pending.add(rec["seq"])
        else:
            unnumbered += 1
    return len(pending) + unnumbered


def carry_over(earlier_dir: Path, output_dir: Path, cut: int) -> int:
    """Starts `output_dir`'s journal with the run so far, from the journal of the attempt it
    resumes (`earlier_dir`, whose journal holds the attempts before it too): every record up to
    where the resumed attempt takes over, that is each one but the earlier attempt's `close` and
    its metric points after step `cut` (the resume logs those steps again), with the acks of the
    records copied (replay into the run's own store still sends only what it lacks) and the texts
    and images they name. Records keep their numbers; this attempt's go on after them. Returns
    how many records were copied (0 when there is nothing to copy, or this journal already has
    records of its own)."""
    src, dst = journal_path(earlier_dir), journal_path(output_dir)
    if not src.is_file() or src.resolve() == dst.resolve() or (dst.is_file() and dst.stat().st_size):
        return 0
    lines, kept = [], set()
    for line, rec in _lines(src):
        op = rec.get("op")
        if op == ACK:
            if rec.get("seq") in kept:
                lines.append(line)
            continue
        if op == "close" or (op == "log_metrics" and rec.get("step", 0) > cut):
            continue
        kept.add(rec.get("seq"))
        lines.append(line)
        if op in ("log_text", "log_image") and rec.get("file"):
            target = dst.parent / rec["file"]
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src.parent / rec["file"], target)
    if not kept:
        return 0
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".carry")
    with open(tmp, "w") as f:
        f.write("".join(x + "\n" for x in lines))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, dst)
    log.info("tracking journal %s starts with the %d records of the run so far (from %s, up to step %d)",
             dst, len(kept), src, cut)
    return len(kept)


class Journal:
    """Append-only JSON lines, numbered (`seq`), each written whole with one write call.

    Durability: params, tags (the status), texts, artifacts, images and the close are fsynced
    per record. Metric points and acks are only flushed to the OS: a killed process loses none
    of them (the kernel holds them), and a machine crash loses at most the lines after the last
    fsynced record (fsync writes the whole file, earlier metric lines included) - the step
    metrics of a run that is resumed from its checkpoint anyway. A lost ack only means replay
    sends that record again, which MLflow absorbs: an identical metric point (key, value, step,
    timestamp) is not stored twice, and params, tags and artifacts are rewritten with the same
    values. fsyncing each metric line instead would cost a disk flush per step.
    """

    def __init__(self, output_dir: Path):
        self.dir = Path(output_dir) / JOURNAL_DIR
        self.path = self.dir / JOURNAL
        self.records = 0  # records appended by this process (acks not counted)
        self.error: str | None = None  # the journal could not be written: MLflow alone keeps the run
        self._file = None
        self._next_seq: int | None = None

    def _open(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        # Numbers go on after an earlier process's records (a re-run into the same output directory).
        self._next_seq = 0
        if self.path.is_file():
            for _, rec in _lines(self.path):
                self._next_seq = max(self._next_seq, rec.get("seq", -1) + 1)
        self._file = open(self.path, "a")

    def append(self, op: str, time_ms: int | None = None, **fields: Any) -> int | None:
        """Appends one record; returns its number (None when the journal cannot be written)."""
        if self.error is not None:
            return None
        try:
            if self._file is None:
                self._open()
            seq = self._next_seq
            line = json.dumps({"op": op, "seq": seq, "time_ms": int(time.time() * 1000) if time_ms is None else time_ms,
                               **fields}, default=str)
            self._file.write(line + "\n")
            self._file.flush()
            if op not in FLUSHED_ONLY:
                os.fsync(self._file.fileno())
        except OSError as err:  # e.g. the output disk is full: training goes on, MLflow keeps the run
            self.error = f"{type(err).__name__}: {err}"
            log.error("the tracking journal %s cannot be written (%s): from now on the run is recorded in MLflow "
                      "only, and a failure of MLflow would lose records", self.path, self.error)
            return None
        self._next_seq += 1
        self.records += 1
        return seq

    def ack(self, seq: int | None) -> None:
        """Record `seq` is in MLflow."""
        if seq is None or self.error is not None:
            return
        try:
            self._file.write(json.dumps({"op": ACK, "seq": seq}) + "\n")
            self._file.flush()
        except OSError as err:
            self.error = f"{type(err).__name__}: {err}"
            log.error("the tracking journal %s cannot be written (%s)", self.path, self.error)

    def close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError as err:
                log.error("closing the tracking journal %s: %s", self.path, err)
            self._file = None

    def keep_text(self, text: str, artifact_file: str) -> str:
        """Stores a text artifact beside the journal; returns its name there."""
        name = f"text_{self._name_number():06d}_{Path(artifact_file).name}"
        (self.dir / "texts").mkdir(parents=True, exist_ok=True)
        (self.dir / "texts" / name).write_text(text)
        return f"texts/{name}"

    def keep_image(self, image, key: str, step: int) -> str:
        name = f"images/{self._name_number():06d}_{key.replace('/', '_')}_{step}.png"
        (self.dir / "images").mkdir(parents=True, exist_ok=True)
        image.save(self.dir / name)
        return name

    def _name_number(self) -> int:
        if self._file is None and self.error is None:
            self._open()
        return self._next_seq or 0


class JournalingTracker(RunTracker):
    """`with JournalingTracker(...) as t:` behaves as `Tracker`, journals the whole run, and never
    lets a tracking failure end the training. `failure` is MLflow's first metadata error (None
    while MLflow works); `artifact_failures` the artifacts it could not store."""

    def __init__(self, cfg: TrackingConfig, experiment: str, run_name: str, output_dir: Path,
                 tags: dict[str, str] | None = None, run_id: str | None = None):
        self.cfg, self.experiment, self.run_name = cfg, cfg.experiment or experiment, run_name
        self.uri = resolve_uri(cfg)
        self._tags = tag_values(tags or {})
        self.journal = Journal(output_dir)
        self.run_id = run_id
        self.status = "failed"
        self.failure: str | None = None  # MLflow failed: everything goes to the journal alone
        self.artifact_failures: list[str] = []
        self.tracker: Tracker | None = None
        self._latest = LatestMetrics()
        self._opened = False
        try:
            self.tracker = Tracker(cfg, experiment, run_name, tags=tags, run_id=run_id)
            if run_id is not None:  # a reopened run: its history as the store holds it, then this run's
                self._latest = self.tracker._latest
        except Exception as err:  # noqa: BLE001 - any store failure: journal instead
            self._fail("connecting to the tracking store", err)

    # -- the journal -----------------------------------------------------------------------
    def _open_record(self) -> None:
        """The run's first record: what a replay needs to find or make the run (its time is the
        run's start). Written once the run exists in MLflow (with its id), or at the first
        failure before that."""
        if not self._opened:
            self._opened = True
            self.journal.append("open", uri=self.uri, experiment=self.experiment,
                                artifact_root=self.cfg.artifact_root, run_name=self.run_name, run_id=self.run_id,
                                tags=self._tags)

    def _record(self, op: str, **fields: Any) -> int | None:
        self._open_record()
        return self.journal.append(op, **fields)

    def _fail(self, doing: str, err: Exception) -> None:
        self.failure = f"{doing}: {type(err).__name__}: {err}"
        log.error("MLflow tracking failed (%s) at %s. Training goes on; this run's records go to %s only. "
                  "Replay them later with: python -m sdxl_ablate.replay %s",
                  self.failure, self.uri, self.journal.path, self.journal.path.parent.parent)
        self._record("failure", reason=self.failure)

    def _call(self, op: str, record: dict[str, Any], fn) -> None:
        """Journal first, then MLflow (until its first failure); ack what MLflow took."""
        seq = self._record(op, **record)
        if self.failure is None:
            try:
                fn()
            except Exception as err:  # noqa: BLE001
                self._fail(op, err)
            else:
                self.journal.ack(seq)

    def _artifact(self, op: str, what: str, record: dict[str, Any], fn) -> None:
        """Artifacts may live on another disk than the run's metadata: a failed upload leaves
        only this artifact without an ack; metadata keep going to MLflow."""
        seq = self._record(op, **record)
        if self.failure is not None:
            return
        try:
            fn()
        except Exception as err:  # noqa: BLE001
            msg = f"{op} {what}: {type(err).__name__}: {err}"
            log.error("MLflow could not store an artifact (%s). It is kept for replay in %s; replay it later with: "
                      "python -m sdxl_ablate.replay %s", msg, self.journal.dir, self.journal.dir.parent)
            self.artifact_failures.append(msg)
        else:
            self.journal.ack(seq)

    @property
    def client(self):
        """The MLflow client, for reading back (None when the store could not even be opened)."""
        return None if self.tracker is None else self.tracker.client

    @property
    def journaled(self) -> bool:
        """Whether the journal holds records MLflow lacks (a replay would add something)."""
        return self.failure is not None or bool(self.artifact_failures)

    # -- the run -----------------------------------------------------------------------------
    def __enter__(self) -> "JournalingTracker":
        if self.tracker is not None:
            try:
                self.tracker.__enter__()
                self.run_id = self.tracker.run_id
            except Exception as err:  # noqa: BLE001
                self._fail("opening the run", err)
        self._open_record()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None:
            self.set_status("failed", error=f"{type(exc).__name__}: {exc}")
        terminal = "FINISHED" if self.status == "ok" else "FAILED"
        if self.journaled and self.failure is None:
            # Metadata still work: point the run at what is missing from it.
            self.set_tags({"tracking.journal": str(self.journal.path)})
        end = int(time.time() * 1000)
        self._call("close", {"status": terminal, "time_ms": end},
                   lambda: self.tracker.client.set_terminated(self.run_id, status=terminal, end_time=end))
        self.journal.close()
        if self.journaled:
            log.error("this run's tracking is incomplete in MLflow (%s); the records it lacks are kept in %s. "
                      "Replay: python -m sdxl_ablate.replay %s", self.failure or "; ".join(self.artifact_failures),
                      self.journal.path, self.journal.dir.parent)

    # -- Tracker's methods -----------------------------------------------------------------
    def log_params(self, params: dict[str, Any]) -> None:
        self._call("log_params", {"params": param_values(params)}, lambda: self.tracker.log_params(params))

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        clean = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
        if not clean:
            return
        now = int(time.time() * 1000)  # one timestamp for the journal, MLflow and a replay
        self._latest.update(clean, step, now)
        self._call("log_metrics", {"metrics": clean, "step": step, "time_ms": now},
                   lambda: self.tracker.log_metrics(clean, step, timestamp_ms=now))

    def latest_metrics(self) -> dict[str, float]:
        return self._latest.values()

    def set_tags(self, tags: dict[str, Any]) -> None:
        self._call("set_tags", {"tags": tag_values(tags)}, lambda: self.tracker.set_tags(tags))

    def set_status(self, status: str, error: str | None = None) -> None:
        self.status = status
        self.set_tags(status_tags(status, error))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        # By reference: the file stays where the run wrote it (its output directory).
        self._artifact("log_artifact", str(path), {"path": str(Path(path).resolve()), "artifact_path": artifact_path},
                       lambda: self.tracker.log_artifact(path, artifact_path))

    def log_text(self, text: str, artifact_file: str) -> None:
        self._artifact("log_text", artifact_file, {"file": self._kept(self.journal.keep_text, text, artifact_file),
                                                   "artifact_file": artifact_file},
                       lambda: self.tracker.log_text(text, artifact_file))

    def log_dict(self, data: dict, artifact_file: str) -> None:
        self.log_text(json.dumps(data, indent=2, sort_keys=True), artifact_file)

    def log_image(self, image, key: str, step: int) -> None:
        self._artifact("log_image", f"{key} step {step}",
                       {"file": self._kept(self.journal.keep_image, image, key, step), "key": key, "step": step},
                       lambda: self.tracker.log_image(image, key, step))

    def _kept(self, keep, *args) -> str | None:
        """A text or image copied into the journal folder; None when it cannot be written (the
        journal's own failure is logged by the next append)."""
        try:
            return keep(*args)
        except OSError as err:
            log.error("cannot keep a copy in the tracking journal folder %s: %s", self.journal.dir, err)
            return None

"""`python -m sdxl_ablate.replay OUTPUT_DIR [--tracking-uri URI]`: puts a journaled run into MLflow.

Every run keeps a write-ahead journal of all it logged, OUTPUT_DIR/tracking_journal/journal.jsonl
(see `journal.py`), with an ack for each record MLflow took. Replay applies it, in order, with
the original steps and timestamps:

- into a store that holds the run (its own store, found by run id): only the records MLflow
  lacks (no ack), so no metric point is logged twice;
- into any other store (`--tracking-uri`, or the run's own store after it was lost): the whole
  run, params, config, every step, tags, texts, artifacts, images, status and close, as a new
  run of the same name and tags in the same experiment, tagged `tracking.replayed`.

Progress is kept per target store in `replay_progress.json`, so an interrupted replay continues
where it stopped and a finished one is not applied twice to the same store.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from sdxl_ablate.track.files import atomic_write_json
from sdxl_ablate.track.journal import ACK, JOURNAL_DIR, journal_path
from sdxl_ablate.track.limits import batches
from sdxl_ablate.track.tracker import connect, get_or_create_experiment

log = logging.getLogger(__name__)
PROGRESS = "replay_progress.json"
BOOKKEEPING = ("open", "failure", ACK)  # records that are no call to MLflow


class ReplayError(RuntimeError):
    pass


def read_journal(path: Path) -> tuple[list[dict[str, Any]], set[int]]:
    """The journal's lines, and the numbers of the records MLflow acknowledged."""
    if not path.is_file():
        raise ReplayError(f"no tracking journal at {path}: nothing to replay")
    records = []
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except ValueError as err:
            if i == len(lines) - 1:  # a torn last line: the process was killed while appending it
                log.warning("ignoring an incomplete last journal line %d", i + 1)
                break
            raise ReplayError(f"{path}:{i + 1}: not a journal record: {err}") from err
    if not records or records[0]["op"] != "open":
        raise ReplayError(f"{path}: the journal does not start with an 'open' record")
    acked = {r["seq"] for r in records if r["op"] == ACK}
    return records, acked


def _run_key(open_record: dict[str, Any]) -> str:
    # One output directory may hold several runs' journals one after the other (a re-run into a
    # fixed hydra.run.dir); a run without an id (its store failed before making it) is its own.
    return open_record.get("run_id") or f"unnamed-{open_record.get('seq', 0)}-{open_record['time_ms']}"


def replay(output_dir: Path, tracking_uri: str | None = None) -> str:
    """Applies the journal of OUTPUT_DIR; returns the MLflow run id it went into (the last run's,
    when the journal holds several)."""
    output_dir = Path(output_dir)
    path = journal_path(output_dir)
    records, acked = read_journal(path)
    first = records[0]
    uri = tracking_uri or first["uri"]
    # Progress per store: replaying into the run's own store and then into another one are two
    # replays, each into its own run.
    progress_file = path.parent / PROGRESS
    stores = json.loads(progress_file.read_text()) if progress_file.is_file() else {}
    if "applied" in stores:  # the single-store format of earlier versions: it was the run's own store
        stores = {first["uri"]: stores}
    progress = stores.setdefault(uri, {"applied": 0})
    runs = progress.setdefault("runs", {})
    if progress.get("run_id"):  # an earlier version's progress: one run, and its journal had no acks
        runs.setdefault(_run_key(first), {"run_id": progress.pop("run_id"), "own": False})
    client = connect(uri)
    done = progress["applied"]
    target: dict[str, Any] | None = None
    added = 0
    for i, rec in enumerate(records):
        if rec["op"] == "open":
            key = _run_key(rec)
            if key not in runs:
                runs[key] = _open_run(client, rec)
                atomic_write_json(progress_file, stores)
            target = runs[key]
        if i < done or rec["op"] in BOOKKEEPING:
            continue
        if not (target["own"] and rec.get("seq") in acked):  # the run's own store has what was acked
            _apply(client, target["run_id"], rec, path.parent)
            added += 1
        progress["applied"] = i + 1
        atomic_write_json(progress_file, stores)
    progress["applied"] = len(records)
    atomic_write_json(progress_file, stores)
    for t in runs.values():
        if "tracking.journal" in client.get_run(t["run_id"]).data.tags:  # nothing is missing from it any more
            client.delete_tag(t["run_id"], "tracking.journal")
    log.info("replayed %d records (%d journal lines already done before) into run %s at %s",
             added, done, target["run_id"], uri)
    return target["run_id"]


def _open_run(client: MlflowClient, first: dict[str, Any]) -> dict[str, Any]:
    """The run these records go into: {"run_id", "own": whether it is the journaled run itself
    (then it already holds the acked records)}."""
    if first.get("run_id"):
        try:
            return {"run_id": client.get_run(first["run_id"]).info.run_id, "own": True}
        except Exception as err:  # noqa: BLE001 - a store that never saw the run: make it
            log.info("run %s is not in %s (%s): the whole run goes into a new run",
                     first["run_id"], client.tracking_uri, err)
    exp_id = get_or_create_experiment(client, first["experiment"], first.get("artifact_root"))
    tags = {**first.get("tags", {}), "tracking.replayed": "true"}
    run = client.create_run(exp_id, run_name=first["run_name"], tags=tags, start_time=first.get("time_ms"))
    return {"run_id": run.info.run_id, "own": False}


def _apply(client: MlflowClient, run_id: str, rec: dict[str, Any], journal_dir: Path) -> None:
    op = rec["op"]
    if op in ("log_text", "log_image") and rec.get("file") is None:
        raise ReplayError(f"journal record {rec.get('seq')} ({op} {rec.get('artifact_file') or rec.get('key')}): its "
                          f"file could not be kept in {journal_dir} when the run wrote it (see the run's log)")
    if op == "log_params":
        for batch in batches([Param(k, v) for k, v in rec["params"].items()]):
            client.log_batch(run_id, params=batch)
    elif op == "log_metrics":
        for batch in batches([Metric(k, v, rec["time_ms"], rec["step"]) for k, v in rec["metrics"].items()]):
            client.log_batch(run_id, metrics=batch)
    elif op == "set_tags":
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in rec["tags"].items()])
    elif op == "log_artifact":
        src = Path(rec["path"])
        if not src.exists():
            raise ReplayError(f"artifact {src} (journaled for {rec.get('artifact_path')}) no longer exists")
        if src.is_dir():
            client.log_artifacts(run_id, str(src), rec["artifact_path"])
        else:
            client.log_artifact(run_id, str(src), rec["artifact_path"])
    elif op == "log_text":
        client.log_text(run_id, (journal_dir / rec["file"]).read_text(), rec["artifact_file"])
    elif op == "log_image":
        from PIL import Image

        with Image.open(journal_dir / rec["file"]) as image:
            client.log_image(run_id, image.copy(), key=rec["key"], step=rec["step"], timestamp=rec["time_ms"])
    elif op == "close":
        client.set_terminated(run_id, status=rec["status"], end_time=rec["time_ms"])
    else:
        raise ReplayError(f"unknown journal record {op!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdxl_ablate.replay", description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dirs", nargs="+", type=Path,
                        help=f"a run's output directory (holding {JOURNAL_DIR}/), or several")
    parser.add_argument("--tracking-uri", default=None, help="the MLflow store to replay into (default: the run's own)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    failed = 0
    for d in args.output_dirs:
        try:
            run_id = replay(d, args.tracking_uri)
            print(f"{d}: replayed into MLflow run {run_id}")
        except Exception as err:  # noqa: BLE001 - report each directory, go on with the next
            print(f"{d}: replay failed: {type(err).__name__}: {err}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0

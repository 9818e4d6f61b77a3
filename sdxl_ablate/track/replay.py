"""`python -m sdxl_ablate.replay OUTPUT_DIR [--tracking-uri URI]`: puts a journaled run into MLflow.

When MLflow could not be written during training (see `journal.py`), the run's records were
kept in OUTPUT_DIR/tracking_journal/journal.jsonl. This replays them, in order, into the run
they belong to (reopened by id when the store has it, else a new run of the same name and
tags in the same experiment), with the original steps and timestamps. Progress is kept per
target store in `replay_progress.json`, so an interrupted replay continues where it stopped
and a finished one is not applied twice to the same store.
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
from sdxl_ablate.track.journal import JOURNAL_DIR, journal_path
from sdxl_ablate.track.limits import batches
from sdxl_ablate.track.tracker import connect, get_or_create_experiment

log = logging.getLogger(__name__)
PROGRESS = "replay_progress.json"


class ReplayError(RuntimeError):
    pass


def read_journal(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise ReplayError(f"no tracking journal at {path}: this run was tracked in MLflow directly (nothing to replay)")
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
    return records


def replay(output_dir: Path, tracking_uri: str | None = None) -> str:
    """Applies the journal of OUTPUT_DIR; returns the MLflow run id it went into."""
    output_dir = Path(output_dir)
    path = journal_path(output_dir)
    records = read_journal(path)
    first = records[0]
    uri = tracking_uri or first["uri"]
    # Progress per store: replaying into the run's own store and then into another one are two
    # replays, each into its own run.
    progress_file = path.parent / PROGRESS
    stores = json.loads(progress_file.read_text()) if progress_file.is_file() else {}
    if "applied" in stores:  # the single-store format of earlier versions: it was the run's own store
        stores = {first["uri"]: stores}
    progress = stores.setdefault(uri, {"applied": 0, "run_id": None})
    client = connect(uri)
    run_id = progress["run_id"]
    if run_id is None:
        run_id = _open_run(client, first)
        progress["run_id"] = run_id
        atomic_write_json(progress_file, stores)
    done = progress["applied"]
    for i, rec in enumerate(records[done:], start=done):
        _apply(client, run_id, rec, path.parent)
        progress["applied"] = i + 1
        atomic_write_json(progress_file, stores)
    if "tracking.journal" in client.get_run(run_id).data.tags:  # nothing is missing from the run any more
        client.delete_tag(run_id, "tracking.journal")
    log.info("replayed %d records (%d already applied before) into run %s at %s", len(records) - done, done, run_id, uri)
    return run_id


def _open_run(client: MlflowClient, first: dict[str, Any]) -> str:
    if first.get("run_id"):
        try:
            return client.get_run(first["run_id"]).info.run_id
        except Exception as err:  # noqa: BLE001 - a store that never saw the run: make it
            log.warning("run %s is not in this store (%s): creating a new run", first["run_id"], err)
    exp_id = get_or_create_experiment(client, first["experiment"], first.get("artifact_root"))
    tags = {**first.get("tags", {}), "tracking.replayed": "true"}
    return client.create_run(exp_id, run_name=first["run_name"], tags=tags).info.run_id


def _apply(client: MlflowClient, run_id: str, rec: dict[str, Any], journal_dir: Path) -> None:
    op = rec["op"]
    if op == "open":
        return  # a second failure of the same run: nothing to do
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

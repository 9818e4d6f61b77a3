"""What the run's write-ahead journal (track/journal.py) costs per training step:

    python -m sdxl_ablate.perf.journal_bench [--steps 300] [--dir DIR]

Logs the tiny demo's per-step metrics (train/loss, train/lr and the memory stats: five values
at one step) `--steps` times, on a fresh sqlite store in DIR (default: a temporary folder; put
it on the disk your outputs live on, fsync's cost depends on it), and prints the median
milliseconds per step of:

- mlflow:            `Tracker.log_metrics` alone (the store, no journal)
- journal+mlflow:    `JournalingTracker.log_metrics` while MLflow works (what a run pays)
- journal+mlflow+fsync: the same with every metric line fsynced (the choice not made)
- journal only:      after MLflow failed (flush per line), and the same fsynced
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from unittest import mock

from sdxl_ablate.config import TrackingConfig
from sdxl_ablate.track import journal
from sdxl_ablate.track.journal import JournalingTracker
from sdxl_ablate.track.tracker import Tracker

STEP_METRICS = ("train/loss", "train/lr", "memory/rss_gib", "memory/peak_rss_gib", "memory/available_gib")


def _times(log, steps: int, first_step: int) -> list[float]:
    times = []
    for step in range(first_step, first_step + steps):
        metrics = {k: 1.0 / (step + i + 1) for i, k in enumerate(STEP_METRICS)}
        t0 = time.perf_counter()
        log(metrics, step)
        times.append(time.perf_counter() - t0)
    return times


MODES = {  # name: (journal, every metric line fsynced, MLflow taken as failed)
    "mlflow": (False, False, False),
    "journal+mlflow": (True, False, False),
    "journal+mlflow+fsync": (True, True, False),
    "journal only": (True, False, True),
    "journal only+fsync": (True, True, True),
}


def measure(root: Path, steps: int, rounds: int = 5) -> dict[str, float]:
    """Median ms per step of each mode; the modes take turns, `rounds` times, so a busy
    machine's slow spell does not fall on one of them alone."""
    cfg = TrackingConfig(uri=f"sqlite:///{root}/mlflow.db", artifact_root=str(root / "art"))
    trackers = {}
    for name, (journaled, _, failed) in MODES.items():
        t = JournalingTracker(cfg, "bench", name, root / name) if journaled else Tracker(cfg, "bench", name)
        t.__enter__()
        if failed:
            t.failure = "benchmark: MLflow taken as failed"  # the journal alone from here on
        trackers[name] = t
    times: dict[str, list[float]] = {name: [] for name in MODES}
    per_round = max(1, steps // rounds)
    for r in range(rounds):
        for name, (_, fsync_all, _) in MODES.items():
            with mock.patch.object(journal, "FLUSHED_ONLY", frozenset() if fsync_all else journal.FLUSHED_ONLY):
                times[name] += _times(trackers[name].log_metrics, per_round, r * per_round)
    for name, t in trackers.items():
        if not MODES[name][2]:
            t.set_status("ok")
            t.__exit__(None, None, None)
        elif isinstance(t, JournalingTracker):
            t.journal.close()
    return {name: 1000 * statistics.median(ts) for name, ts in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdxl_ablate.perf.journal_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--dir", type=Path, default=None, help="where the store and journals go (default: a temp dir)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps {args.steps}: must be at least 1")
    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for name, ms in measure(Path(tmp), args.steps).items():
            print(f"{name:24s} {ms:8.3f} ms/step (median of {args.steps})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The latest value of each metric a tracker was given, by MLflow's own rule.

A run's summary (`ablation/*`, evaluate/headline.py) is computed from these rather than read
back from the store, so it exists (and is journaled, then replayed) when the store is down.

MLflow's rule (`SqlAlchemyStore._update_latest_metrics_if_necessary`, which backs sqlite
files, database servers and tracking servers alike): a logged point replaces a key's latest
one when `(step, timestamp, value)` is strictly greater. Mirrored here exactly, so the values
equal `client.get_run(run_id).data.metrics` of a run this tracker logged.
"""

from __future__ import annotations

from typing import Iterable, Mapping


class LatestMetrics:
    def __init__(self) -> None:
        self._latest: dict[str, tuple[int, int, float]] = {}  # key -> (step, timestamp ms, value)

    def update(self, metrics: Mapping[str, float], step: int, timestamp_ms: int) -> None:
        """`metrics` as logged (finite floats), at one step and one timestamp."""
        for key, value in metrics.items():
            point = (int(step), int(timestamp_ms), float(value))
            if key not in self._latest or point > self._latest[key]:
                self._latest[key] = point

    def seed(self, points: Iterable) -> None:
        """A reopened run's latest points as the store holds them (objects with key, value,
        step and timestamp: MLflow's Metric entities or their protos)."""
        for m in points:
            self.update({m.key: m.value}, m.step, m.timestamp)

    def values(self) -> dict[str, float]:
        return {key: value for key, (_, _, value) in self._latest.items()}

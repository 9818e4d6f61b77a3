"""Where a variant's wall time goes, measured by the run itself.

`runner.run` times its phases with a `Phases` object; each phase counts exclusive time (a
phase nested inside another, e.g. MLflow logging during evaluation, is taken out of the
outer one), so the phases add up to at most the variant's wall time. The training call is
split further with the trainer's own timings (`TrainResult.timings`, `step_times`).

Phases (seconds): `data` (dataset loading), `model_setup` (the base acquired, adapters and
switches applied), `input_caching` (latents and prompt embeddings encoded, or read from the
cache), `first_step` (step 0: compilation, cuDNN/cuBLAS set-up), `training` (every later
step, CUDA-graph capture included), `train_other` (the rest of the training call: optimizer
set-up, the loop's bookkeeping), `saving` (the LoRA file), `evaluation`, `logging` (every
MLflow call), `teardown` (the base restored and verified), and `other` (wall minus all).

They land as `time/<phase>_s` metrics in the run and, with timestamps, in `phases.json` in
the job's output directory, which `python -m sdxl_ablate.bench --study` collects.
"""

from __future__ import annotations

import contextlib
import functools
import json
import time
from pathlib import Path
from typing import Any, Callable, Iterator

PHASES = ("data", "model_setup", "input_caching", "first_step", "training", "train_other", "saving",
          "evaluation", "logging", "teardown")
PHASES_FILE = "phases.json"
# The tracker methods that talk to MLflow.
_TRACKER_CALLS = ("log_params", "log_metrics", "set_tags", "set_status", "log_artifact", "log_text", "log_dict")


class Phases:
    def __init__(self) -> None:
        self.started_at = time.time()
        self._t0 = time.perf_counter()
        self.seconds: dict[str, float] = {name: 0.0 for name in PHASES}
        self._stack: list[list] = []  # [name, started, time spent in nested phases]
        self.marks: dict[str, float] = {}  # name -> seconds since the start
        self.info: dict[str, Any] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        frame = [name, time.perf_counter(), 0.0]
        self._stack.append(frame)
        try:
            yield
        finally:
            self._stack.pop()
            total = time.perf_counter() - frame[1]
            self.seconds[name] = self.seconds.get(name, 0.0) + total - frame[2]
            if self._stack:
                self._stack[-1][2] += total

    def timed(self, name: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with self(name):
                return fn(*args, **kwargs)

        return wrapper

    def instrument(self, tracker) -> None:
        """Counts every MLflow call of this tracker as `logging`, wherever it happens."""
        for method in _TRACKER_CALLS:
            if hasattr(tracker, method):
                setattr(tracker, method, self.timed("logging", getattr(tracker, method)))

    def mark(self, name: str) -> Callable[[], None]:
        """A callable that records when it is called (e.g. train's Hooks.loop_start)."""
        def record() -> None:
            self.marks[name] = time.perf_counter() - self._t0

        return record

    def split_training(self, result) -> None:
        """Splits the exclusive time of the training call (already counted as `train_other`)
        into set-up, input caching, the first step and the later steps."""
        timings = getattr(result, "timings", {}) or {}
        steps = list(result.step_times)
        parts = {"model_setup": timings.get("prepare_s", 0.0), "input_caching": timings.get("inputs_s", 0.0),
                 "first_step": steps[0] if steps else 0.0, "training": sum(steps[1:])}
        for name, s in parts.items():
            self.seconds[name] += s
        self.seconds["train_other"] = max(self.seconds["train_other"] - sum(parts.values()), 0.0)
        self.info.update(steps=len(steps), step_median_s=result.step_time if steps else None,
                         images_per_s=result.images_per_s if steps else None,
                         images_per_step=result.images_per_step)

    def record(self) -> dict[str, Any]:
        wall = time.perf_counter() - self._t0
        phases = {k: round(max(v, 0.0), 4) for k, v in self.seconds.items()}
        phases["other"] = round(max(wall - sum(phases.values()), 0.0), 4)
        return {"started_at": self.started_at, "ended_at": self.started_at + wall, "wall_s": round(wall, 4),
                "phases": phases, "marks": {k: round(v, 4) for k, v in self.marks.items()}, **self.info}

    def metrics(self) -> dict[str, float]:
        rec = self.record()
        return {"time/wall_s": rec["wall_s"], **{f"time/{k}_s": v for k, v in rec["phases"].items()},
                **{f"time/{k}_at_s": v for k, v in rec["marks"].items()}}

    def write(self, output_dir: Path, **info: Any) -> Path:
        path = Path(output_dir) / PHASES_FILE
        path.write_text(json.dumps({**self.record(), **info}, indent=1))
        return path

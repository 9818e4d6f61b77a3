"""A sweep as one comparable set: its id, its parent MLflow run, preflight, and its outcome.

Each `python -m sdxl_ablate -m ...` is one sweep with a fresh id. Before any job starts
(`SweepCallback.on_multirun_start`, in the launching process, so launchers that run jobs in
other processes or on other hosts see the same thing), every job's config is composed, the
resources of the valid ones are checked (preflight), and a parent run (`kind=sweep`) is
created; the id and the parent's run id go to `<sweep dir>/sweep.json`, where every job reads
them and tags its run (`kind=variant`, `sweep_id`, nested under the parent). When the sweep
ends, the parent records how many variants ended how, and the process exits with the number
of variants that did not end `ok` (capped at 100; 101 when the preflight stopped it), so
scripts and schedulers can tell.
A single run (no `-m`) is a sweep of one: its own id, no parent run.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from sdxl_ablate.config import TrackingConfig, to_typed

log = logging.getLogger(__name__)

SWEEP_FILE = "sweep.json"
# The exit code when the preflight stopped a run or sweep; 0-100 count the variants not ok.
PREFLIGHT_EXIT = 101
REUSED_TAG = "reused."  # on a sweep's parent run: reused.<run id> = run name
# Set by SweepCallback.on_multirun_end in the launching process; read by __main__ for the exit code.
last_failed: Optional[int] = None


@dataclass
class SweepInfo:
    sweep_id: str
    parent_run_id: Optional[str] = None
    n_jobs: int = 1

    def record_reused(self, tracking: TrackingConfig, run_id: Optional[str], run_name: str) -> None:
        """A variant skipped because an earlier sweep finished it with the same config: the parent
        names the run it reuses (`reused.<run id>` = run name), so this sweep is still complete."""
        log.info("variant %s: finished before with the same config (run %s): reused, not trained again",
                 run_name, run_id)
        if self.parent_run_id and run_id:
            from mlflow.tracking import MlflowClient

            from sdxl_ablate.track.tracker import resolve_uri

            MlflowClient(resolve_uri(tracking)).set_tag(self.parent_run_id, f"{REUSED_TAG}{run_id}", run_name)

    def tags(self) -> dict[str, str]:
        """The tags that place a variant's run in its sweep."""
        tags = {"kind": "variant", "sweep_id": self.sweep_id}
        if self.parent_run_id:
            tags["mlflow.parentRunId"] = self.parent_run_id  # MLflow's nesting
        return tags


def new_sweep_id() -> str:
    """Sortable by start time, unique across hosts: 20261203-192501-3fa2c1."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def read_info(sweep_dir: Path) -> SweepInfo:
    path = Path(sweep_dir) / SWEEP_FILE
    if not path.is_file():  # launched without the callback (e.g. a custom launcher config)
        return SweepInfo(sweep_id=f"dir-{Path(sweep_dir).name}")
    return SweepInfo(**json.loads(path.read_text()))


def job_overrides(config: DictConfig) -> list[list[str]]:
    """The override lists the sweeper will launch, one per job (see `expand`)."""
    params = OmegaConf.select(config, "hydra.sweeper.params")
    params = OmegaConf.to_container(params, resolve=False) if params else {}
    return expand(params, OmegaConf.to_container(config.hydra.overrides.task, resolve=False))


def expand(sweeper_params: dict[str, Any], task_overrides: list[str]) -> list[list[str]]:
    """The jobs as Hydra's basic sweeper expands them: the sweep config's `hydra.sweeper.params`,
    then the command line (which wins for a key in both), as a cartesian product."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    params = [f"{k}={v}" for k, v in sweeper_params.items()]
    parsed = OverridesParser.create().parse_overrides(params + list(task_overrides))
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def compose_jobs(config: DictConfig, config_name: str) -> tuple[list, list[str]]:
    """Typed configs of the jobs that pass their own checks, and the config errors of the rest
    (those jobs will be recorded as failed runs by themselves; they need no resources)."""
    from hydra import compose

    typed, errors = [], []
    for overrides in job_overrides(config):
        try:
            typed.append(to_typed(compose(config_name=config_name, overrides=overrides)))
        except Exception as e:  # noqa: BLE001 - a bad job must not stop the preflight of the rest
            errors.append(f"{' '.join(overrides)}: {e}")
    return typed, errors


def tracking_of(config: DictConfig) -> tuple[TrackingConfig, str]:
    tracking = TrackingConfig(**OmegaConf.to_container(config.tracking, resolve=True))
    return tracking, tracking.experiment or str(config.study)


def launcher_needing_gpu(config: DictConfig) -> Optional[str]:
    """The sweep's launcher preset when it is one that gives every job a GPU (devices.py)."""
    from sdxl_ablate.run.devices import GPU_LAUNCHERS

    choice = OmegaConf.select(config, "hydra.runtime.choices")
    name = None if choice is None else choice.get("hydra/launcher")
    return name if name in GPU_LAUNCHERS else None


class SweepCallback(Callback):
    """Registered in conf/config.yaml (hydra.callbacks.sweep)."""

    def on_multirun_start(self, config: DictConfig, config_name: Optional[str] = None, **kwargs: Any) -> None:
        from sdxl_ablate.run import preflight
        from sdxl_ablate.track.tracker import Tracker

        cfgs, errors = compose_jobs(config, config_name or "config")
        n_jobs = len(cfgs) + len(errors)
        try:
            preflight.check(cfgs, gpu_launcher=launcher_needing_gpu(config))
        except preflight.PreflightError as e:
            print(f"\n{e}\n", file=sys.stderr)
            sys.exit(PREFLIGHT_EXIT)  # before any job: nothing trained, no run left half-done
        tracking, experiment = tracking_of(config)
        info = SweepInfo(sweep_id=new_sweep_id(), n_jobs=n_jobs)
        parent = Tracker(tracking, experiment, f"sweep {info.sweep_id}",
                         tags={"kind": "sweep", "sweep_id": info.sweep_id, "study": str(config.study)})
        parent.__enter__()
        parent.set_tags({"n_jobs": n_jobs, "overrides": " ".join(OmegaConf.to_container(config.hydra.overrides.task))})
        info.parent_run_id = parent.run_id
        sweep_dir = Path(str(config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        (sweep_dir / SWEEP_FILE).write_text(json.dumps(asdict(info), indent=2))
        log.info("sweep %s: %d job(s), parent run %s", info.sweep_id, n_jobs, parent.run_id)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        global last_failed
        from mlflow.tracking import MlflowClient

        from sdxl_ablate.track.tracker import resolve_uri

        info = read_info(Path(str(config.hydra.sweep.dir)))
        if info.parent_run_id is None:
            return
        tracking, _ = tracking_of(config)
        client = MlflowClient(resolve_uri(tracking))
        parent = client.get_run(info.parent_run_id)
        children = client.search_runs([parent.info.experiment_id],
                                      f"tags.sweep_id = '{info.sweep_id}' and tags.kind = 'variant'")
        counts: dict[str, int] = {}
        for run in children:
            status = run.data.tags.get("status", "unknown")
            counts[status] = counts.get(status, 0) + 1
        reused = [k for k in client.get_run(info.parent_run_id).data.tags if k.startswith(REUSED_TAG)]
        if reused:
            counts["ok"] = counts.get("ok", 0) + len(reused)
            counts["ok (reused)"] = len(reused)
        # A job that left no run at all (killed before it could record one) counts as failed too.
        last_failed = info.n_jobs - counts.get("ok", 0)
        client.set_tag(info.parent_run_id, "n_ok", counts.get("ok", 0))
        client.set_tag(info.parent_run_id, "n_failed", last_failed)
        client.set_tag(info.parent_run_id, "status", "ok" if last_failed == 0 else "failed")
        client.set_terminated(info.parent_run_id, "FINISHED")
        summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        missing = info.n_jobs - len(children) - len(reused)
        print(f"\nsweep {info.sweep_id}: {info.n_jobs} variant(s): {summary}"
              + (f", {missing} without a run" if missing else "")
              + (f"; exit code {min(last_failed, 100)} (variants not ok)" if last_failed else ""))

"""A sweep as one comparable set: its id, its parent MLflow run, preflight, and its outcome.

Each `python -m sdxl_ablate -m ...` is one sweep with a fresh id, made when the process starts
(`begin_process`) and named in its output directory (conf/config.yaml: `${sdxl_ablate.sweep_id:}`),
so sweeps started together never share one. Before any job starts
(`SweepCallback.on_multirun_start`, in the launching process, so launchers that run jobs in
other processes or on other hosts see the same thing), every job's config is composed, the
resources of the valid ones are checked (preflight), and a parent run (`kind=sweep`, with the
launching `host` and `pid`) is created; the id and the parent's run id go to
`<sweep dir>/sweep.json`, where every job reads them and tags its run (`kind=variant`,
`sweep_id`, nested under the parent).

The parent run always ends: when the sweep ends it records how many of its variants ended how
(`n_ok`, `n_failed`) and is FINISHED; Ctrl-C or SIGTERM close it as KILLED (exit code 130/143);
a failure to record the end closes it as FAILED where the store allows (exit code 102); and a
parent whose process died without closing it (SIGKILL) is closed as KILLED by the next sweep of
its study on the same host. Otherwise the process exits with the number of variants that did
not end `ok` (capped at 100; 101 when the preflight stopped it), so scripts and schedulers can tell.
A single run (no `-m`) is a sweep of one: its own id, no parent run.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
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
            from sdxl_ablate.track.tracker import connect, resolve_uri

            connect(resolve_uri(tracking)).set_tag(self.parent_run_id, f"{REUSED_TAG}{run_id}", run_name)

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


# --- how a sweep ends ----------------------------------------------------------------------


@dataclass
class Tally:
    """How this sweep's variants ended (so far): its own runs only, by their `status` tag."""
    n_jobs: int
    statuses: dict[str, int]
    reused: int = 0  # variants an earlier sweep had finished with the same config (no run here)

    @property
    def n_ok(self) -> int:
        return self.statuses.get("ok", 0) + self.reused

    @property
    def missing(self) -> int:
        """Variants without a run: not started yet, or killed before they could record one."""
        return max(0, self.n_jobs - sum(self.statuses.values()) - self.reused)

    @property
    def not_ok(self) -> int:
        return max(0, self.n_jobs - self.n_ok)

    def line(self, missing: str = "without a run") -> str:
        """`6 variants: 4 ok (2 reused), 1 failed, 1 nan`: each variant counted once."""
        parts = []
        if self.n_ok:
            trained = self.statuses.get("ok", 0)
            parts.append(f"{self.n_ok} ok" + ("" if not self.reused else " (all reused)" if not trained
                                               else f" ({self.reused} reused)"))
        parts += [f"{n} {status}" for status, n in sorted(self.statuses.items()) if status != "ok" and n]
        if self.missing:
            parts.append(f"{self.missing} {missing}")
        return f"{self.n_jobs} variant{'' if self.n_jobs == 1 else 's'}: {', '.join(parts) or 'none ended'}"


def tally(client, info: SweepInfo) -> Tally:
    parent = client.get_run(info.parent_run_id)
    statuses: dict[str, int] = {}
    for run in client.search_runs([parent.info.experiment_id],
                                  f"tags.sweep_id = '{info.sweep_id}' and tags.kind = 'variant'"):
        status = run.data.tags.get("status") or ("running" if run.info.status == "RUNNING" else "unknown")
        statuses[status] = statuses.get(status, 0) + 1
    reused = sum(1 for k in parent.data.tags if k.startswith(REUSED_TAG))
    return Tally(info.n_jobs, statuses, reused)


def close_parent(client, info: SweepInfo, counts: Optional[Tally], status: str, terminal: str,
                 error: Optional[str] = None) -> None:
    """The parent run's end: `status` (ok/failed/killed), `n_ok`/`n_failed` when known, `error` why."""
    from mlflow.entities import RunTag

    tags = {"status": status, **({"error": error} if error else {})}
    if counts is not None:
        tags.update(n_ok=str(counts.n_ok), n_failed=str(counts.not_ok))
    client.log_batch(info.parent_run_id, tags=[RunTag(k, v[:5000]) for k, v in tags.items()])
    client.set_terminated(info.parent_run_id, terminal)


# --- the launching process: its sweep id, its open parent run, signals ----------------------

SWEEP_ID_ENV = "SDXL_ABLATE_SWEEP_ID"
# The exit code when the sweep's own records failed (its parent run could not be made or closed).
CALLBACK_EXIT = 102
# 128 + the signal, the shell's convention for a process ended by one.
SIGNAL_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}
# Set by on_multirun_end when recording the sweep's end failed; read by __main__ for the exit code.
callback_error: Optional[str] = None
# The parent run this process opened and has not closed yet, with its store's URI.
_open: Optional[tuple[SweepInfo, str]] = None


def process_sweep_id() -> str:
    """This launch's sweep id (the `${sdxl_ablate.sweep_id:}` resolver of conf/config.yaml's output
    dirs, and the id the parent run and every variant are tagged with).

    `python -m sdxl_ablate` makes a fresh one at start (`begin_process`) and keeps it in the
    environment, so the job processes a launcher starts (joblib workers, SLURM tasks) resolve the
    same directory; two launches, even in the same second, never share one."""
    if not os.environ.get(SWEEP_ID_ENV):
        os.environ[SWEEP_ID_ENV] = new_sweep_id()
    return os.environ[SWEEP_ID_ENV]


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM: raised like KeyboardInterrupt (no `except Exception` swallows it), so each
    open run is closed on the way out and the sweep's parent run by `interrupted`."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {_signal_name(signum)}")
        self.signum = signum


def _signal_name(signum: int) -> str:
    return "Ctrl-C (SIGINT)" if signum == signal.SIGINT else signal.Signals(signum).name


_signal_received: Optional[int] = None  # the signal, once one arrived (see `stopped`)


def _raise_interrupted(signum, frame):
    global _signal_received
    _signal_received = signum
    raise Interrupted(signum)


def begin_process() -> None:
    """`python -m sdxl_ablate` calls this before Hydra composes: a fresh sweep id (one inherited from
    the environment belongs to the process that started this one), and SIGINT/SIGTERM raise
    `Interrupted`."""
    os.environ[SWEEP_ID_ENV] = new_sweep_id()
    signal.signal(signal.SIGINT, _raise_interrupted)
    signal.signal(signal.SIGTERM, _raise_interrupted)


def interrupted(err: KeyboardInterrupt) -> int:
    """Ctrl-C or SIGTERM reached the top: close the open parent run as KILLED (why in `error`),
    print one line and the summary so far, and return the exit code (130 / 143)."""
    global _open
    for sig in SIGNAL_EXIT:  # a second Ctrl-C must not cut the closing short
        signal.signal(sig, signal.SIG_IGN)
    signum = getattr(err, "signum", signal.SIGINT)
    how, code = _signal_name(signum), SIGNAL_EXIT.get(signum, 128 + signum)
    if _open is None:
        print(f"\ninterrupted by {how}; exit code {code}", file=sys.stderr)
        return code
    info, uri = _open
    counts = None
    try:
        from sdxl_ablate.track.tracker import connect

        client = connect(uri)
        counts = tally(client, info)
        close_parent(client, info, counts, "killed", "KILLED",
                     f"interrupted by {how} at {time.strftime('%Y-%m-%d %H:%M:%S')}")
        _open = None
        outcome = f"its parent run {info.parent_run_id} is closed as KILLED"
    except Exception as e:  # noqa: BLE001 - the store may be what failed; say so, exit all the same
        outcome = (f"its parent run {info.parent_run_id} could not be closed ({type(e).__name__}: {e}); "
                   "the next sweep of this study on this host closes it")
    print(f"\nsweep {info.sweep_id}: interrupted by {how}; {outcome}", file=sys.stderr)
    if counts is not None:
        print(f"sweep {info.sweep_id}: {counts.line('not run')}; exit code {code}", file=sys.stderr)
    return code


def stopped(code: Any) -> Any:
    """The process exits before the sweep's end (Hydra's own error, e.g. a job's override it cannot
    compose): close the open parent run as FAILED with its counts so far and why; returns the exit
    code. A signal that Hydra turned into its own error (it arrived while Hydra composed a job's
    config) is still an interruption: `interrupted`, 130/143."""
    global _open
    if _signal_received is not None:
        return interrupted(Interrupted(_signal_received))
    if _open is None:
        return code
    info, uri = _open
    _open = None
    why = f"the sweep stopped before its end (exit code {code})"
    try:
        from sdxl_ablate.track.tracker import connect

        client = connect(uri)
        counts = tally(client, info)
        close_parent(client, info, counts, "failed", "FAILED", why)
        print(f"sweep {info.sweep_id}: {why}; its parent run {info.parent_run_id} is closed as FAILED; "
              f"{counts.line('not run')}", file=sys.stderr)
    except Exception as e:  # noqa: BLE001
        print(f"sweep {info.sweep_id}: {why}; its parent run {info.parent_run_id} could not be closed "
              f"({type(e).__name__}: {e})", file=sys.stderr)
    return code


def _process_start(pid: int) -> Optional[str]:
    """The process's start time in clock ticks (Linux /proc): tells a reused pid from the original."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: Optional[str]) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        pass
    now = _process_start(pid)
    return start is None or now is None or now == start


def close_dead_parents(client, experiment_id: str, seen_by: str) -> list[str]:
    """Parent runs of this study left RUNNING by a sweep process that is gone (SIGKILL, out of
    memory, a power cut): closed as KILLED, with their counts and why. Only parents started on this
    host (tags `host`, `pid`) are judged; nothing here can tell whether another host's process lives."""
    host, closed = socket.gethostname(), []
    for run in client.search_runs([experiment_id], "tags.kind = 'sweep' and attributes.status = 'RUNNING'"):
        tags = run.data.tags
        if tags.get("host") != host or not tags.get("pid", "").isdigit():
            continue
        pid = int(tags["pid"])
        if _alive(pid, tags.get("pid.start")):
            continue
        if client.get_run(run.info.run_id).info.status != "RUNNING":
            continue  # it closed its parent and exited after the search above: not dead, done
        info = SweepInfo(tags.get("sweep_id", ""), run.info.run_id, int(tags.get("n_jobs", "0") or 0))
        why = (f"the sweep's process (pid {pid} on {host}) ended without closing its parent run (killed, "
               f"or the store failed at its end); found RUNNING by sweep {seen_by} at "
               f"{time.strftime('%Y-%m-%d %H:%M:%S')}")
        close_parent(client, info, tally(client, info), "killed", "KILLED", why)
        log.warning("sweep %s's parent run %s was left RUNNING by a dead process: marked KILLED",
                    info.sweep_id, run.info.run_id)
        closed.append(run.info.run_id)
    return closed


class SweepCallback(Callback):
    """Registered in conf/config.yaml (hydra.callbacks.sweep).

    Hydra turns an exception in a callback into a warning and goes on (exit code 0): every failure
    here is caught and turned into a loud message and a non-zero exit code instead."""

    def on_multirun_start(self, config: DictConfig, config_name: Optional[str] = None, **kwargs: Any) -> None:
        from sdxl_ablate.run import preflight

        cfgs, errors = compose_jobs(config, config_name or "config")
        n_jobs = len(cfgs) + len(errors)
        try:
            preflight.check(cfgs, gpu_launcher=launcher_needing_gpu(config))
        except preflight.PreflightError as e:
            print(f"\n{e}\n", file=sys.stderr)
            sys.exit(PREFLIGHT_EXIT)  # before any job: nothing trained, no run left half-done
        try:
            self._open_parent(config, n_jobs)
        except Exception as e:  # noqa: BLE001 - without its parent the sweep is not one set: stop before any job
            print(f"\nsweep {process_sweep_id()}: could not record its start in MLflow ({type(e).__name__}: {e}); "
                  f"nothing was trained; exit code {CALLBACK_EXIT}\n", file=sys.stderr)
            sys.exit(CALLBACK_EXIT)

    def _open_parent(self, config: DictConfig, n_jobs: int) -> None:
        global _open
        from sdxl_ablate.track.tracker import Tracker

        tracking, experiment = tracking_of(config)
        info = SweepInfo(sweep_id=process_sweep_id(), n_jobs=n_jobs)
        pid = os.getpid()
        parent = Tracker(tracking, experiment, f"sweep {info.sweep_id}",
                         tags={"kind": "sweep", "sweep_id": info.sweep_id, "study": str(config.study),
                               "host": socket.gethostname(), "pid": str(pid), "pid.start": _process_start(pid) or ""})
        parent.__enter__()
        info.parent_run_id = parent.run_id
        _open = (info, parent.uri)
        parent.set_tags({"n_jobs": n_jobs, "overrides": " ".join(OmegaConf.to_container(config.hydra.overrides.task))})
        close_dead_parents(parent.client, parent.experiment_id, info.sweep_id)
        sweep_dir = Path(str(config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        (sweep_dir / SWEEP_FILE).write_text(json.dumps(asdict(info), indent=2))
        log.info("sweep %s: %d job(s), parent run %s, in %s", info.sweep_id, n_jobs, parent.run_id, sweep_dir)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        global last_failed, callback_error, _open
        from sdxl_ablate.track.tracker import connect

        if _open is None:  # no parent run was opened by this process
            return
        info, uri = _open
        try:
            client = connect(uri)
            counts = tally(client, info)
            close_parent(client, info, counts, "ok" if counts.not_ok == 0 else "failed", "FINISHED")
        except Exception as e:  # noqa: BLE001 - Hydra would only warn: record it, fail the sweep loudly
            callback_error = f"{type(e).__name__}: {e}"
            try:
                close_parent(connect(uri), info, None, "failed", "FAILED",
                             f"the sweep's end could not be recorded: {callback_error}")
                left = "is closed as FAILED without its counts"
            except Exception:  # noqa: BLE001 - the store is still failing
                left = "stays RUNNING until the next sweep of this study on this host closes it"
            print(f"\nsweep {info.sweep_id}: could not record its end in MLflow ({callback_error}); its parent "
                  f"run {info.parent_run_id} {left}; the variants' own runs hold their results; "
                  f"exit code {CALLBACK_EXIT}", file=sys.stderr)
            return
        finally:
            _open = None
        last_failed = min(counts.not_ok, 100)
        print(f"\nsweep {info.sweep_id}: {counts.line()}"
              + (f"; exit code {last_failed} (variants not ok)" if last_failed else ""))

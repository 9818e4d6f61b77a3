"""Before a variant trains: skip it if it already finished, resume it if it was interrupted.

Each training is identified by its `config_hash` (config/identity.py) and owns a stable directory,
`<trainer.checkpoint_dir or <cwd>/checkpoints>/<study>/<config_hash>/`, which holds

- `step-NNNNNNNN/`: its checkpoints (checkpoint.py),
- `run.json`: the MLflow run it trains into, so a resume continues that run, and the output
  directory whose tracking journal holds that run so far (a resume's journal starts with it),
- `result.json`: written when it finished with status ok (used when MLflow cannot be asked),
- `lock`: held (flock) by the process training it; a free lock means nobody is.

`plan_variant` decides, in this order:
1. another live process holds the lock -> `VariantBusy` (never two writers of one directory);
2. RUNNING MLflow runs of this experiment whose training process is gone (their lock is free)
   are marked KILLED with the reason, unless they are the run resumed now;
3. `trainer.force=true`: earlier checkpoints of this config are removed, a new run starts;
4. a FINISHED run with status ok, a finite final loss and this config hash (or a `result.json`
   with status ok, when the store cannot be asked or the run's journal still holds its records,
   and the store does not give that run a failing status) -> skip, returning its recorded final loss;
5. `trainer.resume`: `auto` -> the newest checkpoint that verifies (corrupt ones skipped),
   `never` -> start afresh (this config's checkpoints are removed), a path -> that checkpoint
   (its config must match: `ConfigMismatch` names the keys). The run named in `run.json` is
   reopened unless it finished.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from mlflow.tracking import MlflowClient

from sdxl_ablate.track.files import atomic_write_json
from sdxl_ablate.train.checkpoint import (META, Checkpointer, NoCheckpoints, ConfigMismatch,
                         config_differences, latest_valid, list_checkpoints, step_of, verify)
from sdxl_ablate.config import Config, config_hash, hashed_items
from sdxl_ablate.track.limits import param_value
from sdxl_ablate.track.tracker import connect, resolve_uri

log = logging.getLogger(__name__)

RUN_RECORD = "run.json"
RESULT_RECORD = "result.json"
LOCK = "lock"
HASH_TAG = "config_hash"
DIR_TAG = "checkpoint_dir"
# The statuses a training process gives its own run when it did not train a usable LoRA
# (`killed` is left out: another process sets it, and a journal may still hold the run's end).
NOT_TRAINED = ("nan", "oom", "failed")


class VariantBusy(RuntimeError):
    """Another live process is training the same config into the same checkpoint directory."""


def checkpoint_root(cfg: Config) -> Path:
    return Path(cfg.trainer.checkpoint_dir) if cfg.trainer.checkpoint_dir else Path.cwd() / "checkpoints"


def variant_dir(cfg: Config, chash: str | None = None) -> Path:
    return (checkpoint_root(cfg) / cfg.study / (chash or config_hash(cfg))).resolve()


def _try_lock(path: Path):
    """An open file holding an exclusive flock on `path`, or None if another process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    return f


def _lock_owner(path: Path) -> str:
    try:
        return path.read_text().strip() or "unknown"
    except OSError:
        return "unknown"


@dataclass
class Plan:
    """What `runner.run` does with this variant, and the bookkeeping to do it."""

    action: str  # skip | resume | start
    config_hash: str
    directory: Path
    reason: str
    run_id: str | None = None  # resume: the run to reopen; skip: the finished run
    resume_from: Path | None = None
    result: float | None = None  # skip: the recorded final loss
    tags: dict[str, str] = field(default_factory=dict)  # for the run
    logged_up_to: int = -1  # resume: the last step whose train/loss the run already has
    earlier_output_dir: str | None = None  # resume: the output directory of the attempt it continues
    _lock: Any = None

    def checkpointer(self, cfg: Config) -> Checkpointer:
        if self.reason == DATA_PARALLEL:
            return NoCheckpoints()
        t = cfg.trainer
        return Checkpointer(self.directory, t.checkpoint_every or None, t.keep_checkpoints, hashed_items(cfg),
                            resume_from=self.resume_from)

    def carry_journal(self, output_dir: Path) -> None:
        """A resume's journal starts with the run so far: the earlier attempt's journal (which, after
        earlier resumes, holds theirs too), up to where this attempt takes over. Called before this
        attempt journals anything."""
        if self.action != "resume" or not self.earlier_output_dir:
            return
        from sdxl_ablate.track.journal import carry_over

        # The loop logs step n (0-based) as its (n+1)th: resumed from checkpoint step-C it logs steps C
        # on again, except the train/loss steps the run already has (metrics_logger).
        cut = max(step_of(self.resume_from) - 1 if self.resume_from is not None else -1, self.logged_up_to)
        try:
            carry_over(Path(self.earlier_output_dir), Path(output_dir), cut)
        except OSError as err:  # the journal then holds this attempt alone, as before
            log.error("could not copy the earlier attempt's tracking journal from %s (%s): this run's journal "
                      "holds only what it logs from its resume on", self.earlier_output_dir, err)

    def opened(self, tracker, uri: str, output_dir: Path | None = None) -> None:
        """The run is open: remember its id (and where its journal is) here, so a later resume
        continues this run and its journal."""
        try:
            atomic_write_json(self.directory / RUN_RECORD, {"run_id": tracker.run_id, "tracking_uri": uri,
                                                            "config_hash": self.config_hash,
                                                            **({"output_dir": str(Path(output_dir).resolve())}
                                                               if output_dir is not None else {})})
        except OSError as err:  # e.g. a full disk: training goes on; a resume would open a new run
            log.error("could not record the run id in %s (%s): a resume of this variant will start a new "
                      "MLflow run", self.directory / RUN_RECORD, err)
        if self.action == "resume" and self.run_id is not None and not getattr(tracker, "failure", None):
            # The reopened run's error (killed, failed) was that attempt's: keep it under another name.
            try:
                client = connect(uri)
                old = client.get_run(self.run_id).data.tags.get("error")
                if old is not None:
                    client.set_tag(self.run_id, "resume.previous_error", old)
                    client.delete_tag(self.run_id, "error")
            except Exception as err:  # noqa: BLE001 - bookkeeping only
                log.warning("could not move the resumed run's previous error tag: %s", err)

    def params_to_log(self, params: dict[str, Any], tracker) -> dict[str, Any]:
        """A resumed run already has its params (MLflow refuses to change one): only new keys are
        logged; keys outside the config hash that changed (e.g. eval.*) are recorded as a tag."""
        if self.action != "resume" or tracker.run_id is None or getattr(tracker, "failure", None):
            return params
        try:
            old = connect(tracker.uri).get_run(tracker.run_id).data.params
        except Exception:  # noqa: BLE001 - the tracker journals what cannot be written
            return params
        changed = {k: v for k, v in params.items() if k in old and old[k] != param_value(v)}
        if changed:
            tracker.set_tags({"resume.changed_params": ", ".join(f"{k}={v}" for k, v in changed.items())})
        return {k: v for k, v in params.items() if k not in old}

    def metrics_logger(self, log_metrics: Callable[..., None]) -> Callable[..., None]:
        """A resumed run re-trains the steps after its last checkpoint: their per-step metrics are
        already in the run's history, so they are not logged twice."""
        up_to = self.logged_up_to

        def logger(metrics: dict[str, float], step: int = 0) -> None:
            if "train/loss" in metrics and step <= up_to:
                return
            log_metrics(metrics, step)

        return logger

    def finished(self, run_id: str | None, final_loss: float, output_dir: Path) -> None:
        try:
            atomic_write_json(self.directory / RESULT_RECORD, {"status": "ok", "run_id": run_id,
                                                               "final_loss": final_loss, "output_dir": str(output_dir)})
        except OSError as err:  # the run is done and recorded in MLflow (or its journal) all the same
            log.error("could not record the finished run in %s: %s", self.directory / RESULT_RECORD, err)

    def release(self) -> None:
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None


def _connect(cfg: Config, chash: str) -> tuple[MlflowClient | None, str | None, list, str]:
    """The client, experiment id and this config's runs, or Nones and why: a store that cannot
    be reached must not stop training (the run's records then go to its journal)."""
    uri = resolve_uri(cfg.tracking)
    try:
        client = connect(uri)
        exp = client.get_experiment_by_name(cfg.tracking.experiment or cfg.study)
        if exp is None:
            return client, None, [], ""
        runs = list(client.search_runs([exp.experiment_id], filter_string=f"tags.{HASH_TAG} = '{chash}'"))
        return client, exp.experiment_id, runs, ""
    except Exception as err:  # noqa: BLE001
        return None, None, [], f"{type(err).__name__}: {err}"


def _journal_kept(result: dict) -> bool:
    """Whether the finished run's tracking journal still holds records MLflow did not take
    (every run journals itself; one that MLflow took whole has nothing left to replay here)."""
    from sdxl_ablate.track.journal import unsent_records

    out = result.get("output_dir")
    return bool(out) and unsent_records(out) > 0


def _reap(client, exp_id, keep, run_name, directory) -> None:
    if client is None or exp_id is None:
        return
    try:
        reap_dead_runs(client, exp_id, keep, run_name, directory)
    except Exception as err:  # noqa: BLE001 - bookkeeping of other runs must not stop this one
        log.error("could not check the experiment for runs left RUNNING by dead processes: %s", err)


def reap_dead_runs(client: MlflowClient, exp_id: str, keep: str | None, seen_by: str, own_dir: Path) -> list[str]:
    """Marks KILLED every RUNNING run of the experiment whose training process is gone (its
    checkpoint directory's lock is free, or is ours: we hold `own_dir`'s lock); returns their
    ids. Runs without a local lock file (another machine, or older code) are left alone:
    nothing here can tell whether they live."""
    killed = []
    for run in client.search_runs([exp_id], filter_string="attributes.status = 'RUNNING'"):
        rid = run.info.run_id
        lock_dir = run.data.tags.get(DIR_TAG)
        if rid == keep or not lock_dir or not (Path(lock_dir) / LOCK).exists():
            continue
        held = None if Path(lock_dir) == own_dir else _try_lock(Path(lock_dir) / LOCK)
        if held is None and Path(lock_dir) != own_dir:
            continue  # its process is alive
        try:
            # Re-read under its lock: a run that finished after the search above closed itself before
            # giving its lock back (runner.run), so only a run still RUNNING now was left by a dead process.
            if client.get_run(rid).info.status != "RUNNING":
                continue
            why = (f"the process training this run ended without closing it (killed or crashed); found RUNNING "
                   f"by variant {seen_by} at {time.strftime('%Y-%m-%d %H:%M:%S')}. Re-running the same command "
                   "resumes it from its last checkpoint.")
            client.set_tag(rid, "status", "killed")
            client.set_tag(rid, "error", why)
            client.set_terminated(rid, status="KILLED")
            log.warning("run %s (%s) was left RUNNING by a dead process: marked KILLED", rid, run.info.run_name)
            killed.append(rid)
        finally:
            if held is not None:
                fcntl.flock(held, fcntl.LOCK_UN)
                held.close()
    return killed


def _wipe(directory: Path) -> None:
    for p in list_checkpoints(directory):
        shutil.rmtree(p)
    for name in (RUN_RECORD, RESULT_RECORD):
        (directory / name).unlink(missing_ok=True)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# Data-parallel ranks would each have to reach the same skip/resume decision and restore the same
# checkpoint; until that is built, a data-parallel run always starts and writes no checkpoints.
DATA_PARALLEL = "data-parallel (torchrun): no skip, resume or checkpoints"


def data_parallel_plan(cfg: Config) -> Plan:
    chash = config_hash(cfg)
    directory = variant_dir(cfg, chash)
    directory.mkdir(parents=True, exist_ok=True)
    return Plan("start", chash, directory, DATA_PARALLEL, tags={HASH_TAG: chash})


def plan_variant(cfg: Config, run_name: str) -> Plan:
    """Decides skip / resume / start for this variant (see the module docstring) and holds its lock."""
    chash = config_hash(cfg)
    directory = variant_dir(cfg, chash)
    lock = _try_lock(directory / LOCK)
    if lock is None:
        raise VariantBusy(f"variant {run_name} (config hash {chash}) is being trained by another live process "
                          f"({_lock_owner(directory / LOCK)}); its checkpoints are in {directory}")
    lock.seek(0)
    lock.truncate()
    lock.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    lock.flush()
    plan = Plan("start", chash, directory, "no earlier run of this config", _lock=lock,
                tags={HASH_TAG: chash, DIR_TAG: str(directory)})
    try:
        _decide(plan, cfg, run_name)
    except BaseException:
        plan.release()
        raise
    return plan


def _decide(plan: Plan, cfg: Config, run_name: str) -> None:
    t, directory, chash = cfg.trainer, plan.directory, plan.config_hash
    client, exp_id, runs, unreachable = _connect(cfg, chash)
    if unreachable:
        log.error("MLflow at %s cannot be reached (%s): deciding from %s alone", resolve_uri(cfg.tracking),
                  unreachable, directory)
    record = _read_json(directory / RUN_RECORD) or {}
    # The run this directory trains into, when it is still in the store and not finished.
    own = next((r for r in runs if r.info.run_id == record.get("run_id")), None)

    if t.force:
        _wipe(directory)
        plan.reason = "trainer.force=true: trained again from the start"
        _reap(client, exp_id, None, run_name, directory)
        log.info("variant %s: %s", run_name, plan.reason)
        return

    finished = [r for r in runs if r.info.status == "FINISHED" and r.data.tags.get("status") == "ok"
                and math.isfinite(r.data.metrics.get("train/final_loss", math.nan))]
    result = _read_json(directory / RESULT_RECORD)
    recorded = next((r for r in runs if result and r.info.run_id == result.get("run_id")), None)
    if recorded is not None and recorded.data.tags.get("status") in NOT_TRAINED:
        # The store says the run this record calls ok did not train (e.g. a record older than
        # the run's final verdict): the run's word wins, and its checkpoints are not trusted.
        log.warning("variant %s: %s says it finished ok in run %s, which has status %r in %s (%s): trained "
                    "again from the start", run_name, directory / RESULT_RECORD, recorded.info.run_id,
                    recorded.data.tags.get("status"), resolve_uri(cfg.tracking), recorded.data.tags.get("error"))
        _wipe(directory)
        result, own = None, None
    if result and not finished and not unreachable and not _journal_kept(result):
        # The store answers and has no finished run of this config, and the run's journal is
        # gone (e.g. `make clean` removed mlflow.db and multirun/): skipping would leave the
        # sweep with a run nobody can read. Train it again into this store, from the start: the
        # checkpoints' loss history went with the lost run.
        log.warning("variant %s: %s says it finished in run %s, which %s does not hold and no journal "
                    "can replay: trained again from the start", run_name, directory / RESULT_RECORD,
                    result.get("run_id"), resolve_uri(cfg.tracking))
        _wipe(directory)
        result, own = None, None
    if finished or (result or {}).get("status") == "ok" and math.isfinite(result.get("final_loss") or math.nan):
        plan.action = "skip"
        if finished:
            run = max(finished, key=lambda r: r.info.end_time or 0)
            plan.run_id, plan.result = run.info.run_id, run.data.metrics.get("train/final_loss")
            plan.reason = f"already finished with status ok in MLflow run {plan.run_id}"
        else:
            plan.run_id, plan.result = result.get("run_id"), result.get("final_loss")
            plan.reason = (f"already finished with status ok ({directory / RESULT_RECORD}); its tracking records may "
                           f"still be in {result.get('output_dir')}/tracking_journal: replay them with "
                           f"python -m sdxl_ablate.replay {result.get('output_dir')}")
        log.info("variant %s (config hash %s): %s; skipped (trainer.force=true trains it again)",
                 run_name, chash, plan.reason)
        _reap(client, exp_id, None, run_name, directory)
        return

    if t.resume == "never":
        _wipe(directory)
        plan.reason = "trainer.resume=never: started afresh"
    elif t.resume == "auto":
        path, skipped = latest_valid(directory)
        if skipped:
            plan.tags["resume.skipped_corrupt"] = " | ".join(skipped)
        if path is not None:
            plan.action, plan.resume_from = "resume", path
            plan.reason = f"resuming from {path}" + (f" ({len(skipped)} newer corrupt checkpoint(s) skipped)"
                                                     if skipped else "")
    else:
        path = Path(t.resume).expanduser().resolve()
        verify(path)  # an explicit checkpoint must be intact: no quiet fallback to another one
        saved = json.loads((path / META).read_text())["state"]["config"]
        diffs = config_differences(saved, hashed_items(cfg))
        if diffs:
            raise ConfigMismatch(path, diffs)
        plan.action, plan.resume_from = "resume", path
        plan.reason = f"resuming from {path} (trainer.resume)"
        if path.parent != directory:
            own = None  # another directory's run: this one trains into a run of its own

    if own is not None:
        # Continue the same MLflow run (resumed, or restarted from step 0 when no checkpoint was left).
        plan.run_id = own.info.run_id
        if plan.action == "start" and t.resume != "never":
            plan.action, plan.reason = "resume", "no checkpoint was written: restarting from step 0 in the same run"
        if plan.action == "resume":
            history = client.get_metric_history(plan.run_id, "train/loss")
            plan.logged_up_to = max((m.step for m in history), default=-1)
            # The same run goes on: its journal so far is in the earlier attempt's output directory.
            plan.earlier_output_dir = record.get("output_dir")
        else:
            plan.run_id = None
    if plan.resume_from is not None:
        plan.tags["resumed_from"] = str(plan.resume_from)
    _reap(client, exp_id, plan.run_id, run_name, directory)
    log.info("variant %s (config hash %s): %s", run_name, chash, plan.reason)

"""The runs a report reads: one record per MLflow run (`read_runs` does all the MLflow
reading), and which sweep's runs a report covers."""

from __future__ import annotations

import datetime as dt
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional


from sdxl_ablate.config.identity import seed_override, short_name, without_seed
from sdxl_ablate.evaluate.headline import peak_memory


LEGACY_SWEEP = "legacy"
REUSED_TAG = "reused."  # sweep.REUSED_TAG (not imported: the report needs no Hydra)


class ReportError(RuntimeError):
    """A report that cannot be made; the message says why."""


@dataclass
class RunImages:
    """A run's evaluation images (eval/images/*.png) and what each shows (eval/scores.json)."""

    jobs: list[dict]  # per image: index, prompt, seed, per-image scores
    base: list[Path]
    lora: list[Path]


@dataclass
class RunRecord:
    """What the report needs of one variant run."""

    name: str
    run_id: str = ""
    start_time: int = 0  # ms since the epoch
    tags: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)  # latest value of each metric
    params: dict[str, str] = field(default_factory=dict)
    loss_history: list[tuple[int, float]] = field(default_factory=list)  # (step, train/loss)
    images: Optional[RunImages] = None
    # Later sweeps that reused this finished run instead of training it again (their parent run's
    # `reused.<run id>` tags): sweep id -> that sweep's start (ms).
    reused_by: dict[str, int] = field(default_factory=dict)
    # Per-sample values behind a score, from eval/scores.json, so two runs pair sample by sample:
    # eval/heldout_loss -> per (image, timestep); eval/clip_style, eval/clip_text -> per image.
    units: dict[str, list[float]] = field(default_factory=dict)
    run_status: str = ""  # MLflow's own status (RUNNING, FINISHED, FAILED, KILLED)

    def sweep_starts(self) -> dict[str, int]:
        """Every sweep this run belongs to, with the time that sweep started."""
        return {self.sweep_id: self.start_time, **self.reused_by}

    @property
    def status(self) -> str:
        """The runner's status tag when the variant ended; without one, what MLflow knows: a run
        ended from outside (KILLED, FAILED) says so, only a RUNNING one is still going."""
        if "status" in self.tags:
            return self.tags["status"]
        return {"KILLED": "killed", "FAILED": "failed", "FINISHED": "ended without status"}.get(
            self.run_status, "running")

    @property
    def kind(self) -> str:
        return self.tags.get("kind", "variant")  # runs from before kinds existed are variants

    @property
    def sweep_id(self) -> str:
        return self.tags.get("sweep_id", LEGACY_SWEEP)

    @property
    def seed(self) -> Optional[int]:
        value = self.params.get("trainer.seed")
        if value is None:
            value = seed_override(self.name)
        return None if value is None else int(value)

    @property
    def variant_name(self) -> str:
        return short_name(without_seed(self.name))

    @property
    def date(self) -> str:
        if not self.start_time:
            return ""
        return dt.datetime.fromtimestamp(self.start_time / 1000, dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    def value(self, metric: str) -> Optional[float]:
        if metric == "peak_memory_gib":
            return peak_memory(self.metrics)[0]
        v = self.metrics.get(metric)
        return v if v is not None and math.isfinite(v) else None


# --------------------------------------------------------------------------- sweeps


@dataclass(frozen=True)
class SweepInfo:
    sweep_id: str
    start_time: int
    runs: int


def sweeps(records: list[RunRecord]) -> list[SweepInfo]:
    """The sweeps among the variant runs, oldest first (by their first run's start)."""
    starts: dict[str, list[int]] = {}
    for r in records:
        if r.kind == "variant":
            for sweep_id, start in r.sweep_starts().items():
                starts.setdefault(sweep_id, []).append(start)
    infos = [SweepInfo(k, min(v), len(v)) for k, v in starts.items()]
    return sorted(infos, key=lambda s: (s.start_time, s.sweep_id))


def select_runs(records: list[RunRecord], sweep: Optional[str] = None,
                all_sweeps: bool = False) -> tuple[list[RunRecord], list[str]]:
    """The variant runs of the latest sweep (or of `sweep`, or of all) -> (runs, sweep ids)."""
    infos = sweeps(records)
    if not infos:
        raise ReportError("no variant runs (tag kind=variant, or no kind tag) in this study yet")
    if all_sweeps:
        chosen = [s.sweep_id for s in infos]
    elif sweep is not None:
        if sweep not in {s.sweep_id for s in infos}:
            raise ReportError(f"--sweep {sweep!r} is not a sweep of this study; its sweeps: " + describe_sweeps(infos))
        chosen = [sweep]
    else:
        chosen = [infos[-1].sweep_id]
    runs = [r for r in records if r.kind == "variant" and set(r.sweep_starts()) & set(chosen)]
    return sorted(runs, key=lambda r: (r.start_time, r.name)), chosen


def describe_sweeps(infos: list[SweepInfo]) -> str:
    return "; ".join(f"{s.sweep_id} ({date_of(s.start_time)}, {s.runs} runs)" for s in infos)


def date_of(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC") if ms else "?"


# --------------------------------------------------------------------------- MLflow


@dataclass(frozen=True)
class SweepParent:
    """A sweep's parent run (kind=sweep): when it started, how many jobs it planned, whether it ended."""

    sweep_id: str
    start_time: int
    n_jobs: Optional[int]
    ended: bool  # the sweep recorded its outcome (n_ok) and was not stopped half way
    killed: bool = False  # the sweep's process was stopped (Ctrl-C, SIGTERM): its parent says so


@dataclass(frozen=True)
class Completeness:
    done: int  # jobs of the sweep that ended (any status), reused ones included
    planned: Optional[int]  # None: no parent run says (runs from before sweep parents)
    ended: bool
    killed: bool = False

    @property
    def complete(self) -> bool:
        return self.planned is None or (self.ended and self.done >= self.planned)

    def line(self, sweep_id: str) -> str:
        if self.planned is None:
            return f"Sweep {sweep_id}: {self.done} jobs done (jobs planned: not recorded)."
        if self.complete:
            return f"Complete sweep {sweep_id}: {self.done} of {self.planned} jobs done."
        why = (", the sweep was stopped" if self.killed else
               "" if self.ended else ", the sweep did not finish (interrupted or still going)")
        return (f"**Incomplete sweep {sweep_id}: {self.done} of {self.planned} jobs done{why}.** "
                "Its numbers are partial; the report of a complete sweep is not replaced.")


def completeness(runs: list[RunRecord], sweep_id: str, parents: dict[str, SweepParent]) -> Completeness:
    done = sum(1 for r in runs if r.status != "running" and sweep_id in r.sweep_starts())
    parent = parents.get(sweep_id)
    if parent is None:
        return Completeness(done, None, True)
    return Completeness(done, parent.n_jobs, parent.ended, parent.killed)


def read_study(client, study: str) -> tuple[list[RunRecord], dict[str, SweepParent]]:
    """read_runs, and the sweeps' parent runs by sweep id."""
    records = read_runs(client, study, None)
    experiment = client.get_experiment_by_name(study)
    parents = {}
    for run in client.search_runs([experiment.experiment_id], filter_string="tags.kind = 'sweep'", max_results=5000):
        tags = run.data.tags
        n_jobs = tags.get("n_jobs")
        killed = tags.get("status") == "killed" or run.info.status == "KILLED"
        parents[tags.get("sweep_id", "")] = SweepParent(tags.get("sweep_id", ""), run.info.start_time or 0,
                                                        int(n_jobs) if n_jobs and n_jobs.isdigit() else None,
                                                        "n_ok" in tags and not killed, killed)
    return records, parents


def read_runs(client, study: str, image_dir: Optional[Path]) -> list[RunRecord]:
    """Every run of the study's experiment except kind=report and kind=sweep, with loss
    histories; with image_dir, each run's evaluation images are downloaded there."""
    experiment = client.get_experiment_by_name(study)
    if experiment is None:
        names = sorted(e.name for e in client.search_experiments())
        raise ReportError(f"no study {study!r} in {client.tracking_uri}; studies there: {', '.join(names) or 'none'}")
    records, reused_by = [], {}
    for run in _all_runs(client, experiment.experiment_id):
        tags = dict(run.data.tags)
        if tags.get("kind") == "sweep":  # a sweep's parent: the finished runs it reused
            for key in tags:
                if key.startswith(REUSED_TAG):
                    reused_by.setdefault(key[len(REUSED_TAG):], {})[tags["sweep_id"]] = run.info.start_time or 0
        if tags.get("kind", "variant") != "variant":
            continue
        run_id = run.info.run_id
        history = client.get_metric_history(run_id, "train/loss")
        records.append(RunRecord(
            name=run.info.run_name or run_id, run_id=run_id, start_time=run.info.start_time or 0,
            tags=tags, metrics=dict(run.data.metrics), params=dict(run.data.params),
            loss_history=sorted((m.step, m.value) for m in history), run_status=run.info.status or "",
        ))
    if not records:
        raise ReportError(f"study {study!r} in {client.tracking_uri} has no variant runs yet")
    for r in records:
        r.reused_by = reused_by.get(r.run_id, {})
    return records


def download_images(client, record: RunRecord, image_dir: Path) -> None:
    """eval/scores.json and eval/images/*.png of one ok run, if it has them."""
    if record.status != "ok" or not any(f.path == "eval/scores.json" for f in client.list_artifacts(record.run_id, "eval")):
        return
    dst = image_dir / record.run_id
    dst.mkdir(parents=True, exist_ok=True)
    scores = json.loads(Path(client.download_artifacts(record.run_id, "eval/scores.json", str(dst))).read_text())
    folder = Path(client.download_artifacts(record.run_id, "eval/images", str(dst)))
    jobs = scores["images"]
    record.units = units_of(scores)
    record.images = RunImages(jobs, [folder / f"base_{j['index']}.png" for j in jobs],
                              [folder / f"lora_{j['index']}.png" for j in jobs])


def units_of(scores: dict) -> dict[str, list[float]]:
    """The per-sample values in an eval/scores.json (evaluate/scores.py)."""
    out = {}
    if (held := scores.get("heldout_losses")) and held.get("lora"):
        out["eval/heldout_loss"] = [float(x) for x in held["lora"]]
    for key in ("clip_style", "clip_text"):
        values = [job.get(key) for job in scores.get("images", [])]
        if values and all(isinstance(v, (int, float)) for v in values):
            out[f"eval/{key}"] = [float(v) for v in values]
    return out


def _all_runs(client, experiment_id: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], order_by=["attributes.start_time ASC"], page_token=token)
        runs += page
        token = page.token
        if not token:
            return runs

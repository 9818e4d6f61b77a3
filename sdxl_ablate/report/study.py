"""The study report: which variant, at what cost, how sure.

    python -m sdxl_ablate.report --study NAME [--sweep ID | --all-sweeps] [--score METRIC]
                                 [--tracking-uri URI] [--out DIR] [--no-log]

Reads the study's MLflow experiment: by default the latest sweep (runs tagged `kind=variant`,
or untagged runs from before sweeps had ids, which count as one sweep `legacy`); `--sweep ID`
picks another, `--all-sweeps` merges them. Runs that differ only in `trainer.seed` are one
variant: the report gives their mean and spread (sample standard deviation) and marks the
variants whose score is within noise of the best one's.

Writes into the output folder (default reports/<study>):

- `ablation.md`: the verdict (best variant, its lift over the base model, memory and speed,
  the Pareto set of score and memory, failed and no-effect variants and why), the table
  (rounded, named for people, with a base-model row) and the runs (ids, dates, seeds);
- `ablation.csv` (one row per variant: means, spreads, counts, run ids, full precision) and
  `runs.csv` (one row per run, every metric at full precision);
- `score_vs_memory.png`, `loss_curves.png`, and `grid_<n>_<prompt>.png`: one image grid per
  evaluation prompt, the base model once and one row per variant.

The same files are logged to a run named `report <sweep>` tagged `kind=report`, which is not
a variant: every reader here (and the documented MLflow filter `tags.kind = 'variant'`)
leaves it out. `--no-log` writes the files only.

`read_runs` does all the MLflow reading; everything from the run records on is pure, so
tests need no tracking server.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import math
import os
import re
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image

from sdxl_ablate.config.identity import AXES, grouping_key, seed_override, short_name, without_seed
from sdxl_ablate.evaluate.grid import render_grid
from sdxl_ablate.evaluate.headline import lift, peak_memory

LEGACY_SWEEP = "legacy"
REUSED_TAG = "reused."  # sweep.REUSED_TAG (not imported: the report needs no Hydra)


@dataclass(frozen=True)
class Score:
    metric: str
    label: str
    higher_is_better: bool
    base_metric: Optional[str]  # the same score of the base model, if evaluation measured it


SCORES = {
    s.metric: s for s in (
        Score("eval/clip_style", "CLIP style score", True, "eval/clip_style_base"),
        Score("eval/clip_text", "CLIP prompt score", True, "eval/clip_text_base"),
        Score("eval/heldout_loss", "held-out loss", False, "eval/heldout_loss_base"),
        Score("train/final_loss", "final training loss", False, None),
    )
}
DEFAULT_SCORES = ("eval/clip_style", "eval/heldout_loss", "train/final_loss")  # the first one measured
# How many standard errors of a difference count as noise (about a 95% interval).
NOISE_Z = 2.0


MEMORY_KINDS = {"cpu_rss": "CPU RSS", "cuda_reserved": "CUDA reserved"}


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

    def sweep_starts(self) -> dict[str, int]:
        """Every sweep this run belongs to, with the time that sweep started."""
        return {self.sweep_id: self.start_time, **self.reused_by}

    @property
    def status(self) -> str:
        # The runner sets the status tag when a variant ends; without one it is still going.
        return self.tags.get("status", "running")

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
    return "; ".join(f"{s.sweep_id} ({_date(s.start_time)}, {s.runs} runs)" for s in infos)


def _date(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC") if ms else "?"


# --------------------------------------------------------------------------- variants (pure)


@dataclass(frozen=True)
class Stat:
    mean: float
    std: Optional[float]  # sample standard deviation; None with fewer than 2 values
    n: int

    @staticmethod
    def of(values: list[float]) -> Optional["Stat"]:
        if not values:
            return None
        return Stat(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None, len(values))


def within_noise(a: Stat, b: Stat) -> Optional[bool]:
    """Whether two means differ by no more than NOISE_Z standard errors of their difference;
    None when either has a single value (no spread, no estimate of the noise)."""
    if a.std is None or b.std is None:
        return None
    se = math.sqrt(a.std ** 2 / a.n + b.std ** 2 / b.n)
    return abs(a.mean - b.mean) <= NOISE_Z * se


@dataclass
class Variant:
    """The runs of one configuration, one per training seed."""

    name: str
    runs: list[RunRecord]

    @property
    def ok_runs(self) -> list[RunRecord]:
        return [r for r in self.runs if r.status == "ok"]

    @property
    def ok(self) -> bool:
        return bool(self.ok_runs)

    @property
    def seeds(self) -> list[Optional[int]]:
        return [r.seed for r in self.runs]

    def stat(self, metric: str) -> Optional[Stat]:
        return Stat.of([v for r in self.ok_runs if (v := r.value(metric)) is not None])

    def tag(self, key: str) -> Optional[str]:
        values = {r.tags.get(key) for r in self.runs}
        return values.pop() if len(values) == 1 else None

    @property
    def failures(self) -> list[RunRecord]:
        return [r for r in self.runs if r.status != "ok"]

    @property
    def no_effect(self) -> list[RunRecord]:
        return [r for r in self.ok_runs if r.tags.get("no_effect") == "true"]

    @property
    def eval_failed(self) -> list[RunRecord]:
        return [r for r in self.ok_runs if r.tags.get("eval_status") == "failed"]

    @property
    def memory_kind(self) -> str:
        kinds = {peak_memory(r.metrics)[1] for r in self.ok_runs} - {""}
        return "/".join(sorted(kinds))

    def representative(self) -> Optional[RunRecord]:
        """The run whose images stand for the variant: the lowest seed among the ok runs."""
        ok = [r for r in self.ok_runs if r.images is not None]
        return min(ok, key=lambda r: (r.seed if r.seed is not None else 0, r.start_time)) if ok else None


def variant_key(r: RunRecord) -> tuple:
    """What makes a variant: identity's grouping key of its params (its name where a run logged
    no params)."""
    if not r.params:
        return (r.variant_name,)
    return grouping_key(r.params)


def group_variants(runs: list[RunRecord]) -> list[Variant]:
    groups: dict[tuple, list[RunRecord]] = {}
    for r in runs:
        groups.setdefault(variant_key(r), []).append(r)
    variants = [Variant(rs[0].variant_name, sorted(rs, key=lambda r: (r.seed or 0, r.start_time)))
                for rs in groups.values()]
    # Two configurations under one name (merged sweeps that changed something else): say which sweep.
    names = [v.name for v in variants]
    for v in variants:
        if names.count(v.name) > 1:
            v.name = f"{v.name} ({','.join(sorted({r.sweep_id for r in v.runs}))})"
    return variants


def choose_score(variants: list[Variant], metric: Optional[str]) -> Score:
    measured = {m for v in variants for r in v.ok_runs for m in r.metrics}
    if metric is not None:
        if metric not in SCORES:
            raise ReportError(f"--score {metric!r} is not a score; choose one of: {', '.join(SCORES)}")
        if metric not in measured:
            raise ReportError(f"--score {metric}: no finished run measured it; measured scores: "
                              f"{', '.join(m for m in SCORES if m in measured) or 'none'}")
        return SCORES[metric]
    for m in DEFAULT_SCORES:
        if m in measured:
            return SCORES[m]
    raise ReportError("no finished variant has a score (eval/clip_style, eval/heldout_loss or train/final_loss)")


def better(score: Score, a: float, b: float) -> bool:
    return a > b if score.higher_is_better else a < b


def pareto_set(points: dict[str, tuple[float, float]], score: Score) -> list[str]:
    """The names not dominated on (score, memory): no other point is at least as good on both
    and better on one."""
    front = []
    for name, (s, m) in points.items():
        dominated = any((better(score, s2, s) or s2 == s) and m2 <= m and (better(score, s2, s) or m2 < m)
                        for other, (s2, m2) in points.items() if other != name)
        if not dominated:
            front.append(name)
    return sorted(front, key=lambda n: points[n][1])


@dataclass
class Analysis:
    """Everything the verdict, the table and the plots say, computed once."""

    score: Score
    variants: list[Variant]  # ranked: ok variants by score (best first), then the rest
    base: dict[str, Stat]  # the base model's numbers, from the runs' evaluation
    best: Optional[Variant]
    close_to_best: list[Variant]  # within noise of the best
    noise_known: bool  # whether the best and others had >= 2 seeds
    pareto: list[str]
    axes_that_vary: list[str]


def analyse(runs: list[RunRecord], metric: Optional[str] = None) -> Analysis:
    variants = group_variants(runs)
    score = choose_score(variants, metric)
    scored = [v for v in variants if v.ok and v.stat(score.metric) is not None]
    scored.sort(key=lambda v: (-v.stat(score.metric).mean if score.higher_is_better else v.stat(score.metric).mean,
                               v.name))
    rest = sorted((v for v in variants if v not in scored), key=lambda v: (v.ok, v.name), reverse=False)
    ranked = scored + sorted(rest, key=lambda v: (not v.ok, v.name))
    best = scored[0] if scored else None
    close, noise_known = [], False
    if best is not None:
        b = best.stat(score.metric)
        for v in scored[1:]:
            verdict = within_noise(b, v.stat(score.metric))
            noise_known = noise_known or verdict is not None
            if verdict:
                close.append(v)
    base = {}
    for m in ("eval/clip_style_base", "eval/clip_text_base", "eval/heldout_loss_base"):
        stat = Stat.of([val for v in variants for r in v.ok_runs if (val := r.value(m)) is not None])
        if stat is not None:
            base[m] = stat
    points = {v.name: (v.stat(score.metric).mean, v.stat("peak_memory_gib").mean)
              for v in scored if v.stat("peak_memory_gib") is not None}
    axes_vary = [a for a in AXES if len({r.tags.get(a) for v in variants for r in v.runs}) > 1]
    return Analysis(score, ranked, base, best, close, noise_known, pareto_set(points, score) if points else [],
                    axes_vary)


# --------------------------------------------------------------------------- text (pure)


def fmt(x: Optional[float], digits: int = 4, sign: bool = False) -> str:
    if x is None or not math.isfinite(x):
        return ""
    if round(x, digits) == 0:
        x = 0.0  # no "-0.0000"
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def fmt_stat(s: Optional[Stat], digits: int = 4) -> str:
    if s is None:
        return ""
    return fmt(s.mean, digits) + (f" ± {s.std:.{digits}f}" if s.std is not None else "")


def variant_lift(a: Analysis, v: Variant) -> Optional[float]:
    """The variant's mean score against the base model's (evaluate/headline.py's `lift`)."""
    s = v.stat(a.score.metric)
    if s is None or a.score.base_metric != f"{a.score.metric}_base" or a.score.base_metric not in a.base:
        return None
    return lift({a.score.metric: s.mean, a.score.base_metric: a.base[a.score.base_metric].mean}, a.score.metric)


def why_failed(r: RunRecord) -> str:
    error = r.tags.get("error", "").strip().splitlines()
    return f"{r.status}" + (f": {error[0][:160]}" if error else "")


def notes(a: Analysis, v: Variant) -> list[str]:
    out = []
    if v is a.best:
        out.append("best")
    if v in a.close_to_best:
        out.append("within noise of best")
    if v.name in a.pareto:
        out.append("Pareto")
    for r in v.no_effect:
        out.append("no effect" + (f" (seed {r.seed})" if len(v.runs) > 1 else ""))
    for r in v.eval_failed:
        out.append("not evaluated" + (f" (seed {r.seed})" if len(v.runs) > 1 else ""))
    for r in v.failures:
        out.append(r.status + (f" (seed {r.seed})" if len(v.runs) > 1 else ""))
    return out


def differs(a: Analysis, v: Variant) -> str:
    """The axes that vary across the study, as this variant sets them."""
    short = {"lora.targets": "targets", "lora.text_encoder": "te", "lora.use_dora": "dora",
             "lora.dropout": "dropout", "trainer.precision": "precision", "trainer.optimizer": "optim",
             "data.resolution": "px"}
    return ", ".join(f"{short[x]}={v.tag(x)}" for x in a.axes_that_vary if v.tag(x) is not None)


TABLE_HEADER = ["Variant", "What differs", "Seeds", "{score}", "Lift vs base", "Prompt score (CLIP)",
                "Held-out loss", "Train loss", "Peak memory, GiB", "Images/s", "LoRA params", "Notes", "Runs"]


def table_rows(a: Analysis) -> list[list[str]]:
    """The people's table: the base model first, then the variants in rank order."""
    rows = []
    if a.base:
        def mean(m: Optional[str]) -> str:  # the same model, prompts and seeds in every run: no spread
            return fmt(a.base[m].mean) if m in a.base else ""

        rows.append(["base model", "no LoRA", "", mean(a.score.base_metric), "",
                     mean("eval/clip_text_base"), mean("eval/heldout_loss_base"),
                     "", "", "", "", "same for every variant", ""])
    for v in a.variants:
        stat = v.stat
        params = stat("params/trainable")
        seeds = [s for s in v.seeds if s is not None]
        rows.append([
            v.name, differs(a, v), ",".join(map(str, seeds)) if seeds else str(len(v.runs)),
            fmt_stat(stat(a.score.metric)) if a.score.metric != "eval/clip_text" else fmt_stat(stat(a.score.metric)),
            fmt(variant_lift(a, v), sign=True),
            fmt_stat(stat("eval/clip_text")), fmt_stat(stat("eval/heldout_loss")), fmt_stat(stat("train/final_loss")),
            fmt_stat(stat("peak_memory_gib"), 2), fmt_stat(stat("perf/images_per_s"), 2),
            f"{params.mean:,.0f}" if params else "", "; ".join(notes(a, v)),
            " ".join(r.run_id[:8] for r in v.runs),
        ])
    return rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    numeric = {i for i, h in enumerate(header) if h not in ("Variant", "What differs", "Notes", "Runs", "Seeds")}
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---:" if i in numeric else "---" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def verdict(a: Analysis) -> list[str]:
    sc = a.score
    direction = "higher is better" if sc.higher_is_better else "lower is better"
    lines = []
    if a.best is None:
        lines.append(f"- No variant finished with a {sc.label}.")
    else:
        b = a.best
        s = b.stat(sc.metric)
        base = a.base.get(sc.base_metric) if sc.base_metric else None
        text = f"- **Best on {sc.label} ({direction}): {b.name}**, {fmt_stat(s)}"
        text += f" over {s.n} seeds" if s.n > 1 else ""
        if base is not None:
            text += f"; {fmt(s.mean - base.mean, sign=True)} over the base model ({fmt(base.mean)})"
        mem, speed = b.stat("peak_memory_gib"), b.stat("perf/images_per_s")
        if mem is not None:
            text += f"; peak memory {fmt_stat(mem, 2)} GiB ({MEMORY_KINDS.get(b.memory_kind, b.memory_kind)})"
        if speed is not None:
            text += f", {fmt_stat(speed, 2)} images/s"
        lines.append(text + ".")
        if a.close_to_best:
            lines.append("- Within noise of the best (difference < "
                         f"{NOISE_Z:g} standard errors across seeds): " + ", ".join(v.name for v in a.close_to_best)
                         + ". The data do not separate these from the best.")
        elif a.noise_known:
            lines.append(f"- Every other variant is worse than the best by more than {NOISE_Z:g} standard errors "
                         "across seeds.")
        else:
            lines.append("- One seed per variant: no noise estimate, so differences may be noise. Run the sweep "
                         "with several seeds (`trainer.seed=0,1,2`, see sweeps/naruto_study.yaml) to know.")
        if a.pareto:
            lines.append(f"- Best on both {sc.label} and peak memory (Pareto set): " + ", ".join(a.pareto) + ".")
    for v in a.variants:
        for r in v.no_effect:
            reason = r.tags.get("no_effect_reason", "the LoRA changed nothing measurable")
            lines.append(f"- No effect: {v.name}" + (f" (seed {r.seed})" if len(v.runs) > 1 else "") + f": {reason}.")
        for r in v.eval_failed:
            reason = r.tags.get("eval_error", "").strip().splitlines()
            lines.append(f"- Trained but not evaluated: {v.name}" + (f" (seed {r.seed})" if len(v.runs) > 1 else "")
                         + (f": {reason[0][:160]}" if reason else "") + ".")
        for r in v.failures:
            lines.append(f"- Failed: {v.name}" + (f" (seed {r.seed})" if len(v.runs) > 1 else "")
                         + f": {why_failed(r)} (run {r.run_id[:8]}).")
    return lines


def runs_table(runs: list[RunRecord]) -> str:
    header = ["Run id", "Started", "Variant", "Seed", "Status", "Eval", "Sweep"]
    rows = [[r.run_id, r.date, r.variant_name, "" if r.seed is None else str(r.seed), r.status,
             r.tags.get("eval_status", ""), r.sweep_id] for r in runs]
    return markdown_table(header, rows)


def render_markdown(study: str, a: Analysis, runs: list[RunRecord], sweep_ids: list[str], uri: str,
                    grids: list[str]) -> str:
    first = min((r.start_time for r in runs if r.start_time), default=0)
    n_seeds = sorted({len(v.runs) for v in a.variants})
    seeds = f"{n_seeds[0]} seed{'s' if n_seeds[0] > 1 else ''} each" if len(n_seeds) == 1 else "seeds vary"
    which = f"sweep {sweep_ids[0]}" if len(sweep_ids) == 1 else f"{len(sweep_ids)} sweeps merged ({', '.join(sweep_ids)})"
    kinds = sorted({v.memory_kind for v in a.variants if v.memory_kind})
    memory_note = {"cpu_rss": "peak resident set size of the process (CPU)",
                   "cuda_reserved": "peak reserved by the CUDA caching allocator"}
    header = [h.format(score=a.score.label[0].upper() + a.score.label[1:]) for h in TABLE_HEADER]
    parts = [
        f"# Ablation report: study `{study}`",
        "",
        f"{which}, started {_date(first)}: {len(a.variants)} variants, {len(runs)} runs, {seeds}. "
        f"Runs: MLflow experiment `{study}` at `{uri}`.",
        "",
        "## Verdict",
        "",
        *verdict(a),
        "",
        f"## Variants, ranked by {a.score.label} (`{a.score.metric}`)",
        "",
        markdown_table(header, table_rows(a)),
        "Mean ± sample standard deviation across seeds where a variant ran with several. "
        f"Lift = the variant's {a.score.label} minus the base model's on the same prompts and seeds. "
        "Peak memory: " + "; ".join(memory_note.get(k, k) for k in kinds) + ". "
        "Pareto: no other variant is at least as good on both the score and the peak memory. "
        "Full precision and run ids: ablation.csv and runs.csv.",
        "",
        "## Plots",
        "",
        "![score vs memory](score_vs_memory.png)",
        "",
        "![training loss](loss_curves.png)",
        "",
        *[f"![{g}]({g})\n" for g in grids],
        "## Runs",
        "",
        runs_table(runs),
    ]
    return "\n".join(parts)


# --------------------------------------------------------------------------- CSV (pure)


CSV_METRICS = ("eval/clip_style", "eval/clip_text", "eval/clip_style_lift", "eval/clip_text_lift",
               "eval/heldout_loss", "eval/heldout_loss_base", "eval/clip_style_base", "eval/clip_text_base",
               "train/final_loss", "peak_memory_gib", "perf/images_per_s", "perf/step_time_s", "params/trainable")


def write_variants_csv(a: Analysis, path: Path) -> None:
    fields = ["variant", "rank", *AXES, "seeds", "runs_ok", "runs", "notes", "memory_kind"]
    for m in CSV_METRICS:
        fields += [f"{m} mean", f"{m} std", f"{m} n"]
    fields += ["run_ids", "sweep_ids"]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for rank, v in enumerate(a.variants, 1):
            row: dict[str, Any] = {"variant": v.name, "rank": rank, **{x: v.tag(x) or "" for x in AXES},
                                   "seeds": " ".join("" if s is None else str(s) for s in v.seeds),
                                   "runs_ok": len(v.ok_runs), "runs": len(v.runs), "notes": "; ".join(notes(a, v)),
                                   "memory_kind": v.memory_kind,
                                   "run_ids": " ".join(r.run_id for r in v.runs),
                                   "sweep_ids": " ".join(sorted({r.sweep_id for r in v.runs}))}
            for m in CSV_METRICS:
                s = v.stat(m)
                row.update({f"{m} mean": repr(s.mean) if s else "", f"{m} std": repr(s.std) if s and s.std is not None
                            else "", f"{m} n": s.n if s else 0})
            w.writerow(row)


def write_runs_csv(runs: list[RunRecord], path: Path) -> None:
    metrics = sorted({m for r in runs for m in r.metrics})
    fields = ["run_id", "run_name", "variant", "seed", "sweep_id", "started", "status", "eval_status",
              "no_effect", "error", *AXES, *metrics]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in runs:
            w.writerow({"run_id": r.run_id, "run_name": r.name, "variant": r.variant_name,
                        "seed": "" if r.seed is None else r.seed, "sweep_id": r.sweep_id, "started": r.date,
                        "status": r.status, "eval_status": r.tags.get("eval_status", ""),
                        "no_effect": r.tags.get("no_effect", ""), "error": r.tags.get("error", ""),
                        **{x: r.tags.get(x, "") for x in AXES}, **{m: repr(r.metrics[m]) for m in r.metrics}})


# --------------------------------------------------------------------------- plots (pure)


def _colours(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def plot_score_vs_memory(a: Analysis, path: Path) -> None:
    """Score against peak memory, one point per variant with error bars across seeds, the
    Pareto front as a step line, the base model's score as a dashed line."""
    fig = Figure(figsize=(8, 5.5), layout="constrained")
    ax = fig.subplots()
    shown = [v for v in a.variants if v.stat(a.score.metric) and v.stat("peak_memory_gib")]
    for v, colour in zip(shown, _colours(len(shown))):
        s, m = v.stat(a.score.metric), v.stat("peak_memory_gib")
        ax.errorbar(m.mean, s.mean, xerr=m.std or 0, yerr=s.std or 0, fmt="o", color=colour, capsize=4,
                    markersize=8 if v.name in a.pareto else 6, label=f"{v.name} (n={s.n})")
        ax.annotate(v.name, (m.mean, s.mean), textcoords="offset points", xytext=(6, 6), fontsize=8)
    front = [(v.stat("peak_memory_gib").mean, v.stat(a.score.metric).mean) for v in shown if v.name in a.pareto]
    if len(front) > 1:
        xs, ys = zip(*sorted(front))
        ax.step(xs, ys, where="post", color="black", linewidth=1, alpha=0.6, label="Pareto front")
    elif front:
        ax.scatter(*zip(*front), s=200, facecolors="none", edgecolors="black", label="Pareto front")
    base = a.base.get(a.score.base_metric) if a.score.base_metric else None
    if base is not None:
        ax.axhline(base.mean, linestyle="--", color="grey", label=f"base model ({fmt(base.mean)})")
    if not shown:
        ax.text(0.5, 0.5, "no variant has both a score and a peak memory", ha="center", transform=ax.transAxes)
    kinds = sorted({v.memory_kind for v in shown})
    ax.set_xlabel("peak memory, GiB (" + ", ".join(MEMORY_KINDS.get(k, k) for k in kinds) + ")")
    ax.set_ylabel(f"{a.score.label} ({'higher' if a.score.higher_is_better else 'lower'} is better)")
    ax.set_title(f"{a.score.label} vs peak memory (error bars: ±1 std across seeds)")
    ax.grid(alpha=0.3)
    if shown:
        ax.legend(fontsize=8, loc="best")
    fig.savefig(path, dpi=120)


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (the first points average what there is so far)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_loss_curves(a: Analysis, path: Path) -> None:
    """train/loss per variant, one colour each: the mean over seeds (moving average), and the
    band between the lowest and highest seed."""
    fig = Figure(figsize=(9, 5.5), layout="constrained")
    ax = fig.subplots()
    curves = [v for v in a.variants if any(r.loss_history for r in v.ok_runs)]
    longest = max((len(r.loss_history) for v in curves for r in v.ok_runs), default=0)
    window = max(1, longest // 15)
    for v, colour in zip(curves, _colours(len(curves))):
        per_seed = [dict(zip(*zip(*r.loss_history))) for r in v.ok_runs if r.loss_history]
        steps = sorted(set.intersection(*(set(c) for c in per_seed)))
        smoothed = [smooth([c[s] for s in steps], window) for c in per_seed]
        mean = [statistics.fmean(vals) for vals in zip(*smoothed)]
        ax.plot(steps, mean, color=colour, linewidth=1.6, label=f"{v.name} (n={len(per_seed)})")
        if len(per_seed) > 1:
            ax.fill_between(steps, [min(x) for x in zip(*smoothed)], [max(x) for x in zip(*smoothed)],
                            color=colour, alpha=0.2, linewidth=0)
    ax.set_xlabel("optimizer step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("train/loss")
    ax.set_title(f"training loss, moving average over {window} step{'s' if window > 1 else ''}"
                 "; band: lowest to highest seed")
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize=8, ncol=2)
    fig.savefig(path, dpi=120)


MIN_TILE = 256


def prompt_grid(prompt: str, seeds: list[int], rows: list[tuple[str, list[Image.Image], list[str]]]) -> Image.Image:
    """One prompt: a column per evaluation seed, a row per model (label, images, captions);
    small tiles are shown enlarged (evaluate/grid.py), and the title says so."""
    w, h = rows[0][1][0].size
    factor = max(1, math.ceil(MIN_TILE / max(w, h)))
    note = "columns: evaluation seed" + (f"; {w}x{h} px images shown {factor}x larger (nearest neighbour)"
                                         if factor > 1 else "")
    return render_grid([(label, images) for label, images, _ in rows], [f"seed {s}" for s in seeds],
                       captions=[caps for _, _, caps in rows], title=[f'"{prompt}"', note], min_tile=MIN_TILE)


def prompt_grids(a: Analysis) -> list[tuple[str, Image.Image]]:
    """(file name, image) per evaluation prompt: the base model once, then one row per
    evaluated variant (its lowest-seed run), in rank order."""
    shown = [(v, r) for v in a.variants if (r := v.representative()) is not None]
    if not shown:
        return []
    base_run = shown[0][1]
    prompts = list(dict.fromkeys(job["prompt"] for job in base_run.images.jobs))
    grids = []
    for n, prompt in enumerate(prompts, 1):
        rows = []
        idx = [j["index"] for j in base_run.images.jobs if j["prompt"] == prompt]
        seeds = [j["seed"] for j in base_run.images.jobs if j["prompt"] == prompt]

        def caption(job: dict, suffix: str) -> str:
            v = job.get(f"clip_style{suffix}")
            return "" if v is None else f"style {v:.3f}"

        jobs = {j["index"]: j for j in base_run.images.jobs}
        rows.append(("base model", [Image.open(base_run.images.base[i]) for i in idx],
                     [caption(jobs[i], "_base") for i in idx]))
        for v, r in shown:
            by_key = {(j["prompt"], j["seed"]): j for j in r.images.jobs}
            mine = [by_key.get((prompt, s)) for s in seeds]
            if any(j is None for j in mine):
                continue  # evaluated with other prompts or seeds: not comparable in this grid
            seed = f"trainer.seed={r.seed}" if r.seed is not None else ""
            rows.append((f"{v.name}\n{seed}", [Image.open(r.images.lora[j["index"]]) for j in mine],
                         [caption(j, "") for j in mine]))
        slug = re.sub(r"[^a-z0-9]+", "_", prompt.lower()).strip("_")[:40]
        grids.append((f"grid_{n}_{slug}.png", prompt_grid(prompt, seeds, rows)))
    return grids


# --------------------------------------------------------------------------- MLflow


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
            loss_history=sorted((m.step, m.value) for m in history),
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
    record.images = RunImages(jobs, [folder / f"base_{j['index']}.png" for j in jobs],
                              [folder / f"lora_{j['index']}.png" for j in jobs])


def _all_runs(client, experiment_id: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], order_by=["attributes.start_time ASC"], page_token=token)
        runs += page
        token = page.token
        if not token:
            return runs


# --------------------------------------------------------------------------- main


FIXED_OUTPUTS = ("ablation.md", "ablation.csv", "runs.csv", "score_vs_memory.png", "loss_curves.png")


def write_report(study: str, runs: list[RunRecord], sweep_ids: list[str], out: Path, uri: str,
                 score: Optional[str] = None) -> tuple[str, list[Path]]:
    """Writes the report files into `out`; returns (the markdown, the files written)."""
    out.mkdir(parents=True, exist_ok=True)
    for old in [*FIXED_OUTPUTS, *(p.name for p in out.glob("grid_*.png"))]:  # no stale file passes for new
        (out / old).unlink(missing_ok=True)
    a = analyse(runs, score)
    write_variants_csv(a, out / "ablation.csv")
    write_runs_csv(runs, out / "runs.csv")
    plot_score_vs_memory(a, out / "score_vs_memory.png")
    plot_loss_curves(a, out / "loss_curves.png")
    grids = prompt_grids(a)
    for name, image in grids:
        image.save(out / name)
    text = render_markdown(study, a, runs, sweep_ids, uri, [name for name, _ in grids])
    (out / "ablation.md").write_text(text)
    return text, [out / n for n in FIXED_OUTPUTS] + [out / n for n, _ in grids]


def log_report(uri: str, study: str, files: list[Path], sweep_ids: list[str], params: dict[str, Any]) -> str:
    """A run `report <sweep>` tagged kind=report (not a variant) with the report's files."""
    from sdxl_ablate.config import TrackingConfig
    from sdxl_ablate.track.tracker import Tracker

    name = "report " + (sweep_ids[0] if len(sweep_ids) == 1 else "all sweeps")
    tags = {"kind": "report", "sweep_id": ",".join(sweep_ids)}
    with Tracker(TrackingConfig(uri=uri), study, name, tags=tags) as tracker:
        tracker.log_params(params)
        for path in files:
            tracker.log_artifact(path)
        tracker.set_status("ok")
    return tracker.run_id


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sdxl_ablate.report", description=__doc__.split("\n")[0])
    p.add_argument("--study", required=True, help="the study name (its MLflow experiment)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--sweep", default=None, help="the sweep id to report (default: the latest sweep)")
    which.add_argument("--all-sweeps", action="store_true", help="merge every sweep of the study")
    p.add_argument("--score", default=None,
                   help=f"the score that ranks variants, one of {', '.join(SCORES)} (default: the first measured of "
                        f"{', '.join(DEFAULT_SCORES)})")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: sqlite:///<cwd>/mlflow.db)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: reports/<study>)")
    p.add_argument("--no-log", action="store_true", help="write the files only, log no report run to MLflow")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    from mlflow.tracking import MlflowClient

    from sdxl_ablate.config import TrackingConfig
    from sdxl_ablate.track.tracker import resolve_uri

    # MLflow's own switch: no progress bar for each of the many small downloads below.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    args = parse_args(argv)
    uri = args.tracking_uri or resolve_uri(TrackingConfig())
    out = args.out or Path("reports") / args.study
    client = MlflowClient(tracking_uri=uri)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            runs, sweep_ids = select_runs(read_runs(client, args.study, None), args.sweep, args.all_sweeps)
            for r in runs:
                download_images(client, r, Path(tmp))
            text, files = write_report(args.study, runs, sweep_ids, out, uri, args.score)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not args.no_log:
        log_report(uri, args.study, files, sweep_ids, {"score": args.score or "default", "sweeps": ",".join(sweep_ids),
                                                       "runs": len(runs)})
    print(text.split("## Plots")[0].rstrip())
    print(f"\nReport: {(out / 'ablation.md').resolve()} (plots and image grids beside it)\n"
          f"Runs: MLflow experiment '{args.study}' at {uri} (make mlflow-ui to browse)")
    return 0

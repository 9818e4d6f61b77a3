"""From run records to variants: repeats of a variant grouped by seed, their mean and spread,
the score a study is ranked by, what is within noise, and the Pareto set of score and memory.
Pure: no MLflow."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Optional


from sdxl_ablate.config.identity import AXES, grouping_key
from sdxl_ablate.evaluate.headline import peak_memory
from sdxl_ablate.report.runs import ReportError, RunRecord


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

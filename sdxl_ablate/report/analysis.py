"""From run records to variants: repeats of a variant grouped by seed, their mean and spread,
the score a study is ranked by, what is within noise, and the Pareto set of score and memory.
Pure: no MLflow."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, replace
from typing import Callable, Optional


from sdxl_ablate.config.identity import AXES, grouping_key
from sdxl_ablate.evaluate.headline import RANDOM_CLIP_LABEL, peak_memory
from sdxl_ablate.report.runs import ReportError, RunRecord


@dataclass(frozen=True)
class Score:
    metric: str
    label: str
    higher_is_better: bool
    base_metric: Optional[str]  # the same score of the base model, if evaluation measured it
    se_metric: Optional[str] = None  # the run's own standard error of the score (evaluation's noise)
    lift_se_metric: Optional[str] = None  # the paired standard error of (score - base score)
    random_clip: bool = False  # scored by eval=tiny's random CLIP: a smoke test, never a ranking

    @property
    def is_clip(self) -> bool:
        return self.metric.startswith("eval/clip_")

    @property
    def title(self) -> str:
        """The label with its validity: every CLIP score of a random scorer says so."""
        return f"{self.label} ({RANDOM_CLIP_LABEL})" if self.random_clip else self.label


SCORES = {
    s.metric: s for s in (
        Score("eval/clip_style", "CLIP style score", True, "eval/clip_style_base", "eval/clip_style_se",
              "eval/clip_style_lift_se"),
        Score("eval/clip_text", "CLIP prompt score", True, "eval/clip_text_base", "eval/clip_text_se",
              "eval/clip_text_lift_se"),
        Score("eval/heldout_loss", "held-out loss", False, "eval/heldout_loss_base", "eval/heldout_loss_se",
              "eval/heldout_loss_delta_se"),
        Score("train/final_loss", "final training loss", False, None),
    )
}
DEFAULT_SCORES = ("eval/clip_style", "eval/heldout_loss", "train/final_loss")  # the first one measured
# How many standard errors of a difference count as noise (about a 95% interval).
NOISE_Z = 2.0


MEMORY_KINDS = {"cpu_rss": "CPU RSS", "cuda_reserved": "CUDA reserved"}
# Differences in peak memory below these are not measured differences: a CPU process's RSS moves
# by tens of MiB with allocator arenas, thread stacks and lazily mapped libraries; CUDA's caching
# allocator reserves in segments (2 MiB small, 20 MiB+ large blocks), so reserved memory moves in
# steps of that size. Two peaks closer than the floor (or than 2 SE across seeds) are a tie.
MEMORY_NOISE_GIB = {"cpu_rss": 0.125, "cuda_reserved": 0.0625}


def memory_floor(kind: str) -> float:
    return max((MEMORY_NOISE_GIB.get(k, 0.125) for k in kind.split("/") if k), default=0.125)


def random_clip(runs: list[RunRecord]) -> bool:
    """Whether any run's CLIP scores come from eval=tiny's random CLIP (tag or param says so)."""
    return any(r.tags.get("clip_scorer") == RANDOM_CLIP_LABEL or r.params.get("eval.clip_model") == "tiny"
               for r in runs)


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

    def eval_se(self, se_metric: Optional[str]) -> Optional[float]:
        """The evaluation's own standard error of the variant's mean score: each run's logged SE,
        combined over its seeds (root mean square / sqrt(n)); None where no run logged one."""
        ses = [v for r in self.ok_runs if se_metric and (v := r.value(se_metric)) is not None]
        return math.sqrt(statistics.fmean(x * x for x in ses) / len(ses)) if ses else None

    def se(self, score: "Score") -> Optional[float]:
        """Standard error of the variant's mean score: the larger of the spread across seeds
        (std / sqrt(n), with >= 2 seeds) and the evaluation's own; None when neither is known."""
        s = self.stat(score.metric)
        known = [x for x in (s.std / math.sqrt(s.n) if s and s.std is not None else None,
                             self.eval_se(score.se_metric)) if x is not None]
        return max(known) if known else None

    def lift(self, score: "Score") -> Optional[tuple[float, Optional[float]]]:
        """(mean of score - base score over the seeds, its standard error): paired within each run
        (the same prompts, seeds, images and noise), and across seeds where there are several."""
        if score.base_metric is None:
            return None
        lifts = [a - b for r in self.ok_runs
                 if (a := r.value(score.metric)) is not None and (b := r.value(score.base_metric)) is not None]
        if not lifts:
            return None
        s = Stat.of(lifts)
        known = [x for x in (s.std / math.sqrt(s.n) if s.std is not None else None,
                             self.eval_se(score.lift_se_metric)) if x is not None]
        return s.mean, (max(known) if known else None)

    def units(self, metric: str) -> Optional[list[float]]:
        """The per-sample values behind a single run's score (held-out pairs, images), for pairing."""
        ok = self.ok_runs
        return ok[0].units.get(metric) if len(ok) == 1 else None

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
    """The score that ranks: `metric`, or the first measured of DEFAULT_SCORES. A random CLIP's
    scores (eval=tiny) never rank by default; asked for by name they are labelled a smoke test."""
    measured = {m for v in variants for r in v.ok_runs for m in r.metrics}
    rnd = random_clip([r for v in variants for r in v.ok_runs])
    if metric is not None:
        if metric not in SCORES:
            raise ReportError(f"--score {metric!r} is not a score; choose one of: {', '.join(SCORES)}")
        if metric not in measured:
            raise ReportError(f"--score {metric}: no finished run measured it; measured scores: "
                              f"{', '.join(m for m in SCORES if m in measured) or 'none'}")
        return replace(SCORES[metric], random_clip=rnd and SCORES[metric].is_clip)
    for m in DEFAULT_SCORES:
        if m in measured and not (rnd and SCORES[m].is_clip):
            return SCORES[m]
    for m in DEFAULT_SCORES:  # only random CLIP scores were measured: rank by them, labelled
        if m in measured:
            return replace(SCORES[m], random_clip=True)
    raise ReportError("no finished variant has a score (eval/clip_style, eval/heldout_loss or train/final_loss)")


def better(score: Score, a: float, b: float) -> bool:
    return a > b if score.higher_is_better else a < b


def difference_se(score: Score, a: Variant, b: Variant) -> Optional[float]:
    """Standard error of the difference of two variants' mean scores: the larger of the spread
    across seeds and the evaluation's own noise. Single runs scored on the same samples (the
    held-out pairs, the images of the same prompts and seeds) are paired sample by sample;
    otherwise their own standard errors add in quadrature."""
    m = score.metric
    sa, sb = a.stat(m), b.stat(m)
    known = []
    if sa and sb and sa.std is not None and sb.std is not None:
        known.append(math.sqrt(sa.std ** 2 / sa.n + sb.std ** 2 / sb.n))
    ua, ub = a.units(m), b.units(m)
    if ua and ub and len(ua) == len(ub) > 1:
        known.append(statistics.stdev([x - y for x, y in zip(ua, ub)]) / math.sqrt(len(ua)))
    elif (ea := a.eval_se(score.se_metric)) is not None and (eb := b.eval_se(score.se_metric)) is not None:
        known.append(math.sqrt(ea ** 2 + eb ** 2))
    return max(known) if known else None


def separated(score: Score, a: Variant, b: Variant) -> Optional[bool]:
    """Whether two variants' scores differ by more than NOISE_Z standard errors; None: unknown."""
    se = difference_se(score, a, b)
    if se is None:
        return None
    return abs(a.stat(score.metric).mean - b.stat(score.metric).mean) > NOISE_Z * se


def pareto_set(points: dict[str, tuple[float, float]], score: Score,
               score_tie: Callable[[str, str], bool] = lambda a, b: False, memory_floor: float = 0.0) -> list[str]:
    """The names not dominated on (score, memory): no other point is at least as good on both
    and better on one. Differences within the noise are ties: `score_tie(a, b)` for the score,
    `memory_floor` (GiB) for the memory."""
    def score_better(a, b):  # a's score beats b's beyond noise
        return better(score, points[a][0], points[b][0]) and not score_tie(a, b)

    def score_even(a, b):
        return points[a][0] == points[b][0] or score_tie(a, b)

    def mem_better(a, b):
        return points[a][1] < points[b][1] - memory_floor

    def mem_even(a, b):
        return abs(points[a][1] - points[b][1]) <= memory_floor

    front = []
    for name in points:
        dominated = any((score_better(o, name) or score_even(o, name)) and (mem_better(o, name) or mem_even(o, name))
                        and (score_better(o, name) or mem_better(o, name)) for o in points if o != name)
        if not dominated:
            front.append(name)
    return sorted(front, key=lambda n: points[n][1])


@dataclass
class Analysis:
    """Everything the verdict, the table and the plots say, computed once."""

    score: Score
    variants: list[Variant]  # ranked: ok variants by score (best first), then the rest
    base: dict[str, Stat]  # the base model's numbers, from the runs' evaluation
    best: Optional[Variant]  # the leader, only when every other variant is worse beyond noise
    close_to_best: list[Variant]  # within noise of the leader (or no noise estimate to tell)
    noise_known: bool  # whether any difference to the leader had a standard error
    pareto: list[str]
    axes_that_vary: list[str]
    leader: Optional[Variant] = None  # the top of the ranking, whether or not the data separate it
    memory_tied: bool = False  # every variant's peak memory within the noise floor of the others
    memory_floor_gib: float = 0.0
    seeds_per_variant: tuple[int, ...] = ()  # ok runs per scored variant, sorted, distinct
    random_clip: bool = False  # some run's CLIP scores come from eval=tiny's random CLIP


def analyse(runs: list[RunRecord], metric: Optional[str] = None) -> Analysis:
    variants = group_variants(runs)
    score = choose_score(variants, metric)
    scored = [v for v in variants if v.ok and v.stat(score.metric) is not None]
    scored.sort(key=lambda v: (-v.stat(score.metric).mean if score.higher_is_better else v.stat(score.metric).mean,
                               v.name))
    ranked = scored + sorted((v for v in variants if v not in scored), key=lambda v: (not v.ok, v.name))
    leader = scored[0] if scored else None
    close, noise_known, unknown = [], False, False
    if leader is not None:
        for v in scored[1:]:
            apart = separated(score, leader, v)
            noise_known = noise_known or apart is not None
            unknown = unknown or apart is None
            if not apart:  # within noise, or no way to tell: never beaten "by" the leader
                close.append(v)
    # "Best" only when the data separate it from every other variant.
    best = leader if leader is not None and not close and (noise_known or len(scored) == 1) else None
    base = {}
    for m in ("eval/clip_style_base", "eval/clip_text_base", "eval/heldout_loss_base"):
        stat = Stat.of([val for v in variants for r in v.ok_runs if (val := r.value(m)) is not None])
        if stat is not None:
            base[m] = stat
    with_memory = [v for v in scored if v.stat("peak_memory_gib") is not None]
    kind = "/".join(sorted({v.memory_kind for v in with_memory} - {""}))
    floor = memory_floor(kind)
    mems = [v.stat("peak_memory_gib").mean for v in with_memory]
    memory_tied = len(mems) > 1 and max(mems) - min(mems) <= floor
    pareto: list[str] = []
    if with_memory and not memory_tied:
        by_name = {v.name: v for v in with_memory}
        points = {v.name: (v.stat(score.metric).mean, v.stat("peak_memory_gib").mean) for v in with_memory}
        pareto = pareto_set(points, score, lambda a, b: separated(score, by_name[a], by_name[b]) is False, floor)
    axes_vary = [a for a in AXES if len({r.tags.get(a) for v in variants for r in v.runs}) > 1]
    return Analysis(score, ranked, base, best, close, noise_known, pareto, axes_vary, leader, memory_tied, floor,
                    tuple(sorted({len(v.ok_runs) for v in scored})), random_clip(runs))

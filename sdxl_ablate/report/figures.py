"""The report's pictures: score against memory, the loss curves and one image grid per prompt. Pure."""

from __future__ import annotations

import math
import re
import statistics
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image

from sdxl_ablate.evaluate.grid import render_grid
from sdxl_ablate.evaluate.headline import RANDOM_CLIP_LABEL
from sdxl_ablate.report.analysis import MEMORY_KINDS, Analysis, random_clip
from sdxl_ablate.report.tables import fmt, legacy_weighted


# --------------------------------------------------------------------------- plots (pure)


def _colours(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def plot_score_vs_memory(a: Analysis, path: Path) -> Figure:
    """Score against peak memory, one point per variant with its noise as error bars (±1 SE of
    the score: across seeds or the evaluation's own; ±1 std of memory across seeds, at least half
    the memory noise floor), the Pareto front as a step line when memory differs beyond that floor,
    the base model's score as a dashed line. No axis spans less than its noise: a difference in
    the 4th decimal is not stretched to fill the plot."""
    fig = Figure(figsize=(8, 5.5), layout="constrained")
    ax = fig.subplots()
    shown = [v for v in a.variants if v.ok and v.stat(a.score.metric) and v.stat("peak_memory_gib")]
    floor = a.memory_floor_gib
    ys, xs, yerrs = [], [], []
    for v, colour in zip(shown, _colours(len(shown))):
        s, m = v.stat(a.score.metric), v.stat("peak_memory_gib")
        se = v.se(a.score)
        xerr = max(m.std or 0.0, floor / 2)
        ax.errorbar(m.mean, s.mean, xerr=xerr, yerr=se or 0, fmt="o", color=colour, capsize=4,
                    markersize=8 if v.name in a.pareto else 6, label=f"{v.name} (n={s.n})")
        ax.annotate(v.name, (m.mean, s.mean), textcoords="offset points", xytext=(6, 6), fontsize=8)
        xs.append(m.mean), ys.append(s.mean), yerrs.append(se or 0.0)
    front = [(v.stat("peak_memory_gib").mean, v.stat(a.score.metric).mean) for v in shown if v.name in a.pareto]
    if len(front) > 1:
        fx, fy = zip(*sorted(front))
        ax.step(fx, fy, where="post", color="black", linewidth=1, alpha=0.6, label="Pareto front")
    elif front:
        ax.scatter(*zip(*front), s=200, facecolors="none", edgecolors="black", label="Pareto front")
    base = a.base.get(a.score.base_metric) if a.score.base_metric else None
    if base is not None:
        ax.axhline(base.mean, linestyle="--", color="grey", label=f"base model ({fmt(base.mean)})")
        ys.append(base.mean)
    if shown:
        # The smallest span an axis may have: 4 SE of the score (the ±2 SE that decide "best"),
        # and 4 noise floors of memory; centred on the data when the data span less.
        noise = max(yerrs) if any(yerrs) else 0.0
        _min_span(ax.set_ylim, ys, yerrs, 4 * noise)
        _min_span(ax.set_xlim, xs, [max(floor / 2, v.stat("peak_memory_gib").std or 0) for v in shown], 4 * floor)
    else:
        ax.text(0.5, 0.5, "no variant has both a score and a peak memory", ha="center", transform=ax.transAxes)
    kinds = sorted({v.memory_kind for v in shown})
    ax.set_xlabel("peak memory, GiB (" + ", ".join(MEMORY_KINDS.get(k, k) for k in kinds)
                  + f"; differences under {floor * 1024:.0f} MiB are noise)")
    ax.set_ylabel(f"{a.score.title} ({'higher' if a.score.higher_is_better else 'lower'} is better)")
    seeds = a.seeds_per_variant
    bars = ("±1 SE across seeds or of the evaluation" if seeds and min(seeds) > 1 else
            "±1 SE of the evaluation (one seed: training noise not measured)")

    if not any(yerrs):
        bars = "no noise estimate for this score"
    title = (f"{a.score.title} vs peak memory\nerror bars: {bars}\nmemory: ±1 std across seeds, at least half the "
             "noise floor" + ("; a tie: no Pareto front" if a.memory_tied else ""))
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if shown:
        ax.legend(fontsize=8, loc="best")
    fig.savefig(path, dpi=120)
    return fig


def _min_span(set_lim, values: list[float], errors: list[float], span: float) -> None:
    """Sets an axis to cover the values with their error bars, and at least `span` wide."""
    lo = min(v - e for v, e in zip(values, errors + [0.0] * len(values)))
    hi = max(v + e for v, e in zip(values, errors + [0.0] * len(values)))
    pad = 0.08 * (hi - lo)
    lo, hi = lo - pad, hi + pad
    if hi - lo < span:
        mid = (hi + lo) / 2
        lo, hi = mid - span / 2, mid + span / 2
    if hi > lo:
        set_lim(lo, hi)


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
        legacy = " [min-SNR weighted: not comparable]" if legacy_weighted(v) else ""
        ax.plot(steps, mean, color=colour, linewidth=1.6, label=f"{v.name} (n={len(per_seed)}){legacy}")
        if len(per_seed) > 1:
            ax.fill_between(steps, [min(x) for x in zip(*smoothed)], [max(x) for x in zip(*smoothed)],
                            color=colour, alpha=0.2, linewidth=0)
    ax.set_xlabel("optimizer step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("train/loss (unweighted denoising MSE)")
    ax.set_title(f"training loss, moving average over {window} step{'s' if window > 1 else ''}"
                 "; band: lowest to highest seed")
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize=8, ncol=2)
    fig.savefig(path, dpi=120)


MIN_TILE = 256


def prompt_grid(prompt: str, seeds: list[int], rows: list[tuple[str, list[Image.Image], list[str]]],
                scorer_note: str = "") -> Image.Image:
    """One prompt: a column per evaluation seed, a row per model (label, images, captions);
    small tiles are shown enlarged (evaluate/grid.py), and the title says so."""
    w, h = rows[0][1][0].size
    factor = max(1, math.ceil(MIN_TILE / max(w, h)))
    note = "columns: evaluation seed" + (f"; {w}x{h} px images shown {factor}x larger (nearest neighbour)"
                                         if factor > 1 else "") + scorer_note
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
        note = f"; style scores: {RANDOM_CLIP_LABEL}" if random_clip([r for _, r in shown]) else ""
        grids.append((f"grid_{n}_{slug}.png", prompt_grid(prompt, seeds, rows, note)))
    return grids

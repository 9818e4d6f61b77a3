"""The report's words and numbers: the table, the verdict, the markdown page and the CSVs. Pure."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Optional


from sdxl_ablate.config.identity import AXES
from sdxl_ablate.evaluate.headline import RANDOM_CLIP_LABEL
from sdxl_ablate.report.analysis import (MEMORY_KINDS, NOISE_Z, SCORES, Analysis, Stat, Variant, random_clip,
                                         separated)
from sdxl_ablate.report.runs import RunRecord, date_of


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


def why_failed(r: RunRecord) -> str:
    error = r.tags.get("error", "").strip().splitlines()
    return f"{r.status}" + (f": {error[0][:160]}" if error else "")


def notes(a: Analysis, v: Variant) -> list[str]:
    out = []
    if v is a.best:
        out.append("best")
    elif v is a.leader and a.close_to_best:
        out.append("top, not separated")
    if v in a.close_to_best:
        out.append("within noise of top")
    if weighted_objective(v) is not None:
        out.append(f"min-SNR objective {fmt(weighted_objective(v))} (not compared)")
    elif legacy_weighted(v):
        out.append("train loss min-SNR weighted (logged before issue 19): not comparable")
    if v.name in a.pareto:
        out.append("Pareto")
    for r in v.no_effect:
        out.append("no effect" + (f" (seed {r.seed})" if len(v.runs) > 1 else ""))
    for r in v.eval_failed:
        out.append("not evaluated" + (f" (seed {r.seed})" if len(v.runs) > 1 else ""))
    for r in v.failures:
        out.append(r.status + (f" (seed {r.seed})" if len(v.runs) > 1 else ""))
    return out


def weighted_objective(v: Variant) -> Optional[float]:
    s = v.stat("train/final_weighted_loss")
    return s.mean if s else None


def legacy_weighted(v: Variant) -> bool:
    """A min-SNR run from before train/loss was the unweighted mean: its train/loss is weighted."""
    return any(r.params.get("trainer.snr_gamma") not in (None, "None", "null") and
               "train/final_weighted_loss" not in r.metrics for r in v.ok_runs)


def fmt_se(mean: Optional[float], se: Optional[float], digits: int = 4, sign: bool = False) -> str:
    if mean is None:
        return ""
    return fmt(mean, digits, sign) + (f" ± {se:.{digits}f}" if se is not None and math.isfinite(se) else "")


def differs(a: Analysis, v: Variant) -> str:
    """The axes that vary across the study, as this variant sets them."""
    # Compact names for the table's narrow column; any other axis (rank, alpha, ...) by its name in AXES.
    short = {"lora.targets": "targets", "lora.text_encoder": "te", "lora.use_dora": "dora",
             "lora.dropout": "dropout", "trainer.precision": "precision", "trainer.optimizer": "optim",
             "data.resolution": "px"}
    return ", ".join(f"{short.get(x, AXES[x])}={v.tag(x)}" for x in a.axes_that_vary if v.tag(x) is not None)


TABLE_HEADER = ["Variant", "What differs", "Seeds", "{score} ± SE", "Lift vs base ± SE", "{other1}",
                "{other2}", "Train loss", "Peak memory, GiB", "Images/s", "LoRA params", "Notes", "Runs"]


def other_scores(a: Analysis) -> list[str]:
    """The two scores shown beside the ranking one."""
    return [m for m in ("eval/clip_text", "eval/heldout_loss", "eval/clip_style") if m != a.score.metric][:2]


def score_label(a: Analysis, metric: str) -> str:
    label = SCORES[metric].label
    label = label[0].upper() + label[1:]
    return f"{label} ({RANDOM_CLIP_LABEL})" if SCORES[metric].is_clip and a.random_clip else label


def table_header(a: Analysis) -> list[str]:
    title = a.score.title
    o1, o2 = (score_label(a, m) for m in other_scores(a))
    return [h.format(score=title[0].upper() + title[1:], other1=o1, other2=o2) for h in TABLE_HEADER]


def table_rows(a: Analysis) -> list[list[str]]:
    """The people's table: the base model first, then the variants in rank order."""
    rows = []
    o1, o2 = other_scores(a)
    if a.base:
        def mean(m: Optional[str]) -> str:  # the same model, prompts and seeds in every run: no spread
            return fmt(a.base[m].mean) if m in a.base else ""

        rows.append(["base model", "no LoRA", "", mean(a.score.base_metric), "",
                     mean(f"{o1}_base"), mean(f"{o2}_base"),
                     "", "", "", "", "same for every variant", ""])
    for v in a.variants:
        stat = v.stat
        params = stat("params/trainable")
        seeds = [s for s in v.seeds if s is not None]
        rows.append([
            v.name, differs(a, v), ",".join(map(str, seeds)) if seeds else str(len(v.runs)),
            fmt_se(stat(a.score.metric).mean if stat(a.score.metric) else None, v.se(a.score)),
            fmt_se(*(v.lift(a.score) or (None, None)), sign=True),
            fmt_stat(stat(o1)), fmt_stat(stat(o2)), fmt_stat(stat("train/final_loss")),
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


def noise_basis(a: Analysis) -> str:
    n = a.seeds_per_variant
    if n and min(n) > 1:
        return (f"standard errors (SE) from the spread across seeds ({'/'.join(map(str, n))} per variant) or the "
                "evaluation's own, whichever is larger")
    if n and max(n) > 1:
        return (f"{min(n)} to {max(n)} seeds per variant: SE from the spread across seeds where a variant has "
                "several, else the evaluation's own; a single-seed variant's training noise is not measured")
    return ("one seed per variant: the standard errors (SE) are the evaluation's own (per held-out image and "
            "timestep pair, paired between variants; per image for CLIP), training-seed noise is not measured "
            "(run `trainer.seed=0,1,2` for it)") if a.score.se_metric else \
        "one seed per variant and no per-run standard error for this score: no noise estimate, differences may be noise"


def verdict(a: Analysis) -> list[str]:
    sc = a.score
    direction = "higher is better" if sc.higher_is_better else "lower is better"
    lines = []
    if sc.random_clip:
        lines.append(f"- **{RANDOM_CLIP_LABEL}**: the CLIP scores come from `eval=tiny`, a CLIP with random "
                     "weights; they show the pipeline runs and rank nothing.")
    elif a.variants and random_clip([r for v in a.variants for r in v.ok_runs]):
        lines.append(f"- CLIP scores are a **{RANDOM_CLIP_LABEL}** (`eval=tiny`, random weights): not used; "
                     f"ranked by {sc.label}.")
    if a.leader is None:
        lines.append(f"- No variant finished with a {sc.title}.")
    else:
        b = a.leader
        s, se = b.stat(sc.metric), b.se(sc)
        numbers = fmt_se(s.mean, se) + (f" over {s.n} seeds" if s.n > 1 else "")
        lf = b.lift(sc)
        if lf is not None and sc.base_metric in a.base:
            numbers += f"; {fmt_se(lf[0], lf[1], sign=True)} vs the base model ({fmt(a.base[sc.base_metric].mean)})"
        mem, speed = b.stat("peak_memory_gib"), b.stat("perf/images_per_s")
        if mem is not None:
            numbers += f"; peak memory {fmt_stat(mem, 2)} GiB ({MEMORY_KINDS.get(b.memory_kind, b.memory_kind)})"
        if speed is not None:
            numbers += f", {fmt_stat(speed, 2)} images/s"
        if a.best is not None:
            lines.append(f"- **Best on {sc.title} ({direction}): {b.name}**, {numbers}.")
        else:
            group = [b, *a.close_to_best]
            unknown = any(separated(sc, b, v) is None for v in a.close_to_best)
            lines.append(f"- **No single best on {sc.title} ({direction})**: {', '.join(v.name for v in group)} "
                         f"are within {NOISE_Z:g} SE of the top" + (" or have no noise estimate" if unknown else "")
                         + f"; the data do not separate them. Top: {b.name}, {numbers}.")
            lines += tie_breakers(group)
        lines.append(f"- Noise: {noise_basis(a)}.")
        lines += versus_base(a)
    lines += memory_lines(a)
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
        if weighted_objective(v) is not None:
            lines.append(f"- {v.name} trains on a min-SNR weighted objective ({fmt(weighted_objective(v))}); its "
                         "train loss here is the unweighted mean, like every other variant's.")
        elif legacy_weighted(v):
            lines.append(f"- {v.name}: its train loss is min-SNR weighted (logged before the unweighted "
                         "`train/loss`): not comparable with the others.")
    return lines


def tie_breakers(group: list[Variant]) -> list[str]:
    """Among variants the score does not separate: what still tells them apart (speed, size)."""
    out = []
    speeds = {v.name: s.mean for v in group if (s := v.stat("perf/images_per_s")) is not None}
    if len(speeds) > 1:
        fast, slow = max(speeds, key=speeds.get), min(speeds, key=speeds.get)
        if speeds[slow] > 0 and speeds[fast] / speeds[slow] >= 1.1:
            out.append(f"- Among them, {fast} is the fastest: {speeds[fast]:.2f} images/s, "
                       f"{speeds[fast] / speeds[slow]:.1f}x {slow}'s {speeds[slow]:.2f} (one timing per run).")
    params = {v.name: s.mean for v in group if (s := v.stat("params/trainable")) is not None}
    if len(params) > 1 and len(set(params.values())) > 1:
        small = min(params, key=params.get)
        out.append(f"- Fewest trainable parameters among them: {small} ({params[small]:,.0f}).")
    return out


def versus_base(a: Analysis) -> list[str]:
    """Which variants move the score away from the base model beyond noise, in which direction."""
    sc = a.score
    if sc.base_metric is None or sc.base_metric not in a.base:
        return []
    up, down, flat, none = [], [], [], []
    for v in a.variants:
        lf = v.lift(sc) if v.ok else None
        if lf is None:
            continue
        mean, se = lf
        if v.no_effect:  # the run's own judgement (e.g. a change under 0.1% of the base): not "better"
            none.append(v.name)
        elif se is None or abs(mean) <= NOISE_Z * se:
            flat.append(v.name)
        elif (mean > 0) == sc.higher_is_better:
            up.append(v.name)
        else:
            down.append(v.name)
    word = ("higher", "lower") if sc.higher_is_better else ("lower", "higher")
    parts = []
    if up:
        parts.append(f"better ({word[0]}) beyond {NOISE_Z:g} SE: {', '.join(up)}")
    if down:
        parts.append(f"worse ({word[1]}) beyond {NOISE_Z:g} SE: {', '.join(down)}")
    if flat:
        parts.append(f"within noise of the base: {', '.join(flat)}")
    if none:
        parts.append(f"no effect (see below): {', '.join(none)}")
    return [f"- Against the base model ({sc.title} {fmt(a.base[sc.base_metric].mean)}): " + "; ".join(parts) + "."]


def memory_lines(a: Analysis) -> list[str]:
    shown = [v for v in a.variants if v.ok and v.stat("peak_memory_gib") is not None]
    if not shown:
        return []
    kinds = "/".join(sorted({v.memory_kind for v in shown} - {""}))
    label = MEMORY_KINDS.get(kinds, kinds)
    floor = f"{a.memory_floor_gib * 1024:.0f} MiB"
    if a.memory_tied:
        mems = [v.stat("peak_memory_gib").mean for v in shown]
        return [f"- Peak memory ({label}): every variant within {(max(mems) - min(mems)) * 1024:.0f} MiB of the "
                f"others, under the noise floor of {floor}: a tie, no memory trade-off (no Pareto set)."]
    if a.pareto:
        return [f"- Best on both {a.score.title} and peak memory (Pareto set; differences under {floor} of "
                f"{label} or {NOISE_Z:g} SE count as ties): " + ", ".join(a.pareto) + "."]
    return []


def runs_table(runs: list[RunRecord]) -> str:
    header = ["Run id", "Started", "Variant", "Seed", "Status", "Eval", "Sweep"]
    rows = [[r.run_id, r.date, r.variant_name, "" if r.seed is None else str(r.seed), r.status,
             r.tags.get("eval_status", ""), r.sweep_id] for r in runs]
    return markdown_table(header, rows)


def seeds_phrase(a: Analysis) -> str:
    n = a.seeds_per_variant
    if not n:
        return "no finished variant"
    if len(n) == 1:
        return "one seed per variant" if n[0] == 1 else f"{n[0]} seeds per variant"
    return f"{min(n)} to {max(n)} finished seeds per variant"


def render_markdown(study: str, a: Analysis, runs: list[RunRecord], sweep_ids: list[str], uri: str,
                    grids: list[str], status_line: str = "", started: int = 0) -> str:
    """`status_line`: the sweep's completeness (runs.Completeness.line), the page's first line;
    `started`: when the sweep started (its parent run), else its own earliest run."""
    own = [r.start_time for r in runs if r.start_time and set(r.sweep_starts()) & set(sweep_ids)
           and r.sweep_id in sweep_ids]
    first = started or min(own or [r.start_time for r in runs if r.start_time], default=0)
    which = f"sweep {sweep_ids[0]}" if len(sweep_ids) == 1 else f"{len(sweep_ids)} sweeps merged ({', '.join(sweep_ids)})"
    kinds = sorted({v.memory_kind for v in a.variants if v.memory_kind})
    memory_note = {"cpu_rss": "peak resident set size of the process (CPU)",
                   "cuda_reserved": "peak reserved by the CUDA caching allocator"}
    title = a.score.title
    header = table_header(a)
    parts = [
        *([status_line, ""] if status_line else []),
        f"# Ablation report: study `{study}`",
        "",
        f"{which}, started {date_of(first)}: {len(a.variants)} variants, {len(runs)} runs, {seeds_phrase(a)}. "
        f"Runs: MLflow experiment `{study}` at `{uri}`.",
        "",
        "## Verdict",
        "",
        *verdict(a),
        "",
        f"## Variants, ranked by {title} (`{a.score.metric}`)",
        "",
        markdown_table(header, table_rows(a)),
        f"Score and lift: mean ± standard error (SE): {noise_basis(a)}. Other columns: mean ± sample standard "
        "deviation across seeds where a variant ran with several. "
        f"Lift = the variant's {a.score.label} minus the base model's on the same samples. "
        "Train loss: the unweighted denoising loss (mean of the last 10 steps) for every variant. "
        "Peak memory: " + "; ".join(memory_note.get(k, k) for k in kinds) + f", ties below {a.memory_floor_gib * 1024:.0f} MiB. "
        "Pareto: no other variant is at least as good on both the score and the peak memory, beyond noise. "
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
               "eval/heldout_loss_se", "eval/heldout_loss_delta_se", "eval/clip_style_se", "eval/clip_style_lift_se",
               "train/final_loss", "train/final_weighted_loss", "peak_memory_gib", "perf/images_per_s", "perf/step_time_s", "params/trainable")


def write_variants_csv(a: Analysis, path: Path) -> None:
    fields = ["variant", "rank", *AXES, "seeds", "runs_ok", "runs", "notes", "memory_kind", "clip_scorer",
              "score", "score se", "lift", "lift se"]
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
                                   "clip_scorer": v.tag("clip_scorer") or "",
                                   "score": a.score.metric, "score se": repr(v.se(a.score)) if v.se(a.score) else "",
                                   "lift": repr(lf[0]) if (lf := v.lift(a.score)) else "",
                                   "lift se": repr(lf[1]) if lf and lf[1] is not None else "",
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
              "no_effect", "error", "clip_scorer", *AXES, *metrics]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in runs:
            w.writerow({"run_id": r.run_id, "run_name": r.name, "variant": r.variant_name,
                        "seed": "" if r.seed is None else r.seed, "sweep_id": r.sweep_id, "started": r.date,
                        "status": r.status, "eval_status": r.tags.get("eval_status", ""),
                        "no_effect": r.tags.get("no_effect", ""), "error": r.tags.get("error", ""),
                        "clip_scorer": r.tags.get("clip_scorer", ""),
                        **{x: r.tags.get(x, "") for x in AXES}, **{m: repr(r.metrics[m]) for m in r.metrics}})

"""The report's words and numbers: the table, the verdict, the markdown page and the CSVs. Pure."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Optional


from sdxl_ablate.config.identity import AXES
from sdxl_ablate.evaluate.headline import lift
from sdxl_ablate.report.analysis import MEMORY_KINDS, NOISE_Z, Analysis, Stat, Variant
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
        f"{which}, started {date_of(first)}: {len(a.variants)} variants, {len(runs)} runs, {seeds}. "
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

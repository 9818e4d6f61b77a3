"""The study report: which variant, at what cost, how sure.

    python -m sdxl_ablate.report --study NAME [--sweep ID | --all-sweeps] [--score METRIC]
                                 [--tracking-uri URI] [--out DIR] [--no-log]

Reads the study's MLflow experiment: by default the latest sweep (runs tagged `kind=variant`,
or untagged runs from before sweeps had ids, which count as one sweep `legacy`); `--sweep ID`
picks another, `--all-sweeps` merges them. Runs that differ only in `trainer.seed` are one
variant: the report gives their mean and spread (sample standard deviation) and marks the
variants whose score is within noise of the best one's.

Writes into the output folder (default reports/<study>/<sweep id>/, or all-sweeps/; the
study's `latest` link points at the newest complete sweep's folder, and an incomplete sweep's
report says so in its first line and never takes a complete one's place):

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

`runs.read_runs` does all the MLflow reading; everything from the run records on (analysis.py,
tables.py, figures.py) is pure, so tests need no tracking server.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional
from sdxl_ablate.report.analysis import DEFAULT_SCORES, SCORES, analyse
from sdxl_ablate.report.figures import plot_loss_curves, plot_score_vs_memory, prompt_grids
from sdxl_ablate.report.runs import (ReportError, RunRecord, completeness, download_images, read_study,
                                     select_runs, sweeps)
from sdxl_ablate.report.tables import render_markdown, write_runs_csv, write_variants_csv




# --------------------------------------------------------------------------- main


FIXED_OUTPUTS = ("ablation.md", "ablation.csv", "runs.csv", "score_vs_memory.png", "loss_curves.png")


def write_report(study: str, runs: list[RunRecord], sweep_ids: list[str], out: Path, uri: str,
                 score: Optional[str] = None, status_line: str = "", started: int = 0) -> tuple[str, list[Path], str]:
    """Writes the report files into `out`; returns (the markdown, the files written, the score that ranked)."""
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
    text = render_markdown(study, a, runs, sweep_ids, uri, [name for name, _ in grids], status_line, started)
    (out / "ablation.md").write_text(text)
    return text, [out / n for n in FIXED_OUTPUTS] + [out / n for n, _ in grids], a.score.metric


LATEST = "latest"
COMPLETE_MARK = ".complete"  # in a sweep's report folder: the sweep had every job done


def report_folder(study_dir: Path, sweep_ids: list[str]) -> Path:
    """reports/<study>/<sweep id>/ (all-sweeps/ when several are merged)."""
    return study_dir / (sweep_ids[0] if len(sweep_ids) == 1 else "all-sweeps")


def link_latest(study_dir: Path, folder: Path, complete: bool, order: list[str]) -> Optional[str]:
    """Points reports/<study>/latest at `folder` (a sweep's report; `order`: the study's sweep ids,
    oldest first), except that an incomplete sweep never takes the place of a complete one, nor
    an older sweep that of a newer one; returns why it was left alone, or None."""
    link = study_dir / LATEST
    current = link.resolve() if link.is_symlink() else None
    if current is not None and current != folder.resolve():
        if not complete and (current / COMPLETE_MARK).exists():
            return f"{link} still points at the complete sweep {current.name}"
        if current.name in order and folder.name in order and order.index(current.name) > order.index(folder.name):
            return f"{link} still points at the newer sweep {current.name}"
    (folder / COMPLETE_MARK).unlink(missing_ok=True)
    if complete:
        (folder / COMPLETE_MARK).touch()
    if link.is_symlink() or not link.exists():
        link.unlink(missing_ok=True)
        link.symlink_to(folder.name, target_is_directory=True)  # relative: the folder can move
        return None
    return f"{link} exists and is not a link; left alone"


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
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default: reports/<study>/<sweep id>, linked as reports/<study>/latest)")
    p.add_argument("--no-log", action="store_true", help="write the files only, log no report run to MLflow")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    from sdxl_ablate.config import TrackingConfig
    from sdxl_ablate.track.tracker import connect, resolve_uri

    # MLflow's own switch: no progress bar for each of the many small downloads below.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    args = parse_args(argv)
    uri = args.tracking_uri or resolve_uri(TrackingConfig())
    client = connect(uri)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            records, parents = read_study(client, args.study)
            runs, sweep_ids = select_runs(records, args.sweep, args.all_sweeps)
            state = completeness(runs, sweep_ids[0], parents) if len(sweep_ids) == 1 else None
            study_dir = Path("reports") / args.study
            out = args.out or report_folder(study_dir, sweep_ids)
            for r in runs:
                download_images(client, r, Path(tmp))
            started = parents[sweep_ids[0]].start_time if state is not None and sweep_ids[0] in parents else 0
            text, files, ranked_by = write_report(args.study, runs, sweep_ids, out, uri, args.score,
                                       state.line(sweep_ids[0]) if state else "", started)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.out or state is None:  # a folder of the user's, or merged sweeps: not a sweep's report
        kept = "left as it was: merged sweeps are no sweep's report" if state is None and not args.out else None
        linked = False
    else:
        kept = link_latest(study_dir, out, state.complete, [s.sweep_id for s in sweeps(records)])
        linked = kept is None
    if not args.no_log:
        log_report(uri, args.study, files, sweep_ids, {"score": args.score or "default", "sweeps": ",".join(sweep_ids),
                                                       "runs": len(runs)})
    # The terminal gets the verdict (the table is in the file) and where the report is.
    verdict_part = text.split("## Variants")[0].rstrip()
    print(verdict_part)
    keys = [] if args.no_log else ["ablation-" + "-".join(sweep_ids)[:100]] + ([LATEST_VIEW] if linked else [])
    ui = ui_link(client, args.study, ui_view(runs, sweep_ids, ranked_by), keys)
    print(f"\nReport: {(out / 'ablation.md').resolve()} (table, plots and image grids there)"
          + ("" if args.out else f"\nLatest: {(study_dir / LATEST / 'ablation.md')}" + (f" ({kept})" if kept else ""))
          + f"\nRuns: MLflow experiment '{args.study}' at {uri}"
          + (f"\nMLflow UI (make mlflow-ui): {ui}" if ui else ""))
    return 0


UI_BASE = "http://127.0.0.1:5000"  # where `make mlflow-ui` serves


# The headline metric (evaluate/headline.py) of each ranking score, and whether higher is better.
HEADLINE_OF = {"eval/heldout_loss": ("ablation/heldout_loss_drop", True),
               "eval/clip_style": ("ablation/clip_style_lift", True),
               "eval/clip_text": ("ablation/clip_text_lift", True),
               "train/final_loss": ("ablation/final_loss", False)}


def ui_view(runs: list[RunRecord], sweep_ids: list[str], score: str) -> dict:
    """The MLflow UI's runs-table state for exactly the report's variant runs: their filter, sorted
    by the headline of the ranking score, the headline numbers (and its SE) as columns."""
    reused = any(r.sweep_id not in sweep_ids for r in runs)
    if len(sweep_ids) == 1 and not reused and sweep_ids != ["legacy"]:
        flt = f"tags.kind = 'variant' and tags.sweep_id = '{sweep_ids[0]}'"
    else:  # runs of other sweeps reused here, or merged sweeps: name the runs
        flt = "attributes.run_id IN (" + ", ".join(f"'{r.run_id}'" for r in runs) + ")"
    key, descending = HEADLINE_OF[score]
    columns = [key, f"{key}_se", "ablation/peak_memory_gib", "ablation/images_per_s", "ablation/final_loss"]
    logged = {m for r in runs for m in r.metrics}
    return {"searchFilter": flt, "orderByKey": f"metrics.`{key}`", "orderByAsc": not descending,
            "startTime": "ALL", "selectedColumns": [f"metrics.`{c}`" for c in dict.fromkeys(columns) if c in logged]}


VIEW_TAG = "mlflow.sharedViewState."  # the UI's shared views: experiment tags it opens by key
LATEST_VIEW = "ablation"  # the view of the study's latest complete report


def ui_link(client, study: str, view: dict, share_keys: list[str]) -> Optional[str]:
    """A link to the runs table in `view`: stored as the UI's shared view under each key (MLflow
    3 opens `?viewStateShareKey=KEY` with its filter, sort and columns), linked by the first;
    with no keys, a link carrying the filter and sort only (the UI then shows no metric column)."""
    import json
    import urllib.parse

    exp = client.get_experiment_by_name(study)
    if exp is None:
        return None
    page = f"{UI_BASE}/#/experiments/{exp.experiment_id}/runs"
    for key in share_keys:
        client.set_experiment_tag(exp.experiment_id, VIEW_TAG + key, json.dumps(view))
    if share_keys:  # workflowType: the UI's side bar in its model-training mode, not GenAI (its default)
        return f"{page}?viewStateShareKey={share_keys[0]}&workflowType=machine_learning"
    query = {**{k: str(v).lower() if isinstance(v, bool) else v for k, v in view.items() if k != "selectedColumns"},
             "workflowType": "machine_learning"}
    return f"{page}?{urllib.parse.urlencode(query, quote_via=urllib.parse.quote)}"

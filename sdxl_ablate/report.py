"""The study report: one table row per variant, plots, and the variants' image grids.

    python -m sdxl_ablate.report --study NAME [--tracking-uri URI] [--out DIR]
                                 [--sort-by METRIC] [--ascending | --no-ascending]

Reads the study's experiment from MLflow (the runs tagged kind=report excluded), writes
ablation.md, ablation.csv, style_vs_memory.png, loss_curves.png and grids.png into the
output folder, and logs the same files to a new run named `report` (tag kind=report) in
the study's experiment. `read_study` does all the MLflow reading; everything from the
run records on (`build_table`, the plots) is pure, so tests need no tracking server.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from mlflow.tracking import MlflowClient
from PIL import Image, ImageDraw, ImageFont

from .config import TrackingConfig
from .tracking import Tracker, resolve_uri

AXES = ("lora.targets", "lora.text_encoder", "lora.use_dora", "lora.dropout", "trainer.precision",
        "trainer.optimizer", "data.resolution")


def _fixed(decimals: int) -> Callable[[float], str]:
    return lambda x: f"{x:.{decimals}f}"


# The numeric columns, in table order, and how each is written.
NUMBERS: dict[str, Callable[[Any], str]] = {
    "params/trainable": lambda x: str(int(round(x))),
    "train/final_loss": _fixed(4),
    "eval/heldout_loss": _fixed(4),
    "eval/heldout_loss_base": _fixed(4),
    "peak_memory_gib": _fixed(2),
    "perf/step_time_s": _fixed(3),
    "perf/images_per_s": _fixed(2),
    "eval/clip_style": _fixed(4),
    "eval/clip_text": _fixed(4),
    "eval/clip_style_lift": lambda x: f"{x:+.4f}",
    "eval/clip_text_lift": lambda x: f"{x:+.4f}",
}
COLUMNS: tuple[str, ...] = (
    "run", "status", *AXES,
    "params/trainable", "train/final_loss", "eval/heldout_loss", "eval/heldout_loss_base",
    # What peak_memory_gib measured: cuda_reserved (CUDA caching allocator) or cpu_rss.
    "peak_memory_gib", "memory_kind",
    "fits_16gb",  # memory/fits_budget: yes/no against memory.budget_gib; empty where unknown (CPU)
    "perf/step_time_s", "perf/images_per_s",
    "eval/clip_style", "eval/clip_text", "eval/clip_style_lift", "eval/clip_text_lift",
)
DEFAULT_SORT = "eval/clip_style"
FALLBACK_SORT = "train/final_loss"
# Columns where smaller is better: sorted ascending unless told otherwise.
ASCENDING_BY_DEFAULT = {"train/final_loss", "eval/heldout_loss", "eval/heldout_loss_base", "peak_memory_gib",
                        "perf/step_time_s", "params/trainable"}
OUTPUTS = ("ablation.md", "ablation.csv", "style_vs_memory.png", "loss_curves.png", "grids.png")


class ReportError(RuntimeError):
    """A report that cannot be made; the message says why."""


@dataclass
class RunRecord:
    """What the report needs of one variant run."""

    name: str
    tags: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)  # latest value of each metric
    loss_history: list[tuple[int, float]] = field(default_factory=list)  # (step, train/loss)
    grid: Optional[Path] = None  # the downloaded eval/grid.png, if the run has one

    @property
    def status(self) -> str:
        # The runner sets the status tag when a variant ends; without one it is still going.
        return self.tags.get("status", "running")


# --------------------------------------------------------------------------- the table (pure)


def peak_memory(record: RunRecord) -> tuple[Optional[float], str]:
    """(GiB, kind): CUDA reserved where measured, else the CPU peak resident set."""
    m = record.metrics
    if "memory/peak_reserved_gib" in m:
        return m["memory/peak_reserved_gib"], "cuda_reserved"
    if "memory/peak_rss_gib" in m:
        return m["memory/peak_rss_gib"], "cpu_rss"
    return None, ""


def raw_row(record: RunRecord) -> dict[str, Any]:
    """One row, unformatted: numbers stay numbers, missing values are None."""
    memory, kind = peak_memory(record)
    fits = record.metrics.get("memory/fits_budget")
    row: dict[str, Any] = {"run": record.name, "status": record.status, **{a: record.tags.get(a) for a in AXES}}
    row.update({c: record.metrics.get(c) for c in NUMBERS})
    row.update({"peak_memory_gib": memory, "memory_kind": kind,
                "fits_16gb": None if fits is None else ("yes" if fits >= 0.5 else "no")})
    return {c: row[c] for c in COLUMNS}


def format_row(row: dict[str, Any]) -> dict[str, str]:
    def cell(column: str, value: Any) -> str:
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            return ""
        return NUMBERS[column](value) if column in NUMBERS else str(value)

    return {c: cell(c, v) for c, v in row.items()}


def sort_columns(records: list[RunRecord], sort_by: Optional[str], ascending: Optional[bool]) -> tuple[str, bool]:
    """The column and direction to sort by: clip_style (descending) by default, falling back
    to the final training loss (ascending) when no run has clip scores."""
    if sort_by is None:
        has_clip = any(DEFAULT_SORT in r.metrics for r in records)
        sort_by = DEFAULT_SORT if has_clip else FALLBACK_SORT
    if sort_by not in COLUMNS:
        raise ReportError(f"--sort-by {sort_by!r} is not a column; choose one of: {', '.join(COLUMNS)}")
    return sort_by, sort_by in ASCENDING_BY_DEFAULT if ascending is None else ascending


def sort_records(records: list[RunRecord], sort_by: str, ascending: bool) -> list[RunRecord]:
    """ok runs first, then the failed ones (oom, nan, failed, running); inside each group
    by the sort column, runs without a value last, ties by run name."""
    def value(r: RunRecord) -> Any:
        v = raw_row(r)[sort_by]
        return None if isinstance(v, float) and not math.isfinite(v) else v

    by_name = sorted(records, key=lambda r: r.name)
    present = sorted((r for r in by_name if value(r) is not None), key=value, reverse=not ascending)
    ordered = present + [r for r in by_name if value(r) is None]
    return sorted(ordered, key=lambda r: r.status != "ok")  # stable: keeps the order inside each group


def ordered(records: list[RunRecord], sort_by: Optional[str] = None,
            ascending: Optional[bool] = None) -> list[RunRecord]:
    """The records in table order (see `sort_columns` and `sort_records`)."""
    return sort_records(records, *sort_columns(records, sort_by, ascending))


def table_rows(records: list[RunRecord]) -> list[dict[str, str]]:
    """The formatted rows (column -> text, in COLUMNS order), in the records' order."""
    return [format_row(raw_row(r)) for r in records]


def build_table(records: list[RunRecord], sort_by: Optional[str] = None,
                ascending: Optional[bool] = None) -> list[dict[str, str]]:
    """The formatted table, sorted."""
    return table_rows(ordered(records, sort_by, ascending))


def to_markdown(rows: list[dict[str, str]]) -> str:
    numeric = set(NUMBERS)
    header = "| " + " | ".join(COLUMNS) + " |"
    rule = "|" + "|".join("---:" if c in numeric else "---" for c in COLUMNS) + "|"
    lines = [header, rule]
    for row in rows:
        lines.append("| " + " | ".join(row[c].replace("|", "\\|") for c in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def write_csv(rows: list[dict[str, str]], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


# --------------------------------------------------------------------------- plots (pure)


def plot_style_vs_memory(records: list[RunRecord], path: Path) -> None:
    """clip_style against peak memory, one labelled point per variant that has both."""
    fig = Figure(figsize=(7, 5), layout="constrained")
    ax = fig.subplots()
    points = [(r.name, *peak_memory(r), r.metrics["eval/clip_style"]) for r in records
              if "eval/clip_style" in r.metrics and peak_memory(r)[0] is not None]
    markers = {"cuda_reserved": "o", "cpu_rss": "s"}
    for kind, marker in markers.items():
        mine = [(name, memory, style) for name, memory, k, style in points if k == kind]
        if mine:
            ax.scatter([m for _, m, _ in mine], [s for _, _, s in mine], marker=marker, label=kind)
        for name, memory, style in mine:
            ax.annotate(name, (memory, style), textcoords="offset points", xytext=(5, 5), fontsize=8)
    if any(kind == "cuda_reserved" for _, _, kind, _ in points):
        ax.axvline(16, linestyle="--", color="grey", label="16 GiB card")
    if points:
        ax.legend(title="memory measured", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no variant has both a clip_style and a peak memory", ha="center",
                transform=ax.transAxes)
    ax.set_xlabel("peak memory, GiB")
    ax.set_ylabel("eval/clip_style")
    ax.set_title("style score vs peak memory")
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=120)


def plot_loss_curves(records: list[RunRecord], path: Path) -> None:
    """The train/loss history of every variant, on one plot."""
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.subplots()
    for r in records:
        if r.loss_history:
            steps, losses = zip(*r.loss_history)
            ax.plot(steps, losses, label=r.name, linewidth=1)
    ax.set_xlabel("optimizer step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("train/loss")
    ax.set_title("training loss")
    if any(r.loss_history for r in records):
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=120)


def stack_grids(grids: list[tuple[str, Image.Image]], label_h: int = 24) -> Image.Image:
    """The image grids one above the other, each under a band with its run name."""
    font = ImageFont.load_default(size=label_h * 2 // 3)
    width = max(im.width for _, im in grids)
    out = Image.new("RGB", (width, sum(label_h + im.height for _, im in grids)), "white")
    draw = ImageDraw.Draw(out)
    y = 0
    for name, im in grids:
        draw.text((4, y + label_h // 2), name, fill="black", font=font, anchor="lm")
        out.paste(im.convert("RGB"), (0, y + label_h))
        y += label_h + im.height
    return out


# --------------------------------------------------------------------------- MLflow


def read_study(client: MlflowClient, study: str, grid_dir: Path) -> list[RunRecord]:
    """The study's variant runs (not the report runs), with their loss histories; each run's
    eval/grid.png is downloaded into grid_dir."""
    experiment = client.get_experiment_by_name(study)
    if experiment is None:
        names = sorted(e.name for e in client.search_experiments())
        raise ReportError(f"no study {study!r} in {client.tracking_uri}; studies there: {', '.join(names) or 'none'}")
    records = []
    for run in _all_runs(client, experiment.experiment_id):
        if run.data.tags.get("kind") == "report":
            continue
        run_id = run.info.run_id
        history = client.get_metric_history(run_id, "train/loss")
        records.append(RunRecord(
            name=run.info.run_name or run_id,
            tags=dict(run.data.tags),
            metrics=dict(run.data.metrics),
            loss_history=sorted((m.step, m.value) for m in history),
            grid=_download_grid(client, run_id, grid_dir),
        ))
    if not records:
        raise ReportError(f"study {study!r} in {client.tracking_uri} has no variant runs yet")
    return records


def _all_runs(client: MlflowClient, experiment_id: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], order_by=["attributes.start_time ASC"], page_token=token)
        runs += page
        token = page.token
        if not token:
            return runs


def _download_grid(client: MlflowClient, run_id: str, grid_dir: Path) -> Optional[Path]:
    if not any(f.path == "eval/grid.png" for f in client.list_artifacts(run_id, "eval")):
        return None
    dst = grid_dir / run_id
    dst.mkdir(parents=True, exist_ok=True)
    return Path(client.download_artifacts(run_id, "eval/grid.png", str(dst)))


# --------------------------------------------------------------------------- main


def write_report(records: list[RunRecord], out: Path, sort_by: Optional[str], ascending: Optional[bool]) -> str:
    """Writes the report files into `out`; returns the markdown table."""
    out.mkdir(parents=True, exist_ok=True)
    for name in OUTPUTS:  # a file from an earlier report must not pass for this one's
        (out / name).unlink(missing_ok=True)
    records = ordered(records, sort_by, ascending)
    rows = table_rows(records)
    table = to_markdown(rows)
    write_csv(rows, out / "ablation.csv")
    (out / "ablation.md").write_text(table)
    plot_style_vs_memory(records, out / "style_vs_memory.png")
    plot_loss_curves(records, out / "loss_curves.png")
    grids = [(r.name, Image.open(r.grid)) for r in records if r.grid is not None]
    if grids:
        stack_grids(grids).save(out / "grids.png")
    return table


def log_report(uri: str, study: str, out: Path, params: dict[str, Any]) -> str:
    """A new run `report` (tag kind=report) in the study's experiment, with the report files."""
    with Tracker(TrackingConfig(uri=uri), study, "report", tags={"kind": "report"}) as tracker:
        tracker.log_params(params)
        for name in OUTPUTS:
            if (out / name).is_file():
                tracker.log_artifact(out / name)
        tracker.set_status("ok")
    return tracker.run_id


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sdxl_ablate.report", description=__doc__.split("\n")[0])
    p.add_argument("--study", required=True, help="the study name (its MLflow experiment)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: sqlite:///<cwd>/mlflow.db)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: reports/<study>)")
    p.add_argument("--sort-by", default=None,
                   help=f"a table column (default: {DEFAULT_SORT}, or {FALLBACK_SORT} when no run has clip scores)")
    p.add_argument("--ascending", action=argparse.BooleanOptionalAction, default=None,
                   help="sort direction (default: ascending for losses, memory, step time and parameter "
                        "counts, descending otherwise)")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    uri = args.tracking_uri or resolve_uri(TrackingConfig())
    out = args.out or Path("reports") / args.study
    client = MlflowClient(tracking_uri=uri)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            records = read_study(client, args.study, Path(tmp))
            table = write_report(records, out, args.sort_by, args.ascending)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    direction = "auto" if args.ascending is None else args.ascending
    log_report(uri, args.study, out, {"sort_by": args.sort_by or "default", "ascending": direction,
                                      "variants": len(records)})
    print(table)
    print(f"\nReport: {out.resolve()}\nRuns: MLflow experiment '{args.study}' at {uri} (make mlflow-ui to browse)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

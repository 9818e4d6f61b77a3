"""Tests of sdxl_ablate.report: the table from run records, and a whole report of a small
finished study built by hand in a temporary MLflow store."""

import csv
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from sdxl_ablate.report import COLUMNS, ReportError, RunRecord, build_table, main, to_markdown

EXPECTED_COLUMNS = [
    "run", "status", "lora.targets", "lora.text_encoder", "lora.use_dora", "lora.dropout",
    "trainer.precision", "trainer.optimizer", "data.resolution",
    "params/trainable", "train/final_loss", "eval/heldout_loss", "eval/heldout_loss_base",
    "peak_memory_gib", "memory_kind", "fits_16gb", "perf/step_time_s", "perf/images_per_s",
    "eval/clip_style", "eval/clip_text", "eval/clip_style_lift", "eval/clip_text_lift",
]


def axes(targets: str, text_encoder: str = "false") -> dict[str, str]:
    return {"lora.targets": targets, "lora.text_encoder": text_encoder, "lora.use_dora": "false",
            "lora.dropout": "0.0", "trainer.precision": "bf16", "trainer.optimizer": "adamw",
            "data.resolution": "1024"}


# --------------------------------------------------------------------------- pure table


def test_table_from_records_sorts_ok_runs_first_and_fills_only_what_was_measured():
    records = [
        RunRecord("running", tags=axes("attn"), metrics={"train/final_loss": 0.01}),
        RunRecord("b", tags={**axes("all"), "status": "ok"},
                  metrics={"train/final_loss": 0.2, "memory/peak_rss_gib": 3.14159, "params/trainable": 1234.0}),
        RunRecord("a", tags={**axes("attn"), "status": "ok"},
                  metrics={"train/final_loss": 0.1, "memory/peak_reserved_gib": 9.5, "memory/fits_budget": 1.0}),
        RunRecord("c", tags={**axes("attn"), "status": "nan"}, metrics={}),
    ]
    # No run has clip scores: sorted by the final training loss, ascending.
    rows = build_table(records)
    # The others after the ok runs, by the same column; a run without the value last.
    assert [(r["run"], r["status"]) for r in rows] == [("a", "ok"), ("b", "ok"), ("running", "running"), ("c", "nan")]
    a, b = rows[0], rows[1]
    assert (a["peak_memory_gib"], a["memory_kind"], a["fits_16gb"]) == ("9.50", "cuda_reserved", "yes")
    assert (b["peak_memory_gib"], b["memory_kind"], b["fits_16gb"]) == ("3.14", "cpu_rss", "")
    assert (a["train/final_loss"], b["params/trainable"], a["params/trainable"]) == ("0.1000", "1234", "")
    assert [r["run"] for r in build_table(records, "train/final_loss", ascending=False)] == ["b", "a", "running", "c"]
    with pytest.raises(ReportError, match="not a column"):
        build_table(records, "eval/nope")


def test_markdown_escapes_pipes():
    rows = build_table([RunRecord("x|y", tags={"status": "ok"})])
    assert "x\\|y" in to_markdown(rows)


# --------------------------------------------------------------------------- a whole study


def make_run(client: MlflowClient, exp: str, name: str, tags: dict, metrics: dict,
             losses: list[float] = (), grid: Path | None = None) -> str:
    run_id = client.create_run(exp, run_name=name, tags=tags).info.run_id
    for key, value in metrics.items():
        client.log_metric(run_id, key, value, step=0)
    for step, loss in enumerate(losses):
        client.log_metric(run_id, "train/loss", loss, step=step)
    if grid is not None:
        client.log_artifact(run_id, str(grid), "eval")
    client.set_terminated(run_id, "FINISHED" if tags.get("status") == "ok" else "FAILED")
    return run_id


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> str:
    """3 variants: two ok (one with an image grid), one out of memory; -> the tracking URI.

    One store for the module (creating a sqlite store takes a second or more): the report
    runs that each test adds must not change what the next one sees."""
    tmp_path = tmp_path_factory.mktemp("study")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("naruto", artifact_location=(tmp_path / "artifacts").as_uri())
    grid = tmp_path / "grid.png"
    Image.new("RGB", (120, 60), "red").save(grid)
    make_run(client, exp, "attn", {**axes("attn"), "status": "ok"}, {
        "params/trainable": 23040, "train/final_loss": 0.123456, "eval/heldout_loss": 0.2,
        "eval/heldout_loss_base": 0.25, "memory/peak_reserved_gib": 10.504, "memory/fits_budget": 1.0,
        "perf/step_time_s": 0.51234, "perf/images_per_s": 1.95, "eval/clip_style": 0.7,
        "eval/clip_text": 0.3, "eval/clip_style_lift": 0.05, "eval/clip_text_lift": -0.01,
    }, losses=[0.3, 0.2, 0.1], grid=grid)
    make_run(client, exp, "all", {**axes("all"), "status": "ok"}, {
        "params/trainable": 100000, "train/final_loss": 0.1, "memory/peak_rss_gib": 3.2,
        "eval/clip_style": 0.8, "eval/clip_text": 0.25, "eval/clip_style_lift": 0.1, "eval/clip_text_lift": 0.02,
    }, losses=[0.4, 0.3])
    make_run(client, exp, "te_all", {**axes("all", "true"), "status": "oom"}, {"memory/peak_reserved_gib": 15.98})
    return uri


def read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    with path.open(newline="") as f:
        header, *rows = list(csv.reader(f))
    return header, rows


def markdown_rows(path: Path) -> list[list[str]]:
    lines = [line for line in path.read_text().splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


def report_runs(client: MlflowClient) -> list:
    exp = client.get_experiment_by_name("naruto").experiment_id
    return client.search_runs([exp], filter_string="tags.kind = 'report'", order_by=["attributes.start_time DESC"])


def test_report_of_a_finished_study(study, tmp_path, capsys):
    out = tmp_path / "report"
    client = MlflowClient(study)
    before = len(report_runs(client))
    assert main(["--study", "naruto", "--tracking-uri", study, "--out", str(out)]) == 0

    header, rows = read_csv(out / "ablation.csv")
    assert header == EXPECTED_COLUMNS == list(COLUMNS)
    assert rows == [  # by clip_style, highest first; the failed variant last
        ["all", "ok", "all", "false", "false", "0.0", "bf16", "adamw", "1024", "100000", "0.1000", "", "",
         "3.20", "cpu_rss", "", "", "", "0.8000", "0.2500", "+0.1000", "+0.0200"],
        ["attn", "ok", "attn", "false", "false", "0.0", "bf16", "adamw", "1024", "23040", "0.1235", "0.2000",
         "0.2500", "10.50", "cuda_reserved", "yes", "0.512", "1.95", "0.7000", "0.3000", "+0.0500", "-0.0100"],
        ["te_all", "oom", "all", "true", "false", "0.0", "bf16", "adamw", "1024", "", "", "", "",
         "15.98", "cuda_reserved", "", "", "", "", "", "", ""],
    ]
    assert markdown_rows(out / "ablation.md") == rows
    for name in ("style_vs_memory.png", "loss_curves.png"):
        assert Image.open(out / name).size[0] > 100
    # One grid (attn's), under a label band.
    assert Image.open(out / "grids.png").size == (120, 24 + 60)
    printed = capsys.readouterr().out
    assert "| run | status |" in printed
    assert f"Report: {out.resolve()}" in printed and "Runs: MLflow experiment" in printed

    reports = report_runs(client)
    assert len(reports) == before + 1 and reports[0].info.run_name == "report"
    assert {f.path for f in client.list_artifacts(reports[0].info.run_id)} == {
        "ablation.md", "ablation.csv", "style_vs_memory.png", "loss_curves.png", "grids.png"}

    # A second report: a new report run, and no report run among the rows.
    assert main(["--study", "naruto", "--tracking-uri", study, "--out", str(out)]) == 0
    assert read_csv(out / "ablation.csv")[1] == rows
    assert len(report_runs(client)) == before + 2


def test_sort_by_another_column(study, tmp_path):
    out = tmp_path / "report"
    assert main(["--study", "naruto", "--tracking-uri", study, "--out", str(out),
                 "--sort-by", "peak_memory_gib", "--no-ascending"]) == 0
    assert [row[0] for row in read_csv(out / "ablation.csv")[1]] == ["attn", "all", "te_all"]


def test_unknown_study_and_column_are_clear_errors(study, tmp_path, capsys):
    assert main(["--study", "nope", "--tracking-uri", study, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "no study 'nope'" in err and "naruto" in err  # names the studies that do exist
    assert main(["--study", "naruto", "--tracking-uri", study, "--out", str(tmp_path / "r"),
                 "--sort-by", "bogus"]) == 2
    assert "not a column" in capsys.readouterr().err

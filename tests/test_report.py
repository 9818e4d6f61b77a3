"""Tests of sdxl_ablate.report: sweeps, seeds, the verdict and the table from run records
(pure), and a whole report of two sweeps built by hand in a temporary MLflow store."""

from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from sdxl_ablate.evaluate.grid import grid_layout
from sdxl_ablate.report.analysis import SCORES, Stat, analyse, pareto_set, within_noise
from sdxl_ablate.report.runs import ReportError, RunRecord, select_runs
from sdxl_ablate.report.study import main
from sdxl_ablate.report.tables import table_rows, verdict


def rec(name, run_id, *, seed=0, sweep="s1", status="ok", t=0, kind=None, params=None, **metrics) -> RunRecord:
    tags = {"status": status, **({"sweep_id": sweep} if sweep else {}), **({"kind": kind} if kind else {})}
    metrics = {k.replace("__", "/"): v for k, v in metrics.items()}
    return RunRecord(name, run_id, t, tags, metrics, params if params is not None else
                     {"lora.targets": name, "trainer.seed": str(seed), "tracking.uri": f"x{run_id}"})


# --------------------------------------------------------------------------- sweeps


def test_latest_sweep_by_default_others_on_request_and_legacy_runs_as_one_sweep():
    runs = [
        rec("a", "old1", sweep=None, t=1), rec("b", "old2", sweep=None, t=2),  # before sweep ids: "legacy"
        rec("a", "s1a", sweep="s1", t=10), rec("b", "s1b", sweep="s1", t=11),
        rec("a", "s2a", sweep="s2", t=20),
        rec("report", "rep", sweep="s2", t=30, kind="report"), rec("sweep s2", "par", sweep="s2", t=19, kind="sweep"),
    ]
    chosen, ids = select_runs(runs)
    assert ids == ["s2"] and [r.run_id for r in chosen] == ["s2a"]  # the report and parent runs left out
    assert [r.run_id for r in select_runs(runs, sweep="s1")[0]] == ["s1a", "s1b"]
    assert [r.run_id for r in select_runs(runs, sweep="legacy")[0]] == ["old1", "old2"]
    merged, ids = select_runs(runs, all_sweeps=True)
    assert ids == ["legacy", "s1", "s2"] and len(merged) == 5
    with pytest.raises(ReportError, match=r"--sweep 'nope' is not a sweep.*legacy .*2 runs.*s1 .*s2 "):
        select_runs(runs, sweep="nope")


# --------------------------------------------------------------------------- seeds and noise


def test_seeds_are_one_variant_with_mean_and_spread_and_noise_marks():
    style = {"a": [0.80, 0.82, 0.81], "b": [0.805, 0.79, 0.80], "c": [0.70, 0.71, 0.69]}
    runs = [rec(f"trainer.seed={i},variant={v}", f"{v}{i}", seed=i, eval__clip_style=s, eval__clip_style_base=0.75,
                memory__peak_rss_gib={"a": 2.0, "b": 1.0, "c": 3.0}[v] + i * 0.01,
                params={"variant": v, "trainer.seed": str(i)})
            for v, scores in style.items() for i, s in enumerate(scores)]
    a = analyse(runs)
    assert a.score.metric == "eval/clip_style"
    assert [v.name for v in a.variants] == ["a", "b", "c"]
    best = a.variants[0].stat("eval/clip_style")
    assert best == Stat(pytest.approx(0.81), pytest.approx(statistics.stdev([0.80, 0.82, 0.81])), 3)
    # b differs from a by 0.012 with a standard error of ~0.0088: within noise; c by 0.11: not.
    assert [v.name for v in a.close_to_best] == ["b"] and a.noise_known
    assert a.pareto == ["b", "a"]  # b: least memory; a: best score; c: dominated by both
    lines = verdict(a)
    assert lines[0].startswith("- **Best on CLIP style score (higher is better): a**, 0.8100 ± 0.0100 over 3 seeds")
    assert "+0.0600 over the base model (0.7500)" in lines[0] and "peak memory 2.01 ± 0.01 GiB (CPU RSS)" in lines[0]
    assert lines[1].startswith("- Within noise of the best") and ": b." in lines[1]
    rows = table_rows(a)
    assert rows[0][:5] == ["base model", "no LoRA", "", "0.7500", ""]
    assert rows[1][0] == "a" and rows[1][2] == "0,1,2" and rows[1][3] == "0.8100 ± 0.0100"
    assert rows[1][11] == "best; Pareto" and rows[2][11] == "within noise of best; Pareto" and rows[3][11] == ""


def test_within_noise_needs_two_seeds_and_says_so():
    assert within_noise(Stat(1.0, None, 1), Stat(0.0, None, 1)) is None
    assert within_noise(Stat(1.0, 0.1, 4), Stat(0.95, 0.1, 4)) is True  # 0.05 <= 2 * 0.0707
    assert within_noise(Stat(1.0, 0.1, 4), Stat(0.8, 0.1, 4)) is False
    a = analyse([rec("a", "1", train__final_loss=0.2), rec("b", "2", train__final_loss=0.1)])
    assert a.score.metric == "train/final_loss" and a.best.name == "b"  # no eval: lowest loss wins
    assert any("One seed per variant: no noise estimate" in line for line in verdict(a))


def test_pareto_set():
    lower = SCORES["eval/heldout_loss"]
    assert pareto_set({"x": (0.5, 2.0), "y": (0.4, 3.0), "z": (0.6, 1.0), "w": (0.6, 2.5)}, lower) == ["z", "x", "y"]
    higher = SCORES["eval/clip_style"]
    assert pareto_set({"x": (0.5, 2.0), "y": (0.5, 2.0), "z": (0.4, 2.0)}, higher) == ["x", "y"]


def test_failed_no_effect_and_unevaluated_variants_are_listed_with_why():
    runs = [
        rec("good", "1", eval__heldout_loss=0.5, eval__heldout_loss_base=0.6),
        rec("flat", "2", eval__heldout_loss=0.6, eval__heldout_loss_base=0.6),
        rec("noeval", "3", train__final_loss=0.3),
        rec("big", "4abcdefgh", status="oom", memory__peak_reserved_gib=15.9),
    ]
    runs[1].tags.update(no_effect="true", no_effect_reason="held-out loss within noise of the base")
    runs[2].tags.update(eval_status="failed", eval_error="ClipLoadError: no weights\ntraceback")
    runs[3].tags["error"] = "OutOfMemoryError: CUDA out of memory\nmore"
    a = analyse(runs)
    assert a.score.metric == "eval/heldout_loss" and a.best.name == "good"
    lines = verdict(a)
    assert "- No effect: flat: held-out loss within noise of the base." in lines
    assert "- Trained but not evaluated: noeval: ClipLoadError: no weights." in lines
    assert "- Failed: big: oom: OutOfMemoryError: CUDA out of memory (run 4abcdefg)." in lines
    notes = {row[0]: row[11] for row in table_rows(a)}
    assert notes["flat"] == "no effect"  # no memory measured: no Pareto set
    assert notes["noeval"] == "not evaluated" and notes["big"] == "oom"
    assert [v.name for v in a.variants][-1] == "big"  # failed last
    with pytest.raises(ReportError, match="--score 'eval/nope' is not a score"):
        analyse(runs, "eval/nope")
    with pytest.raises(ReportError, match="--score eval/clip_style: no finished run measured it"):
        analyse(runs, "eval/clip_style")


# --------------------------------------------------------------------------- a whole study in MLflow


def make_run(client, exp, name, tags, metrics, params=None, losses=(), images=None) -> str:
    run_id = client.create_run(exp, run_name=name, tags=tags).info.run_id
    for key, value in metrics.items():
        client.log_metric(run_id, key, value, step=0)
    for key, value in (params or {}).items():
        client.log_param(run_id, key, value)
    for step, loss in enumerate(losses):
        client.log_metric(run_id, "train/loss", loss, step=step)
    if images is not None:
        client.log_artifacts(run_id, str(images / "images"), "eval/images")
        client.log_artifact(run_id, str(images / "scores.json"), "eval")
    client.set_terminated(run_id, "FINISHED" if tags.get("status") == "ok" else "FAILED")
    return run_id


def eval_images(folder: Path, colour: str, prompts=("a cat", "a dog"), seeds=(0, 1)) -> Path:
    import json

    (folder / "images").mkdir(parents=True)
    jobs = []
    for i, (p, s) in enumerate((p, s) for p in prompts for s in seeds):
        Image.new("RGB", (64, 64), "white").save(folder / "images" / f"base_{i}.png")
        Image.new("RGB", (64, 64), colour).save(folder / "images" / f"lora_{i}.png")
        jobs.append({"index": i, "prompt": p, "seed": s, "clip_style": 0.5 + i / 10, "clip_style_base": 0.4})
    (folder / "scores.json").write_text(json.dumps({"images": jobs}))
    return folder


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """An old sweep (s1: one run) and a new one (s2: attn x 2 seeds, all, te_all oom) -> (uri, run ids)."""
    tmp = tmp_path_factory.mktemp("study")
    uri = f"sqlite:///{tmp}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("naruto", artifact_location=(tmp / "artifacts").as_uri())
    ids = {}
    ids["old"] = make_run(client, exp, "variant=attn", {"status": "ok", "sweep_id": "s1", "kind": "variant"},
                          {"eval/clip_style": 0.1}, {"variant": "attn", "trainer.seed": "0"})
    for seed, style in ((0, 0.7123456789), (1, 0.7323456789)):
        ids[f"attn{seed}"] = make_run(
            client, exp, f"trainer.seed={seed},variant=attn",
            {"status": "ok", "sweep_id": "s2", "kind": "variant", "lora.targets": "attn"},
            {"eval/clip_style": style, "eval/clip_style_base": 0.6, "memory/peak_reserved_gib": 10.5 + seed / 100,
             "perf/images_per_s": 2.0}, {"variant": "attn", "trainer.seed": str(seed)}, losses=[0.3, 0.2, 0.1],
            images=eval_images(tmp / f"img{seed}", "red"))
    ids["all"] = make_run(client, exp, "variant=all", {"status": "ok", "sweep_id": "s2", "kind": "variant",
                                                       "lora.targets": "all"},
                          {"eval/clip_style": 0.8, "eval/clip_style_base": 0.6, "memory/peak_reserved_gib": 12.0},
                          {"variant": "all", "trainer.seed": "0"}, losses=[0.4, 0.3],
                          images=eval_images(tmp / "imgall", "blue"))
    ids["te_all"] = make_run(client, exp, "variant=te_all", {"status": "oom", "sweep_id": "s2", "kind": "variant",
                                                             "error": "OutOfMemoryError: boom"},
                             {"memory/peak_reserved_gib": 15.98}, {"variant": "te_all", "trainer.seed": "0"})
    make_run(client, exp, "sweep s2", {"kind": "sweep", "sweep_id": "s2", "status": "ok"}, {})
    return uri, ids


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def report_runs(client: MlflowClient) -> list:
    exp = client.get_experiment_by_name("naruto").experiment_id
    return client.search_runs([exp], filter_string="tags.kind = 'report'")


def test_report_of_the_latest_sweep(study, tmp_path, capsys):
    uri, ids = study
    out = tmp_path / "report"
    client = MlflowClient(uri)
    before = len(report_runs(client))
    assert main(["--study", "naruto", "--tracking-uri", uri, "--out", str(out)]) == 0

    md = (out / "ablation.md").read_text()
    assert md.startswith("# Ablation report: study `naruto`\n\nsweep s2, started ")
    assert "**Best on CLIP style score (higher is better): all**, 0.8000; +0.2000 over the base model (0.6000)" in md
    assert "- Failed: te_all: oom: OutOfMemoryError: boom" in md
    assert "| base model | no LoRA |" in md and "| attn |" in md and "0.7223 ± 0.0141" in md
    assert ids["old"] not in md and ids["attn0"] in md and ids["attn1"] in md  # the runs section: full ids
    assert "sweep s1" not in md

    variants = read_csv(out / "ablation.csv")
    assert [v["variant"] for v in variants] == ["all", "attn", "te_all"]
    attn = variants[1]
    assert float(attn["eval/clip_style mean"]) == (0.7123456789 + 0.7323456789) / 2  # full precision
    assert math.isclose(float(attn["eval/clip_style std"]), statistics.stdev([0.7123456789, 0.7323456789]))
    assert attn["run_ids"] == f"{ids['attn0']} {ids['attn1']}" and attn["seeds"] == "0 1"
    runs = read_csv(out / "runs.csv")
    assert {r["run_id"] for r in runs} == {ids["attn0"], ids["attn1"], ids["all"], ids["te_all"]}
    assert {r["eval/clip_style"] for r in runs if r["run_id"] == ids["attn0"]} == {"0.7123456789"}

    grids = sorted(out.glob("grid_*.png"))
    assert [g.name for g in grids] == ["grid_1_a_cat.png", "grid_2_a_dog.png"]
    grid = Image.open(grids[0]).convert("RGB")
    # base + all + attn rows, 2 seed columns of 64 px tiles shown at 256 px (4x, nearest), with a
    # label column, a title, a header and a caption under each tile (evaluate/grid.py's layout).
    layout = grid_layout((256, 256), 2, rows=3, captions=True, title_lines=2)
    assert grid.size[1] == layout.size[1] and grid.size[0] >= layout.size[0]
    import numpy as np

    blue = int((np.asarray(grid) == (0, 0, 255)).all(axis=-1).sum())
    assert blue == 2 * 256 * 256  # the "all" row: two tiles, every pixel kept
    for name in ("score_vs_memory.png", "loss_curves.png"):
        assert Image.open(out / name).size[0] > 500

    printed = capsys.readouterr().out
    assert "## Verdict" in printed and f"Report: {(out / 'ablation.md').resolve()}" in printed
    reports = report_runs(client)
    assert len(reports) == before + 1 and reports[0].info.run_name == "report s2"
    assert reports[0].data.tags["sweep_id"] == "s2"
    assert {f.path for f in client.list_artifacts(reports[0].info.run_id)} >= {
        "ablation.md", "ablation.csv", "runs.csv", "score_vs_memory.png", "loss_curves.png", "grid_1_a_cat.png"}

    # A second report: the report run is not among the variants.
    assert main(["--study", "naruto", "--tracking-uri", uri, "--out", str(out), "--no-log"]) == 0
    assert [v["variant"] for v in read_csv(out / "ablation.csv")] == ["all", "attn", "te_all"]
    assert len(report_runs(client)) == before + 1  # --no-log


def test_other_sweeps_on_request_and_clear_errors(study, tmp_path, capsys):
    uri, ids = study
    out = tmp_path / "r"
    assert main(["--study", "naruto", "--tracking-uri", uri, "--out", str(out), "--sweep", "s1", "--no-log"]) == 0
    assert [r["run_id"] for r in read_csv(out / "runs.csv")] == [ids["old"]]
    assert main(["--study", "naruto", "--tracking-uri", uri, "--out", str(out), "--all-sweeps", "--no-log"]) == 0
    assert len(read_csv(out / "runs.csv")) == 5
    # attn from s1 and the seeds of attn from s2 differ only in the seed: one variant of 3 runs.
    assert {v["variant"]: v["runs"] for v in read_csv(out / "ablation.csv")}["attn"] == "3"
    capsys.readouterr()
    assert main(["--study", "nope", "--tracking-uri", uri, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "no study 'nope'" in err and "naruto" in err
    assert main(["--study", "naruto", "--tracking-uri", uri, "--out", str(out), "--sweep", "zzz"]) == 2
    assert "--sweep 'zzz' is not a sweep of this study; its sweeps: s1 (" in capsys.readouterr().err

"""Tests of sdxl_ablate.report: sweeps, seeds, the verdict and the table from run records
(pure), and a whole report of two sweeps built by hand in a temporary MLflow store."""

from __future__ import annotations

import csv
import json
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
    assert a.best is None and a.leader.name == "a"  # a difference within 2 SE is never "best"
    # b: least memory (1 GiB apart, beyond the 128 MiB floor) and a score that ties a's: it
    # dominates a; c is worse on both.
    assert a.pareto == ["b"]
    lines = verdict(a)
    assert lines[0].startswith("- **No single best on CLIP style score (higher is better)**: a, b are within 2 SE "
                               "of the top; the data")
    se = 0.01 / math.sqrt(3)  # the spread across seeds, std / sqrt(n)
    assert f"Top: a, 0.8100 ± {se:.4f} over 3 seeds; +0.0600 ± {se:.4f} vs the base model (0.7500)" in lines[0]
    assert "peak memory 2.01 ± 0.01 GiB (CPU RSS)" in lines[0]
    assert any(line.startswith("- Noise: standard errors (SE) from the spread across seeds (3 per variant)")
               for line in lines)
    rows = table_rows(a)
    assert rows[0][:5] == ["base model", "no LoRA", "", "0.7500", ""]
    assert rows[1][0] == "a" and rows[1][2] == "0,1,2" and rows[1][3] == f"0.8100 ± {se:.4f}"
    assert rows[1][11] == "top, not separated" and rows[2][11] == "within noise of top; Pareto" and rows[3][11] == ""


def test_within_noise_needs_two_seeds_and_says_so():
    assert within_noise(Stat(1.0, None, 1), Stat(0.0, None, 1)) is None
    assert within_noise(Stat(1.0, 0.1, 4), Stat(0.95, 0.1, 4)) is True  # 0.05 <= 2 * 0.0707
    assert within_noise(Stat(1.0, 0.1, 4), Stat(0.8, 0.1, 4)) is False
    a = analyse([rec("a", "1", train__final_loss=0.2), rec("b", "2", train__final_loss=0.1)])
    # No eval and one seed: no noise estimate, so no "best", only the top of the ranking.
    assert a.score.metric == "train/final_loss" and a.leader.name == "b" and a.best is None
    lines = verdict(a)
    assert lines[0].startswith("- **No single best on final training loss")
    assert any("one seed per variant and no per-run standard error for this score: no noise estimate" in line
               for line in lines)


def test_pareto_set():
    lower = SCORES["eval/heldout_loss"]
    assert pareto_set({"x": (0.5, 2.0), "y": (0.4, 3.0), "z": (0.6, 1.0), "w": (0.6, 2.5)}, lower) == ["z", "x", "y"]
    higher = SCORES["eval/clip_style"]
    assert pareto_set({"x": (0.5, 2.0), "y": (0.5, 2.0), "z": (0.4, 2.0)}, higher) == ["x", "y"]


def test_failed_no_effect_and_unevaluated_variants_are_listed_with_why():
    runs = [
        rec("good", "1", eval__heldout_loss=0.5, eval__heldout_loss_base=0.6, eval__heldout_loss_se=0.01),
        rec("flat", "2", eval__heldout_loss=0.6, eval__heldout_loss_base=0.6, eval__heldout_loss_se=0.01),
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
    # The fixture's sweep parent predates n_jobs: its completeness is said, not guessed.
    assert md.startswith("Sweep s2: 4 jobs done (jobs planned: not recorded).\n\n"
                         "# Ablation report: study `naruto`\n\nsweep s2, started ")
    # all (one seed, no per-run SE) and attn (two seeds) cannot be separated: no "best".
    assert ("**No single best on CLIP style score (higher is better)**: all, attn are within 2 SE of the top or have "
            "no noise estimate") in md
    assert "Top: all, 0.8000; +0.2000 vs the base model (0.6000)" in md
    assert "- Noise: 1 to 2 seeds per variant" in md
    assert "- Failed: te_all: oom: OutOfMemoryError: boom" in md
    assert "| base model | no LoRA |" in md and "| attn |" in md and "0.7223 ± 0.0100" in md
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


# --------------------------------------------------------------------------- noise and validity (issue 19)


def demo_like_runs(**extra) -> list[RunRecord]:
    """Six single-seed variants shaped like the demo's: a random CLIP (eval=tiny), a held-out
    loss with its per-run SE, and CPU peaks within 55 MB of each other."""
    held = {"te_all": 0.8484, "all": 0.8485, "te_attn": 1.0532, "attn": 1.0614, "drop": 1.0659, "dora": 1.0943}
    style = {"te_all": 0.9790, "all": 0.9788, "te_attn": 0.9763, "attn": 0.9757, "drop": 0.9759, "dora": 0.9782}
    speed = {"te_all": 7.0, "all": 12.0, "te_attn": 8.2, "attn": 12.8, "drop": 10.9, "dora": 8.1}
    runs = []
    for i, v in enumerate(held):
        r = rec(v, f"{v}-id", params={"variant": v, "trainer.seed": "0", "eval.clip_model": "tiny"},
                eval__heldout_loss=held[v], eval__heldout_loss_base=1.0943, eval__heldout_loss_se=0.015,
                eval__heldout_loss_delta_se=0.010 if v != "dora" else 1e-6,
                eval__clip_style=style[v], eval__clip_style_base=0.9782, eval__clip_style_se=0.001,
                eval__clip_style_lift_se=0.0005, memory__peak_rss_gib=1.39 + 0.01 * i,
                perf__images_per_s=speed[v], params__trainable=1000 * (i + 1), **extra)
        r.tags["clip_scorer"] = "smoke test: random CLIP"
        runs.append(r)
    return runs


def test_a_random_clip_never_ranks_and_is_labelled_wherever_it_appears(tmp_path):
    from sdxl_ablate.report.figures import plot_score_vs_memory
    from sdxl_ablate.report.tables import render_markdown, write_variants_csv

    runs = demo_like_runs()
    a = analyse(runs)
    assert a.score.metric == "eval/heldout_loss" and not a.score.random_clip  # ranked by held-out loss
    md = render_markdown("demo", a, runs, ["s1"], "sqlite://", [])
    assert "CLIP scores are a **smoke test: random CLIP** (`eval=tiny`, random weights): not used" in md
    header = md.split("## Variants")[1].splitlines()[2]
    assert "CLIP prompt score (smoke test: random CLIP)" in header
    assert "CLIP style score (smoke test: random CLIP)" in header
    write_variants_csv(a, tmp_path / "a.csv")
    assert {row["clip_scorer"] for row in read_csv(tmp_path / "a.csv")} == {"smoke test: random CLIP"}
    from sdxl_ablate.report.tables import write_runs_csv

    write_runs_csv(runs, tmp_path / "r.csv")
    assert {row["clip_scorer"] for row in read_csv(tmp_path / "r.csv")} == {"smoke test: random CLIP"}
    # Asked for by name, the random CLIP ranks, and says what it is in the verdict and the plot.
    b = analyse(runs, "eval/clip_style")
    assert b.score.random_clip and b.score.title == "CLIP style score (smoke test: random CLIP)"
    assert verdict(b)[0].startswith("- **smoke test: random CLIP**: the CLIP scores come from `eval=tiny`")
    fig = plot_score_vs_memory(b, tmp_path / "p.png")
    assert "smoke test: random CLIP" in fig.axes[0].get_ylabel()


def test_a_difference_within_two_se_is_never_best_and_the_tie_is_broken_by_cost():
    a = analyse(demo_like_runs())
    # te_all and all differ by 0.0001 with a held-out SE of 0.015 each: one group, no best.
    assert a.best is None and a.leader.name == "te_all" and [v.name for v in a.close_to_best] == ["all"]
    lines = verdict(a)
    tie = next(line for line in lines if line.startswith("- **No single best on held-out loss"))
    assert "te_all, all are within 2 SE of the top; the data do not separate them" in tie and "-0.2459 ± 0.0100 vs the base model (1.0943)" in tie
    assert "- Among them, all is the fastest: 12.00 images/s, 1.7x te_all's 7.00 (one timing per run)." in lines
    # Against the base model: the held-out loss fell beyond 2 SE for all but dora (within its SE).
    base = next(line for line in lines if line.startswith("- Against the base model"))
    assert "better (lower) beyond 2 SE: te_all, all, te_attn, attn, drop" in base
    assert "worse" not in base
    rows = {row[0]: row for row in table_rows(a)}
    assert rows["te_all"][3] == "0.8484 ± 0.0150" and rows["te_all"][4] == "-0.2459 ± 0.0100"
    assert rows["te_all"][11] == "top, not separated" and rows["all"][11] == "within noise of top"


def test_single_runs_on_the_same_samples_are_paired():
    # Two runs whose held-out losses differ by a steady 0.01 per pair, each pair's loss spread
    # widely: unpaired (SE 0.03 each) they tie, paired they separate.
    spread = [0.5, 0.9, 0.7, 1.1, 0.6, 1.0, 0.8, 1.2]
    a_run = rec("a", "a", eval__heldout_loss=statistics.fmean(spread), eval__heldout_loss_se=0.03)
    b_run = rec("b", "b", eval__heldout_loss=statistics.fmean(spread) + 0.01, eval__heldout_loss_se=0.03)
    assert analyse([a_run, b_run]).best is None  # without the pairs
    a_run.units["eval/heldout_loss"] = spread
    b_run.units["eval/heldout_loss"] = [x + 0.01 + (0.001 if i % 2 else -0.001) for i, x in enumerate(spread)]
    a = analyse([a_run, b_run])
    assert a.best is not None and a.best.name == "a"
    assert verdict(a)[0].startswith("- **Best on held-out loss (lower is better): a**")


def test_memory_within_the_noise_floor_is_a_tie_and_makes_no_pareto_claim(tmp_path):
    from sdxl_ablate.report.figures import plot_score_vs_memory

    a = analyse(demo_like_runs())
    assert a.memory_tied and a.pareto == [] and a.memory_floor_gib == 0.125
    line = next(line for line in verdict(a) if line.startswith("- Peak memory"))
    assert "every variant within 51 MiB of the others, under the noise floor of 128 MiB: a tie" in line
    assert all("Pareto" not in row[11] for row in table_rows(a))
    # The plot shows the noise and does not stretch an axis below it: the score axis spans at least
    # 4 SE (0.06), the memory axis at least 4 floors (0.5 GiB), though the data span less.
    fig = plot_score_vs_memory(a, tmp_path / "p.png")
    ax = fig.axes[0]
    assert ax.get_ylim()[1] - ax.get_ylim()[0] >= 4 * 0.015 - 1e-9
    assert ax.get_xlim()[1] - ax.get_xlim()[0] >= 4 * 0.125 - 1e-9
    assert "error bars: ±1 SE of the evaluation (one seed" in ax.get_title() and "a tie: no Pareto front" in ax.get_title()
    # Beyond the floor, memory counts again: dora needs the least, te_all and all tie on both
    # score and memory (neither dominates the other), the rest are worse on the score.
    runs = demo_like_runs()
    runs[-1].metrics["memory/peak_rss_gib"] = 0.5
    assert analyse(runs).pareto == ["dora", "te_all", "all"]


def test_weighted_training_losses_are_marked_and_not_compared():
    runs = demo_like_runs()
    runs[-1].metrics.update({"train/final_loss": 1.16, "train/final_weighted_loss": 1.03})
    runs[-2].params["trainer.snr_gamma"] = "5.0"  # an old min-SNR run: its train/loss is weighted
    a = analyse(runs)
    rows = {row[0]: row for row in table_rows(a)}
    assert "min-SNR objective 1.0300 (not compared)" in rows["dora"][11]
    assert "train loss min-SNR weighted (logged before issue 19): not comparable" in rows["drop"][11]
    lines = verdict(a)
    assert any(line.startswith("- dora trains on a min-SNR weighted objective (1.0300)") for line in lines)


def test_a_report_per_sweep_an_incomplete_one_says_so_and_never_replaces_a_complete_one(tmp_path, monkeypatch, capsys):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("st", artifact_location=(tmp_path / "artifacts").as_uri())
    params = {"trainer.seed": "0"}
    # s1: complete, two jobs planned and done.
    make_run(client, exp, "sweep s1", {"kind": "sweep", "sweep_id": "s1", "n_jobs": "2", "n_ok": "2"}, {})
    for v in ("a", "b"):
        make_run(client, exp, v, {"status": "ok", "sweep_id": "s1", "kind": "variant"},
                 {"train/final_loss": 0.5}, {**params, "variant": v})
    # s2: three jobs planned, killed after one finished and one was cut off mid-run.
    parent = client.create_run(exp, run_name="sweep s2", tags={"kind": "sweep", "sweep_id": "s2", "n_jobs": "3"})
    make_run(client, exp, "a seed=1", {"status": "ok", "sweep_id": "s2", "kind": "variant"},
             {"train/final_loss": 0.4}, {"variant": "a", "trainer.seed": "1"})
    cut = client.create_run(exp, run_name="b seed=1", tags={"sweep_id": "s2", "kind": "variant"}).info.run_id
    client.set_terminated(cut, "KILLED")
    monkeypatch.chdir(tmp_path)
    assert main(["--study", "st", "--tracking-uri", uri, "--sweep", "s1", "--no-log"]) == 0
    complete = (tmp_path / "reports/st/s1/ablation.md").read_text()
    assert complete.startswith("Complete sweep s1: 2 of 2 jobs done.")
    assert (tmp_path / "reports/st/latest").resolve() == (tmp_path / "reports/st/s1").resolve()

    capsys.readouterr()
    assert main(["--study", "st", "--tracking-uri", uri, "--no-log"]) == 0  # the latest sweep: s2
    partial = (tmp_path / "reports/st/s2/ablation.md").read_text()
    assert partial.startswith("**Incomplete sweep s2: 2 of 3 jobs done, the sweep did not finish")
    # The cut-off run shows as killed, not running; the seed phrase is one, and the date is s2's own.
    assert f"| {cut} | " in partial and "| b | 1 | killed |" in partial and "running" not in partial
    assert "one seed per variant" in partial and "3 seeds" not in partial
    started = client.get_run(parent.info.run_id).info.start_time
    from sdxl_ablate.report.runs import date_of
    assert f"started {date_of(started)}" in partial
    # s1's report is untouched and latest still points at it, as the terminal says.
    assert (tmp_path / "reports/st/s1/ablation.md").read_text() == complete
    assert (tmp_path / "reports/st/latest").resolve() == (tmp_path / "reports/st/s1").resolve()
    printed = capsys.readouterr().out
    assert "still points at the complete sweep s1" in printed
    assert printed.splitlines()[0].startswith("**Incomplete sweep s2")
    assert "## Variants" not in printed and "| Variant |" not in printed  # the verdict, not the table
    # Merged sweeps get their own folder and never move latest.
    assert main(["--study", "st", "--tracking-uri", uri, "--all-sweeps", "--no-log"]) == 0
    assert (tmp_path / "reports/st/all-sweeps/ablation.md").is_file()
    assert (tmp_path / "reports/st/latest").resolve() == (tmp_path / "reports/st/s1").resolve()
    printed += capsys.readouterr().out
    # One click to the sweep's variants in the MLflow UI, sorted by the headline of the ranking score.
    exp_id = client.get_experiment_by_name("st").experiment_id
    assert (f"MLflow UI (make mlflow-ui): http://127.0.0.1:5000/#/experiments/{exp_id}/runs?searchFilter="
            "tags.kind%20%3D%20%27variant%27%20and%20tags.sweep_id%20%3D%20%27s2%27"
            "&orderByKey=metrics.%60ablation%2Ffinal_loss%60&orderByAsc=true") in printed
    # Logged, the report stores that view in the experiment (the UI's shared view): filter, sort
    # and the headline columns, under the sweep's key and, for the latest complete sweep, "ablation".
    client.log_metric(client.search_runs([exp_id], "attributes.run_name = 'a'")[0].info.run_id,
                      "ablation/final_loss", 0.5)
    assert main(["--study", "st", "--tracking-uri", uri, "--sweep", "s1"]) == 0
    assert (f"MLflow UI (make mlflow-ui): http://127.0.0.1:5000/#/experiments/{exp_id}/runs"
            "?viewStateShareKey=ablation-s1&workflowType=machine_learning") in capsys.readouterr().out
    tags = client.get_experiment(exp_id).tags
    view = json.loads(tags["mlflow.sharedViewState.ablation-s1"])
    assert view == {"searchFilter": "tags.kind = 'variant' and tags.sweep_id = 's1'",
                    "orderByKey": "metrics.`ablation/final_loss`", "orderByAsc": True, "startTime": "ALL",
                    "selectedColumns": ["metrics.`ablation/final_loss`"]}
    assert json.loads(tags["mlflow.sharedViewState.ablation"]) == view


def test_an_older_sweep_never_takes_latest_from_a_newer_one(tmp_path):
    from sdxl_ablate.report.study import COMPLETE_MARK, link_latest

    for name in ("s1", "s2"):
        (tmp_path / name).mkdir()
    assert link_latest(tmp_path, tmp_path / "s2", True, ["s1", "s2"]) is None
    assert (tmp_path / "s2" / COMPLETE_MARK).exists()
    assert link_latest(tmp_path, tmp_path / "s1", True, ["s1", "s2"]) == f"{tmp_path / 'latest'} still points at the newer sweep s2"
    assert (tmp_path / "latest").resolve() == (tmp_path / "s2").resolve()


def test_a_stopped_sweep_is_incomplete_even_with_its_counts_recorded():
    from sdxl_ablate.report.runs import SweepParent, completeness

    runs = [rec("a", "1", sweep="s3"), rec("b", "2", sweep="s3", status="killed")]
    parents = {"s3": SweepParent("s3", 0, 3, ended=False, killed=True)}
    state = completeness(runs, "s3", parents)
    assert not state.complete
    assert state.line("s3").startswith("**Incomplete sweep s3: 2 of 3 jobs done, the sweep was stopped.**")


def test_every_axis_that_varies_is_named_in_the_table():
    """Merged sweeps can differ in any axis of config/identity.AXES (rank, alpha, ...), not only the
    study's six: each is named in "What differs", none is a KeyError."""
    runs = [rec("a", "1", eval__heldout_loss=0.5, eval__heldout_loss_base=0.6, eval__heldout_loss_se=0.01),
            rec("b", "2", eval__heldout_loss=0.55, eval__heldout_loss_base=0.6, eval__heldout_loss_se=0.01)]
    runs[0].tags.update({"lora.rank": "16", "lora.alpha": "32", "lora.targets": "attn"})
    runs[1].tags.update({"lora.rank": "4", "lora.alpha": "4", "lora.targets": "attn"})
    a = analyse(runs)
    assert set(a.axes_that_vary) == {"lora.rank", "lora.alpha"}
    differs = {row[0]: row[1] for row in table_rows(a)}
    assert differs["a"] == "rank=16, alpha=32" and differs["b"] == "rank=4, alpha=4"

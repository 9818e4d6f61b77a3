"""make ui-check: the MLflow UI in headless chromium over a small study (skipped without chromium)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from tests.e2e.ui_check import main

pytestmark = pytest.mark.slow
needs_chromium = pytest.mark.skipif(not Path("/usr/bin/chromium").exists() and not shutil.which("chromium"),
                                    reason="needs chromium (apt-get install -y chromium)")


def make_study(tmp_path: Path, with_summary: bool) -> str:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("uistudy", artifact_location=(tmp_path / "artifacts").as_uri())
    for name, memory in (("variant=attn", 1.25), ("variant=all", 1.5)):
        tags = {"kind": "variant", "sweep_id": "abc123", "status": "ok"}
        run_id = client.create_run(exp, run_name=name, tags=tags).info.run_id
        metrics = {"train/final_loss": 0.5, "memory/peak_rss_gib": memory, "perf/images_per_s": 2.0}
        if with_summary:
            metrics.update({"ablation/peak_memory_gib": memory, "ablation/images_per_s": 2.0,
                            "ablation/final_loss": 0.5})
        for k, v in metrics.items():
            client.log_metric(run_id, k, v)
        for step in range(4):
            client.log_metric(run_id, "train/loss", 1.0 / (step + 1), step=step)
        client.log_metric(run_id, "train/steps", 4)
        for key in ("samples/a_cat_seed0", "samples/a_dog_seed0"):  # as samples.py logs them
            for step in (0, 4):
                client.log_image(run_id, Image.new("RGB", (64, 64), (40 * step, 90, 160)), key=key, step=step)
        client.set_terminated(run_id, "FINISHED")
    if with_summary:  # what the report leaves in the experiment: its view of the sweep
        from sdxl_ablate.report.runs import read_runs
        from sdxl_ablate.report.study import LATEST_VIEW, ui_link, ui_view

        ui_link(client, "uistudy", ui_view(read_runs(client, "uistudy", None), ["abc123"], "train/final_loss"),
                [LATEST_VIEW])
    return uri


@needs_chromium
def test_ui_check_screenshots_the_study(tmp_path, capsys):
    uri = make_study(tmp_path, with_summary=True)
    out = tmp_path / "ui"
    assert main(["--study", "uistudy", "--tracking-uri", uri, "--out", str(out)]) == 0, capsys.readouterr().err
    for name in ("first_screen", "runs_table", "chart_view", "loss_overlay", "compare_runs", "image_slider"):
        image = Image.open(out / f"{name}.png")
        assert image.size == (1680, 1050)
        import numpy as np

        assert len(np.unique(np.asarray(image.convert("L").resize((64, 40))))) > 20  # a rendered page, not blank
    assert "ui-check ok: 2 runs of sweep abc123" in capsys.readouterr().out


@needs_chromium
def test_ui_check_fails_when_headline_metrics_are_missing(tmp_path, capsys):
    uri = make_study(tmp_path, with_summary=False)
    assert main(["--study", "uistudy", "--tracking-uri", uri, "--out", str(tmp_path / "ui")]) == 1
    err = capsys.readouterr().err
    assert "lacks ablation/peak_memory_gib, ablation/images_per_s, ablation/final_loss" in err


def test_ui_check_unknown_study_is_a_clear_error(tmp_path, capsys):
    uri = make_study(tmp_path, with_summary=True)
    assert main(["--study", "nope", "--tracking-uri", uri, "--out", str(tmp_path / "ui"),
                 "--chromium", "/bin/true"]) == 2
    assert "no study 'nope'" in capsys.readouterr().err


def test_ui_check_fails_on_a_running_run_before_any_browser(tmp_path, capsys):
    """A run in scope left RUNNING (no status) is named, and no browser is needed to say so."""
    uri = make_study(tmp_path, with_summary=True)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("uistudy").experiment_id
    stuck = client.create_run(exp, run_name="variant=te_all",
                              tags={"kind": "variant", "sweep_id": "abc123"}).info.run_id
    assert main(["--study", "uistudy", "--tracking-uri", uri, "--out", str(tmp_path / "ui"),
                 "--chromium", "/bin/true"]) == 1
    err = capsys.readouterr().err
    assert f"run variant=te_all ({stuck}) is RUNNING (no status recorded)" in err

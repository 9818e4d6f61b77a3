"""A variant end to end into MLflow, and every way it can end: ok, oom, nan, failed."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from mlflow.tracking import MlflowClient

from sdxl_ablate.run import runner
from sdxl_ablate.config import to_typed
from sdxl_ablate.export.lora_export import kohya_filename

from .conftest import ROOT, compose_config, tiny_overrides


def runs_by_name(tmp_path, experiment: str) -> dict:
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name(experiment)
    return {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}, client


@pytest.mark.slow
def test_sweep_runs_one_mlflow_run_per_variant_and_survives_a_bad_one(tmp_path):
    """`python -m sdxl_ablate -m lora.targets=attn,all lora.rank=0,4`: two good, two invalid variants."""
    args = [sys.executable, "-m", "sdxl_ablate", "-m", *tiny_overrides(tmp_path), "study=t",
            "lora.targets=attn,all", "lora.rank=0,4"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]  # exit code: the number of variants not ok
    runs, client = runs_by_name(tmp_path, "t")
    runs = {name: r for name, r in runs.items() if r.data.tags["kind"] == "variant"}
    assert sorted(runs) == sorted(f"data=sample,lora.rank={r},lora.targets={t},model=tiny,trainer.precision=fp32"
                                  for r in (0, 4) for t in ("attn", "all"))
    for name, run in runs.items():
        if "lora.rank=0" in name:
            assert run.data.tags["status"] == "failed"
            assert "lora.rank=0" in run.data.tags["error"]
            assert run.info.status == "FAILED"
            continue
        assert run.data.tags["status"] == "ok" and run.info.status == "FINISHED"
        assert run.data.params["lora.rank"] == "4"
        assert run.data.tags["lora.targets"] in ("attn", "all")
        m = run.data.metrics
        for key in ("train/loss", "train/lr", "train/final_loss", "memory/peak_rss_gib",
                    "perf/step_time_s", "perf/images_per_s", "params/trainable"):
            assert key in m, key
        assert m["perf/images_per_s"] > 0 and 0 < m["memory/peak_rss_gib"] < 24
        assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 3
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"config.yaml", "lora"} <= artifacts
        assert sorted(a.path for a in client.list_artifacts(run.info.run_id, "lora")) == sorted(
            ["lora/pytorch_lora_weights.safetensors", f"lora/{kohya_filename(name)}"])
    attn = next(r for n, r in runs.items() if "rank=4,lora.targets=attn" in n)
    all_ = next(r for n, r in runs.items() if "rank=4,lora.targets=all" in n)
    assert all_.data.metrics["params/trainable"] > attn.data.metrics["params/trainable"]


def run_variant(tmp_path, *extra: str):
    cfg = to_typed(compose_config(tiny_overrides(tmp_path, "study=unit", *extra)))
    result = runner.run(cfg, "variant", tmp_path / "out")
    runs, client = runs_by_name(tmp_path, "unit")
    return result, runs["variant"], client


def test_oom_ends_the_variant_with_status_oom_and_its_peak(tmp_path, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(runner, "train", out_of_memory)
    result, run, _ = run_variant(tmp_path)
    assert result is None
    assert run.data.tags["status"] == "oom" and "Tried to allocate" in run.data.tags["error"]
    assert run.info.status == "FAILED"
    assert run.data.metrics["memory/peak_rss_gib"] > 0


def test_non_finite_losses_in_a_row_end_the_run_with_status_nan(tmp_path, monkeypatch):
    from sdxl_ablate.train import objective

    monkeypatch.setattr(objective, "per_sample_loss", lambda *a, **k: torch.tensor(float("nan"), requires_grad=True))
    result, run, _ = run_variant(tmp_path, "trainer.max_steps=10", "trainer.max_nonfinite_in_row=3")
    assert result is None
    assert run.data.tags["status"] == "nan"
    assert run.data.metrics["train/nonfinite_steps"] == 3
    assert "lora" not in {a.path for a in MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").list_artifacts(run.info.run_id)}


def test_a_missing_data_folder_fails_the_variant_with_the_path_named(tmp_path):
    result, run, client = run_variant(tmp_path, "data=folder", f"data.path={tmp_path}/no_such_dir")
    assert result is None
    assert run.data.tags["status"] == "failed"
    assert "no_such_dir" in run.data.tags["error"]
    assert "error.txt" in {a.path for a in client.list_artifacts(run.info.run_id)}


def test_an_unreachable_model_fails_the_variant_before_training(tmp_path):
    result, run, _ = run_variant(tmp_path, "model=sdxl_base", "model.pretrained=nobody/no-such-model")
    assert result is None
    assert run.data.tags["status"] == "failed"
    assert "nobody/no-such-model" in run.data.tags["error"]
    assert "train/loss" not in run.data.metrics


def test_the_run_logs_the_resolved_config(tmp_path):
    result, run, client = run_variant(tmp_path, "lora.dropout=0.25", "trainer.max_steps=2")
    assert result is not None and result > 0
    assert run.data.params["lora.dropout"] == "0.25"
    assert run.data.params["model.kind"] == "tiny"
    local = client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))
    assert "dropout: 0.25" in open(local).read()


def test_unreadable_images_are_skipped_counted_and_logged(tmp_path):
    from sdxl_ablate.data.datasets import make_sample_dataset

    folder = make_sample_dataset(tmp_path / "imgs", n=6, size=64)
    (folder / next(p.name for p in sorted(folder.glob("*.png")))).write_bytes(b"not a png at all")
    result, run, client = run_variant(tmp_path, "data=folder", f"data.path={folder}", "data.heldout=1",
                                      "data.resolution=64")
    assert result is not None and run.data.tags["status"] == "ok"
    assert run.data.metrics["data/skipped_images"] == 1
    assert run.data.metrics["data/train_images"] == 4
    local = client.download_artifacts(run.info.run_id, "data/skipped_images.txt", str(tmp_path))
    assert ".png" in open(local).read()


def test_a_skipped_non_finite_step_is_counted_and_training_goes_on(tmp_path, monkeypatch):
    from sdxl_ablate.train import objective

    real, calls = objective.per_sample_loss, []

    def flaky(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("inf") if len(calls) == 2 else loss

    monkeypatch.setattr(objective, "per_sample_loss", flaky)
    result, run, client = run_variant(tmp_path, "trainer.max_steps=4")
    assert run.data.tags["status"] == "ok"
    assert run.data.metrics["train/nonfinite_steps"] == 1
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 3  # the skipped step logs no loss


def test_the_run_logs_its_headroom_under_the_budget(tmp_path):
    _, run, client = run_variant(tmp_path, "trainer.max_steps=2")
    m = run.data.metrics
    assert "memory/fits_budget" not in m
    # The training peak logged beside the headroom (the per-step peaks come before it).
    headroom = client.get_metric_history(run.info.run_id, "memory/headroom_gib")
    assert len(headroom) == 1
    peak = next(p.value for p in client.get_metric_history(run.info.run_id, "memory/peak_rss_gib")
                if p.timestamp == headroom[0].timestamp)
    expected = 14.0 - max(peak, m["memory/precompute_peak_rss_gib"])  # the T4 profile: 15 GiB less 1 GiB overhead
    assert headroom[0].value == pytest.approx(expected, abs=1e-9)


def test_the_predicted_fit_is_logged_before_the_first_training_step(tmp_path, monkeypatch):
    # The plan predicts only full-size SDXL on CUDA (plan.predicted_fit); here a stand-in says
    # where the runner puts its numbers.
    monkeypatch.setattr(runner, "predicted_fit", lambda cfg, device: {
        "plan/predicted_peak_gib": 9.5, "plan/predicted_headroom_gib": cfg.memory.budget() - 9.5})
    _, run, client = run_variant(tmp_path, "trainer.max_steps=2")
    history = {k: client.get_metric_history(run.info.run_id, k)
               for k in ("plan/predicted_peak_gib", "plan/predicted_headroom_gib", "train/loss")}
    assert [m.value for m in history["plan/predicted_peak_gib"]] == [9.5]
    assert [m.value for m in history["plan/predicted_headroom_gib"]] == [4.5]  # 14.0 GiB T4 budget - 9.5
    first_step = min(m.timestamp for m in history["train/loss"])
    assert history["plan/predicted_peak_gib"][0].timestamp < first_step


def test_a_run_the_plan_cannot_predict_logs_no_prediction(tmp_path):
    _, run, _ = run_variant(tmp_path, "trainer.max_steps=1")  # the tiny model on the CPU
    assert not [k for k in run.data.metrics if k.startswith("plan/")]


def lora_logged(client, run) -> bool:
    return "lora" in {a.path for a in client.list_artifacts(run.info.run_id)}


def test_a_diverged_run_that_ends_inside_its_non_finite_steps_is_nan_not_ok(tmp_path):
    """lr=1e30: one finite step, then every loss overflows, too few in a row for the threshold."""
    result, run, client = run_variant(tmp_path, "trainer.max_steps=4", "trainer.lr=1e30")
    assert result is None
    assert run.data.tags["status"] == "nan" and run.info.status == "FAILED"
    assert run.data.tags["error"].startswith("3 of 4 steps non-finite, the last 3 in a row")
    assert not lora_logged(client, run)
    assert not (tmp_path / "out" / "lora").exists()  # nobody can load it as the trained result
    assert not list((tmp_path / "checkpoints").rglob("result.json"))  # nothing for a later sweep to reuse


def test_a_run_whose_every_step_is_non_finite_is_nan_below_the_threshold(tmp_path, monkeypatch):
    from sdxl_ablate.train import objective

    monkeypatch.setattr(objective, "per_sample_loss", lambda *a, **k: torch.tensor(float("nan"), requires_grad=True))
    result, run, client = run_variant(tmp_path, "trainer.max_steps=4", "trainer.max_nonfinite_in_row=5")
    assert result is None
    assert run.data.tags["status"] == "nan" and run.data.tags["error"].startswith("4 of 4 steps non-finite")
    assert not lora_logged(client, run)


def test_a_run_whose_final_lora_is_non_finite_is_nan(tmp_path, monkeypatch):
    from sdxl_ablate.train import loop

    real = loop.optimizer_step

    def corrupting(s, cfg):  # the update itself goes wrong; the (earlier) loss stays finite
        real(s, cfg)
        with torch.no_grad():
            s.params[0].fill_(float("inf"))

    monkeypatch.setattr(loop, "optimizer_step", corrupting)
    result, run, client = run_variant(tmp_path, "trainer.max_steps=1")
    assert result is None
    assert run.data.tags["status"] == "nan" and run.data.tags["error"] == "final LoRA has non-finite weights"
    assert run.data.metrics["train/nonfinite_steps"] == 0
    assert not lora_logged(client, run)

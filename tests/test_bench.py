"""sdxl_ablate.bench: its configurations compose, its records add up, and it drives train()."""

from __future__ import annotations

import json

import pytest
import torch

from sdxl_ablate.perf import bench
from sdxl_ablate.train.plan import compose


@pytest.mark.parametrize("name", list(bench.CONFIGS))
def test_every_configuration_composes_at_both_resolutions(name):
    for res in (512, 1024):
        cfg = compose(bench.overrides_for(name, res))
        assert cfg.data.resolution == res and cfg.model.kind.value == "sdxl_random"


def test_reference_is_the_common_recipe():
    t = compose(bench.overrides_for("reference", 1024)).trainer
    assert (t.precision.value, t.cache_latents, t.gradient_checkpointing, t.optimizer.value, t.batch_size) == \
        ("fp16", False, True, "adamw8bit", 1)
    assert not (t.compile or t.cuda_graphs or t.channels_last)


def test_later_overrides_win_and_keys_are_unique():
    o = bench.overrides_for("fast", 1024, ("trainer.batch_size=3",))
    keys = [x.split("=")[0] for x in o]
    assert len(keys) == len(set(keys)) and "trainer.batch_size=3" in o


def test_ratios_and_rates():
    records = [
        {"name": "reference", "status": "ok", "images_per_s": 1.0, "peak_reserved_gib": 10.0, "grad_accum": 1,
         "step_time_s": 1.0},
        {"name": "fast", "status": "ok", "images_per_s": 10.0, "peak_reserved_gib": 5.0, "grad_accum": 1,
         "step_time_s": 0.5},
    ]
    bench.finish(records[1], {"flops": 100e12, "model_flops": 80e12, "predicted_peak_reserved_gib": 5.5}, 400.0)
    bench.add_ratios(records)
    fast = records[1]
    assert fast["speedup_vs_reference"] == 10 and fast["reserved_vs_reference"] == 0.5
    assert fast["achieved_tflops"] == pytest.approx(200) and fast["fraction_of_bf16_matmul"] == pytest.approx(0.5)
    assert fast["prediction_error"] == pytest.approx(0.1)
    assert "| fast | " in bench.table([{**r, "resolution": 1024, "batch_size": 1} for r in records])


def test_cpu_smoke_run_drives_the_trainer(tmp_path):
    """The whole benchmark path on the tiny model on the CPU (the GPU run is the same code)."""
    out = tmp_path / "b.json"
    assert bench.main(["--device", "cpu", "--no-predict", "--resolution", "64", "--configs", "plain,lean_fp8",
                       "--warmup", "1", "--steps", "1", "--out", str(out), "model=tiny"]) == 0
    doc = json.loads(out.read_text())
    assert doc["gpu"] == "cpu" and [r["name"] for r in doc["records"]] == ["plain", "lean_fp8"]
    for r in doc["records"]:
        assert r["status"] == "ok" and r["images_per_s"] > 0 and len(r["losses"]) == 3


def test_unknown_configuration_is_refused(capsys):
    assert bench.main(["--configs", "nope"]) == 2
    assert "nope" in capsys.readouterr().err


@pytest.mark.gpu
def test_gpu_lean_run(tmp_path):
    out = tmp_path / "b.json"
    assert bench.main(["--no-predict", "--resolution", "256", "--configs", "lean", "--warmup", "3", "--steps", "2",
                       "--out", str(out)]) == 0
    r = json.loads(out.read_text())["records"][0]
    assert r["status"] == "ok" and r["cuda_graphs_used"] and r["kernels_per_step"] > 0
    assert r["peak_reserved_gib"] < 16 and torch.cuda.get_device_name() in r["gpu"]

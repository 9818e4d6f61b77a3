"""`python -m sdxl_ablate.bench --study`: a committed sweep through the real CLI, timed per phase."""

from __future__ import annotations

import json

import pytest

from sdxl_ablate.perf import bench

from .conftest import tiny_overrides


def test_an_unknown_study_is_refused_naming_the_known_ones(tmp_path, capsys):
    assert bench.main(["--study", "nope", "--out", str(tmp_path / "s.json")]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "naruto_study" in err and "lora_targets" in err


@pytest.mark.slow
def test_study_records_one_timed_record_per_variant(tmp_path):
    out = tmp_path / "study.json"
    rc = bench.main(["--study", "lora_targets", "--sweep-dir", str(tmp_path / "sweeps"), "--out", str(out),
                     *tiny_overrides(tmp_path, "trainer.max_steps=3")])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["study"] == "lora_targets" and len(doc["runs"]) == 1
    run = doc["runs"][0]
    assert run["returncode"] == 0 and "sweep=lora_targets" in run["command"]
    variants = run["variants"]
    assert [v["job"] for v in variants] == [0, 1]
    assert sorted("lora.targets=attn" in v["run_name"] for v in variants) == [False, True]
    for v in variants:
        ph = v["phases"]
        assert v["status"] == "ok" and v["steps"] == 3
        for name in ("data", "model_setup", "input_caching", "first_step", "training", "logging", "teardown"):
            assert ph[name] > 0, name
        assert ph["evaluation"] == 0.0  # eval=off
        assert sum(ph.values()) <= v["wall_s"] + 1e-3
        assert 0 < v["time_to_first_step_s"] < v["wall_s"]
        assert v["overhead_s"] == pytest.approx(v["wall_s"] - ph["training"], abs=1e-3)
    # The second variant got the first one's base; the variants ran inside the study's wall time.
    assert [v["base"]["event"] for v in variants] == ["loaded", "reused"]
    assert variants[0]["started_at"] < variants[1]["started_at"]
    assert run["startup_s"] > 0
    assert run["variants_wall_s"] + run["startup_s"] <= run["wall_s"] + 1e-3

"""The card-overhead tool (sdxl_ablate/perf/card_overhead.py): its arithmetic on faked readings
here; the real measurement on a GPU (marked `gpu`)."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from sdxl_ablate.perf import card_overhead as co

MIB = 1024**2
TOTAL = 15_095 * MIB  # what CUDA might report for a T4 (nvidia-smi: 15360 MiB)


def test_outside_is_used_less_reserved_less_what_was_there_before():
    r = co.Reading("context", total=TOTAL, free=TOTAL - 600 * MIB, reserved=2 * MIB)
    assert co.outside_bytes(r, used_before=100 * MIB) == 498 * MIB


def test_the_summary_takes_the_largest_stage_and_the_memory_cuda_never_sees():
    readings = [co.Reading("context", TOTAL, TOTAL - 400 * MIB, 0),
                co.Reading("matmul_fp16", TOTAL, TOTAL - 700 * MIB, 200 * MIB),  # 500 outside
                co.Reading("conv_cudnn_fp16", TOTAL, TOTAL - 900 * MIB, 300 * MIB),  # 600 outside
                co.Reading("sdpa_fp16", TOTAL, TOTAL - 900 * MIB, 350 * MIB)]  # 550 outside
    s = co.summarise(readings, used_before=0, smi_total=15360 * MIB, props_total=TOTAL)
    assert [st["outside_mib"] for st in s["stages"]] == [400.0, 500.0, 600.0, 550.0]
    assert (s["largest_outside_mib"], s["not_given_to_cuda_mib"]) == (600.0, 265.0)
    assert s["suggested_overhead_mib"] == 896  # 865 MiB rounded up to a multiple of 64
    without_smi = co.summarise(readings, used_before=None, smi_total=None, props_total=TOTAL)
    assert (without_smi["suggested_overhead_mib"], without_smi["used_before_known"]) == (640, False)
    assert "no nvidia-smi total" in without_smi["suggested_overhead_covers"]


def test_nvidia_smi_output_is_parsed_in_bytes(monkeypatch):
    assert co.parse_smi("3, 15360, 535.183.01\n") == {"used": 3 * MIB, "total": 15360 * MIB, "driver": "535.183.01"}

    def fake_run(cmd, **kw):
        assert "--query-gpu=memory.used,memory.total,driver_version" in cmd
        return subprocess.CompletedProcess(cmd, 0, "0, 23034, 595.91.07\n", "")
    monkeypatch.setattr(co.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    assert co.smi_memory(0, run=fake_run)["total"] == 23034 * MIB
    monkeypatch.setattr(co.shutil, "which", lambda name: None)
    assert co.smi_memory(0, run=fake_run) is None


def test_no_gpu_is_a_clear_stop(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA GPU is visible"):
        co.measure(0)


@pytest.mark.gpu
def test_the_tool_measures_a_real_card(tmp_path):
    out = tmp_path / "overhead.json"
    assert co.main(["--out", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert rec["device"] == torch.cuda.get_device_name(0) and rec["torch"] == torch.__version__
    assert rec["props_total_bytes"] == torch.cuda.get_device_properties(0).total_memory
    stages = [s["stage"] for s in rec["stages"]]
    assert stages[0] == "context" and stages[-1] == "sdpa_fp16" and "conv_cudnn_fp16" in stages
    # A CUDA context costs something outside the allocator; and not more than a few GiB.
    assert 50 * MIB < rec["stages"][0]["outside_bytes"] < 4096 * MIB
    assert rec["suggested_overhead_mib"] >= rec["largest_outside_mib"]

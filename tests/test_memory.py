"""The memory guard: per-variant peaks, clean of earlier variants; the CUDA cap."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdxl_ablate.train.memory import GIB, MemoryGuard, is_oom, peak_rss_bytes, reset_peak_rss


def test_cpu_peak_is_reset_between_variants():
    guard = MemoryGuard(16, torch.device("cpu"))
    guard.start()
    big = np.ones(400 * 2**20 // 8)  # 400 MiB, touched
    first = guard.peak()["memory/peak_rss_gib"]
    del big
    guard.start()  # the next variant
    second = guard.peak()["memory/peak_rss_gib"]
    assert first - second > 0.3  # the 400 MiB of the first variant is not in the second's peak
    assert set(guard.peak()) == {"memory/peak_rss_gib"}  # named as what it is


def test_peak_rss_sees_an_allocation():
    reset_peak_rss()
    before = peak_rss_bytes()
    block = np.ones(200 * 2**20 // 8)
    assert peak_rss_bytes() - before >= 190 * 2**20
    del block


def test_out_of_memory_errors_are_recognised():
    assert is_oom(torch.OutOfMemoryError("CUDA out of memory"))
    assert is_oom(MemoryError())
    assert is_oom(RuntimeError("CUDA error: out of memory"))
    assert not is_oom(ValueError("lora.rank=0"))


def test_headroom_is_the_budget_minus_the_largest_phase_peak():
    cuda = MemoryGuard(16, torch.device("cuda", 0))  # no GPU needed: only the names are read
    phases = ({"memory/peak_allocated_gib": 11.0, "memory/peak_reserved_gib": 12.5},
              {"memory/precompute_peak_allocated_gib": 3.0, "memory/precompute_peak_reserved_gib": 13.0})
    assert cuda.headroom(*phases) == {"memory/headroom_gib": pytest.approx(3.0)}
    over = ({"memory/peak_reserved_gib": 17.5},)  # only with the cap off (memory.enforce=false)
    assert cuda.headroom(*over) == {"memory/headroom_gib": pytest.approx(-1.5)}
    cpu = MemoryGuard(16, torch.device("cpu"))
    assert cpu.headroom({"memory/peak_rss_gib": 2.0}, {"memory/precompute_peak_rss_gib": 2.5}) == {
        "memory/headroom_gib": pytest.approx(13.5)}


@pytest.mark.gpu
def test_cuda_cap_makes_a_too_large_variant_fail_on_a_large_gpu():
    guard = MemoryGuard(2, torch.device("cuda"))
    device = guard.device  # the index the guard resolved: the cap is per GPU and needs one
    try:
        guard.start()
        ok = torch.empty(int(1.5 * GIB), dtype=torch.uint8, device=device)
        with pytest.raises(torch.OutOfMemoryError):
            torch.empty(int(1.0 * GIB), dtype=torch.uint8, device=device)
        peak = guard.peak()
        assert 1.4 < peak["memory/peak_allocated_gib"] < 2.0
        del ok
        guard.start()
        # Reset for the next variant: the peak is what is still live, not the earlier 1.5 GiB.
        assert guard.peak()["memory/peak_allocated_gib"] == pytest.approx(torch.cuda.memory_allocated(device) / GIB)
    finally:  # the cap would otherwise hold for every later test of the process
        torch.cuda.set_per_process_memory_fraction(1.0, device)

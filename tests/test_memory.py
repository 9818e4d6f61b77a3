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
    assert guard.fits(guard.peak()) is None  # a CPU run cannot tell whether a 16 GB card fits


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


def test_fits_compares_reserved_with_the_budget():
    guard = MemoryGuard(16, torch.device("cpu"))
    assert guard.fits({"memory/peak_reserved_gib": 15.9}) is True
    assert guard.fits({"memory/peak_reserved_gib": 16.1}) is False


@pytest.mark.gpu
def test_cuda_cap_makes_a_too_large_variant_fail_on_a_large_gpu():
    device = torch.device("cuda")
    guard = MemoryGuard(2, device)
    guard.start()
    ok = torch.empty(int(1.5 * GIB), dtype=torch.uint8, device=device)
    with pytest.raises(torch.OutOfMemoryError):
        torch.empty(int(1.0 * GIB), dtype=torch.uint8, device=device)
    peak = guard.peak()
    assert 1.4 < peak["memory/peak_allocated_gib"] < 2.0
    del ok
    guard.start()
    # Reset for the next variant: the peak is what is still live, not the earlier 1.5 GiB.
    assert guard.peak()["memory/peak_allocated_gib"] == pytest.approx(torch.cuda.memory_allocated(guard.device) / GIB)
    torch.cuda.set_per_process_memory_fraction(1.0, device)

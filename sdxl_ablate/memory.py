"""The memory guard: cap the process at the budget, measure each variant's peak cleanly.

On CUDA the caching allocator is capped at `memory.budget_gib`, so a variant that would
not fit a 16 GB card raises OutOfMemoryError here too, even on an 80 GB GPU. Peak
allocated and peak reserved are reset at the start of every variant, because Hydra runs a
sweep's jobs in one process and the counters (and the cache) would otherwise carry over.
On CPU there is no allocator to cap: the peak resident set size of the process is
recorded instead, under its own metric name, after resetting the kernel's high-water mark.
"""

from __future__ import annotations

import gc
import os
import resource
from dataclasses import dataclass

import torch

GIB = 1024**3


def is_oom(err: BaseException) -> bool:
    return isinstance(err, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in str(err).lower()


def configure_allocator(expandable_segments: bool) -> None:
    """Must run before the first CUDA allocation; later calls are harmless no-ops."""
    if expandable_segments and "PYTORCH_CUDA_ALLOC_CONF" not in os.environ:
        # Segments that grow in place instead of new fixed blocks: less fragmentation, so
        # reserved stays close to allocated (what a 16 GB card can actually hold).
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"


@dataclass
class MemoryGuard:
    budget_gib: float
    device: torch.device
    enforce: bool = True

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def start(self) -> None:
        """Frees what earlier variants left behind and resets the peak counters."""
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            total = torch.cuda.get_device_properties(self.device).total_memory
            if self.enforce:
                fraction = min(1.0, self.budget_gib * GIB / total)
                torch.cuda.set_per_process_memory_fraction(fraction, self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            reset_peak_rss()

    def peak(self) -> dict[str, float]:
        """Peak memory since `start`, in GiB, under names that say what was measured."""
        if self.cuda:
            return {
                "memory/peak_allocated_gib": torch.cuda.max_memory_allocated(self.device) / GIB,
                "memory/peak_reserved_gib": torch.cuda.max_memory_reserved(self.device) / GIB,
            }
        return {"memory/peak_rss_gib": peak_rss_bytes() / GIB}

    def fits(self, peak: dict[str, float]) -> bool | None:
        """Whether the variant fits the budget; None where it cannot be told (CPU)."""
        reserved = peak.get("memory/peak_reserved_gib")
        return None if reserved is None else reserved <= self.budget_gib

    def release(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()


def reset_peak_rss() -> None:
    # Writing 5 to clear_refs resets the VmHWM high-water mark (Linux >= 4.0).
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # not Linux: peak_rss_bytes then reports the process-lifetime peak


def peak_rss_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

"""`python -m sdxl_ablate.perf.card_overhead`: what a process holds on its GPU outside PyTorch's
allocator, measured, for the card profiles of the memory guard (conf/memory/*.yaml).

The guard caps the allocator at the card's reported total less `memory.overhead_mib`: the part of
the card a training process cannot give to tensors. This tool measures that part on the card
itself, stage by stage, as the trainer meets it:

1. before CUDA starts in this process: what the card already has in use (NVML or nvidia-smi;
   other processes, and what the driver keeps for itself);
2. after the CUDA context (the first tensor);
3. after the first fp16 matrix product, then the first bf16 one (cuBLAS handle, workspace and
   kernels; bf16 only where the card runs it natively, compute capability 8.0+);
4. after the first cuDNN convolution (fp16);
5. after a scaled-dot-product attention call (fp16; flash or memory-efficient kernels).

At each stage, from `torch.cuda.mem_get_info` (free, total as CUDA sees them):

    outside = (total - free) - torch.cuda.memory_reserved() - used_before

where `used_before` is stage 1's reading (0 when neither NVML nor nvidia-smi answers: then
`outside` also counts other processes' memory, and the JSON says so). The profile's overhead is
then the card's reported total (nvidia-smi) less what CUDA reports as total, plus the largest
`outside`: both are memory the allocator can never get. The result goes to
`results/card_overhead_<gpu>.json` (`--out`), with the device, driver, torch, CUDA and cuDNN
versions and both totals (mem_get_info and get_device_properties). Needs a CUDA GPU; run it
alone on the card (no other process), in a fresh process.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

MIB = 1024**2


@dataclass
class Reading:
    stage: str
    total: int  # bytes, mem_get_info
    free: int  # bytes, mem_get_info
    reserved: int  # bytes, torch.cuda.memory_reserved
    note: str = ""


def outside_bytes(r: Reading, used_before: int) -> int:
    """What the process holds outside the allocator at this reading (the module docstring)."""
    return (r.total - r.free) - r.reserved - used_before


def summarise(readings: list[Reading], used_before: Optional[int], smi_total: Optional[int],
              props_total: int) -> dict:
    """The stages with their outside-the-allocator bytes, and the overhead a card profile should
    carry: (nvidia-smi total - CUDA total) + the largest outside figure, in MiB rounded up to 64."""
    base = used_before or 0
    stages = [{**asdict(r), "outside_bytes": outside_bytes(r, base), "outside_mib": round(outside_bytes(r, base) / MIB, 1)}
              for r in readings]
    largest = max(s["outside_bytes"] for s in stages)
    cuda_total = readings[0].total
    hidden = (smi_total - cuda_total) if smi_total is not None else None
    overhead = largest + (hidden or 0)
    return {
        "cuda_total_bytes": cuda_total,
        "props_total_bytes": props_total,
        "smi_total_bytes": smi_total,
        "used_before_bytes": used_before,
        "used_before_known": used_before is not None,
        "stages": stages,
        "largest_outside_mib": round(largest / MIB, 1),
        "not_given_to_cuda_mib": None if hidden is None else round(hidden / MIB, 1),
        # What conf/memory/<card>.yaml's overhead_mib should be (with card_total_mib = the
        # nvidia-smi total); without an nvidia-smi total only the outside part is known.
        "suggested_overhead_mib": int(math.ceil(overhead / MIB / 64) * 64),
        "suggested_overhead_covers": ("nvidia-smi total - CUDA total + largest outside" if hidden is not None
                                      else "largest outside only (no nvidia-smi total: add the driver's share)"),
    }


# --- what the card and the driver say (NVML, else nvidia-smi) -----------------------------------


def smi_memory(index: int, run: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> Optional[dict]:
    """{'used': bytes, 'total': bytes, 'driver': str} of GPU `index` from nvidia-smi, None without it.
    (Indices are nvidia-smi's: with CUDA_VISIBLE_DEVICES pick the device by its UUID instead.)"""
    if shutil.which("nvidia-smi") is None:
        return None
    proc = run(["nvidia-smi", f"--id={index}", "--query-gpu=memory.used,memory.total,driver_version",
                "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        return None
    return parse_smi(proc.stdout)


def parse_smi(line: str) -> dict:
    used, total, driver = [x.strip() for x in line.strip().splitlines()[0].split(",")]
    return {"used": int(used) * MIB, "total": int(total) * MIB, "driver": driver}


def nvml_memory(uuid: str) -> Optional[dict]:
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByUUID(uuid)
        info = pynvml.nvmlDeviceGetMemoryInfo(handle)
        driver = pynvml.nvmlSystemGetDriverVersion()
        return {"used": int(info.used), "total": int(info.total),
                "driver": driver.decode() if isinstance(driver, bytes) else str(driver)}
    except Exception:  # noqa: BLE001 - NVML missing or refusing: nvidia-smi is asked instead
        return None


# --- the measurement (needs the GPU) -------------------------------------------------------------


def measure(index: int = 0) -> dict:
    import torch
    import torch.nn.functional as F

    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # as the trainer
    if not torch.cuda.is_available():
        raise SystemExit("card_overhead: no CUDA GPU is visible; this measures a card and needs one")
    # Before the context exists: what the card already holds (read through NVML/nvidia-smi, which
    # do not create a CUDA context in this process).
    props = torch.cuda.get_device_properties(index)
    uuid = str(getattr(props, "uuid", "") or "")
    before = nvml_memory(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}") if uuid else None
    physical = _physical_index(index)
    before = before or (smi_memory(physical) if physical is not None else None)
    dev = torch.device("cuda", index)
    readings: list[Reading] = []

    def read(stage: str, note: str = "") -> None:
        torch.cuda.synchronize(dev)
        free, total = torch.cuda.mem_get_info(dev)
        readings.append(Reading(stage, total, free, torch.cuda.memory_reserved(dev), note))

    torch.empty(1, device=dev)
    read("context")
    a = torch.randn(4096, 4096, device=dev, dtype=torch.float16)
    (a @ a).sum().item()
    read("matmul_fp16")
    capability = torch.cuda.get_device_capability(index)
    if capability >= (8, 0):
        b = a.to(torch.bfloat16)
        (b @ b).sum().item()
        read("matmul_bf16")
        del b
    torch.backends.cudnn.benchmark = False
    x = torch.randn(8, 320, 64, 64, device=dev, dtype=torch.float16)
    w = torch.randn(320, 320, 3, 3, device=dev, dtype=torch.float16)
    F.conv2d(x, w, padding=1).sum().item()
    read("conv_cudnn_fp16", f"cudnn {torch.backends.cudnn.version()}")
    q = torch.randn(2, 10, 4096, 64, device=dev, dtype=torch.float16)
    F.scaled_dot_product_attention(q, q, q).sum().item()
    read("sdpa_fp16")
    del a, x, w, q

    summary = summarise(readings, before["used"] if before else None, before["total"] if before else None,
                        props.total_memory)
    return {
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "device": torch.cuda.get_device_name(index),
        "compute_capability": f"{capability[0]}.{capability[1]}",
        "driver": before["driver"] if before else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "cuda_module_loading": os.environ.get("CUDA_MODULE_LOADING", "(unset: torch sets LAZY)"),
        "source": "python -m sdxl_ablate.perf.card_overhead (sdxl_ablate/perf/card_overhead.py)",
        **summary,
    }


def _physical_index(index: int) -> Optional[int]:
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if not visible:
        return index
    entry = visible[index] if index < len(visible) else None
    return int(entry) if entry is not None and entry.isdigit() else None


def default_out(device_name: str) -> Path:
    from sdxl_ablate.config import REPO_ROOT

    slug = re.sub(r"[^a-z0-9]+", "_", device_name.lower()).strip("_")
    return REPO_ROOT / "results" / f"card_overhead_{slug}.json"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdxl_ablate.perf.card_overhead",
                                     description="Measure the GPU memory a process holds outside PyTorch's allocator "
                                                 "(context, cuBLAS/cuDNN, attention) for the card profiles.")
    parser.add_argument("--device", type=int, default=0, help="CUDA index (default 0)")
    parser.add_argument("--out", type=Path, default=None, help="JSON file (default results/card_overhead_<gpu>.json)")
    args = parser.parse_args(argv)
    record = measure(args.device)
    out = args.out or default_out(record["device"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({k: record[k] for k in ("device", "driver", "largest_outside_mib", "not_given_to_cuda_mib",
                                             "suggested_overhead_mib")}, indent=2))
    print(f"written to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

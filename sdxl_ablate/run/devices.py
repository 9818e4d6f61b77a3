"""Which device a job trains on when several jobs share a host (issue 12).

Hydra's parallel launchers (joblib, submitit_local) start jobs that all see every GPU of the
host, and nothing tells them apart: `device=auto` would put every job on cuda:0. So a job
*claims* a GPU: it takes an exclusive lock file named after the GPU's UUID, holds it for the
job's lifetime, and releases it when the job ends (or the process dies: the kernel drops an
flock with its process, so no stale claim survives a crash). Two concurrent jobs never hold
the same GPU; a job that finds every GPU claimed waits for the first one to free up.

UUIDs, not indices: under SLURM each job sees only its own GPUs, all numbered from 0, so two
jobs' cuda:0 may be different GPUs (no false conflict), and the same GPU seen through two
CUDA_VISIBLE_DEVICES orders is one lock. Locks live in a host-local directory (GPUs are
per host): `$SDXL_ABLATE_GPU_LOCKS`, default `/tmp/sdxl_ablate-gpu-locks-<uid>`.

Rules (never a silent CPU run when a GPU was asked for):
- `device=cpu`: the CPU (an error under a GPU launcher preset: the two contradict).
- `device=auto`: claim a free GPU; with no GPU visible at all, the CPU, except under a GPU
  launcher preset (`hydra/launcher=gpus_local|slurm`), where that is an error.
- `device=cuda`: claim a free GPU; none visible is an error.
- `device=cuda:N`: exactly that GPU, unclaimed (how to pack several capped variants on one
  large GPU on purpose); an index beyond the visible GPUs is an error.
- Under torchrun (one variant on several GPUs) each rank takes cuda:LOCAL_RANK: torchrun
  already gave every rank its own GPU.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from filelock import FileLock, Timeout

log = logging.getLogger(__name__)

# The launcher presets in conf/hydra/launcher/ that promise every job its own GPU.
GPU_LAUNCHERS = frozenset({"gpus_local", "slurm"})


@dataclass(frozen=True)
class Gpu:
    index: int  # CUDA index in this process (after CUDA_VISIBLE_DEVICES)
    uuid: str
    name: str


@dataclass
class DeviceClaim:
    device: torch.device
    gpu: Gpu | None = None
    lock: FileLock | None = field(default=None, repr=False)

    def tags(self) -> dict[str, str]:
        """The run's record of where it ran: the GPU's name, index and UUID, and the host."""
        tags = {"host": socket.gethostname()}
        if self.gpu is not None:
            tags.update({"gpu.name": self.gpu.name, "gpu.index": str(self.gpu.index), "gpu.uuid": self.gpu.uuid,
                         "gpu": f"{self.gpu.name} (cuda:{self.gpu.index})"})
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            if visible:
                tags["gpu.cuda_visible_devices"] = visible
        return tags

    def __enter__(self) -> "DeviceClaim":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        if self.lock is not None and self.lock.is_locked:
            self.lock.release(force=True)
            log.info("released %s", self.device)


def lock_dir() -> Path:
    path = os.environ.get("SDXL_ABLATE_GPU_LOCKS") or str(Path(tempfile.gettempdir()) / f"sdxl_ablate-gpu-locks-{os.getuid()}")
    return Path(path)


def visible_gpus() -> list[Gpu]:
    gpus = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        uuid = str(getattr(props, "uuid", "") or "") or _physical_id(i)
        gpus.append(Gpu(i, uuid, props.name))
    return gpus


def _physical_id(i: int) -> str:
    # Without a UUID from torch: the entry of CUDA_VISIBLE_DEVICES (an index or a UUID) names
    # the physical GPU on this host.
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return f"{socket.gethostname()}-{visible[i] if i < len(visible) else i}"


def claim_gpu(gpus: list[Gpu], poll_s: float = 2.0, wait_s: float | None = None) -> tuple[Gpu, FileLock]:
    """Takes the first free GPU of `gpus` (exclusive lock file per UUID); waits while all are
    claimed. `wait_s` bounds the wait (None: as long as it takes)."""
    if not gpus:
        raise RuntimeError("claim_gpu: no GPU to claim")
    folder = lock_dir()
    folder.mkdir(parents=True, exist_ok=True)
    started, warned = time.monotonic(), False
    while True:
        for gpu in gpus:
            lock = FileLock(str(folder / f"{_safe(gpu.uuid)}.lock"), is_singleton=False)
            try:
                lock.acquire(timeout=0)
            except Timeout:
                continue
            # Record the holder, for a person wondering who has the GPU (not read by code).
            Path(lock.lock_file + ".holder").write_text(f"{socket.gethostname()} pid {os.getpid()}\n")
            return gpu, lock
        if wait_s is not None and time.monotonic() - started >= wait_s:
            raise TimeoutError(f"all {len(gpus)} GPUs stayed claimed for {wait_s:.0f} s (locks in {folder})")
        if not warned:
            log.warning("all %d GPUs are claimed by other jobs (locks in %s); waiting for one", len(gpus), folder)
            warned = True
        time.sleep(poll_s)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def gpu_required_by_launcher() -> str | None:
    """The GPU launcher preset this Hydra job runs under (None if none or outside Hydra)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    choice = HydraConfig.get().runtime.choices.get("hydra/launcher")
    return choice if choice in GPU_LAUNCHERS else None


def acquire_device(name: str, gpu_preset: str | None = None, local_rank: int | None = None,
                   gpus: list[Gpu] | None = None, wait_s: float | None = None) -> DeviceClaim:
    """The device for one job, by the rules in this module's docstring. `gpu_preset` is the
    GPU launcher preset in use (see `gpu_required_by_launcher`); `local_rank` is set under
    torchrun; `gpus` overrides the visible GPUs (tests)."""
    gpus = visible_gpus() if gpus is None else gpus
    if name == "cpu":
        if gpu_preset:
            raise RuntimeError(f"device=cpu under hydra/launcher={gpu_preset}, a preset that gives each job a GPU; "
                               "drop device=cpu or pick another launcher")
        return DeviceClaim(torch.device("cpu"))
    if not gpus:
        if name == "auto" and not gpu_preset:
            return DeviceClaim(torch.device("cpu"))  # a machine without any GPU: the CPU is what auto means
        why = f"hydra/launcher={gpu_preset}" if gpu_preset else f"device={name}"
        raise RuntimeError(f"{why} needs a CUDA GPU, but none is visible to this job "
                           f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); "
                           "use device=cpu with a CPU launcher to run on the CPU")
    if local_rank is not None:
        if local_rank >= len(gpus):
            raise RuntimeError(f"LOCAL_RANK={local_rank} but only {len(gpus)} GPUs are visible")
        return _use(DeviceClaim(torch.device("cuda", local_rank), gpus[local_rank]))
    if name.startswith("cuda:"):
        index = int(name.split(":", 1)[1])
        if index >= len(gpus):
            raise RuntimeError(f"device={name}: only {len(gpus)} GPUs are visible (cuda:0..cuda:{len(gpus) - 1})")
        return _use(DeviceClaim(torch.device("cuda", index), gpus[index]))
    if name not in ("auto", "cuda"):
        raise ValueError(f"device={name!r}: must be auto, cpu, cuda or cuda:N")
    gpu, lock = claim_gpu(gpus, wait_s=wait_s)
    log.info("claimed cuda:%d (%s, %s)", gpu.index, gpu.name, gpu.uuid)
    return _use(DeviceClaim(torch.device("cuda", gpu.index), gpu, lock))


def _use(claim: DeviceClaim) -> DeviceClaim:
    # The claimed GPU becomes the current one, so code that names no index (the memory guard's
    # cap, torch.cuda.synchronize(), a new tensor on "cuda") uses it too, never cuda:0.
    if claim.device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.set_device(claim.device)
    return claim

"""One variant on several GPUs: data-parallel training under torchrun (issue 12).

    torchrun --nproc_per_node=2 -m sdxl_ablate experiment=... trainer.batch_size=8

Every rank runs the same Hydra job. Rank 0 alone owns the output directory and the MLflow run;
the other ranks get a throw-away Hydra directory (see `hydra_overrides`) and a `NullTracker`.

`trainer.batch_size` stays the *global* batch, so a recipe means the same thing on one GPU or
on eight and a study's results do not depend on the machine it ran on: each of W ranks trains
batch_size / W images of every batch (batch_size must divide evenly).

How the ranks agree with one process training the whole batch:
- All ranks draw the same randomness: the global batch's indices, its latent samples, noise and
  timesteps, from generators seeded alike; each rank then keeps its own contiguous slice
  (`Ddp.shard`). So rank r trains exactly the images, noise and timesteps that positions
  r*B/W .. (r+1)*B/W of the single-process batch would have.
- The initial LoRA weights are broadcast from rank 0.
- After the backward, the LoRA gradients are averaged over the ranks (one all-reduce of one
  flat buffer: the LoRA weights are small), which is the gradient of the global batch's mean
  loss. The loss is averaged too, so every rank makes the same skip decision on a non-finite
  loss and rank 0 logs the global batch's loss.
Gradients are all-reduced rather than the UNet wrapped in DistributedDataParallel: the trainable
tensors may live in three models (UNet and both text encoders), the loop replays CUDA graphs and
checkpoints blocks, and the LoRA gradients are a few MB to 400 MB, so overlapping their
reduction with the backward would buy little.

The memory guard applies per GPU: every rank caps and measures its own device; the peaks
logged are the maximum over the ranks.
"""

from __future__ import annotations

import logging
import os
import signal
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from sdxl_ablate.track.protocol import RunTracker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ddp:
    rank: int
    world: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def check_batch(self, batch_size: int) -> int:
        """-> images per rank. The global batch must split evenly."""
        if batch_size % self.world:
            raise ValueError(f"trainer.batch_size={batch_size} is the global batch and must divide evenly over "
                             f"the {self.world} processes (WORLD_SIZE={self.world}); use a multiple of {self.world}")
        return batch_size // self.world

    def shard(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """This rank's contiguous slice (along the batch) of each global-batch tensor."""
        out = []
        for x in tensors:
            per = x.shape[0] // self.world
            out.append(x[self.rank * per:(self.rank + 1) * per])
        return tuple(out)

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        y = x.detach().float().clone()
        dist.all_reduce(y, op=dist.ReduceOp.SUM)
        return y / self.world

    def average_grads(self, params: list[torch.nn.Parameter]) -> None:
        grads = [p.grad for p in params if p.grad is not None]
        if len(grads) != len(params):
            # Every rank runs the same model and batch size, so all or none have gradients.
            raise RuntimeError(f"rank {self.rank}: {len(params) - len(grads)} of {len(params)} LoRA tensors have "
                               "no gradient; ranks would disagree on the update")
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= self.world
        offset = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[offset:offset + n].view_as(g))
            offset += n

    def broadcast(self, params: list[torch.nn.Parameter]) -> None:
        """Rank 0's initial LoRA weights on every rank."""
        with torch.no_grad():
            for p in params:
                dist.broadcast(p.data, src=0)

    def max_over_ranks(self, values: dict[str, float]) -> dict[str, float]:
        """The largest value of each metric over the ranks (memory peaks: the tightest GPU)."""
        if not values:
            return values
        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=_comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return dict(zip(keys, t.tolist()))


def from_env() -> Ddp | None:
    """The data-parallel context when started by torchrun (or accelerate launch) with more than
    one process; None for a plain single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    return Ddp(rank=int(os.environ["RANK"]), world=world, local_rank=int(os.environ.get("LOCAL_RANK", "0")))


_CURRENT: Ddp | None = None


def current() -> Ddp | None:
    """The context set up by `setup`, for the trainer (None when not data-parallel)."""
    return _CURRENT


def setup(device: torch.device) -> Ddp | None:
    """Joins the process group (NCCL on GPUs, gloo on the CPU) once per process."""
    global _CURRENT
    ddp = from_env()
    if ddp is None:
        return None
    if not dist.is_initialized():
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
        # torchrun stops the other ranks with SIGTERM when one fails: turn it into an exception
        # so rank 0's MLflow run is closed as failed instead of left RUNNING.
        signal.signal(signal.SIGTERM, _terminate)
        log.info("data-parallel: rank %d of %d on %s", ddp.rank, ddp.world, device)
    _CURRENT = ddp
    return ddp


def _terminate(signum, frame):
    raise SystemExit(f"rank {os.environ.get('RANK')} stopped by signal {signum} (another rank failed)")


def _comm_device() -> torch.device:
    backend = dist.get_backend()
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def hydra_overrides(env: dict[str, str] | None = None) -> list[str]:
    """Extra Hydra overrides for a rank other than 0: its own throw-away directory, no .hydra
    copy of the config, so rank 0 alone owns the run's output directory."""
    env = os.environ if env is None else env
    if int(env.get("WORLD_SIZE", "1")) <= 1 or int(env.get("RANK", "0")) == 0:
        return []
    scratch = tempfile.mkdtemp(prefix=f"sdxl_ablate-rank{env['RANK']}-")
    return ["hydra.output_subdir=null", f"hydra.run.dir={scratch}", f"hydra.sweep.dir={scratch}"]


class NullTracker(RunTracker):
    """What the ranks other than 0 log to: nothing (rank 0 owns the MLflow run)."""

    status = "ok"
    run_id = None
    uri = None
    client = None

    def __enter__(self) -> "NullTracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        return None

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        pass

    def set_tags(self, tags: dict[str, Any]) -> None:
        pass

    def set_status(self, status: str, error: Optional[str] = None) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: Optional[str] = None) -> None:
        pass

    def log_text(self, text: str, artifact_file: str) -> None:
        pass

    def log_dict(self, data: dict, artifact_file: str) -> None:
        pass

    def log_image(self, image, key: str, step: int) -> None:
        pass

    def latest_metrics(self) -> dict[str, float]:
        return {}

"""Issue 12: one variant data-parallel over 2 processes (torchrun, gloo on the CPU) against one
process with the same global batch: one MLflow run, one output directory, the same LoRA."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from sdxl_ablate.run import runner
from sdxl_ablate.config import to_typed
from sdxl_ablate.train.distributed import Ddp, hydra_overrides

from .conftest import ROOT, compose_config, tiny_overrides

# Global batch 4 (2 images per rank), 4 steps, rank 4 LoRA on attention, fp32, no dropout.
RECIPE = ["trainer.batch_size=4", "trainer.max_steps=4", "trainer.lr=1e-3", "lora.rank=4"]


def test_shard_takes_contiguous_slices_that_tile_the_batch():
    x = torch.arange(12).view(6, 2)
    parts = [Ddp(rank=r, world=3, local_rank=r).shard(x, x[:, 0])[0] for r in range(3)]
    assert [p.tolist() for p in parts] == [[[0, 1], [2, 3]], [[4, 5], [6, 7]], [[8, 9], [10, 11]]]
    assert torch.equal(torch.cat(parts), x)


def test_global_batch_must_divide_over_the_ranks():
    assert Ddp(0, 2, 0).check_batch(8) == 4
    with pytest.raises(ValueError, match=r"trainer.batch_size=3 is the global batch.*2 processes"):
        Ddp(0, 2, 0).check_batch(3)


def test_only_ranks_other_than_0_get_a_scratch_hydra_dir():
    assert hydra_overrides({"WORLD_SIZE": "2", "RANK": "0"}) == []
    assert hydra_overrides({}) == []
    extra = hydra_overrides({"WORLD_SIZE": "2", "RANK": "1"})
    assert extra[0] == "hydra.output_subdir=null"
    run_dir = extra[1].split("=", 1)[1]
    assert extra[1].startswith("hydra.run.dir=") and Path(run_dir).is_dir() and "rank1" in run_dir
    assert extra[2] == f"hydra.sweep.dir={run_dir}"


@pytest.mark.slow
def test_two_process_data_parallel_equals_one_process_with_the_same_global_batch(tmp_path):
    # One process, the whole global batch.
    single_dir = tmp_path / "single"
    cfg = to_typed(compose_config(tiny_overrides(tmp_path, "study=one", *RECIPE)))
    assert runner.run(cfg, "single", single_dir) is not None

    # torchrun, 2 processes on the CPU (gloo), each half of every batch.
    ddp_dir = tmp_path / "ddp"
    torchrun = Path(sys.executable).parent / "torchrun"
    args = [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "sdxl_ablate",
            *tiny_overrides(tmp_path, "study=two", *RECIPE), f"hydra.run.dir={ddp_dir}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    one = client.search_runs([client.get_experiment_by_name("one").experiment_id])
    two = client.search_runs([client.get_experiment_by_name("two").experiment_id])
    assert len(one) == 1 and len(two) == 1  # rank 1 logged nothing
    run = two[0]
    assert run.info.status == "FINISHED" and run.data.tags["status"] == "ok"
    assert run.data.tags["ddp.world_size"] == "2"
    assert run.data.tags["output_dir"] == str(ddp_dir)

    # The same loss curve: rank 0 logs the mean over both halves of each global batch.
    curve = lambda r: [m.value for m in sorted(client.get_metric_history(r.info.run_id, "train/loss"),
                                               key=lambda m: m.step)]
    single_curve, ddp_curve = curve(one[0]), curve(run)
    assert len(single_curve) == len(ddp_curve) == 4
    assert ddp_curve == pytest.approx(single_curve, rel=1e-5, abs=1e-6)

    # The same LoRA. fp32 on the CPU: the two runs differ only in summation order (a batch of 4
    # vs two batches of 2, and the all-reduced mean of two gradients), about 1e-7 relative per
    # step; 4 Adam steps at lr 1e-3 move weights by ~4e-3, so 1e-5 absolute is 250x below the
    # update size yet far above the rounding. A wrong shard, noise or averaging differs at ~1e-3.
    single = load_file(single_dir / "lora" / "pytorch_lora_weights.safetensors")
    ddp = load_file(ddp_dir / "lora" / "pytorch_lora_weights.safetensors")
    assert sorted(single) == sorted(ddp) and len(single) > 0
    worst = max((single[k] - ddp[k]).abs().max().item() for k in single)
    assert worst < 1e-5, worst
    moved = max((single[k]).abs().max().item() for k in single if "lora_B" in k)
    assert moved > 1e-3  # the LoRA did train (lora_B starts at zero)
    # Rank 0 alone wrote the output directory.
    assert (ddp_dir / ".hydra" / "config.yaml").is_file()
    assert sorted(p.name for p in ddp_dir.iterdir()) == sorted([".hydra", "lora", "__main__.log", "phases.json", "tracking_journal"])

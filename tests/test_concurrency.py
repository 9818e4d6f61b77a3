"""Issue 18: what a SLURM array or a parallel Hydra launcher meets. Real `python -m sdxl_ablate`
processes started together on a fresh sqlite store, in one working directory with the default
output dirs: every one is recorded, none is refused, none overwrites another's files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from .conftest import ROOT

BASE = ("experiment=demo", "eval=off", "trainer.max_steps=2")


def start(cwd: Path, *overrides: str, multirun: bool = False) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("SDXL_ABLATE_SWEEP_ID", None)  # as from a fresh shell (each launch makes its own anyway)
    return subprocess.Popen([sys.executable, "-m", "sdxl_ablate", *(["-m"] if multirun else []), *BASE, *overrides], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_four_runs_and_two_sweeps_started_together_on_a_fresh_store(tmp_path):
    singles = [start(tmp_path, f"lora.rank={r}") for r in (1, 2, 3, 4)]
    sweeps = [start(tmp_path, f"trainer.seed={s}", "lora.targets=attn,all", multirun=True) for s in (1, 2)]
    outs = [(p, *p.communicate(timeout=600)) for p in singles + sweeps]
    for p, out, err in outs:
        assert p.returncode == 0, out[-3000:] + err[-3000:]
        assert "Traceback" not in err and "already exists" not in err, err[-3000:]
    for p, out, err in outs[4:]:
        assert "2 variants: 2 ok" in out and "exit code" not in out, out[-2000:]

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("demo").experiment_id])
    variants = [r for r in runs if r.data.tags["kind"] == "variant"]
    parents = [r for r in runs if r.data.tags["kind"] == "sweep"]
    assert len(variants) == 8 and len(parents) == 2, [r.info.run_name for r in runs]
    for run in variants:  # every run complete in MLflow: none had to fall back to its journal
        assert run.info.status == "FINISHED" and run.data.tags["status"] == "ok", run.data.tags
        assert "tracking.journal" not in run.data.tags and len(
            client.get_metric_history(run.info.run_id, "train/loss")) == 2
    # Four single runs: four sweep ids, four output dirs, each named by its id.
    single = [r for r in variants if "mlflow.parentRunId" not in r.data.tags]
    assert sorted(r.data.params["lora.rank"] for r in single) == ["1", "2", "3", "4"]
    assert len({r.data.tags["sweep_id"] for r in single}) == 4
    for run in single:
        assert Path(run.data.tags["output_dir"]) == tmp_path / "outputs" / "demo" / run.data.tags["sweep_id"]
    # Two sweeps: their own dirs (sweep.json names their own parent), their own children, closed with their counts.
    assert len({p.data.tags["sweep_id"] for p in parents}) == 2
    for parent in parents:
        sweep_id = parent.data.tags["sweep_id"]
        sweep_dir = tmp_path / "multirun" / "demo" / sweep_id
        assert json.loads((sweep_dir / "sweep.json").read_text())["parent_run_id"] == parent.info.run_id
        children = [r for r in variants if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert len(children) == 2 and {r.data.tags["sweep_id"] for r in children} == {sweep_id}
        assert len({r.data.params["trainer.seed"] for r in children}) == 1
        assert sorted(Path(r.data.tags["output_dir"]).relative_to(sweep_dir).as_posix() for r in children) == ["0", "1"]
        assert parent.info.status == "FINISHED" and parent.data.tags["status"] == "ok"
        assert parent.data.tags["n_ok"] == "2" and parent.data.tags["n_failed"] == "0"
    # No output written twice: eight distinct output dirs, each with its own trained LoRA.
    dirs = {r.data.tags["output_dir"] for r in variants}
    assert len(dirs) == 8
    assert all((Path(d) / "lora" / "pytorch_lora_weights.safetensors").is_file() for d in dirs), sorted(dirs)

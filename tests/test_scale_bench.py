"""Issue 12: the two-GPU benchmark's commands are valid (it cannot run here: no GPU)."""

from __future__ import annotations

from pathlib import Path

from sdxl_ablate.config import to_typed
from sdxl_ablate.run.launchers import register_resolvers
from sdxl_ablate.perf.scale_bench import STUDY_VARIANTS, commands, main

from .conftest import compose_config


class Args:
    resolution, batch, study_batch, steps, images = 512, 8, 1, 10, 16
    workdir = Path("/tmp/sb")


def _overrides(argv: list[str]) -> list[str]:
    start = argv.index("sdxl_ablate") + 1
    return [a for a in argv[start:] if a != "-m" and not a.startswith(("hydra.run.dir", "hydra.sweep.dir"))]


def test_benchmark_commands_compose_and_use_the_gpus_they_claim():
    register_resolvers()
    cmds = commands(Args())
    assert sorted(cmds) == ["study_1gpu", "study_2gpu", "throughput_1gpu", "throughput_2gpu"]
    assert [cmds[k]["env"]["CUDA_VISIBLE_DEVICES"] for k in sorted(cmds)] == ["0", "0,1", "0", "0,1"]
    t2 = cmds["throughput_2gpu"]["argv"]
    assert t2[0].endswith("torchrun") and "--nproc_per_node=2" in t2
    # Same global batch on 1 and 2 GPUs; different studies so the records find their runs.
    o1, o2 = _overrides(cmds["throughput_1gpu"]["argv"]), _overrides(t2)
    assert [o for o in o1 if not o.startswith("study=")] == [o for o in o2 if not o.startswith("study=")]
    cfg = to_typed(compose_config(o2))
    assert (cfg.trainer.batch_size, cfg.data.resolution, cfg.model.kind.value, cfg.study) == (
        8, 512, "sdxl_random", "scale_throughput_2gpu")
    for key in ("study_1gpu", "study_2gpu"):
        argv = cmds[key]["argv"]
        assert "hydra/launcher=gpus_local" in argv and f"variant={STUDY_VARIANTS}" in argv
        for variant in STUDY_VARIANTS.split(","):
            over = [f"variant={variant}" if o.startswith("variant=") else o for o in _overrides(argv)]
            cfg = compose_config(over, return_hydra_config=True)
            assert cfg.hydra.runtime.choices["hydra/launcher"] == "gpus_local"
            assert to_typed(compose_config(over)).model.kind.value == "sdxl_random"


def test_dry_run_prints_the_commands(capsys):
    main(["--dry-run", "--only", "throughput", "--workdir", "/tmp/sb"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["throughput_1gpu", "throughput_2gpu"]
    assert "CUDA_VISIBLE_DEVICES=0,1" in lines[1] and "--nproc_per_node=2" in lines[1]

"""The two-GPU measurements of issue 12, as one command for a machine with 2+ GPUs:

    python -m sdxl_ablate.perf.scale_bench                       # needs 2 CUDA GPUs; ~30-60 min on H200s
    python -m sdxl_ablate.perf.scale_bench --dry-run             # prints the commands, runs nothing

1. Data-parallel throughput: the same variant (full-size SDXL architecture with random weights,
   no download; the sample dataset) on 1 GPU (`python -m sdxl_ablate`) and on 2 GPUs
   (`torchrun --nproc_per_node=2 -m sdxl_ablate`), same global batch: images/s of each (the
   trainer's own `perf/images_per_s`, median step, warm-up excluded), their ratio (target
   >= 1.8), and both loss curves (same global batch: they should agree within bf16 rounding).
2. The study across GPUs: the six variants of `sweep=naruto_study` on the same model, through
   `hydra/launcher=gpus_local` with CUDA_VISIBLE_DEVICES=0 (one job at a time) and =0,1 (one
   variant per GPU): wall time of each sweep and their ratio (target <= 0.6).

Every record goes to `--out` (default results/scale_<N>gpu.json) with the GPU names, the
commands, the commit and the date. Nothing here is measured until someone runs it on GPUs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

STUDY_VARIANTS = "te_all,te_attn,all,attn,dora_prodigy,attn_dropout05"


def base_overrides(args, study: str) -> list[str]:
    return ["model=sdxl_random", "data=sample", f"data.sample_size={args.images}", f"data.resolution={args.resolution}",
            "eval=off", f"trainer.max_steps={args.steps}", f"study={study}",
            f"tracking.uri=sqlite:///{args.workdir.resolve()}/mlflow.db",
            f"tracking.artifact_root={args.workdir.resolve()}/mlartifacts", "tracking.log_weights=false"]


def commands(args) -> dict[str, dict]:
    py = sys.executable
    torchrun = str(Path(py).parent / "torchrun")
    tput = lambda n: base_overrides(args, f"scale_throughput_{n}gpu") + [f"trainer.batch_size={args.batch}",
                                                                          "device=auto"]
    study = lambda n: base_overrides(args, f"scale_study_{n}gpu") + [f"trainer.batch_size={args.study_batch}",
                                                                     "device=auto"]
    out = args.workdir.resolve()
    return {
        "throughput_1gpu": {"env": {"CUDA_VISIBLE_DEVICES": "0"},
                            "argv": [py, "-m", "sdxl_ablate", *tput(1), f"hydra.run.dir={out}/t1"]},
        "throughput_2gpu": {"env": {"CUDA_VISIBLE_DEVICES": "0,1"},
                            "argv": [torchrun, "--standalone", "--nproc_per_node=2", "-m", "sdxl_ablate", *tput(2),
                                     f"hydra.run.dir={out}/t2"]},
        "study_1gpu": {"env": {"CUDA_VISIBLE_DEVICES": "0"},
                       "argv": [py, "-m", "sdxl_ablate", "-m", "hydra/launcher=gpus_local", f"variant={STUDY_VARIANTS}",
                                *study(1), f"hydra.sweep.dir={out}/s1"]},
        "study_2gpu": {"env": {"CUDA_VISIBLE_DEVICES": "0,1"},
                       "argv": [py, "-m", "sdxl_ablate", "-m", "hydra/launcher=gpus_local", f"variant={STUDY_VARIANTS}",
                                *study(2), f"hydra.sweep.dir={out}/s2"]},
    }


def _run(name: str, spec: dict) -> float:
    env = {**os.environ, **spec["env"]}
    print(f"[scale_bench] {name}: CUDA_VISIBLE_DEVICES={spec['env']['CUDA_VISIBLE_DEVICES']} {' '.join(spec['argv'])}",
          flush=True)
    started = time.perf_counter()
    subprocess.run(spec["argv"], env=env, check=True)
    return time.perf_counter() - started


def _runs(uri: str, study: str) -> list:
    from sdxl_ablate.track.tracker import connect

    client = connect(uri)
    exp = client.get_experiment_by_name(study)
    runs = client.search_runs([exp.experiment_id], max_results=100) if exp else []
    bad = [r.info.run_name for r in runs if r.data.tags.get("status") != "ok"]
    if not runs or bad:
        raise RuntimeError(f"{study}: no runs, or runs not ok: {bad}")
    return runs


def _curve(uri: str, run) -> list[float]:
    from sdxl_ablate.track.tracker import connect

    hist = connect(uri).get_metric_history(run.info.run_id, "train/loss")
    return [m.value for m in sorted(hist, key=lambda m: m.step)]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resolution", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=8, help="global batch of the throughput runs (split over the GPUs)")
    ap.add_argument("--study-batch", type=int, default=1, help="batch of each study variant")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--images", type=int, default=32, help="sample images (the dataset)")
    ap.add_argument("--workdir", type=Path, default=Path("scale_bench"))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--only", choices=["throughput", "study"], default=None)
    ap.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    args = ap.parse_args(argv)
    cmds = commands(args)
    if args.only:
        cmds = {k: v for k, v in cmds.items() if k.startswith(args.only)}
    if args.dry_run:
        for name, spec in cmds.items():
            print(f"{name}: CUDA_VISIBLE_DEVICES={spec['env']['CUDA_VISIBLE_DEVICES']} {' '.join(spec['argv'])}")
        return

    import torch

    if torch.cuda.device_count() < 2:
        raise SystemExit(f"scale_bench needs 2 CUDA GPUs; this machine has {torch.cuda.device_count()}")
    args.workdir.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{args.workdir.resolve()}/mlflow.db"
    common = {
        "gpus": [torch.cuda.get_device_name(i) for i in range(2)],
        "torch": torch.__version__,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "resolution": args.resolution, "steps": args.steps,
    }
    records = []
    walls = {name: _run(name, spec) for name, spec in cmds.items()}
    if "throughput_1gpu" in walls:
        one, two = _runs(uri, "scale_throughput_1gpu")[-1], _runs(uri, "scale_throughput_2gpu")[-1]
        ips1, ips2 = one.data.metrics["perf/images_per_s"], two.data.metrics["perf/images_per_s"]
        c1, c2 = _curve(uri, one), _curve(uri, two)
        records.append({**common, "kind": "data_parallel_throughput", "global_batch": args.batch,
                        "images_per_s_1gpu": ips1, "images_per_s_2gpu": ips2, "speedup": ips2 / ips1,
                        "target_speedup": 1.8, "meets_target": ips2 / ips1 >= 1.8,
                        "peak_reserved_gib_1gpu": one.data.metrics.get("memory/peak_reserved_gib"),
                        "peak_reserved_gib_2gpu": two.data.metrics.get("memory/peak_reserved_gib"),
                        "loss_curve_1gpu": c1, "loss_curve_2gpu": c2,
                        "loss_max_abs_diff": max((abs(a - b) for a, b in zip(c1, c2)), default=None),
                        "commands": {k: cmds[k] for k in ("throughput_1gpu", "throughput_2gpu")}})
    if "study_1gpu" in walls:
        w1, w2 = walls["study_1gpu"], walls["study_2gpu"]
        gpus_used = sorted({r.data.tags.get("gpu.uuid") for r in _runs(uri, "scale_study_2gpu")})
        records.append({**common, "kind": "study_across_gpus", "variants": STUDY_VARIANTS.split(","),
                        "study_batch": args.study_batch, "wall_s_1gpu": w1, "wall_s_2gpu": w2, "ratio": w2 / w1,
                        "target_ratio": 0.6, "meets_target": w2 / w1 <= 0.6, "gpu_uuids_used_2gpu": gpus_used,
                        "commands": {k: cmds[k] for k in ("study_1gpu", "study_2gpu")}})
    out = args.out or Path("results") / f"scale_{args.resolution}px_2gpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(records, indent=2) + "\n")
    print(json.dumps(records, indent=2))
    print(f"[scale_bench] wrote {out}")


if __name__ == "__main__":
    main()

"""`python -m sdxl_ablate.bench --study SWEEP [overrides]`: a whole study, timed as users run it.

Runs the committed sweep through the real CLI in a subprocess, exactly as a user would type it
(`python -m sdxl_ablate -m sweep=SWEEP [overrides] hydra.sweep.dir=...`, MLflow included), then
collects the phase timings every variant wrote into its job directory (`phases.json`, measured
by the run itself: see sdxl_ablate/phases.py) and writes one JSON file:

- per variant: its run name and MLflow run id, status, the phases (model setup, input caching,
  first step, training, evaluation, logging, ...), wall time, the time from its start to its
  first training step, steps, median step time and images/s, and `overhead_s` = wall time
  minus the later training steps (everything that is not steady training);
- per study run: the wall time of the whole command, the process start-up until the first
  variant starts, the return code;
- with `--runs 2`, the same study again in a fresh process: the second run finds the compile
  caches and the latent cache on disk ("warm caches").

    python -m sdxl_ablate.bench --study lora_targets model=tiny data=sample eval=off device=cpu
    python -m sdxl_ablate.bench --study naruto_study --runs 2 model=sdxl_random data=sample \\
        data.sample_size=68 data.resolution=512 trainer.batch_size=8 trainer.max_steps=100 eval=off \\
        'variant=attn,all,dora_prodigy,attn_dropout05' --out results/study_512px.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from sdxl_ablate.config import REPO_ROOT
from sdxl_ablate.run.phases import PHASES_FILE

PACKAGE_ROOT = REPO_ROOT  # the checkout whose sdxl_ablate runs the study


def study_command(study: str, overrides: list[str], sweep_dir: Path) -> list[str]:
    # force: a benchmark trains every variant, also one an earlier run of it already finished
    return [sys.executable, "-m", "sdxl_ablate", "-m", f"sweep={study}", *overrides, "trainer.force=true",
            f"hydra.sweep.dir={sweep_dir}"]


def collect(sweep_dir: Path) -> list[dict]:
    """The variants' phase records of one sweep, in job order, with the derived figures."""
    records = []
    jobs = sorted((p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    for job in jobs:
        path = job / PHASES_FILE
        if not path.is_file():  # e.g. a variant whose config was invalid: no run, no phases
            records.append({"job": int(job.name), "status": "no phases.json (the variant did not start)"})
            continue
        rec = {"job": int(job.name), **json.loads(path.read_text())}
        ph = rec["phases"]
        rec["overhead_s"] = round(rec["wall_s"] - ph["training"], 4)
        rec["overhead_without_evaluation_s"] = round(rec["overhead_s"] - ph["evaluation"], 4)
        start = rec.get("marks", {}).get("loop_start")
        rec["time_to_first_step_s"] = start
        rec["time_to_steady_training_s"] = None if start is None else round(start + ph["first_step"], 4)
        records.append(rec)
    return records


def run_study(study: str, overrides: list[str], sweep_dir: Path, log_file: Path) -> dict:
    cmd = study_command(study, overrides, sweep_dir)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PACKAGE_ROOT), env.get("PYTHONPATH")) if p)
    print("$ " + " ".join(cmd), flush=True)
    started_at = time.time()
    t0 = time.perf_counter()
    with open(log_file, "w") as log:
        # The sweep's own output goes to the terminal and to a log beside the records.
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
                                bufsize=1)
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)
        proc.wait()
    wall = time.perf_counter() - t0
    variants = collect(sweep_dir) if sweep_dir.is_dir() else []
    timed = [v for v in variants if "wall_s" in v]
    return {
        "command": " ".join(cmd), "returncode": proc.returncode, "started_at": started_at, "wall_s": round(wall, 3),
        "startup_s": round(timed[0]["started_at"] - started_at, 3) if timed else None,
        "variants_wall_s": round(sum(v["wall_s"] for v in timed), 3),
        "training_s": round(sum(v["phases"]["training"] for v in timed), 3),
        "sweep_dir": str(sweep_dir), "log": str(log_file), "variants": variants,
    }


def gpu_name() -> str | None:
    """The GPU's name without initialising CUDA in this (parent) process."""
    if shutil.which("nvidia-smi") is None:
        return None
    out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True)
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def summary_table(doc: dict) -> str:
    rows = ["| run | job | variant | status | wall s | setup s | inputs s | first step s | training s | eval s | "
            "logging s | overhead s | to first step s | images/s |", "|" + "---|" * 14]
    for i, run in enumerate(doc["runs"], 1):
        for v in run["variants"]:
            if "phases" not in v:
                rows.append(f"| {i} | {v['job']} | - | {v['status']} |" + " - |" * 10)
                continue
            ph = v["phases"]

            def f(x):
                return "-" if x is None else f"{x:.1f}"
            rows.append(f"| {i} | {v['job']} | {v.get('run_name', '')} | {v.get('status')} | {f(v['wall_s'])} | "
                        f"{f(ph['model_setup'])} | {f(ph['input_caching'])} | {f(ph['first_step'])} | "
                        f"{f(ph['training'])} | {f(ph['evaluation'])} | {f(ph['logging'])} | {f(v['overhead_s'])} | "
                        f"{f(v['time_to_first_step_s'])} | {f(v.get('images_per_s'))} |")
        rows.append(f"| {i} | study | wall {run['wall_s']:.1f} s, start-up {run['startup_s'] or 0:.1f} s, "
                    f"training {run['training_s']:.1f} s | rc {run['returncode']} |" + " |" * 10)
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdxl_ablate.bench --study",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", required=True, help="a committed sweep (sweeps/NAME.yaml)")
    parser.add_argument("--runs", type=int, default=1,
                        help="how many times to run the study, each in a fresh process (2: warm caches)")
    parser.add_argument("--out", default=None, help="JSON file (default results/study_<study>.json)")
    parser.add_argument("--sweep-dir", default=None,
                        help="where the sweeps' job directories go (default multirun/bench_<study>/<time>)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides passed to the sweep as typed")
    args = parser.parse_args(argv)
    sweep_file = PACKAGE_ROOT / "sweeps" / f"{args.study}.yaml"
    if not sweep_file.is_file():
        known = sorted(p.stem for p in (PACKAGE_ROOT / "sweeps").glob("*.yaml"))
        print(f"--study {args.study}: no sweep file {sweep_file}; known: {', '.join(known)}", file=sys.stderr)
        return 2
    if args.runs < 1:
        print(f"--runs {args.runs}: must be >= 1", file=sys.stderr)
        return 2
    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    base = Path(args.sweep_dir or Path("multirun") / f"bench_{args.study}" / stamp).resolve()
    out = Path(args.out or f"results/study_{args.study}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    base.mkdir(parents=True, exist_ok=True)
    doc = {
        "command": "python -m sdxl_ablate.bench " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "study": args.study, "overrides": args.overrides, "gpu": gpu_name(),
        "note": "phases measured by each variant's run (phases.json); overhead_s = variant wall - later steps",
        "runs": [],
    }
    for i in range(args.runs):
        print(f"\n=== study {args.study}, run {i + 1} of {args.runs}", flush=True)
        run = run_study(args.study, args.overrides, base / f"run{i + 1}", base / f"run{i + 1}.log")
        doc["runs"].append(run)
        out.write_text(json.dumps(doc, indent=1))
    print("\n" + summary_table(doc))
    print(f"\nwritten: {out}")
    return 0 if all(r["returncode"] == 0 for r in doc["runs"]) else 1

"""`python -m sdxl_ablate.bench`: what each training recipe costs on this GPU, measured.

Runs named training configurations on the full-size SDXL-base architecture with random
weights (no download; memory and speed do not depend on the weight values) on a CUDA GPU,
through the project's own trainer (`train.train`, the loop users run), and writes one JSON
record per configuration: GPU, resolution, batch, variant, precision, peak allocated and
reserved GiB, median step time, images/s, achieved TFLOP/s and its fraction of this GPU's
measured bf16 matrix rate, kernels per step (profiler) and the dry run's predicted peak.
The common recipe ("reference") runs in the same process, and every record carries its
ratios against it.

Each configuration is a list of Hydra overrides, exactly what a user would type after
`python -m sdxl_ablate`, so every number here can be reproduced as a training run.

    python -m sdxl_ablate.bench --resolution 1024                 # the default set
    python -m sdxl_ablate.bench --resolution 512 --configs reference,fast
    python -m sdxl_ablate.bench --list
    python -m sdxl_ablate.bench --study naruto_study [overrides]   # a whole study, per phase (studybench.py)
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import random
import statistics
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

GIB = 1024**3


@dataclass(frozen=True)
class Bench:
    description: str
    overrides: tuple[str, ...]
    measured_only: bool = False  # reported, not one of the targets


# Every configuration runs with model=sdxl_random and the resolution given on the command
# line; `{batch}` is the batch that fills the 16 GiB budget at that resolution (FAST_BATCH).
COMMON = ("model=sdxl_random", "eval.enabled=false", "trainer.save_lora=false", "memory=t4_16gb")
# Each configuration spells out every switch, so a later change of the trainer's defaults
# cannot move its numbers.
_EAGER = ("trainer.precision=bf16", "trainer.cache_latents=true", "trainer.gradient_checkpointing=true",
          "trainer.compile=false", "trainer.channels_last=false", "trainer.cuda_graphs=false",
          "trainer.optimizer=adamw", "trainer.base_weights=compute")
PLAIN = (*_EAGER, "trainer.batch_size=1")
GRAPHS = (*_EAGER, "trainer.cuda_graphs=true")
FAST = (*GRAPHS, "trainer.compile=true", "trainer.channels_last=true", "trainer.batch_size={batch}")

CONFIGS: dict[str, Bench] = {
    "reference": Bench(
        "common recipe: fp16 UNet, fp32 VAE + both text encoders run every step, gradient "
        "checkpointing, 8-bit AdamW, batch 1",
        ("trainer.precision=fp16", "trainer.cache_latents=false", "trainer.gradient_checkpointing=true",
         "trainer.compile=false", "trainer.channels_last=false", "trainer.cuda_graphs=false",
         "trainer.optimizer=adamw8bit", "trainer.base_weights=compute", "trainer.batch_size=1")),
    "plain": Bench("precomputed latents + prompts, bf16, checkpointing, fused AdamW, batch 1, eager", PLAIN),
    "lean_eager": Bench("batch 1, bf16 base weights, precomputed, checkpointing, 8-bit AdamW, eager "
                        "(no CUDA graph pool: the smallest footprint)", (*PLAIN, "trainer.optimizer=adamw8bit")),
    "lean": Bench("batch 1, bf16 base weights, precomputed, checkpointing, 8-bit AdamW, CUDA graphs",
                  (*GRAPHS, "trainer.batch_size=1", "trainer.optimizer=adamw8bit")),
    "lean_fp8": Bench("batch 1, fp8 base weights, precomputed, checkpointing, 8-bit AdamW, CUDA graphs",
                      (*GRAPHS, "trainer.batch_size=1", "trainer.optimizer=adamw8bit", "trainer.base_weights=fp8")),
    "batch": Bench("precomputed, bf16, checkpointing, fused AdamW, the budget's batch, eager",
                   (*_EAGER, "trainer.batch_size={batch}")),
    "batch_graphs": Bench("batch, plus CUDA graphs", (*GRAPHS, "trainer.batch_size={batch}")),
    "fast": Bench("batch_graphs, plus per-block torch.compile and channels-last", FAST),
    # Measured, not targeted: each changes one thing of `batch_graphs` (eager: no compile per variant).
    "all": Bench("batch_graphs, LoRA on attention + conv + feed-forward (targets=all)",
                 (*GRAPHS, "trainer.batch_size={batch}", "lora.targets=all"), True),
    "te": Bench("batch_graphs, LoRA on both text encoders too (they run every step; no CUDA graphs)",
                (*GRAPHS, "trainer.batch_size={batch}", "lora.text_encoder=true"), True),
    "dora": Bench("batch_graphs, DoRA on attention", (*GRAPHS, "trainer.batch_size={batch}", "lora.use_dora=true"),
                  True),
    "dropout": Bench("batch_graphs, LoRA dropout 0.5 (no CUDA graphs with checkpointing)",
                     (*GRAPHS, "trainer.batch_size={batch}", "lora.dropout=0.5"), True),
    "fp16": Bench("batch_graphs in fp16 with loss scaling (GPUs without bf16, e.g. a T4)",
                  (*GRAPHS, "trainer.batch_size={batch}", "trainer.precision=fp16"), True),
    "adamw8bit": Bench("batch_graphs with 8-bit AdamW instead of fused AdamW",
                       (*GRAPHS, "trainer.batch_size={batch}", "trainer.optimizer=adamw8bit"), True),
    "fp8": Bench("batch_graphs with fp8 base weights", (*GRAPHS, "trainer.batch_size={batch}",
                                                         "trainer.base_weights=fp8"), True),
}
DEFAULT_SET = tuple(CONFIGS)
# The largest batch under the 16 GiB cap with checkpointing (from the dry run, checked on an H100).
FAST_BATCH = {512: 16, 768: 12, 1024: 8}


def overrides_for(name: str, resolution: int, extra: tuple[str, ...] = ()) -> list[str]:
    """The configuration's Hydra overrides at this resolution; a later value of a key wins."""
    batch = FAST_BATCH.get(resolution, max(1, 8 * 1024**2 // resolution**2))
    own = [o.replace("{batch}", str(batch)) for o in CONFIGS[name].overrides]
    merged: dict[str, str] = {}
    for o in [*COMMON, f"data.resolution={resolution}", *own, *extra]:
        key = o.split("=", 1)[0]
        merged.pop(key, None)
        merged[key] = o
    return list(merged.values())


# --- measuring ------------------------------------------------------------------------------


def bf16_matmul_tflops(device) -> float:
    """This GPU's bf16 matrix rate: 8192^3 products on random data, median of 10 after warm-up."""
    import torch

    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del a, b
    return 2 * 8192**3 / statistics.median(times) / 1e12


def synthetic_data(resolution: int, n: int):
    """`n` captioned images drawn at the training resolution, in memory (no files, no hub)."""
    from sdxl_ablate.data.datasets import Example, LoadedData, _draw_character

    rng = random.Random(0)
    examples = [Example(*_draw_character(resolution, rng)) for _ in range(n)]
    return LoadedData(train=examples, heldout=[], skipped=[], source=f"bench:{n}x{resolution}px")


class _Profiled:
    """Profiles one optimizer step: CUDA kernels launched and their summed time."""

    def __init__(self, step: int):
        self.step = step
        self.kernels = None
        self.busy_s = None
        self.top: list[dict] = []

    def __call__(self, i: int):
        if i != self.step:
            return contextlib.nullcontext()
        return self._profile()

    @contextlib.contextmanager
    def _profile(self):
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            yield
        kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
        self.kernels = len(kernels)
        self.busy_s = sum(e.time_range.elapsed_us() for e in kernels) / 1e6
        # Where the GPU time goes: kernel families (name up to its template arguments), summed.
        families: dict[str, list] = {}
        for e in kernels:
            key = e.name.split("<")[0].split("(")[0][:80]
            families.setdefault(key, [0, 0.0])
            families[key][0] += 1
            families[key][1] += e.time_range.elapsed_us() / 1e6
        top = sorted(families.items(), key=lambda kv: -kv[1][1])[:25]
        self.top = [{"kernel": k, "count": n, "seconds": round(t, 5)} for k, (n, t) in top]


def predict(overrides: list[str]) -> dict:
    """The dry run for a configuration (runs in a worker process, on the CPU)."""
    with contextlib.suppress(Exception):
        os.nice(10)  # the benchmark's own process launches the kernels
    from sdxl_ablate.train.plan import compose, simulate_step

    sim = simulate_step(compose(overrides))
    return {"flops": sim.flops, "model_flops": sim.model_flops, "trainable": sim.trainable["total"],
            "predicted_peak_allocated_gib": sim.peak_allocated_gib,
            "predicted_peak_reserved_gib": sim.peak_reserved_gib,
            "sim_static_gib": sim.static_bytes / GIB, "sim_step_peak_gib": sim.step_peak_bytes / GIB}


def run_one(name: str, overrides: list[str], device, warmup: int, steps: int) -> dict:
    """One configuration in isolation: fresh model, memory released and counters reset."""
    import torch

    from sdxl_ablate.config import ModelKind
    from sdxl_ablate.train.memory import GIB as _GIB, MemoryGuard, is_oom
    from sdxl_ablate.model.sdxl import build_sdxl_random, build_tiny
    from sdxl_ablate.train.plan import compose
    from sdxl_ablate.model.precision import compute_dtype
    from sdxl_ablate.train.loop import Hooks, train

    cfg = compose(overrides)
    cuda = device.type == "cuda"
    t = cfg.trainer
    cfg.trainer.max_steps = warmup + steps + 1  # the last step is profiled, not timed
    cfg.trainer.sync_every_step = True  # step_times_s: each step's own wall time
    guard = MemoryGuard.for_config(cfg.memory, device)
    device = guard.device
    guard.start()
    record: dict = {"allocated_at_start_gib": torch.cuda.memory_allocated(device) / _GIB if cuda else None}
    profiled = _Profiled(warmup + steps)

    def loop_start():
        # The peak of training itself: the precompute (once per dataset, shared by a sweep)
        # has run and its encoders have left the GPU.
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        record["setup_s"] = time.perf_counter() - started

    started = time.perf_counter()
    components = None
    try:
        torch.manual_seed(0)
        if cfg.model.kind == ModelKind.tiny:  # the CPU smoke test
            components = build_tiny()
        else:  # born on the GPU in the compute dtype: no fp32 copy on the host
            components = build_sdxl_random(device, compute_dtype(cfg))
        data = synthetic_data(cfg.data.resolution, max(8, 2 * t.batch_size))
        result = train(components, data, cfg, device, hooks=Hooks(loop_start, profiled))
        timed = result.step_times[warmup: warmup + steps]
        step_time = statistics.median(timed)
        record.update(status=result.status, step_time_s=step_time,
                      step_times_s=[round(x, 4) for x in timed],
                      images_per_s=t.batch_size * t.grad_accum / step_time,
                      kernels_per_step=profiled.kernels, gpu_busy_s=profiled.busy_s,
                      top_kernels=profiled.top,
                      first_step_s=result.step_times[0] if result.step_times else None,
                      losses=[round(x, 5) for x in result.losses], cuda_graphs_used=result.cuda_graphs)
    except Exception as err:  # noqa: BLE001 - one configuration failing must not stop the others
        record.update(status="oom" if is_oom(err) else "failed", error=f"{type(err).__name__}: {err}"[:2000])
        if not is_oom(err):
            traceback.print_exc()
    finally:
        record.update({k.split("/")[1]: v for k, v in guard.peak().items()})
        del components
        gc.collect()
        guard.release()
    return record


def describe(name: str, overrides: list[str]) -> dict:
    from sdxl_ablate.config.identity import adapter
    from sdxl_ablate.train.plan import compose

    cfg = compose(overrides)
    t = cfg.trainer
    return {
        "name": name, "description": CONFIGS[name].description if name in CONFIGS else "",
        "measured_only": CONFIGS[name].measured_only if name in CONFIGS else True,
        "overrides": [o for o in overrides if o not in COMMON],
        "resolution": cfg.data.resolution, "batch_size": t.batch_size, "grad_accum": t.grad_accum,
        "variant": adapter(cfg),
        "precision": t.precision.value, "base_weights": t.base_weights.value, "optimizer": t.optimizer.value,
        "gradient_checkpointing": t.gradient_checkpointing, "compile": t.compile,
        "channels_last": t.channels_last, "cache_latents": t.cache_latents, "cuda_graphs": t.cuda_graphs,
    }


def finish(record: dict, prediction: dict | None, matmul_tflops: float) -> None:
    """Adds the arithmetic rates and the prediction's error to a measured record."""
    if prediction:
        record.update(prediction)
        if record.get("peak_reserved_gib"):
            measured = record["peak_reserved_gib"]
            record["prediction_error"] = (prediction["predicted_peak_reserved_gib"] - measured) / measured
    if record.get("status") == "ok" and prediction and matmul_tflops:
        steps_per_s = 1 / record["step_time_s"]
        record["tflop_per_step"] = prediction["flops"] * record["grad_accum"] / 1e12
        record["achieved_tflops"] = record["tflop_per_step"] * steps_per_s
        record["model_tflops"] = prediction["model_flops"] * record["grad_accum"] / 1e12 * steps_per_s
        record["fraction_of_bf16_matmul"] = record["achieved_tflops"] / matmul_tflops


def add_ratios(records: list[dict]) -> None:
    ref = next((r for r in records if r["name"] == "reference" and r.get("status") == "ok"), None)
    if ref is None:
        return
    for r in records:
        if r.get("status") == "ok":
            r["speedup_vs_reference"] = r["images_per_s"] / ref["images_per_s"]
            if r.get("peak_reserved_gib") and ref.get("peak_reserved_gib"):
                r["reserved_vs_reference"] = r["peak_reserved_gib"] / ref["peak_reserved_gib"]


def table(records: list[dict]) -> str:
    rows = ["| config | res | batch | reserved GiB | allocated GiB | predicted GiB | images/s | x ref | "
            "TFLOP/s | of bf16 mm | kernels/step |", "|" + "---|" * 11]
    for r in records:
        def f(key, fmt="{:.2f}"):
            v = r.get(key)
            return fmt.format(v) if isinstance(v, (int, float)) else "-"
        status = "" if r.get("status") == "ok" else f" ({r.get('status')})"
        rows.append(f"| {r['name']}{status} | {r['resolution']} | {r['batch_size']} | {f('peak_reserved_gib')} | "
                    f"{f('peak_allocated_gib')} | {f('predicted_peak_reserved_gib')} | {f('images_per_s')} | "
                    f"{f('speedup_vs_reference', '{:.1f}')} | {f('achieved_tflops', '{:.0f}')} | "
                    f"{f('fraction_of_bf16_matmul', '{:.0%}')} | {f('kernels_per_step', '{:,}')} |")
    return "\n".join(rows)


def predict_into(path: Path) -> int:
    """Fills in the dry run's numbers for every record of a results file, on this machine's CPU
    (the plan is deterministic: it need not run beside the GPU, where it would compete with the
    benchmark for the host)."""
    import multiprocessing

    from sdxl_ablate.train.plan import predict_reserved_gib

    doc = json.loads(path.read_text())
    records = doc["records"]
    if all("sim_static_gib" in r for r in records):
        # Simulated already: only the allocator model's coefficients may have changed.
        for r in records:
            r["predicted_peak_reserved_gib"] = predict_reserved_gib(
                r["sim_static_gib"], r["sim_step_peak_gib"], r["base_weights"] == "fp8")
            finish(r, {k: r[k] for k in ("flops", "model_flops", "predicted_peak_reserved_gib")},
                   doc.get("bf16_matmul_tflops"))
        add_ratios(records)
        path.write_text(json.dumps(doc, indent=1))
        print(table(records))
        return 0
    with ProcessPoolExecutor(max_workers=max(1, min(4, (os.cpu_count() or 2) // 2)),
                             mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(predict, [*COMMON, f"data.resolution={r['resolution']}", *r["overrides"]])
                   for r in records]
        for record, future in zip(records, futures):
            try:
                finish(record, future.result(), doc.get("bf16_matmul_tflops"))
            except Exception as err:  # noqa: BLE001
                record["prediction_error_message"] = f"{type(err).__name__}: {err}"
    add_ratios(records)
    path.write_text(json.dumps(doc, indent=1))
    print(table(records))
    return 0


def main(argv: list[str] | None = None) -> int:
    given = sys.argv[1:] if argv is None else argv
    if any(a == "--study" or a.startswith("--study=") for a in given):  # a whole study through the CLI
        from sdxl_ablate.perf.studybench import main as study_main

        return study_main(given)
    parser = argparse.ArgumentParser(prog="python -m sdxl_ablate.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--configs", default=",".join(DEFAULT_SET), help="comma-separated names (see --list)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compile, allocator)")
    parser.add_argument("--steps", type=int, default=8, help="timed steps; the median is reported")
    parser.add_argument("--out", default=None, help="JSON file (default results/bench_<res>px.json)")
    parser.add_argument("--no-predict", action="store_true", help="skip the dry run's prediction and FLOPs")
    parser.add_argument("--list", action="store_true", help="print the configurations and exit")
    parser.add_argument("--device", default="cuda", help="cuda (cpu only for the smoke test, with model=tiny)")
    parser.add_argument("--sdpa", choices=("default", "cudnn"), default="default",
                        help="cudnn: prefer cuDNN's fused attention over flash attention (experiment)")
    parser.add_argument("--predict-only", metavar="JSON", default=None,
                        help="add the dry run's predictions and FLOPs to a results file (CPU; no GPU needed)")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides applied to every configuration")
    args = parser.parse_args(argv)
    names = [n for n in args.configs.split(",") if n]
    if args.predict_only:
        return predict_into(Path(args.predict_only))
    if args.list:
        for n, b in CONFIGS.items():
            print(f"{n:16s} {b.description}\n{'':16s} {' '.join(overrides_for(n, args.resolution))}")
        return 0
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        print(f"unknown configuration(s) {unknown}; known: {', '.join(CONFIGS)}", file=sys.stderr)
        return 2

    import torch

    from sdxl_ablate.train.memory import configure_allocator

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("sdxl_ablate.bench needs a CUDA GPU (the dry run, python -m sdxl_ablate.plan, does not)",
              file=sys.stderr)
        return 2
    configure_allocator(True)  # before the first CUDA allocation (memory.expandable_segments)
    if args.sdpa == "cudnn":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                 SDPBackend.MATH]
        sdpa_kernel(order, set_priority=True).__enter__()  # for the whole process
    out = Path(args.out or f"results/bench_{args.resolution}px.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    all_overrides = {n: overrides_for(n, args.resolution, tuple(args.overrides)) for n in names}
    predictions = {}
    pool = None
    if not args.no_predict:
        import multiprocessing

        pool = ProcessPoolExecutor(max_workers=min(4, len(names)), mp_context=multiprocessing.get_context("spawn"))
        predictions = {n: pool.submit(predict, o) for n, o in all_overrides.items()}

    matmul = bf16_matmul_tflops(device) if device.type == "cuda" else None
    header = {
        "command": "python -m sdxl_ablate.bench " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "python": platform.python_version(), "bf16_matmul_tflops": matmul,
        "warmup_steps": args.warmup, "timed_steps": args.steps, "sdpa": args.sdpa,
        "note": "peaks are of the training steps (precompute excluded); memory capped at the budget",
    }
    records: list[dict] = []
    for name in names:
        print(f"\n=== {name}: {' '.join(all_overrides[name])}", flush=True)
        record = {**describe(name, all_overrides[name]), "gpu": header["gpu"]}
        record.update(run_one(name, all_overrides[name], device, args.warmup, args.steps))
        records.append(record)
        print({k: record.get(k) for k in ("status", "images_per_s", "peak_reserved_gib", "peak_allocated_gib",
                                          "kernels_per_step", "setup_s", "error")}, flush=True)
        out.write_text(json.dumps({**header, "records": records}, indent=1))
    for name, record in zip(names, records):
        prediction = None
        if name in predictions:
            try:
                prediction = predictions[name].result()
            except Exception as err:  # noqa: BLE001
                record["prediction_error_message"] = f"{type(err).__name__}: {err}"
        finish(record, prediction, matmul)
    add_ratios(records)
    out.write_text(json.dumps({**header, "records": records}, indent=1))
    if pool:
        pool.shutdown()
    print(f"\n{header['gpu']}, bf16 matmul {matmul or 0:.0f} TFLOP/s, {args.resolution} px\n")
    print(table(records))
    print(f"\nwritten: {out}")
    return 0

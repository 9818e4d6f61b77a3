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
# line; `{fast_batch}` is the batch that fills the 16 GiB budget at that resolution.
COMMON = ("model=sdxl_random", "eval.enabled=false", "trainer.save_lora=false", "memory=t4_16gb")
# The trainer's defaults (conf/trainer/default.yaml) are the fast, lean settings; these
# configurations spell out what they change, so a default's later change cannot move them.
FAST = ("trainer.precision=bf16", "trainer.cache_latents=true", "trainer.gradient_checkpointing=true",
        "trainer.compile=true", "trainer.channels_last=true", "trainer.optimizer=adamw",
        "trainer.base_weights=compute")
PLAIN = ("trainer.precision=bf16", "trainer.cache_latents=true", "trainer.gradient_checkpointing=true",
         "trainer.compile=false", "trainer.channels_last=false", "trainer.optimizer=adamw",
         "trainer.base_weights=compute", "trainer.batch_size=1")

CONFIGS: dict[str, Bench] = {
    "reference": Bench(
        "common recipe: fp16 UNet, fp32 VAE + both text encoders run every step, gradient "
        "checkpointing, 8-bit AdamW, batch 1",
        ("trainer.precision=fp16", "trainer.cache_latents=false", "trainer.gradient_checkpointing=true",
         "trainer.compile=false", "trainer.channels_last=false", "trainer.optimizer=adamw8bit",
         "trainer.base_weights=compute", "trainer.batch_size=1")),
    "plain": Bench("latents + prompts precomputed, bf16, checkpointing, fused AdamW, batch 1, eager", PLAIN),
    "lean": Bench("batch 1, bf16 base weights, precomputed, checkpointing, 8-bit AdamW",
                  (*PLAIN, "trainer.optimizer=adamw8bit")),
    "lean_fp8": Bench("batch 1, fp8 base weights, precomputed, checkpointing, 8-bit AdamW",
                      (*PLAIN, "trainer.optimizer=adamw8bit", "trainer.base_weights=fp8")),
    "eager_batch": Bench("precomputed, bf16, checkpointing, fused AdamW, the budget's batch, eager",
                         (*PLAIN, "trainer.batch_size={fast_batch}")),
    "fast": Bench("precomputed, bf16, checkpointing, per-block torch.compile, channels-last, fused AdamW, "
                  "the budget's batch", (*FAST, "trainer.batch_size={fast_batch}")),
    # Measured, not targeted: each changes one thing of `fast`.
    "fast_all": Bench("fast, LoRA on attention + conv + feed-forward (targets=all)",
                      (*FAST, "trainer.batch_size={fast_batch}", "lora.targets=all"), True),
    "fast_te": Bench("fast, LoRA on both text encoders too (they run every step)",
                     (*FAST, "trainer.batch_size={fast_batch}", "lora.text_encoder=true"), True),
    "fast_dora": Bench("fast, DoRA on attention", (*FAST, "trainer.batch_size={fast_batch}", "lora.use_dora=true"),
                       True),
    "fast_dropout": Bench("fast, LoRA dropout 0.5", (*FAST, "trainer.batch_size={fast_batch}", "lora.dropout=0.5"),
                          True),
    "fast_fp16": Bench("fast, fp16 with loss scaling (GPUs without bf16, e.g. a T4)",
                       (*FAST, "trainer.batch_size={fast_batch}", "trainer.precision=fp16"), True),
    "fast_adamw8bit": Bench("fast, 8-bit AdamW instead of fused AdamW",
                            (*FAST, "trainer.batch_size={fast_batch}", "trainer.optimizer=adamw8bit"), True),
    "fast_fp8": Bench("fast, fp8 base weights",
                      (*FAST, "trainer.batch_size={fast_batch}", "trainer.base_weights=fp8"), True),
}
DEFAULT_SET = tuple(CONFIGS)
# The largest batch under the 16 GiB cap with checkpointing (from the dry run, checked on an H100).
FAST_BATCH = {512: 32, 768: 16, 1024: 8}


def overrides_for(name: str, resolution: int, extra: tuple[str, ...] = ()) -> list[str]:
    batch = FAST_BATCH.get(resolution, max(1, 8 * 1024**2 // resolution**2))
    own = [o.replace("{fast_batch}", str(batch)) for o in CONFIGS[name].overrides]
    return [*COMMON, f"data.resolution={resolution}", *own, *extra]


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
    from .data import Example, LoadedData, _draw_character

    rng = random.Random(0)
    examples = [Example(*_draw_character(resolution, rng)) for _ in range(n)]
    return LoadedData(train=examples, heldout=[], skipped=[], source=f"bench:{n}x{resolution}px")


class _Profiled:
    """Profiles one optimizer step: CUDA kernels launched and their summed time."""

    def __init__(self, step: int):
        self.step = step
        self.kernels = None
        self.busy_s = None

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


def predict(overrides: list[str]) -> dict:
    """The dry run for a configuration (runs in a worker process, on the CPU)."""
    with contextlib.suppress(Exception):
        os.nice(10)  # the benchmark's own process launches the kernels
    from .plan import compose, simulate_step

    sim = simulate_step(compose(overrides))
    return {"flops": sim.flops, "model_flops": sim.model_flops, "trainable": sim.trainable["total"],
            "predicted_peak_allocated_gib": sim.peak_allocated_gib,
            "predicted_peak_reserved_gib": sim.peak_reserved_gib,
            "sim_static_gib": sim.static_bytes / GIB, "sim_step_peak_gib": sim.step_peak_bytes / GIB}


def run_one(name: str, overrides: list[str], device, warmup: int, steps: int) -> dict:
    """One configuration in isolation: fresh model, memory released and counters reset."""
    import torch

    from .config import ModelKind
    from .memory import GIB as _GIB, MemoryGuard, is_oom
    from .models import build_sdxl_random, build_tiny
    from .plan import compose
    from .train import DTYPES, Hooks, train

    cfg = compose(overrides)
    cuda = device.type == "cuda"
    t = cfg.trainer
    cfg.trainer.max_steps = warmup + steps + 1  # the last step is profiled, not timed
    guard = MemoryGuard(cfg.memory.budget_gib, device, cfg.memory.enforce)
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
            components = build_sdxl_random(device, DTYPES[t.precision])
        data = synthetic_data(cfg.data.resolution, max(8, 2 * t.batch_size))
        result = train(components, data, cfg, device, hooks=Hooks(loop_start, profiled))
        timed = result.step_times[warmup: warmup + steps]
        step_time = statistics.median(timed)
        record.update(status=result.status, step_time_s=step_time,
                      step_times_s=[round(x, 4) for x in timed],
                      images_per_s=t.batch_size * t.grad_accum / step_time,
                      kernels_per_step=profiled.kernels, gpu_busy_s=profiled.busy_s,
                      first_step_s=result.step_times[0] if result.step_times else None,
                      losses=[round(x, 5) for x in result.losses])
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
    from .plan import compose

    cfg = compose(overrides)
    t, lo = cfg.trainer, cfg.lora
    return {
        "name": name, "description": CONFIGS[name].description if name in CONFIGS else "",
        "measured_only": CONFIGS[name].measured_only if name in CONFIGS else True,
        "overrides": [o for o in overrides if o not in COMMON],
        "resolution": cfg.data.resolution, "batch_size": t.batch_size, "grad_accum": t.grad_accum,
        "variant": {"targets": lo.targets.value, "text_encoder": lo.text_encoder, "use_dora": lo.use_dora,
                    "dropout": lo.dropout, "rank": lo.rank},
        "precision": t.precision.value, "base_weights": t.base_weights.value, "optimizer": t.optimizer.value,
        "gradient_checkpointing": t.gradient_checkpointing, "compile": t.compile,
        "channels_last": t.channels_last, "cache_latents": t.cache_latents,
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdxl_ablate.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--configs", default=",".join(DEFAULT_SET), help="comma-separated names (see --list)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compile, allocator)")
    parser.add_argument("--steps", type=int, default=8, help="timed steps; the median is reported")
    parser.add_argument("--out", default=None, help="JSON file (default results/bench_<res>px.json)")
    parser.add_argument("--no-predict", action="store_true", help="skip the dry run's prediction and FLOPs")
    parser.add_argument("--list", action="store_true", help="print the configurations and exit")
    parser.add_argument("--device", default="cuda", help="cuda (cpu only for the smoke test, with model=tiny)")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides applied to every configuration")
    args = parser.parse_args(argv)
    names = [n for n in args.configs.split(",") if n]
    if args.list:
        for n, b in CONFIGS.items():
            print(f"{n:16s} {b.description}\n{'':16s} {' '.join(overrides_for(n, args.resolution))}")
        return 0
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        print(f"unknown configuration(s) {unknown}; known: {', '.join(CONFIGS)}", file=sys.stderr)
        return 2

    import torch

    from .memory import configure_allocator

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("sdxl_ablate.bench needs a CUDA GPU (the dry run, python -m sdxl_ablate.plan, does not)",
              file=sys.stderr)
        return 2
    configure_allocator(True)  # before the first CUDA allocation (memory.expandable_segments)
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
        "warmup_steps": args.warmup, "timed_steps": args.steps,
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


if __name__ == "__main__":
    sys.exit(main())

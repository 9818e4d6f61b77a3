"""One variant, start to finish: data -> model -> train -> save -> evaluate, into one MLflow run.

Whatever fails (no GPU, out of memory, NaNs, a bad file, a bug) ends *this* variant with a
status tag and a closed run; the sweep goes on with the next one. The run is created first,
so even a variant that fails before loading anything is on record. Training and evaluation are
separate outcomes: `status` says how training ended, `eval_status` (ok/failed/off) how the
evaluation did; a variant that trained but could not be evaluated keeps its LoRA and metrics,
and `python -m sdxl_ablate.evaluate --run-id ID` can evaluate it later.
"""

from __future__ import annotations

import contextlib
import logging
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional

import torch

from sdxl_ablate.train import distributed
from sdxl_ablate.config import CONF_DIR, Config, to_yaml, used_params
from sdxl_ablate.config.identity import variant_tags
from sdxl_ablate.data.datasets import load_data
from sdxl_ablate.run.devices import acquire_device, gpu_required_by_launcher
from sdxl_ablate.export.lora_export import base_model, log_kohya
from sdxl_ablate.model.lora import lora_b_all_zero, save_lora
from sdxl_ablate.model.basecache import acquire, last_use, release
from sdxl_ablate.track.journal import JournalingTracker
from sdxl_ablate.train.memory import MemoryGuard, configure_allocator, describe_peak, is_oom
from sdxl_ablate.model.sdxl import load_components
from sdxl_ablate.run.phases import Phases
from sdxl_ablate.model.placement import place
from sdxl_ablate.model.precision import bf16_problem, card_of, resolve_precision
from sdxl_ablate.train.plan import predicted_fit, resolve_checkpointing
from sdxl_ablate.run.pickup import Plan, VariantBusy, data_parallel_plan, plan_variant
from sdxl_ablate.run.progress import job_label
from sdxl_ablate.evaluate.samples import training_hooks
from sdxl_ablate.evaluate.headline import log_summary
from sdxl_ablate.run.sweep import SweepInfo, new_sweep_id
from sdxl_ablate.track.tracker import Tracker
from sdxl_ablate.train.loop import train

log = logging.getLogger(__name__)

# Below this relative change of the held-out loss an effect is called negligible, however
# significant: with a near-constant difference its standard error can be tiny too.
NEGLIGIBLE_RELATIVE_CHANGE = 1e-3


def device_tag(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def no_effect_reason(cfg: Config, components, eval_metrics: dict[str, float]) -> Optional[str]:
    """Why the trained LoRA changed nothing measurable, or None if it did."""
    if not cfg.lora.use_dora and lora_b_all_zero(components):
        # B starts at zero: an adapter whose B never moved is the identity (DoRA's magnitudes can
        # still act, so DoRA is judged by its held-out loss alone).
        return "every LoRA B matrix is still zero: the adapter is the identity"
    delta, se = eval_metrics.get("eval/heldout_loss_delta"), eval_metrics.get("eval/heldout_loss_delta_se")
    base = eval_metrics.get("eval/heldout_loss_base")
    if delta is None or base is None:
        return None
    if abs(delta) <= NEGLIGIBLE_RELATIVE_CHANGE * abs(base):
        return f"held-out loss changed by {delta:+.2e}, under {NEGLIGIBLE_RELATIVE_CHANGE:.0e} of the base's {base:.4f}"
    if se == se and abs(delta) <= 2 * se:  # se is nan with a single held-out pair
        return f"held-out loss change {delta:+.4f} is within noise (2 x standard error {se:.4f})"
    return None


def run(cfg: Config, run_name: str, output_dir: Path, sweep: Optional[SweepInfo] = None) -> float | None:
    """Runs one variant; returns its final training loss (the sweep metric), None if it failed.
    A variant already finished with this config is skipped (and counted in this sweep as the
    run it reuses); an interrupted one resumes into its own run (pickup.py)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    sweep = sweep or SweepInfo(new_sweep_id())
    # precision=auto becomes what runs on this job's device before the config is hashed, logged or
    # used: the same config trains in bf16 on an A100 and in fp16 on a T4, two different LoRAs.
    cfg, precision = resolve_precision(cfg)
    ddp = distributed.from_env()
    if ddp is not None:  # under torchrun: every rank starts (pickup.DATA_PARALLEL); rank 0 records
        plan = data_parallel_plan(cfg)
        plan.tags.update(precision.tags())
        return run_planned(cfg, run_name, output_dir, plan, sweep, ddp)
    try:
        plan = plan_variant(cfg, run_name)
        plan.tags.update(precision.tags())
    except VariantBusy as err:  # another live process trains this very config: leave it to that one
        log.error("%s", err)
        return None
    try:
        if plan.action == "skip":
            sweep.record_reused(cfg.tracking, plan.run_id, run_name)
            return plan.result
        return run_planned(cfg, run_name, output_dir, plan, sweep)
    finally:
        plan.release()


def log_predicted_fit(tracker, cfg: Config, device: torch.device) -> None:
    """The dry run's word on this variant (train/plan.py), logged before training to hold against
    the measured peak. Advisory: a prediction that fails is a warning, never the variant's end."""
    try:
        predicted = predicted_fit(cfg, device)
    except Exception as err:  # noqa: BLE001
        log.warning("no memory prediction for this variant: %s: %s", type(err).__name__, err)
        return
    if predicted:
        tracker.log_metrics(predicted)


def run_planned(cfg: Config, run_name: str, output_dir: Path, plan: Plan, sweep: SweepInfo,
                ddp: Optional[distributed.Ddp] = None) -> float | None:
    """The variant's stages in order, each below: record the run, claim a device, load the data
    and the base, train, record the training, save and evaluate, finish. Any exception ends the
    variant with its status (oom or failed); the base is restored and the phases written either way."""
    phases = Phases()  # where the variant's time goes: time/* metrics and phases.json
    configure_allocator(cfg.memory.expandable_segments)
    main_rank = ddp is None or ddp.is_main
    with phases("logging"):
        tracker = open_tracker(cfg, run_name, output_dir, plan, sweep, main_rank)
    with tracker, contextlib.ExitStack() as held:
        phases.instrument(tracker)
        if main_rank:
            plan.opened(tracker, tracker.uri, output_dir)
        tracker.log_params(plan.params_to_log(used_params(cfg), tracker))
        tracker.log_text(to_yaml(cfg), "config.yaml")
        tracker.set_tags({"output_dir": str(output_dir)})
        components, guard, device = None, None, None
        requested = cfg  # as hashed: gradient_checkpointing=auto stays auto there (README)
        try:
            device, guard = claim_device(cfg, ddp, held, tracker)
            cfg, checkpointing = resolve_checkpointing(cfg, device)
            tracker.set_tags(checkpointing.tags())
            if main_rank:
                log_predicted_fit(tracker, cfg, device)
            # Under torchrun: the fullest GPU's numbers.
            memory_stats = guard.peak if ddp is None else lambda: ddp.max_over_ranks(guard.peak())
            with phases("data"):
                data = load_data(cfg.data)
            record_data(tracker, data)
            with phases("model_setup"):
                components = acquire(cfg, device)  # the sweep's loaded base, or a fresh one
            hooks = training_hooks(components, cfg, device, len(data.train), tracker, job_label(run_name))
            precompute_peak: dict[str, float] = {}
            checkpointer = plan.checkpointer(requested)
            with phases("train_other"):
                loop_start = training_starts(hooks.loop_start, guard, tracker, precompute_peak,
                                             phases.mark("loop_start"))
                result = train(components, data, cfg, device, plan.metrics_logger(tracker.log_metrics), memory_stats,
                               hooks=replace(hooks, loop_start=loop_start), checkpointer=checkpointer)
            phases.split_training(result)
            peak = record_training(tracker, result, checkpointer, guard, memory_stats(), precompute_peak)
            if result.status != "ok":
                return None
            untrained = no_effect_reason(cfg, components, {})  # judged on the adapters as trained
            eval_metrics = save_and_evaluate(components, data, cfg, device, tracker, output_dir, run_name, phases,
                                             hooks.label) if main_rank else {}
            record_no_effect(tracker, untrained or no_effect_reason(cfg, components, eval_metrics), run_name)
            log_summary(tracker)  # ablation/*: the headline numbers, from what was logged above
            tracker.set_status("ok")
            plan.finished(tracker.run_id, result.final_loss, output_dir)
            log.info("variant %s: ok, final loss %.4f, %s", run_name, result.final_loss, describe_peak(peak))
            return result.final_loss
        except Exception as err:  # noqa: BLE001 - a failing variant must never stop the sweep
            if ddp is not None and not ddp.is_main:
                raise  # torchrun then stops every rank; rank 0 records the failure (distributed.py)
            record_failure(tracker, guard, err, run_name)
            return None
        finally:
            with phases("teardown"):
                release(components)  # restored and verified for the next variant, or dropped
            del components
            if guard is not None:
                guard.release()
            tracker.log_metrics(phases.metrics())
            phases.write(output_dir, run_name=run_name, run_id=tracker.run_id, status=tracker.status,
                         device=str(device), base=last_use())


def open_tracker(cfg: Config, run_name: str, output_dir: Path, plan: Plan, sweep: SweepInfo, main_rank: bool):
    """MLflow, or the run's own journal when MLflow fails: training never stops for tracking.
    Under torchrun rank 0 alone owns the run; the other ranks log nothing."""
    if not main_rank:
        return distributed.NullTracker()
    plan.carry_journal(output_dir)  # a resume's journal starts with the run so far
    return JournalingTracker(cfg.tracking, cfg.study, run_name, output_dir,
                             tags={**variant_tags(cfg), **sweep.tags(), **plan.tags}, run_id=plan.run_id)


def claim_device(cfg: Config, ddp: Optional[distributed.Ddp], held: contextlib.ExitStack,
                 tracker) -> tuple[torch.device, MemoryGuard]:
    """A GPU of its own for this job (devices.py; under torchrun, its rank's GPU), and the memory
    guard started on it."""
    claim = held.enter_context(acquire_device(cfg.device, gpu_required_by_launcher(),
                                              local_rank=ddp.local_rank if ddp else None))
    distributed.setup(claim.device)
    tracker.set_tags({"device": device_tag(claim.device), **claim.tags(),
                      **({"ddp.world_size": str(ddp.world)} if ddp else {})})
    if cfg.trainer.precision.value == "bf16" and claim.device.type == "cuda":
        # The preflight stops this before a sweep starts; here for a job that claimed a GPU it did not see.
        problem = bf16_problem(card_of(claim.device.index))
        if problem:
            raise RuntimeError(problem)
    guard = MemoryGuard.for_config(cfg.memory, claim.device)
    guard.start()
    return claim.device, guard


def record_data(tracker, data) -> None:
    tracker.log_metrics({"data/train_images": len(data.train), "data/heldout_images": len(data.heldout),
                         "data/skipped_images": len(data.skipped)})
    if data.skipped:
        tracker.log_text("\n".join(data.skipped), "data/skipped_images.txt")


def training_starts(sample_base: Callable[[], None], guard: MemoryGuard, tracker, precompute_peak: dict[str, float],
                    mark_loop_start: Callable[[], None]) -> Callable[[], None]:
    """What happens just before the first step: the base model's sample images (if asked for),
    then the memory phase changes. Setup and input caching are one phase, training the next: the
    training peak must not depend on whether the latent cache was cold (first variant) or warm."""

    def starts() -> None:
        sample_base()
        precompute_peak.update(guard.peak("memory/precompute_peak"))
        tracker.log_metrics(precompute_peak)
        guard.reset_peak()
        tracker.log_metrics(guard.current("memory/train_start"))  # the live memory training starts from
        mark_loop_start()

    return starts


def record_training(tracker, result, checkpointer, guard: MemoryGuard, peak: dict[str, float],
                    precompute_peak: dict[str, float]) -> dict[str, float]:
    """The training's numbers, and its status when it did not end ok; returns the peak."""
    if checkpointer.failures:
        tracker.set_tags({"checkpoint.errors": " | ".join(checkpointer.failures)})
    tracker.log_metrics({
        **peak,
        **guard.headroom(peak, precompute_peak),
        "train/final_loss": result.final_loss,  # unweighted: comparable across variants
        # The min-SNR objective that was backpropagated, under its own name (not comparable).
        **({"train/final_weighted_loss": result.final_objective} if result.objective_losses else {}),
        "train/steps": result.steps,
        "train/nonfinite_steps": result.nonfinite_steps,
        "perf/step_time_s": result.step_time,
        "perf/images_per_s": result.images_per_s,
    })
    if result.status != "ok":
        tracker.set_status(result.status, error=result.error)
    return peak


def save_and_evaluate(components, data, cfg: Config, device: torch.device, tracker, output_dir: Path, run_name: str,
                      phases: Phases, label: str) -> dict[str, float]:
    """The LoRA file (and its kohya export) into the run, then the evaluation; its metrics."""
    eval_metrics: dict[str, float] = {}
    if cfg.trainer.save_lora:
        with phases("saving"):
            lora_file = save_lora(components, output_dir / "lora")
        if cfg.tracking.log_weights:
            tracker.log_artifact(lora_file, "lora")
            log_kohya(tracker, lora_file, run_name, components.unet.config, cfg.data.resolution,
                      base_model(cfg.model.kind.value, cfg.model.pretrained))
        if cfg.eval.enabled:
            with phases("evaluation"):
                eval_metrics = evaluate_variant(components, lora_file, data, cfg, device, tracker, output_dir,
                                                label=label)
    if not (cfg.trainer.save_lora and cfg.eval.enabled):
        tracker.set_tags({"eval_status": "off"})
    return eval_metrics


def record_no_effect(tracker, no_effect: Optional[str], run_name: str) -> None:
    if no_effect:
        tracker.set_tags({"no_effect": "true", "no_effect_reason": no_effect})
        log.warning("variant %s: no effect: %s", run_name, no_effect)


def record_failure(tracker, guard: Optional[MemoryGuard], err: Exception, run_name: str) -> None:
    status = "oom" if is_oom(err) else "failed"
    if guard is not None:
        tracker.log_metrics(guard.peak())
    tracker.set_status(status, error=f"{type(err).__name__}: {err}")
    tracker.log_text(traceback.format_exc(), "error.txt")
    log.error("variant %s: %s: %s: %s", run_name, status, type(err).__name__, err)


def evaluate_variant(components, lora_file: Path, data, cfg: Config, device: torch.device, tracker: Tracker,
                     output_dir: Path, label: str = "") -> dict[str, float]:
    """The evaluation as an outcome of its own: a failure is recorded (`eval_status=failed`,
    `eval_error`, `eval_error.txt`) and leaves the trained variant's status and LoRA as they are."""
    from sdxl_ablate.evaluate.scores import evaluate

    try:
        metrics = evaluate(components, lora_file, data, cfg, device, tracker, output_dir / "eval", label=label)
    except Exception as err:  # noqa: BLE001 - evaluation must not undo a finished training
        if is_oom(err) and device.type == "cuda":
            torch.cuda.empty_cache()
        tracker.set_tags({"eval_status": "failed", "eval_error": f"{type(err).__name__}: {err}"})
        tracker.log_text(traceback.format_exc(), "eval_error.txt")
        log.error("evaluation failed (the trained LoRA is kept; re-run with `python -m sdxl_ablate.evaluate "
                  "--run-id %s`): %s: %s", tracker.run_id, type(err).__name__, err)
        return {}
    tracker.set_tags({"eval_status": "ok"})
    return metrics


def reevaluate(run_id: str, tracking, eval_overrides: list[str], device_name: Optional[str] = None) -> dict[str, float]:
    """Evaluates a finished variant's run again, into the same run: its recorded config (with
    `eval_overrides` applied, e.g. `eval=tiny` or `eval.steps=10`) and its logged LoRA file,
    loaded into a fresh base model as users load it."""
    import tempfile

    from omegaconf import OmegaConf

    from sdxl_ablate.config import Config, to_typed
    from sdxl_ablate.model.lora import load_lora
    from sdxl_ablate.model.precision import compute_dtype

    with Tracker(tracking, "", "", run_id=run_id) as tracker:
        run = tracker.client.get_run(run_id)
        if run.data.tags.get("status") != "ok":
            raise ValueError(f"run {run_id} has status {run.data.tags.get('status')!r}: only a variant that trained "
                             "(status ok) can be evaluated")
        with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as held:
            recorded = from_before_card_profiles(OmegaConf.load(tracker.client.download_artifacts(run_id, "config.yaml",
                                                                                                  tmp)))
            cfg = to_typed(OmegaConf.merge(OmegaConf.structured(Config), recorded, eval_group_overrides(eval_overrides)))
            lora_file = Path(tracker.client.download_artifacts(run_id, "lora/pytorch_lora_weights.safetensors", tmp))
            device = held.enter_context(acquire_device(device_name or cfg.device)).device  # as in training
            data = load_data(cfg.data)
            components = load_components(cfg.model)
            dtype = compute_dtype(cfg)
            for module in (components.unet, components.text_encoder, components.text_encoder_2):
                place(module, device, dtype)  # as after training: frozen weights in the compute dtype
            load_lora(components.pipeline(), lora_file)
            tracker.log_text(to_yaml(cfg), "eval/config.yaml")
            metrics = evaluate_variant(components, lora_file, data, cfg, device, tracker,
                                       Path(tmp) / "out")
            reason = no_effect_reason(cfg, components, metrics) if metrics else None
            if metrics:
                tracker.set_tags({"no_effect": str(bool(reason)).lower(), **({"no_effect_reason": reason} if reason else {})})
        return metrics


def from_before_card_profiles(recorded):
    """A config.yaml recorded before the card profiles (issue 17) has `memory.budget_gib` alone: a
    plain allocator budget then, so it is read as one (not as the T4 profile plus a budget)."""
    memory = recorded.get("memory")
    if memory is not None and "card_total_mib" not in memory and memory.get("budget_gib") is not None:
        memory.card, memory.card_total_mib, memory.bf16_native = None, None, None
    return recorded


def eval_group_overrides(overrides: list[str]):
    """`eval=NAME` (a conf/eval file) and `eval.key=value` items -> one config to merge."""
    from omegaconf import OmegaConf

    conf = CONF_DIR / "eval"
    merged = OmegaConf.create({})
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r}: expected eval=NAME or eval.KEY=VALUE")
        if key == "eval":
            path = conf / f"{value}.yaml"
            if not path.is_file():
                raise ValueError(f"eval={value!r}: no such option; options: {sorted(p.stem for p in conf.glob('*.yaml'))}")
            merged = OmegaConf.merge(merged, {"eval": OmegaConf.load(path)})
        elif key.startswith("eval."):
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
        else:
            raise ValueError(f"override {item!r}: only eval settings can change in a re-evaluation")
    return merged

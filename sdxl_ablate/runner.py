"""One variant, start to finish: data -> model -> train -> save -> evaluate, into one MLflow run.

Whatever fails (out of memory, NaNs, a bad file, a bug) ends *this* variant with a status
tag and a closed run; the sweep goes on with the next one.
"""

from __future__ import annotations

import logging
import traceback
from pathlib import Path

import torch

from . import distributed
from .config import Config, flatten, to_yaml
from .data import load_data
from .devices import acquire_device, gpu_required_by_launcher
from .lora import save_lora
from .memory import MemoryGuard, configure_allocator, is_oom
from .models import load_components
from .tracking import Tracker
from .train import train

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device={name}: no CUDA GPU is visible; use device=cpu or device=auto")
    return torch.device(name)


def variant_tags(cfg: Config) -> dict[str, str]:
    """The ablation axes as tags, so the MLflow UI can group and filter runs by them."""
    lo, tr = cfg.lora, cfg.trainer
    return {
        "study": cfg.study,
        "model": cfg.model.kind.value,
        "lora.targets": lo.targets.value,
        "lora.text_encoder": str(lo.text_encoder).lower(),
        "lora.use_dora": str(lo.use_dora).lower(),
        "lora.dropout": str(lo.dropout),
        "trainer.precision": tr.precision.value,
        "trainer.optimizer": tr.optimizer.value,
        "data.resolution": str(cfg.data.resolution),
    }


def run(cfg: Config, run_name: str, output_dir: Path) -> float | None:
    """Runs one variant; returns its final training loss (the sweep metric), None if it failed."""
    output_dir.mkdir(parents=True, exist_ok=True)
    # A GPU of its own for this job (devices.py); under torchrun, its rank's GPU (distributed.py).
    ddp = distributed.from_env()
    claim = acquire_device(cfg.device, gpu_required_by_launcher(), local_rank=ddp.local_rank if ddp else None)
    device = claim.device
    distributed.setup(device)
    configure_allocator(cfg.memory.expandable_segments)
    guard = MemoryGuard(cfg.memory.budget_gib, device, cfg.memory.enforce)
    peak_memory = guard.peak if ddp is None else lambda: ddp.max_over_ranks(guard.peak())  # the fullest GPU
    # Rank 0 alone owns the MLflow run. (The claim is entered first: released whatever happens.)
    with claim, (Tracker(cfg.tracking, cfg.study, run_name, tags=variant_tags(cfg)) if ddp is None or ddp.is_main
                 else distributed.NullTracker()) as tracker:
        tracker.log_params(flatten(cfg))
        tracker.log_text(to_yaml(cfg), "config.yaml")
        tracker.set_tags({"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                          "output_dir": str(output_dir), **claim.tags(),
                          **({"ddp.world_size": str(ddp.world)} if ddp else {})})
        components = None
        guard.start()
        try:
            data = load_data(cfg.data)
            tracker.log_metrics({"data/train_images": len(data.train), "data/heldout_images": len(data.heldout),
                                 "data/skipped_images": len(data.skipped)})
            if data.skipped:
                tracker.log_text("\n".join(data.skipped), "data/skipped_images.txt")
            components = load_components(cfg.model)
            result = train(components, data, cfg, device, tracker.log_metrics, peak_memory)
            peak = peak_memory()
            fits = guard.fits(peak)
            tracker.log_metrics({
                **peak,
                "train/final_loss": result.final_loss,
                "train/steps": result.steps,
                "train/nonfinite_steps": result.nonfinite_steps,
                "perf/step_time_s": result.step_time,
                "perf/images_per_s": result.images_per_s,
                **({} if fits is None else {"memory/fits_budget": float(fits)}),
            })
            if result.status != "ok":
                tracker.set_status(result.status, error=f"{result.nonfinite_steps} non-finite losses, "
                                   f"{cfg.trainer.max_nonfinite_in_row} in a row")
                return None
            if cfg.trainer.save_lora and (ddp is None or ddp.is_main):
                lora_file = save_lora(components, output_dir / "lora")
                if cfg.tracking.log_weights:
                    tracker.log_artifact(lora_file, "lora")
                if cfg.eval.enabled:
                    from .evaluate import evaluate

                    evaluate(components, lora_file, data, cfg, device, tracker, output_dir / "eval")
            tracker.set_status("ok")
            log.info("variant %s: ok, final loss %.4f, %s", run_name, result.final_loss, peak)
            return result.final_loss
        except Exception as err:  # noqa: BLE001 - a failing variant must never stop the sweep
            if ddp is not None and not ddp.is_main:
                raise  # torchrun then stops every rank; rank 0 records the failure (distributed.py)
            status = "oom" if is_oom(err) else "failed"
            tracker.log_metrics(guard.peak())
            tracker.set_status(status, error=f"{type(err).__name__}: {err}")
            tracker.log_text(traceback.format_exc(), "error.txt")
            log.error("variant %s: %s: %s: %s", run_name, status, type(err).__name__, err)
            return None
        finally:
            del components
            guard.release()

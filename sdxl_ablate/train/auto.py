"""`trainer.gradient_checkpointing=auto`: checkpointing only where the variant needs it to fit.

Checkpointing trades about one extra forward pass per step for a fraction of the activation
memory; it does not change what is computed (README "Trainer defaults"). So `auto` turns it off
where the dry run (train/plan.py) predicts that the variant fits the memory budget without it,
with a margin for the prediction's error, and on otherwise. The prediction exists only for the
full-size SDXL on CUDA (the allocator model is fitted there): on the CPU and for the tiny model,
where no card budget is at stake, `auto` means on, what those runs did before `auto` existed.

This module holds the rule alone; `train.plan.resolve_checkpointing` runs the prediction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from sdxl_ablate.config import Config, ModelKind

AUTO = "auto"
# The dry run's largest error against a measured peak reserved is 8.9% (README "The dry run"):
# `auto` switches checkpointing off only when the prediction without it is at least this much
# below the budget, so a prediction that is 9% low still fits.
MARGIN = 0.10
NO_PREDICTION_DEFAULT = True


@dataclass(frozen=True)
class CheckpointingChoice:
    requested: str  # true | false | auto
    enabled: bool
    reason: str
    predicted_without_gib: Optional[float] = None  # the dry run's peak reserved without checkpointing

    def tags(self) -> dict[str, str]:
        return {"trainer.gradient_checkpointing_requested": self.requested,
                "trainer.gradient_checkpointing_resolved": str(self.enabled).lower(),
                "trainer.gradient_checkpointing_reason": self.reason}


def requested(cfg: Config) -> str:
    gc = cfg.trainer.gradient_checkpointing
    return str(gc).lower() if isinstance(gc, bool) else str(gc)


def predictable(cfg: Config, device: torch.device) -> bool:
    """Whether the dry run predicts this variant's memory: full-size SDXL on CUDA only."""
    return device.type == "cuda" and cfg.model.kind != ModelKind.tiny


def decide(cfg: Config, device: torch.device, predicted_without_gib: Optional[float] = None,
           prediction_error: Optional[str] = None) -> CheckpointingChoice:
    """The choice for `cfg` on `device`, given the dry run's peak reserved GiB without
    checkpointing (needed only where `predictable`; a failed prediction is named and means on)."""
    req = requested(cfg)
    if req != AUTO:
        return CheckpointingChoice(req, cfg.trainer.gradient_checkpointing is True, "set explicitly")
    if not predictable(cfg, device):
        return CheckpointingChoice(req, NO_PREDICTION_DEFAULT,
                                   f"auto without a memory prediction ({device.type}, model.kind="
                                   f"{cfg.model.kind.value}): on")
    if predicted_without_gib is None:
        return CheckpointingChoice(req, True, f"auto: no memory prediction ({prediction_error or 'none given'}): on")
    budget = cfg.memory.budget()
    limit = budget * (1 - MARGIN)
    fits = predicted_without_gib <= limit
    verdict = "fits" if fits else "does not fit"
    return CheckpointingChoice(
        req, not fits,
        f"auto: predicted peak without checkpointing {predicted_without_gib:.2f} GiB {verdict} the budget "
        f"{budget:.2f} GiB less {MARGIN:.0%} ({limit:.2f} GiB): {'off' if fits else 'on'}",
        predicted_without_gib)


def checkpointing_on(cfg: Config, device: torch.device) -> bool:
    """The switch as training applies it. `auto` must have been resolved where it needs the dry
    run (the runner does that, `train.plan.resolve_checkpointing`); elsewhere it is the
    documented default."""
    gc = cfg.trainer.gradient_checkpointing
    if isinstance(gc, bool):
        return gc
    if predictable(cfg, device):
        raise ValueError("trainer.gradient_checkpointing=auto on CUDA needs the dry run's prediction: resolve it "
                         "first with sdxl_ablate.train.plan.resolve_checkpointing (the runner does)")
    return NO_PREDICTION_DEFAULT

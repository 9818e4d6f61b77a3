"""The headline numbers of one variant, under `ablation/*`: what a person compares first.

Why that prefix: the MLflow UI (3.x) orders metric sections, the compare view's metric lists
and the sort and column menus by name (code-point order), so the headline group must sort
before `data/`, `eval/`, `memory/`, ... to open first; `ablation/` does and reads as what it is.

`python -m sdxl_ablate` logs them once per variant at the end of `runner.run` (after
evaluation); the MLflow UI and `make ui-check` read them. Each is derived from metrics the run
already logged, so a missing source metric means a missing summary metric, never a made-up
value:

- `ablation/clip_style_lift`, `ablation/clip_text_lift`: eval/clip_style - eval/clip_style_base
  (how much more the LoRA's images look like the training style than the base model's), and
  the same for the prompt score; `..._lift_se`: its paired standard error.
- `ablation/clip_style`, `ablation/clip_text`: the LoRA's CLIP scores themselves.
  None of the CLIP ones for a random CLIP (`eval/clip_random` = 1, eval=tiny): a smoke test.
- `ablation/heldout_loss_drop`: eval/heldout_loss_base - eval/heldout_loss (positive: the LoRA
  denoises the held-out images better than the base model); `ablation/heldout_loss_drop_se`:
  its paired standard error (eval/heldout_loss_delta_se).
- `ablation/peak_memory_gib`: the training peak: CUDA reserved on a GPU, the resident set on a
  CPU (the run's `device` tag says which); `ablation/peak_vram_gib` as well on a GPU.
- `ablation/images_per_s`, `ablation/step_time_s`: training speed.
- `ablation/trainable_params`: the LoRA's parameter count.
- `ablation/final_loss`: train/final_loss.
"""

from __future__ import annotations

import logging
import math
from typing import Mapping

log = logging.getLogger(__name__)

PREFIX = "ablation/"

# What a CLIP score of the random `eval=tiny` scorer is, wherever it is shown: the run's
# `clip_scorer` tag (evaluate/scores.py) and every label the report gives such a score.
RANDOM_CLIP_LABEL = "smoke test: random CLIP"
# 1.0 when the run's CLIP scores come from that random CLIP (evaluate/scores.py logs it).
CLIP_RANDOM_METRIC = "eval/clip_random"

# summary name -> the logged metric it copies
_COPIED = {
    "clip_style": "eval/clip_style",
    "clip_text": "eval/clip_text",
    "images_per_s": "perf/images_per_s",
    "step_time_s": "perf/step_time_s",
    "trainable_params": "params/trainable",
    "final_loss": "train/final_loss",
}



def lift(metrics: Mapping[str, float], key: str) -> float | None:
    """How far the LoRA moved a score from the base model's: `metrics[key] - metrics[key + "_base"]`
    (e.g. eval/clip_style - eval/clip_style_base); None when either is missing. Evaluation,
    the headline metrics and the report all take a lift from here."""
    if key in metrics and f"{key}_base" in metrics:
        return metrics[key] - metrics[f"{key}_base"]
    return None


def peak_memory(metrics: Mapping[str, float]) -> tuple[float | None, str]:
    """(GiB, kind) of the training peak: CUDA reserved where measured, else the CPU resident set."""
    if "memory/peak_reserved_gib" in metrics:
        return metrics["memory/peak_reserved_gib"], "cuda_reserved"
    if "memory/peak_rss_gib" in metrics:
        return metrics["memory/peak_rss_gib"], "cpu_rss"
    return None, ""


def summary_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """The `ablation/*` metrics of one variant from its logged metrics (missing sources are left out)."""
    m = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
    # A random CLIP's scores are a smoke test, not a headline: the UI would chart them first.
    random_clip = m.get(CLIP_RANDOM_METRIC) == 1.0
    out = {PREFIX + name: m[src] for name, src in _COPIED.items()
           if src in m and not (random_clip and src.startswith("eval/clip_"))}
    for score in ("clip_style", "clip_text"):
        if not random_clip and (value := lift(m, f"eval/{score}")) is not None:
            out[f"{PREFIX}{score}_lift"] = value
            if f"eval/{score}_lift_se" in m:
                out[f"{PREFIX}{score}_lift_se"] = m[f"eval/{score}_lift_se"]
    if "eval/heldout_loss" in m and "eval/heldout_loss_base" in m:
        out[PREFIX + "heldout_loss_drop"] = m["eval/heldout_loss_base"] - m["eval/heldout_loss"]
        if "eval/heldout_loss_delta_se" in m:  # its paired standard error: the drop's noise
            out[PREFIX + "heldout_loss_drop_se"] = m["eval/heldout_loss_delta_se"]
    memory, kind = peak_memory(m)
    if memory is not None:
        out[PREFIX + "peak_memory_gib"] = memory
        if kind == "cuda_reserved":
            out[PREFIX + "peak_vram_gib"] = memory
    return out


def log_summary(tracker) -> dict[str, float]:
    """Logs the run's `ablation/*` metrics through the tracker; returns them.

    Computed from the latest value of each metric the tracker was given (RunTracker.latest_metrics,
    by MLflow's own rule, so equal to what the store reads back), not from a read-back: when the
    store is down the summary still exists, and goes to the run's journal for replay like the rest."""
    summary = summary_metrics(tracker.latest_metrics())
    if summary:
        tracker.log_metrics(summary)
    return summary

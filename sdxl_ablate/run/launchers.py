"""What conf/config.yaml and the launcher presets in conf/hydra/launcher/ need from the app (issue 12).

Kept free of torch at import: `python -m sdxl_ablate` registers this before Hydra composes,
and an invalid config should still fail in a second.
"""

from __future__ import annotations

import os

from omegaconf import OmegaConf


def gpu_count() -> int:
    """The GPUs this process sees (CUDA_VISIBLE_DEVICES applies): the preset's parallel jobs.
    At least 1, so a GPU preset on a machine without one reaches the job, which then fails
    with a message naming the preset (devices.acquire_device) instead of a joblib error."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and not visible.strip():
        return 1
    import torch

    return max(1, torch.cuda.device_count())


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("sdxl_ablate.gpu_count"):
        OmegaConf.register_new_resolver("sdxl_ablate.gpu_count", gpu_count)
    if not OmegaConf.has_resolver("sdxl_ablate.sweep_id"):
        # The output dirs of conf/config.yaml: one per launch, shared by that launch's job processes.
        from sdxl_ablate.run.sweep import process_sweep_id

        OmegaConf.register_new_resolver("sdxl_ablate.sweep_id", process_sweep_id)

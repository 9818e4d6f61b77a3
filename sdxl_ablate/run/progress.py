"""Progress-bar labels: which variant, and where it stands in the sweep (`[5/6] attn_dropout05`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf

from sdxl_ablate.config.identity import short_name


def job_position() -> Optional[tuple[int, Optional[int]]]:
    """(1-based job number, number of jobs or None if unknown) inside a Hydra multirun; None
    outside one. The count comes from the sweep's multirun.yaml, which Hydra writes before the
    first job starts."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from sdxl_ablate.run.sweep import job_overrides

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return None
    number = int(hc.job.num) + 1
    saved = Path(hc.sweep.dir) / "multirun.yaml"
    if not saved.is_file():
        return number, None
    sweep = OmegaConf.load(saved)
    return number, len(job_overrides(sweep))


def job_label(run_name: str) -> str:
    """`[5/6] attn_dropout05` in a sweep, `attn_dropout05` for a single run."""
    position = job_position()
    name = short_name(run_name)
    if position is None:
        return name
    number, total = position
    return f"[{number}/{total}] {name}" if total else f"[{number}] {name}"

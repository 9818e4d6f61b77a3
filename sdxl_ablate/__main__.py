"""`python -m sdxl_ablate [overrides]`: one variant; add `-m` for a sweep (one MLflow run each)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from .config import ConfigError, TrackingConfig, register_configs, to_typed
from .launchers import register_resolvers
from .tracking import Tracker, resolve_uri

log = logging.getLogger("sdxl_ablate")
register_configs()
register_resolvers()


def run_name() -> str:
    """The variant's overrides (minus bookkeeping keys, see conf/config.yaml): `lora.targets=all`."""
    return HydraConfig.get().job.override_dirname or "default"


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(dcfg: DictConfig) -> float | None:
    hc = HydraConfig.get()
    try:
        cfg = to_typed(dcfg)
    except ConfigError as err:
        if hc.mode != RunMode.MULTIRUN:
            raise
        # In a sweep, record the bad variant as a failed run and go on with the next one.
        log.error("variant %s: %s", run_name(), err)
        tracking = TrackingConfig(**OmegaConf.to_container(dcfg.tracking, resolve=True))
        with Tracker(tracking, str(dcfg.study), run_name(), tags={"study": str(dcfg.study)}) as tracker:
            tracker.set_status("failed", error=str(err))
        return None

    from .runner import run  # heavy imports (torch, diffusers) only once the config is valid

    result = run(cfg, run_name(), Path(hc.runtime.output_dir))
    if hc.mode != RunMode.MULTIRUN and os.environ.get("RANK", "0") == "0":
        print(f"\nResults: MLflow experiment '{cfg.tracking.experiment or cfg.study}' at "
              f"{resolve_uri(cfg.tracking)}; files in {hc.runtime.output_dir}")
    return result


if __name__ == "__main__":
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun: rank 0 alone owns the output dir
        from .distributed import hydra_overrides

        sys.argv += hydra_overrides()
    main()

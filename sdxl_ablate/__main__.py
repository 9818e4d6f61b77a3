"""`python -m sdxl_ablate [overrides]`: one variant; add `-m` for a sweep (one MLflow run each).

Exit code: the number of variants that did not end with status `ok` (0 when all did; capped at
100); 101 when the preflight found a missing resource before anything trained; 102 when the
sweep's own records (its parent run) could not be written; 130 on Ctrl-C, 143 on SIGTERM (sweep.py).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from sdxl_ablate.run import sweep
from sdxl_ablate.config import ConfigError, TrackingConfig, register_configs, to_typed
from sdxl_ablate.run.launchers import register_resolvers
from sdxl_ablate.track.tracker import Tracker, resolve_uri

log = logging.getLogger("sdxl_ablate")
register_configs()
register_resolvers()
_single_run_failed = False


def run_name() -> str:
    """The variant's overrides (minus bookkeeping keys, see conf/config.yaml), variant first:
    `te_all seed=1`, `lora.targets=all` (identity.run_name_of)."""
    from sdxl_ablate.config.identity import run_name_of

    return run_name_of(HydraConfig.get().job.override_dirname)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(dcfg: DictConfig) -> float | None:
    global _single_run_failed
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    # A sweep's id and parent run were made by sweep.SweepCallback before any job started.
    info = sweep.read_info(Path(hc.sweep.dir)) if multirun else sweep.SweepInfo(sweep.process_sweep_id())
    try:
        cfg = to_typed(dcfg)
    except ConfigError as err:
        if not multirun:
            # The message names every bad value and what is accepted: a traceback adds nothing.
            print(f"{type(err).__module__}.{type(err).__name__}: {err}", file=sys.stderr)
            sys.exit(1)
        # In a sweep, record the bad variant as a failed run and go on with the next one.
        log.error("variant %s: %s", run_name(), err)
        tracking = TrackingConfig(**OmegaConf.to_container(dcfg.tracking, resolve=True))
        tags = {**info.tags(), "study": str(dcfg.study)}
        with Tracker(tracking, tracking.experiment or str(dcfg.study), run_name(), tags=tags) as tracker:
            tracker.set_status("failed", error=str(err))
        return None

    if not multirun:  # a sweep's preflight ran once, for all its jobs, in SweepCallback
        from sdxl_ablate.run.preflight import PreflightError, check

        try:
            check([cfg])
        except PreflightError as e:
            print(f"\n{e}\n", file=sys.stderr)
            sys.exit(sweep.PREFLIGHT_EXIT)
    from sdxl_ablate.run.runner import run  # heavy imports (torch, diffusers) only once the config is valid

    result = run(cfg, run_name(), Path(hc.runtime.output_dir), info)
    if not multirun:
        _single_run_failed = result is None
    if not multirun and os.environ.get("RANK", "0") == "0":
        print(f"\nResults: MLflow experiment '{cfg.tracking.experiment or cfg.study}' at "
              f"{resolve_uri(cfg.tracking)}; files in {hc.runtime.output_dir}")
    return result


def exit_code() -> int:
    if sweep.callback_error is not None:  # the sweep's end was not recorded: never 0
        return sweep.CALLBACK_EXIT
    if sweep.last_failed is not None:
        return max(0, min(sweep.last_failed, 100))
    return int(_single_run_failed)


if __name__ == "__main__":
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun: rank 0 alone owns the output dir
        from sdxl_ablate.train.distributed import hydra_overrides

        sys.argv += hydra_overrides()
    sweep.begin_process()  # this launch's own sweep id (its output dir), and SIGTERM handled like Ctrl-C
    try:
        main()
    except KeyboardInterrupt as err:  # one line and the summary so far, no traceback (sweep.interrupted)
        sys.exit(sweep.interrupted(err))
    except SystemExit as err:  # Hydra stopped the sweep half way (its own error): close the parent run
        sys.exit(sweep.stopped(err.code))
    sys.exit(exit_code())

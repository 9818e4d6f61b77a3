"""Progress-bar labels: which variant, and where it stands in the sweep (`[5/6] attn_dropout05`)."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf


def short_name(run_name: str) -> str:
    """A run name for a narrow terminal: `variant=attn_dropout05` -> `attn_dropout05`,
    `trainer.seed=1,variant=attn` -> `attn seed=1`; other overrides stay as written."""
    parts = [p.lstrip("+") for p in run_name.split(",")] if run_name else []  # "+key=v": Hydra's append
    variant = [p.split("=", 1)[1] for p in parts if p.startswith("variant=")]
    seed = [p.split("=", 1)[1] for p in parts if p.startswith("trainer.seed=")]
    rest = [p for p in parts if not p.startswith(("variant=", "trainer.seed="))]
    words = variant + ([",".join(rest)] if rest else []) + [f"seed={s}" for s in seed]
    return " ".join(words) or run_name


def sweep_size(task_overrides: list[str], sweeper_params: dict[str, str]) -> int:
    """How many jobs Hydra's basic sweeper makes of the command line's overrides and the sweep
    config's `hydra.sweeper.params` (the command line wins for a key in both)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    by_key = {}
    for override in parser.parse_overrides([f"{k}={v}" for k, v in sweeper_params.items()] + list(task_overrides)):
        by_key[override.get_key_element()] = override
    return math.prod(len(list(o.sweep_string_iterator())) if o.is_sweep_override() else 1 for o in by_key.values())


def job_position() -> Optional[tuple[int, Optional[int]]]:
    """(1-based job number, number of jobs or None if unknown) inside a Hydra multirun; None
    outside one. The count comes from the sweep's multirun.yaml, which Hydra writes before the
    first job starts."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

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
    params = sweep.hydra.sweeper.get("params")
    params = OmegaConf.to_container(params, resolve=False) if params else {}
    return number, sweep_size(list(sweep.hydra.overrides.task), {k: str(v) for k, v in params.items()})


def job_label(run_name: str) -> str:
    """`[5/6] attn_dropout05` in a sweep, `attn_dropout05` for a single run."""
    position = job_position()
    name = short_name(run_name)
    if position is None:
        return name
    number, total = position
    return f"[{number}/{total}] {name}" if total else f"[{number}] {name}"


_SEED = re.compile(r"(^|,)trainer\.seed=[^,]*")


def without_seed(run_name: str) -> str:
    """The run name with its `trainer.seed=N` override taken out: the variant's name."""
    return _SEED.sub("", run_name).strip(",") or "default"

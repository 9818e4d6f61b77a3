"""What identifies a variant, written once: its hash, its run name, its tags, its report group.

A variant is named three ways, all by one rule:
- `config_hash` (checkpoint directory, "already done" check): every flat config key except the
  ones below that leave the trained LoRA as it is.
- its run name, from Hydra's `override_dirname` of the variant's own overrides, less
  `run_name_excluded()` (conf/config.yaml lists them; tests/test_config.py holds the two equal),
  written variant first (`run_name_of`: `te_all seed=1`).
- its group in the report (`grouping_key`): the hashed params less the seed, whose runs are
  the repeats of one variant.

Out of the hash and the run name, because the trained LoRA is the same with any value:
- where results go and how they are judged afterwards: tracking.*, eval.*;
- the memory guard, memory.*: it decides whether a run may go on, not what it computes;
- the CUDA speed switches trainer.compile/channels_last/cuda_graphs: documented as leaving the
  numbers as they are (README "Trainer defaults"), so a resume with one switched is the same
  training;
- data.class_prompt: recorded only, prior preservation is not implemented (README "Recipes");
- bookkeeping of the run: the study name (the experiment it is filed under), logging and LoRA
  saving, the latent cache's place, checkpointing, resume and force.
`trainer.precision=auto` is hashed as the precision it resolved to on the job's device (the runner
resolves it before hashing): the same config trains in bf16 on an A100 and in fp16 on a T4, two
different LoRAs, so they get two hashes, while auto on a T4 and an explicit fp16 are one training.
`trainer.gradient_checkpointing=auto` is hashed as `auto`: checkpointing leaves the numbers as
they are, and its resolution depends on the memory budget, which is out of the hash too.
Out of the run name only: what a whole study shares, so the name says which variant of it ran:
the recipe and sweep that pick the study (`experiment`, `sweep`), the device and the step
budget. They change the result, so they stay in the hash.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Optional

from sdxl_ablate.config.schema import Config, flatten

# The config keys a study varies, with the short names the dry run and the bench print them by.
# Each is a tag of the variant's MLflow run and a column of the report's tables.
AXES = {
    "lora.targets": "targets",
    "lora.text_encoder": "text_encoder",
    "lora.use_dora": "use_dora",
    "lora.dropout": "dropout",
    "lora.rank": "rank",
    "lora.alpha": "alpha",
    "trainer.precision": "precision",
    "trainer.optimizer": "optimizer",
    "data.resolution": "resolution",
}

HASH_EXCLUDED_PREFIXES = ("tracking.", "eval.", "memory.")
HASH_EXCLUDED_KEYS = frozenset({
    "study", "data.class_prompt", "trainer.log_every", "trainer.cache_dir", "trainer.save_lora",
    "trainer.checkpoint_every", "trainer.keep_checkpoints", "trainer.checkpoint_dir", "trainer.resume",
    "trainer.force", "trainer.compile", "trainer.channels_last", "trainer.cuda_graphs",
    "trainer.sync_every_step",
})
STUDY_WIDE = ("experiment", "sweep", "device", "trainer.max_steps")
SEED = "trainer.seed"


def is_hashed(key: str) -> bool:
    return key not in HASH_EXCLUDED_KEYS and not key.startswith(HASH_EXCLUDED_PREFIXES)


def hashed_items(cfg: Config) -> dict[str, Any]:
    """The flat config entries that decide the trained result (what `config_hash` hashes)."""
    return {k: v for k, v in sorted(flatten(cfg).items()) if is_hashed(k)}


def config_hash(cfg: Config) -> str:
    """A stable 16-hex-digit hash of the resolved config's result-deciding entries: equal
    hashes mean the same training (model, data, LoRA, trainer settings, seed, device)."""
    blob = json.dumps(hashed_items(cfg), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def run_name_excluded() -> list[str]:
    """The override keys left out of the run name: every key out of the hash, the config groups
    made of such keys alone (`eval=off`), and what the whole study shares."""
    unhashed = [k for k in flatten(Config()) if not is_hashed(k)]
    groups = {k.split(".", 1)[0] for k in unhashed if k.startswith(HASH_EXCLUDED_PREFIXES)}
    return sorted({*unhashed, *groups, *STUDY_WIDE})


def grouping_key(params: dict[str, str]) -> tuple:
    """What makes runs repeats of one variant: their recorded params that are hashed, less the seed."""
    return tuple(sorted((k, v) for k, v in params.items() if is_hashed(k) and k != SEED))


def _text(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def axis_values(cfg: Config) -> dict[str, Any]:
    """The variant's value on each axis, by config key (enums as their names)."""
    flat = flatten(cfg)
    return {key: flat[key] for key in AXES}


def adapter(cfg: Config) -> dict[str, Any]:
    """The variant's LoRA axes by short name: the adapter the dry run and the bench describe."""
    return {AXES[k]: v for k, v in axis_values(cfg).items() if k.startswith("lora.")}


def variant_tags(cfg: Config) -> dict[str, str]:
    """The variant's MLflow tags: its study, model, axes and seed, so the UI can group and filter by them."""
    return {"study": cfg.study, "model": cfg.model.kind.value,
            **{k: _text(v) for k, v in axis_values(cfg).items()}, SEED: str(cfg.trainer.seed)}


# --- run names (Hydra's override_dirname: `key=value` pairs joined by commas) ----------------

# `trainer.seed=N` in Hydra's override_dirname, or `seed=N` in a run name (`attn seed=1`).
_SEED_OVERRIDE = re.compile(rf"(^|[, ])(?:{re.escape(SEED)}|seed)=([^, ]*)")


def short_name(run_name: str) -> str:
    """A run name for a narrow terminal: `variant=attn_dropout05` -> `attn_dropout05`,
    `trainer.seed=1,variant=attn` -> `attn seed=1`; other overrides stay as written."""
    parts = [p.lstrip("+") for p in run_name.split(",")] if run_name else []  # "+key=v": Hydra's append
    variant = [p.split("=", 1)[1] for p in parts if p.startswith("variant=")]
    seed = [p.split("=", 1)[1] for p in parts if p.startswith(f"{SEED}=")]
    rest = [p for p in parts if not p.startswith(("variant=", f"{SEED}="))]
    words = variant + ([",".join(rest)] if rest else []) + [f"seed={s}" for s in seed]
    return " ".join(words) or run_name


def run_name_of(override_dirname: str) -> str:
    """The MLflow run name of a variant: its variant first, then its other overrides, then the seed
    (`trainer.seed=1,variant=te_all` -> `te_all seed=1`), so the UI's truncated names still say
    which variant ran. Display only: the config hash and the report's grouping use the params."""
    return short_name(override_dirname) if override_dirname else "default"


def seed_override(run_name: str) -> Optional[str]:
    """The N of the run name's `trainer.seed=N` (or `seed=N`), None without one."""
    match = _SEED_OVERRIDE.search(run_name)
    return match.group(2) if match else None


def without_seed(run_name: str) -> str:
    """The run name with its `trainer.seed=N` (or `seed=N`) taken out: the variant's name."""
    return _SEED_OVERRIDE.sub("", run_name).strip(", ") or "default"

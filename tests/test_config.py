"""Every config file composes; bad values fail at composition, naming what is accepted."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from sdxl_ablate.config import (Config, ConfigError, Crop, DataSource, ModelKind, Optimizer, Precision, Targets, flatten,
                                to_typed)
from sdxl_ablate.model.lora import UNET_TARGETS

from .conftest import CONF, ROOT, compose_config

GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir())


def all_options():
    for group in GROUPS:
        for f in sorted((CONF / group).glob("*.yaml")):
            yield group, f.stem


@pytest.mark.parametrize("group,option", list(all_options()))
def test_every_config_file_composes_into_the_schema(group, option):
    needs = {("data", "folder"): ["data.path=/data/my_style"]}  # options that need a value of yours
    cfg = to_typed(compose_config([f"{group}={option}", *needs.get((group, option), [])]))
    assert isinstance(cfg, Config)


def test_groups_cover_conf_and_sweeps():
    assert {"model", "data", "lora", "trainer", "memory", "eval", "tracking", "experiment", "variant", "sweep"} <= set(GROUPS)
    # conf/sweep is the committed sweeps/ folder itself, not a copy.
    assert (CONF / "sweep").resolve() == (ROOT / "sweeps").resolve()
    assert len(list((ROOT / "sweeps").glob("*.yaml"))) >= 2


def test_every_sweep_job_composes():
    """Each job of each committed sweep, as Hydra's sweeper would launch it."""
    for sweep in sorted((ROOT / "sweeps").glob("*.yaml")):
        base = compose_config([f"sweep={sweep.stem}"], return_hydra_config=True)
        params = OmegaConf.to_container(base.hydra.sweeper.params)
        assert params, f"{sweep.name} sweeps nothing"
        for key, values in params.items():
            for value in str(values).split(","):
                to_typed(compose_config([f"sweep={sweep.stem}", f"{key}={value}"]))


def test_naruto_study_variants_are_the_six_of_the_write_up():
    want = {
        "te_all": (True, Targets.all, False), "te_attn": (True, Targets.self_attn, False),
        "all": (False, Targets.all, False), "attn": (False, Targets.self_attn, False),
        "dora_prodigy": (False, Targets.self_attn, True), "attn_dropout05": (False, Targets.self_attn, False),
    }
    params = compose_config(["sweep=naruto_study"], return_hydra_config=True).hydra.sweeper.params
    assert params["variant"].split(",") == list(want)
    for variant, (te, targets, dora) in want.items():
        cfg = to_typed(compose_config(["sweep=naruto_study", "experiment=demo", f"variant={variant}"]))
        assert (cfg.lora.text_encoder, cfg.lora.targets, cfg.lora.use_dora) == (te, targets, dora)
        assert cfg.study == "demo"  # the experiment names the study, after the sweep
    dora = to_typed(compose_config(["experiment=demo", "variant=dora_prodigy"]))
    assert (dora.trainer.optimizer, dora.trainer.lr, dora.trainer.snr_gamma) == (Optimizer.prodigy, 1.0, 5.0)
    assert to_typed(compose_config(["variant=attn_dropout05"])).lora.dropout == 0.5


def test_the_study_runs_at_the_seeds_precision_with_its_techniques():
    """Seed 004: fp16 UNet and text encoders, fp32 VAE; noise offset, random crops that change
    from step to step, gradient accumulation; (e) adds the FP16-fix VAE and caption dropout."""
    for variant in ("te_all", "te_attn", "all", "attn", "dora_prodigy", "attn_dropout05"):
        cfg = to_typed(compose_config(["sweep=naruto_study", f"variant={variant}"]))
        t, d = cfg.trainer, cfg.data
        assert (t.precision, t.base_weights.value, t.gradient_checkpointing) == (Precision.fp16, "compute", True)
        assert t.noise_offset > 0 and t.grad_accum > 1
        assert (d.crop, d.crops_per_image > 1, d.crop_scale > 1) == (Crop.random, True, True)
        assert cfg.model.vae_fp16_safe == (variant == "dora_prodigy")
        assert (d.caption_dropout > 0) == (variant == "dora_prodigy")
        assert cfg.lora.text_encoder == variant.startswith("te_")


def test_epochs_and_max_steps_together_are_an_error_naming_both():
    with pytest.raises(ConfigError) as err:
        to_typed(compose_config(["trainer.epochs=5"]))
    assert any("trainer.epochs=5 with trainer.max_steps=100" in p and "max_steps=null" in p for p in err.value.problems)
    with pytest.raises(ConfigError, match="set the run length"):
        to_typed(compose_config(["trainer.max_steps=null"]))
    cfg = to_typed(compose_config(["trainer.epochs=5", "trainer.max_steps=null"]))
    assert (cfg.trainer.epochs, cfg.trainer.max_steps) == (5, None)


def test_several_crops_need_random_crops():
    with pytest.raises(ConfigError, match="data.crops_per_image=4 with data.crop=center"):
        to_typed(compose_config(["data.crops_per_image=4"]))


def test_unknown_axis_value_fails_at_composition_naming_allowed_values():
    with pytest.raises(ConfigCompositionException) as err:
        compose_config(["lora.targets=atn"])
    text = str(err.value) + str(err.value.__cause__)
    assert "atn" in text and "attn" in text and "all" in text
    with pytest.raises(ConfigCompositionException) as err:
        compose_config(["trainer.optimizer=sgd"])
    assert "adamw8bit" in str(err.value) + str(err.value.__cause__)


def test_wrong_type_fails_at_composition():
    with pytest.raises((ConfigCompositionException, ValidationError)):
        compose_config(["lora.rank=sixteen"])


def test_cross_field_problems_are_all_reported_at_once():
    with pytest.raises(ConfigError) as err:
        to_typed(compose_config(["lora.rank=0", "lora.dropout=1.5", "data.resolution=100", "trainer.lr=-1"]))
    problems = err.value.problems
    assert len(problems) == 4
    assert any(p.startswith("lora.rank=0") for p in problems)
    assert any("data.resolution=100" in p and "multiple of 8" in p for p in problems)


def test_any_dropout_value_and_rank_alpha_are_accepted():
    cfg = to_typed(compose_config(["lora.dropout=0.37", "lora.rank=32", "lora.alpha=16"]))
    assert (cfg.lora.dropout, cfg.lora.rank, cfg.lora.alpha) == (0.37, 32, 16.0)


def test_folder_source_needs_a_path():
    with pytest.raises(ConfigError, match="data.path"):
        to_typed(compose_config(["data=folder"]))


def test_defaults_are_the_real_task():
    cfg = to_typed(compose_config([]))
    assert (cfg.model.kind, cfg.data.source, cfg.data.resolution) == (ModelKind.pretrained, DataSource.hub, 1024)
    assert cfg.model.pretrained == "stabilityai/stable-diffusion-xl-base-1.0"
    assert cfg.data.name == "lambdalabs/naruto-blip-captions"
    assert (cfg.memory.card, cfg.memory.card_total_mib, cfg.memory.budget_gib) == ("Tesla T4", 15360, None)
    assert cfg.memory.budget() == (15360 - 1024) / 1024  # 14.0 GiB: the T4 less its provisional overhead
    assert cfg.eval.prompts == ["Naruto Uzumaki eating ramen", "Bill Gates in Naruto style",
                                "A boy with blue eyes in Naruto style", "cute dragon creature"]


def test_schema_defaults_are_the_composed_default_config():
    """`Config()` is what `python -m sdxl_ablate` runs with no overrides, key by key."""
    schema, composed = flatten(Config()), flatten(to_typed(compose_config([])))
    assert schema.keys() == composed.keys()
    differ = {k: (schema[k], composed[k]) for k in schema if schema[k] != composed[k]}
    assert not differ, f"schema default vs composed default config (schema, composed): {differ}"


# Groups whose options fill the schema's sections; experiments, variants and sweeps are recipes
# that name every axis they set, default or not.
SECTION_GROUPS = ("model", "data", "lora", "trainer", "memory", "eval", "tracking")


@pytest.mark.parametrize("group", SECTION_GROUPS)
def test_no_group_file_restates_a_schema_default(group):
    """A group file says only what its option changes, so the schema stays the one source of
    defaults: a key there whose value equals the schema default is a restatement."""
    defaults = OmegaConf.structured(Config)[group]
    for f in sorted((CONF / group).glob("*.yaml")):
        values = OmegaConf.load(f)
        restated = {k: v for k, v in values.items() if k in defaults and defaults[k] == v}
        assert not restated, f"{f.relative_to(ROOT)} restates the schema defaults {restated}"


def test_flatten_gives_dotted_plain_params():
    flat = flatten(to_typed(compose_config(["lora.targets=all"])))
    assert flat["lora.targets"] == "all"
    assert flat["trainer.lr"] == 1e-4
    assert all(not isinstance(v, dict) for v in flat.values())
    assert set(UNET_TARGETS) == set(Targets)


@pytest.mark.parametrize("variant", ["te_all", "attn", "dora_prodigy"])
def test_the_demo_study_stays_the_tiny_model_at_its_own_size(variant):
    """`make demo` is the study on the tiny model: the study's 512 px (for the real SDXL) must not
    reach it (a 64 px model trained on 512 px crops is only slower, not truer)."""
    cfg = to_typed(compose_config(["sweep=naruto_study", "experiment=demo", f"variant={variant}"]))
    assert (cfg.model.kind.value, cfg.data.resolution, cfg.trainer.max_steps, cfg.trainer.grad_accum) == ("tiny", 64, 30, 1)

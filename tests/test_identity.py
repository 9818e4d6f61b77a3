"""One rule for what identifies a variant: its hash, its run name and its report group agree."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from sdxl_ablate.config import config_hash, to_typed
from sdxl_ablate.config.identity import AXES, grouping_key, run_name_excluded, variant_tags

from .conftest import CONF, compose_config


def identity(overrides: list[str]) -> tuple[str, str]:
    cfg = compose_config(overrides, return_hydra_config=True)
    return config_hash(to_typed(cfg)), cfg.hydra.job.override_dirname


def test_the_run_name_exclusions_in_conf_are_identitys():
    conf = OmegaConf.load(CONF / "config.yaml")
    assert list(conf.hydra.job.config.override_dirname.exclude_keys) == run_name_excluded()


@pytest.mark.parametrize("override", ["trainer.compile=false", "trainer.cuda_graphs=false", "eval=off",
                                      "eval.steps=3", "memory.enforce=false", "trainer.log_every=5",
                                      "tracking.uri=sqlite:///elsewhere.db", "study=other"])
def test_what_leaves_the_training_as_it_is_changes_neither_hash_nor_run_name(override):
    base = ["variant=attn", "trainer.seed=1"]
    assert identity([*base, override]) == identity(base)


@pytest.mark.parametrize("override", ["lora.rank=4", "trainer.lr=0.001", "data.flip=true"])
def test_what_changes_the_training_changes_both(override):
    base = ["variant=attn"]
    (hash0, name0), (hash1, name1) = identity(base), identity([*base, override])
    assert hash1 != hash0 and name1 != name0


@pytest.mark.parametrize("override", ["trainer.max_steps=7", "device=cpu"])
def test_what_the_study_shares_changes_the_hash_not_the_run_name(override):
    (hash0, name0), (hash1, name1) = identity([]), identity([override])
    assert hash1 != hash0 and name1 == name0 == ""


def test_runs_that_differ_by_seed_or_unhashed_params_group_as_one_variant():
    params = {"lora.rank": "4", "trainer.seed": "0", "trainer.compile": "true", "tracking.uri": "a"}
    same = {**params, "trainer.seed": "1", "trainer.compile": "false", "tracking.uri": "b"}
    assert grouping_key(params) == grouping_key(same) != grouping_key({**params, "lora.rank": "8"})


def test_variant_tags_are_the_axes_with_study_model_and_seed():
    cfg = to_typed(compose_config(["variant=te_attn", "trainer.seed=3"]))
    tags = variant_tags(cfg)
    assert set(tags) == {"study", "model", "trainer.seed", *AXES}
    assert tags["lora.text_encoder"] == "true" and tags["trainer.seed"] == "3"


@pytest.mark.parametrize("overrides, name", [
    ("trainer.seed=1,variant=te_all", "te_all seed=1"),
    ("variant=attn_dropout05", "attn_dropout05"),
    ("lora.rank=4,trainer.seed=2,variant=all", "all lora.rank=4 seed=2"),
    ("lora.targets=all", "lora.targets=all"),
    ("", "default"),
])
def test_run_names_lead_with_the_variant_and_the_report_reads_them_back(overrides, name):
    from sdxl_ablate.config.identity import run_name_of, seed_override, short_name, without_seed

    assert run_name_of(overrides) == name
    # The report's reading of a run name (seed, variant) is the same for the old and new spelling.
    assert seed_override(name) == seed_override(overrides)
    assert short_name(without_seed(name)) == short_name(without_seed(overrides or "default"))

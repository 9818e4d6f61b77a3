"""Shared fixtures: every test runs offline, with its caches and MLflow store in tmp."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from sdxl_ablate.config import register_configs

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

register_configs()
# Tiny models: one thread per op is fastest and immune to a busy machine (see Makefile).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _offline_and_isolated(monkeypatch, tmp_path_factory):
    cache = tmp_path_factory.getbasetemp() / "cache"  # shared by the session: the sample set is made once
    monkeypatch.setenv("SDXL_ABLATE_CACHE", str(cache))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache / "hf_datasets"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def compose_config(overrides: list[str], return_hydra_config: bool = False):
    """The config `python -m sdxl_ablate <overrides>` would run."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=return_hydra_config)


def tiny_overrides(tmp_path: Path, *extra: str, precision: str | None = "fp32") -> list[str]:
    """A tiny, fast, offline variant tracked in a tmp MLflow store."""
    return [
        "model=tiny", "data=sample", "eval=off", "device=cpu", "trainer.max_steps=3",
        *([f"trainer.precision={precision}"] if precision else []),
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"tracking.artifact_root={tmp_path}/artifacts",
        f"trainer.checkpoint_dir={tmp_path}/checkpoints",
        *extra,
    ]


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

"""ablation/* headline metrics, progress labels, and the warnings avoided at their source."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch

from sdxl_ablate.model.placement import place
from sdxl_ablate.config.identity import seed_override, short_name, without_seed
from sdxl_ablate.run.sweep import expand
from sdxl_ablate.evaluate.headline import summary_metrics


def test_summary_metrics_from_a_variants_metrics():
    metrics = {"eval/clip_style": 0.8, "eval/clip_style_base": 0.75, "eval/clip_text": 0.3,
               "eval/clip_text_base": 0.32, "eval/heldout_loss": 0.5, "eval/heldout_loss_base": 0.625,
               "memory/peak_reserved_gib": 9.5, "perf/images_per_s": 3.25, "perf/step_time_s": 0.5,
               "params/trainable": 1234.0, "train/final_loss": 0.1, "train/loss": 0.2}
    s = summary_metrics(metrics)
    assert s == pytest.approx({
        "ablation/clip_style": 0.8, "ablation/clip_text": 0.3, "ablation/clip_style_lift": 0.05,
        "ablation/clip_text_lift": -0.02, "ablation/heldout_loss_drop": 0.125, "ablation/peak_memory_gib": 9.5,
        "ablation/peak_vram_gib": 9.5, "ablation/images_per_s": 3.25, "ablation/step_time_s": 0.5,
        "ablation/trainable_params": 1234.0, "ablation/final_loss": 0.1})
    # CPU: the resident set, and no "vram"; missing sources give no summary metric, NaN neither.
    cpu = summary_metrics({"memory/peak_rss_gib": 1.5, "eval/clip_style": float("nan"), "eval/clip_style_base": 0.7})
    assert cpu == {"ablation/peak_memory_gib": 1.5}


def test_the_headline_carries_the_noise_and_leaves_a_random_clip_out():
    metrics = {"eval/clip_style": 0.98, "eval/clip_style_base": 0.97, "eval/clip_style_lift_se": 0.002,
               "eval/heldout_loss": 0.85, "eval/heldout_loss_base": 1.09, "eval/heldout_loss_delta_se": 0.01,
               "train/final_loss": 0.9}
    real = summary_metrics({**metrics, "eval/clip_random": 0.0})
    assert real["ablation/clip_style_lift"] == pytest.approx(0.01) and real["ablation/clip_style_lift_se"] == 0.002
    assert real["ablation/heldout_loss_drop_se"] == 0.01
    smoke = summary_metrics({**metrics, "eval/clip_random": 1.0})
    assert not [k for k in smoke if k.startswith("ablation/clip_")]
    assert smoke["ablation/heldout_loss_drop"] == pytest.approx(0.24) and smoke["ablation/final_loss"] == 0.9


def test_progress_labels():
    assert short_name("variant=attn_dropout05") == "attn_dropout05"
    assert short_name("trainer.seed=1,variant=attn") == "attn seed=1"
    assert short_name("lora.rank=4,lora.targets=all") == "lora.rank=4,lora.targets=all"
    assert without_seed("trainer.seed=2,variant=attn") == "variant=attn"
    assert without_seed("lora.targets=all,trainer.seed=2") == "lora.targets=all"
    assert without_seed("trainer.seed=2") == "default"
    assert seed_override("lora.targets=all,trainer.seed=2") == "2" and seed_override("variant=attn") is None
    # The study's six variants x three seeds; the command line overrides the sweep file's key.
    six = {"variant": "te_all,te_attn,all,attn,dora_prodigy,attn_dropout05"}
    assert len(expand(six, ["sweep=naruto_study", "experiment=demo"])) == 6
    assert len(expand(six, ["trainer.seed=0,1,2"])) == 18
    assert len(expand(six, ["variant=attn,all"])) == 2
    assert len(expand({}, ["trainer.seed=range(0,4)"])) == 4


def test_job_label_in_a_real_sweep(tmp_path):
    """Hydra's job number and the sweep's size reach the label (a 3-job multirun of a stub app)."""
    import subprocess
    import sys
    import textwrap

    app = tmp_path / "app.py"
    app.write_text(textwrap.dedent("""
        import hydra
        from sdxl_ablate.run.progress import job_label
        from hydra.core.hydra_config import HydraConfig

        @hydra.main(version_base="1.3", config_path=None, config_name=None)
        def main(cfg):
            print("LABEL", job_label(HydraConfig.get().job.override_dirname))

        main()
    """))
    out = subprocess.run([sys.executable, str(app), "-m", "+variant=a,b", "+trainer.seed=0", f"hydra.sweep.dir={tmp_path}/m"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    labels = [line.split(" ", 1)[1] for line in out.stdout.splitlines() if line.startswith("LABEL")]
    assert labels == ["[1/2] a seed=0", "[2/2] b seed=0"], out.stderr


def test_place_casts_without_diffusers_float32_warning(caplog):
    from diffusers import UNet2DConditionModel
    from diffusers.utils import logging as dlogging

    from sdxl_ablate.model.sdxl import build_tiny

    unet: UNet2DConditionModel = build_tiny(0).unet
    dlogging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            place(unet, "cpu", torch.float32)  # nothing to do
            place(unet, "cpu", torch.bfloat16)
        assert all(p.dtype == torch.bfloat16 for p in unet.parameters())
        assert not [r for r in caplog.records if "kept in float32" in r.getMessage()]
        with caplog.at_level(logging.WARNING):
            unet.to("cpu", torch.float32)  # what place avoids: the library's call warns
        assert [r for r in caplog.records if "kept in float32" in r.getMessage()]
    finally:
        dlogging.disable_propagation()


def test_a_variant_trains_and_evaluates_without_the_known_library_warnings(tmp_path, caplog):
    """The whole path of two variants in one process (the second gets the base back from the
    shared cache): no diffusers float32 cast warning, no transformers checkpointing deprecation."""
    import warnings

    from diffusers.utils import logging as dlogging

    from sdxl_ablate.run import runner
    from sdxl_ablate.config import to_typed
    from tests.conftest import compose_config, tiny_overrides

    dlogging.enable_propagation()
    try:
        with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
            warnings.simplefilter("always")
            for i, targets in enumerate(("all", "attn")):
                cfg = to_typed(compose_config(tiny_overrides(
                    tmp_path, "study=warn", "eval=tiny", "eval.steps=2", "trainer.max_steps=2",
                    "lora.text_encoder=true", "trainer.gradient_checkpointing=true", f"lora.targets={targets}",
                    precision="bf16")))
                runner.run(cfg, f"v{i}", tmp_path / f"out{i}")
    finally:
        dlogging.disable_propagation()
    messages = [r.getMessage() for r in caplog.records] + [str(w.message) for w in caught]
    assert not [m for m in messages if "kept in float32" in m], messages
    assert not [m for m in messages if "checkpointing_enable" in m and "deprecated" in m], messages

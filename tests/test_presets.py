"""Every pinned recipe composes to what it promises and runs two steps on the tiny model."""

from __future__ import annotations

import pytest

from sdxl_ablate.run import runner
from sdxl_ablate.config import Optimizer, Precision, to_typed

from .conftest import CONF, compose_config, tiny_overrides

PRESETS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml") if p.stem != "demo")


def test_presets_say_what_the_recipes_say():
    r32 = to_typed(compose_config(["experiment=naruto_r32_512_fp16"]))
    assert (r32.lora.rank, r32.lora.alpha, r32.lora.dropout, r32.data.resolution) == (32, 16.0, 0.1, 512)
    assert (r32.trainer.batch_size, r32.trainer.grad_accum, r32.trainer.lr) == (1, 4, 1e-5)
    assert (r32.trainer.precision, r32.trainer.optimizer, r32.trainer.max_grad_norm) == (
        Precision.fp16, Optimizer.adamw8bit, 1.0)
    te = to_typed(compose_config(["experiment=naruto_1024_te_fp16vae"]))
    assert te.lora.text_encoder and te.model.vae_fp16_safe and te.model.vae == "madebyollin/sdxl-vae-fp16-fix"
    assert (te.data.resolution, te.trainer.batch_size, te.eval.prompts) == (1024, 3, ["cute dragon creature"])
    inst = to_typed(compose_config(["experiment=naruto_75_instance_bf16"]))
    assert (inst.data.limit, inst.data.instance_prompt, inst.trainer.max_steps) == (
        75, "Naruto style anime character", 1200)
    assert (inst.trainer.batch_size, inst.trainer.grad_accum, inst.trainer.precision) == (2, 2, Precision.bf16)
    assert (inst.data.class_prompt, inst.data.heldout) == ("anime character", 0)
    assert (r32.trainer.epochs, r32.trainer.max_steps, r32.trainer.checkpoint_every, r32.eval.steps) == (5, None, 500, 30)
    assert r32.trainer.base_weights.value == "fp32" and r32.data.heldout == 0
    assert (te.trainer.max_steps, te.data.heldout) == (1000, 0)
    a32 = to_typed(compose_config(["experiment=naruto_r16a32_512_fp16"]))
    assert (a32.lora.rank, a32.lora.alpha, a32.trainer.precision, a32.model.vae_fp16_safe) == (
        16, 32.0, Precision.fp16, False)


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_runs_two_steps_on_the_tiny_model(preset, tmp_path):
    # The recipe's own precision and optimizer (fp16 and bf16 autocast and 8-bit AdamW run on the CPU too).
    # trainer.epochs=null: a recipe that runs in epochs (000) runs two steps here instead.
    overrides = [f"experiment={preset}", *tiny_overrides(tmp_path, precision=None), "trainer.max_steps=2",
                 "trainer.epochs=null",
                 "data.resolution=64", "data.limit=null", "study=presets"]
    cfg = to_typed(compose_config(overrides))
    assert runner.run(cfg, preset, tmp_path / "out") is not None

"""Samples during training (eval.every_n_steps): images by step, base at step 0, and training
left bit-identical (tiny model, CPU)."""

from __future__ import annotations

import pytest
import torch

from sdxl_ablate.perf.bench import synthetic_data
from sdxl_ablate.config import ConfigError, to_typed
from sdxl_ablate.model.lora import lora_modules
from sdxl_ablate.model.sdxl import build_tiny
from sdxl_ablate.evaluate.samples import TrainingSamples, sample_key, sample_steps
from sdxl_ablate.train.loop import train

from .conftest import compose_config, tiny_overrides

STEPS = 5
FAST = ("trainer.gradient_checkpointing=true", "trainer.batch_size=2", f"trainer.max_steps={STEPS}",
        "trainer.lr=1e-3", "eval=tiny", "eval.steps=2", "eval.resolution=32", "eval.prompts=[a red cat,blue sky]",
        "eval.seeds=[0,3]", "lora.dropout=0.25")


def run(tmp_path, precision, every: int | None):
    cfg = to_typed(compose_config(tiny_overrides(tmp_path, *FAST, precision=precision)))
    cfg.eval.every_n_steps = every
    c, data = build_tiny(0), synthetic_data(64, 8)
    logged: list[tuple[str, int, tuple[int, int]]] = []
    hooks = None
    if every:
        sampler = TrainingSamples(c, cfg, torch.device("cpu"), len(data.train),
                                  lambda im, key, step: logged.append((key, step, im.size)))
        hooks = sampler.hooks()
    result = train(c, data, cfg, torch.device("cpu"), hooks=hooks)
    lora = {k: v.detach().clone() for k, v in c.unet.state_dict().items() if "lora" in k}
    modes = (c.unet.training, [m.training for m in c.unet.modules()][:50], c.vae.device, c.text_encoder.device)
    return result, lora, logged, modes


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_sampling_leaves_training_bit_identical(tmp_path, precision):
    plain, plain_lora, none, plain_modes = run(tmp_path, precision, None)
    sampled, sampled_lora, logged, modes = run(tmp_path, precision, 2)
    assert none == []
    assert sampled.losses == plain.losses and sampled.steps == plain.steps == STEPS
    assert plain_lora.keys() == sampled_lora.keys() and plain_lora
    assert all(torch.equal(plain_lora[k], sampled_lora[k]) for k in plain_lora)
    assert modes == plain_modes  # train mode (dropout on) and placement restored
    # Step 0 (base), every 2nd step and the last: 2 prompts x 2 seeds each, 32 px.
    keys = {sample_key(p, s) for p in ("a red cat", "blue sky") for s in (0, 3)}
    assert sorted({step for _, step, _ in logged}) == [0, 2, 4, 5]
    assert sorted(logged) == sorted((k, step, (32, 32)) for k in keys for step in (0, 2, 4, 5))


def test_base_images_are_the_base_model_and_adapters_come_back(tmp_path):
    cfg = to_typed(compose_config(tiny_overrides(tmp_path, *FAST)))
    cfg.eval.every_n_steps = 1
    c = build_tiny(0)
    from sdxl_ablate.model.lora import add_adapters

    params = add_adapters(c, cfg.lora)
    with torch.no_grad():
        for p in params:  # a LoRA that changes the model a lot
            p.add_(0.5)
    images = {}
    sampler = TrainingSamples(c, cfg, torch.device("cpu"), 8, lambda im, key, step: images.__setitem__((key, step), im))
    sampler.base()
    sampler.sample(1)
    key = sample_key("a red cat", 0)
    assert images[(key, 0)].tobytes() != images[(key, 1)].tobytes()  # the LoRA is bypassed at step 0 only
    assert all(p.requires_grad for p in params)
    assert not any(getattr(m, "disable_adapters", False) is True for m in lora_modules(c)["unet"].modules())
    # and the base images are those of the model without adapters at all
    bare = build_tiny(0)
    other = {}
    TrainingSamples(bare, cfg, torch.device("cpu"), 8, lambda im, k, s: other.__setitem__(k, im)).sample(0)
    assert other[key].tobytes() == images[(key, 0)].tobytes()


def test_sample_steps_and_keys():
    assert sample_steps(10, 30) == [0, 10, 20, 30]
    assert sample_steps(4, 10) == [0, 4, 8, 10]
    assert sample_steps(50, 30) == [0, 30]
    assert sample_key("Bill Gates in Naruto style!", 7) == "samples/bill_gates_in_naruto_style_seed7"


def test_every_n_steps_is_validated(tmp_path):
    with pytest.raises(ConfigError, match=r"eval.every_n_steps=-1"):
        to_typed(compose_config(tiny_overrides(tmp_path, "eval.every_n_steps=-1")))
    assert to_typed(compose_config(tiny_overrides(tmp_path, "eval.every_n_steps=5"))).eval.every_n_steps == 5

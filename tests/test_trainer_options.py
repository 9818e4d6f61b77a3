"""Each trainer option does what its name says, on the tiny model."""

from __future__ import annotations

import math

import pytest
import torch

from sdxl_ablate.train import loop as train_mod, objective
from sdxl_ablate.config import to_typed
from sdxl_ablate.data.datasets import load_data
from sdxl_ablate.model.sdxl import build_tiny

from .conftest import compose_config, tiny_overrides


def setup(tmp_path, *overrides):
    cfg = to_typed(compose_config(tiny_overrides(tmp_path, *overrides)))
    return cfg, build_tiny(0), load_data(cfg.data)


def lora_and_base(c):
    named = dict(c.unet.named_parameters())
    lora = {n: p.detach().clone() for n, p in named.items() if "lora" in n}
    base = {n: p.detach().clone() for n, p in named.items() if "lora" not in n}
    return lora, base


@pytest.mark.parametrize("optimizer,lr", [("adamw", "1e-3"), ("adamw8bit", "1e-3"), ("prodigy", "1.0")])
def test_each_optimizer_trains_the_lora_and_nothing_else(tmp_path, optimizer, lr):
    cfg, c, data = setup(tmp_path, f"trainer.optimizer={optimizer}", f"trainer.lr={lr}", "trainer.max_steps=2")
    result = train_mod.train(c, data, cfg, torch.device("cpu"))
    assert result.status == "ok" and result.steps == 2
    after_lora, after_base = lora_and_base(c)
    fresh = build_tiny(0)
    fresh_base = dict(fresh.unet.named_parameters())
    for name, value in after_base.items():  # frozen base weights untouched
        key = name.replace(".base_layer", "")
        assert torch.equal(value, fresh_base[key].to(value.dtype)), name
    # B starts at 0: any non-zero B means the optimizer stepped.
    assert any(v.abs().sum() > 0 for n, v in after_lora.items() if "lora_B" in n)


def test_grad_accumulation_runs_that_many_micro_batches_per_step(tmp_path, monkeypatch):
    calls = []
    real = objective.per_sample_loss
    monkeypatch.setattr(objective, "per_sample_loss", lambda *a, **k: calls.append(a[2].shape[0]) or real(*a, **k))
    cfg, c, data = setup(tmp_path, "trainer.max_steps=3", "trainer.grad_accum=2", "trainer.batch_size=3")
    result = train_mod.train(c, data, cfg, torch.device("cpu"))
    assert calls == [3] * 6 and result.images_per_step == 6 and result.steps == 3


def test_epochs_set_the_run_length(tmp_path):
    cfg, c, data = setup(tmp_path, "trainer.epochs=2", "trainer.batch_size=4", "trainer.max_steps=null")
    assert len(data.train) == 12
    assert train_mod.train(c, data, cfg, torch.device("cpu")).steps == 2 * math.ceil(12 / 4)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant_with_warmup"])
def test_lr_schedule_and_warmup_reach_the_optimizer(tmp_path, schedule):
    cfg, c, data = setup(tmp_path, f"trainer.lr_scheduler={schedule}", "trainer.warmup_steps=2",
                         "trainer.max_steps=6", "trainer.lr=1e-3")
    lrs = {}
    train_mod.train(c, data, cfg, torch.device("cpu"), log_metrics=lambda m, s: lrs.update({s: m["train/lr"]})
                    if "train/lr" in m else None)
    assert lrs[0] == pytest.approx(5e-4)  # after the first step of a 2-step warmup
    if schedule == "constant_with_warmup":
        assert lrs[5] == pytest.approx(1e-3)
    else:
        assert lrs[5] < lrs[2]  # decays after the warmup


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_keeps_lora_weights_fp32_and_base_in_the_compute_dtype(tmp_path, precision):
    cfg, c, data = setup(tmp_path, f"trainer.precision={precision}", "trainer.max_steps=2")
    result = train_mod.train(c, data, cfg, torch.device("cpu"))
    assert result.status == "ok" and all(math.isfinite(x) for x in result.losses)
    want = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    for name, p in c.unet.named_parameters():
        if "lora" in name:
            assert p.dtype == torch.float32, name
        elif name.endswith("to_q.base_layer.weight"):
            assert p.dtype == want, name


def test_noise_offset_changes_the_noise_per_channel_only():
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    latents = torch.zeros(2, 4, 8, 8)
    plain, _ = objective.draw_noise(latents, 1000, 0.0, g1)
    offset, _ = objective.draw_noise(latents, 1000, 0.1, g2)
    shift = offset - plain
    assert not torch.equal(plain, offset)
    assert torch.allclose(shift, shift[..., :1, :1].expand_as(shift), atol=1e-6)  # constant per channel


def test_log_lines_during_training_go_above_the_bar_not_into_it(tmp_path):
    """A log line mid-training (a checkpoint written, a step skipped) is written through tqdm,
    which clears the bar, prints the line and redraws the bar: the console handler is tqdm's."""
    import logging
    import sys

    seen = []
    console = logging.StreamHandler(sys.stderr)
    logging.root.addHandler(console)
    try:
        cfg, c, data = setup(tmp_path, "trainer.max_steps=2")
        hooks = train_mod.Hooks(after_step=lambda n: seen.append([type(h).__name__ for h in logging.root.handlers]))
        train_mod.train(c, data, cfg, torch.device("cpu"), hooks=hooks)
        assert seen and all("_TqdmLoggingHandler" in names and "StreamHandler" not in names for names in seen)
        assert console in logging.root.handlers  # restored after the loop
    finally:
        logging.root.removeHandler(console)

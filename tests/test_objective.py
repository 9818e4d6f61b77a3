"""The SDXL LoRA objective, term by term, against hand-computed references."""

from __future__ import annotations

import random

import pytest
import torch
from diffusers import DDPMScheduler

from sdxl_ablate.config import Config, Precision, TrainerConfig
from sdxl_ablate.model.sdxl import SDXL_SCHEDULER_CONFIG, build_tiny
from sdxl_ablate.data.precompute import encode_images, encode_prompts, sample_latents
from sdxl_ablate.train.loop import batches, total_steps
from sdxl_ablate.evaluate.scores import HeldoutSet, heldout_loss
from sdxl_ablate.train.objective import denoising_loss, diffusion_loss


class EchoUNet(torch.nn.Module):
    """Predicts zeros and records what it was called with."""

    def forward(self, noisy, steps, embeds, added_cond_kwargs):
        self.seen = (noisy, steps, embeds, added_cond_kwargs)
        return type("Out", (), {"sample": torch.zeros_like(noisy)})()


def reference(latents, scheduler, seed):
    """The noise, timesteps and noisy latents diffusion_loss must draw for this seed."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(latents.shape, generator=g)
    steps = torch.randint(0, 1000, (latents.shape[0],), generator=g)
    return noise, steps, scheduler.add_noise(latents, noise, steps)


def test_epsilon_target_and_noising():
    sched = DDPMScheduler.from_config(SDXL_SCHEDULER_CONFIG)
    latents = torch.randn(3, 4, 8, 8)
    unet = EchoUNet()
    cond = (torch.randn(3, 77, 64), torch.randn(3, 32), torch.randn(3, 6))
    loss = diffusion_loss(unet, sched, latents, *cond, Config(), torch.Generator().manual_seed(5))
    noise, steps, noisy = reference(latents, sched, 5)
    assert torch.equal(unet.seen[1], steps) and torch.equal(unet.seen[0], noisy)
    assert torch.equal(unet.seen[3]["time_ids"], cond[2]) and torch.equal(unet.seen[3]["text_embeds"], cond[1])
    torch.testing.assert_close(loss, noise.pow(2).mean())  # zero prediction: loss = mean(target^2)


def test_v_prediction_target():
    sched = DDPMScheduler.from_config({**SDXL_SCHEDULER_CONFIG, "prediction_type": "v_prediction"})
    latents = torch.randn(2, 4, 8, 8)
    loss = diffusion_loss(EchoUNet(), sched, latents, None, None, None, Config(), torch.Generator().manual_seed(1))
    noise, steps, _ = reference(latents, sched, 1)
    torch.testing.assert_close(loss, sched.get_velocity(latents, noise, steps).pow(2).mean())


def test_min_snr_gamma_weighting():
    sched = DDPMScheduler.from_config(SDXL_SCHEDULER_CONFIG)
    latents = torch.randn(4, 4, 8, 8)
    cfg = Config(trainer=TrainerConfig(snr_gamma=5.0))
    loss = diffusion_loss(EchoUNet(), sched, latents, None, None, None, cfg, torch.Generator().manual_seed(2))
    noise, steps, _ = reference(latents, sched, 2)
    abar = sched.alphas_cumprod[steps]
    snr = abar / (1 - abar)
    weight = torch.minimum(snr, torch.full_like(snr, 5.0)) / snr
    torch.testing.assert_close(loss, (noise.pow(2).mean(dim=(1, 2, 3)) * weight).mean())


def test_the_heldout_loss_is_the_training_loss_pair_by_pair():
    """evaluate's held-out loss and training's objective are one rule (train/objective.py):
    each (image, timestep) pair's held-out value is the training loss of that one sample."""
    c = build_tiny()
    cfg = Config(trainer=TrainerConfig(batch_size=2, channels_last=False, precision=Precision.fp32))
    g = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 3, 4, 8, 8, generator=g)
    hs = HeldoutSet(latents, ["a cat", "a dog"], torch.tensor([[64, 64, 0, 0, 64, 64]] * 2),
                    torch.tensor([100, 500, 900]), noise)
    with torch.no_grad():
        got = heldout_loss(c, hs, cfg, torch.device("cpu"))
        embeds, pooled = encode_prompts(c.text_encoder, c.text_encoder_2, c.tokenizer, c.tokenizer_2, hs.captions)
        for i in range(2):
            for j in range(3):
                one = denoising_loss(c.unet, c.noise_scheduler, latents[i:i + 1], noise[i, j:j + 1],
                                     hs.timesteps[j:j + 1], embeds[i:i + 1], pooled[i:i + 1],
                                     hs.time_ids[i:i + 1].float(), cfg)
                torch.testing.assert_close(got[i * 3 + j], one, rtol=1e-4, atol=1e-6)


def test_unknown_prediction_type_is_an_error():
    sched = DDPMScheduler.from_config({**SDXL_SCHEDULER_CONFIG, "prediction_type": "sample"})
    with pytest.raises(ValueError, match="prediction_type='sample'"):
        diffusion_loss(EchoUNet(), sched, torch.randn(1, 4, 8, 8), None, None, None, Config(), torch.Generator())


def test_latents_use_the_vae_posterior_and_sdxl_scaling_factor():
    c = build_tiny(0)
    assert c.vae.config.scaling_factor == 0.13025
    pixels = torch.rand(2, 3, 64, 64) * 2 - 1
    mean, std = encode_images(c.vae, pixels)
    dist = c.vae.encode(pixels).latent_dist
    assert torch.equal(mean, dist.mean) and torch.equal(std, dist.std) and mean.shape == (2, 4, 8, 8)
    g = torch.Generator().manual_seed(0)
    expected = (mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(0))) * 0.13025
    assert torch.equal(sample_latents(mean, std, 0.13025, g), expected)


def test_prompt_embeds_are_both_penultimate_states_and_the_pooled_projection():
    c = build_tiny(0)
    prompts = ["a ninja", "ramen"]
    embeds, pooled = encode_prompts(c.text_encoder, c.text_encoder_2, c.tokenizer, c.tokenizer_2, prompts)
    ids1 = c.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    ids2 = c.tokenizer_2(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    h1 = c.text_encoder(ids1, output_hidden_states=True).hidden_states[-2]
    out2 = c.text_encoder_2(ids2, output_hidden_states=True)
    assert embeds.shape == (2, 77, 64) and pooled.shape == (2, 32)
    assert torch.equal(embeds, torch.cat([h1, out2.hidden_states[-2]], dim=-1))
    assert torch.equal(pooled, out2.text_embeds)
    # The same conditioning the diffusers pipeline builds at inference.
    pe, _, pooled_pipe, _ = c.pipeline().encode_prompt(prompts, do_classifier_free_guidance=False)
    torch.testing.assert_close(pe, embeds)
    torch.testing.assert_close(pooled_pipe, pooled)


def test_batches_cover_every_image_once_per_epoch():
    gen = batches(10, 4, random.Random(0))
    seen = [i for _ in range(5) for i in next(gen)]  # 20 indices = 2 epochs
    assert sorted(seen) == sorted(list(range(10)) * 2)


def test_epochs_set_the_number_of_steps():
    cfg = Config(trainer=TrainerConfig(epochs=3, batch_size=2, grad_accum=2, max_steps=None))
    assert total_steps(cfg, 10) == 3 * 3  # ceil(10 / 4) steps per epoch
    assert total_steps(Config(trainer=TrainerConfig(max_steps=7)), 10) == 7

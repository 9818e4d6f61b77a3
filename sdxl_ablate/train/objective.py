"""SDXL's LoRA objective: the step's randomness, the target and the denoising loss, and the
one micro-batch forward and backward that the loop runs eagerly or replays as a CUDA graph."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr

from sdxl_ablate.config import Config
from sdxl_ablate.model.precision import compute_dtype


def autocast(cfg: Config, device: torch.device) -> torch.autocast:
    """The frozen weights are stored in the compute dtype and the LoRA weights in fp32: autocast
    runs their matmuls in the compute dtype (and keeps the precision-sensitive ops in fp32)."""
    dtype = compute_dtype(cfg)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def draw_noise(latents: torch.Tensor, n_timesteps: int, noise_offset: float, generator):
    """The step's randomness, drawn before the model runs: noise and timesteps per image."""
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if noise_offset:
        # Offset noise: a per-channel shift lets the model learn overall brightness.
        noise = noise + noise_offset * torch.randn(
            (*latents.shape[:2], 1, 1), generator=generator, device=latents.device, dtype=latents.dtype)
    steps = torch.randint(0, n_timesteps, (latents.shape[0],), generator=generator, device=latents.device)
    return noise, steps


def target_for(scheduler, latents: torch.Tensor, noise: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """What the UNet must predict: the noise (epsilon) or the velocity, as the scheduler says."""
    prediction = scheduler.config.prediction_type
    if prediction == "epsilon":
        return noise
    if prediction == "v_prediction":
        return scheduler.get_velocity(latents, noise, steps)
    raise ValueError(f"scheduler prediction_type={prediction!r}: only epsilon and v_prediction are supported")


def diffusion_loss(unet, scheduler, latents, embeds, pooled, time_ids, cfg: Config, generator) -> torch.Tensor:
    """SDXL's denoising objective at random timesteps: epsilon or v, as the scheduler says."""
    noise, steps = draw_noise(latents, scheduler.config.num_train_timesteps, cfg.trainer.noise_offset, generator)
    return denoising_loss(unet, scheduler, latents, noise, steps, embeds, pooled, time_ids, cfg)


def per_sample_loss(unet, scheduler, latents, noise, steps, embeds, pooled, time_ids, channels_last: bool = False,
                    input_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Each sample's denoising MSE (fp32, shape [batch]) against the epsilon or v target, for
    given noise and timesteps (no randomness inside: a CUDA graph can hold it). Training weights
    and averages it (`denoising_loss`); the held-out evaluation reports it pair by pair.
    `input_dtype`: the dtype the noisy latents enter the UNet in, where they are not in it yet."""
    noisy = scheduler.add_noise(latents, noise, steps)
    if input_dtype is not None:
        noisy = noisy.to(input_dtype)
    if channels_last and noisy.is_cuda:
        noisy = noisy.contiguous(memory_format=torch.channels_last)
    pred = unet(noisy, steps, embeds, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    target = target_for(scheduler, latents, noise, steps)
    return F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))


def objective_weights(scheduler, steps: torch.Tensor, snr_gamma: float | None) -> torch.Tensor | None:
    """Min-SNR-gamma's per-sample weights (Hang et al. 2023: down-weight the easy, low-noise
    timesteps), or None for the plain mean."""
    if snr_gamma is None:
        return None
    snr = compute_snr(scheduler, steps)
    prediction = scheduler.config.prediction_type
    return torch.clamp(snr, max=snr_gamma) / (snr + 1 if prediction == "v_prediction" else snr)


def denoising_loss(unet, scheduler, latents, noise, steps, embeds, pooled, time_ids, cfg: Config) -> torch.Tensor:
    """The training objective: the per-sample loss, averaged, or weighted by min-SNR-gamma."""
    t = cfg.trainer
    per_sample = per_sample_loss(unet, scheduler, latents, noise, steps, embeds, pooled, time_ids, t.channels_last)
    weight = objective_weights(scheduler, steps, t.snr_gamma)
    return per_sample.mean() if weight is None else (per_sample * weight).mean()


def denoising_losses(unet, scheduler, latents, noise, steps, embeds, pooled, time_ids,
                     cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """(the objective that is backpropagated, the unweighted mean of the same samples). Every
    variant reports the unweighted one as `train/loss`, so min-SNR runs compare with the rest;
    with no weighting the two are one tensor."""
    t = cfg.trainer
    per_sample = per_sample_loss(unet, scheduler, latents, noise, steps, embeds, pooled, time_ids, t.channels_last)
    plain = per_sample.mean()
    weight = objective_weights(scheduler, steps, t.snr_gamma)
    return (plain if weight is None else (per_sample * weight).mean()), plain


def forward_backward_of(c, cfg: Config, scaler: torch.amp.GradScaler, device: torch.device) -> Callable[..., torch.Tensor]:
    """One micro-batch's forward and backward for drawn noise and timesteps, returning the
    (unscaled) losses [objective, unweighted]: the loop calls it directly, or replays its CUDA graph (graphs.GraphedStep)."""
    grad_accum = cfg.trainer.grad_accum

    def forward_backward(latents, noise, timesteps, embeds, pooled, time_ids) -> torch.Tensor:
        with autocast(cfg, device):  # the forward only: autocast would recast the backward's ops too
            loss, plain = denoising_losses(c.unet, c.noise_scheduler, latents, noise, timesteps, embeds, pooled,
                                           time_ids, cfg)
        scaler.scale(loss / grad_accum).backward()
        # [objective, unweighted]: one tensor, so a CUDA graph holds both and the step reads both at once.
        return torch.stack([loss.detach(), plain.detach()])

    return forward_backward

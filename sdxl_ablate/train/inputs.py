"""A micro-batch's model inputs: latents, prompt embeds, pooled embeds and time ids, from the
cache (encoded once, trainer.cache_latents) or encoded at every step."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from sdxl_ablate.config import Config
from sdxl_ablate.data.datasets import ImageTransform, LoadedData, pick_caption
from sdxl_ablate.data.precompute import build_cache, encode_images, encode_prompts, prepare_example, sample_latents
from sdxl_ablate.model.precision import compute_dtype
from sdxl_ablate.train.objective import autocast


class MicroBatches:
    """`inputs(indices)` -> latents, prompt embeds, pooled embeds, time ids.

    Draws from the loop's `rng` (orientation, crops, flips, caption dropout) and `generator`
    (latent samples), in that order, so a resumed run draws what the uninterrupted one did."""

    def __init__(self, c, data: LoadedData, cfg: Config, device: torch.device, rng: random.Random,
                 generator: torch.Generator):
        self.c, self.data, self.cfg, self.device, self.rng, self.generator = c, data, cfg, device, rng, generator
        self.dtype = compute_dtype(cfg)
        self.transform = ImageTransform(cfg.data.resolution, cfg.data.crop, cfg.data.flip, cfg.data.crop_scale)
        self.cache = None
        text_encoder = cfg.lora.text_encoder
        if cfg.trainer.cache_latents:
            cache_dir = cfg.trainer.cache_dir
            self.cache = build_cache(cfg, c, data.train, with_prompts=not text_encoder, embed_dtype=self.dtype,
                                     cache_dir=Path(cache_dir) if cache_dir else None)
            # The VAE (and frozen text encoders) are no longer needed on the GPU.
            c.vae.to("cpu")
            if not text_encoder:
                c.text_encoder.to("cpu")
                c.text_encoder_2.to("cpu")
            if device.type == "cuda":
                torch.cuda.empty_cache()  # and their memory goes back to the budget, not the cache

    def __call__(self, indices: list[int]):
        with autocast(self.cfg, self.device):  # live prompts are encoded as the forward runs them
            return self._inputs(indices)

    def _inputs(self, indices: list[int]):
        c, cache, device, rng = self.c, self.cache, self.device, self.rng
        if cache is not None:
            # A random one of the image's cached versions: orientation (data.flip) and crop
            # (data.crops_per_image), so with several random crops the crop changes from step to step.
            items = [rng.choice(cache.items[i]) for i in indices]
            mean = torch.stack([p.mean for p in items]).to(device)
            std = torch.stack([p.std for p in items]).to(device)
        else:
            items = [prepare_example(self.data.train[i], self.transform, rng) for i in indices]
            mean, std = encode_images(c.vae, torch.stack([p.pixels for p in items]).to(device))
        latents = sample_latents(mean, std, c.vae.config.scaling_factor, self.generator).to(self.dtype)
        captions = [pick_caption(p.caption, self.cfg.data.caption_dropout, rng) for p in items]
        if cache is not None and cache.prompt_embeds is not None:
            embeds = torch.stack([cache.prompt_embeds[cap][0] for cap in captions]).to(device)
            pooled = torch.stack([cache.prompt_embeds[cap][1] for cap in captions]).to(device)
        else:
            with torch.set_grad_enabled(self.cfg.lora.text_encoder):
                embeds, pooled = encode_prompts(c.text_encoder, c.text_encoder_2, c.tokenizer, c.tokenizer_2, captions)
        time_ids = torch.tensor([p.time_ids for p in items], device=device, dtype=self.dtype)
        return latents, embeds, pooled, time_ids

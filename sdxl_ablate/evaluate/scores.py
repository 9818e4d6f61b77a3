"""Evaluation of one trained variant: held-out denoising loss, sample images, CLIP scores.

Every number is deterministic for a given model and config: the held-out loss uses the VAE
posterior mean, fixed timesteps and fixed noise; each image is generated from its own
seeded generator, so the base and the LoRA model start from the same noise.

Metrics (all under `eval/`):

- `heldout_loss`, `heldout_loss_base`: the denoising loss (MSE against the epsilon or v
  target, as the noise scheduler says) on the held-out images at `eval.heldout_timesteps`,
  with the trained LoRA and without it; `heldout_loss_delta` (LoRA - base) and
  `heldout_loss_delta_se`, its standard error over the paired (image, timestep) samples.
- `clip_style`, `clip_text` (LoRA) and `clip_style_base`, `clip_text_base` (base model): see
  `style_score` and `text_score`; each metric is the mean of the per-image values.
- `clip_style_lift` = clip_style - clip_style_base, `clip_text_lift` likewise.
- Their noise: `<score>_se` is the standard error of each mean over the per-image values
  (`clip_style_se`, `clip_style_base_se`, ...), `clip_style_lift_se` the paired one over
  (LoRA image - base image from the same noise); `heldout_loss_se` over the (image, timestep)
  pairs. The per-pair held-out losses and the per-image scores go into `eval/scores.json`,
  so the report can pair two variants on the same samples.

A score from `eval=tiny` (a random CLIP) means nothing: the run is tagged `clip_scorer` =
`RANDOM_CLIP_LABEL` and logs `eval/clip_random` = 1 (0 for a real CLIP); every reader labels
its CLIP numbers with it, and the `ablation/*` headline leaves them out.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from sdxl_ablate.config import Config, Crop, EvalConfig
from sdxl_ablate.data.datasets import Example, ImageTransform, LoadedData, reference_set
from sdxl_ablate.model.lora import load_lora, remove_adapters
from sdxl_ablate.train.memory import dequantize_base_weights
from sdxl_ablate.model.placement import place
from sdxl_ablate.data.precompute import encode_images, encode_prompts, prepare_example
from sdxl_ablate.model.precision import compute_dtype, vae_dtype
from sdxl_ablate.train.objective import per_sample_loss
from sdxl_ablate.track.quiet import no_transformers_bars
from sdxl_ablate.evaluate.grid import make_grid
from sdxl_ablate.evaluate.headline import CLIP_RANDOM_METRIC, RANDOM_CLIP_LABEL, lift

if TYPE_CHECKING:  # an annotation only: evaluation itself needs no MLflow
    from sdxl_ablate.track.tracker import Tracker

log = logging.getLogger(__name__)

# The held-out noise is part of the metric's definition: the same for every variant.
HELDOUT_NOISE_SEED = 0


def clip_scorer(ev: EvalConfig) -> str:
    """The run's `clip_scorer` tag: the random-CLIP label, or the model and its weights."""
    return RANDOM_CLIP_LABEL if ev.clip_model == "tiny" else f"{ev.clip_model} {ev.clip_pretrained}"


def standard_error(values: torch.Tensor | list[float]) -> float:
    """The standard error of a mean over independent samples (nan with fewer than two)."""
    x = torch.as_tensor(values, dtype=torch.float64)
    return x.std(unbiased=True).item() / len(x) ** 0.5 if len(x) > 1 else float("nan")


class ClipLoadError(RuntimeError):
    """The CLIP model for the scores cannot be loaded; the message says what works offline."""


# --------------------------------------------------------------------------- scores


def style_score(image_emb: torch.Tensor, ref_emb: torch.Tensor) -> torch.Tensor:
    """Per generated image, cos(image embedding, c), where c is the L2-normalised mean of the
    L2-normalised reference (style) image embeddings. (N, D), (M, D) -> (N,).

    `eval/clip_style` is the mean of these values over the generated images.
    """
    centroid = F.normalize(F.normalize(ref_emb.float(), dim=-1).mean(dim=0), dim=-1)
    return F.normalize(image_emb.float(), dim=-1) @ centroid


def text_score(image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """Per generated image, cos(image embedding, text embedding of its own prompt), both
    L2-normalised; row i of `text_emb` is image i's prompt. (N, D), (N, D) -> (N,).

    `eval/clip_text` is the mean of these values over the generated images.
    """
    return (F.normalize(image_emb.float(), dim=-1) * F.normalize(text_emb.float(), dim=-1)).sum(dim=-1)


# --------------------------------------------------------------------------- CLIP


@dataclass
class Clip:
    """An open_clip model with its eval preprocessing and tokenizer."""

    model: torch.nn.Module
    preprocess: Callable[[Image.Image], torch.Tensor]
    tokenizer: Callable[[list[str]], torch.Tensor]
    device: torch.device

    @torch.no_grad()
    def embed_images(self, images: list[Image.Image]) -> torch.Tensor:
        pixels = torch.stack([self.preprocess(im) for im in images]).to(self.device)
        return self.model.encode_image(pixels).float().cpu()

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(texts).to(self.device)).float().cpu()


def tiny_clip(seed: int = 0) -> Clip:
    """A random CLIP of a few hundred K parameters, for offline tests: the scores are
    well-defined but carry no meaning."""
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg
    from open_clip.transform import image_transform

    image_size = 32
    with torch.random.fork_rng(devices=[]):  # the seed must not reset the caller's stream
        torch.manual_seed(seed)
        model = open_clip.CLIP(
            embed_dim=32,
            vision_cfg=CLIPVisionCfg(layers=2, width=32, head_width=16, patch_size=8, image_size=image_size),
            text_cfg=CLIPTextCfg(context_length=77, width=32, heads=2, layers=2),
        )
    # SimpleTokenizer reads the BPE vocabulary that ships in open_clip's wheel: no download.
    return Clip(model.eval(), image_transform(image_size, is_train=False), open_clip.tokenizer.SimpleTokenizer(),
                torch.device("cpu"))


def load_clip(ev: EvalConfig, device: torch.device) -> Clip:
    """`eval.clip_model` with `eval.clip_pretrained` (an open_clip tag or a checkpoint file),
    or the tiny random CLIP for clip_model=tiny."""
    if ev.clip_model == "tiny":
        return tiny_clip()
    import open_clip

    try:
        model, _, preprocess = open_clip.create_model_and_transforms(ev.clip_model, pretrained=ev.clip_pretrained)
        tokenizer = open_clip.get_tokenizer(ev.clip_model)
    except (RuntimeError, OSError) as e:  # open_clip reports unknown names and failed downloads as RuntimeError
        raise ClipLoadError(
            f"eval.clip_model={ev.clip_model!r} with eval.clip_pretrained={ev.clip_pretrained!r} cannot be loaded "
            f"({type(e).__name__}: {e}). Offline, give a local checkpoint file as eval.clip_pretrained, or use "
            "eval=tiny (a tiny random CLIP built in code, which works offline)."
        ) from e
    return Clip(model.to(device).eval(), preprocess, tokenizer, device)


# --------------------------------------------------------------------------- held-out loss


@dataclass
class HeldoutSet:
    """The held-out images, encoded once: the same inputs for the LoRA and the base model."""

    latents: torch.Tensor  # (N, 4, h, w): posterior mean * scaling_factor, fp32, CPU
    captions: list[str]
    time_ids: torch.Tensor  # (N, 6): original h, w, crop top, left, target h, w
    timesteps: torch.Tensor  # (T,)
    noise: torch.Tensor  # (N, T, 4, h, w), fp32, CPU


def heldout_set(components, examples: list[Example], cfg: Config, device: torch.device) -> HeldoutSet:
    transform = ImageTransform(cfg.data.resolution, Crop.center, flip=False)
    prepared = [prepare_example(ex, transform, random.Random(0)) for ex in examples]  # a center crop draws nothing
    vae = place(components.vae, device, torch.float32)
    # One image at a time: the full-size VAE encoder in fp32 is memory-hungry at 1024 px.
    means = [encode_images(vae, p.pixels[None].to(device))[0] for p in prepared]
    latents = torch.cat(means).cpu() * vae.config.scaling_factor
    timesteps = torch.tensor(cfg.eval.heldout_timesteps, dtype=torch.long)
    # Drawn on the CPU: the same noise on every device.
    generator = torch.Generator().manual_seed(HELDOUT_NOISE_SEED)
    noise = torch.randn((len(prepared), len(timesteps), *latents.shape[1:]), generator=generator)
    return HeldoutSet(latents, [p.caption for p in prepared], torch.tensor([p.time_ids for p in prepared]),
                      timesteps, noise)


@torch.no_grad()
def heldout_loss(components, hs: HeldoutSet, cfg: Config, device: torch.device) -> torch.Tensor:
    """Denoising MSE of every (held-out image, timestep) pair, image-major, for the model as it
    stands (with or without adapters), in the training precision. Its mean is the metric; the
    pairs are kept so the LoRA can be compared with the base pair by pair (`heldout_delta`)."""
    c = components
    dtype = compute_dtype(cfg)
    for module in (c.unet, c.text_encoder, c.text_encoder_2):
        module.to(device).eval()  # eval: no LoRA dropout; the frozen encoders may sit on the CPU
    n, t = hs.noise.shape[:2]
    images, steps_of = torch.arange(n).repeat_interleave(t), torch.arange(t).repeat(n)  # every (image, timestep)
    losses = []
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        embeds, pooled = encode_prompts(c.text_encoder, c.text_encoder_2, c.tokenizer, c.tokenizer_2, hs.captions)
        # Batches of the training batch size: known to fit the memory budget.
        for pairs in torch.arange(n * t).split(cfg.trainer.batch_size):
            img, step = images[pairs], steps_of[pairs]
            latents = hs.latents[img].to(device)
            noise = hs.noise[img, step].to(device)
            steps = hs.timesteps[step].to(device)
            on_device = img.to(device)
            # Training's loss, unweighted, with the noisy latents in the training precision.
            losses.append(per_sample_loss(c.unet, c.noise_scheduler, latents, noise, steps, embeds[on_device],
                                          pooled[on_device], hs.time_ids[img].to(device, dtype),
                                          input_dtype=dtype).cpu())
    return torch.cat(losses)


def heldout_delta(lora: torch.Tensor, base: torch.Tensor) -> dict[str, float]:
    """LoRA minus base held-out loss, and the standard error of that difference over the paired
    (image, timestep) samples: the evaluation's own noise, against which an effect is judged."""
    diff = (lora - base).double()
    return {"eval/heldout_loss_delta": diff.mean().item(), "eval/heldout_loss_delta_se": standard_error(diff),
            "eval/heldout_loss_se": standard_error(lora), "eval/heldout_loss_base_se": standard_error(base)}


# --------------------------------------------------------------------------- generation


def inference_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "cpu" else compute_dtype(cfg)


def inference_pipeline(components, cfg: Config, device: torch.device):
    """The components' pipeline, placed for inference within the memory budget."""
    pipe = components.pipeline()
    dtype = inference_dtype(cfg, device)
    dequantize_base_weights(pipe.unet, dtype)
    # Module by module, not pipe.to(dtype): a round trip of the fp32 VAE through fp16 would
    # round its weights.
    for module in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2):
        place(module, device, dtype).eval()
    place(pipe.vae, device, vae_dtype(cfg, dtype)).eval()
    pipe.vae.enable_slicing()
    if cfg.eval.vae_tiling:
        pipe.vae.enable_tiling()
    if cfg.eval.attention_slicing:
        pipe.enable_attention_slicing()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def decode(pipe, latents: torch.Tensor) -> list[Image.Image]:
    """Latents -> PIL images, in the VAE's own dtype (the pipeline would feed an fp32 VAE
    the UNet's fp16/bf16 latents)."""
    vae = pipe.vae
    with torch.no_grad():
        pixels = vae.decode(latents.to(vae.device, vae.dtype) / vae.config.scaling_factor).sample
    return pipe.image_processor.postprocess(pixels.float(), output_type="pil")


def generate(pipe, jobs: list[tuple[str, int]], ev: EvalConfig, resolution: int,
             on_image: Callable[[], object] = lambda: None) -> list[Image.Image]:
    """One image per (prompt, seed), each from its own CPU generator: the same starting
    noise for the base and the LoRA model, on every device. `on_image` runs after each."""
    images = []
    for prompt, seed in jobs:
        latents = pipe(
            prompt,
            height=resolution,
            width=resolution,
            num_inference_steps=ev.steps,
            guidance_scale=ev.guidance_scale,
            generator=torch.Generator().manual_seed(seed),
            output_type="latent",
        ).images
        images += decode(pipe, latents)
        on_image()
    return images


# --------------------------------------------------------------------------- evaluate


def eval_jobs(ev: EvalConfig) -> list[tuple[str, int]]:
    return [(prompt, seed) for prompt in ev.prompts for seed in ev.seeds]


def job_label(prompt: str, seed: int, many_seeds: bool) -> str:
    return f"{prompt} (seed {seed})" if many_seeds else prompt


def clip_scores(clip: Clip, jobs: list[tuple[str, int]], base: list[Image.Image], lora: list[Image.Image],
                refs: list[Image.Image]) -> tuple[dict[str, float], dict[str, list[float]]]:
    """-> (metrics, per-image values); the style scores only when there are reference images."""
    text_emb = clip.embed_texts([prompt for prompt, _ in jobs])
    ref_emb = clip.embed_images(refs) if refs else None
    per_image: dict[str, list[float]] = {}
    for suffix, images in (("", lora), ("_base", base)):
        emb = clip.embed_images(images)
        per_image[f"clip_text{suffix}"] = text_score(emb, text_emb).tolist()
        if ref_emb is not None:
            per_image[f"clip_style{suffix}"] = style_score(emb, ref_emb).tolist()
    metrics = {f"eval/{k}": sum(v) / len(v) for k, v in per_image.items()}
    metrics.update({f"eval/{k}_se": standard_error(v) for k, v in per_image.items()})
    for score in ("clip_style", "clip_text"):
        if (value := lift(metrics, f"eval/{score}")) is not None:
            metrics[f"eval/{score}_lift"] = value
            # Paired: each LoRA image against the base image from the same prompt and noise.
            metrics[f"eval/{score}_lift_se"] = standard_error(
                [a - b for a, b in zip(per_image[score], per_image[f"{score}_base"])])
    return metrics, per_image


def write_artifacts(out_dir: Path, tracker: Tracker, jobs: list[tuple[str, int]], base: list[Image.Image],
                    lora: list[Image.Image], scores: dict) -> None:
    """grid.png, images/{base,lora}_<i>.png and scores.json under out_dir and under the
    run's `eval/` artifacts."""
    images_dir = out_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    for i, (b, l) in enumerate(zip(base, lora)):
        b.save(images_dir / f"base_{i}.png")
        l.save(images_dir / f"lora_{i}.png")
    many_seeds = len({seed for _, seed in jobs}) > 1
    grid = make_grid(base, lora, [job_label(p, s, many_seeds) for p, s in jobs])
    grid.save(out_dir / "grid.png")
    (out_dir / "scores.json").write_text(json.dumps(scores, indent=2, sort_keys=True))
    tracker.log_artifact(out_dir / "grid.png", "eval")
    for i in range(len(jobs)):  # file by file: a reused out_dir may hold stale images
        tracker.log_artifact(images_dir / f"base_{i}.png", "eval/images")
        tracker.log_artifact(images_dir / f"lora_{i}.png", "eval/images")
    tracker.log_dict(scores, "eval/scores.json")


def evaluate(components, lora_file: Path, data: LoadedData, cfg: Config, device: torch.device,
             tracker: Tracker, out_dir: Path, label: str = "") -> dict[str, float]:
    """Held-out loss with and without the trained adapters, then base and LoRA images
    (the LoRA reloaded from `lora_file`), CLIP scores and artifacts. Consumes the adapters:
    the components end up carrying the reloaded LoRA (adapter "variant"). `label` names the
    variant on the progress bar."""
    ev = cfg.eval
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics: dict[str, float] = {}
    jobs = eval_jobs(ev)
    # One unit per held-out pass, per generated image, and for the CLIP scores.
    reference, trained_on = reference_set(data, cfg.data.heldout)
    tracker.set_tags({"eval.reference": "train" if trained_on else "heldout"})
    bar = tqdm(total=2 * bool(reference) + 2 * len(jobs) + 1, desc=f"{label or cfg.lora.targets.value} eval",
               unit="task", dynamic_ncols=True)

    if reference:
        hs = heldout_set(components, reference, cfg, device)
        lora_losses = heldout_loss(components, hs, cfg, device)
        metrics["eval/heldout_loss"] = lora_losses.mean().item()
        bar.update()
    # Stripping the trained adapters restores the exact base model: the base loss, then the
    # base images, and the LoRA comes back only through the saved file (what users load).
    remove_adapters(components)
    if reference:
        base_losses = heldout_loss(components, hs, cfg, device)
        metrics["eval/heldout_loss_base"] = base_losses.mean().item()
        metrics.update(heldout_delta(lora_losses, base_losses))
        bar.update()

    resolution = ev.resolution or cfg.data.resolution
    pipe = inference_pipeline(components, cfg, device)
    base_images = generate(pipe, jobs, ev, resolution, bar.update)
    with no_transformers_bars():  # its "Loading weights" bar would break the evaluation's bar
        load_lora(pipe, lora_file, fuse=ev.fuse_lora)
    lora_images = generate(pipe, jobs, ev, resolution, bar.update)

    clip = load_clip(ev, device)
    clip_metrics, per_image = clip_scores(clip, jobs, base_images, lora_images, [ex.image for ex in reference])
    metrics.update(clip_metrics)
    # 1: the CLIP scores above come from random weights (eval=tiny): a smoke test. A metric as
    # well as the tag, so the headline metrics (computed from metrics alone) leave them out.
    metrics[CLIP_RANDOM_METRIC] = float(ev.clip_model == "tiny")
    bar.update()
    bar.close()

    scores = {
        "metrics": metrics,
        "clip_model": ev.clip_model,
        "clip_pretrained": ev.clip_pretrained,
        "clip_scorer": clip_scorer(ev),
        # Per (image, timestep) pair, image-major: lets the report pair two variants sample by sample.
        "heldout_losses": ({"lora": lora_losses.tolist(), "base": base_losses.tolist()} if data.heldout else None),
        "images": [{"index": i, "prompt": p, "seed": s, **{k: v[i] for k, v in per_image.items()}}
                   for i, (p, s) in enumerate(jobs)],
    }
    write_artifacts(out_dir, tracker, jobs, base_images, lora_images, scores)
    tracker.set_tags({"clip_scorer": clip_scorer(ev)})
    tracker.log_metrics(metrics)
    log.info("eval: %s", ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    return metrics

"""Encoders of the training inputs, and the cache that lets a sweep encode them once.

Both training paths (cached or live) go through `encode_images` and `encode_prompts`, so
a cached run sees the same distribution as a live one: the cache keeps the VAE posterior
(mean, std), and the latent is still sampled afresh at every step.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import os
import random
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock
from PIL import ImageOps

from sdxl_ablate.config import Config, cache_root
from sdxl_ablate.data.datasets import Example, ImageTransform

log = logging.getLogger(__name__)

MAX_TOKENS = 77


@torch.no_grad()
def encode_images(vae, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixels in [-1, 1] -> the VAE posterior's (mean, std), unscaled, in fp32."""
    # The VAE runs in its own dtype (fp32 unless fp16-safe), never in the autocast dtype.
    # (The dry run's meta tensors have no autocast to turn off.)
    no_autocast = contextlib.nullcontext() if pixels.is_meta else torch.autocast(pixels.device.type, enabled=False)
    with no_autocast:
        dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    return dist.mean.float(), dist.std.float()


def sample_latents(mean: torch.Tensor, std: torch.Tensor, scaling_factor: float, generator=None) -> torch.Tensor:
    noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    # SDXL's VAE latents are scaled by 0.13025 (the config's scaling_factor) to unit variance.
    return (mean + std * noise) * scaling_factor


def encode_prompts(text_encoder, text_encoder_2, tokenizer, tokenizer_2, prompts: list[str]):
    """SDXL's conditioning: both encoders' penultimate hidden states, concatenated, and the
    second encoder's pooled projection. Gradients flow when the encoders train."""
    hidden = []
    for tok, enc in ((tokenizer, text_encoder), (tokenizer_2, text_encoder_2)):
        ids = tok(prompts, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt").input_ids
        out = enc(ids.to(enc.device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
    pooled = out.text_embeds  # CLIPTextModelWithProjection of the second encoder
    return torch.cat(hidden, dim=-1), pooled


@dataclass
class Prepared:
    """One training image, transformed: pixels or cached posterior, and SDXL's size/crop ids."""

    caption: str
    time_ids: tuple[int, int, int, int, int, int]  # original h, w, crop top, left, target h, w
    pixels: torch.Tensor | None = None  # (3, H, W) in [-1, 1] (live path)
    mean: torch.Tensor | None = None  # (4, h, w) posterior mean (cached path)
    std: torch.Tensor | None = None


def prepare_example(example: Example, transform: ImageTransform, rng: random.Random) -> Prepared:
    pixels, (oh, ow), (top, left) = transform(example.image, rng)
    res = transform.resolution
    return Prepared(caption=example.caption, time_ids=(oh, ow, top, left, res, res), pixels=pixels)


@dataclass
class LatentCache:
    """The encoded training set: per image (and per flip), the posterior and the time ids;
    per distinct prompt, its embeddings (only when the text encoders are frozen)."""

    # items[i] = the versions of image i: data.crops_per_image crops of it, and as many of its mirror
    # image if data.flip (cache_variants)
    items: list[list[Prepared]]
    prompt_embeds: dict[str, tuple[torch.Tensor, torch.Tensor]] | None  # prompt -> (embeds, pooled), on CPU


_MEMORY: dict[str, LatentCache] = {}  # this process's caches: a sweep's later variants skip the disk


def weights_fingerprint(cfg: Config, with_prompts: bool) -> list:
    """What identifies the weights that make the cached tensors (the VAE, and the text encoders
    when prompts are cached), beyond the model's name: a local directory can be retrained or
    replaced under the same path, and a hub branch can move.

    - local directory: every file's relative name, size and mtime (no weight is read: cheap
      on a 7 GB model, and any rewrite of a weight file changes its mtime);
    - hub id: the commit the local hub cache resolves it to (snapshots/<commit>);
    - models built in code (tiny, sdxl_random): their kind and seed are the whole identity.
    """
    m = cfg.model
    if m.kind.value != "pretrained":
        return []
    parts = ["vae"] if not m.vae else []
    if with_prompts:
        parts += ["text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"]
    out = [_source_fingerprint(m.pretrained, m.revision, "model_index.json", parts)]
    if m.vae:
        out.append(_source_fingerprint(m.vae, None, "config.json", [""]))
    return out


def _source_fingerprint(given: str, revision: str | None, marker: str, parts: list[str]) -> list:
    path = Path(given).expanduser()
    if path.is_dir():
        files = []
        for part in parts:
            root = path / part
            for f in sorted(root.rglob("*") if root.is_dir() else []):
                if f.is_file():
                    st = f.stat()
                    files.append([f.relative_to(path).as_posix(), st.st_size, st.st_mtime_ns])
        return ["dir", str(path.resolve()), files]
    import huggingface_hub

    found = huggingface_hub.try_to_load_from_cache(given, marker, revision=revision)
    if not isinstance(found, str):
        # Loading succeeded, so the files came from somewhere the hub cache cannot name (e.g. a
        # custom cache dir): key on the id and revision, and say so.
        log.warning("latent cache: cannot resolve %s@%s to a hub commit; keyed on the name only", given, revision)
        return ["hub", given, revision]
    return ["hub", given, Path(found).parent.name]  # .../snapshots/<commit>/<marker>


def cache_key(cfg: Config, examples: list[Example], with_prompts: bool, dtype: torch.dtype) -> str:
    h = hashlib.sha256()
    m, d = cfg.model, cfg.data
    ident = {
        "model": [m.kind.value, m.pretrained, m.revision, m.vae, m.vae_fp16_safe],
        "weights": weights_fingerprint(cfg, with_prompts),
        "data": [d.resolution, d.crop.value, d.flip, d.caption_dropout > 0, d.crop_scale, d.crops_per_image],
        "prompts": with_prompts,
        "dtype": str(dtype),
        "seed": cfg.trainer.seed,
        "version": 3,  # 2: keyed by the model's weights; 3: safetensors instead of a pickle
    }
    h.update(json.dumps(ident, sort_keys=True).encode())
    for ex in examples:  # the content itself: a changed image or caption is a new cache
        h.update(ex.caption.encode())
        h.update(ex.image.tobytes())
    return h.hexdigest()[:24]


def build_cache(cfg: Config, components, examples: list[Example], with_prompts: bool,
                embed_dtype: torch.dtype, cache_dir: Path | None = None, batch_size: int | None = None) -> LatentCache:
    """Encodes the examples once; reuses this process's or the disk's copy when it matches."""
    # The fp32 VAE encoder holds ~0.5 GiB per 1024 px image in flight: 8 images at 512 px,
    # 2 at 1024 px stay well inside a 16 GiB card beside the UNet.
    batch_size = batch_size or max(1, 8 * 512**2 // cfg.data.resolution**2)
    key = cache_key(cfg, examples, with_prompts, embed_dtype)
    if key in _MEMORY:
        return _MEMORY[key]
    path = (cache_dir or cache_root() / "latents") / f"{key}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    # Workers of a sweep (or ranks of one run) starting together: the first takes the lock and
    # encodes, the others wait on it and then read its file, so the set is encoded once.
    with FileLock(str(path) + ".lock"):
        cache = _load_checked(path, cfg, examples, with_prompts) if path.is_file() else None
        if cache is None:
            cache = _encode(cfg, components, examples, with_prompts, embed_dtype, batch_size)
            # Unique across hosts sharing the cache dir (hostname + pid + random), then an
            # atomic rename: no reader ever sees half a file.
            tmp = path.with_name(f"{path.name}.{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
            save_cache(cache, tmp)
            tmp.replace(path)
            log.debug("latent cache written: %s (%d images)", path, len(cache.items))
    _MEMORY[key] = cache
    return cache


def _load_checked(path: Path, cfg: Config, examples: list[Example], with_prompts: bool) -> LatentCache | None:
    """The cache file at `path` if it loads and holds what `examples` need; otherwise None,
    with the file moved aside (kept for inspection, not deleted) so the caller rebuilds it.
    Called under the cache's lock, so no other worker reads the file while it moves."""
    try:
        cache = load_cache(path)
        problem = cache_problem(cache, cfg, examples, with_prompts)
    except Exception as e:  # safetensors, json and a missing key each raise their own type
        problem = f"unreadable: {type(e).__name__}: {e}"
    if problem is None:
        log.debug("latent cache hit: %s", path)
        return cache
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    aside = path.with_name(f"{path.name}.bad-{stamp}")
    path.replace(aside)
    log.warning("latent cache %s is bad (%s): moved aside to %s and rebuilt", path, problem, aside)
    return None


def cache_problem(cache: LatentCache, cfg: Config, examples: list[Example], with_prompts: bool) -> str | None:
    """What makes `cache` unfit for `examples` (a count, caption, shape or non-finite value,
    named by its tensor's key in the file), or None when it fits. A cache is read by every
    later run of a sweep, so a NaN in it would make every step of every run non-finite."""
    variants = cache_variants(cfg)
    if len(cache.items) != len(examples):
        return f"{len(cache.items)} images, expected {len(examples)}"
    shape = None
    for i, (ex, item) in enumerate(zip(examples, cache.items)):
        if len(item) != variants:
            return f"image {i}: {len(item)} variants, expected {variants}"
        for j, p in enumerate(item):
            if p.caption != ex.caption:
                return f"image {i}: caption {p.caption!r}, expected {ex.caption!r}"
            shape = shape or tuple(p.mean.shape)
            for name, t in (("mean", p.mean), ("std", p.std)):
                if t.dim() != 3 or tuple(t.shape) != shape:
                    return f"item.{i}.{j}.{name}: shape {tuple(t.shape)}, expected 3-d {shape} like item.0.0.mean"
                if not torch.isfinite(t).all():
                    return f"item.{i}.{j}.{name}: non-finite values"
    if not with_prompts:
        return None
    if cache.prompt_embeds is None:
        return "no prompt embeddings"
    if missing := sorted(set(cached_prompts([ex.caption for ex in examples], cfg)) - set(cache.prompt_embeds)):
        return f"no prompt embeddings for {len(missing)} prompts, e.g. {missing[0]!r}"
    for prompt, tensors in cache.prompt_embeds.items():
        if not all(torch.isfinite(t).all() for t in tensors):
            return f"prompt embeddings of {prompt!r}: non-finite values"
    return None


def _encode(cfg: Config, components, examples: list[Example], with_prompts: bool, embed_dtype: torch.dtype,
            batch_size: int) -> LatentCache:
    transform = ImageTransform(cfg.data.resolution, cfg.data.crop, flip=False, scale=cfg.data.crop_scale)
    rng = random.Random(cfg.trainer.seed)
    # Random crops are drawn here, data.crops_per_image of them per image (and orientation); each
    # step picks one (train/inputs.py): the cache trades crop variety (K crops, not a new one at
    # every step as the live path draws) for encoding each image K times once for the whole sweep.
    # Flipped copies are made before the crop, as the live path does, so crop_top_left is
    # measured on the image the model sees.
    crops = cfg.data.crops_per_image
    items = [[prepare_example(img, transform, rng) for img in _orientations(ex, cfg.data.flip) for _ in range(crops)]
             for ex in examples]
    flat = [p for variants in items for p in variants]
    for i in range(0, len(flat), batch_size):
        chunk = flat[i : i + batch_size]
        mean, std = encode_images(components.vae, torch.stack([p.pixels for p in chunk]))
        for p, m_, s_ in zip(chunk, mean.cpu(), std.cpu()):
            p.mean, p.std, p.pixels = m_, s_, None

    prompt_embeds = None
    if with_prompts:
        prompts = cached_prompts([p.caption for p in flat], cfg)
        prompt_embeds = {}
        with torch.no_grad():
            for i in range(0, len(prompts), batch_size):
                chunk = prompts[i : i + batch_size]
                embeds, pooled = encode_prompts(components.text_encoder, components.text_encoder_2,
                                                components.tokenizer, components.tokenizer_2, chunk)
                for prompt, e, p in zip(chunk, embeds.to("cpu", embed_dtype), pooled.to("cpu", embed_dtype)):
                    prompt_embeds[prompt] = (e, p)
    return LatentCache(items, prompt_embeds)


def save_cache(cache: LatentCache, path: Path) -> None:
    """One safetensors file: the posteriors and prompt embeddings as tensors, captions and time
    ids as JSON in its metadata. Loading it unpickles nothing (a cache dir may be shared)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    items = []
    for i, variants in enumerate(cache.items):
        items.append([{"caption": p.caption, "time_ids": list(p.time_ids)} for p in variants])
        for j, p in enumerate(variants):
            tensors[f"item.{i}.{j}.mean"], tensors[f"item.{i}.{j}.std"] = _own(p.mean), _own(p.std)
    prompts = None
    if cache.prompt_embeds is not None:
        prompts = sorted(cache.prompt_embeds)
        for k, prompt in enumerate(prompts):
            embeds, pooled = cache.prompt_embeds[prompt]
            tensors[f"prompt.{k}.embeds"], tensors[f"prompt.{k}.pooled"] = _own(embeds), _own(pooled)
    save_file(tensors, str(path), metadata={"cache": json.dumps({"items": items, "prompts": prompts})})


def _own(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy: safetensors stores neither views of a shared batch nor strided tensors."""
    return t.clone(memory_format=torch.contiguous_format)


def load_cache(path: Path) -> LatentCache:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["cache"])
        t = {k: f.get_tensor(k) for k in f.keys()}
    items = [[Prepared(caption=v["caption"], time_ids=tuple(v["time_ids"]), mean=t[f"item.{i}.{j}.mean"],
                       std=t[f"item.{i}.{j}.std"]) for j, v in enumerate(variants)]
             for i, variants in enumerate(meta["items"])]
    prompt_embeds = None
    if meta["prompts"] is not None:
        prompt_embeds = {p: (t[f"prompt.{k}.embeds"], t[f"prompt.{k}.pooled"]) for k, p in enumerate(meta["prompts"])}
    return LatentCache(items, prompt_embeds)


def cache_variants(cfg: Config) -> int:
    """Cached versions of each image: its orientations (2 with data.flip) times its random crops."""
    return (2 if cfg.data.flip else 1) * cfg.data.crops_per_image


def cached_prompts(captions: list[str], cfg: Config) -> list[str]:
    """The prompts whose embeddings a cache holds: every caption, and the empty prompt when
    caption dropout can train on it; what `_encode` writes and `cache_problem` checks."""
    return sorted(set(captions) | ({""} if cfg.data.caption_dropout > 0 else set()))


def _orientations(example: Example, flip: bool) -> list[Example]:
    if not flip:
        return [example]
    return [example, Example(ImageOps.mirror(example.image), example.caption)]

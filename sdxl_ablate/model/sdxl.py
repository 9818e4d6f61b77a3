"""The SDXL model components: loaded from a hub id or local directory, or built in code.

`model.kind` picks the source: `pretrained` loads real weights (`load_pretrained`), `tiny`
builds a ~5M-parameter SDXL-architecture model for CPU tests (`build_tiny`), and
`sdxl_random` builds the full-size SDXL-base architecture with random weights, for memory
and speed measurements without a download (`build_sdxl_random`). Everything here works
offline; the CLIP tokenizer is derived from the BPE vocabulary that ships in open_clip's wheel.

Every module comes back in eval mode with requires_grad False: the trainer turns on what
it trains.
"""

from __future__ import annotations

import contextlib
import gzip
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import huggingface_hub
import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    EulerDiscreteScheduler,
    SchedulerMixin,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from huggingface_hub.errors import HFValidationError
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from sdxl_ablate.config import ModelConfig, ModelKind, cache_root
from sdxl_ablate.track.files import atomic_write_text

# --- stabilityai/stable-diffusion-xl-base-1.0: the published config.json values --------------

SDXL_UNET_CONFIG: dict = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    # diffusers' historical misnomer: for SD/SDXL this is the number of heads per block.
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "norm_eps": 1e-5,
    "norm_num_groups": 32,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}

SDXL_VAE_CONFIG: dict = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

# The token ids below are the legacy values the published configs carry; with eos_token_id=2
# transformers pools at argmax(input_ids), which is the first <|endoftext|> (id 49407, the
# largest id) for CLIP's tokenizer.
SDXL_TEXT_ENCODER_CONFIG: dict = {  # CLIP ViT-L/14 text tower
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-5,
    "max_position_embeddings": 77,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "projection_dim": 768,
    "vocab_size": 49408,
}

SDXL_TEXT_ENCODER_2_CONFIG: dict = {  # OpenCLIP ViT-bigG/14 text tower, with its projection
    **SDXL_TEXT_ENCODER_CONFIG,
    "hidden_act": "gelu",
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "projection_dim": 1280,
}

# Published as an EulerDiscreteScheduler config; only the keys that define the training
# noise schedule, which DDPMScheduler and EulerDiscreteScheduler share.
SDXL_SCHEDULER_CONFIG: dict = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
}

# --- the tiny model, after diffusers' own SDXL fast tests ------------------------------------

_TINY_UNET_CONFIG: dict = {
    "block_out_channels": (32, 64),
    "layers_per_block": 2,
    # Latent size for the pipeline's default resolution: 8 * vae_scale_factor 8 = 64 px.
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "attention_head_dim": (2, 4),
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "transformer_layers_per_block": (1, 2),
    # 6 micro-conditioning values (original size, crop, target size) * 8 + pooled text (32).
    "projection_class_embeddings_input_dim": 6 * 8 + 32,
    "cross_attention_dim": 32 + 32,  # text_encoder hidden + text_encoder_2 hidden
    "norm_num_groups": 1,
}

# Four blocks, like SDXL's VAE, so latents are 1/8 of the image side here too: resolution
# arithmetic (and a 64 px image -> 8x8 latents) is the same for the tiny and the real model.
_TINY_VAE_CONFIG: dict = {
    "block_out_channels": (8, 16, 32, 32),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 64,
    "scaling_factor": 0.13025,
    "force_upcast": True,
}

_TINY_TEXT_ENCODER_CONFIG: dict = {
    **SDXL_TEXT_ENCODER_CONFIG,
    "hidden_act": "gelu",
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_attention_heads": 4,
    "num_hidden_layers": 5,
    "projection_dim": 32,
}

# Each subfolder of a diffusers-layout SDXL directory, as load_pretrained reads it.
_SUBFOLDERS = (
    "unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"
)

_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"


class ModelLoadError(RuntimeError):
    """A model that cannot be loaded; the message names it and says what would work."""


@dataclass
class SDXLComponents:
    unet: UNet2DConditionModel
    # None only from build_sdxl_random(with_vae=False) or (with_text_encoders=False).
    vae: Optional[AutoencoderKL]
    text_encoder: Optional[CLIPTextModel]
    text_encoder_2: Optional[CLIPTextModelWithProjection]
    tokenizer: CLIPTokenizer
    tokenizer_2: CLIPTokenizer
    noise_scheduler: DDPMScheduler  # the training noise schedule

    def pipeline(self, scheduler: Optional[SchedulerMixin] = None) -> StableDiffusionXLPipeline:
        """An inference pipeline over these same modules (no copies); default sampler: Euler."""
        return StableDiffusionXLPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            text_encoder_2=self.text_encoder_2,
            tokenizer=self.tokenizer,
            tokenizer_2=self.tokenizer_2,
            unet=self.unet,
            scheduler=scheduler or EulerDiscreteScheduler.from_config(self.noise_scheduler.config),
            # The invisible watermark perturbs every image; evaluation compares images.
            add_watermarker=False,
        )


def load_components(cfg: ModelConfig) -> SDXLComponents:
    """The components `cfg.kind` names, fp32 on CPU; for sdxl_random built directly on a GPU in
    its compute dtype, call build_sdxl_random(device, dtype) instead."""
    kind = ModelKind(cfg.kind)
    if kind == ModelKind.pretrained:
        return load_pretrained(cfg)
    if kind == ModelKind.tiny:
        return build_tiny()
    return build_sdxl_random()


# --- pretrained -------------------------------------------------------------------------------

_ACCEPTED_MODEL = (
    "Accepted: a local directory in diffusers layout (with "
    + ", ".join(f"{s}/" for s in _SUBFOLDERS)
    + "), a hub id such as stabilityai/stable-diffusion-xl-base-1.0 while online (or already "
    "in the hub cache), or, offline without weights, model=tiny or model=sdxl_random."
)
_ACCEPTED_VAE = (
    "Accepted: a VAE directory with config.json and weights at its root, a VAE hub id such as "
    "madebyollin/sdxl-vae-fp16-fix while online (or already in the hub cache), or model.vae=null "
    "for the model's own VAE."
)


def _hub_offline() -> bool:
    # huggingface_hub reads HF_HUB_OFFLINE once, at import; read it again so a later change counts.
    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    return env or bool(huggingface_hub.constants.HF_HUB_OFFLINE)


@dataclass(frozen=True)
class _Source:
    key: str  # the config key, e.g. "model.pretrained"
    given: str  # its value as the user wrote it
    location: str  # a resolved local path, or the hub id
    local: bool
    accepted: str

    def error(self, problem: str) -> ModelLoadError:
        treated = "a local directory" if self.local else "a hub id"
        return ModelLoadError(
            f"{self.key}={self.given!r} (treated as {treated}): {problem} {self.accepted}"
        )


def _locate(key: str, given: str, required: tuple[str, ...], accepted: str) -> _Source:
    """Decides between local directory and hub id; checks a directory's layout before any load."""
    path = Path(given).expanduser()
    if path.is_dir():
        source = _Source(key, given, str(path), True, accepted)
        missing = [r for r in required if not (path / r).exists()]
        if missing:
            raise source.error(f"the directory lacks {', '.join(missing)}.")
        return source
    try:
        huggingface_hub.utils.validate_repo_id(given)
    except HFValidationError:  # not a hub id, so it was meant as a path
        source = _Source(key, given, str(path), True, accepted)
        raise source.error("no such directory exists.") from None
    return _Source(key, given, given, False, accepted)


@contextlib.contextmanager
def _loading(source: _Source, offline: bool) -> Iterator[None]:
    """Turns the OSError that diffusers and transformers raise for a missing repository, file or
    connection into a ModelLoadError that names the source."""
    try:
        yield
    except OSError as e:
        hint = ""
        if offline and not source.local:
            hint = " HF_HUB_OFFLINE is set, so only the local hub cache was searched."
        raise source.error(f"loading failed: {e}{hint}") from e


def load_pretrained(cfg: ModelConfig) -> SDXLComponents:
    """The SDXL components from a hub id or a local diffusers-layout directory, fp32 on CPU."""
    required = tuple(s for s in _SUBFOLDERS if not (s == "vae" and cfg.vae))
    model = _locate("model.pretrained", cfg.pretrained, required, _ACCEPTED_MODEL)
    vae_override = None
    if cfg.vae:  # a standalone VAE: config.json and weights at its root
        vae_override = _locate("model.vae", cfg.vae, ("config.json",), _ACCEPTED_VAE)
    offline = _hub_offline()
    # local_files_only keeps the hub libraries off the network even when HF_HUB_OFFLINE was set
    # after they were imported.
    kw = {"local_files_only": offline}
    fp32 = {"torch_dtype": torch.float32}  # diffusers' spelling
    if vae_override:  # first: it is small, and a wrong id should fail before the UNet loads
        with _loading(vae_override, offline):
            # No revision: model.revision belongs to model.pretrained's repository.
            vae = AutoencoderKL.from_pretrained(vae_override.location, **fp32, **kw)
    kw["revision"] = cfg.revision
    src = model.location
    with _loading(model, offline):
        unet = UNet2DConditionModel.from_pretrained(src, subfolder="unet", **fp32, **kw)
        if not vae_override:
            vae = AutoencoderKL.from_pretrained(src, subfolder="vae", **fp32, **kw)
        # transformers' spelling; transformers 5 would otherwise load in the checkpoint's dtype
        # (fp16 for SDXL).
        te_kw = {"dtype": torch.float32, **kw}
        text_encoder = CLIPTextModel.from_pretrained(src, subfolder="text_encoder", **te_kw)
        text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(
            src, subfolder="text_encoder_2", **te_kw
        )
        tokenizer = CLIPTokenizer.from_pretrained(src, subfolder="tokenizer", **kw)
        tokenizer_2 = CLIPTokenizer.from_pretrained(src, subfolder="tokenizer_2", **kw)
        # Published as an EulerDiscreteScheduler config; DDPM reads the same noise schedule.
        noise_scheduler = DDPMScheduler.from_pretrained(src, subfolder="scheduler", **kw)
    return _frozen(
        SDXLComponents(
            unet, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, noise_scheduler
        )
    )


# --- built in code --------------------------------------------------------------------------


@contextlib.contextmanager
def _build_on(device: torch.device | str, dtype: torch.dtype) -> Iterator[None]:
    """Modules created inside are born on `device` in `dtype`: no fp32 or CPU copy is ever made,
    and on the meta device no memory at all."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def _assemble(unet, vae, text_encoder, text_encoder_2) -> SDXLComponents:
    """Built modules + SDXL's two tokenizers and training noise schedule, frozen."""
    return _frozen(
        SDXLComponents(
            unet=unet,
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=clip_tokenizer(),
            tokenizer_2=clip_tokenizer(pad_token="!"),
            noise_scheduler=DDPMScheduler.from_config(SDXL_SCHEDULER_CONFIG),
        )
    )


def _frozen(c: SDXLComponents) -> SDXLComponents:
    for module in (c.unet, c.vae, c.text_encoder, c.text_encoder_2):
        if module is not None:
            module.eval().requires_grad_(False)
    return c


def build_unet(
    kind: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> UNet2DConditionModel:
    """A randomly initialised UNet, kind "tiny" or "sdxl"; device="meta" builds it in no memory."""
    configs = {"tiny": _TINY_UNET_CONFIG, "sdxl": SDXL_UNET_CONFIG}
    if kind not in configs:
        raise ValueError(f"unet kind {kind!r}: must be one of {sorted(configs)}")
    with _build_on(device, dtype):
        unet = UNet2DConditionModel(**configs[kind])
    return unet.eval().requires_grad_(False)


# Per architecture: the VAE's and the two text encoders' configs (the UNet's: build_unet).
_ARCHITECTURES = {
    "tiny": (_TINY_VAE_CONFIG, _TINY_TEXT_ENCODER_CONFIG, _TINY_TEXT_ENCODER_CONFIG),
    "sdxl": (SDXL_VAE_CONFIG, SDXL_TEXT_ENCODER_CONFIG, SDXL_TEXT_ENCODER_2_CONFIG),
}


def build_components(
    kind: str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    with_text_encoders: bool = True,
    with_vae: bool = True,
    vae_dtype: torch.dtype | None = None,
) -> SDXLComponents:
    """The SDXL architecture ("tiny" or full-size "sdxl") with random weights, built in place on
    `device` (the meta device: shapes only, no memory); the VAE in `vae_dtype` (default
    `dtype`), e.g. fp32 beside a bf16 UNet. Modules are made in the order unet, VAE, text
    encoders, so a seeded caller gets the same weights every time."""
    if kind not in _ARCHITECTURES:
        raise ValueError(f"architecture {kind!r}: must be one of {sorted(_ARCHITECTURES)}")
    vae_config, te_config, te2_config = _ARCHITECTURES[kind]
    unet = build_unet(kind, device, dtype)
    vae = text_encoder = text_encoder_2 = None
    if with_vae:
        with _build_on(device, vae_dtype or dtype):
            vae = AutoencoderKL(**vae_config)
    with _build_on(device, dtype):
        if with_text_encoders:
            text_encoder = CLIPTextModel(CLIPTextConfig(**te_config))
            text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**te2_config))
    return _assemble(unet, vae, text_encoder, text_encoder_2)


def build_tiny(seed: int = 0) -> SDXLComponents:
    """The SDXL architecture at toy size with random weights, identical for the same seed."""
    # fork_rng: a fixed seed here must not reset the caller's global random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_components("tiny")


def build_sdxl_random(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                      **kwargs) -> SDXLComponents:
    """The full-size SDXL-base architecture with random weights (no download), built in place."""
    return build_components("sdxl", device, dtype, **kwargs)


# --- the offline CLIP tokenizer ---------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible map from bytes to printable unicode characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    bs = printable + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _clip_bpe_files() -> tuple[Path, Path]:
    """vocab.json and merges.txt in Hugging Face format, derived once from open_clip's BPE file."""
    folder = cache_root() / "clip_tokenizer"
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    if vocab_file.is_file() and merges_file.is_file():
        return vocab_file, merges_file
    # Located without importing open_clip, which would pull in its models.
    spec = importlib.util.find_spec("open_clip")
    bpe = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
    with gzip.open(bpe, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    # As in CLIP's SimpleTokenizer: line 0 is a header; the vocabulary is 49408 tokens =
    # 256 bytes + 256 end-of-word bytes + 48894 merges + 2 special tokens.
    merges = lines[1 : 49152 - 256 - 2 + 1]
    byte_chars = list(_bytes_to_unicode().values())
    vocab = [*byte_chars, *(c + "</w>" for c in byte_chars), *("".join(m.split()) for m in merges)]
    vocab += [_BOS, _EOS]
    folder.mkdir(parents=True, exist_ok=True)
    ids = {token: i for i, token in enumerate(vocab)}
    atomic_write_text(vocab_file, json.dumps(ids, ensure_ascii=False))
    atomic_write_text(merges_file, "#version: 0.2\n" + "\n".join(merges) + "\n")
    return vocab_file, merges_file


def clip_tokenizer(pad_token: str = _EOS) -> CLIPTokenizer:
    """The real CLIP BPE tokenizer, offline. SDXL's `tokenizer` pads with "<|endoftext|>",
    its `tokenizer_2` with "!"."""
    vocab_file, merges_file = _clip_bpe_files()
    return CLIPTokenizer(
        str(vocab_file), str(merges_file), model_max_length=77, pad_token=pad_token
    )

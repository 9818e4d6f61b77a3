"""Dtypes by name, and which dtype each SDXL component is stored in: the one place that says so.

Training, the shared base (basecache), the dry run (train/plan), evaluation and the export all
ask here, so a rule such as "the VAE stays fp32" cannot drift between them.
"""

from __future__ import annotations

import torch

from sdxl_ablate.config import BaseWeights, Config, Precision

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def dtype_of(name: Precision | str) -> torch.dtype:
    """`fp16` / `Precision.fp16` -> torch.float16; a clear error for anything else."""
    key = name.value if isinstance(name, Precision) else str(name)
    try:
        return DTYPES[key]
    except KeyError:
        raise ValueError(f"precision {key!r}: use one of {', '.join(DTYPES)}") from None


def compute_dtype(cfg: Config) -> torch.dtype:
    """The dtype the frozen UNet and text encoders are stored and run in (trainer.precision)."""
    return dtype_of(cfg.trainer.precision)


def vae_dtype(cfg: Config, compute: torch.dtype | None = None) -> torch.dtype:
    """fp32 VAE: the SDXL VAE overflows in fp16 (NaN latents and black images), unless the
    configured VAE is an fp16-safe one (model.vae_fp16_safe, e.g. madebyollin/sdxl-vae-fp16-fix),
    which then runs in the compute dtype."""
    compute = compute_dtype(cfg) if compute is None else compute
    return compute if cfg.model.vae_fp16_safe else torch.float32


def unet_dtype(cfg: Config, compute: torch.dtype | None = None) -> torch.dtype:
    """The dtype the frozen UNet is stored in during training: the compute dtype, or fp32 with
    trainer.base_weights=fp32 (its matmuls still run in the compute dtype, under autocast).
    fp8 storage (trainer.base_weights=fp8) is made later from the compute-dtype weights."""
    compute = compute_dtype(cfg) if compute is None else compute
    return torch.float32 if cfg.trainer.base_weights == BaseWeights.fp32 else compute

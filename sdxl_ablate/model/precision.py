"""Dtypes by name, and which dtype each SDXL component is stored in: the one place that says so.

Training, the shared base (basecache), the dry run (train/plan), evaluation and the export all
ask here, so a rule such as "the VAE stays fp32" cannot drift between them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from sdxl_ablate.config import BaseWeights, Config, Precision

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def dtype_of(name: Precision | str) -> torch.dtype:
    """`fp16` / `Precision.fp16` -> torch.float16; a clear error for anything else."""
    key = name.value if isinstance(name, Precision) else str(name)
    if key == Precision.auto.value:
        raise ValueError("trainer.precision=auto names no dtype until it is resolved for a device "
                         "(model.precision.resolve_precision; the runner does it before anything loads)")
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


# --- trainer.precision=auto: what the card runs natively -------------------------------------
#
# bf16 arithmetic is native from compute capability 8.0 (Ampere) on. torch.cuda.is_bf16_supported()
# is not the test: it can answer True on older cards, where bf16 is emulated (slowly) through fp32.
# So `auto` reads the capability: bf16 from 8.0 on, else fp16 with loss scaling; on the CPU fp32
# (the tiny demo and the tests train in fp32: bitwise repeatable, and the CPU has no fast fp16).

BF16_NATIVE_CAPABILITY = (8, 0)


@dataclass(frozen=True)
class Card:
    """A CUDA GPU as the precision rule sees it."""

    index: int
    name: str
    capability: tuple[int, int]

    @property
    def bf16_native(self) -> bool:
        return tuple(self.capability) >= BF16_NATIVE_CAPABILITY

    def describe(self) -> str:
        return f"{self.name} (cuda:{self.index}, compute capability {self.capability[0]}.{self.capability[1]})"


def card_of(index: int) -> Card:
    return Card(index, torch.cuda.get_device_name(index), tuple(torch.cuda.get_device_capability(index)))


def cards_for(device: str) -> list[Card]:
    """The CUDA GPUs a job with `device` may train on: none for the CPU (or `auto` with no GPU
    visible), GPU N for `cuda:N`, every visible GPU for `auto`/`cuda` (the job claims one of
    them later, run/devices.py)."""
    if device == "cpu" or not torch.cuda.is_available():
        return []
    n = torch.cuda.device_count()
    indices = [int(device.split(":", 1)[1])] if device.startswith("cuda:") else list(range(n))
    return [card_of(i) for i in indices if i < n]


def bf16_problem(card: Card) -> str | None:
    """Why trainer.precision=bf16 cannot run on `card` (named, with fp16 as the way out), or None."""
    if card.bf16_native:
        return None
    return (f"trainer.precision=bf16: {card.describe()} has no native bf16 arithmetic (it needs compute "
            f"capability {BF16_NATIVE_CAPABILITY[0]}.{BF16_NATIVE_CAPABILITY[1]}+, Ampere or newer); use "
            "trainer.precision=fp16 (loss-scaled) or trainer.precision=auto")


@dataclass(frozen=True)
class PrecisionChoice:
    requested: str  # what the config asked for: auto, fp32, fp16, bf16
    resolved: str  # what runs
    reason: str

    def tags(self) -> dict[str, str]:
        return {"trainer.precision_requested": self.requested, "trainer.precision_resolved": self.resolved,
                "trainer.precision_reason": self.reason}


def choose_precision(requested: Precision | str, cards: list[Card]) -> PrecisionChoice:
    """The precision that runs for `requested` on `cards` (the GPUs the job may get; none: the
    CPU). `auto` takes bf16 only when every one of them runs it natively, so the choice does not
    depend on which GPU the job claims later. An explicit value is kept as it is (an explicit
    bf16 on a card without it is the preflight's and the device claim's error, not changed here)."""
    req = requested.value if isinstance(requested, Precision) else str(requested)
    if req != Precision.auto.value:
        return PrecisionChoice(req, req, "set explicitly")
    if not cards:
        return PrecisionChoice(req, "fp32", "auto on the CPU: fp32")
    lacking = [c for c in cards if not c.bf16_native]
    if lacking:
        return PrecisionChoice(req, "fp16", f"auto: {lacking[0].describe()} has no native bf16; fp16 with loss scaling")
    return PrecisionChoice(req, "bf16", f"auto: {cards[0].describe()} runs bf16 natively")


def resolve_precision(cfg: Config, cards: list[Card] | None = None) -> tuple[Config, PrecisionChoice]:
    """`cfg` with trainer.precision replaced by the value that runs on its device (see
    `choose_precision`), so everything downstream (dtypes, loss scaler, config hash, logged
    params and config.yaml) sees what ran; and the choice, for the run's tags."""
    choice = choose_precision(cfg.trainer.precision, cards_for(cfg.device) if cards is None else cards)
    if choice.resolved == choice.requested:
        return cfg, choice
    return replace(cfg, trainer=replace(cfg.trainer, precision=Precision(choice.resolved))), choice

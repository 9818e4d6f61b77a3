"""Everything the loop needs before its first step: the model with the variant's adapters and
the trainer's speed and memory switches, the optimizer, its schedule and the loss scaler.

`configure` is also what the dry run (train/plan.py) applies on the meta device, so the two
cannot disagree about which switches a variant has."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

import torch
from diffusers.optimization import get_scheduler
from diffusers.training_utils import cast_training_params

from sdxl_ablate.config import BaseWeights, Config, Optimizer, Precision
from sdxl_ablate.model.compile import compile_blocks
from sdxl_ablate.model.lora import add_adapters
from sdxl_ablate.model.placement import place
from sdxl_ablate.model.precision import compute_dtype, unet_dtype, vae_dtype
from sdxl_ablate.train import distributed
from sdxl_ablate.train.auto import checkpointing_on
from sdxl_ablate.train.graphs import GraphedStep, graphs_usable
from sdxl_ablate.train.memory import store_base_weights_fp8
from sdxl_ablate.train.objective import forward_backward_of

log = logging.getLogger(__name__)


def make_optimizer(params, cfg: Config, device: torch.device) -> torch.optim.Optimizer:
    t = cfg.trainer
    if t.optimizer == Optimizer.adamw:
        # fused: one kernel for all LoRA tensors instead of several per tensor.
        return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, fused=device.type == "cuda")
    if t.optimizer == Optimizer.adamw8bit:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=t.lr, weight_decay=t.weight_decay)
    from prodigyopt import Prodigy

    # Prodigy estimates the step size itself; lr scales it (1.0 is the intended value).
    return Prodigy(params, lr=t.lr, weight_decay=t.weight_decay, safeguard_warmup=True, use_bias_correction=True)


def checkpoint_function(cfg: Config) -> Callable:
    """diffusers' block checkpointing, without saving and restoring the RNG state when nothing
    random runs inside the blocks (LoRA dropout 0): that bookkeeping costs host time at every
    block and cannot be captured in a CUDA graph. With dropout the recomputed masks must match
    the forward's, so the state is kept."""
    preserve_rng_state = cfg.lora.dropout > 0

    def checkpointed(module, *args):
        return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False,
                                                 preserve_rng_state=preserve_rng_state)

    return checkpointed


def checkpoint_text_encoder(encoder) -> None:
    """transformers' checkpointing of a text encoder. transformers 5.23 renamed
    `gradient_checkpointing_enable` to `activation_checkpointing_enable` and made the old name
    warn on every call; older releases only have the old name."""
    enable = getattr(encoder, "activation_checkpointing_enable", None) or encoder.gradient_checkpointing_enable
    enable()


def lora_input_casting(c, enabled: bool) -> None:
    for name in ("unet", "text_encoder", "text_encoder_2"):
        for m in getattr(c, name).modules():
            if hasattr(m, "cast_input_dtype_enabled"):
                m.cast_input_dtype_enabled = enabled


def place_components(c, cfg: Config, device: torch.device) -> None:
    """Frozen weights in the compute dtype (the UNet in fp32 with trainer.base_weights=fp32), the
    VAE in its own (see precision.vae_dtype and unet_dtype)."""
    dtype = compute_dtype(cfg)
    place(c.unet, device, unet_dtype(cfg, dtype))
    place(c.vae, device, vae_dtype(cfg, dtype))
    place(c.text_encoder, device, dtype)
    place(c.text_encoder_2, device, dtype)


def configure(c, cfg: Config, device: torch.device | None = None) -> None:
    """The switches of `cfg.trainer` that hold on any device, applied to components that carry
    their adapters: precision of the trainable weights, fp8 base weights, checkpointing, modes.
    `device` decides an unresolved `gradient_checkpointing=auto` (train/auto.py; None: the CPU)."""
    t, lo = cfg.trainer, cfg.lora
    dtype = compute_dtype(cfg)
    # The optimizer and the fp16 loss scaler need fp32 master weights.
    cast_training_params([c.unet, c.text_encoder, c.text_encoder_2], dtype=torch.float32)
    if dtype != torch.float32:
        # peft casts each LoRA input to the LoRA weights' fp32, and autocast casts it straight
        # back to the compute dtype for the matmul: an exact round trip that only costs time and
        # memory. Restored after training (inference runs without autocast).
        lora_input_casting(c, enabled=False)
    if t.base_weights == BaseWeights.fp8:
        # Half the bytes of the frozen UNet; the matmuls still run in the compute dtype.
        store_base_weights_fp8(c.unet, dtype)
    if checkpointing_on(cfg, device or torch.device("cpu")):
        # Keep only each block's input in the forward and recompute the block in the backward:
        # about one forward more arithmetic for a fraction of the activation memory.
        c.unet.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint_function(cfg))
        if lo.text_encoder:
            checkpoint_text_encoder(c.text_encoder)
            checkpoint_text_encoder(c.text_encoder_2)
    c.unet.train()
    for enc in (c.text_encoder, c.text_encoder_2):
        enc.train(lo.text_encoder)


def prepare_model(c, cfg: Config, device: torch.device) -> list[torch.nn.Parameter]:
    """Places the components, attaches the variant's adapters and applies the speed and memory
    switches of `cfg.trainer`; returns the trainable (LoRA) parameters."""
    t = cfg.trainer
    place_components(c, cfg, device)
    params = add_adapters(c, cfg.lora)
    configure(c, cfg, device)
    if device.type == "cuda":  # on a CPU (tests, the demo) these cost more than they save
        if t.channels_last:
            # cuDNN's fastest bf16 convolutions want NHWC; the UNet's activations follow its weights.
            c.unet.to(memory_format=torch.channels_last)
        if t.compile:
            compile_blocks(c.unet)
    return params


@dataclass
class Setup:
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    lr_schedule: object
    scaler: torch.amp.GradScaler
    ddp: distributed.Ddp | None  # data-parallel under torchrun: see distributed.py
    forward_backward: Callable[..., torch.Tensor]  # one micro-batch, eagerly
    graphed: GraphedStep | None  # the same, replayed as a CUDA graph (trainer.cuda_graphs)
    prepare_s: float


def setup(c, cfg: Config, device: torch.device, steps: int) -> Setup:
    t = cfg.trainer
    started = time.perf_counter()
    params = prepare_model(c, cfg, device)
    prepare_s = time.perf_counter() - started
    ddp = distributed.current()
    if ddp is not None:
        ddp.check_batch(t.batch_size)
        ddp.broadcast(params)
    optimizer = make_optimizer(params, cfg, device)
    lr_schedule = get_scheduler(t.lr_scheduler.value, optimizer, num_warmup_steps=t.warmup_steps,
                                num_training_steps=steps)
    # Loss scaling only for fp16: bf16 has fp32's range.
    scaler = torch.amp.GradScaler(device.type, enabled=t.precision == Precision.fp16)
    forward_backward = forward_backward_of(c, cfg, scaler, device)
    use_graphs, why = graphs_usable(cfg, device)
    if t.cuda_graphs and not use_graphs and device.type == "cuda":  # a CUDA-only default, like compile
        log.warning("trainer.cuda_graphs=true has no effect here: %s", why)
    graphed = GraphedStep(forward_backward, params) if use_graphs else None
    return Setup(params, optimizer, lr_schedule, scaler, ddp, forward_backward, graphed, prepare_s)

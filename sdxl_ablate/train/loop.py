"""The training loop shared by every variant: SDXL's LoRA objective, nothing variant-specific.

Read `train` top to bottom: setup (`prepare_model`: precision, adapters, the speed and memory
switches; the optimizer), inputs (cached or live), then the loop. A variant differs only
through its config. The benchmark (`sdxl_ablate.bench`) drives this same function, so what it
measures is what users run.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager, Iterator

import torch
import torch.nn.functional as F
from diffusers.optimization import get_scheduler
from diffusers.training_utils import compute_snr
from tqdm.auto import tqdm

from sdxl_ablate.train import distributed
from sdxl_ablate.config import BaseWeights, Config, Optimizer, Precision
from sdxl_ablate.data.datasets import ImageTransform, LoadedData, pick_caption
from sdxl_ablate.train.checkpoint import Checkpointer
from sdxl_ablate.model.lora import add_adapters, lora_modules
from sdxl_ablate.train.memory import store_base_weights_fp8
from sdxl_ablate.model.placement import place
from sdxl_ablate.model.precision import compute_dtype, vae_dtype
from sdxl_ablate.data.precompute import build_cache, encode_images, encode_prompts, prepare_example, sample_latents

log = logging.getLogger(__name__)



@dataclass
class TrainResult:
    status: str  # ok | nan
    steps: int = 0
    losses: list[float] = field(default_factory=list)  # per optimizer step; nan where skipped
    nonfinite_steps: int = 0
    step_times: list[float] = field(default_factory=list)
    images_per_step: int = 1
    cuda_graphs: bool = False  # whether the steps after the warm-up replayed a CUDA graph
    timings: dict[str, float] = field(default_factory=dict)  # prepare_s, inputs_s (phases.py)

    @property
    def final_loss(self) -> float:
        """Mean of the last (up to) 10 finite step losses: less noisy than the last step."""
        finite = [x for x in self.losses if math.isfinite(x)][-10:]
        return sum(finite) / len(finite) if finite else float("nan")

    @property
    def step_time(self) -> float:
        """Median seconds per optimizer step, the first step (warm-up) left out."""
        times = self.step_times[1:] or self.step_times
        return statistics.median(times) if times else float("nan")

    @property
    def images_per_s(self) -> float:
        return self.images_per_step / self.step_time


@dataclass
class Hooks:
    """Where an observer (the benchmark) may look in without a copy of the loop: `loop_start`
    runs once the model and inputs are ready, just before the first step; `step(i)` is a
    context manager around optimizer step i (e.g. a profiler); `after_step(n)` runs after the
    n-th finished optimizer step, once it is logged (e.g. sample images, sdxl_ablate.evaluate.samples).
    `label` names the variant on the progress bar (e.g. `[5/6] attn_dropout05`)."""

    loop_start: Callable[[], None] = lambda: None
    step: Callable[[int], ContextManager] = lambda i: contextlib.nullcontext()
    after_step: Callable[[int], None] = lambda n: None
    label: str = ""


def total_steps(cfg: Config, n_images: int) -> int:
    t = cfg.trainer
    if t.epochs is None:
        return t.max_steps
    return t.epochs * math.ceil(n_images / (t.batch_size * t.grad_accum))


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


# The blocks compiled one by one (trainer.compile): they hold nearly all of the arithmetic and
# of the small kernels, and they repeat (70 transformer blocks of 2 shapes), so a few compiled
# graphs serve the whole UNet. Compiling the UNet whole takes minutes; per block, about one.
_COMPILED_BLOCKS = ("BasicTransformerBlock", "ResnetBlock2D")


def compile_blocks(unet: torch.nn.Module) -> int:
    """torch.compile every transformer and resnet block of the UNet in place; returns how many."""
    import torch._dynamo

    # One graph per distinct block shape (and per batch size): SDXL has about 20; the default
    # recompile limit (8) would leave the rest eager.
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 256))
    torch._dynamo.config.accumulated_cache_size_limit = max(
        torch._dynamo.config.accumulated_cache_size_limit, 4096)
    n = 0
    for m in unet.modules():
        if type(m).__name__ in _COMPILED_BLOCKS:
            m.compile(dynamic=False)  # fixed shapes: a batch size is one compile, then reused
            n += 1
    return n


def uncompile_blocks(unet: torch.nn.Module) -> None:
    """Back to eager modules (evaluation runs other shapes; no reason to compile those)."""
    for m in unet.modules():
        if getattr(m, "_compiled_call_impl", None) is not None:
            m._compiled_call_impl = None


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


def prepare_model(c, cfg: Config, device: torch.device) -> list[torch.nn.Parameter]:
    """Places the components, attaches the variant's adapters and applies the speed and memory
    switches of `cfg.trainer`; returns the trainable (LoRA) parameters."""
    t, lo = cfg.trainer, cfg.lora
    dtype = compute_dtype(cfg)
    # Frozen weights in the compute dtype; the trainable LoRA weights stay fp32 (the optimizer
    # and the fp16 loss scaler need fp32 master weights).
    place(c.unet, device, dtype)
    place(c.vae, device, vae_dtype(cfg, dtype))
    place(c.text_encoder, device, dtype)
    place(c.text_encoder_2, device, dtype)
    params = add_adapters(c, lo)
    for p in params:
        p.data = p.data.float()
    if dtype != torch.float32:
        # peft casts each LoRA input to the LoRA weights' fp32, and autocast casts it straight
        # back to the compute dtype for the matmul: an exact round trip that only costs time and
        # memory. Restored after training (inference runs without autocast).
        lora_input_casting(c, enabled=False)
    if t.base_weights == BaseWeights.fp8:
        # Half the bytes of the frozen UNet; the matmuls still run in the compute dtype.
        store_base_weights_fp8(c.unet, dtype)
    if t.gradient_checkpointing:
        # Keep only each block's input in the forward and recompute the block in the backward:
        # about one forward more arithmetic for a fraction of the activation memory.
        c.unet.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint_function(cfg))
        if lo.text_encoder:
            checkpoint_text_encoder(c.text_encoder)
            checkpoint_text_encoder(c.text_encoder_2)
    if t.channels_last and device.type == "cuda":
        # cuDNN's fastest bf16 convolutions want NHWC; the UNet's activations follow its weights.
        c.unet.to(memory_format=torch.channels_last)
    c.unet.train()
    for enc in (c.text_encoder, c.text_encoder_2):
        enc.train(lo.text_encoder)
    if t.compile and device.type == "cuda":  # on a CPU (tests, the demo) compiling costs more than it saves
        compile_blocks(c.unet)
    return params


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


def denoising_loss(unet, scheduler, latents, noise, steps, embeds, pooled, time_ids, cfg: Config) -> torch.Tensor:
    """The loss for given noise and timesteps (no randomness inside: a CUDA graph can hold it)."""
    t = cfg.trainer
    noisy = scheduler.add_noise(latents, noise, steps)
    if t.channels_last and noisy.is_cuda:
        noisy = noisy.contiguous(memory_format=torch.channels_last)
    pred = unet(noisy, steps, embeds, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    target = target_for(scheduler, latents, noise, steps)
    prediction = scheduler.config.prediction_type
    if t.snr_gamma is None:
        return F.mse_loss(pred.float(), target.float())
    # Min-SNR-gamma (Hang et al. 2023): down-weight the easy, low-noise timesteps.
    snr = compute_snr(scheduler, steps)
    weight = torch.clamp(snr, max=t.snr_gamma) / (snr + 1 if prediction == "v_prediction" else snr)
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (per_sample * weight).mean()


class GraphedStep:
    """trainer.cuda_graphs: one micro-batch's forward and backward, captured once as a CUDA graph
    and replayed at every later step.

    Why: a step launches ~17,000-25,000 kernels, and launching each from Python costs the host
    more time than most of them take on the GPU, so the GPU waits (the benchmark's profile).
    A replay launches them all at once. What changes: nothing numerically; the inputs are
    copied into fixed buffers, the noise and timesteps are drawn outside (same generator, same
    order), and the LoRA gradients land in fixed tensors that the optimizer reads. The finite
    check, clipping, loss scaling's bookkeeping and the optimizer step stay outside the graph.
    """

    def __init__(self, run: Callable[..., torch.Tensor], params: list[torch.nn.Parameter]):
        self.run = run  # (*inputs) -> loss, after its backward
        self.params = params
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: list[torch.Tensor] = []
        self.loss: torch.Tensor | None = None
        self.grads: list[torch.Tensor] = []
        self.summed: list[torch.Tensor] | None = None
        self.failed = False

    def __call__(self, *inputs: torch.Tensor, micro_batch: int = 0, micro_batches: int = 1) -> torch.Tensor:
        if self.failed:  # the same forward and backward, eagerly
            return self.run(*inputs)
        if self.graph is None:
            try:
                self._capture(inputs)
            except RuntimeError as err:  # e.g. an op that syncs with the host: go on eagerly, say so
                log.warning("CUDA graph capture failed, training goes on without graphs: %s", err)
                self.failed = True
                for p in self.params:
                    p.grad = None
                torch.cuda.synchronize()
                return self.run(*inputs)
        else:
            for buffer, x in zip(self.inputs, inputs):
                buffer.copy_(x)
        self.graph.replay()
        # The optimizer reads p.grad; zero_grad(set_to_none) between steps drops the attribute,
        # not the graph's tensors, so point it back. The next replay overwrites those tensors:
        # with gradient accumulation the micro-batches are summed in tensors of their own.
        grads = self.grads
        if micro_batches > 1:
            if micro_batch == 0:
                self.summed = [g.clone() for g in self.grads]
            else:
                torch._foreach_add_(self.summed, self.grads)
            grads = self.summed
        for p, g in zip(self.params, grads):
            p.grad = g
        return self.loss

    def _capture(self, inputs) -> None:
        for p in self.params:
            p.grad = None  # the backward then writes fresh tensors of the graph's own pool
        self.inputs = [x.clone() for x in inputs]
        torch.cuda.synchronize()
        # The eager warm-up steps' cached blocks cannot serve the graph's private pool.
        torch.cuda.empty_cache()
        graph = torch.cuda.CUDAGraph()
        # Captured on the stream the loop runs on (see train): autograd's gradient accumulators
        # were made there in the warm-up steps, and one on another stream would sync (illegal
        # while capturing).
        with torch.cuda.graph(graph, stream=torch.cuda.current_stream()):  # replayed in __call__
            self.loss = self.run(*self.inputs)
        self.graph = graph
        self.grads = [p.grad for p in self.params]


@contextlib.contextmanager
def side_stream(device: torch.device) -> Iterator[None]:
    """Runs the enclosed work on a fresh CUDA stream, ordered after and before the default one."""
    default, side = torch.cuda.current_stream(device), torch.cuda.Stream(device)
    side.wait_stream(default)
    with torch.cuda.stream(side):
        yield
    default.wait_stream(side)


# Eager steps before the capture: compilation, cuBLAS/cuDNN set-up and the optimizer's state
# happen there, never inside the graph.
GRAPH_WARMUP_STEPS = 2


def graphs_usable(cfg: Config, device: torch.device) -> tuple[bool, str]:
    """Whether trainer.cuda_graphs applies to this variant, and why not."""
    t, lo = cfg.trainer, cfg.lora
    if not t.cuda_graphs:
        return False, "off"
    if device.type != "cuda":
        return False, "CUDA graphs need a CUDA device"
    if lo.text_encoder:
        return False, "text-encoder LoRA tokenizes and encodes prompts on the host inside the step"
    if lo.dropout > 0 and t.gradient_checkpointing:
        return False, "LoRA dropout with checkpointing must save and restore the RNG state per block"
    return True, "on"


class DataOrder:
    """Endless shuffled epochs of indices, cut into batches; resumable (`state_dict`).

    The shuffles draw from the loop's shared `rng` (also used for crops, flips and caption
    dropout), whose state the checkpoint keeps; this holds the rest of the current epoch."""

    def __init__(self, n: int, batch_size: int, rng: random.Random):
        self.n, self.batch_size, self.rng = n, batch_size, rng
        self.pending: list[int] = []

    def __iter__(self) -> "DataOrder":
        return self

    def __next__(self) -> list[int]:
        while len(self.pending) < self.batch_size:
            epoch = list(range(self.n))
            self.rng.shuffle(epoch)
            self.pending += epoch
        batch, self.pending = self.pending[: self.batch_size], self.pending[self.batch_size :]
        return batch

    def state_dict(self) -> dict:
        return {"n": self.n, "batch_size": self.batch_size, "pending": list(self.pending)}

    def load_state_dict(self, state: dict) -> None:
        if (state["n"], state["batch_size"]) != (self.n, self.batch_size):
            raise ValueError(f"data order of {state['n']} images in batches of {state['batch_size']} cannot "
                             f"continue with {self.n} images in batches of {self.batch_size}")
        self.pending = list(state["pending"])


def batches(n: int, batch_size: int, rng: random.Random) -> DataOrder:
    """Endless shuffled epochs of indices, cut into batches."""
    return DataOrder(n, batch_size, rng)


@dataclass
class TrainState:
    """Everything the loop carries from one step to the next: what a checkpoint saves."""

    named_params: dict[str, torch.nn.Parameter]  # the LoRA weights, by component-qualified name
    optimizer: torch.optim.Optimizer
    lr_schedule: object
    scaler: torch.amp.GradScaler
    generator: torch.Generator  # noise, timesteps and latent samples
    rng: random.Random  # data order, crops, flips, caption dropout
    order: DataOrder
    result: TrainResult
    step: int = 0  # optimizer steps done (counting skipped non-finite ones)
    nonfinite_in_row: int = 0


def train(components, data: LoadedData, cfg: Config, device: torch.device,
          log_metrics: Callable[[dict[str, float], int], None] = lambda m, s: None,
          memory_stats: Callable[[], dict[str, float]] = dict,
          hooks: Hooks | None = None, checkpointer: Checkpointer | None = None) -> TrainResult:
    t, lo = cfg.trainer, cfg.lora
    hooks = hooks or Hooks()
    torch.manual_seed(t.seed)
    rng = random.Random(t.seed)
    generator = torch.Generator(device).manual_seed(t.seed)
    dtype = compute_dtype(cfg)
    c = components

    # --- model: precision, placement, adapters, speed and memory switches --------------------
    timings = {"prepare_s": -time.perf_counter()}
    params = prepare_model(c, cfg, device)
    timings["prepare_s"] += time.perf_counter()
    ddp = distributed.current()  # data-parallel under torchrun: see distributed.py
    if ddp is not None:
        ddp.check_batch(t.batch_size)
        ddp.broadcast(params)
    log_metrics({"params/trainable": sum(p.numel() for p in params),
                 "params/unet_total": sum(p.numel() for p in c.unet.parameters())}, 0)
    steps = total_steps(cfg, len(data.train))
    optimizer = make_optimizer(params, cfg, device)
    lr_schedule = get_scheduler(t.lr_scheduler.value, optimizer, num_warmup_steps=t.warmup_steps,
                                num_training_steps=steps)
    # Loss scaling only for fp16: bf16 has fp32's range.
    scaler = torch.amp.GradScaler(device.type, enabled=t.precision == Precision.fp16)
    scaling_factor = c.vae.config.scaling_factor

    # --- inputs: encode once (cache) or at every step (live) ------------------------------
    cache = None
    timings["inputs_s"] = -time.perf_counter()
    if t.cache_latents:
        cache = build_cache(cfg, c, data.train, with_prompts=not lo.text_encoder, embed_dtype=dtype,
                            cache_dir=Path(t.cache_dir) if t.cache_dir else None)
        # The VAE (and frozen text encoders) are no longer needed on the GPU.
        c.vae.to("cpu")
        if not lo.text_encoder:
            c.text_encoder.to("cpu")
            c.text_encoder_2.to("cpu")
        if device.type == "cuda":
            torch.cuda.empty_cache()  # and their memory goes back to the budget, not the cache
    timings["inputs_s"] += time.perf_counter()
    transform = ImageTransform(cfg.data.resolution, cfg.data.crop, cfg.data.flip)

    def next_inputs(indices: list[int]):
        """-> latents, prompt embeds, pooled embeds, time ids for one micro-batch."""
        if cache is not None:
            items = [rng.choice(cache.items[i]) for i in indices]  # random orientation when flipped copies exist
            mean = torch.stack([p.mean for p in items]).to(device)
            std = torch.stack([p.std for p in items]).to(device)
        else:
            items = [prepare_example(data.train[i], transform, rng) for i in indices]
            mean, std = encode_images(c.vae, torch.stack([p.pixels for p in items]).to(device))
        latents = sample_latents(mean, std, scaling_factor, generator).to(dtype)
        captions = [pick_caption(p.caption, cfg.data.caption_dropout, rng) for p in items]
        if cache is not None and cache.prompt_embeds is not None:
            embeds = torch.stack([cache.prompt_embeds[cap][0] for cap in captions]).to(device)
            pooled = torch.stack([cache.prompt_embeds[cap][1] for cap in captions]).to(device)
        else:
            with torch.set_grad_enabled(lo.text_encoder):
                embeds, pooled = encode_prompts(c.text_encoder, c.text_encoder_2, c.tokenizer, c.tokenizer_2, captions)
        time_ids = torch.tensor([p.time_ids for p in items], device=device, dtype=dtype)
        return latents, embeds, pooled, time_ids

    def forward_backward(latents, noise, timesteps, embeds, pooled, time_ids) -> torch.Tensor:
        """What the CUDA graph holds: the loss for drawn noise and timesteps, and its backward."""
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = denoising_loss(c.unet, c.noise_scheduler, latents, noise, timesteps, embeds, pooled,
                                  time_ids, cfg)
        scaler.scale(loss / t.grad_accum).backward()
        return loss.detach()

    use_graphs, why = graphs_usable(cfg, device)
    if t.cuda_graphs and not use_graphs and device.type == "cuda":  # a CUDA-only default, like compile
        log.warning("trainer.cuda_graphs=true has no effect here: %s", why)
    graphed = GraphedStep(forward_backward, params) if use_graphs else None

    # --- the loop ----------------------------------------------------------------------------
    result = TrainResult(status="ok", images_per_step=t.batch_size * t.grad_accum, timings=timings)
    order = batches(len(data.train), t.batch_size, rng)
    named = {f"{comp}.{n}": p for comp, m in lora_modules(c).items() for n, p in m.named_parameters() if p.requires_grad}
    state = TrainState(named, optimizer, lr_schedule, scaler, generator, rng, order, result)
    # A resumed run continues exactly where the checkpoint left off (weights, optimizer, every RNG).
    start = checkpointer.restore(state, len(data.train)) if checkpointer is not None else 0
    hooks.loop_start()
    bar = tqdm(range(start, steps), initial=start, total=steps, desc=f"{hooks.label or cfg.lora.targets.value} train",
               unit="step", dynamic_ncols=True)
    # A graph is captured off the default stream, and the warm-up steps whose backward made the
    # gradient accumulators must have run there too: with graphs the loop runs on a side stream.
    stream = contextlib.ExitStack()
    if graphed is not None:
        stream.enter_context(side_stream(device))
    for step in bar:
        with hooks.step(step):
            started = time.perf_counter()
            step_loss, finite = 0.0, True
            for micro in range(t.grad_accum):
                with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                    latents, embeds, pooled, time_ids = next_inputs(next(order))
                eager = graphed is None or step < start + GRAPH_WARMUP_STEPS
                if eager and ddp is None:
                    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                        loss = diffusion_loss(c.unet, c.noise_scheduler, latents, embeds, pooled, time_ids, cfg,
                                              generator)
                else:
                    noise, timesteps = draw_noise(latents, c.noise_scheduler.config.num_train_timesteps,
                                                  t.noise_offset, generator)
                    inputs = (latents, noise, timesteps, embeds, pooled, time_ids)
                    if ddp is not None:  # every rank drew the global batch's randomness; each trains its slice
                        inputs = ddp.shard(*inputs)
                    if eager:
                        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                            loss = denoising_loss(c.unet, c.noise_scheduler, *inputs, cfg)
                    else:  # the graph runs the backward too (its gradients go unused if the loss is not finite)
                        loss = graphed(*inputs, micro_batch=micro, micro_batches=t.grad_accum)
                global_loss = loss if ddp is None else ddp.mean(loss)  # the same decision on every rank
                finite = bool(torch.isfinite(global_loss))
                if finite and eager:
                    scaler.scale(loss / t.grad_accum).backward()
                if not finite:
                    break
                step_loss += global_loss.item() / t.grad_accum

            if finite and ddp is not None:
                ddp.average_grads(params)

            if finite:
                if t.max_grad_norm is not None:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
                scaler.step(optimizer)
                scaler.update()
                lr_schedule.step()
            # Also after a skipped step: no update from a batch whose loss is NaN or inf.
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # honest step times: wait for the GPU
            elapsed = time.perf_counter() - started

        state.step = step + 1
        if not finite:
            result.nonfinite_steps += 1
            state.nonfinite_in_row += 1
            result.losses.append(float("nan"))
            log.warning("step %d: non-finite loss, step skipped (%d in a row)", step, state.nonfinite_in_row)
            if state.nonfinite_in_row >= t.max_nonfinite_in_row:
                result.status = "nan"
                break
        else:
            state.nonfinite_in_row = 0
            result.step_times.append(elapsed)
            result.losses.append(step_loss)
            result.steps = step + 1

            if step % t.log_every == 0 or step == steps - 1:
                metrics = {"train/loss": step_loss, "train/lr": lr_schedule.get_last_lr()[0], **memory_stats()}
                log_metrics(metrics, step)
                bar.set_postfix(loss=f"{step_loss:.4f}")
            hooks.after_step(result.steps)  # e.g. sample images (samples.py); leaves training untouched
        if checkpointer is not None:
            checkpointer.after_step(state, steps, len(data.train))
    bar.close()
    stream.close()
    result.steps = len(result.losses)
    result.cuda_graphs = graphed is not None and graphed.graph is not None and not graphed.failed
    uncompile_blocks(c.unet)
    lora_input_casting(c, enabled=True)
    return result
